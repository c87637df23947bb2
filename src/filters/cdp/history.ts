/**
 * The cdp filter's in-memory index of its journal: one row per change record (columns in
 * typed arrays, so a million changes cost tens of MiB, not hundreds) and, per chunk of
 * `chunkBlocks` blocks, the sequence numbers of the changes that touched the chunk. The
 * content of block b as of point T is the undo data of the first change after T that touched
 * b — or, when none did, the device's current content: found by walking the chunk's list from
 * the first change after T to the first that covers b. Indexing chunks rather than blocks
 * bounds the map (a trim of a whole large device is one entry per chunk, and the filter sizes
 * chunks so that a device has at most 4M of them). Rows and lists grow at the new end and are
 * dropped at the old end (retention), never in the middle.
 */
import { assert } from '../../core/errors.js';

export interface ChangeRow {
  seq: number;
  timeMs: number;
  blockStart: number;
  blockCount: number;
  /** RecordType.UNDO_DATA or UNDO_ZERO. */
  type: number;
  op: number;
  segmentNo: number;
  /** Byte position of the payload (the undo data) in its segment file. */
  payloadPos: number;
}

const INITIAL_ROWS = 1024;

interface SeqList {
  seqs: number[];
  head: number;
}

export class ChangeLog {
  /** Sequence number of row 0 of the arrays; rows before `head` are dropped. */
  private base = 1;
  private head = 0;
  private tail = 0;
  private time = new Float64Array(INITIAL_ROWS);
  private start = new Float64Array(INITIAL_ROWS);
  private pos = new Float64Array(INITIAL_ROWS);
  private count = new Uint32Array(INITIAL_ROWS);
  private segment = new Uint32Array(INITIAL_ROWS);
  private kind = new Uint8Array(INITIAL_ROWS);
  /**
   * Per chunk, the seqs of the changes that touched it, ascending: a bare number while there
   * is one, else a list whose first `head` elements are dropped (a deque, compacted lazily).
   */
  private readonly byChunk = new Map<number, number | SeqList>();
  private entries = 0;

  constructor(readonly chunkBlocks = 1) {
    assert(Number.isSafeInteger(chunkBlocks) && chunkBlocks >= 1, 'chunkBlocks');
  }

  /** Index entries a change of blocks [start, start + count) costs. */
  static entriesOf(blockStart: number, blockCount: number, chunkBlocks: number): number {
    return (
      Math.floor((blockStart + blockCount - 1) / chunkBlocks) -
      Math.floor(blockStart / chunkBlocks) +
      1
    );
  }

  /** Sequence number of the oldest row kept (equals `nextSeq` when there is none). */
  get firstSeq(): number {
    return this.base + this.head;
  }

  get nextSeq(): number {
    return this.base + this.tail;
  }

  get rows(): number {
    return this.tail - this.head;
  }

  /** Chunk-list entries held: the index's size. */
  get blockEntries(): number {
    return this.entries;
  }

  get touchedChunks(): number {
    return this.byChunk.size;
  }

  /** Starts an empty log whose next change is `seq` (a new or fully expired history). */
  resetTo(seq: number): void {
    assert(this.rows === 0, 'change log reset while it holds rows');
    this.base = seq;
    this.head = 0;
    this.tail = 0;
  }

  append(r: ChangeRow): void {
    assert(r.seq === this.nextSeq, `change ${r.seq} appended where ${this.nextSeq} was due`);
    assert(r.blockCount > 0, 'change of no blocks');
    if (this.tail === this.time.length) this.grow();
    const i = this.tail++;
    this.time[i] = r.timeMs;
    this.start[i] = r.blockStart;
    this.pos[i] = r.payloadPos;
    this.count[i] = r.blockCount;
    this.segment[i] = r.segmentNo;
    this.kind[i] = (r.op << 4) | r.type;
    const C = this.chunkBlocks;
    const last = Math.floor((r.blockStart + r.blockCount - 1) / C);
    for (let c = Math.floor(r.blockStart / C); c <= last; c++) {
      const list = this.byChunk.get(c);
      if (list === undefined) this.byChunk.set(c, r.seq);
      else if (typeof list === 'number') this.byChunk.set(c, { seqs: [list, r.seq], head: 0 });
      else list.seqs.push(r.seq);
      this.entries++;
    }
  }

  /** Drops the oldest row; its seq must be `firstSeq`. */
  dropOldest(): void {
    assert(this.rows > 0, 'dropping from an empty change log');
    const i = this.head;
    const seq = this.base + i;
    const C = this.chunkBlocks;
    const from = this.start[i]!;
    const last = Math.floor((from + this.count[i]! - 1) / C);
    for (let c = Math.floor(from / C); c <= last; c++) {
      const list = this.byChunk.get(c);
      this.entries--;
      if (typeof list === 'number') {
        assert(list === seq, `chunk ${c} does not start with change ${seq}`);
        this.byChunk.delete(c);
        continue;
      }
      assert(
        list !== undefined && list.seqs[list.head] === seq,
        `chunk ${c} does not start with change ${seq}`,
      );
      list.head++;
      if (list.head === list.seqs.length - 1) this.byChunk.set(c, list.seqs[list.head]!);
      else if (list.head > 32 && list.head * 2 > list.seqs.length) {
        list.seqs = list.seqs.slice(list.head);
        list.head = 0;
      }
    }
    this.head++;
    if (this.head === this.tail) {
      this.base += this.head;
      this.head = this.tail = 0;
    }
  }

  row(seq: number): ChangeRow {
    const i = seq - this.base;
    assert(i >= this.head && i < this.tail, `change ${seq} is not in the log`);
    const k = this.kind[i]!;
    return {
      seq,
      timeMs: this.time[i]!,
      blockStart: this.start[i]!,
      blockCount: this.count[i]!,
      type: k & 0xf,
      op: k >> 4,
      segmentNo: this.segment[i]!,
      payloadPos: this.pos[i]!,
    };
  }

  timeOf(seq: number): number {
    const i = seq - this.base;
    assert(i >= this.head && i < this.tail, `change ${seq} is not in the log`);
    return this.time[i]!;
  }

  segmentOf(seq: number): number {
    return this.segment[seq - this.base]!;
  }

  /** The first change after point `point` that touched `block`, or -1 if none did. */
  firstChangeAfter(block: number, point: number): number {
    const list = this.byChunk.get(Math.floor(block / this.chunkBlocks));
    if (list === undefined) return -1;
    if (typeof list === 'number') return list > point && this.covers(list, block) ? list : -1;
    const seqs = list.seqs;
    if (seqs[seqs.length - 1]! <= point) return -1;
    let lo = list.head;
    let hi = seqs.length - 1;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (seqs[mid]! > point) hi = mid;
      else lo = mid + 1;
    }
    for (let k = lo; k < seqs.length; k++) if (this.covers(seqs[k]!, block)) return seqs[k]!;
    return -1;
  }

  private covers(seq: number, block: number): boolean {
    const i = seq - this.base;
    const start = this.start[i]!;
    return start <= block && block < start + this.count[i]!;
  }

  /** The last change made at or before `timeMs` (times never decrease), or firstSeq - 1. */
  lastSeqAtOrBefore(timeMs: number): number {
    let lo = this.head;
    let hi = this.tail; // first row with time > timeMs
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (this.time[mid]! > timeMs) hi = mid;
      else lo = mid + 1;
    }
    return this.base + lo - 1;
  }

  /** Calls `fn(timeMs, blocks, op)` for every row in seq order, from `fromSeq` on. */
  forEachFrom(fromSeq: number, fn: (timeMs: number, blocks: number, op: number) => void): void {
    for (let i = Math.max(this.head, fromSeq - this.base); i < this.tail; i++)
      fn(this.time[i]!, this.count[i]!, this.kind[i]! >> 4);
  }

  private grow(): void {
    // Compact away dropped rows first; double only when the live rows need it.
    const live = this.tail - this.head;
    const cap = live * 2 > this.time.length ? this.time.length * 2 : this.time.length;
    const move = <T extends Float64Array | Uint32Array | Uint8Array>(
      a: T,
      make: (n: number) => T,
    ): T => {
      const b = make(cap);
      b.set(a.subarray(this.head, this.tail));
      return b;
    };
    this.time = move(this.time, (n) => new Float64Array(n));
    this.start = move(this.start, (n) => new Float64Array(n));
    this.pos = move(this.pos, (n) => new Float64Array(n));
    this.count = move(this.count, (n) => new Uint32Array(n));
    this.segment = move(this.segment, (n) => new Uint32Array(n));
    this.kind = move(this.kind, (n) => new Uint8Array(n));
    this.base += this.head;
    this.tail = live;
    this.head = 0;
  }
}
