/**
 * A snapshot's image: a read-only device showing the origin as it was when the snapshot was
 * taken. Per chunk: the store's copy if the snapshot has one, zeros for a zero copy, else the
 * origin itself (nobody has written that chunk since).
 *
 * Reading never blocks origin writes. The one race — a chunk read from the origin while a
 * write copies it and then overwrites it — is closed by looking again after the read: the
 * copy is in the map before its origin write is issued, so a chunk still without a copy once
 * the origin read has finished was not overwritten under it; one that has a copy by then is
 * read again from the store. The same look-again makes block status safe (such a chunk is
 * reported as data, which is always true).
 */
import {
  ExtentState,
  RequestFlags,
  type Device,
  type DeviceInfo,
  type Extent,
} from '../../core/device.js';
import { DeviceError, assert } from '../../core/errors.js';
import type { InstantView } from '../../core/filter.js';
import { imageFacts } from '../image-facts.js';
import { NO_SLOT } from './format.js';
import type { Snap } from './registry.js';

/** What an image needs from its filter. */
export interface ImageSource {
  readonly chunkSize: number;
  readonly originSize: number;
  /** The device below the filter (the origin as the filter sees it). */
  readonly origin: Device;
  /** The copy of chunk `c` that generation `gen` sees: a slot, NO_SLOT (zeros), or -1 (none). */
  find(c: number, gen: number): number;
  /** Reads `buf.length` bytes of diff.data at slot `slot`, `within` bytes into it (may span consecutive slots). */
  readSlots(slot: number, within: number, buf: Buffer): Promise<void>;
  /** False once the filter is gone (removed, or its store closed). */
  isOpen(): boolean;
}

/** Reads of one request issued at once: bounds the fs operations a large read queues. */
const PARALLEL_READS = 32;
/** Block status looks at most this many chunks per request; the client asks again for more. */
const STATUS_CHUNKS = 16384;
const MAX_EXTENTS = 1024;
const HOLE_ZERO = ExtentState.HOLE | ExtentState.ZERO;

interface Piece {
  /** Byte range of the image, [from, to). */
  from: number;
  to: number;
  /** First slot, or -1 for the origin. */
  slot: number;
}

export class SnapshotImage implements Device {
  private readonly facts: DeviceInfo;

  /**
   * `views`: the other filters' block-status contexts frozen at the snapshot's instant (a
   * change map as it was then), answered by contextStatus(). Held in memory only: an image
   * reopened after a restart has none.
   */
  constructor(
    private readonly src: ImageSource,
    readonly snap: Snap,
    private readonly views: readonly InstantView[] = [],
  ) {
    this.facts = imageFacts(
      src.origin.info(),
      src.originSize,
      views.flatMap((v) => v.statusContexts),
    );
  }

  info(): DeviceInfo {
    return this.facts;
  }

  async read(buf: Buffer, offset: number, _flags: number): Promise<void> {
    this.check(offset, buf.length);
    const pieces = this.plan(offset, offset + buf.length, buf, offset);
    await this.fetch(pieces, buf, offset);
    // Look again at what came from the origin: a chunk copied meanwhile may have changed there.
    const again: Piece[] = [];
    for (const p of pieces) if (p.slot === -1) this.replan(p, again, buf, offset);
    if (again.length > 0) await this.fetch(again, buf, offset);
    this.check(offset, buf.length); // failed or deleted meanwhile: what we read proves nothing
  }

  /** A frozen context (see the constructor); EINVAL for any other. */
  contextStatus(context: string, offset: number, length: number, flags: number): Promise<Extent[]> {
    try {
      this.check(offset, length);
      const view = this.views.find((v) => v.statusContexts.includes(context));
      if (view === undefined)
        throw new DeviceError('EINVAL', `no block-status context ${JSON.stringify(context)} here`);
      return Promise.resolve(view.contextStatus(context, offset, length, flags));
    } catch (err) {
      return Promise.reject(err);
    }
  }

  async blockStatus(offset: number, length: number, flags: number): Promise<Extent[]> {
    this.check(offset, length);
    const cs = this.src.chunkSize;
    const end = Math.min(
      offset + length,
      this.src.originSize,
      (Math.floor(offset / cs) + STATUS_CHUNKS) * cs,
    );
    const out: Extent[] = [];
    const push = (len: number, state: number): void => {
      const last = out[out.length - 1];
      if (last !== undefined && last.state === state) last.length += len;
      else out.push({ length: len, state });
    };
    const gen = this.snap.generation;
    let pos = offset;
    while (pos < end && out.length < MAX_EXTENTS) {
      const c = Math.floor(pos / cs);
      const s = this.src.find(c, gen);
      if (s !== -1) {
        const to = Math.min((c + 1) * cs, end);
        push(to - pos, s === NO_SLOT ? HOLE_ZERO : 0);
        pos = to;
        continue;
      }
      // A run of chunks without copies: ask the origin about it.
      let to = Math.min((c + 1) * cs, end);
      while (to < end && this.src.find(Math.floor(to / cs), gen) === -1)
        to = Math.min(to + cs, end);
      const extents = await this.src.origin.blockStatus(
        pos,
        to - pos,
        flags & ~RequestFlags.REQ_ONE,
      );
      assert(extents.length > 0, 'block status answered no extent');
      let at = pos;
      for (const e of extents) {
        if (at >= to) break;
        const len = Math.min(e.length, to - at);
        // A chunk copied while we asked may have been overwritten on the origin: call it data.
        const state = this.copiedWithin(at, at + len) ? 0 : e.state;
        push(len, state);
        at += len;
      }
      pos = at;
    }
    this.check(offset, length);
    if (flags & RequestFlags.REQ_ONE) {
      const first = out[0]!;
      return [{ length: Math.min(first.length, length), state: first.state }];
    }
    return out;
  }

  write(): Promise<void> {
    return Promise.reject(new DeviceError('EPERM', 'a snapshot image is read-only'));
  }

  trim(): Promise<void> {
    return this.write();
  }

  writeZeroes(): Promise<void> {
    return this.write();
  }

  flush(): Promise<void> {
    return Promise.resolve(); // nothing is ever written
  }

  cache(): Promise<void> {
    return Promise.resolve();
  }

  close(): Promise<void> {
    return Promise.resolve(); // the filter owns the store and the origin
  }

  /** EIO for a failed snapshot, ESHUTDOWN for a deleted one or a detached filter. */
  private check(offset: number, length: number): void {
    const s = this.snap;
    if (!this.src.isOpen() || s.state === 'deleted') {
      throw new DeviceError('ESHUTDOWN', `snapshot "${s.name}" is no longer available`);
    }
    if (s.state === 'failed' || s.state === 'failing') {
      throw new DeviceError(
        'EIO',
        `snapshot "${s.name}" has failed: ${s.reason ?? 'unknown reason'}`,
      );
    }
    if (offset + length > this.src.originSize) {
      throw new DeviceError(
        'EINVAL',
        `range ${offset}+${length} is beyond the image's ${this.src.originSize} bytes`,
      );
    }
  }

  /**
   * Splits [from, to) into pieces: runs read from the origin, runs of consecutive slots, and
   * zero copies (filled in `buf` at once).
   */
  private plan(from: number, to: number, buf: Buffer, base: number): Piece[] {
    const cs = this.src.chunkSize;
    const gen = this.snap.generation;
    const pieces: Piece[] = [];
    let pos = from;
    while (pos < to) {
      const c = Math.floor(pos / cs);
      const end = Math.min((c + 1) * cs, to);
      const slot = this.src.find(c, gen);
      const last = pieces[pieces.length - 1];
      if (slot === NO_SLOT) {
        buf.fill(0, pos - base, end - base);
      } else if (slot === -1) {
        if (last !== undefined && last.slot === -1 && last.to === pos) last.to = end;
        else pieces.push({ from: pos, to: end, slot: -1 });
      } else {
        // Consecutive slots for consecutive chunks are one read of diff.data.
        const contiguous =
          last !== undefined &&
          last.slot >= 0 &&
          last.to === pos &&
          pos % cs === 0 &&
          last.slot + (pos - Math.floor(last.from / cs) * cs) / cs === slot;
        if (contiguous) last.to = end;
        else pieces.push({ from: pos, to: end, slot });
      }
      pos = end;
    }
    return pieces;
  }

  /** Pieces for the chunks of an origin piece that have a copy now. */
  private replan(p: Piece, out: Piece[], buf: Buffer, base: number): void {
    const cs = this.src.chunkSize;
    for (let pos = p.from; pos < p.to;) {
      const c = Math.floor(pos / cs);
      const end = Math.min((c + 1) * cs, p.to);
      const slot = this.src.find(c, this.snap.generation);
      if (slot === NO_SLOT) buf.fill(0, pos - base, end - base);
      else if (slot !== -1) out.push({ from: pos, to: end, slot });
      pos = end;
    }
  }

  private copiedWithin(from: number, to: number): boolean {
    const cs = this.src.chunkSize;
    for (let c = Math.floor(from / cs); c * cs < to; c++)
      if (this.src.find(c, this.snap.generation) !== -1) return true;
    return false;
  }

  private async fetch(pieces: readonly Piece[], buf: Buffer, base: number): Promise<void> {
    const cs = this.src.chunkSize;
    for (let i = 0; i < pieces.length; i += PARALLEL_READS) {
      await Promise.all(
        pieces.slice(i, i + PARALLEL_READS).map((p) => {
          const target = buf.subarray(p.from - base, p.to - base);
          if (p.slot === -1) return this.src.origin.read(target, p.from, 0);
          return this.src.readSlots(p.slot, p.from - Math.floor(p.from / cs) * cs, target);
        }),
      );
    }
  }
}
