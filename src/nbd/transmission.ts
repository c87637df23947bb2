/**
 * The transmission phase of one connection: parses requests from the byte stream, runs them
 * concurrently against the export's device, and writes each reply whole (replies may leave
 * out of order; the cookie ties them to requests).
 *
 * Work is bounded: past `maxRequests` requests or `maxBytes` payload bytes in flight, or while
 * SEND_QUEUE_BYTES of replies wait for the socket, no new request header is parsed and the
 * socket is paused, so a client that never reads replies or floods requests holds at most
 * that much memory.
 */
import type { Socket } from 'node:net';
import type { Logger } from 'pino';
import {
  ExtentState,
  RequestFlags,
  type Device,
  type Extent,
  type IoContext,
} from '../core/device.js';
import { assert, toDeviceError } from '../core/errors.js';
import type { BufferPool } from './buffer-pool.js';
import { ByteFifo } from './byte-fifo.js';
import type { Negotiated } from './handshake.js';
import { moveToUserBuffers, type UserBufferSink } from './user-buffer-socket.js';
import {
  BASE_ALLOCATION,
  CHUNK_FLAG_DONE,
  Chunk,
  Cmd,
  CmdFlag,
  MAX_ERROR_MESSAGE_BYTES,
  NbdErr,
  REQUEST_HEADER_SIZE,
  REQUEST_MAGIC,
  SIMPLE_REPLY_HEADER_SIZE,
  SIMPLE_REPLY_MAGIC,
  STRUCTURED_REPLY_HEADER_SIZE,
  STRUCTURED_REPLY_MAGIC,
  TFlag,
} from './protocol.js';

export interface TransmissionLimits {
  /** Requests of one connection being served at once. */
  maxRequests: number;
  /** Payload bytes (reads and writes) of one connection in flight at once. */
  maxBytes: number;
}

export const DEFAULT_TRANSMISSION_LIMITS: Readonly<TransmissionLimits> = {
  maxRequests: 64,
  maxBytes: 64 * 1024 * 1024,
};

/** Longest extent a base:allocation descriptor can carry, kept a multiple of 512. */
const MAX_DESCRIPTOR_LENGTH = 0xffff_fe00;
/** Descriptors per block-status chunk (the spec asks for at most 2^20). */
const MAX_DESCRIPTORS = 1 << 16;

/** How long a client may keep its side open after we have closed ours. */
const CLOSE_GRACE_MS = 5000;

const KNOWN_FLAGS =
  CmdFlag.FUA | CmdFlag.NO_HOLE | CmdFlag.DF | CmdFlag.REQ_ONE | CmdFlag.FAST_ZERO;

interface Request {
  type: number;
  flags: number;
  cookieHi: number;
  cookieLo: number;
  /** -1 when the wire offset does not fit a safe integer (it is out of range anyway). */
  offset: number;
  length: number;
  payload: Buffer | null;
  /** The payload came from the buffer pool and goes back to it when the request is done. */
  pooled: boolean;
  /** Payload bytes this request counts against the in-flight limit until it completes. */
  bytes: number;
  /** Payload bytes received so far, while a write's payload arrives into its own buffer. */
  received: number;
}

/** Bytes read from the socket at once into a connection's receive buffer. */
const RECEIVE_BUFFER_BYTES = 64 * 1024;
/** A write payload with at least this much still to come is read straight into its buffer. */
const DIRECT_RECEIVE_MIN = 16 * 1024;
/**
 * Reply bytes queued for the socket past which no new request is parsed, until the queue has
 * drained. Not the socket's own high-water mark (16 KiB): a single 64 KiB reply passes that,
 * and stopping then would take requests in one at a time while large replies go out.
 */
const SEND_QUEUE_BYTES = 4 * 1024 * 1024;

const EMPTY = Buffer.alloc(0);

class RequestRejected extends Error {
  constructor(
    readonly errno: number,
    message: string,
  ) {
    super(message);
  }
}

type ParseState = 'header' | 'payload' | 'discard' | 'closing';

export class TransmissionSession implements UserBufferSink {
  private readonly device: Device;
  private readonly structured: boolean;
  private readonly size: number;
  private readonly minBlock: number;
  private readonly maxPayload: number;
  private readonly flags: number;
  private readonly baseAllocationId: number | undefined;
  /** Selected contexts other than base:allocation, answered by device.contextStatus(). */
  private readonly extraContexts: ReadonlyArray<{ readonly id: number; readonly name: string }>;

  private readonly input = new ByteFifo();
  /**
   * Set when the socket reads into buffers of ours (see user-buffer-socket.ts): everything
   * read lands here first, except large write payloads, which land in their own buffer.
   * Bytes left in `input` that point into it are copied out before the next read.
   */
  private receiveBuffer: Buffer | undefined;
  private state: ParseState = 'header';
  private readonly headerScratch = Buffer.allocUnsafe(REQUEST_HEADER_SIZE);
  /** The WRITE whose payload is being received (state 'payload' or 'discard'). */
  private pending: Request | undefined;
  private discardRemaining = 0;

  private inFlight = 0;
  private inFlightBytes = 0;
  private sendBlocked = false;
  private corked = false;
  private shuttingDown = false;
  private socketClosed = false;
  private ended = false;
  /** The client half-closed: nothing more will arrive, but what did arrive is still served. */
  private eof = false;
  private resolveDone!: () => void;
  readonly done: Promise<void>;

  constructor(
    private socket: Socket,
    private readonly session: Negotiated,
    private readonly ctx: IoContext,
    private readonly limits: TransmissionLimits,
    private readonly logger: Logger,
    private readonly pool: BufferPool,
  ) {
    this.device = session.export.device;
    this.structured = session.structuredReplies;
    this.size = session.info.size;
    this.minBlock = session.info.blockSize.minimum;
    this.maxPayload = session.info.blockSize.maximum;
    this.flags = session.transmissionFlags;
    const extra: Array<{ id: number; name: string }> = [];
    for (const [id, name] of session.metaContexts) {
      if (name === BASE_ALLOCATION) this.baseAllocationId = id;
      else extra.push({ id, name });
    }
    this.extraContexts = extra;
    this.done = new Promise((resolve) => (this.resolveDone = resolve));
  }

  start(): void {
    for (const chunk of this.session.leftover) this.push(chunk);
    this.receiveBuffer = Buffer.allocUnsafeSlow(RECEIVE_BUFFER_BYTES);
    const moved = moveToUserBuffers(this.socket, this);
    if (moved !== undefined) {
      this.socket = moved.socket;
      for (const chunk of moved.leftover) this.push(chunk);
    } else {
      this.receiveBuffer = undefined;
      this.socket.on('data', (chunk: Buffer) => {
        this.push(chunk);
        this.pump();
      });
    }
    // The client half-closed: finish everything it sent, including requests still waiting
    // in the buffer behind the in-flight limits, then close our side (see pump()).
    this.socket.on('end', () => {
      this.eof = true;
      this.pump();
    });
    this.socket.on('close', () => {
      this.socketClosed = true;
      this.state = 'closing';
      this.maybeFinish();
    });
    this.socket.on('drain', () => {
      this.sendBlocked = false;
      this.pump();
    });
    this.pump();
    this.socket.resume();
  }

  /** Server shutdown: refuse new requests with ESHUTDOWN, close once in-flight work is done. */
  shutdown(): void {
    this.shuttingDown = true;
    // Requests already received but not yet parsed are answered ESHUTDOWN (validate() says
    // so), not dropped; the connection closes once nothing is in flight.
    if (this.state !== 'closing') this.pump();
    if (this.inFlight === 0) this.beginClose();
  }

  nextBuffer(): Uint8Array {
    const req = this.pending;
    if (this.state === 'payload' && req!.length - req!.received >= DIRECT_RECEIVE_MIN) {
      return req!.payload!.subarray(req!.received);
    }
    return this.receiveBuffer!;
  }

  received(n: number, buf: Uint8Array): void {
    if (this.state === 'closing') return; // nothing may follow DISC, as in push()
    if (buf === this.receiveBuffer) {
      this.push(this.receiveBuffer.subarray(0, n));
    } else {
      const req = this.pending;
      assert(
        this.state === 'payload' && buf.buffer === req!.payload!.buffer,
        'socket read into a buffer that is not the pending payload',
      );
      req!.received += n;
    }
    this.pump();
    // The receive buffer is read into again next: what is still queued must not point into it.
    this.input.copyOut(this.receiveBuffer!.buffer);
  }

  private push(chunk: Buffer): void {
    if (this.state === 'closing') return; // nothing may follow DISC; ignore it
    this.input.push(chunk);
  }

  private blocked(): boolean {
    return (
      this.sendBlocked ||
      this.inFlight >= this.limits.maxRequests ||
      this.inFlightBytes >= this.limits.maxBytes
    );
  }

  /** Parses as many messages as the limits allow; pauses the socket when it must wait. */
  private pump(): void {
    for (;;) {
      if (this.state === 'header') {
        if (this.blocked() || this.input.length < REQUEST_HEADER_SIZE) break;
        if (!this.parseHeader(this.input.take(REQUEST_HEADER_SIZE, this.headerScratch))) return;
      } else if (this.state === 'payload') {
        const req = this.pending!;
        if (this.receiveBuffer !== undefined) {
          // Payloads never stay in the receive buffer: it is overwritten by the next read.
          req.received += this.input.takeInto(
            req.payload!,
            req.received,
            req.length - req.received,
          );
          if (req.received < req.length) break;
          this.pending = undefined;
          this.state = 'header';
          this.dispatch(req);
          continue;
        }
        if (this.input.length < req.length) break;
        // A payload inside one chunk is used in place; one spread over chunks is gathered
        // into a pooled buffer.
        req.pooled = !this.input.isContiguous(req.length);
        req.payload = this.input.take(
          req.length,
          req.pooled ? this.pool.acquire(req.length) : undefined,
        );
        this.pending = undefined;
        this.state = 'header';
        this.dispatch(req);
      } else if (this.state === 'discard') {
        if (!this.discard()) break;
      } else {
        break;
      }
    }
    if (this.eof && this.state !== 'closing') {
      // After EOF, wait only while complete requests sit behind the limits (serve() pumps
      // again as each one finishes); a partial message left over can never complete.
      const queued =
        this.state === 'header' && this.blocked() && this.input.length >= REQUEST_HEADER_SIZE;
      if (!queued) this.beginClose();
      return;
    }
    // At shutdown only what was already received is answered: stop reading for good.
    if ((this.state === 'header' && this.blocked()) || this.shuttingDown) this.socket.pause();
    else if (!this.socketClosed) this.socket.resume();
  }

  /** Returns false when the stream is unusable and the connection was dropped. */
  private parseHeader(h: Buffer): boolean {
    if (h.readUInt32BE(0) !== REQUEST_MAGIC) {
      this.violation(`bad request magic 0x${h.readUInt32BE(0).toString(16)}`);
      return false;
    }
    const offsetHi = h.readUInt32BE(16);
    const req: Request = {
      flags: h.readUInt16BE(4),
      type: h.readUInt16BE(6),
      cookieHi: h.readUInt32BE(8),
      cookieLo: h.readUInt32BE(12),
      offset: offsetHi < 0x200000 ? offsetHi * 0x1_0000_0000 + h.readUInt32BE(20) : -1,
      length: h.readUInt32BE(24),
      payload: null,
      pooled: false,
      bytes: 0,
      received: 0,
    };
    if (req.type === Cmd.WRITE) {
      if (req.length > this.maxPayload) {
        // Too big to take in: skip its payload without buffering it, then refuse it.
        this.state = 'discard';
        this.discardRemaining = req.length;
        this.pending = req;
      } else if (req.length === 0) {
        req.payload = EMPTY;
        this.dispatch(req);
      } else {
        this.state = 'payload';
        this.pending = req;
        req.bytes = req.length; // counts while it arrives, so limits see it
        this.inFlightBytes += req.bytes;
        if (this.receiveBuffer !== undefined) {
          req.pooled = true;
          req.payload = this.pool.acquire(req.length);
        }
      }
      return true;
    }
    if (req.type === Cmd.DISC) {
      this.beginClose();
      return false;
    }
    this.dispatch(req);
    return true;
  }

  private discard(): boolean {
    const n = Math.min(this.discardRemaining, this.input.length);
    this.input.skip(n);
    this.discardRemaining -= n;
    if (this.discardRemaining > 0) return false;
    const req = this.pending!;
    this.pending = undefined;
    this.state = 'header';
    this.dispatch(req);
    return true;
  }

  private dispatch(req: Request): void {
    this.inFlight++;
    if (req.type === Cmd.READ) {
      req.bytes = req.length;
      this.inFlightBytes += req.bytes;
    }
    void this.serve(req);
  }

  private async serve(req: Request): Promise<void> {
    try {
      this.validate(req);
      const flags = toRequestFlags(req.flags);
      const ctx = this.ctx;
      switch (req.type) {
        case Cmd.READ:
          await this.read(req, flags);
          break;
        case Cmd.WRITE:
          await this.device.write(req.payload!, req.offset, flags, ctx);
          this.replyOk(req);
          break;
        case Cmd.FLUSH:
          await this.device.flush(flags, ctx);
          this.replyOk(req);
          break;
        case Cmd.TRIM:
          await this.device.trim(req.offset, req.length, flags, ctx);
          this.replyOk(req);
          break;
        case Cmd.CACHE:
          await this.device.cache(req.offset, req.length, flags, ctx);
          this.replyOk(req);
          break;
        case Cmd.WRITE_ZEROES:
          await this.device.writeZeroes(req.offset, req.length, flags, ctx);
          this.replyOk(req);
          break;
        case Cmd.BLOCK_STATUS:
          await this.blockStatus(req, flags);
          break;
        default:
          assert(false, `validate() let command ${req.type} through`);
      }
    } catch (err) {
      if (err instanceof RequestRejected) {
        this.replyError(req, err.errno, err.message);
      } else {
        const de = toDeviceError(err);
        this.logger.debug(
          { type: req.type, offset: req.offset, length: req.length, err: de.message },
          'request failed',
        );
        this.replyError(req, NbdErr[de.errno], de.message);
      }
    } finally {
      // Devices and filters do not keep request buffers past completion (docs/filter-api.md).
      if (req.pooled) this.pool.release(req.payload!);
      this.inFlight--;
      this.inFlightBytes -= req.bytes;
      if (this.state !== 'closing') this.pump();
      if (this.state === 'closing' || this.shuttingDown) this.maybeFinish();
    }
  }

  /** Checks a request against the protocol and the export before it reaches the device. */
  private validate(req: Request): void {
    const { type, flags, offset, length } = req;
    if (this.shuttingDown) throw new RequestRejected(NbdErr.ESHUTDOWN, 'server is shutting down');
    if (type > Cmd.BLOCK_STATUS || type === Cmd.DISC) {
      throw new RequestRejected(NbdErr.EINVAL, `unknown command ${type}`);
    }
    if ((flags & ~KNOWN_FLAGS) !== 0) {
      throw new RequestRejected(NbdErr.EINVAL, `unknown command flags 0x${flags.toString(16)}`);
    }
    // FUA is accepted on every command (clients set it on READ); the rest only where it applies.
    if (flags & CmdFlag.NO_HOLE && type !== Cmd.WRITE_ZEROES) {
      throw new RequestRejected(NbdErr.EINVAL, 'NO_HOLE applies to WRITE_ZEROES only');
    }
    if (flags & CmdFlag.DF && (type !== Cmd.READ || !(this.flags & TFlag.SEND_DF))) {
      throw new RequestRejected(NbdErr.EINVAL, 'DF applies to READ with structured replies only');
    }
    if (flags & CmdFlag.REQ_ONE && type !== Cmd.BLOCK_STATUS) {
      throw new RequestRejected(NbdErr.EINVAL, 'REQ_ONE applies to BLOCK_STATUS only');
    }
    if (
      flags & CmdFlag.FAST_ZERO &&
      (type !== Cmd.WRITE_ZEROES || !(this.flags & TFlag.SEND_FAST_ZERO))
    ) {
      throw new RequestRejected(NbdErr.EINVAL, 'FAST_ZERO applies to WRITE_ZEROES only');
    }
    const writes = type === Cmd.WRITE || type === Cmd.TRIM || type === Cmd.WRITE_ZEROES;
    if (writes && this.flags & TFlag.READ_ONLY) {
      throw new RequestRejected(NbdErr.EPERM, 'export is read-only');
    }
    if (type === Cmd.FLUSH) {
      if (!(this.flags & TFlag.SEND_FLUSH))
        throw new RequestRejected(NbdErr.EINVAL, 'FLUSH is not supported');
      if (offset !== 0 || length !== 0) {
        throw new RequestRejected(NbdErr.EINVAL, 'FLUSH must have offset and length 0');
      }
      return;
    }
    if (type === Cmd.TRIM && !(this.flags & TFlag.SEND_TRIM)) {
      throw new RequestRejected(NbdErr.EINVAL, 'TRIM is not supported');
    }
    if (type === Cmd.WRITE_ZEROES && !(this.flags & TFlag.SEND_WRITE_ZEROES)) {
      throw new RequestRejected(NbdErr.EINVAL, 'WRITE_ZEROES is not supported');
    }
    if (offset < 0 || offset > this.size || length > this.size - offset) {
      const errno = type === Cmd.WRITE || type === Cmd.WRITE_ZEROES ? NbdErr.ENOSPC : NbdErr.EINVAL;
      throw new RequestRejected(
        errno,
        `request [${offset < 0 ? '≥2^53' : offset}, +${length}) is beyond the end of the export (${this.size} bytes)`,
      );
    }
    if ((type === Cmd.READ || type === Cmd.WRITE) && length > this.maxPayload) {
      throw new RequestRejected(
        NbdErr.EINVAL,
        `payload of ${length} bytes exceeds the maximum of ${this.maxPayload}`,
      );
    }
    if (this.minBlock > 1 && type !== Cmd.CACHE && type !== Cmd.BLOCK_STATUS) {
      const end = offset + length;
      if (offset % this.minBlock !== 0 || (end % this.minBlock !== 0 && end !== this.size)) {
        throw new RequestRejected(
          NbdErr.EINVAL,
          `request is not aligned to ${this.minBlock} bytes`,
        );
      }
    }
    if (type === Cmd.BLOCK_STATUS) {
      if (this.baseAllocationId === undefined && this.extraContexts.length === 0) {
        throw new RequestRejected(
          NbdErr.EINVAL,
          'BLOCK_STATUS needs a negotiated metadata context',
        );
      }
      if (length === 0) throw new RequestRejected(NbdErr.EINVAL, 'BLOCK_STATUS of zero length');
    }
  }

  private async read(req: Request, flags: number): Promise<void> {
    const { length } = req;
    if (this.structured) {
      if (length === 0) {
        this.send(this.structuredHeader(req, CHUNK_FLAG_DONE, Chunk.NONE, 0));
        return;
      }
      // One buffer for the chunk header, the offset and the data: one write, no copy.
      const head = STRUCTURED_REPLY_HEADER_SIZE + 8;
      const reply = this.pool.acquire(head + length);
      try {
        await this.device.read(reply.subarray(head), req.offset, flags, this.ctx);
      } catch (err) {
        this.pool.release(reply);
        throw err;
      }
      writeStructuredHeader(reply, req, CHUNK_FLAG_DONE, Chunk.OFFSET_DATA, 8 + length);
      reply.writeUInt32BE(Math.floor(req.offset / 0x1_0000_0000), STRUCTURED_REPLY_HEADER_SIZE);
      reply.writeUInt32BE(req.offset >>> 0, STRUCTURED_REPLY_HEADER_SIZE + 4);
      this.sendPooled(reply);
    } else {
      const reply = this.pool.acquire(SIMPLE_REPLY_HEADER_SIZE + length);
      try {
        // All data is read before the header goes out: an error after it could not be told.
        await this.device.read(
          reply.subarray(SIMPLE_REPLY_HEADER_SIZE),
          req.offset,
          flags,
          this.ctx,
        );
      } catch (err) {
        this.pool.release(reply);
        throw err;
      }
      writeSimpleHeader(reply, req, 0);
      this.sendPooled(reply);
    }
  }

  private async blockStatus(req: Request, flags: number): Promise<void> {
    if (this.extraContexts.length > 0) return this.multiBlockStatus(req, flags);
    const extents = await this.device.blockStatus(req.offset, req.length, flags, this.ctx);
    const reqOne = (req.flags & CmdFlag.REQ_ONE) !== 0;
    const descriptors = toDescriptors(extents, req.length, reqOne, this.size - req.offset);
    const payload = 4 + 4 * descriptors.length; // descriptors holds (length, state) pairs
    const reply = Buffer.allocUnsafe(STRUCTURED_REPLY_HEADER_SIZE + payload);
    writeStructuredHeader(reply, req, CHUNK_FLAG_DONE, Chunk.BLOCK_STATUS, payload);
    writeDescriptors(reply, STRUCTURED_REPLY_HEADER_SIZE, this.baseAllocationId!, descriptors);
    this.send(reply);
  }

  /**
   * BLOCK_STATUS with contexts besides base:allocation: one chunk per selected context, the
   * last one flagged DONE, all sent together once every context has answered (so that a
   * failure of any is one error reply, not half an answer). A context that no layer answers
   * any more (its filter was removed after SET) fails the request with EINVAL.
   */
  private async multiBlockStatus(req: Request, flags: number): Promise<void> {
    const { offset, length } = req;
    const ctx = this.ctx;
    const ids: number[] = [];
    const pending: Array<Promise<Extent[]>> = [];
    const masks: number[] = [];
    if (this.baseAllocationId !== undefined) {
      ids.push(this.baseAllocationId);
      pending.push(this.device.blockStatus(offset, length, flags, ctx));
      masks.push(ExtentState.HOLE | ExtentState.ZERO);
    }
    for (const { id, name } of this.extraContexts) {
      ids.push(id);
      pending.push(
        this.device.contextStatus !== undefined
          ? this.device.contextStatus(name, offset, length, flags, ctx)
          : Promise.reject(new RequestRejected(NbdErr.EINVAL, `context ${name} is not served`)),
      );
      masks.push(0xffff_ffff);
    }
    const results = await Promise.all(pending);
    const reqOne = (req.flags & CmdFlag.REQ_ONE) !== 0;
    const chunks: Buffer[] = [];
    for (let i = 0; i < results.length; i++) {
      const descriptors = toDescriptors(results[i]!, length, reqOne, this.size - offset, masks[i]!);
      const payload = 4 + 4 * descriptors.length;
      const chunk = Buffer.allocUnsafe(STRUCTURED_REPLY_HEADER_SIZE + payload);
      const last = i === results.length - 1;
      writeStructuredHeader(chunk, req, last ? CHUNK_FLAG_DONE : 0, Chunk.BLOCK_STATUS, payload);
      writeDescriptors(chunk, STRUCTURED_REPLY_HEADER_SIZE, ids[i]!, descriptors);
      chunks.push(chunk);
    }
    this.send(chunks.length === 1 ? chunks[0]! : Buffer.concat(chunks));
  }

  private replyOk(req: Request): void {
    const reply = Buffer.allocUnsafe(SIMPLE_REPLY_HEADER_SIZE);
    writeSimpleHeader(reply, req, 0);
    this.send(reply);
  }

  private replyError(req: Request, errno: number, message: string): void {
    if (this.structured) {
      // Structured error chunks carry the message; READ errors must be structured anyway.
      const msg = Buffer.from(message, 'utf8').subarray(0, MAX_ERROR_MESSAGE_BYTES);
      const reply = Buffer.allocUnsafe(STRUCTURED_REPLY_HEADER_SIZE + 6 + msg.length);
      writeStructuredHeader(reply, req, CHUNK_FLAG_DONE, Chunk.ERROR, 6 + msg.length);
      reply.writeUInt32BE(errno, STRUCTURED_REPLY_HEADER_SIZE);
      reply.writeUInt16BE(msg.length, STRUCTURED_REPLY_HEADER_SIZE + 4);
      msg.copy(reply, STRUCTURED_REPLY_HEADER_SIZE + 6);
      this.send(reply);
    } else {
      const reply = Buffer.allocUnsafe(SIMPLE_REPLY_HEADER_SIZE);
      writeSimpleHeader(reply, req, errno);
      this.send(reply);
    }
  }

  private structuredHeader(req: Request, flags: number, type: number, length: number): Buffer {
    const buf = Buffer.allocUnsafe(STRUCTURED_REPLY_HEADER_SIZE);
    writeStructuredHeader(buf, req, flags, type, length);
    return buf;
  }

  private send(buf: Buffer, written?: () => void): void {
    if (this.socketClosed || this.socket.destroyed) return;
    // Replies finished in the same turn of the event loop leave in one writev, not one
    // syscall each; the socket is uncorked once the turn's I/O callbacks have run. The reply
    // to the only request in flight has nothing to wait for: it leaves at once, which saves
    // a client at queue depth 1 a few microseconds per request.
    if (!this.corked && this.inFlight > 1) {
      this.corked = true;
      this.socket.cork();
      setImmediate(this.uncork);
    }
    this.socket.write(buf, written);
    if (this.socket.writableLength >= SEND_QUEUE_BYTES) this.sendBlocked = true;
  }

  /** Sends a pooled buffer and returns it to the pool once the socket is done with it. */
  private sendPooled(buf: Buffer): void {
    if (this.socketClosed || this.socket.destroyed) {
      this.pool.release(buf);
      return;
    }
    this.send(buf, () => this.pool.release(buf));
  }

  private readonly uncork = (): void => {
    this.corked = false;
    this.socket.uncork();
  };

  private violation(reason: string): void {
    this.logger.warn({ reason }, 'transmission: client violated the protocol, disconnecting');
    this.state = 'closing';
    this.input.clear();
    this.socket.destroy();
  }

  /** DISC, EOF or shutdown: stop parsing, let every received request finish, then close. */
  private beginClose(): void {
    this.state = 'closing';
    this.input.clear();
    this.maybeFinish();
  }

  private maybeFinish(): void {
    if (this.inFlight > 0) return;
    if (this.shuttingDown && this.state !== 'closing') this.state = 'closing';
    if (this.state !== 'closing') return;
    if (!this.socketClosed && !this.socket.destroyed) {
      // At shutdown an idle client would not notice our half-close until its next request:
      // once every reply is flushed, close outright.
      this.socket.end(() => {
        if (this.shuttingDown) this.socket.destroy();
      });
      // 'close' follows once the client closes its side too; do not wait on it forever.
      setTimeout(() => this.socket.destroy(), CLOSE_GRACE_MS).unref();
      return;
    }
    if (!this.ended) {
      this.ended = true;
      this.resolveDone();
    }
  }
}

function toRequestFlags(wire: number): number {
  let flags = 0;
  if (wire & CmdFlag.FUA) flags |= RequestFlags.FUA;
  if (wire & CmdFlag.NO_HOLE) flags |= RequestFlags.NO_HOLE;
  if (wire & CmdFlag.FAST_ZERO) flags |= RequestFlags.FAST_ZERO;
  if (wire & CmdFlag.REQ_ONE) flags |= RequestFlags.REQ_ONE;
  return flags;
}

/** A BLOCK_STATUS chunk payload: the context id, then (length, state) descriptor pairs. */
function writeDescriptors(buf: Buffer, at: number, contextId: number, descriptors: number[]): void {
  let pos = at;
  buf.writeUInt32BE(contextId, pos);
  pos += 4;
  for (let i = 0; i < descriptors.length; i += 2) {
    buf.writeUInt32BE(descriptors[i]!, pos);
    buf.writeUInt32BE(descriptors[i + 1]!, pos + 4);
    pos += 8;
  }
}

function writeSimpleHeader(buf: Buffer, req: Request, error: number): void {
  buf.writeUInt32BE(SIMPLE_REPLY_MAGIC, 0);
  buf.writeUInt32BE(error, 4);
  buf.writeUInt32BE(req.cookieHi, 8);
  buf.writeUInt32BE(req.cookieLo, 12);
}

function writeStructuredHeader(
  buf: Buffer,
  req: Request,
  flags: number,
  type: number,
  length: number,
): void {
  buf.writeUInt32BE(STRUCTURED_REPLY_MAGIC, 0);
  buf.writeUInt16BE(flags, 4);
  buf.writeUInt16BE(type, 6);
  buf.writeUInt32BE(req.cookieHi, 8);
  buf.writeUInt32BE(req.cookieLo, 12);
  buf.writeUInt32BE(length, 16);
}

/**
 * Turns device extents into block-status descriptors as flat [length, state, ...] pairs:
 * state bits outside `mask` dropped (base:allocation knows HOLE and ZERO only), neighbours
 * with equal state merged, at least one descriptor, covering the request when the device said
 * enough (the last may run past the request, never past the export), and exactly one no
 * longer than the request with REQ_ONE.
 */
export function toDescriptors(
  extents: readonly Extent[],
  length: number,
  reqOne: boolean,
  untilEnd: number,
  mask: number = ExtentState.HOLE | ExtentState.ZERO,
): number[] {
  const out: number[] = [];
  let covered = 0;
  for (const e of extents) {
    if (!(Number.isSafeInteger(e.length) && e.length > 0)) {
      throw new Error(`device returned an extent of length ${e.length}`);
    }
    const state = (e.state & mask) >>> 0;
    const len = Math.min(e.length, untilEnd - covered);
    if (len <= 0) break;
    const n = out.length;
    if (n > 0 && out[n - 1] === state && out[n - 2]! + len <= MAX_DESCRIPTOR_LENGTH) {
      out[n - 2]! += len;
    } else {
      if (n / 2 >= MAX_DESCRIPTORS) break;
      if (len > MAX_DESCRIPTOR_LENGTH) {
        // Cut short: what follows this extent could no longer be placed; stop here.
        out.push(MAX_DESCRIPTOR_LENGTH, state);
        break;
      }
      out.push(len, state);
    }
    covered += len;
    if (covered >= length || reqOne) break;
  }
  if (out.length === 0) throw new Error('device returned no extents');
  if (reqOne) {
    out.length = 2;
    out[0] = Math.min(out[0]!, length);
  }
  return out;
}
