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
  /**
   * Memory this pool allocated: only that may come back. A buffer from Node's slab shares
   * its memory with unrelated buffers, and handing it out again would corrupt them.
   */
  private readonly owned = new WeakSet<ArrayBufferLike>();

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
    if (backing !== undefined) {
      this.freeBytes -= cls;
      return backing.subarray(0, size);
    }
    const fresh = Buffer.allocUnsafeSlow(cls);
    this.owned.add(fresh.buffer);
    return fresh.subarray(0, size);
  }

  /** Returns a buffer from acquire(); buffers the pool did not allocate are left to the GC. */
  release(buf: Buffer): void {
    if (!this.owned.has(buf.buffer)) return;
    const cls = buf.buffer.byteLength;
    if (this.freeBytes + cls > this.maxFreeBytes) return;
    let list = this.free.get(cls);
    if (list === undefined) this.free.set(cls, (list = []));
    assert(!list.some((b) => b.buffer === buf.buffer), 'buffer released twice');
    list.push(Buffer.from(buf.buffer, 0, cls));
    this.freeBytes += cls;
  }
}
