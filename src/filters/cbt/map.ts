/**
 * The change map of the cbt filter: for every block of the device, the generation in which it
 * last changed (0: not since the history began). 4 bytes per block — 64 MiB per TiB of device
 * at the default 64 KiB block size (docs/cbt-format.md). Everything here is synchronous and
 * in memory; persistence is store.ts's job.
 *
 * "Changed since generation N" means: changed in generation N or a later one (gen ≥ N).
 */
import type { Extent } from '../../core/device.js';

/** At most this many blocks (a 1 GiB map): larger devices need a larger block size. */
export const MAX_BLOCKS = 2 ** 28;
/** Generations are u32 on disk; the last one is never handed out. */
export const MAX_GENERATION = 0xffff_fffe;
/** Extents one status query returns at most (the NBD layer sends at most 2^16 per chunk). */
export const MAX_STATUS_EXTENTS = 1 << 16;

/** Extent state bit of a changed ("dirty") block, as in qemu:dirty-bitmap. */
export const STATE_DIRTY = 1;

export function isPowerOfTwo(n: number): boolean {
  return Number.isSafeInteger(n) && n > 0 && (n & (n - 1)) === 0;
}

export function blockCountOf(size: number, blockSize: number): number {
  return Math.ceil(size / blockSize);
}

/** A changed byte range, as the `changed` command reports it. */
export interface ChangedExtent {
  offset: number;
  length: number;
}

export interface ChangedList {
  extents: ChangedExtent[];
  /** Bytes in `extents`. */
  bytes: number;
  /** Blocks in `extents`. */
  blocks: number;
  /** Set when `limit` cut the list short: where to continue (pass it as `offset`). */
  next: number | null;
}

/**
 * Status extents from `offset` for blocks that `dirty` says changed (STATE_DIRTY) or not (0):
 * the first starts at `offset`, runs of equal state are merged, the last may reach to the end
 * of its block (never past the device), and at most `maxExtents` are returned.
 */
export function statusExtents(
  dirty: (block: number) => boolean,
  blockSize: number,
  size: number,
  offset: number,
  length: number,
  maxExtents = MAX_STATUS_EXTENTS,
): Extent[] {
  const end = Math.min(size, offset + length);
  const out: Extent[] = [];
  let pos = offset;
  while (pos < end && out.length < maxExtents) {
    let b = Math.floor(pos / blockSize);
    const d = dirty(b);
    b++;
    while (b * blockSize < end && dirty(b) === d) b++;
    const runEnd = Math.min(b * blockSize, size);
    out.push({ length: runEnd - pos, state: d ? STATE_DIRTY : 0 });
    pos = runEnd;
  }
  return out;
}

/** The changed byte ranges within [offset, offset + length), block-aligned, in order. */
export function changedExtents(
  dirty: (block: number) => boolean,
  blockSize: number,
  size: number,
  offset: number,
  length: number,
  limit: number,
): ChangedList {
  const first = Math.floor(offset / blockSize);
  const last = Math.ceil(Math.min(size, offset + length) / blockSize);
  const extents: ChangedExtent[] = [];
  let bytes = 0;
  let blocks = 0;
  let b = first;
  while (b < last) {
    if (!dirty(b)) {
      b++;
      continue;
    }
    if (extents.length >= limit) return { extents, bytes, blocks, next: b * blockSize };
    const start = b;
    while (b < last && dirty(b)) b++;
    const from = start * blockSize;
    const len = Math.min(b * blockSize, size) - from;
    extents.push({ offset: from, length: len });
    bytes += len;
    blocks += b - start;
  }
  return { extents, bytes, blocks, next: null };
}

export class ChangeMap {
  readonly blockCount: number;
  /** Generation of each block's last change; 0 = unchanged since the history began. */
  readonly gens: Uint32Array;
  /** The current generation (≥ 1): changes now are recorded with it. */
  generation: number;
  /** The history's id (a UUID): a new one on reset. */
  id: string;
  /** Blocks changed in the current generation. */
  dirtyNow: number;
  /**
   * Bumped by every new generation and every reset: a request that marked its blocks before a
   * bump and finishes after it marks them again, so the new generation sees it too.
   */
  epoch = 0;

  constructor(
    readonly size: number,
    readonly blockSize: number,
    init: { gens?: Uint32Array; generation: number; id: string },
  ) {
    this.blockCount = blockCountOf(size, blockSize);
    this.gens = init.gens ?? new Uint32Array(this.blockCount);
    this.generation = init.generation;
    this.id = init.id;
    this.dirtyNow = this.countSince(this.generation);
  }

  /** Bytes of memory the map holds. */
  get memoryBytes(): number {
    return this.gens.byteLength;
  }

  /** The blocks [first, end) that bytes [offset, offset + length) touch. */
  blocksOf(offset: number, length: number): [number, number] {
    if (length <= 0) return [0, 0];
    return [Math.floor(offset / this.blockSize), Math.ceil((offset + length) / this.blockSize)];
  }

  /** Whether every block of [first, end) already changed in the current generation. */
  allCurrent(first: number, end: number): boolean {
    const g = this.generation;
    const gens = this.gens;
    for (let b = first; b < end; b++) if (gens[b] !== g) return false;
    return true;
  }

  /**
   * Marks blocks [first, end) as changed in the current generation. Returns the runs that
   * were not yet marked in it as flat [start, count, ...] pairs (what must be made durable),
   * or null when there were none.
   */
  mark(first: number, end: number): number[] | null {
    const g = this.generation;
    const gens = this.gens;
    let runs: number[] | null = null;
    let b = first;
    while (b < end) {
      if (gens[b] === g) {
        b++;
        continue;
      }
      const start = b;
      while (b < end && gens[b] !== g) gens[b++] = g;
      this.dirtyNow += b - start;
      (runs ??= []).push(start, b - start);
    }
    return runs;
  }

  /** Applies a replayed mark: blocks get `generation` unless they hold a later one. */
  apply(start: number, count: number, generation: number): void {
    const gens = this.gens;
    for (let b = start; b < start + count; b++) if (gens[b]! < generation) gens[b] = generation;
  }

  /** Starts a new generation; returns the previous and the new number. */
  newGeneration(): { previous: number; current: number } {
    if (this.generation >= MAX_GENERATION)
      throw new Error(`generation ${this.generation} is the last one; reset the history`);
    const previous = this.generation;
    this.generation++;
    this.dirtyNow = 0;
    this.epoch++;
    return { previous, current: this.generation };
  }

  /** Forgets every change: generation 1, a new id. */
  reset(id: string): void {
    this.gens.fill(0);
    this.generation = 1;
    this.id = id;
    this.dirtyNow = 0;
    this.epoch++;
  }

  /** Blocks changed in generation `since` or later (a scan). */
  countSince(since: number): number {
    const t = Math.max(1, since);
    let n = 0;
    const gens = this.gens;
    for (let b = 0; b < gens.length; b++) if (gens[b]! >= t) n++;
    return n;
  }

  /** Status extents of "changed since `since`" (state STATE_DIRTY), for block status. */
  status(since: number, offset: number, length: number): Extent[] {
    const t = Math.max(1, since);
    const gens = this.gens;
    return statusExtents((b) => gens[b]! >= t, this.blockSize, this.size, offset, length);
  }

  changed(since: number, offset: number, length: number, limit: number): ChangedList {
    const t = Math.max(1, since);
    const gens = this.gens;
    return changedExtents((b) => gens[b]! >= t, this.blockSize, this.size, offset, length, limit);
  }

  /**
   * An immutable copy of "changed since `since`" as of now (1 bit per block): what a snapshot
   * image taken at this instant can later serve as its own frozen change map. Taken with
   * writes held still, it is exact for that instant; otherwise writes in flight may or may not
   * be in it.
   */
  view(since: number): ChangeView {
    const t = Math.max(1, since);
    const bits = new Uint8Array(Math.ceil(this.blockCount / 8));
    const gens = this.gens;
    for (let b = 0; b < gens.length; b++) if (gens[b]! >= t) bits[b >>> 3]! |= 1 << (b & 7);
    return new ChangeView(this.size, this.blockSize, bits, {
      id: this.id,
      since: t,
      generation: this.generation,
      takenAt: new Date().toISOString(),
    });
  }
}

/** A frozen "changed since N" bitmap (see ChangeMap.view); never changes after creation. */
export class ChangeView {
  constructor(
    readonly size: number,
    readonly blockSize: number,
    private readonly bits: Uint8Array,
    readonly meta: {
      readonly id: string;
      readonly since: number;
      /** The current generation when the view was taken. */
      readonly generation: number;
      readonly takenAt: string;
    },
  ) {}

  isDirty(block: number): boolean {
    return (this.bits[block >>> 3]! & (1 << (block & 7))) !== 0;
  }

  status(offset: number, length: number): Extent[] {
    return statusExtents((b) => this.isDirty(b), this.blockSize, this.size, offset, length);
  }

  changed(offset: number, length: number, limit: number): ChangedList {
    return changedExtents((b) => this.isDirty(b), this.blockSize, this.size, offset, length, limit);
  }

  get memoryBytes(): number {
    return this.bits.byteLength;
  }
}
