/**
 * The client side of fixed newstyle negotiation ("option haggling"), from the greeting to the
 * start of transmission.
 *
 * `NbdHandshake` exposes each step on its own (greeting, client flags, one option and its
 * replies) so protocol tests can drive a server through unusual sequences; `negotiate()` strings
 * the steps together the way a normal client does, and `listExports`, `listMetaContexts` and
 * `info` are the one-shot queries that end with NBD_OPT_ABORT.
 *
 * Negotiation is strictly request/response (the client sends nothing until an option's final
 * reply), so it is written as straight-line async code over an exact-length reader; only the
 * transmission phase needs the resumable parser in client-replies.ts.
 */

import net from 'node:net';
import tls from 'node:tls';
import type { BlockSizeLimits } from '../core/device.js';
import { ByteFifo } from './byte-fifo.js';
import {
  NbdConnectionError,
  NbdOptionError,
  NbdProtocolError,
  optName,
  repName,
} from './client-errors.js';
import {
  BASE_ALLOCATION,
  FLAG_C_FIXED_NEWSTYLE,
  FLAG_C_NO_ZEROES,
  FLAG_FIXED_NEWSTYLE,
  FLAG_NO_ZEROES,
  IHAVEOPT,
  INIT_PASSWD,
  Info,
  MAX_OPTION_BYTES,
  NBD_DEFAULT_PORT,
  OPTION_REPLY_MAGIC,
  Opt,
  Rep,
  isErrorReply,
} from './protocol.js';

/** Magic that follows NBDMAGIC in the oldstyle handshake, which this client does not speak. */
const OLDSTYLE_MAGIC = 0x00420281861253n;
/** Bytes of zeros after the EXPORT_NAME reply unless both sides agreed on NO_ZEROES. */
const EXPORT_NAME_PADDING = 124;
const DEFAULT_CONNECT_TIMEOUT_MS = 30_000;

/** Where the server is. Exactly one of `socket`, `path`, or `host`/`port` is used. */
export interface NbdTransportOptions {
  /** Unix socket path (a leading NUL selects the abstract namespace). */
  path?: string;
  host?: string;
  /** Default 10809. */
  port?: number;
  /** An already connected socket; the client takes ownership and closes it. */
  socket?: net.Socket;
  /**
   * Limit for connecting plus the whole negotiation, in ms (default 30 s; 0 = none). On expiry
   * the socket is destroyed and the pending step rejects with NbdConnectionError.
   */
  connectTimeoutMs?: number;
  /**
   * Upgrade to TLS with NBD_OPT_STARTTLS before any other option (as a client that insists on
   * TLS should), with these options for Node's tls.connect. A server that refuses fails the
   * connection: there is no falling back to plain text.
   */
  tls?: tls.ConnectionOptions;
}

export interface NbdNegotiationOptions {
  /** Default ''. */
  exportName?: string;
  /** Ask for structured replies (default true). ERR_UNSUP falls back to simple replies. */
  structuredReplies?: boolean;
  /** Contexts for SET_META_CONTEXT; default ['base:allocation'] (only with structured replies). */
  metaContexts?: string[];
  /** Enter transmission with NBD_OPT_EXPORT_NAME instead of NBD_OPT_GO. */
  useExportName?: boolean;
  /**
   * Request NBD_INFO_BLOCK_SIZE in GO (default true). Doing so promises the server to honour its
   * constraints: `NbdClient` keeps payloads within `maximum`, callers keep I/O aligned.
   */
  requestBlockSize?: boolean;
}

export type NbdConnectOptions = NbdTransportOptions & NbdNegotiationOptions;

/** What NBD_OPT_INFO / NBD_OPT_GO (or EXPORT_NAME) told us about an export. */
export interface ExportInfo {
  size: number;
  transmissionFlags: number;
  /** Only when the server sent NBD_INFO_BLOCK_SIZE. */
  blockSize?: BlockSizeLimits;
  /** Canonical name from NBD_INFO_NAME, if sent. */
  name?: string;
  /** NBD_INFO_DESCRIPTION, if sent. */
  description?: string;
}

export interface ExportListing {
  name: string;
  /** The rest of the NBD_REP_SERVER payload; '' when the server sent none. */
  description: string;
}

export interface OptionReply {
  option: number;
  type: number;
  data: Buffer;
}

/** Result of `negotiate()`: everything the transmission phase needs. */
export interface NegotiatedExport {
  exportName: string;
  info: ExportInfo;
  structuredReplies: boolean;
  /** Context id → name, as the server assigned them. */
  metaContexts: Map<number, string>;
  /** Whether transmission was entered with EXPORT_NAME (requested, or GO was unsupported). */
  usedExportName: boolean;
}

function encodeName(name: string): Buffer {
  return Buffer.from(name, 'utf8');
}

/** u32 export name length + name, then the option-specific tail. */
function withExportName(exportName: string, tail: Buffer): Buffer {
  const name = encodeName(exportName);
  const len = Buffer.alloc(4);
  len.writeUInt32BE(name.length);
  return Buffer.concat([len, name, tail]);
}

/** Payload of LIST_META_CONTEXT / SET_META_CONTEXT. */
function metaContextPayload(exportName: string, queries: readonly string[]): Buffer {
  const parts: Buffer[] = [Buffer.alloc(4)];
  parts[0]!.writeUInt32BE(queries.length);
  for (const q of queries) {
    const bytes = encodeName(q);
    const len = Buffer.alloc(4);
    len.writeUInt32BE(bytes.length);
    parts.push(len, bytes);
  }
  return withExportName(exportName, Buffer.concat(parts));
}

/** Payload of INFO / GO. */
function infoPayload(exportName: string, requests: readonly number[]): Buffer {
  const tail = Buffer.alloc(2 + 2 * requests.length);
  tail.writeUInt16BE(requests.length, 0);
  requests.forEach((r, i) => tail.writeUInt16BE(r, 2 + 2 * i));
  return withExportName(exportName, tail);
}

function isPowerOfTwo(n: number): boolean {
  return n > 0 && (n & (n - 1)) === 0;
}

function exportSize(option: string, size: bigint): number {
  if (size > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new Error(`${option}: export size ${size} is beyond what this client handles (2^53)`);
  }
  return Number(size);
}

/** Folds NBD_REP_INFO payloads into an ExportInfo; unknown info types are ignored, as asked. */
function parseInfoReplies(option: number, replies: readonly OptionReply[]): ExportInfo {
  const what = optName(option);
  const bad = (why: string): NbdProtocolError => new NbdProtocolError(`${what}: ${why}`);
  let exp: { size: number; transmissionFlags: number } | undefined;
  const result: Partial<ExportInfo> = {};
  for (const reply of replies) {
    if (reply.type !== Rep.INFO) throw bad(`unexpected reply ${repName(reply.type)} before ACK`);
    const data = reply.data;
    if (data.length < 2) throw bad(`NBD_REP_INFO of ${data.length} bytes`);
    const infoType = data.readUInt16BE(0);
    switch (infoType) {
      case Info.EXPORT:
        if (data.length !== 12) throw bad(`NBD_INFO_EXPORT of ${data.length} bytes (want 12)`);
        exp = {
          size: exportSize(what, data.readBigUInt64BE(2)),
          transmissionFlags: data.readUInt16BE(10),
        };
        break;
      case Info.NAME:
        result.name = data.toString('utf8', 2);
        break;
      case Info.DESCRIPTION:
        result.description = data.toString('utf8', 2);
        break;
      case Info.BLOCK_SIZE: {
        if (data.length !== 14) throw bad(`NBD_INFO_BLOCK_SIZE of ${data.length} bytes (want 14)`);
        const bs = {
          minimum: data.readUInt32BE(2),
          preferred: data.readUInt32BE(6),
          maximum: data.readUInt32BE(10),
        };
        // These are MUSTs of the spec; a server that breaks them would make us misalign I/O.
        if (!isPowerOfTwo(bs.minimum) || bs.minimum > 65536) {
          throw bad(`block size minimum ${bs.minimum} is not a power of two ≤ 64 KiB`);
        }
        if (!isPowerOfTwo(bs.preferred) || bs.preferred < Math.max(bs.minimum, 512)) {
          throw bad(`block size preferred ${bs.preferred} is not a power of two ≥ max(min, 512)`);
        }
        if (bs.maximum < bs.preferred) {
          throw bad(`block size maximum ${bs.maximum} is below preferred ${bs.preferred}`);
        }
        result.blockSize = bs;
        break;
      }
      default:
        break;
    }
  }
  if (!exp) throw bad('ACK without NBD_INFO_EXPORT');
  return { ...result, ...exp };
}

/**
 * One connection in option haggling. Reads are exact-length promises over a ByteFifo; any
 * failure (EOF, socket error, timeout) is sticky and rejects the pending and all later reads.
 */
export class NbdHandshake {
  /** The plain socket, or the TLS socket once startTls() succeeded. */
  socket: net.Socket;
  /** Server handshake flags (u16) from the greeting. */
  handshakeFlags = 0;
  /** Client flags we sent (u32). */
  clientFlags = 0;

  private readonly queue = new ByteFifo();
  private waiter:
    | { n: number; what: string; resolve: (b: Buffer) => void; reject: (e: Error) => void }
    | undefined;
  private failure: Error | undefined;
  private timer: NodeJS.Timeout | undefined;
  private readonly onData = (buf: Buffer): void => {
    this.queue.push(buf);
    this.pump();
  };
  private readonly onError = (err: Error): void => {
    this.fail(new NbdConnectionError(`NBD connection failed: ${err.message}`, { cause: err }));
  };
  private readonly onClose = (): void => {
    this.fail(new NbdConnectionError('server closed the connection during negotiation'));
  };

  private constructor(socket: net.Socket, timeoutMs: number) {
    this.socket = socket;
    socket.on('data', this.onData);
    socket.on('error', this.onError);
    socket.on('close', this.onClose);
    socket.on('end', this.onClose);
    if (timeoutMs > 0) {
      this.timer = setTimeout(() => {
        this.fail(
          new NbdConnectionError(`NBD connect/negotiation timed out after ${timeoutMs} ms`),
        );
      }, timeoutMs);
      this.timer.unref();
    }
  }

  /** Connects and reads the greeting (magics and handshake flags); sends nothing yet. */
  static async open(opts: NbdTransportOptions): Promise<NbdHandshake> {
    const hs = new NbdHandshake(
      connectSocket(opts),
      opts.connectTimeoutMs ?? DEFAULT_CONNECT_TIMEOUT_MS,
    );
    try {
      const greeting = await hs.read(18, 'greeting');
      if (greeting.readBigUInt64BE(0) !== INIT_PASSWD) {
        throw new NbdProtocolError('greeting does not start with NBDMAGIC: not an NBD server?');
      }
      const magic = greeting.readBigUInt64BE(8);
      if (magic === OLDSTYLE_MAGIC) {
        throw new NbdProtocolError('server uses oldstyle negotiation, which is not supported');
      }
      if (magic !== IHAVEOPT) {
        throw new NbdProtocolError(`bad newstyle magic 0x${magic.toString(16)} in greeting`);
      }
      hs.handshakeFlags = greeting.readUInt16BE(16);
      return hs;
    } catch (err) {
      hs.close();
      throw err;
    }
  }

  /** `open()` plus the client flags a normal client sends, and STARTTLS if asked for. */
  static async start(opts: NbdTransportOptions): Promise<NbdHandshake> {
    const hs = await NbdHandshake.open(opts);
    hs.sendClientFlags();
    if (opts.tls !== undefined) {
      try {
        await hs.startTls(opts.tls);
      } catch (err) {
        hs.close();
        throw err;
      }
    }
    return hs;
  }

  /**
   * NBD_OPT_STARTTLS, then the TLS handshake on the same socket; later options and the
   * transmission phase run over TLS. Rejects (NbdOptionError) if the server will not, or with
   * the TLS error if the handshake fails.
   */
  async startTls(options: tls.ConnectionOptions): Promise<void> {
    if (!this.fixedNewstyle)
      throw new NbdProtocolError('server does not support fixed newstyle, so no TLS either');
    this.sendOption(Opt.STARTTLS);
    const replies = await this.readReplies(Opt.STARTTLS);
    if (replies.length > 0)
      throw new NbdProtocolError(`NBD_OPT_STARTTLS: ${repName(replies[0]!.type)} before ACK`);
    if (this.queue.length > 0)
      throw new NbdProtocolError('server sent data after acknowledging NBD_OPT_STARTTLS');
    const plain = this.socket;
    // The bytes are TLS's from here: the plain socket's reader steps aside.
    plain.off('data', this.onData);
    plain.off('end', this.onClose);
    const secure = await new Promise<tls.TLSSocket>((resolve, reject) => {
      const s = tls.connect({ ...options, socket: plain });
      const fail = (err: Error): void => {
        s.destroy();
        reject(new NbdConnectionError(`TLS handshake failed: ${err.message}`, { cause: err }));
      };
      s.once('error', fail);
      s.once('secureConnect', () => {
        s.off('error', fail);
        resolve(s);
      });
    });
    plain.off('error', this.onError);
    plain.off('close', this.onClose);
    this.socket = secure;
    secure.on('data', this.onData);
    secure.on('error', this.onError);
    secure.on('close', this.onClose);
    secure.on('end', this.onClose);
  }

  get fixedNewstyle(): boolean {
    return (this.handshakeFlags & FLAG_FIXED_NEWSTYLE) !== 0;
  }

  /** Defaults to what the server offered: C_FIXED_NEWSTYLE, plus C_NO_ZEROES if offered. */
  sendClientFlags(flags?: number): void {
    this.clientFlags =
      flags ??
      (this.fixedNewstyle ? FLAG_C_FIXED_NEWSTYLE : 0) |
        (this.handshakeFlags & FLAG_NO_ZEROES ? FLAG_C_NO_ZEROES : 0);
    const buf = Buffer.alloc(4);
    buf.writeUInt32BE(this.clientFlags >>> 0);
    this.socket.write(buf);
  }

  /** Sends one option request; any option number and payload, for tests. */
  sendOption(option: number, data: Buffer = Buffer.alloc(0)): void {
    const header = Buffer.alloc(16);
    header.writeBigUInt64BE(IHAVEOPT, 0);
    header.writeUInt32BE(option >>> 0, 8);
    header.writeUInt32BE(data.length, 12);
    this.socket.write(data.length > 0 ? Buffer.concat([header, data]) : header);
  }

  /** Reads one option reply and checks its magic and echoed option number. */
  async readReply(option: number): Promise<OptionReply> {
    const what = `${optName(option)} reply`;
    const header = await this.read(20, what);
    const magic = header.readBigUInt64BE(0);
    if (magic !== OPTION_REPLY_MAGIC) {
      throw new NbdProtocolError(`${what}: bad option reply magic 0x${magic.toString(16)}`);
    }
    const echoed = header.readUInt32BE(8);
    if (echoed !== option) {
      throw new NbdProtocolError(`${what}: server echoed option ${optName(echoed)}`);
    }
    const type = header.readUInt32BE(12);
    const length = header.readUInt32BE(16);
    if (length > MAX_OPTION_BYTES) {
      throw new NbdProtocolError(`${what}: ${repName(type)} of ${length} bytes is too long`);
    }
    const data = length > 0 ? await this.read(length, what) : Buffer.alloc(0);
    return { option, type, data };
  }

  /**
   * Reads replies until the final one (ACK or an error). Returns the replies before it; an
   * error reply rejects with NbdOptionError. The raw form for tests is `readReply()` in a loop.
   */
  async readReplies(option: number): Promise<OptionReply[]> {
    const replies: OptionReply[] = [];
    for (;;) {
      const reply = await this.readReply(option);
      if (reply.type === Rep.ACK) {
        if (reply.data.length !== 0) {
          throw new NbdProtocolError(`${optName(option)}: ACK with ${reply.data.length} bytes`);
        }
        return replies;
      }
      if (isErrorReply(reply.type)) {
        throw new NbdOptionError(option, reply.type, reply.data.toString('utf8'));
      }
      replies.push(reply);
    }
  }

  /** True on ACK, false on ERR_UNSUP (the spec asks clients to cope); other errors reject. */
  async structuredReply(): Promise<boolean> {
    this.sendOption(Opt.STRUCTURED_REPLY);
    try {
      const replies = await this.readReplies(Opt.STRUCTURED_REPLY);
      if (replies.length > 0) {
        throw new NbdProtocolError(`NBD_OPT_STRUCTURED_REPLY: ${repName(replies[0]!.type)}`);
      }
      return true;
    } catch (err) {
      if (err instanceof NbdOptionError && err.replyType === Rep.ERR_UNSUP) return false;
      throw err;
    }
  }

  private async metaContexts(
    option: number,
    exportName: string,
    queries: readonly string[],
  ): Promise<Array<{ id: number; name: string }>> {
    this.sendOption(option, metaContextPayload(exportName, queries));
    const replies = await this.readReplies(option);
    return replies.map((r) => {
      if (r.type !== Rep.META_CONTEXT || r.data.length < 4) {
        throw new NbdProtocolError(
          `${optName(option)}: unexpected ${repName(r.type)} of ${r.data.length} bytes`,
        );
      }
      return { id: r.data.readUInt32BE(0), name: r.data.toString('utf8', 4) };
    });
  }

  /** NBD_OPT_LIST_META_CONTEXT: the contexts matching `queries` (all of them for none). */
  async listMetaContext(
    exportName: string,
    queries: readonly string[],
  ): Promise<Array<{ id: number; name: string }>> {
    return this.metaContexts(Opt.LIST_META_CONTEXT, exportName, queries);
  }

  /** NBD_OPT_SET_META_CONTEXT: selects contexts, returning id → name. */
  async setMetaContext(
    exportName: string,
    queries: readonly string[],
  ): Promise<Map<number, string>> {
    const selected = new Map<number, string>();
    for (const { id, name } of await this.metaContexts(Opt.SET_META_CONTEXT, exportName, queries)) {
      if (selected.has(id)) {
        throw new NbdProtocolError(`NBD_OPT_SET_META_CONTEXT: context id ${id} given twice`);
      }
      selected.set(id, name);
    }
    return selected;
  }

  /** NBD_OPT_LIST. */
  async list(): Promise<ExportListing[]> {
    this.sendOption(Opt.LIST);
    const replies = await this.readReplies(Opt.LIST);
    return replies.map((r) => {
      const nameLength = r.type === Rep.SERVER && r.data.length >= 4 ? r.data.readUInt32BE(0) : -1;
      if (nameLength < 0 || nameLength > r.data.length - 4) {
        throw new NbdProtocolError(`NBD_OPT_LIST: malformed ${repName(r.type)} reply`);
      }
      return {
        name: r.data.toString('utf8', 4, 4 + nameLength),
        description: r.data.toString('utf8', 4 + nameLength),
      };
    });
  }

  /** NBD_OPT_INFO or NBD_OPT_GO with the given NBD_INFO_* requests. */
  async infoOrGo(
    option: typeof Opt.INFO | typeof Opt.GO,
    exportName: string,
    requests: readonly number[],
  ): Promise<ExportInfo> {
    this.sendOption(option, infoPayload(exportName, requests));
    return parseInfoReplies(option, await this.readReplies(option));
  }

  /**
   * NBD_OPT_EXPORT_NAME. It has no error reply: a server that cannot serve the export just
   * closes the connection, which surfaces as NbdConnectionError.
   */
  async exportName(name: string): Promise<ExportInfo> {
    this.sendOption(Opt.EXPORT_NAME, encodeName(name));
    const what = 'the NBD_OPT_EXPORT_NAME reply; unknown export?';
    const reply = await this.read(10, what);
    if (!(this.clientFlags & FLAG_C_NO_ZEROES)) await this.read(EXPORT_NAME_PADDING, what);
    return {
      size: exportSize('NBD_OPT_EXPORT_NAME', reply.readBigUInt64BE(0)),
      transmissionFlags: reply.readUInt16BE(8),
    };
  }

  /**
   * NBD_OPT_ABORT, then close. The spec lets older servers close without the ACK, so EOF is
   * as good as an ACK here.
   */
  async abort(): Promise<void> {
    try {
      this.sendOption(Opt.ABORT);
      await this.readReply(Opt.ABORT);
    } catch (err) {
      if (!(err instanceof NbdConnectionError)) throw err;
    } finally {
      this.close();
    }
  }

  /**
   * Hands the socket over to the transmission phase: stops the timeout, removes our listeners
   * and returns bytes that arrived after the last negotiation message (normally none).
   */
  detach(): { socket: net.Socket; leftover: Buffer } {
    this.stopTimer();
    this.socket.off('data', this.onData);
    this.socket.off('error', this.onError);
    this.socket.off('close', this.onClose);
    this.socket.off('end', this.onClose);
    return { socket: this.socket, leftover: this.queue.takeAll() };
  }

  close(): void {
    this.stopTimer();
    // Keep our 'error' listener: destroy() can still surface a late ECONNRESET.
    this.socket.destroy();
  }

  /** Resolves with exactly `n` bytes; `what` names the step in errors. */
  read(n: number, what: string): Promise<Buffer> {
    if (this.waiter) throw new Error('NbdHandshake: concurrent reads');
    return new Promise((resolve, reject) => {
      this.waiter = { n, what, resolve, reject };
      this.pump();
    });
  }

  private pump(): void {
    const w = this.waiter;
    if (!w) return;
    if (this.queue.length >= w.n) {
      this.waiter = undefined;
      w.resolve(this.queue.take(w.n));
    } else if (this.failure) {
      this.waiter = undefined;
      const f = this.failure;
      const err =
        f instanceof NbdConnectionError
          ? new NbdConnectionError(`${f.message} (while reading ${w.what})`, { cause: f.cause })
          : f;
      w.reject(err);
    }
  }

  private fail(err: Error): void {
    if (!this.failure) this.failure = err;
    this.stopTimer();
    this.socket.destroy();
    this.pump();
  }

  private stopTimer(): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = undefined;
  }
}

function connectSocket(opts: NbdTransportOptions): net.Socket {
  if (opts.socket) return opts.socket;
  if (opts.path !== undefined) return net.createConnection({ path: opts.path });
  if (opts.host !== undefined || opts.port !== undefined) {
    return net.createConnection({
      host: opts.host ?? 'localhost',
      port: opts.port ?? NBD_DEFAULT_PORT,
      noDelay: true,
    });
  }
  throw new Error('NBD connect: give one of path, host/port or socket');
}

/** INFO requests a normal client sends with GO and INFO. */
function infoRequests(requestBlockSize: boolean): number[] {
  return requestBlockSize
    ? [Info.BLOCK_SIZE, Info.NAME, Info.DESCRIPTION]
    : [Info.NAME, Info.DESCRIPTION];
}

/**
 * The usual sequence: [STRUCTURED_REPLY] [SET_META_CONTEXT] GO (or EXPORT_NAME). On success the
 * connection is in transmission; on failure the caller still owns `hs` and should close it.
 */
export async function negotiate(
  hs: NbdHandshake,
  opts: NbdNegotiationOptions,
): Promise<NegotiatedExport> {
  const exportName = opts.exportName ?? '';
  let structuredReplies = false;
  let metaContexts = new Map<number, string>();
  // Without fixed newstyle the only option a server understands is EXPORT_NAME.
  if (hs.fixedNewstyle) {
    if (opts.structuredReplies ?? true) structuredReplies = await hs.structuredReply();
    // The spec forbids SET_META_CONTEXT before structured replies are negotiated.
    const wanted = opts.metaContexts ?? [BASE_ALLOCATION];
    if (structuredReplies && wanted.length > 0) {
      try {
        metaContexts = await hs.setMetaContext(exportName, wanted);
      } catch (err) {
        // Servers predating meta contexts: carry on without block status.
        if (!(err instanceof NbdOptionError && err.replyType === Rep.ERR_UNSUP)) throw err;
      }
    }
    if (!opts.useExportName) {
      try {
        const info = await hs.infoOrGo(
          Opt.GO,
          exportName,
          infoRequests(opts.requestBlockSize ?? true),
        );
        return { exportName, info, structuredReplies, metaContexts, usedExportName: false };
      } catch (err) {
        // Servers predating GO answer ERR_UNSUP and still accept EXPORT_NAME (as nbd-client does).
        if (!(err instanceof NbdOptionError && err.replyType === Rep.ERR_UNSUP)) throw err;
      }
    }
  }
  const info = await hs.exportName(exportName);
  return { exportName, info, structuredReplies, metaContexts, usedExportName: true };
}

/** Runs `fn` on a fresh negotiation and always closes it afterwards (ABORT on success). */
async function oneShot<T>(
  opts: NbdTransportOptions & { structuredReplies?: boolean },
  fn: (hs: NbdHandshake) => Promise<T>,
): Promise<T> {
  const hs = await NbdHandshake.start(opts);
  try {
    if (!hs.fixedNewstyle) {
      throw new NbdProtocolError('server does not support fixed newstyle negotiation');
    }
    // Like nbdinfo: structured replies first, since some servers only list contexts after it.
    if (opts.structuredReplies ?? true) await hs.structuredReply();
    const result = await fn(hs);
    await hs.abort();
    return result;
  } finally {
    hs.close();
  }
}

/** NBD_OPT_LIST, then ABORT. */
export function listExports(
  opts: NbdTransportOptions & { structuredReplies?: boolean },
): Promise<ExportListing[]> {
  return oneShot(opts, (hs) => hs.list());
}

/** NBD_OPT_LIST_META_CONTEXT for `exportName`, then ABORT. No queries lists every context. */
export async function listMetaContexts(
  opts: NbdTransportOptions & { structuredReplies?: boolean },
  exportName: string,
  queries: readonly string[] = [],
): Promise<string[]> {
  const contexts = await oneShot(opts, (hs) => hs.listMetaContext(exportName, queries));
  return contexts.map((c) => c.name);
}

/** NBD_OPT_INFO (asking for block size, name and description), then ABORT. */
export function info(
  opts: NbdTransportOptions & { structuredReplies?: boolean },
  exportName: string,
): Promise<ExportInfo> {
  return oneShot(opts, (hs) => hs.infoOrGo(Opt.INFO, exportName, infoRequests(true)));
}
