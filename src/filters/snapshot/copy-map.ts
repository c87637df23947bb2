/**
 * Which old chunk contents the store holds, in memory, in typed arrays (no object per chunk
 * or per copy):
 * - per chunk, `lastWriteGen[c]`: the newest snapshot generation the chunk has been preserved
 *   for (0: not since the oldest snapshot). A write to c needs a copy while it is below the
 *   newest live generation. 4 bytes per origin chunk: 64 KiB per GiB at 64 KiB chunks;
 * - per copied chunk, the head of a short linked list of its copies, in a hash table (only
 *   chunks that have copies take room); each copy serves the snapshots with generation in
 *   (low, high] and holds a slot of diff.data (or none: the chunk was zeros). About 20 bytes
 *   per copy plus 16-32 bytes per copied chunk.
 *
 * A chunk's copies serve disjoint generation ranges, each holding a live snapshot, so a list
 * is never longer than the number of live snapshots (at most MAX_SNAPSHOTS).
 */
import { assert } from '../../core/errors.js';
import { MAX_SNAPSHOTS, NO_SLOT } from './format.js';

const NONE = -1;
const EMPTY = 0xffffffff;

/** chunk → first copy id: open addressing with linear probing, at most half full. */
class ChunkHeads {
  private keys = new Uint32Array(1024).fill(EMPTY);
  private vals = new Int32Array(1024);
  private count = 0;

  get size(): number {
    return this.count;
  }

  get bytes(): number {
    return this.keys.byteLength + this.vals.byteLength;
  }

  get(c: number): number {
    const mask = this.keys.length - 1;
    for (let i = hash(c) & mask; ; i = (i + 1) & mask) {
      const k = this.keys[i]!;
      if (k === c) return this.vals[i]!;
      if (k === EMPTY) return NONE;
    }
  }

  set(c: number, id: number): void {
    assert(id >= 0, 'a chunk head must name a copy');
    if ((this.count + 1) * 2 > this.keys.length) this.rehash(this.keys.length * 2);
    const mask = this.keys.length - 1;
    for (let i = hash(c) & mask; ; i = (i + 1) & mask) {
      const k = this.keys[i]!;
      if (k === c) {
        this.vals[i] = id;
        return;
      }
      if (k === EMPTY) {
        this.keys[i] = c;
        this.vals[i] = id;
        this.count++;
        return;
      }
    }
  }

  delete(c: number): void {
    const mask = this.keys.length - 1;
    let i = hash(c) & mask;
    while (this.keys[i] !== c) {
      if (this.keys[i] === EMPTY) return;
      i = (i + 1) & mask;
    }
    this.keys[i] = EMPTY;
    this.count--;
    // Backward shift: move later entries of the probe run into the hole where they may go.
    for (let j = (i + 1) & mask; this.keys[j] !== EMPTY; j = (j + 1) & mask) {
      const home = hash(this.keys[j]!) & mask;
      const stays = i <= j ? i < home && home <= j : i < home || home <= j;
      if (stays) continue;
      this.keys[i] = this.keys[j]!;
      this.vals[i] = this.vals[j]!;
      this.keys[j] = EMPTY;
      i = j;
    }
  }

  /** The chunks present, in no particular order (a copy: callers may change the table). */
  chunks(): Uint32Array {
    const out = new Uint32Array(this.count);
    let n = 0;
    for (const k of this.keys) if (k !== EMPTY) out[n++] = k;
    return out;
  }

  private rehash(capacity: number): void {
    const { keys, vals } = this;
    this.keys = new Uint32Array(capacity).fill(EMPTY);
    this.vals = new Int32Array(capacity);
    this.count = 0;
    for (let i = 0; i < keys.length; i++) if (keys[i] !== EMPTY) this.set(keys[i]!, vals[i]!);
  }
}

function hash(c: number): number {
  return Math.imul(c, 0x9e3779b1) >>> 7;
}

export class CopyMap {
  readonly chunkCount: number;
  readonly lastWriteGen: Uint32Array;
  private readonly heads = new ChunkHeads();
  // Copies, indexed by copy id; ids are recycled through `freeIds`.
  private cChunk = new Uint32Array(1024);
  private cSlot = new Uint32Array(1024);
  private cLow = new Uint32Array(1024);
  private cHigh = new Uint32Array(1024);
  private cNext = new Int32Array(1024);
  private used = 0; // ids handed out so far (the high-water mark)
  private freeIds: number[] = [];
  private live = 0;

  constructor(chunkCount: number) {
    assert(
      Number.isSafeInteger(chunkCount) && chunkCount >= 0 && chunkCount <= 0x7fffffff,
      'chunk count out of range',
    );
    this.chunkCount = chunkCount;
    this.lastWriteGen = new Uint32Array(chunkCount);
  }

  /** Copies held (including zero copies, which hold no slot). */
  get size(): number {
    return this.live;
  }

  /** Records that chunk `c`'s content, as it was, serves generations (low, high]. */
  add(c: number, slot: number, low: number, high: number): number {
    assert(c >= 0 && c < this.chunkCount, 'copy of a chunk outside the origin');
    assert(low < high, 'copy serves an empty generation range');
    let length = 0;
    const head = this.heads.get(c);
    for (let i = head; i !== NONE; i = this.cNext[i]!) {
      assert(
        this.cHigh[i]! <= low || this.cLow[i]! >= high,
        'copies of one chunk serve overlapping generations',
      );
      length++;
    }
    assert(length < MAX_SNAPSHOTS, 'more copies of one chunk than live snapshots');
    const id = this.freeIds.pop() ?? this.grow();
    this.cChunk[id] = c;
    this.cSlot[id] = slot;
    this.cLow[id] = low;
    this.cHigh[id] = high;
    this.cNext[id] = head;
    this.heads.set(c, id);
    if (this.lastWriteGen[c]! < high) this.lastWriteGen[c] = high;
    this.live++;
    return id;
  }

  /** The copy of chunk `c` that serves generation `gen`: its slot, NO_SLOT (zeros), or -1 (none). */
  find(c: number, gen: number): number {
    // Copies serve generations up to lastWriteGen at most: most chunks answer here.
    if (this.lastWriteGen[c]! < gen) return -1;
    for (let i = this.heads.get(c); i !== NONE; i = this.cNext[i]!) {
      if (this.cLow[i]! < gen && gen <= this.cHigh[i]!) return this.cSlot[i]!;
    }
    return -1;
  }

  /**
   * Drops every copy for which `keep(low, high)` is false; calls `freed(slot)` for each slot
   * that becomes free. Returns how many copies went.
   */
  prune(keep: (low: number, high: number) => boolean, freed: (slot: number) => void): number {
    let dropped = 0;
    for (const c of this.heads.chunks()) {
      let head = this.heads.get(c);
      let prev = NONE;
      for (let i = head; i !== NONE;) {
        const next = this.cNext[i]!;
        if (keep(this.cLow[i]!, this.cHigh[i]!)) {
          prev = i;
        } else {
          if (prev === NONE) head = next;
          else this.cNext[prev] = next;
          if (this.cSlot[i]! !== NO_SLOT) freed(this.cSlot[i]!);
          this.freeIds.push(i);
          this.live--;
          dropped++;
        }
        i = next;
      }
      if (head === NONE) this.heads.delete(c);
      else this.heads.set(c, head);
    }
    return dropped;
  }

  /** Calls `fn` for every copy: chunk, slot (or NO_SLOT), low, high; chunks in no particular order. */
  forEach(fn: (c: number, slot: number, low: number, high: number) => void): void {
    for (const c of this.heads.chunks()) {
      for (let i = this.heads.get(c); i !== NONE; i = this.cNext[i]!)
        fn(c, this.cSlot[i]!, this.cLow[i]!, this.cHigh[i]!);
    }
  }

  /** Bytes of memory the map holds. */
  get memoryBytes(): number {
    return (
      this.lastWriteGen.byteLength +
      this.heads.bytes +
      this.cChunk.length * 20 +
      this.freeIds.length * 8
    );
  }

  /** Chunks that have at least one copy. */
  get chunksWithCopies(): number {
    return this.heads.size;
  }

  private grow(): number {
    if (this.used === this.cChunk.length) {
      const n = this.cChunk.length * 2;
      assert(n <= 0x7fffffff, 'copy table outgrew its index');
      this.cChunk = resize(this.cChunk, n);
      this.cSlot = resize(this.cSlot, n);
      this.cLow = resize(this.cLow, n);
      this.cHigh = resize(this.cHigh, n);
      this.cNext = resize(this.cNext, n);
    }
    return this.used++;
  }
}

function resize<T extends Uint32Array | Int32Array>(a: T, n: number): T {
  const b = new (a.constructor as new (n: number) => T)(n);
  b.set(a);
  return b;
}

/**
 * Slots of diff.data: a stack of free slots below the high-water mark, and the high-water mark
 * itself (slots above it were never used). Bounded by the store's slot limit.
 */
export class SlotPool {
  private free = new Uint32Array(256);
  private freeCount = 0;
  /** Slots [0, highWater) have been used at some time. */
  highWater = 0;
  inUse = 0;

  constructor(readonly maxSlots: number) {}

  /** Marks the slots in `used` taken, the others below the highest of them free. */
  static fromUsed(used: Iterable<number>, maxSlots: number): SlotPool {
    const pool = new SlotPool(maxSlots);
    const taken = new Set(used);
    let high = 0;
    for (const s of taken) high = Math.max(high, s + 1);
    pool.highWater = high;
    pool.inUse = taken.size;
    for (let s = high - 1; s >= 0; s--) if (!taken.has(s)) pool.push(s);
    return pool;
  }

  /** A free slot, or -1 when the limit is reached. */
  take(): number {
    if (this.freeCount > 0) {
      this.inUse++;
      return this.free[--this.freeCount]!;
    }
    if (this.highWater >= this.maxSlots) return -1;
    this.inUse++;
    return this.highWater++;
  }

  release(slot: number): void {
    assert(slot >= 0 && slot < this.highWater, 'released a slot that was never handed out');
    assert(this.inUse > 0, 'released more slots than were taken');
    this.inUse--;
    this.push(slot);
  }

  get freeSlots(): number {
    return this.freeCount;
  }

  private push(slot: number): void {
    if (this.freeCount === this.free.length) this.free = resize(this.free, this.free.length * 2);
    this.free[this.freeCount++] = slot;
  }
}
