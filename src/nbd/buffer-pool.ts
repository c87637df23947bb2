/**
 * Reusable buffers for payloads: read replies and write payloads. Allocating a fresh
 * ArrayBuffer per request makes V8 collect garbage for the external memory over and over;
 * reusing them keeps both the 4 KiB and the 1 MiB rows out of the GC.
 *
 * Sizes are rounded up to a size class: multiples of 512 bytes below 64 KiB (a 4 KiB read
 * reply with its header takes 4.5 KiB), of 64 KiB above (1 MiB + header takes 1 MiB + 64 KiB,
 * not 2 MiB). Buffers under 4 KiB come from Node's own slab allocator, which is cheap for
 * them, and are not pooled. Bounded: at most `maxFreeBytes` are kept free in all.
 */
import { assert } from '../core/errors.js';

/** Below this Node's slab allocator serves allocUnsafe() cheaply. */
const MIN_POOLED = 4096;
const SMALL_GRANULE = 512;
const LARGE_GRANULE = 64 * 1024;

function sizeClass(size: number): number {
  const granule = size < LARGE_GRANULE ? SMALL_GRANULE : LARGE_GRANULE;
  return Math.ceil(size / granule) * granule;
}

export class BufferPool {
  private readonly free = new Map<number, ArrayBuffer[]>();
  private freeBytes = 0;
  /**
   * Memory this pool allocated: only that may come back. A buffer from Node's slab shares
   * its memory with unrelated buffers, and handing it out again would corrupt them.
   */
  private readonly owned = new WeakSet<ArrayBufferLike>();
  /** Memory now on a free list: releasing it again is a bug that would hand it out twice. */
  private readonly idle = new WeakSet<ArrayBufferLike>();

  constructor(
    /** Larger requests get a fresh buffer. */
    private readonly maxPooled: number,
    private readonly maxFreeBytes: number,
  ) {}

  /** A buffer of exactly `size` bytes; call release() with it once nothing refers to it. */
  acquire(size: number): Buffer {
    if (size < MIN_POOLED || size > this.maxPooled) return Buffer.allocUnsafe(size);
    const cls = sizeClass(size);
    const backing = this.free.get(cls)?.pop();
    if (backing !== undefined) {
      this.freeBytes -= cls;
      this.idle.delete(backing);
      return Buffer.from(backing, 0, size);
    }
    const fresh = Buffer.allocUnsafeSlow(cls);
    this.owned.add(fresh.buffer);
    return fresh.subarray(0, size);
  }

  /** Returns a buffer from acquire(); buffers the pool did not allocate are left to the GC. */
  release(buf: Buffer): void {
    const backing = buf.buffer;
    if (!this.owned.has(backing)) return;
    assert(!this.idle.has(backing), 'buffer released twice');
    const cls = backing.byteLength;
    if (this.freeBytes + cls > this.maxFreeBytes) return;
    let list = this.free.get(cls);
    if (list === undefined) this.free.set(cls, (list = []));
    list.push(backing as ArrayBuffer);
    this.idle.add(backing);
    this.freeBytes += cls;
  }
}
