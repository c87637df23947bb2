/**
 * The control protocol's wire format: JSON-RPC 2.0, one JSON text per line (UTF-8, ended by
 * "\n"), over a unix socket. Error codes are stable: scripts and the CLI rely on them, and
 * every error also carries a symbolic name in `error.data.code`.
 *
 * Documented in docs/control.md.
 */
import type { ManagerErrorCode } from '../core/manager.js';

export const JSONRPC_VERSION = '2.0';

/** Longest request line the daemon accepts (bytes, without the newline). */
export const MAX_REQUEST_LINE_BYTES = 1024 * 1024;

/** Requests in one batch at most. */
export const MAX_BATCH = 64;

/** Symbolic error names, as sent in `error.data.code`. */
export type RpcErrorName =
  | 'parse-error'
  | 'invalid-request'
  | 'too-large'
  | 'method-not-found'
  | 'invalid-params'
  | 'internal'
  | 'busy'
  | 'forbidden'
  | ManagerErrorCode;

/** The numeric JSON-RPC code of each error name. */
export const RPC_ERROR_CODES: Readonly<Record<RpcErrorName, number>> = {
  'parse-error': -32700,
  'invalid-request': -32600,
  'too-large': -32600,
  'method-not-found': -32601,
  'invalid-params': -32602,
  internal: -32603,
  failed: -32000,
  busy: -32001,
  forbidden: -32003,
  invalid: -32002,
  'not-found': -32004,
  timeout: -32008,
  exists: -32009,
};

export type RpcId = string | number | null;

export interface RpcRequest {
  jsonrpc: '2.0';
  method: string;
  params?: Record<string, unknown>;
  /** Absent for a notification (which gets no response). */
  id?: RpcId;
}

export interface RpcErrorObject {
  code: number;
  message: string;
  data?: { code: RpcErrorName | string; [key: string]: unknown };
}

export type RpcResponse =
  | { jsonrpc: '2.0'; id: RpcId; result: unknown }
  | { jsonrpc: '2.0'; id: RpcId; error: RpcErrorObject };

/** An error answered by the daemon (or raised by a method): it has a JSON-RPC code and a name. */
export class RpcError extends Error {
  override name = 'RpcError';
  constructor(
    readonly code: number,
    message: string,
    readonly data: { code: RpcErrorName | string; [key: string]: unknown } = { code: nameOf(code) },
  ) {
    super(message);
  }

  /** The symbolic name (`not-found`, `invalid-params`, …). */
  get kind(): string {
    return this.data.code;
  }

  static of(kind: RpcErrorName, message: string, extra: Record<string, unknown> = {}): RpcError {
    return new RpcError(RPC_ERROR_CODES[kind], message, { code: kind, ...extra });
  }

  toJSON(): RpcErrorObject {
    return { code: this.code, message: this.message, data: this.data };
  }
}

function nameOf(code: number): string {
  for (const [name, c] of Object.entries(RPC_ERROR_CODES)) if (c === code) return name;
  return 'unknown';
}

/**
 * The control socket could not be used: it does not exist, nobody listens, permission denied,
 * the connection broke, or the daemon did not answer in time.
 */
export class ControlUnreachableError extends Error {
  override name = 'ControlUnreachableError';
}
