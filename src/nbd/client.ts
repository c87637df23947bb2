/**
 * NBD client: negotiates an export (client-handshake.ts), then pipelines requests over one
 * connection. Requests are matched to replies by a 64-bit cookie (a bigint counter, never a
 * lossy Number); replies may arrive in any order and are parsed by the resumable reader in
 * client-replies.ts.
 *
 * Used by the tests as a strict reference client (it checks what a client can check and lets
 * `request()` send anything, including unknown commands and flags) and as the transport of the
 * remote-NBD backend.
 */

import net from 'node:net';
import type { BlockSizeLimits, DeviceCapabilities } from '../core/device.js';
import { DEFAULT_BLOCK_SIZE } from '../core/device.js';
import { NbdConnectionError, NbdProtocolError, NbdRequestError, cmdName } from './client-errors.js';
import {
  NbdHandshake,
  negotiate,
  type ExportInfo,
  type NbdConnectOptions,
  type NegotiatedExport,
} from './client-handshake.js';
import { ReplyReader, type BlockExtent, type InFlight, type NbdReply } from './client-replies.js';
import { parseNbdUri } from './client-uri.js';
import { clientTlsOptions } from './client-tls.js';
import { Cmd, REQUEST_HEADER_SIZE, REQUEST_MAGIC, TFlag } from './protocol.js';

export {
  NbdConnectionError,
  NbdOptionError,
  NbdProtocolError,
  NbdRequestError,
} from './client-errors.js';
export {
  NbdHandshake,
  info,
  listExports,
  listMetaContexts,
  negotiate,
  type ExportInfo,
  type ExportListing,
  type NbdConnectOptions,
  type NbdNegotiationOptions,
  type NbdTransportOptions,
  type NegotiatedExport,
  type OptionReply,
} from './client-handshake.js';
export type { BlockExtent, NbdReply, ReplyChunk } from './client-replies.js';
export { parseNbdUri, type NbdUri } from './client-uri.js';

const U64_MAX = (1n << 64n) - 1n;
const U32_MAX = 0xffffffff;
const DEFAULT_DISCONNECT_TIMEOUT_MS = 10_000;

export interface DisconnectOptions {
  /**
   * Wait for every outstanding reply before sending NBD_CMD_DISC (default true; the spec says
   * a client SHOULD). With false, DISC goes out at once, for testing that the server still
   * finishes what is in flight; the socket is ended after those replies either way.
   */
  waitForReplies?: boolean;
  /** Destroy the socket if the server has not closed it after this long (default 10 s). */
  timeoutMs?: number;
}

export class NbdClient {
  readonly exportName: string;
  readonly size: number;
  readonly transmissionFlags: number;
  /** Only when NBD_INFO_BLOCK_SIZE was requested in GO and sent by the server. */
  readonly blockSize: BlockSizeLimits | undefined;
  readonly structuredReplies: boolean;
  /** Selected meta contexts, id → name. */
  readonly metaContexts: ReadonlyMap<number, string>;
  readonly description: string | undefined;
  /** Everything GO (or EXPORT_NAME) reported, including NBD_INFO_NAME. */
  readonly exportInfo: ExportInfo;
  /** Whether transmission was entered with NBD_OPT_EXPORT_NAME. */
  readonly usedExportName: boolean;
  /**
   * Settles when the connection is gone: with undefined after disconnect()/close(), with the
   * error that ended it otherwise (protocol violation, server EOF, socket error). Never rejects.
   */
  readonly closed: Promise<Error | undefined>;

  private readonly socket: net.Socket;
  private readonly reader: ReplyReader;
  private readonly inFlight = new Map<bigint, InFlight>();
  private nextCookie = 1n;
  /** Set once the connection may no longer be used; requests then reject with it. */
  private failure: Error | undefined;
  private disconnecting = false;
  private isClosed = false;
  /** What `closed` settles with: undefined for a close the client asked for. */
  private closeReason: Error | undefined;
  private resolveClosed!: (err: Error | undefined) => void;
  /** Resolved whenever the last outstanding request completes (used by disconnect()). */
  private idleWaiters: Array<() => void> = [];

  private constructor(socket: net.Socket, leftover: Buffer, n: NegotiatedExport) {
    this.socket = socket;
    this.exportName = n.exportName;
    this.exportInfo = n.info;
    this.size = n.info.size;
    this.transmissionFlags = n.info.transmissionFlags;
    this.blockSize = n.info.blockSize;
    this.description = n.info.description;
    this.structuredReplies = n.structuredReplies;
    this.metaContexts = n.metaContexts;
    this.usedExportName = n.usedExportName;
    this.closed = new Promise((resolve) => (this.resolveClosed = resolve));

    this.reader = new ReplyReader({
      structuredReplies: n.structuredReplies,
      metaContexts: n.metaContexts,
      exportSize: n.info.size,
      lookup: (cookie) => this.inFlight.get(cookie),
      complete: (req) => this.complete(req),
    });
    socket.on('data', (buf: Buffer) => this.onData(buf));
    socket.on('error', (err) => {
      this.fail(new NbdConnectionError(`NBD connection failed: ${err.message}`, { cause: err }));
    });
    socket.on('close', () => this.onClose());
    // A socket passed in by the caller may allow half-open connections; the server's EOF ends
    // the conversation either way (every reply it sent has been delivered by then).
    socket.on('end', () => socket.destroy());
    if (leftover.length > 0) this.onData(leftover);
  }

  /** Connects, negotiates and returns a client in the transmission phase. */
  static async connect(options: NbdConnectOptions): Promise<NbdClient> {
    const hs = await NbdHandshake.start(options);
    try {
      return NbdClient.fromNegotiation(hs, await negotiate(hs, options));
    } catch (err) {
      hs.close();
      throw err;
    }
  }

  /**
   * Takes over a connection whose negotiation the caller drove by hand (protocol tests), once
   * GO or EXPORT_NAME succeeded. `negotiated` must describe what was actually agreed.
   */
  static fromNegotiation(hs: NbdHandshake, negotiated: NegotiatedExport): NbdClient {
    const { socket, leftover } = hs.detach();
    return new NbdClient(socket, leftover, negotiated);
  }

  /**
   * Connects to an `nbd://`, `nbd+unix://`, `nbds://` or `nbds+unix://` URI (TLS parameters:
   * src/nbd/client-tls.ts); `options` may add negotiation settings (the export name comes from
   * the URI).
   */
  static async fromUri(
    uri: string,
    options: Omit<NbdConnectOptions, 'path' | 'host' | 'port' | 'socket' | 'exportName'> = {},
  ): Promise<NbdClient> {
    const u = parseNbdUri(uri);
    const where = u.transport === 'unix' ? { path: u.path! } : { host: u.host!, port: u.port! };
    // nbds: TLS or nothing; the files named by the URI are read at each connect.
    const tls = u.tls ? { tls: clientTlsOptions(u) } : {};
    return NbdClient.connect({ ...options, ...where, ...tls, exportName: u.exportName });
  }

  /** Requests sent and not yet answered. */
  get pending(): number {
    return this.inFlight.size;
  }

  /** False once disconnect() or close() was called or the connection failed. */
  get isOpen(): boolean {
    return !this.failure && !this.disconnecting && !this.isClosed;
  }

  /** Whether a transmission flag (TFlag.*) was advertised. */
  has(flag: number): boolean {
    return (this.transmissionFlags & flag) !== 0;
  }

  /** The transmission flags in the device layer's terms. */
  capabilities(): DeviceCapabilities {
    return {
      readOnly: this.has(TFlag.READ_ONLY),
      flush: this.has(TFlag.SEND_FLUSH),
      fua: this.has(TFlag.SEND_FUA),
      trim: this.has(TFlag.SEND_TRIM),
      zero: this.has(TFlag.SEND_WRITE_ZEROES),
      fastZero: this.has(TFlag.SEND_FAST_ZERO),
      cache: this.has(TFlag.SEND_CACHE),
      multiConn: this.has(TFlag.CAN_MULTI_CONN),
      rotational: this.has(TFlag.ROTATIONAL),
    };
  }

  /**
   * Sends any request and resolves with its raw outcome, server errors included (only protocol
   * and connection failures reject). No checks against the export: unknown commands, flags and
   * ranges go out as given. For WRITE, `payload` follows the header; the caller keeps it
   * consistent with `length` (a mismatch desynchronises the stream, which may be the point of
   * a test).
   */
  request(
    type: number,
    flags: number,
    offset: number | bigint,
    length: number,
    payload?: Buffer,
  ): Promise<NbdReply> {
    return this.submit(type, flags, offset, length, payload, true);
  }

  // The typed methods below throw NbdRequestError for server errors. Zero-length reads,
  // writes, trims, zeroes and caches complete locally without a round trip: the spec leaves
  // them unspecified and nbdkit refuses them with EINVAL. request() still sends them.

  /**
   * Reads `length` bytes at `offset`. Reads above the maximum payload (the server's advertised
   * maximum, else the 32 MiB every server must accept) are split into several requests.
   */
  async read(offset: number, length: number, flags = 0): Promise<Buffer> {
    checkRange(offset, length);
    if (length === 0) return Buffer.alloc(0);
    const max = this.maxPayload;
    if (length <= max) return (await this.checked(Cmd.READ, flags, offset, length)).data!;
    const out = Buffer.allocUnsafe(length);
    const parts: Array<Promise<void>> = [];
    for (let done = 0; done < length; done += max) {
      const n = Math.min(max, length - done);
      parts.push(
        this.checked(Cmd.READ, flags, offset + done, n).then((r) => {
          r.data!.copy(out, done);
        }),
      );
    }
    await Promise.all(parts);
    return out;
  }

  /** Writes `data` at `offset`, split like read() when larger than the maximum payload. */
  async write(offset: number, data: Buffer, flags = 0): Promise<void> {
    checkRange(offset, data.length);
    if (data.length === 0) return;
    const max = this.maxPayload;
    if (data.length <= max) {
      await this.checked(Cmd.WRITE, flags, offset, data.length, data);
      return;
    }
    const parts: Array<Promise<NbdReply>> = [];
    for (let done = 0; done < data.length; done += max) {
      const piece = data.subarray(done, Math.min(done + max, data.length));
      parts.push(this.checked(Cmd.WRITE, flags, offset + done, piece.length, piece));
    }
    await Promise.all(parts);
  }

  async flush(flags = 0): Promise<void> {
    await this.checked(Cmd.FLUSH, flags, 0, 0);
  }

  async trim(offset: number, length: number, flags = 0): Promise<void> {
    checkRange(offset, length);
    if (length === 0) return;
    await this.checked(Cmd.TRIM, flags, offset, length);
  }

  async writeZeroes(offset: number, length: number, flags = 0): Promise<void> {
    checkRange(offset, length);
    if (length === 0) return;
    await this.checked(Cmd.WRITE_ZEROES, flags, offset, length);
  }

  async cache(offset: number, length: number, flags = 0): Promise<void> {
    checkRange(offset, length);
    if (length === 0) return;
    await this.checked(Cmd.CACHE, flags, offset, length);
  }

  /**
   * Block status for every selected context: context name → extents, the first starting at
   * `offset`. The server may describe less (or, in the last extent, more) than `length`.
   */
  async blockStatus(
    offset: number,
    length: number,
    flags = 0,
  ): Promise<Map<string, BlockExtent[]>> {
    checkRange(offset, length);
    return (await this.checked(Cmd.BLOCK_STATUS, flags, offset, length)).extents ?? new Map();
  }

  /**
   * Soft disconnect: NBD_CMD_DISC (which has no reply), then end our side once every
   * outstanding reply has arrived. Resolves when the server has closed the socket; rejects
   * with the reason if the connection ended any other way (server EOF with requests
   * outstanding, protocol error, timeout). Requests made after this call reject.
   */
  async disconnect(options: DisconnectOptions = {}): Promise<void> {
    if (!this.disconnecting && !this.failure && !this.isClosed) {
      this.disconnecting = true;
      const timeoutMs = options.timeoutMs ?? DEFAULT_DISCONNECT_TIMEOUT_MS;
      const timer = setTimeout(() => {
        this.fail(
          new NbdConnectionError(`server did not close within ${timeoutMs} ms of NBD_CMD_DISC`),
        );
      }, timeoutMs);
      timer.unref();
      try {
        if (options.waitForReplies ?? true) await this.whenIdle();
        if (!this.failure && !this.isClosed) {
          this.socket.write(this.header(Cmd.DISC, 0, 0n, 0, this.nextCookie++));
          await this.whenIdle();
          if (!this.failure) this.socket.end();
        }
        await this.closed;
      } finally {
        clearTimeout(timer);
      }
    }
    const reason = await this.closed;
    if (reason) throw reason;
  }

  /** Hard close: outstanding requests reject, the socket is destroyed at once. */
  async close(): Promise<void> {
    if (!this.isClosed) {
      this.fail(new NbdConnectionError('connection closed by the client'), true);
    }
    await this.closed;
  }

  /**
   * Largest piece read()/write() send in one request: the server's maximum (binding, since we
   * asked for it in GO), capped at the 32 MiB default to bound per-request memory, and rounded
   * down to the minimum block size so split pieces stay aligned (the maximum may be 2^32-1).
   */
  private get maxPayload(): number {
    const bs = this.blockSize;
    if (!bs) return DEFAULT_BLOCK_SIZE.maximum;
    const max = Math.min(bs.maximum, DEFAULT_BLOCK_SIZE.maximum);
    return max - (max % bs.minimum);
  }

  /** request() for the typed methods: no raw chunks kept, server errors thrown. */
  private async checked(
    type: number,
    flags: number,
    offset: number,
    length: number,
    payload?: Buffer,
  ): Promise<NbdReply> {
    const reply = await this.submit(type, flags, offset, length, payload, false);
    if (reply.error !== 0) {
      throw new NbdRequestError(type, reply.error, reply.message, reply.errorOffset);
    }
    return reply;
  }

  private submit(
    type: number,
    flags: number,
    offset: number | bigint,
    length: number,
    payload: Buffer | undefined,
    keepChunks: boolean,
  ): Promise<NbdReply> {
    // Arguments that cannot be encoded reject like everything else (no synchronous throw).
    if (typeof offset === 'number' && !Number.isSafeInteger(offset)) {
      return Promise.reject(new RangeError(`offset ${offset} is not an integer (use a bigint)`));
    }
    const off = BigInt(offset);
    if (off < 0n || off > U64_MAX) {
      return Promise.reject(new RangeError(`offset ${offset} is not a u64`));
    }
    if (!Number.isInteger(length) || length < 0 || length > U32_MAX) {
      return Promise.reject(new RangeError(`length ${length} is not a u32`));
    }
    if (this.failure) return Promise.reject(this.failure);
    if (this.disconnecting || this.isClosed) {
      return Promise.reject(new NbdConnectionError(`${cmdName(type)}: client is disconnecting`));
    }
    return new Promise<NbdReply>((resolve, reject) => {
      const cookie = this.nextCookie++;
      this.inFlight.set(cookie, {
        cookie,
        type,
        flags,
        offset: off,
        length,
        keepChunks,
        reply: { error: 0, simple: false, chunks: [] },
        coveredBytes: 0,
        contentChunks: 0,
        resolve,
        reject,
      });
      const header = this.header(type, flags, off, length, cookie);
      if (payload && payload.length > 0) {
        // One writev: header and payload must be contiguous on the wire, and they will be
        // since nothing else writes between these calls.
        this.socket.cork();
        this.socket.write(header);
        this.socket.write(payload);
        this.socket.uncork();
      } else {
        this.socket.write(header);
      }
    });
  }

  private header(
    type: number,
    flags: number,
    offset: bigint,
    length: number,
    cookie: bigint,
  ): Buffer {
    const h = Buffer.allocUnsafe(REQUEST_HEADER_SIZE);
    h.writeUInt32BE(REQUEST_MAGIC, 0);
    h.writeUInt16BE(flags & 0xffff, 4);
    h.writeUInt16BE(type & 0xffff, 6);
    h.writeBigUInt64BE(cookie, 8);
    h.writeBigUInt64BE(offset, 16);
    h.writeUInt32BE(length, 24);
    return h;
  }

  private onData(buf: Buffer): void {
    if (this.failure) return;
    try {
      this.reader.push(buf);
    } catch (err) {
      this.fail(err instanceof Error ? err : new NbdProtocolError(String(err)));
    }
  }

  private complete(req: InFlight): void {
    this.inFlight.delete(req.cookie);
    req.resolve(req.reply);
    if (this.inFlight.size === 0) {
      const waiters = this.idleWaiters;
      this.idleWaiters = [];
      for (const w of waiters) w();
    }
  }

  private whenIdle(): Promise<void> {
    if (this.inFlight.size === 0 || this.failure) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  /**
   * Ends the connection for good: every outstanding request rejects with `err`, the socket is
   * destroyed. `clean` marks a close the client asked for (closed then settles with undefined).
   */
  private fail(err: Error, clean = false): void {
    if (this.failure) return;
    this.failure = err;
    if (!clean) this.closeReason = err;
    const outstanding = [...this.inFlight.values()];
    this.inFlight.clear();
    for (const req of outstanding) req.reject(err);
    const waiters = this.idleWaiters;
    this.idleWaiters = [];
    for (const w of waiters) w();
    this.socket.destroy();
  }

  private onClose(): void {
    this.isClosed = true;
    if (!this.failure) {
      if (this.disconnecting && this.inFlight.size === 0 && this.reader.idle) {
        // The expected end of a soft disconnect.
        this.failure = new NbdConnectionError('connection closed after NBD_CMD_DISC');
      } else {
        const n = this.inFlight.size;
        const what = n > 0 ? ` with ${n} request${n === 1 ? '' : 's'} outstanding` : '';
        this.fail(new NbdConnectionError(`server closed the connection${what}`));
      }
    }
    this.resolveClosed(this.closeReason);
  }
}

/** The typed methods take JS numbers; the device layer promises safe integers. */
function checkRange(offset: number, length: number): void {
  if (!Number.isSafeInteger(offset) || offset < 0) {
    throw new RangeError(`offset ${offset} is not a non-negative safe integer`);
  }
  if (!Number.isSafeInteger(length) || length < 0) {
    throw new RangeError(`length ${length} is not a non-negative safe integer`);
  }
}
