/**
 * A sparse device in memory: the reference backend for tests and demos. Pages are allocated on
 * first write and freed by trim and writeZeroes, so memory use follows what was written, and it
 * never exceeds the device size (the last page is cut to the device end).
 */
import {
  DEFAULT_BLOCK_SIZE,
  ExtentState,
  RequestFlags,
  type Device,
  type DeviceInfo,
  type Extent,
} from '../core/device.js';
import {
  checkRange,
  checkStatusRange,
  checkWriteRange,
  closedError,
  readOnlyError,
} from './checks.js';

export interface MemoryBackendOptions {
  /** Device size in bytes; 0 is allowed (an empty device). */
  size: number;
  /** Allocation unit, a power of two; 64 KiB by default. */
  pageSize?: number;
  readOnly?: boolean;
}

export const DEFAULT_PAGE_SIZE = 64 * 1024;

/** blockStatus stops after this many extents, or after scanning this many pages. */
const MAX_EXTENTS = 1024;
const MAX_SCAN_PAGES = 1 << 16;

const HOLE_ZERO = ExtentState.HOLE | ExtentState.ZERO;

export class MemoryBackend implements Device {
  readonly #size: number;
  readonly #pageSize: number;
  readonly #pages = new Map<number, Buffer>();
  readonly #info: DeviceInfo;
  #closed = false;

  constructor(options: MemoryBackendOptions) {
    const { size, pageSize = DEFAULT_PAGE_SIZE, readOnly = false } = options;
    if (!Number.isSafeInteger(size) || size < 0) {
      throw new RangeError(`memory device size must be a safe integer >= 0, got ${size}`);
    }
    if (!Number.isSafeInteger(pageSize) || pageSize < 1 || pageSize > 2 ** 30) {
      throw new RangeError(`memory page size must be between 1 and 1 GiB, got ${pageSize}`);
    }
    if ((pageSize & (pageSize - 1)) !== 0) {
      throw new RangeError(`memory page size must be a power of two, got ${pageSize}`);
    }
    this.#size = size;
    this.#pageSize = pageSize;
    // One frozen object for the device's life: info() is sampled per connection and must be
    // cheap, and nobody may change our limits behind our back.
    this.#info = Object.freeze({
      size,
      blockSize: Object.freeze({ ...DEFAULT_BLOCK_SIZE }),
      caps: Object.freeze({
        readOnly,
        flush: true,
        fua: true,
        trim: true,
        zero: true,
        fastZero: true,
        cache: true,
        multiConn: true,
        rotational: false,
      }),
    });
  }

  info(): DeviceInfo {
    return this.#info;
  }

  /** Bytes held by allocated pages; for tests and metrics. */
  allocatedBytes(): number {
    let total = 0;
    for (const page of this.#pages.values()) total += page.length;
    return total;
  }

  async read(buf: Buffer, offset: number, _flags: number): Promise<void> {
    this.#checkOpen('read');
    checkRange('read', offset, buf.length, this.#size);
    this.#eachPage(offset, buf.length, (index, start, length, pos) => {
      const page = this.#pages.get(index);
      if (page) page.copy(buf, pos, start, start + length);
      else buf.fill(0, pos, pos + length);
    });
  }

  async write(data: Buffer, offset: number, _flags: number): Promise<void> {
    this.#checkWritable('write');
    checkWriteRange('write', offset, data.length, this.#size);
    this.#eachPage(offset, data.length, (index, start, length, pos) => {
      let page = this.#pages.get(index);
      if (!page) {
        const pageLength = this.#pageLength(index);
        // A page written whole needs no zeroing first. allocUnsafeSlow, not allocUnsafe: a
        // small page must not pin a slab of Node's shared pool.
        page =
          length === pageLength ? Buffer.allocUnsafeSlow(pageLength) : Buffer.alloc(pageLength);
        this.#pages.set(index, page);
      }
      data.copy(page, start, pos, pos + length);
    });
  }

  async flush(_flags: number): Promise<void> {
    this.#checkOpen('flush');
  }

  async trim(offset: number, length: number, _flags: number): Promise<void> {
    this.#checkWritable('trim');
    checkRange('trim', offset, length, this.#size);
    this.#zero(offset, length, false);
  }

  async writeZeroes(offset: number, length: number, flags: number): Promise<void> {
    this.#checkWritable('writeZeroes');
    checkWriteRange('writeZeroes', offset, length, this.#size);
    // FAST_ZERO needs no check: zeroing memory is never slower than writing zeros.
    this.#zero(offset, length, (flags & RequestFlags.NO_HOLE) !== 0);
  }

  async cache(offset: number, length: number, _flags: number): Promise<void> {
    this.#checkOpen('cache');
    checkRange('cache', offset, length, this.#size);
  }

  async blockStatus(offset: number, length: number, flags: number): Promise<Extent[]> {
    this.#checkOpen('blockStatus');
    checkStatusRange(offset, length, this.#size);
    const one = (flags & RequestFlags.REQ_ONE) !== 0;
    const end = offset + length;
    const extents: Extent[] = [];
    let last: Extent | undefined;
    let pos = offset;
    for (let scanned = 0; pos < end && scanned < MAX_SCAN_PAGES; scanned++) {
      const index = Math.floor(pos / this.#pageSize);
      const pageEnd = Math.min((index + 1) * this.#pageSize, this.#size);
      const state = this.#pages.has(index) ? 0 : HOLE_ZERO;
      if (last?.state === state) {
        last.length += pageEnd - pos;
      } else {
        if (last && (one || extents.length === MAX_EXTENTS)) break;
        last = { length: pageEnd - pos, state };
        extents.push(last);
      }
      pos = pageEnd;
    }
    // NBD forbids a REQ_ONE reply from reaching past the request (qemu rejects it).
    if (one && last && last.length > length) last.length = length;
    return extents;
  }

  async close(): Promise<void> {
    this.#closed = true;
    this.#pages.clear();
  }

  /** Zeros a range: whole pages are freed (or, keeping allocation, zeroed), edges cleared. */
  #zero(offset: number, length: number, keepAllocated: boolean): void {
    this.#eachPage(offset, length, (index, start, chunk) => {
      const page = this.#pages.get(index);
      const whole = chunk === this.#pageLength(index);
      if (page) {
        if (whole && !keepAllocated) this.#pages.delete(index);
        else page.fill(0, start, start + chunk);
      } else if (keepAllocated) {
        this.#pages.set(index, Buffer.alloc(this.#pageLength(index)));
      }
    });
  }

  /** Calls `fn` for each page piece of [offset, offset + length), in order. */
  #eachPage(
    offset: number,
    length: number,
    fn: (index: number, start: number, length: number, pos: number) => void,
  ): void {
    let pos = 0;
    while (pos < length) {
      const at = offset + pos;
      const index = Math.floor(at / this.#pageSize);
      const start = at - index * this.#pageSize;
      const chunk = Math.min(this.#pageSize - start, length - pos);
      fn(index, start, chunk, pos);
      pos += chunk;
    }
  }

  #pageLength(index: number): number {
    return Math.min(this.#pageSize, this.#size - index * this.#pageSize);
  }

  #checkOpen(op: string): void {
    if (this.#closed) throw closedError(op);
  }

  #checkWritable(op: string): void {
    this.#checkOpen(op);
    if (this.#info.caps.readOnly) throw readOnlyError(op);
  }
}
