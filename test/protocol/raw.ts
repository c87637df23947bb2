/**
 * Raw NBD wire helpers for the protocol conformance tests: an exact-length byte reader over a
 * socket (every read has a deadline, so a server bug fails a test instead of hanging it),
 * builders for option requests and transmission requests, and strict parsers for option
 * replies, simple replies and structured reply chunks.
 *
 * Written from the NBD protocol specification (doc/proto.md of NetworkBlockDevice/nbd) and
 * deliberately independent of the project's own client and of src/nbd/protocol.ts: the
 * constants are spelled out again here, so a wrong constant in the server cannot make its
 * own tests pass.
 */
import assert from 'node:assert/strict';
import type net from 'node:net';
import { connectRaw } from '../helpers/server.js';

// ---------------------------------------------------------------------------------------------
// Wire constants (all big-endian on the wire).

export const NBDMAGIC = 0x4e42444d41474943n;
export const IHAVEOPT = 0x49484156454f5054n;
export const OPTION_REPLY_MAGIC = 0x0003e889045565a9n;
export const REQUEST_MAGIC = 0x25609513;
export const EXTENDED_REQUEST_MAGIC = 0x21e41c71;
export const SIMPLE_REPLY_MAGIC = 0x67446698;
export const STRUCTURED_REPLY_MAGIC = 0x668e33ef;

/** Handshake flags (server → client, u16). */
export const HS_FIXED_NEWSTYLE = 1 << 0;
export const HS_NO_ZEROES = 1 << 1;
/** Client flags (client → server, u32). */
export const C_FIXED_NEWSTYLE = 1 << 0;
export const C_NO_ZEROES = 1 << 1;

export const OPT = {
  EXPORT_NAME: 1,
  ABORT: 2,
  LIST: 3,
  PEEK_EXPORT: 4,
  STARTTLS: 5,
  INFO: 6,
  GO: 7,
  STRUCTURED_REPLY: 8,
  LIST_META_CONTEXT: 9,
  SET_META_CONTEXT: 10,
  EXTENDED_HEADERS: 11,
} as const;

const ERR_BIT = 0x80000000;
export const REP = {
  ACK: 1,
  SERVER: 2,
  INFO: 3,
  META_CONTEXT: 4,
  ERR_UNSUP: ERR_BIT + 1,
  ERR_POLICY: ERR_BIT + 2,
  ERR_INVALID: ERR_BIT + 3,
  ERR_PLATFORM: ERR_BIT + 4,
  ERR_TLS_REQD: ERR_BIT + 5,
  ERR_UNKNOWN: ERR_BIT + 6,
  ERR_SHUTDOWN: ERR_BIT + 7,
  ERR_BLOCK_SIZE_REQD: ERR_BIT + 8,
  ERR_TOO_BIG: ERR_BIT + 9,
  ERR_EXT_HEADER_REQD: ERR_BIT + 10,
} as const;

export const INFO = { EXPORT: 0, NAME: 1, DESCRIPTION: 2, BLOCK_SIZE: 3 } as const;

/** Transmission flags (u16). */
export const TF = {
  HAS_FLAGS: 1 << 0,
  READ_ONLY: 1 << 1,
  SEND_FLUSH: 1 << 2,
  SEND_FUA: 1 << 3,
  ROTATIONAL: 1 << 4,
  SEND_TRIM: 1 << 5,
  SEND_WRITE_ZEROES: 1 << 6,
  SEND_DF: 1 << 7,
  CAN_MULTI_CONN: 1 << 8,
  SEND_RESIZE: 1 << 9,
  SEND_CACHE: 1 << 10,
  SEND_FAST_ZERO: 1 << 11,
  BLOCK_STATUS_PAYLOAD: 1 << 12,
} as const;

export const CMD = {
  READ: 0,
  WRITE: 1,
  DISC: 2,
  FLUSH: 3,
  TRIM: 4,
  CACHE: 5,
  WRITE_ZEROES: 6,
  BLOCK_STATUS: 7,
  RESIZE: 8,
} as const;

/** Command flags (u16). */
export const CMDF = {
  FUA: 1 << 0,
  NO_HOLE: 1 << 1,
  DF: 1 << 2,
  REQ_ONE: 1 << 3,
  FAST_ZERO: 1 << 4,
  PAYLOAD_LEN: 1 << 5,
} as const;

export const CHUNK = {
  NONE: 0,
  OFFSET_DATA: 1,
  OFFSET_HOLE: 2,
  BLOCK_STATUS: 5,
  BLOCK_STATUS_EXT: 6,
  ERROR: (1 << 15) + 1,
  ERROR_OFFSET: (1 << 15) + 2,
} as const;
export const FLAG_DONE = 1 << 0;

export const ERR = {
  EPERM: 1,
  EIO: 5,
  ENOMEM: 12,
  EINVAL: 22,
  ENOSPC: 28,
  EOVERFLOW: 75,
  ENOTSUP: 95,
  ESHUTDOWN: 108,
} as const;

export const STATE_HOLE = 1 << 0;
export const STATE_ZERO = 1 << 1;

export const KIB = 1024;
export const MIB = 1024 * 1024;

/**
 * Every read waits at most this long by default. It guards against hangs only: generous, so
 * that a loaded machine does not fail a test.
 */
export const DEFAULT_TIMEOUT_MS = 20_000;

export function errName(value: number): string {
  for (const [k, v] of Object.entries(ERR)) if (v === value) return k;
  return String(value);
}

export function repName(value: number): string {
  for (const [k, v] of Object.entries(REP)) if (v === value) return k;
  return `0x${value.toString(16)}`;
}

export function isRepError(type: number): boolean {
  return type >= ERR_BIT;
}

// ---------------------------------------------------------------------------------------------
// The byte reader.

export class ConnectionClosedError extends Error {
  override name = 'ConnectionClosedError';

  constructor(
    message: string,
    /** Bytes of the message that did arrive before the close. */
    readonly received: number,
  ) {
    super(message);
  }
}

export class ReadTimeoutError extends Error {
  override name = 'ReadTimeoutError';
}

/**
 * A client socket with exact-length reads. Everything the server sends is queued; `read(n)`
 * resolves with exactly n bytes, rejects with ConnectionClosedError if the connection ends
 * first, or with ReadTimeoutError when the deadline passes.
 */
export class RawConn {
  private chunks: Buffer[] = [];
  private buffered = 0;
  private ended = false;
  private wake: (() => void) | undefined;
  /** The last socket error (EPIPE, ECONNRESET...), if any. Never thrown. */
  socketError: Error | undefined;

  constructor(readonly socket: net.Socket) {
    socket.on('data', (chunk: Buffer) => {
      this.chunks.push(chunk);
      this.buffered += chunk.length;
      this.notify();
    });
    socket.on('end', () => this.markEnded());
    socket.on('close', () => this.markEnded());
    socket.on('error', (err) => {
      this.socketError = err;
      this.notify();
    });
  }

  static async open(path: string): Promise<RawConn> {
    return new RawConn(await connectRaw(path));
  }

  /** Bytes received and not read yet. */
  get pending(): number {
    return this.buffered;
  }

  /** True once the server closed (or reset) the connection. */
  get closed(): boolean {
    return this.ended;
  }

  send(buf: Buffer): void {
    if (!this.socket.destroyed && this.socket.writable) this.socket.write(buf);
  }

  /** Half-closes: sends EOF, keeps reading. */
  end(): void {
    if (!this.socket.destroyed) this.socket.end();
  }

  destroy(): void {
    this.socket.destroy();
  }

  async read(n: number, timeoutMs = DEFAULT_TIMEOUT_MS, what = ''): Promise<Buffer> {
    const deadline = Date.now() + timeoutMs;
    while (this.buffered < n) {
      if (this.ended) {
        throw new ConnectionClosedError(
          `connection closed with ${this.buffered} of ${n} bytes received${what ? ` (${what})` : ''}`,
          this.buffered,
        );
      }
      if (!(await this.waitEvent(deadline))) {
        throw new ReadTimeoutError(
          `no ${n} bytes within ${timeoutMs} ms, have ${this.buffered}${what ? ` (${what})` : ''}`,
        );
      }
    }
    return this.take(n);
  }

  /**
   * Waits until the server closes the connection; returns whatever arrived and was not read.
   * Rejects if the connection is still open after `timeoutMs`.
   */
  async waitClosed(timeoutMs = DEFAULT_TIMEOUT_MS): Promise<Buffer> {
    const deadline = Date.now() + timeoutMs;
    while (!this.ended) {
      if (!(await this.waitEvent(deadline))) {
        throw new ReadTimeoutError(
          `server did not close the connection within ${timeoutMs} ms (${this.buffered} unread bytes)`,
        );
      }
    }
    return this.take(this.buffered);
  }

  /** Waits `ms`, then reports how many unread bytes arrived and whether the connection ended. */
  async idle(ms: number): Promise<{ pending: number; closed: boolean }> {
    await new Promise((resolve) => setTimeout(resolve, ms));
    return { pending: this.buffered, closed: this.ended };
  }

  private markEnded(): void {
    this.ended = true;
    this.notify();
  }

  private notify(): void {
    const w = this.wake;
    this.wake = undefined;
    w?.();
  }

  private waitEvent(deadline: number): Promise<boolean> {
    const remaining = deadline - Date.now();
    if (remaining <= 0) return Promise.resolve(false);
    assert.equal(this.wake, undefined, 'RawConn: concurrent reads');
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        this.wake = undefined;
        resolve(false);
      }, remaining);
      this.wake = () => {
        clearTimeout(timer);
        resolve(true);
      };
    });
  }

  private take(n: number): Buffer {
    if (n === 0) return Buffer.alloc(0);
    const first = this.chunks[0]!;
    let out: Buffer;
    if (first.length >= n) {
      out = first.subarray(0, n);
      if (first.length === n) this.chunks.shift();
      else this.chunks[0] = first.subarray(n);
    } else {
      out = Buffer.allocUnsafe(n);
      let filled = 0;
      while (filled < n) {
        const c = this.chunks[0]!;
        const used = Math.min(c.length, n - filled);
        c.copy(out, filled, 0, used);
        filled += used;
        if (used === c.length) this.chunks.shift();
        else this.chunks[0] = c.subarray(used);
      }
    }
    this.buffered -= n;
    return out;
  }
}

// ---------------------------------------------------------------------------------------------
// Handshake.

/** Reads and checks the 18-byte greeting; returns the handshake flags. Sends nothing. */
export async function readGreeting(conn: RawConn): Promise<number> {
  const g = await conn.read(18, DEFAULT_TIMEOUT_MS, 'greeting');
  assert.equal(g.readBigUInt64BE(0), NBDMAGIC, 'greeting must start with NBDMAGIC');
  assert.equal(g.readBigUInt64BE(8), IHAVEOPT, 'newstyle greeting must carry IHAVEOPT');
  return g.readUInt16BE(16);
}

export function u32(value: number): Buffer {
  const b = Buffer.allocUnsafe(4);
  b.writeUInt32BE(value >>> 0, 0);
  return b;
}

export function u16(value: number): Buffer {
  const b = Buffer.allocUnsafe(2);
  b.writeUInt16BE(value & 0xffff, 0);
  return b;
}

export function u64(value: bigint): Buffer {
  const b = Buffer.allocUnsafe(8);
  b.writeBigUInt64BE(BigInt.asUintN(64, value), 0);
  return b;
}

/** Reads the greeting and answers it with `clientFlags`. */
export async function greet(
  conn: RawConn,
  clientFlags = C_FIXED_NEWSTYLE | C_NO_ZEROES,
): Promise<number> {
  const flags = await readGreeting(conn);
  conn.send(u32(clientFlags));
  return flags;
}

/** Opens a connection and completes the initial greeting. */
export async function openGreeted(path: string, clientFlags?: number): Promise<RawConn> {
  const conn = await RawConn.open(path);
  await greet(conn, clientFlags);
  return conn;
}

/** An option request; `length` overrides the header's length field (for malformed requests). */
export function optionRequest(
  option: number,
  data: Buffer = Buffer.alloc(0),
  length?: number,
): Buffer {
  const h = Buffer.allocUnsafe(16);
  h.writeBigUInt64BE(IHAVEOPT, 0);
  h.writeUInt32BE(option >>> 0, 8);
  h.writeUInt32BE((length ?? data.length) >>> 0, 12);
  return Buffer.concat([h, data]);
}

function nameBytes(name: string | Buffer): Buffer {
  return typeof name === 'string' ? Buffer.from(name, 'utf8') : name;
}

/** INFO/GO data: u32 name length, name, u16 count, count × u16 info type. */
export function infoRequestData(name: string | Buffer, infos: number[] = []): Buffer {
  const n = nameBytes(name);
  return Buffer.concat([u32(n.length), n, u16(infos.length), ...infos.map(u16)]);
}

/** LIST/SET_META_CONTEXT data: u32 name length, name, u32 count, count × (u32 length, query). */
export function metaContextData(name: string | Buffer, queries: Array<string | Buffer>): Buffer {
  const n = nameBytes(name);
  const parts: Buffer[] = [u32(n.length), n, u32(queries.length)];
  for (const q of queries) {
    const qb = nameBytes(q);
    parts.push(u32(qb.length), qb);
  }
  return Buffer.concat(parts);
}

export interface OptionReply {
  option: number;
  type: number;
  data: Buffer;
}

/** Reads one option reply, checking its magic. */
export async function readOptionReply(
  conn: RawConn,
  timeoutMs = DEFAULT_TIMEOUT_MS,
): Promise<OptionReply> {
  const h = await conn.read(20, timeoutMs, 'option reply header');
  const magic = h.readBigUInt64BE(0);
  assert.equal(magic, OPTION_REPLY_MAGIC, `option reply magic is 0x${magic.toString(16)}`);
  const length = h.readUInt32BE(16);
  assert.ok(length <= 16 * MIB, `implausible option reply length ${length}`);
  const data = await conn.read(length, timeoutMs, 'option reply data');
  return { option: h.readUInt32BE(8), type: h.readUInt32BE(12), data };
}

/**
 * Reads the replies to one option up to and including its final reply (ACK or an error),
 * checking that each echoes the option and that error payloads are valid UTF-8 strings.
 */
export async function readOptionReplies(
  conn: RawConn,
  option: number,
): Promise<{ replies: OptionReply[]; final: OptionReply }> {
  const replies: OptionReply[] = [];
  for (let i = 0; i < 100_000; i++) {
    const r = await readOptionReply(conn);
    assert.equal(r.option, option >>> 0, `reply ${repName(r.type)} must echo option ${option}`);
    if (r.type === REP.ACK) {
      assert.equal(r.data.length, 0, 'ACK carries no data');
      return { replies, final: r };
    }
    if (isRepError(r.type)) {
      assert.ok(r.data.length <= 4096, `error message of ${r.data.length} bytes exceeds 4096`);
      assertUtf8(r.data, 'error message');
      return { replies, final: r };
    }
    replies.push(r);
  }
  assert.fail('more than 100000 replies to one option');
}

/** Sends one option and reads all of its replies. */
export async function option(
  conn: RawConn,
  opt: number,
  data: Buffer = Buffer.alloc(0),
): Promise<{ replies: OptionReply[]; final: OptionReply }> {
  conn.send(optionRequest(opt, data));
  return readOptionReplies(conn, opt);
}

const utf8 = new TextDecoder('utf-8', { fatal: true });

export function assertUtf8(bytes: Buffer, what: string): string {
  assert.ok(!bytes.includes(0), `${what} must not contain NUL`);
  try {
    return utf8.decode(bytes);
  } catch {
    assert.fail(`${what} is not valid UTF-8: ${bytes.toString('hex')}`);
  }
}

export interface BlockSizeInfo {
  minimum: number;
  preferred: number;
  maximum: number;
}

export interface ParsedInfo {
  size: bigint;
  tflags: number;
  name?: string;
  description?: string;
  blockSize?: BlockSizeInfo;
  /** Info types in the order received. */
  types: number[];
}

/**
 * Checks the NBD_REP_INFO replies of a successful INFO or GO: only INFO replies, each of a
 * well-formed length, each type at most once, and NBD_INFO_EXPORT among them.
 */
export function parseInfoReplies(replies: OptionReply[]): ParsedInfo {
  let exp: { size: bigint; tflags: number } | undefined;
  const out: Omit<ParsedInfo, 'size' | 'tflags'> = { types: [] };
  for (const r of replies) {
    assert.equal(r.type, REP.INFO, `only NBD_REP_INFO may precede the ACK, got ${repName(r.type)}`);
    assert.ok(r.data.length >= 2, 'an info reply carries at least its type');
    const type = r.data.readUInt16BE(0);
    assert.ok(!out.types.includes(type), `info type ${type} sent twice`);
    out.types.push(type);
    switch (type) {
      case INFO.EXPORT:
        assert.equal(r.data.length, 12, 'NBD_INFO_EXPORT length must be 12');
        exp = { size: r.data.readBigUInt64BE(2), tflags: r.data.readUInt16BE(10) };
        break;
      case INFO.NAME:
        out.name = assertUtf8(r.data.subarray(2), 'NBD_INFO_NAME');
        break;
      case INFO.DESCRIPTION:
        out.description = assertUtf8(r.data.subarray(2), 'NBD_INFO_DESCRIPTION');
        break;
      case INFO.BLOCK_SIZE:
        assert.equal(r.data.length, 14, 'NBD_INFO_BLOCK_SIZE length must be 14');
        out.blockSize = {
          minimum: r.data.readUInt32BE(2),
          preferred: r.data.readUInt32BE(6),
          maximum: r.data.readUInt32BE(10),
        };
        break;
      default:
        break; // clients ignore info types they do not know
    }
  }
  assert.ok(exp !== undefined, 'a successful INFO/GO MUST include NBD_INFO_EXPORT');
  return { ...out, size: exp.size, tflags: exp.tflags };
}

/** Checks NBD_INFO_BLOCK_SIZE against the constraints of the spec ("Block size constraints"). */
export function assertValidBlockSize(bs: BlockSizeInfo, exportSize: bigint): void {
  const pow2 = (n: number): boolean => n > 0 && (n & (n - 1)) === 0;
  assert.ok(
    pow2(bs.minimum) && bs.minimum <= 65536,
    `minimum ${bs.minimum} must be a power of 2 ≤ 64 KiB`,
  );
  assert.ok(
    pow2(bs.preferred) && bs.preferred >= Math.max(bs.minimum, 512),
    `preferred ${bs.preferred} must be a power of 2 ≥ max(minimum, 512)`,
  );
  if (bs.maximum !== 0xffffffff) {
    assert.equal(bs.maximum % bs.minimum, 0, 'maximum must be a multiple of minimum');
    assert.ok(
      BigInt(bs.maximum) >= (BigInt(bs.preferred) < exportSize ? BigInt(bs.preferred) : exportSize),
      'maximum must be at least min(preferred, export size)',
    );
  }
}

export interface ServerEntry {
  name: string;
  description: string;
}

export function parseServerReply(r: OptionReply): ServerEntry {
  assert.equal(r.type, REP.SERVER);
  assert.ok(r.data.length >= 4, 'NBD_REP_SERVER carries a name length');
  const len = r.data.readUInt32BE(0);
  assert.ok(len <= r.data.length - 4, 'NBD_REP_SERVER name length must fit the reply');
  return {
    name: assertUtf8(r.data.subarray(4, 4 + len), 'export name'),
    description: assertUtf8(r.data.subarray(4 + len), 'export description'),
  };
}

export interface MetaContextEntry {
  id: number;
  name: string;
}

export function parseMetaContextReply(r: OptionReply): MetaContextEntry {
  assert.equal(r.type, REP.META_CONTEXT, `expected NBD_REP_META_CONTEXT, got ${repName(r.type)}`);
  assert.ok(r.data.length >= 5, 'NBD_REP_META_CONTEXT carries an id and a name');
  const name = assertUtf8(r.data.subarray(4), 'context name');
  assert.match(
    name,
    /^[^:\s]+:/,
    `context name ${JSON.stringify(name)} must start with a namespace and a colon`,
  );
  return { id: r.data.readUInt32BE(0), name };
}

// ---------------------------------------------------------------------------------------------
// Transmission.

export interface RequestSpec {
  type: number;
  flags?: number;
  cookie?: bigint;
  offset?: bigint | number;
  /** Defaults to data.length (or 0). */
  length?: number;
  /** Sent after the header (WRITE payload). */
  data?: Buffer;
  /** Override the magic (for bad-magic tests). */
  magic?: number;
}

/** A 28-byte compact request header, followed by `data` if given. */
export function encodeRequest(spec: RequestSpec): Buffer {
  const h = Buffer.allocUnsafe(28);
  h.writeUInt32BE((spec.magic ?? REQUEST_MAGIC) >>> 0, 0);
  h.writeUInt16BE(spec.flags ?? 0, 4);
  h.writeUInt16BE(spec.type, 6);
  h.writeBigUInt64BE(BigInt.asUintN(64, spec.cookie ?? 0n), 8);
  h.writeBigUInt64BE(BigInt.asUintN(64, BigInt(spec.offset ?? 0)), 16);
  h.writeUInt32BE((spec.length ?? spec.data?.length ?? 0) >>> 0, 24);
  return spec.data === undefined ? h : Buffer.concat([h, spec.data]);
}

export interface Extent {
  length: number;
  flags: number;
}

export interface BlockStatusChunk {
  contextId: number;
  extents: Extent[];
}

export interface ReplyChunk {
  flags: number;
  type: number;
  payload: Buffer;
}

export interface Reply {
  cookie: bigint;
  /** True for a simple reply. */
  simple: boolean;
  /** 0 on success, else the (first) error value. */
  error: number;
  message?: string;
  /** READ data on success, reassembled from content chunks. */
  data?: Buffer;
  /** Structured chunks in the order received. */
  chunks: ReplyChunk[];
  blockStatus: BlockStatusChunk[];
}

/** What a reply is checked against: the request it answers. */
export interface Expectation {
  type: number;
  flags: number;
  offset: bigint;
  length: number;
}

interface Assembly {
  exp: Expectation;
  chunks: ReplyChunk[];
  /** [start, end) of content and error-offset chunks, to check overlaps. */
  ranges: Array<[bigint, bigint]>;
  contentChunks: number;
  data: Buffer | undefined;
  covered: bigint;
  errors: Array<{ error: number; message: string }>;
  blockStatus: BlockStatusChunk[];
}

/**
 * Reads replies until every pending cookie got a complete reply, checking each message
 * strictly: known magic, a pending cookie, chunk types and lengths valid for the command,
 * content within the request and never overlapping, no flags but DONE, READ never answered
 * by a simple reply once structured replies are on, full coverage of a successful READ.
 * Anything else (including bytes of one message interleaved into another) fails.
 */
export async function readReplies(
  conn: RawConn,
  structured: boolean,
  pending: Map<bigint, Expectation>,
  timeoutMs = DEFAULT_TIMEOUT_MS,
  /** Return what is complete when the server closes between two messages. */
  untilClose = false,
): Promise<Map<bigint, Reply>> {
  const done = new Map<bigint, Reply>();
  const partial = new Map<bigint, Assembly>();
  while (done.size < pending.size) {
    let head: Buffer;
    try {
      head = await conn.read(
        4,
        timeoutMs,
        `reply magic, ${pending.size - done.size} replies missing`,
      );
    } catch (err) {
      if (untilClose && err instanceof ConnectionClosedError && err.received === 0) {
        assert.equal(partial.size, 0, 'the server closed in the middle of a structured reply');
        return done;
      }
      throw err;
    }
    const magic = head.readUInt32BE(0);
    if (magic === SIMPLE_REPLY_MAGIC) {
      const h = await conn.read(12, timeoutMs, 'simple reply header');
      const error = h.readUInt32BE(0);
      const cookie = h.readBigUInt64BE(4);
      const exp = pending.get(cookie);
      assert.ok(exp !== undefined, `simple reply for unknown cookie 0x${cookie.toString(16)}`);
      assert.ok(!done.has(cookie), `second reply for cookie 0x${cookie.toString(16)}`);
      assert.ok(
        !partial.has(cookie),
        `simple reply after structured chunks for cookie 0x${cookie.toString(16)}`,
      );
      if (structured) {
        assert.notEqual(
          exp.type,
          CMD.READ,
          'with structured replies, READ MUST NOT get a simple reply',
        );
        if (exp.type === CMD.BLOCK_STATUS) {
          assert.notEqual(error, 0, 'a successful BLOCK_STATUS needs a structured reply');
        }
      }
      let data: Buffer | undefined;
      if (exp.type === CMD.READ && error === 0) {
        data = await conn.read(exp.length, timeoutMs, 'simple READ payload');
      }
      done.set(cookie, { cookie, simple: true, error, data, chunks: [], blockStatus: [] });
      continue;
    }
    assert.equal(
      magic,
      STRUCTURED_REPLY_MAGIC,
      `unexpected reply magic 0x${magic.toString(16).padStart(8, '0')} (messages interleaved or stream out of sync)`,
    );
    assert.ok(structured, 'structured reply sent although structured replies were not negotiated');
    const h = await conn.read(16, timeoutMs, 'structured reply header');
    const flags = h.readUInt16BE(0);
    const type = h.readUInt16BE(2);
    const cookie = h.readBigUInt64BE(4);
    const length = h.readUInt32BE(12);
    const exp = pending.get(cookie);
    assert.ok(exp !== undefined, `structured chunk for unknown cookie 0x${cookie.toString(16)}`);
    assert.ok(!done.has(cookie), `chunk after the DONE chunk for cookie 0x${cookie.toString(16)}`);
    assert.equal(
      flags & ~FLAG_DONE,
      0,
      `reply flags 0x${flags.toString(16)}: only DONE is defined`,
    );
    assert.ok(length <= 64 * MIB, `implausible chunk length ${length}`);
    const payload = await conn.read(length, timeoutMs, 'structured chunk payload');
    let p = partial.get(cookie);
    if (p === undefined) {
      p = {
        exp,
        chunks: [],
        ranges: [],
        contentChunks: 0,
        data: exp.type === CMD.READ ? Buffer.alloc(exp.length) : undefined,
        covered: 0n,
        errors: [],
        blockStatus: [],
      };
      partial.set(cookie, p);
    }
    p.chunks.push({ flags, type, payload });
    checkChunk(p, type, flags, payload);
    if (flags & FLAG_DONE) {
      partial.delete(cookie);
      done.set(cookie, finish(cookie, p));
    }
  }
  return done;
}

const reqEnd = (e: Expectation): bigint => e.offset + BigInt(e.length);

function claimRange(p: Assembly, start: bigint, end: bigint, what: string): void {
  assert.ok(
    start >= p.exp.offset && end <= reqEnd(p.exp),
    `${what} [${start}, ${end}) lies outside the request [${p.exp.offset}, ${reqEnd(p.exp)})`,
  );
  for (const [s, e] of p.ranges) {
    assert.ok(
      end <= s || start >= e,
      `${what} [${start}, ${end}) overlaps an earlier chunk [${s}, ${e})`,
    );
  }
  p.ranges.push([start, end]);
}

function checkChunk(p: Assembly, type: number, flags: number, payload: Buffer): void {
  const cmd = p.exp.type;
  switch (type) {
    case CHUNK.NONE:
      assert.equal(payload.length, 0, 'NONE chunk length MUST be 0');
      assert.ok(flags & FLAG_DONE, 'NONE chunk MUST have DONE set');
      break;
    case CHUNK.OFFSET_DATA: {
      assert.equal(cmd, CMD.READ, 'OFFSET_DATA is valid only for READ');
      assert.ok(payload.length >= 9, `OFFSET_DATA length ${payload.length} MUST be at least 9`);
      const off = payload.readBigUInt64BE(0);
      const len = BigInt(payload.length - 8);
      claimRange(p, off, off + len, 'OFFSET_DATA');
      payload.copy(p.data!, Number(off - p.exp.offset), 8);
      p.covered += len;
      p.contentChunks++;
      break;
    }
    case CHUNK.OFFSET_HOLE: {
      assert.equal(cmd, CMD.READ, 'OFFSET_HOLE is valid only for READ');
      assert.equal(payload.length, 12, 'OFFSET_HOLE length MUST be 12');
      const off = payload.readBigUInt64BE(0);
      const size = payload.readUInt32BE(8);
      assert.ok(size > 0, 'OFFSET_HOLE size MUST be nonzero');
      claimRange(p, off, off + BigInt(size), 'OFFSET_HOLE');
      p.covered += BigInt(size); // p.data is already zero there
      p.contentChunks++;
      break;
    }
    case CHUNK.BLOCK_STATUS: {
      assert.equal(cmd, CMD.BLOCK_STATUS, 'BLOCK_STATUS chunk is valid only for BLOCK_STATUS');
      assert.ok(
        payload.length >= 12 && (payload.length - 4) % 8 === 0,
        `BLOCK_STATUS chunk length ${payload.length} MUST be 4 + a positive multiple of 8`,
      );
      const contextId = payload.readUInt32BE(0);
      assert.ok(
        !p.blockStatus.some((b) => b.contextId === contextId),
        `two BLOCK_STATUS chunks for context ${contextId}`,
      );
      const extents: Extent[] = [];
      for (let pos = 4; pos < payload.length; pos += 8) {
        const length = payload.readUInt32BE(pos);
        assert.ok(length > 0, 'a block status descriptor length MUST NOT be zero');
        extents.push({ length, flags: payload.readUInt32BE(pos + 4) });
      }
      p.blockStatus.push({ contextId, extents });
      break;
    }
    case CHUNK.ERROR:
    case CHUNK.ERROR_OFFSET: {
      const min = type === CHUNK.ERROR ? 6 : 14;
      assert.ok(
        payload.length >= min,
        `error chunk length ${payload.length} MUST be at least ${min}`,
      );
      const error = payload.readUInt32BE(0);
      assert.notEqual(error, 0, 'error chunk error value MUST be nonzero');
      const msgLen = payload.readUInt16BE(4);
      assert.ok(
        msgLen <= payload.length - min,
        `error message length ${msgLen} does not fit the chunk`,
      );
      const message = assertUtf8(payload.subarray(6, 6 + msgLen), 'error chunk message');
      if (type === CHUNK.ERROR_OFFSET) {
        const valid: number[] = [
          CMD.READ,
          CMD.WRITE,
          CMD.TRIM,
          CMD.CACHE,
          CMD.WRITE_ZEROES,
          CMD.BLOCK_STATUS,
        ];
        assert.ok(valid.includes(cmd), `ERROR_OFFSET is not valid for command ${cmd}`);
        const off = payload.readBigUInt64BE(payload.length - 8);
        assert.ok(
          off >= p.exp.offset && off < reqEnd(p.exp),
          'ERROR_OFFSET offset must lie within the request',
        );
      }
      p.errors.push({ error, message });
      break;
    }
    default:
      assert.fail(`unknown or unexpected structured reply type ${type} for command ${cmd}`);
  }
}

function finish(cookie: bigint, p: Assembly): Reply {
  const reply: Reply = {
    cookie,
    simple: false,
    error: 0,
    chunks: p.chunks,
    blockStatus: p.blockStatus,
  };
  if ((p.exp.flags & CMDF.DF) !== 0) {
    assert.ok(p.contentChunks <= 1, `DF read answered with ${p.contentChunks} content chunks`);
  }
  const first = p.errors[0];
  if (first !== undefined) {
    reply.error = first.error;
    reply.message = first.message;
    return reply;
  }
  if (p.exp.type === CMD.READ) {
    assert.equal(p.covered, BigInt(p.exp.length), 'a successful READ MUST cover the whole request');
    reply.data = p.data;
  } else if (p.exp.type === CMD.BLOCK_STATUS) {
    assert.ok(p.blockStatus.length >= 1, 'a successful BLOCK_STATUS carries a BLOCK_STATUS chunk');
  } else {
    for (const c of p.chunks) assert.equal(c.type, CHUNK.NONE, `unexpected chunk type ${c.type}`);
  }
  return reply;
}

/** One negotiated connection in transmission phase. */
export class Session {
  private nextCookie = 1n;

  constructor(
    readonly conn: RawConn,
    readonly structured: boolean,
    readonly size: bigint,
    readonly tflags: number,
    /** Context name → id, as selected by SET_META_CONTEXT. */
    readonly contexts: Map<string, number>,
  ) {}

  cookie(): bigint {
    return this.nextCookie++;
  }

  /** Sends a request and returns what the reply must be checked against. */
  send(spec: RequestSpec): { cookie: bigint; exp: Expectation } {
    const cookie = spec.cookie ?? this.cookie();
    this.conn.send(encodeRequest({ ...spec, cookie }));
    return {
      cookie,
      exp: {
        type: spec.type,
        flags: spec.flags ?? 0,
        offset: BigInt.asUintN(64, BigInt(spec.offset ?? 0)),
        length: (spec.length ?? spec.data?.length ?? 0) >>> 0,
      },
    };
  }

  async reply(cookie: bigint, exp: Expectation, timeoutMs = DEFAULT_TIMEOUT_MS): Promise<Reply> {
    const r = await readReplies(this.conn, this.structured, new Map([[cookie, exp]]), timeoutMs);
    return r.get(cookie)!;
  }

  async request(spec: RequestSpec, timeoutMs = DEFAULT_TIMEOUT_MS): Promise<Reply> {
    const { cookie, exp } = this.send(spec);
    return this.reply(cookie, exp, timeoutMs);
  }

  /** A request that must fail with `error`; returns the reply. */
  async expectError(spec: RequestSpec, error: number, what = ''): Promise<Reply> {
    const r = await this.request(spec);
    assert.equal(
      errName(r.error),
      errName(error),
      `${what || `command ${spec.type}`}: expected ${errName(error)}, got ${r.error === 0 ? 'success' : errName(r.error)}`,
    );
    return r;
  }

  async read(offset: number | bigint, length: number, flags = 0): Promise<Buffer> {
    const r = await this.request({ type: CMD.READ, offset, length, flags });
    assert.equal(
      r.error,
      0,
      `READ ${offset}+${length} failed with ${errName(r.error)}: ${r.message ?? ''}`,
    );
    return r.data!;
  }

  async write(offset: number | bigint, data: Buffer, flags = 0): Promise<void> {
    const r = await this.request({ type: CMD.WRITE, offset, data, flags });
    assert.equal(
      r.error,
      0,
      `WRITE ${offset}+${data.length} failed with ${errName(r.error)}: ${r.message ?? ''}`,
    );
  }

  async blockStatus(
    offset: number | bigint,
    length: number,
    flags = 0,
  ): Promise<BlockStatusChunk[]> {
    const r = await this.request({ type: CMD.BLOCK_STATUS, offset, length, flags });
    assert.equal(
      r.error,
      0,
      `BLOCK_STATUS ${offset}+${length} failed with ${errName(r.error)}: ${r.message ?? ''}`,
    );
    return r.blockStatus;
  }

  /** Sends DISC and waits for the server to close. Returns unread bytes (should be none). */
  async disconnect(): Promise<Buffer> {
    this.conn.send(encodeRequest({ type: CMD.DISC, cookie: this.cookie() }));
    return this.conn.waitClosed();
  }

  close(): void {
    this.conn.destroy();
  }
}

export interface NegotiateOptions {
  exportName?: string;
  structured?: boolean;
  /** Queries for SET_META_CONTEXT (sent only when given; needs structured). */
  meta?: string[];
  /** Export named in SET_META_CONTEXT (default: exportName). */
  metaExport?: string;
  clientFlags?: number;
  infos?: number[];
}

/** Connects, negotiates with GO and returns the session in transmission phase. */
export async function negotiate(path: string, opts: NegotiateOptions = {}): Promise<Session> {
  const conn = await openGreeted(path, opts.clientFlags);
  try {
    const exportName = opts.exportName ?? 'mem';
    if (opts.structured) {
      const sr = await option(conn, OPT.STRUCTURED_REPLY);
      assert.equal(sr.final.type, REP.ACK, 'STRUCTURED_REPLY must be acknowledged');
      assert.equal(sr.replies.length, 0);
    }
    const contexts = new Map<string, number>();
    if (opts.meta !== undefined) {
      const set = await option(
        conn,
        OPT.SET_META_CONTEXT,
        metaContextData(opts.metaExport ?? exportName, opts.meta),
      );
      assert.equal(set.final.type, REP.ACK, `SET_META_CONTEXT failed: ${repName(set.final.type)}`);
      for (const r of set.replies) {
        const c = parseMetaContextReply(r);
        contexts.set(c.name, c.id);
      }
    }
    const go = await option(conn, OPT.GO, infoRequestData(exportName, opts.infos ?? []));
    assert.equal(
      go.final.type,
      REP.ACK,
      `GO failed: ${repName(go.final.type)} ${go.final.data.toString()}`,
    );
    const info = parseInfoReplies(go.replies);
    return new Session(conn, opts.structured === true, info.size, info.tflags, contexts);
  } catch (err) {
    conn.destroy();
    throw err;
  }
}

// ---------------------------------------------------------------------------------------------
// Test data.

/** Deterministic, nonzero-rich bytes that differ per seed. */
export function pattern(length: number, seed = 1): Buffer {
  const buf = Buffer.allocUnsafe(length);
  let x = (seed * 2654435761) >>> 0 || 1;
  for (let i = 0; i < length; i++) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    buf[i] = (x & 0xff) | 1;
  }
  return buf;
}

/** A small seeded PRNG (mulberry32) for reproducible fuzzing. */
export function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export function randomBytes(rand: () => number, length: number): Buffer {
  const b = Buffer.allocUnsafe(length);
  for (let i = 0; i < length; i++) b[i] = Math.floor(rand() * 256);
  return b;
}

/**
 * A connection that keeps writing and reading back its own region while a test abuses the
 * server, so the test can check that other clients were not disturbed.
 */
export class Verifier {
  private stopped = false;
  ops = 0;
  failure: unknown;
  private readonly loop: Promise<void>;

  constructor(
    private readonly session: Session,
    private readonly offset: number,
    private readonly length = 4096,
  ) {
    this.loop = this.run();
  }

  private async run(): Promise<void> {
    try {
      while (!this.stopped) {
        const data = pattern(this.length, this.ops + 1);
        await this.session.write(this.offset, data);
        const back = await this.session.read(this.offset, this.length);
        assert.ok(back.equals(data), `verifier read back different data at op ${this.ops}`);
        this.ops++;
        await new Promise((resolve) => setImmediate(resolve));
      }
    } catch (err) {
      this.failure = err;
    }
  }

  /** Stops the loop; throws if any operation failed. Returns the number of verified round trips. */
  async stop(): Promise<number> {
    this.stopped = true;
    await this.loop;
    if (this.failure !== undefined) throw this.failure;
    return this.ops;
  }
}
