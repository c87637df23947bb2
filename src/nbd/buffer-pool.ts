/**
 * Reusable buffers for large payloads (read replies, write payloads that arrive in pieces).
 * Allocating a fresh megabyte-sized ArrayBuffer per request makes V8 collect garbage for the
 * external memory over and over; reusing them keeps large sequential I/O out of the GC.
 * Small buffers come from Node's own slab allocator and are not pooled.
 *
 * Sizes are rounded up to a multiple of 64 KiB (a 1 MiB read reply with its header takes
 * 1 MiB + 64 KiB, not 2 MiB). Bounded: at most `maxFreeBytes` are kept free in all.
 */
import { assert } from '../core/errors.js';

const GRANULE = 64 * 1024;

export class BufferPool {
  private readonly free = new Map<number, Buffer[]>();
  private freeBytes = 0;

  constructor(
    /** Larger requests get a fresh buffer. */
    private readonly maxPooled: number,
    private readonly maxFreeBytes: number,
  ) {}

  /** A buffer of exactly `size` bytes; call release() with it once nothing refers to it. */
  acquire(size: number): Buffer {
    if (size < GRANULE || size > this.maxPooled) return Buffer.allocUnsafe(size);
    const cls = Math.ceil(size / GRANULE) * GRANULE;
    const backing = this.free.get(cls)?.pop();
    if (backing === undefined) return Buffer.allocUnsafeSlow(cls).subarray(0, size);
    this.freeBytes -= cls;
    return backing.subarray(0, size);
  }

  /** Returns a buffer from acquire(); buffers that were not pooled are left to the GC. */
  release(buf: Buffer): void {
    const cls = buf.buffer.byteLength;
    if (cls < GRANULE || cls % GRANULE !== 0 || cls > this.maxPooled + GRANULE || buf.byteOffset !== 0) return;
    if (this.freeBytes + cls > this.maxFreeBytes) return;
    let list = this.free.get(cls);
    if (list === undefined) this.free.set(cls, (list = []));
    assert(!list.some((b) => b.buffer === buf.buffer), 'buffer released twice');
    list.push(Buffer.from(buf.buffer, 0, cls));
    this.freeBytes += cls;
  }
}
