/**
 * The `mirror` filter: live migration of an export to a target (a file, a block device, or an
 * export of another NBD server) while clients keep writing, then an atomic cutover that makes
 * the target the export's backend. See docs/mirror.md.
 *
 * - A background copier walks the dirty map (one bit per chunk, all set at the start) in
 *   passes, reading the source through `env.deviceBelow` (held and drained by stack changes
 *   like client requests) and writing the target; chunks that read as zeros are zeroed on the
 *   target, or skipped on a target this filter created (it reads as zeros already). At most
 *   `maxInFlight` copies run at once, paced by `rate`.
 * - Client writes, trims and zeroing go to the source and then: in background mode they mark
 *   their chunks dirty (copied again); in sync mode (and in background mode once synced) writes
 *   and zeroing are mirrored to the target in parallel and acknowledged when both are done.
 *   The source is authoritative: a target failure never fails a client — the mirror pauses with
 *   the reason, the chunks stay dirty, and `resume` copies only those.
 * - Race rule: a chunk whose copy overlaps in time with a client write to it is marked dirty
 *   again when the copy ends, whatever the order of the reads and writes was.
 * - When background passes stop shrinking the dirty map (`convergePasses` passes in a row),
 *   the mirror switches itself to sync mode (event mirror.mode-changed).
 */
import fs from 'node:fs';
import type { Device, Extent, IoContext } from '../../core/device.js';
import { ExtentState, RequestFlags } from '../../core/device.js';
import { DeviceError } from '../../core/errors.js';
import { FilterCommandError, type Filter, type FilterEnv } from '../../core/filter.js';
import { parseSize } from '../../core/size.js';
import { unknownCommand } from '../args.js';
import { ChunkBitmap } from './bitmap.js';
import {
  describeStale,
  fenceOf,
  fileOfLabel,
  newRecord,
  readRecord,
  removeRecord,
  stateDirRecord,
  writeRecord,
  type CutoverRecord,
} from './cutover-record.js';
import { readState, removeState, statePath, writeState } from './state-file.js';
import { isNbdUri, openTarget, type OpenedTarget } from './target.js';
import { makeDirs } from '../../core/make-dirs.js';

export type MirrorMode = 'background' | 'sync';
export type MirrorStateName = 'copying' | 'synced' | 'paused' | 'failed' | 'cancelled' | 'cutover';

export type MirrorArgs = {
  target: string;
  mode: MirrorMode;
  chunkSize: number | string;
  rate: number | string;
  stateDir?: string;
  autoCutover: boolean;
  convergePasses: number;
  maxInFlight: number;
  targetTimeoutMs: number;
};

export const REMOVAL_POLICIES = ['stop', 'cancel'] as const;
export const MIN_CHUNK = 4096;
export const MAX_CHUNK = 64 * 1024 * 1024;
export const COMMANDS = [
  'status',
  'pause',
  'resume',
  'cancel',
  'set-rate',
  'set-mode',
  'cutover',
  'verify',
] as const;

/** Observed copy rate: bytes over the last few seconds. */
const RATE_WINDOW_MS = 5000;
/**
 * While copying, the target is flushed this often: a target that dies loses at most what was
 * written since (made dirty again by the failing flush), not the whole copy.
 */
const FLUSH_INTERVAL_MS = 1000;
/** A background pass makes progress when it ends with this much fewer dirty chunks than the best. */
const MIN_PROGRESS = 0.1;
/** How far ahead one block-status question about the source reaches (see readsAsZeros). */
const STATUS_SPAN = 64 * 1024 * 1024;
/** verify lists at most this many differing chunks (it counts them all). */
const MAX_LISTED = 100;
/** Times verify() reads a chunk that differs or that client writes touch, before it gives up. */
const VERIFY_ATTEMPTS = 5;

function sizeValue(v: unknown, what: string): number {
  try {
    const n = typeof v === 'number' ? v : parseSize(String(v));
    if (!Number.isSafeInteger(n) || n < 0) throw new Error('must be a whole number >= 0');
    return n;
  } catch (err) {
    throw new FilterCommandError(`${what}: ${(err as Error).message}`);
  }
}

const msg = (err: unknown): string => (err instanceof Error ? err.message : String(err));

export interface MirrorDeps {
  /** Use this device as the target instead of opening `args.target` (tests, library users). */
  target?: OpenedTarget;
}

export class MirrorFilter implements Filter {
  private state: MirrorStateName = 'copying';
  private reason: string | null = null;
  private mode: MirrorMode;
  private rate: number;
  private readonly size: number;
  private readonly chunkSize: number;
  private readonly chunks: number;
  private readonly dirty: ChunkBitmap;
  /** On a target created here: chunks ever written there (the others read as zeros). */
  private readonly written: ChunkBitmap | null;
  /**
   * Chunks written on the target since the last target flush began: if the target loses them
   * (an NBD target whose server died), a failed flush makes them dirty again.
   */
  private unflushed: ChunkBitmap;
  /** Chunks being copied; `touched` when a client write overlapped the copy. */
  private readonly copying = new Map<number, { touched: boolean }>();
  /** The chunk verify() is reading, and whether a client write touched it meanwhile. */
  private verifying: { chunk: number; touched: boolean } | null = null;
  /** Client writes in progress per chunk. */
  private readonly activeWrites = new Map<number, number>();
  /** Client writes in progress that are not mirrored (they mark chunks dirty at the end). */
  private unmirrored = 0;
  /** Mirrored target writes of client requests in progress. */
  private readonly targetOps = new Set<Promise<unknown>>();
  private live = false;
  private pumping: Promise<void> | null = null;
  private wakeUp: (() => void) | null = null;
  private pacing: { timer: NodeJS.Timeout; resolve: () => void } | null = null;
  /** The source's last data extent heard of (see readsAsZeros). */
  private knownData = { start: 0, end: 0 };
  private cursor = 0;
  private passes = 0;
  /** The fewest dirty chunks at the end of a pass since background copying last made progress. */
  private bestDirty = Number.POSITIVE_INFINITY;
  private strikes = 0;
  private paceUntil = 0;
  private lastFlush = 0;
  private ownsTarget = true;
  private readonly samples: { at: number; bytes: number }[] = [];
  private readonly counters = {
    bytesCopied: 0,
    bytesCopiedSinceResume: 0,
    zeroBytes: 0,
    chunksCopied: 0,
    syncWrites: 0,
    syncFlushes: 0,
    targetErrors: 0,
  };
  private syncedAt: string | null = null;
  private cutoverAt: string | null = null;
  private lastVerify: Record<string, unknown> | null = null;

  private constructor(
    private readonly args: MirrorArgs,
    private readonly env: FilterEnv,
    private readonly target: OpenedTarget,
    chunkSize: number,
    dirty: ChunkBitmap,
    private readonly stateFile: string | null,
    private readonly resumed: string,
  ) {
    this.mode = args.mode;
    this.rate = sizeValue(args.rate, 'rate');
    this.size = env.below.size;
    this.chunkSize = chunkSize;
    this.chunks = dirty.chunks;
    this.dirty = dirty;
    this.written = target.fresh ? new ChunkBitmap(this.chunks) : null;
    this.unflushed = new ChunkBitmap(this.chunks);
  }

  static async open(
    args: MirrorArgs,
    env: FilterEnv,
    deps: MirrorDeps = {},
  ): Promise<MirrorFilter> {
    if (env.deviceBelow === undefined) throw new Error('mirror needs deviceBelow from the core');
    const chunkSize = sizeValue(args.chunkSize, 'chunkSize');
    if (chunkSize < MIN_CHUNK || chunkSize > MAX_CHUNK || (chunkSize & (chunkSize - 1)) !== 0)
      throw new Error(`chunkSize must be a power of two, ${MIN_CHUNK}..${MAX_CHUNK}`);
    sizeValue(args.rate, 'rate');
    const size = env.below.size;
    const chunks = Math.ceil(size / chunkSize);
    await refuseStaleOrSelf(args, env);
    const target =
      deps.target ??
      (await openTarget(args.target, size, {
        logger: env.logger,
        retryTimeoutMs: args.targetTimeoutMs,
        createIfMissing: true,
      }));
    try {
      let dirty = new ChunkBitmap(chunks, true);
      let file: string | null = null;
      let resumed = 'new';
      if (args.stateDir !== undefined) {
        // Made if missing, like the other filters' state directories (a bare ENOENT from the
        // first state write would say nothing useful).
        await makeDirs(args.stateDir, 0o700);
        file = statePath(args.stateDir, env.exportName, env.filterName);
        let saved;
        try {
          saved = await readState(file);
        } catch (err) {
          env.logger.warn({ err }, 'mirror state unreadable: copying everything');
          resumed = 'state unreadable: full copy';
        }
        if (saved !== undefined) {
          const h = saved.header;
          if (h.target !== args.target || h.size !== size || h.chunkSize !== chunkSize)
            resumed = 'state of another mirror (target, size or chunk size differ): full copy';
          else if (target.fresh) resumed = 'the target was missing and was created: full copy';
          else if (!h.clean)
            resumed = 'the last stop was not clean (crash): the whole device is copied again';
          else {
            dirty = ChunkBitmap.fromBuffer(chunks, saved.bitmap);
            resumed = 'exact';
          }
        }
        // In use: a crash from now on leaves an untrusted map (clean: false).
        await writeState(file, {
          header: {
            target: args.target,
            size,
            chunkSize,
            clean: false,
            savedAt: new Date().toISOString(),
            bytesCopied: 0,
          },
          bitmap: dirty.toBuffer(),
        });
      }
      return new MirrorFilter(args, env, target, chunkSize, dirty, file, resumed);
    } catch (err) {
      if (deps.target === undefined) await target.device.close().catch(() => undefined);
      throw err;
    }
  }

  // ---- client requests -------------------------------------------------------------------

  write(next: Device, data: Buffer, offset: number, flags: number, ctx?: IoContext): Promise<void> {
    const fua = (flags & RequestFlags.FUA) !== 0;
    return this.tracked(
      offset,
      data.length,
      () => next.write(data, offset, flags, ctx),
      (t) => durably(t, fua, (f) => t.write(data, offset, f)),
      fua,
    );
  }

  /**
   * While writes are mirrored, a client's flush covers the target too: what the client was
   * told is durable must be durable on both sides, or a cutover after a crash of the target
   * could lose it. The source is authoritative: a failing target flush re-dirties what it
   * covered and pauses the mirror, it never fails the client's flush. In background mode (not
   * mirroring) the flush goes to the source only: every write since the last target flush is
   * dirty there anyway, and synced/cutover flush the target themselves.
   */
  flush(next: Device, flags: number, ctx?: IoContext): Promise<void> {
    if (!this.tracking() || !this.mirroring()) return next.flush(flags, ctx);
    return this.bothFlushed(next.flush(flags, ctx));
  }

  private async bothFlushed(source: Promise<void>): Promise<void> {
    const t = this.flushTarget().then(
      () => {
        this.counters.syncFlushes++;
      },
      (err: unknown) => this.targetFailed(err),
    );
    this.targetOps.add(t);
    void t.finally(() => this.targetOps.delete(t));
    const [s] = await Promise.allSettled([source, t]);
    if (s.status === 'rejected') throw s.reason;
  }

  writeZeroes(
    next: Device,
    offset: number,
    length: number,
    flags: number,
    ctx?: IoContext,
  ): Promise<void> {
    const t = this.target.device;
    const fua = (flags & RequestFlags.FUA) !== 0;
    // Only FUA goes on to the target: NO_HOLE and FAST_ZERO are about how the source zeroes.
    return this.tracked(
      offset,
      length,
      () => next.writeZeroes(offset, length, flags, ctx),
      t.info().caps.zero
        ? (d) => durably(d, fua, (f) => d.writeZeroes(offset, length, f))
        : undefined,
      fua,
    );
  }

  trim(
    next: Device,
    offset: number,
    length: number,
    flags: number,
    ctx?: IoContext,
  ): Promise<void> {
    // What a trimmed range reads back is up to the source: copy it again rather than guess.
    return this.tracked(offset, length, () => next.trim(offset, length, flags, ctx));
  }

  private tracking(): boolean {
    return this.state !== 'cutover' && this.state !== 'cancelled';
  }

  private mirroring(): boolean {
    return this.state === 'synced' || (this.state === 'copying' && this.mode === 'sync');
  }

  private async tracked(
    offset: number,
    length: number,
    source: () => Promise<void>,
    mirror?: (target: Device) => Promise<void>,
    fua = false,
  ): Promise<void> {
    if (!this.tracking() || length === 0) return source();
    const first = Math.floor(offset / this.chunkSize);
    const last = Math.floor((offset + length - 1) / this.chunkSize);
    this.touch(first, last, 1);
    const mirrored = mirror !== undefined && this.mirroring();
    if (!mirrored) this.unmirrored++;
    try {
      if (!mirrored) {
        try {
          await source();
        } finally {
          this.markDirty(first, last);
        }
        return;
      }
      const t = mirror(this.target.device).then(
        () => {
          this.counters.syncWrites++;
          if (this.written !== null) this.written.setRange(first, last);
          // A FUA write is durable on the target already; others wait for a target flush.
          if (!fua) this.unflushed.setRange(first, last);
        },
        (err: unknown) => {
          this.markDirty(first, last);
          this.targetFailed(err);
        },
      );
      this.targetOps.add(t);
      void t.finally(() => this.targetOps.delete(t));
      const [s] = await Promise.allSettled([source(), t]);
      if (s.status === 'rejected') {
        this.markDirty(first, last); // the source may hold part of it
        throw s.reason;
      }
    } finally {
      this.touch(first, last, -1);
      if (!mirrored && --this.unmirrored === 0) this.wake();
    }
  }

  /** A client write starts (+1) or ends (-1) on chunks first..last. */
  private touch(first: number, last: number, delta: 1 | -1): void {
    for (let c = first; c <= last; c++) {
      const rec = this.copying.get(c);
      if (rec !== undefined) rec.touched = true;
      if (this.verifying?.chunk === c) this.verifying.touched = true;
      const n = (this.activeWrites.get(c) ?? 0) + delta;
      if (n === 0) this.activeWrites.delete(c);
      else this.activeWrites.set(c, n);
    }
  }

  private markDirty(first: number, last: number): void {
    if (!this.tracking()) return;
    this.dirty.setRange(first, last);
    if (this.state === 'synced' && this.dirty.count > 0) this.state = 'copying';
    this.wake();
    this.kick();
  }

  private targetFailed(err: unknown): void {
    this.counters.targetErrors++;
    this.pause(`target: ${msg(err)}`);
  }

  // ---- the copier ------------------------------------------------------------------------

  activate(): void {
    this.live = true;
    this.kick();
  }

  release(): void {
    this.live = false;
    this.wake();
    this.cutPace();
  }

  private wake(): void {
    const w = this.wakeUp;
    this.wakeUp = null;
    w?.();
  }

  private kick(): void {
    if (this.pumping !== null || !this.live || this.state !== 'copying') return;
    this.pumping = this.pump()
      .catch((err: unknown) => this.fail(`copier: ${msg(err)}`))
      .finally(() => {
        this.pumping = null;
        if (this.live && this.state === 'copying') queueMicrotask(() => this.kick());
      });
  }

  private async pump(): Promise<void> {
    const slots = new Set<Promise<void>>();
    try {
      while (this.live && this.state === 'copying') {
        if (slots.size >= this.args.maxInFlight) {
          await Promise.race(slots);
          continue;
        }
        if (this.unflushed.count > 0 && performance.now() - this.lastFlush > FLUSH_INTERVAL_MS) {
          try {
            await this.flushTarget();
          } catch (err) {
            this.targetFailed(err);
          }
          continue;
        }
        const c = this.takeNext();
        if (c < 0) {
          if (slots.size > 0) {
            await Promise.race(slots);
            continue;
          }
          if (this.dirty.count === 0 && this.unmirrored === 0) {
            // Synced means durable on the target: flush first (a failure re-dirties).
            try {
              await this.flushTarget();
            } catch (err) {
              this.targetFailed(err);
              return;
            }
            if (this.dirty.count === 0 && this.unmirrored === 0 && this.copying.size === 0) {
              this.enterSynced();
              return;
            }
            continue;
          }
          await new Promise<void>((resolve) => (this.wakeUp = resolve));
          continue;
        }
        if (this.copying.has(c)) {
          // Dirtied again while its copy runs: that copy marks it dirty when it ends.
          await Promise.race(slots);
          continue;
        }
        await this.pace(Math.min(this.chunkSize, this.size - c * this.chunkSize));
        if (!this.live || this.state !== 'copying') {
          this.dirty.set(c);
          break;
        }
        const p: Promise<void> = this.copyChunk(c).finally(() => slots.delete(p));
        slots.add(p);
      }
    } finally {
      await Promise.allSettled(slots);
    }
  }

  /** The next dirty chunk from the cursor on; the end of a pass wraps around. -1: none. */
  private takeNext(): number {
    let c = this.dirty.nextSet(this.cursor);
    if (c < 0 && this.cursor > 0) {
      this.endPass();
      this.cursor = 0;
      c = this.dirty.nextSet(0);
    }
    if (c < 0) return -1;
    this.cursor = c + 1;
    return c;
  }

  private endPass(): void {
    this.passes++;
    const left = this.dirty.count;
    if (this.mode !== 'background' || left === 0) {
      this.strikes = 0;
      this.bestDirty = Number.POSITIVE_INFINITY;
      return;
    }
    // Progress is a pass ending clearly below the best so far. Against "fewer than the last
    // pass", a map held nearly full by the load dips by a chunk now and then, and each dip
    // would reset the count: the switch to sync would wait on luck.
    if (left <= this.bestDirty * (1 - MIN_PROGRESS)) {
      this.strikes = 0;
      this.bestDirty = left;
    } else {
      this.strikes++;
      this.bestDirty = Math.min(this.bestDirty, left);
    }
    if (this.strikes >= this.args.convergePasses) {
      this.setMode(
        'sync',
        `background copying does not converge: ${left * this.chunkSize} dirty bytes after ${this.strikes} passes that did not shrink the dirty map by a tenth`,
      );
    }
  }

  private async pace(bytes: number): Promise<void> {
    if (this.rate <= 0) return;
    const now = performance.now();
    const start = Math.max(this.paceUntil, now);
    this.paceUntil = start + (bytes / this.rate) * 1000;
    if (start <= now) return;
    // Its own waker, not `wakeUp`: client writes wake the copier for new dirty chunks, and
    // must not cut a pacing sleep short (under write load the rate limit would not hold).
    await new Promise<void>((resolve) => {
      const timer = setTimeout(() => {
        this.pacing = null;
        resolve();
      }, start - now);
      this.pacing = { timer, resolve };
    });
  }

  /**
   * Whether [offset, offset+length) of the source reads as zeros, by its block status. Asks
   * about STATUS_SPAN bytes at once and remembers the data extent it hears of, so the chunks
   * after this one in that extent are not asked about again: asking can cost far more than
   * the chunk (a file on tmpfs answers SEEK_HOLE by walking its pages up to the next hole,
   * 10 ms from the start of a full 1 GiB file). Only data is remembered, never zeros, so a
   * stale answer costs a copy of a chunk that reads as zeros, never a chunk left uncopied.
   */
  private async readsAsZeros(device: Device, offset: number, length: number): Promise<boolean> {
    const end = offset + length;
    if (offset >= this.knownData.start && end <= this.knownData.end) return false;
    const askEnd = Math.min(this.size, offset + Math.max(length, STATUS_SPAN));
    let at = offset;
    while (at < end) {
      const extents: Extent[] = await device.blockStatus(at, askEnd - at, 0);
      if (extents.length === 0) return false;
      for (const e of extents) {
        if ((e.state & ExtentState.ZERO) === 0) {
          this.knownData = { start: at, end: at + e.length };
          return false;
        }
        at += e.length;
        if (at >= end) return true;
      }
    }
    return true;
  }

  /** Ends a pacing sleep at once: the rate changed, or the copier must stop. */
  private cutPace(): void {
    const p = this.pacing;
    this.pacing = null;
    if (p === null) return;
    clearTimeout(p.timer);
    p.resolve();
  }

  private async copyChunk(c: number): Promise<void> {
    const rec = { touched: this.activeWrites.has(c) };
    this.copying.set(c, rec);
    this.dirty.clear(c);
    const offset = c * this.chunkSize;
    const length = Math.min(this.chunkSize, this.size - offset);
    const below = this.env.deviceBelow!;
    const target = this.target.device;
    let stage: 'source' | 'target' = 'source';
    try {
      if (await this.readsAsZeros(below, offset, length)) {
        if (this.written !== null && !this.written.get(c)) this.counters.zeroBytes += length;
        else {
          stage = 'target';
          if (target.info().caps.zero) await target.writeZeroes(offset, length, 0);
          else await target.write(Buffer.alloc(length), offset, 0);
          this.written?.set(c);
          this.unflushed.set(c);
          this.counters.zeroBytes += length;
        }
      } else {
        const buf = Buffer.allocUnsafe(length);
        await below.read(buf, offset, 0);
        stage = 'target';
        await target.write(buf, offset, 0);
        this.written?.set(c);
        this.unflushed.set(c);
        this.counters.bytesCopied += length;
        this.counters.bytesCopiedSinceResume += length;
        this.sample(length);
      }
      this.counters.chunksCopied++;
      if (rec.touched) this.dirty.set(c);
    } catch (err) {
      this.dirty.set(c);
      if (stage === 'target') this.targetFailed(err);
      else if (this.live && !(err instanceof DeviceError && err.errno === 'ESHUTDOWN'))
        this.fail(`source: ${msg(err)}`);
    } finally {
      this.copying.delete(c);
    }
  }

  /**
   * Flushes the target. The chunks written before the flush began are durable once it
   * succeeds; if it fails they are dirty again (copied once more), and it rethrows.
   */
  private async flushTarget(): Promise<void> {
    const covered = this.unflushed;
    this.unflushed = new ChunkBitmap(this.chunks);
    this.lastFlush = performance.now();
    try {
      if (this.target.device.info().caps.flush) await this.target.device.flush(0);
    } catch (err) {
      for (let c = covered.nextSet(0); c >= 0; c = covered.nextSet(c + 1)) {
        this.unflushed.set(c);
        if (this.tracking()) this.dirty.set(c);
      }
      if (this.state === 'synced' && this.dirty.count > 0) this.state = 'copying';
      // No kick here: the caller decides (most pause on a target failure, and a copier
      // started first would race that pause).
      throw err;
    }
  }

  private sample(bytes: number): void {
    const now = performance.now();
    this.samples.push({ at: now, bytes });
    while (this.samples.length > 0 && this.samples[0]!.at < now - RATE_WINDOW_MS)
      this.samples.shift();
    if (this.samples.length > 4096) this.samples.shift();
  }

  private observedRate(): number {
    const now = performance.now();
    let bytes = 0;
    for (const s of this.samples) if (s.at >= now - RATE_WINDOW_MS) bytes += s.bytes;
    return Math.round(bytes / (RATE_WINDOW_MS / 1000));
  }

  // ---- states --------------------------------------------------------------------------

  private enterSynced(): void {
    if (this.state !== 'copying') return;
    this.state = 'synced';
    this.syncedAt = new Date().toISOString();
    this.env.emit('mirror.synced', {
      bytesCopied: this.counters.bytesCopied,
      passes: this.passes,
      mode: this.mode,
    });
    if (this.args.autoCutover)
      void this.cutover(undefined, 0).catch((err: unknown) =>
        this.env.logger.warn({ err }, 'automatic cutover failed; the mirror stays synced'),
      );
  }

  private pause(reason: string): void {
    if (this.state !== 'copying' && this.state !== 'synced') return;
    this.state = 'paused';
    this.reason = reason;
    this.env.logger.warn({ reason }, 'mirror paused');
    this.env.emit('mirror.paused', { reason, dirtyBytes: this.dirtyBytes() });
    this.wake();
    this.cutPace();
  }

  private fail(reason: string): void {
    if (this.state !== 'copying' && this.state !== 'synced') return;
    this.state = 'failed';
    this.reason = reason;
    this.env.logger.error({ reason }, 'mirror failed');
    this.env.emit('mirror.failed', { reason });
    this.wake();
    this.cutPace();
  }

  private setMode(mode: MirrorMode, reason: string): void {
    if (mode === this.mode) return;
    this.mode = mode;
    this.strikes = 0;
    this.bestDirty = Number.POSITIVE_INFINITY;
    this.env.emit('mirror.mode-changed', { mode, reason });
  }

  private async resume(): Promise<Record<string, unknown>> {
    if (this.state !== 'paused' && this.state !== 'failed')
      throw new FilterCommandError(`nothing to resume: the mirror is ${this.state}`);
    // What the target may have lost while it was away (written, not yet flushed) is copied
    // again: a failing flush marks it dirty. If the target is still down, copying pauses again.
    let flushError: string | null = null;
    await this.flushTarget().catch((err: unknown) => (flushError = msg(err)));
    if (this.state !== 'paused' && this.state !== 'failed') return { state: this.state };
    this.state = 'copying';
    this.reason = null;
    this.counters.bytesCopiedSinceResume = 0;
    this.cursor = 0;
    this.passes = 0;
    this.strikes = 0;
    this.bestDirty = Number.POSITIVE_INFINITY;
    this.paceUntil = 0;
    const dirtyBytes = this.dirtyBytes();
    this.env.emit('mirror.resumed', { dirtyBytes, flushError });
    this.kick();
    return { state: this.state, dirtyBytes, flushError };
  }

  private dirtyBytes(): number {
    let n = this.dirty.count * this.chunkSize;
    if (this.dirty.get(this.chunks - 1)) n -= this.chunks * this.chunkSize - this.size;
    return n;
  }

  /** Stops copying and mirroring; waits for what is in flight to the target, flushes it. */
  private async quiesce(): Promise<void> {
    this.wake();
    this.cutPace();
    await this.pumping;
    await Promise.allSettled([...this.targetOps]);
    if (this.ownsTarget && this.target.device.info().caps.flush)
      await this.target.device.flush(0).catch((err: unknown) => {
        this.env.logger.warn({ err }, 'flushing the mirror target failed');
      });
  }

  private async cancel(): Promise<Record<string, unknown>> {
    if (this.state === 'cutover' || this.state === 'cancelled')
      throw new FilterCommandError(`cannot cancel: the mirror is ${this.state}`);
    const consistent = this.state === 'synced';
    this.state = 'cancelled';
    this.reason = 'cancelled';
    await this.quiesce();
    if (this.stateFile !== null) await removeState(this.stateFile);
    const data = {
      consistent,
      dirtyBytes: this.dirtyBytes(),
      note: consistent
        ? 'the target is a consistent copy of the export as of the cancel'
        : 'the mirror was not synced: the target is incomplete',
    };
    this.env.emit('mirror.cancelled', data);
    return { state: this.state, ...data };
  }

  private async waitSynced(waitMs: number): Promise<void> {
    const deadline = performance.now() + waitMs;
    while (this.state === 'copying' && performance.now() < deadline)
      await new Promise((r) => setTimeout(r, 20));
  }

  private async cutover(
    timeoutMs: number | undefined,
    waitMs: number,
    verify = false,
  ): Promise<Record<string, unknown>> {
    if (this.env.replaceBackend === undefined)
      throw new FilterCommandError('this core cannot replace a backend');
    await this.waitSynced(waitMs);
    if (this.state !== 'synced')
      throw new FilterCommandError(
        `not synced yet (state ${this.state}${this.reason ? `: ${this.reason}` : ''}, ${this.dirtyBytes()} dirty bytes); wait for mirror.synced or pass wait=MS`,
      );
    if (verify) {
      const v = await this.verify();
      if ((v.differing as number) > 0)
        throw new FilterCommandError(
          `verify found ${String(v.differing)} differing chunk(s); no cutover`,
        );
    }
    try {
      await this.flushTarget();
    } catch (err) {
      this.kick();
      throw new FilterCommandError(
        `flushing the target failed (${msg(err)}); what it may have lost is copied again, no cutover`,
      );
    }
    const from = this.env.backendLabel ?? 'device';
    const to = this.target.label;
    // A daemon restarted from a config that still names the old backend must refuse it, not
    // serve stale data: the switch is recorded inside it, with every request held. Until the
    // record is durable nothing has reached the target alone, so a daemon that dies before
    // finds no record and the source current; one that dies after finds the record.
    const records = this.recordPaths(from);
    const at = new Date().toISOString();
    const commit = async (): Promise<void> => {
      const unsynced = (): boolean =>
        this.state !== 'synced' || this.dirty.count > 0 || this.copying.size > 0;
      if (unsynced())
        throw new Error(`the mirror left the synced state (${this.state}); nothing changed`);
      await this.writeRecords(records, {
        ...newRecord(this.env.exportName, from, to),
        at,
        state: 'done',
      });
      if (unsynced()) {
        // A command (cancel, pause) ran while the record was written: the switch is off.
        for (const p of records) await removeRecord(p).catch(() => undefined);
        throw new Error(`the mirror left the synced state (${this.state}); nothing changed`);
      }
      this.state = 'cutover';
      this.ownsTarget = false;
    };
    await this.env.replaceBackend(this.target.device, to, {
      ...(timeoutMs !== undefined ? { timeoutMs } : {}),
      commit,
    });
    this.cutoverAt = at;
    // The target is current now: a record of an earlier move away from it no longer holds.
    const targetFence = fenceOf(to);
    if (targetFence !== undefined)
      await removeRecord(targetFence).catch((err: unknown) =>
        this.env.logger.warn({ err, path: targetFence }, 'removing an old cutover record failed'),
      );
    if (this.stateFile !== null) await removeState(this.stateFile).catch(() => undefined);
    const data: Record<string, unknown> = { from, to, recorded: records };
    if (fenceOf(from) === undefined) {
      // The stateDir record only stops a mirror declared again; the daemon itself checks
      // only next to a file backend.
      data.warning = `the old backend ${from} is not a regular file, so no record could be put next to it: change the export's backend in the daemon's config to ${to} before the daemon restarts, or it serves the old data again`;
      this.env.logger.warn({ from, to }, String(data.warning));
    }
    this.env.emit('mirror.cutover', data);
    return { state: this.state, ...data };
  }

  /** Where a cutover away from `from` is recorded: next to a file source, and in stateDir. */
  private recordPaths(from: string): string[] {
    const paths: string[] = [];
    const fence = fenceOf(from);
    if (fence !== undefined) paths.push(fence);
    if (this.args.stateDir !== undefined)
      paths.push(stateDirRecord(this.args.stateDir, this.env.exportName));
    return paths;
  }

  private async writeRecords(paths: string[], record: CutoverRecord): Promise<void> {
    const written: string[] = [];
    try {
      for (const p of paths) {
        await writeRecord(p, record);
        written.push(p);
      }
    } catch (err) {
      for (const p of written) await removeRecord(p).catch(() => undefined);
      throw new FilterCommandError(
        `cannot record the cutover at ${paths[written.length]} (${msg(err)}); without it a restarted daemon could serve the old backend's stale data, so no cutover`,
      );
    }
  }

  /**
   * Compares source and target chunk by chunk (CRC-free: byte comparison of both reads). A
   * chunk still dirty is not compared (it is known to differ). A chunk that differs is read
   * again twice, 20 ms apart, so that a client write landing between the two reads is not
   * reported; only chunks that differ every time count.
   */
  private async verify(): Promise<Record<string, unknown>> {
    if (this.state === 'cutover' || this.state === 'cancelled')
      throw new FilterCommandError(`nothing to verify: the mirror is ${this.state}`);
    const started = performance.now();
    const below = this.env.deviceBelow!;
    const target = this.target.device;
    let compared = 0;
    let pending = 0;
    let differing = 0;
    const listed: number[] = [];
    const a = Buffer.allocUnsafe(this.chunkSize);
    const b = Buffer.allocUnsafe(this.chunkSize);
    for (let c = 0; c < this.chunks; c++) {
      if (this.dirty.get(c) || this.copying.has(c)) {
        pending++;
        continue;
      }
      const offset = c * this.chunkSize;
      const length = Math.min(this.chunkSize, this.size - offset);
      // A client write in flight on the chunk, or started while it is read, may have reached
      // one side and not yet the other: such a comparison says nothing, and is repeated.
      let same = false;
      let settled = false;
      for (let attempt = 0; attempt < VERIFY_ATTEMPTS && !same; attempt++) {
        if (attempt > 0) await new Promise((r) => setTimeout(r, 20));
        if (this.dirty.get(c)) break;
        const probe = { chunk: c, touched: this.activeWrites.has(c) };
        this.verifying = probe;
        try {
          await below.read(a.subarray(0, length), offset, 0);
          await target.read(b.subarray(0, length), offset, 0);
        } finally {
          this.verifying = null;
        }
        same = a.subarray(0, length).equals(b.subarray(0, length));
        settled = same || !(probe.touched || this.activeWrites.has(c));
        if (settled && !same) break; // a difference with no write about: a real one
      }
      if (this.dirty.get(c) || !settled) {
        pending++;
        continue;
      }
      compared++;
      if (!same) {
        differing++;
        if (listed.length < MAX_LISTED) listed.push(offset);
      }
    }
    const result = {
      chunks: this.chunks,
      compared,
      pending,
      differing,
      differingOffsets: listed,
      chunkSize: this.chunkSize,
      seconds: Math.round(performance.now() - started) / 1000,
    };
    this.lastVerify = { ...result, at: new Date().toISOString() };
    this.env.emit('mirror.verified', { compared, pending, differing });
    return result;
  }

  // ---- status and commands -------------------------------------------------------------

  status(): Record<string, unknown> {
    const dirtyBytes = this.dirtyBytes();
    const inCopy = [...this.copying.keys()].length;
    const done = this.state === 'cutover' ? this.size : Math.max(0, this.size - dirtyBytes);
    const rate = this.observedRate();
    const copyingNow = this.state === 'copying';
    return {
      state: this.state,
      reason: this.reason,
      target: this.args.target,
      mode: this.mode,
      mirroringWrites: this.mirroring(),
      size: this.size,
      chunkSize: this.chunkSize,
      chunks: this.chunks,
      bytesDone: done,
      progress: this.size === 0 ? 1 : Math.round((done / this.size) * 10000) / 10000,
      dirtyBytes,
      dirtyChunks: this.dirty.count,
      copyingChunks: inCopy,
      bytesCopied: this.counters.bytesCopied,
      bytesCopiedSinceResume: this.counters.bytesCopiedSinceResume,
      zeroBytes: this.counters.zeroBytes,
      chunksCopied: this.counters.chunksCopied,
      syncWrites: this.counters.syncWrites,
      syncFlushes: this.counters.syncFlushes,
      targetErrors: this.counters.targetErrors,
      passes: this.passes,
      rateLimit: this.rate,
      rate,
      etaSeconds:
        copyingNow && rate > 0
          ? Math.ceil(dirtyBytes / rate)
          : copyingNow && this.rate > 0
            ? Math.ceil(dirtyBytes / this.rate)
            : null,
      memoryBytes: Math.ceil(this.chunks / 8) * (this.written !== null ? 2 : 1),
      stateFile: this.stateFile,
      resumed: this.resumed,
      syncedAt: this.syncedAt,
      cutoverAt: this.cutoverAt,
      lastVerify: this.lastVerify,
    };
  }

  async control(command: string, args: Record<string, unknown>): Promise<unknown> {
    const ms = (v: unknown, what: string): number | undefined => {
      if (v === undefined) return undefined;
      const n = Number(v);
      if (!Number.isSafeInteger(n) || n < 0)
        throw new FilterCommandError(`${what} must be milliseconds >= 0`);
      return n;
    };
    switch (command) {
      case 'status':
        return this.status();
      case 'pause':
        if (this.state !== 'copying' && this.state !== 'synced')
          throw new FilterCommandError(`cannot pause: the mirror is ${this.state}`);
        this.pause('asked');
        return { state: this.state, dirtyBytes: this.dirtyBytes() };
      case 'resume':
        return this.resume();
      case 'cancel':
        return this.cancel();
      case 'set-rate': {
        this.rate = sizeValue(args.rate, 'rate');
        this.paceUntil = 0;
        this.cutPace();
        this.kick();
        return { rateLimit: this.rate };
      }
      case 'set-mode': {
        const mode = args.mode;
        if (mode !== 'sync' && mode !== 'background')
          throw new FilterCommandError('mode must be sync or background');
        this.setMode(mode, 'asked');
        return { mode: this.mode };
      }
      case 'cutover': {
        const verify = args.verify === true || args.verify === 'true';
        return this.cutover(
          ms(args.timeoutMs ?? args.timeout, 'timeoutMs'),
          ms(args.wait, 'wait') ?? 0,
          verify,
        );
      }
      case 'verify':
        return this.verify();
      default:
        throw unknownCommand('mirror', command, COMMANDS);
    }
  }

  async destroy(policy: string): Promise<void> {
    this.live = false;
    if (this.state === 'cutover') return; // the target is the export's backend now
    if (policy === 'cancel' && this.state !== 'cancelled') await this.cancel();
    else if (this.state !== 'cancelled') {
      // stop: keep what is known for a later resume.
      await this.quiesce();
      if (this.stateFile !== null) {
        try {
          await writeState(this.stateFile, {
            header: {
              target: this.args.target,
              size: this.size,
              chunkSize: this.chunkSize,
              clean: true,
              savedAt: new Date().toISOString(),
              bytesCopied: this.counters.bytesCopied,
            },
            bitmap: this.dirty.toBuffer(),
          });
        } catch (err) {
          this.env.logger.error(
            { err },
            'saving the mirror state failed: the next start copies all',
          );
        }
      }
    }
    if (this.ownsTarget) await this.target.device.close();
  }
}

/**
 * Refuses a mirror that would destroy newer data: one declared again (a config file) on an
 * export whose backend this mirror's stateDir says was cut over away from — it would copy the
 * stale source over the newer target — and one whose target is the export's own backend.
 */
async function refuseStaleOrSelf(args: MirrorArgs, env: FilterEnv): Promise<void> {
  const label = env.backendLabel;
  if (args.stateDir !== undefined) {
    const path = stateDirRecord(args.stateDir, env.exportName);
    const record = await readRecord(path);
    if (record !== undefined && (record.from === label || record.from === '?'))
      throw new Error(describeStale(label ?? 'device', { path, record }));
  }
  const own = fileOfLabel(label);
  if (own !== undefined && !isNbdUri(args.target)) {
    const same = (a: string, b: string): boolean => {
      try {
        return fs.realpathSync(a) === fs.realpathSync(b);
      } catch {
        return false;
      }
    };
    if (same(own, args.target))
      throw new Error(`the target ${args.target} is the export's own backend`);
  } else if (label === `nbd:${args.target}`)
    throw new Error(`the target ${args.target} is the export's own backend`);
}

/**
 * Runs a mirrored write on the target with FUA when the client asked for it. A target that
 * cannot do FUA gets the write and then a flush (what FUA means, at the price of a flush); a
 * target that can do neither has no durability to offer beyond the write itself.
 */
async function durably(
  target: Device,
  fua: boolean,
  op: (flags: number) => Promise<void>,
): Promise<void> {
  if (!fua) return op(0);
  const caps = target.info().caps;
  if (caps.fua) return op(RequestFlags.FUA);
  await op(0);
  if (caps.flush) await target.flush(0);
}
