/**
 * One bit per chunk, with a running count of set bits: the mirror's dirty map ("this chunk
 * must be copied to the target") and its record of chunks ever written on a fresh target.
 * Memory: ceil(chunks / 8) bytes — 128 KiB per TiB at 1 MiB chunks.
 */
export class ChunkBitmap {
  private readonly bits: Uint8Array;
  private set_ = 0;

  constructor(
    readonly chunks: number,
    fill = false,
  ) {
    this.bits = new Uint8Array(Math.ceil(chunks / 8));
    if (fill) this.fill();
  }

  get count(): number {
    return this.set_;
  }

  get(i: number): boolean {
    return (this.bits[i >> 3]! & (1 << (i & 7))) !== 0;
  }

  /** Sets bit `i`; returns true if it was clear. */
  set(i: number): boolean {
    const mask = 1 << (i & 7);
    const byte = this.bits[i >> 3]!;
    if ((byte & mask) !== 0) return false;
    this.bits[i >> 3] = byte | mask;
    this.set_++;
    return true;
  }

  /** Clears bit `i`; returns true if it was set. */
  clear(i: number): boolean {
    const mask = 1 << (i & 7);
    const byte = this.bits[i >> 3]!;
    if ((byte & mask) === 0) return false;
    this.bits[i >> 3] = byte & ~mask;
    this.set_--;
    return true;
  }

  setRange(first: number, last: number): void {
    for (let i = first; i <= last; i++) this.set(i);
  }

  fill(): void {
    this.bits.fill(0xff);
    const tail = this.chunks & 7;
    if (tail !== 0) this.bits[this.bits.length - 1] = (1 << tail) - 1;
    this.set_ = this.chunks;
  }

  /** The first set bit at or after `from`, or -1. Skips clear bytes whole. */
  nextSet(from: number): number {
    for (let i = from; i < this.chunks;) {
      if ((i & 7) === 0 && this.bits[i >> 3] === 0) {
        i += 8;
        continue;
      }
      if (this.get(i)) return i;
      i++;
    }
    return -1;
  }

  toBuffer(): Buffer {
    return Buffer.from(this.bits);
  }

  static fromBuffer(chunks: number, data: Uint8Array): ChunkBitmap {
    const b = new ChunkBitmap(chunks);
    if (data.length !== b.bits.length)
      throw new Error(`bitmap of ${data.length} bytes, expected ${b.bits.length}`);
    b.bits.set(data);
    const tail = chunks & 7;
    if (tail !== 0) b.bits[b.bits.length - 1]! &= (1 << tail) - 1;
    let n = 0;
    for (const byte of b.bits) {
      let x = byte;
      while (x !== 0) {
        x &= x - 1;
        n++;
      }
    }
    b.set_ = n;
    return b;
  }
}
