/**
 * A FIFO of received bytes, shared by the server and client parsers. Socket 'data' events split
 * and merge messages arbitrarily, so the parsers push whatever arrives and take exactly what
 * the protocol says comes next. Taking bytes that lie inside one received buffer is zero-copy
 * (a view into it).
 */
export class ByteFifo {
  private readonly bufs: Buffer[] = [];
  /** Bytes of bufs[0] already consumed. */
  private head = 0;
  private total = 0;

  get length(): number {
    return this.total;
  }

  push(buf: Buffer): void {
    if (buf.length === 0) return;
    this.bufs.push(buf);
    this.total += buf.length;
  }

  /** The first `n` bytes without consuming them. Caller guarantees `n <= length`. */
  peek(n: number): Buffer {
    const first = this.bufs[0];
    if (first !== undefined && first.length - this.head >= n) {
      return first.subarray(this.head, this.head + n);
    }
    const out = Buffer.allocUnsafe(n);
    let copied = 0;
    let offset = this.head;
    for (const buf of this.bufs) {
      if (copied === n) break;
      copied += buf.copy(out, copied, offset, Math.min(buf.length, offset + n - copied));
      offset = 0;
    }
    return out;
  }

  /** Whether the next `n` bytes lie in one received buffer (take() is then a view). */
  isContiguous(n: number): boolean {
    const first = this.bufs[0];
    return first !== undefined && first.length - this.head >= n;
  }

  /**
   * Consumes and returns exactly `n` bytes: a view when they lie in one received buffer, else
   * a copy into `into` (at least `n` long) or a new buffer. Caller guarantees `n <= length`.
   */
  take(n: number, into?: Buffer): Buffer {
    if (this.isContiguous(n)) {
      const out = this.bufs[0]!.subarray(this.head, this.head + n);
      this.skip(n);
      return out;
    }
    const out = into === undefined ? Buffer.allocUnsafe(n) : into.subarray(0, n);
    this.takeInto(out, 0, n);
    return out;
  }

  /**
   * Moves up to `n` bytes into `dest` at `destOffset` and returns how many were moved. Lets a
   * large payload land in its final buffer piece by piece, without an intermediate copy.
   */
  takeInto(dest: Buffer, destOffset: number, n: number): number {
    let moved = 0;
    while (moved < n && this.bufs.length > 0) {
      const buf = this.bufs[0]!;
      const count = Math.min(n - moved, buf.length - this.head);
      buf.copy(dest, destOffset + moved, this.head, this.head + count);
      moved += count;
      this.skip(count);
    }
    return moved;
  }

  /**
   * Replaces the queued bytes that lie in `backing` with copies of them, so that `backing` may
   * be overwritten; the rest stays as it is.
   */
  copyOut(backing: ArrayBufferLike): void {
    for (let i = 0; i < this.bufs.length; i++) {
      const buf = this.bufs[i]!;
      if (buf.buffer !== backing) continue;
      const from = i === 0 ? this.head : 0;
      this.bufs[i] = Buffer.from(buf.subarray(from));
      if (i === 0) this.head = 0;
    }
  }

  /** Consumes everything left. */
  takeAll(): Buffer {
    return this.take(this.total);
  }

  /** Forgets everything left. */
  clear(): void {
    this.bufs.length = 0;
    this.head = 0;
    this.total = 0;
  }

  /** Drops `n` bytes (caller guarantees `n <= length`). */
  skip(n: number): void {
    this.total -= n;
    this.head += n;
    while (this.bufs.length > 0 && this.head >= this.bufs[0]!.length) {
      this.head -= this.bufs[0]!.length;
      this.bufs.shift();
    }
  }
}
