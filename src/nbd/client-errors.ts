/**
 * Errors raised by the NBD client, and the names used in their messages. Each failure mode has
 * its own class so callers can tell "the server refused this request" (the connection stays
 * usable) from "the server broke the protocol" or "the connection is gone" (it does not).
 */

import { Cmd, Opt, Rep, nbdErrName, type NbdErrName } from './protocol.js';

function reverseLookup(table: Record<string, number>, prefix: string, value: number): string {
  for (const [name, v] of Object.entries(table)) if (v === value) return `${prefix}${name}`;
  return `${prefix}${value >>> 0}`;
}

/** `NBD_OPT_GO`, or `NBD_OPT_<n>` for an option this file does not know. */
export function optName(option: number): string {
  return reverseLookup(Opt, 'NBD_OPT_', option);
}

/** `ERR_UNKNOWN`, `ACK`, ... (without the NBD_REP_ prefix, as in `NBD_OPT_GO: ERR_UNKNOWN`). */
export function repName(type: number): string {
  return reverseLookup(Rep, '', type);
}

/** `NBD_CMD_READ`, or `NBD_CMD_<n>` for commands the protocol does not define. */
export function cmdName(type: number): string {
  return reverseLookup(Cmd, 'NBD_CMD_', type);
}

/**
 * The server answered an option with an error reply (`NBD_REP_ERR_*`). The connection is
 * still in option haggling; the negotiation helpers close it before rejecting.
 */
export class NbdOptionError extends Error {
  readonly option: number;
  /** The wire reply type, e.g. `Rep.ERR_UNKNOWN`. */
  readonly replyType: number;
  /** The UTF-8 message the server sent with the error, if any. */
  readonly serverMessage: string | undefined;

  constructor(option: number, replyType: number, serverMessage?: string) {
    const detail = serverMessage ? `: ${serverMessage}` : '';
    super(`${optName(option)}: ${repName(replyType)}${detail}`);
    this.name = 'NbdOptionError';
    this.option = option;
    this.replyType = replyType;
    this.serverMessage = serverMessage || undefined;
  }
}

/**
 * The server failed one request. The connection stays usable. `errno` is the wire value,
 * never a host errno; `errnoName` is undefined for values the protocol does not define (the
 * spec asks clients to treat those like EINVAL, which is the caller's call to make).
 */
export class NbdRequestError extends Error {
  readonly errno: number;
  readonly errnoName: NbdErrName | undefined;
  /** The command that failed, e.g. `Cmd.READ`. */
  readonly command: number;
  /** The message carried by a structured error chunk, if the server sent one. */
  readonly serverMessage: string | undefined;
  /** The offset named by an NBD_REPLY_TYPE_ERROR_OFFSET chunk, if any. */
  readonly errorOffset: bigint | undefined;

  constructor(command: number, errno: number, serverMessage?: string, errorOffset?: bigint) {
    const errnoName = nbdErrName(errno);
    const what = errnoName ?? `unknown error ${errno}`;
    const at = errorOffset === undefined ? '' : ` at offset ${errorOffset}`;
    const detail = serverMessage ? `: ${serverMessage}` : '';
    super(`${cmdName(command)} failed with ${what}${at}${detail}`);
    this.name = 'NbdRequestError';
    this.errno = errno;
    this.errnoName = errnoName;
    this.command = command;
    this.serverMessage = serverMessage || undefined;
    this.errorOffset = errorOffset;
  }
}

/**
 * The peer sent something the protocol forbids (bad magic, unknown cookie, a chunk outside
 * its request...). Once this is raised the byte stream cannot be trusted, so the connection
 * has been closed and every outstanding request failed with the same error.
 */
export class NbdProtocolError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'NbdProtocolError';
  }
}

/** The connection ended (closed by either side, socket error, timeout) before an answer came. */
export class NbdConnectionError extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'NbdConnectionError';
  }
}
