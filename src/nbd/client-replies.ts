/**
 * Transmission-phase reply parsing: a resumable state machine fed with whatever bytes the
 * socket delivers, which matches replies to outstanding requests by cookie, reassembles READ
 * data and block status, and checks every rule a client can check. Any violation throws
 * NbdProtocolError; the owner then fails everything and drops the connection, because after a
 * malformed message the byte stream can no longer be trusted.
 */

import { ByteFifo } from './byte-fifo.js';
import { NbdProtocolError, cmdName } from './client-errors.js';
import {
  CHUNK_FLAG_DONE,
  Chunk,
  Cmd,
  CmdFlag,
  SIMPLE_REPLY_HEADER_SIZE,
  SIMPLE_REPLY_MAGIC,
  STRUCTURED_REPLY_HEADER_SIZE,
  STRUCTURED_REPLY_MAGIC,
} from './protocol.js';

export interface ReplyChunk {
  type: number;
  flags: number;
  /** The chunk payload as received (for OFFSET_DATA it starts with the u64 offset). */
  payload: Buffer;
}

export interface BlockExtent {
  length: number;
  /** Status bits of the context (for base:allocation: STATE_HOLE | STATE_ZERO). */
  flags: number;
}

/** The raw outcome of one request, as `NbdClient.request()` returns it. */
export interface NbdReply {
  /** Wire errno of the first error (0 on success). */
  error: number;
  /** Message of the first structured error chunk that carried one. */
  message?: string;
  /** Offset of the first NBD_REPLY_TYPE_ERROR_OFFSET chunk. */
  errorOffset?: bigint;
  /** True when the server answered with a simple reply. */
  simple: boolean;
  /** Structured chunks in arrival order (empty for simple replies; only kept for request()). */
  chunks: ReplyChunk[];
  /** READ: the data, reassembled, when the request succeeded. */
  data?: Buffer;
  /** BLOCK_STATUS: extents per context name, when the request succeeded. */
  extents?: Map<string, BlockExtent[]>;
}

/** Bookkeeping of one request on the wire. */
export interface InFlight {
  cookie: bigint;
  type: number;
  flags: number;
  offset: bigint;
  length: number;
  /** Keep every chunk's payload for the caller (raw request()); costs memory on big reads. */
  keepChunks: boolean;
  reply: NbdReply;
  /** READ: sorted, non-overlapping [start, end) ranges (relative to offset) already received. */
  covered?: Array<[number, number]>;
  coveredBytes: number;
  contentChunks: number;
  resolve: (reply: NbdReply) => void;
  reject: (err: Error) => void;
}

/** What the parser needs to know about the connection. */
export interface ReplyContext {
  structuredReplies: boolean;
  /** Selected meta contexts, id → name. */
  metaContexts: ReadonlyMap<number, string>;
  exportSize: number;
  lookup(cookie: bigint): InFlight | undefined;
  /** Called once per request, after its last reply message (the reader is done with it). */
  complete(req: InFlight): void;
}

/** Largest error-chunk payload accepted: error + length + a 4096-byte message + offset, rounded. */
const MAX_ERROR_CHUNK = 8192;
/** Largest BLOCK_STATUS chunk accepted: the spec suggests ≤ 2^20 extents per chunk. */
const MAX_STATUS_CHUNK = 4 + 8 * (1 << 21);

type State =
  | { kind: 'header' }
  | { kind: 'simple-data'; req: InFlight; filled: number }
  | { kind: 'chunk'; req: InFlight; flags: number; type: number; length: number };

export class ReplyReader {
  private readonly queue = new ByteFifo();
  private state: State = { kind: 'header' };

  constructor(private readonly ctx: ReplyContext) {}

  /** True when no message is partly received: EOF here is clean. */
  get idle(): boolean {
    return this.state.kind === 'header' && this.queue.length === 0;
  }

  /** Consumes `buf`, completing any requests it finishes. Throws NbdProtocolError. */
  push(buf: Buffer): void {
    this.queue.push(buf);
    while (this.step()) {
      /* keep parsing while whole pieces are available */
    }
  }

  /** Does one unit of work; false when more bytes are needed. */
  private step(): boolean {
    const s = this.state;
    switch (s.kind) {
      case 'header':
        return this.header();
      case 'simple-data': {
        const data = s.req.reply.data!;
        s.filled += this.queue.takeInto(data, s.filled, data.length - s.filled);
        if (s.filled < data.length) return false;
        this.finish(s.req);
        return true;
      }
      case 'chunk':
        if (this.queue.length < s.length) return false;
        this.chunk(s.req, s.flags, s.type, s.length);
        this.state = { kind: 'header' };
        return true;
    }
  }

  private header(): boolean {
    if (this.queue.length < 4) return false;
    const magic = this.queue.peek(4).readUInt32BE(0);
    if (magic === SIMPLE_REPLY_MAGIC) {
      if (this.queue.length < SIMPLE_REPLY_HEADER_SIZE) return false;
      const h = this.queue.take(SIMPLE_REPLY_HEADER_SIZE);
      this.simple(h.readUInt32BE(4), this.request(h.readBigUInt64BE(8), 'simple reply'));
      return true;
    }
    if (magic === STRUCTURED_REPLY_MAGIC) {
      if (!this.ctx.structuredReplies) {
        throw new NbdProtocolError(
          'structured reply chunk, but structured replies were not negotiated',
        );
      }
      if (this.queue.length < STRUCTURED_REPLY_HEADER_SIZE) return false;
      const h = this.queue.take(STRUCTURED_REPLY_HEADER_SIZE);
      const flags = h.readUInt16BE(4);
      const type = h.readUInt16BE(6);
      const req = this.request(h.readBigUInt64BE(8), 'structured reply chunk');
      const length = h.readUInt32BE(16);
      // Refuse absurd lengths before buffering them: they mean a desynchronised stream.
      const limit =
        req.type === Cmd.READ
          ? Math.max(req.length + 8, MAX_ERROR_CHUNK)
          : req.type === Cmd.BLOCK_STATUS
            ? MAX_STATUS_CHUNK
            : MAX_ERROR_CHUNK;
      if (length > limit) {
        throw this.violation(req, `chunk type ${type} of ${length} bytes (limit ${limit})`);
      }
      this.state = { kind: 'chunk', req, flags, type, length };
      return true;
    }
    throw new NbdProtocolError(`unknown reply magic 0x${magic.toString(16).padStart(8, '0')}`);
  }

  private request(cookie: bigint, what: string): InFlight {
    const req = this.ctx.lookup(cookie);
    if (!req) throw new NbdProtocolError(`${what} for unknown cookie 0x${cookie.toString(16)}`);
    return req;
  }

  private violation(req: InFlight, why: string): NbdProtocolError {
    return new NbdProtocolError(
      `reply to ${cmdName(req.type)} (cookie 0x${req.cookie.toString(16)}): ${why}`,
    );
  }

  private simple(error: number, req: InFlight): void {
    req.reply.simple = true;
    req.reply.error = error;
    if (req.type === Cmd.READ && this.ctx.structuredReplies) {
      // MUST NOT, "even for the case of an early EINVAL due to bad flags".
      throw this.violation(req, 'simple reply to READ after structured replies were negotiated');
    }
    if (req.type === Cmd.BLOCK_STATUS && error === 0) {
      throw this.violation(req, 'successful BLOCK_STATUS needs a structured reply');
    }
    if (req.type === Cmd.READ && error === 0 && req.length > 0) {
      // The payload follows: its length comes from the request, not the reply.
      req.reply.data = Buffer.allocUnsafe(req.length);
      this.state = { kind: 'simple-data', req, filled: 0 };
      return;
    }
    if (req.type === Cmd.READ && error === 0) req.reply.data = Buffer.alloc(0);
    this.finish(req);
  }

  private chunk(req: InFlight, flags: number, type: number, length: number): void {
    // A big OFFSET_DATA for an internal read goes straight from the socket buffers into the
    // result: nobody needs its raw payload.
    if (type === Chunk.OFFSET_DATA && !req.keepChunks && req.type === Cmd.READ && length > 8) {
      const start = this.content(req, this.queue.take(8).readBigUInt64BE(0), length - 8);
      this.queue.takeInto(req.reply.data!, start, length - 8);
    } else {
      const payload = this.queue.take(length);
      if (req.keepChunks) req.reply.chunks.push({ type, flags, payload });
      this.interpret(req, flags, type, payload);
    }
    // Other flag bits are ignored, as the spec asks of clients.
    if (flags & CHUNK_FLAG_DONE) this.done(req);
  }

  private interpret(req: InFlight, flags: number, type: number, p: Buffer): void {
    const expect = (cond: boolean, why: string): void => {
      if (!cond) throw this.violation(req, why);
    };
    switch (type) {
      case Chunk.NONE:
        expect(p.length === 0, `NONE chunk with ${p.length} bytes`);
        expect((flags & CHUNK_FLAG_DONE) !== 0, 'NONE chunk without the DONE flag');
        return;
      case Chunk.OFFSET_DATA: {
        expect(req.type === Cmd.READ, 'OFFSET_DATA chunk');
        expect(p.length > 8, `OFFSET_DATA chunk of ${p.length} bytes`);
        const start = this.content(req, p.readBigUInt64BE(0), p.length - 8);
        p.copy(req.reply.data!, start, 8);
        return;
      }
      case Chunk.OFFSET_HOLE: {
        expect(req.type === Cmd.READ, 'OFFSET_HOLE chunk');
        expect(p.length === 12, `OFFSET_HOLE chunk of ${p.length} bytes`);
        const size = p.readUInt32BE(8);
        expect(size > 0, 'OFFSET_HOLE of size 0');
        const start = this.content(req, p.readBigUInt64BE(0), size);
        req.reply.data!.fill(0, start, start + size);
        return;
      }
      case Chunk.BLOCK_STATUS:
        expect(req.type === Cmd.BLOCK_STATUS, 'BLOCK_STATUS chunk');
        this.blockStatus(req, p);
        return;
      case Chunk.ERROR_OFFSET: {
        expect(
          req.type !== Cmd.FLUSH && req.type !== Cmd.DISC,
          'ERROR_OFFSET chunk (not valid for this command)',
        );
        const message = this.errorChunk(req, p, 14);
        const offset = p.readBigUInt64BE(6 + p.readUInt16BE(4));
        expect(
          offset >= req.offset && offset < req.offset + BigInt(req.length),
          `ERROR_OFFSET at ${offset}, outside the request`,
        );
        this.recordError(req, p.readUInt32BE(0), message, offset);
        return;
      }
      default:
        // ERROR and any unknown type with bit 15 set share the error layout; an unknown
        // error type fails the request but leaves the connection usable.
        expect((type & 0x8000) !== 0, `unknown chunk type ${type}`);
        this.recordError(req, p.readUInt32BE(0), this.errorChunk(req, p, 6));
    }
  }

  /** Validates the common error-chunk prefix; returns the message. */
  private errorChunk(req: InFlight, p: Buffer, minLength: number): string {
    if (p.length < minLength) throw this.violation(req, `error chunk of ${p.length} bytes`);
    if (p.readUInt32BE(0) === 0) throw this.violation(req, 'error chunk with error 0');
    const messageLength = p.readUInt16BE(4);
    if (messageLength > p.length - minLength) {
      throw this.violation(req, `error message of ${messageLength} bytes overruns the chunk`);
    }
    return p.toString('utf8', 6, 6 + messageLength);
  }

  private recordError(req: InFlight, errno: number, message: string, offset?: bigint): void {
    const r = req.reply;
    if (r.error !== 0) return;
    r.error = errno;
    if (message) r.message = message;
    if (offset !== undefined) r.errorOffset = offset;
  }

  /**
   * Checks a content chunk against the request (inside it, overlapping nothing earlier, at
   * most one with DF) and returns its start relative to the request offset.
   */
  private content(req: InFlight, offset: bigint, size: number): number {
    if (offset < req.offset || offset + BigInt(size) > req.offset + BigInt(req.length)) {
      throw this.violation(
        req,
        `content chunk [${offset}, +${size}) outside the request [${req.offset}, +${req.length})`,
      );
    }
    req.contentChunks++;
    if (req.flags & CmdFlag.DF && req.contentChunks > 1) {
      throw this.violation(req, 'more than one content chunk despite DF');
    }
    const start = Number(offset - req.offset);
    const end = start + size;
    // Binary search for the first range ending after `start`; it must begin at or after `end`.
    const ranges = (req.covered ??= []);
    let lo = 0;
    let hi = ranges.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (ranges[mid]![1] <= start) lo = mid + 1;
      else hi = mid;
    }
    const next = ranges[lo];
    if (next && next[0] < end) {
      throw this.violation(req, `content chunk [${offset}, +${size}) overlaps an earlier chunk`);
    }
    ranges.splice(lo, 0, [start, end]);
    req.coveredBytes += size;
    req.reply.data ??= Buffer.alloc(req.length);
    return start;
  }

  private blockStatus(req: InFlight, p: Buffer): void {
    if (p.length < 12 || (p.length - 4) % 8 !== 0) {
      throw this.violation(req, `BLOCK_STATUS chunk of ${p.length} bytes`);
    }
    const id = p.readUInt32BE(0);
    const name = this.ctx.metaContexts.get(id);
    if (name === undefined) throw this.violation(req, `BLOCK_STATUS for unknown context id ${id}`);
    const all = (req.reply.extents ??= new Map());
    if (all.has(name)) throw this.violation(req, `two BLOCK_STATUS chunks for ${name}`);
    const count = (p.length - 4) / 8;
    if (req.flags & CmdFlag.REQ_ONE && count !== 1) {
      throw this.violation(req, `${count} extents for ${name} despite REQ_ONE`);
    }
    const extents: BlockExtent[] = [];
    let total = 0;
    for (let i = 0; i < count; i++) {
      const length = p.readUInt32BE(4 + 8 * i);
      if (length === 0) throw this.violation(req, `zero-length extent for ${name}`);
      // Only the last extent may reach beyond the requested range (and never past the end).
      if (i > 0 && total >= req.length) {
        throw this.violation(req, `extents for ${name} continue past the requested range`);
      }
      extents.push({ length, flags: p.readUInt32BE(8 + 8 * i) });
      total += length;
    }
    if (req.offset + BigInt(total) > BigInt(this.ctx.exportSize)) {
      throw this.violation(req, `extents for ${name} run past the end of the export`);
    }
    if (req.flags & CmdFlag.REQ_ONE && total > req.length) {
      throw this.violation(req, `REQ_ONE extent of ${total} bytes exceeds the request`);
    }
    all.set(name, extents);
  }

  /** DONE flag seen: check that a successful reply is complete, then hand it over. */
  private done(req: InFlight): void {
    const r = req.reply;
    if (r.error === 0 && req.type === Cmd.READ) {
      if (req.coveredBytes !== req.length) {
        throw this.violation(
          req,
          `success after ${req.coveredBytes} of ${req.length} bytes of content`,
        );
      }
      r.data ??= Buffer.alloc(0);
    }
    if (r.error === 0 && req.type === Cmd.BLOCK_STATUS) {
      const got = r.extents?.size ?? 0;
      if (got !== this.ctx.metaContexts.size) {
        throw this.violation(
          req,
          `success with status for ${got} of ${this.ctx.metaContexts.size} contexts`,
        );
      }
    }
    this.finish(req);
  }

  private finish(req: InFlight): void {
    this.state = { kind: 'header' };
    const r = req.reply;
    // Partial results of failed requests are not trustworthy; don't hand them out.
    if (r.error !== 0) {
      delete r.data;
      delete r.extents;
    }
    this.ctx.complete(req);
  }
}
