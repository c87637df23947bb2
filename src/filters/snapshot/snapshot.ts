/**
 * The snapshot filter: point-in-time images of a live origin, by copy-before-write into a
 * difference store. One instance per origin export manages any number of snapshots of it
 * (up to MAX_SNAPSHOTS); each is served as a read-only image device, published as the export
 * `EXPORT@NAME` when the host can publish exports.
 *
 * Module map: cow.ts copies chunks before writes; store.ts keeps them durable on disk;
 * recover.ts rebuilds state on attach; image.ts reads an image; ../gate.ts holds writes still
 * for the instant of a snapshot; registry.ts tracks snapshots' states. This file ties them to the
 * filter API: hooks, commands, status, attach and detach. Design notes in docs/snapshots.md.
 */
import { randomUUID } from 'node:crypto';
import type { Logger } from 'pino';
import type { Device, IoContext } from '../../core/device.js';
import { assert } from '../../core/errors.js';
import { FilterCommandError, type Filter, type FilterEnv } from '../../core/filter.js';
import { commandValidator, sizeArg, unknownCommand } from '../args.js';
import { CopyEngine } from './cow.js';
import {
  MAX_CHUNK,
  MAX_GENERATION,
  MAX_SLOTS,
  MAX_SNAPSHOTS,
  MIN_CHUNK,
  isPowerOfTwo,
  type StoreMeta,
} from './format.js';
import { WriteGate } from '../gate.js';
import { SnapshotImage, type ImageSource } from './image.js';
import { recover, type Recovered } from './recover.js';
import { SNAPSHOT_NAME, type Snap, type SnapshotSet } from './registry.js';
import { DiffStore, type Recovery } from './store.js';

// A type, not an interface: it must fit Record<string, unknown> (the registry's argument type).
export type SnapshotArgs = {
  /** Directory holding the difference stores, one subdirectory per export. */
  store: string;
  /** Chunk size: a power of two, 4 KiB..4 MiB; a number or a size string ("64K"). */
  chunkSize?: number | string;
  /** Largest size of the store's data file; 0 or absent = unlimited. */
  limit?: number | string;
  /** Growth step of the data file. */
  growStep?: number | string;
};

export const DEFAULT_CHUNK_SIZE = 64 * 1024;
export const DEFAULT_GROW_STEP = 64 * 1024 * 1024;
/** How long take and delete wait for writes in flight before giving up (nothing changes). */
export const DEFAULT_FREEZE_TIMEOUT_MS = 10_000;

export const REMOVAL_POLICIES = ['keep', 'drop'] as const;

export interface SnapshotInfo {
  id: string;
  name: string;
  generation: number;
  takenAt: string;
  state: 'active' | 'failed';
  reason: string | null;
  /** The export name the image is published under. */
  image: string;
}

const COMMANDS = ['take', 'delete', 'list', 'status', 'verify'] as const;

const nameArgs = commandValidator<{ name: string; timeoutMs?: number }>(
  {
    type: 'object',
    properties: {
      name: { type: 'string', description: 'snapshot name: 1-64 letters, digits, ".", "_" or "-"' },
      timeoutMs: {
        type: 'integer',
        minimum: 1,
        maximum: 600_000,
        description: 'how long to wait for writes in flight',
      },
    },
    required: ['name'],
    additionalProperties: false,
  },
  'snapshot',
);
const noArgs = commandValidator<Record<string, never>>(
  { type: 'object', properties: {}, additionalProperties: false },
  'snapshot',
);

interface Geometry {
  chunkSize: number;
  limit: number;
  growStep: number;
}

function geometry(args: SnapshotArgs): Geometry {
  const chunkSize = sizeArg('chunkSize', args.chunkSize, DEFAULT_CHUNK_SIZE);
  if (!isPowerOfTwo(chunkSize) || chunkSize < MIN_CHUNK || chunkSize > MAX_CHUNK) {
    throw new Error(
      `chunkSize must be a power of two from ${MIN_CHUNK} to ${MAX_CHUNK} bytes, got ${chunkSize}`,
    );
  }
  const limit = sizeArg('limit', args.limit, 0);
  const growStep = sizeArg('growStep', args.growStep, DEFAULT_GROW_STEP);
  if (growStep < 1) throw new Error('growStep must be at least 1 byte');
  return { chunkSize, limit, growStep };
}

/** Limit and step in whole chunks of the store's own chunk size. */
function inChunks(g: Geometry, chunkSize: number): Geometry {
  const limit = Math.floor(g.limit / chunkSize) * chunkSize;
  if (g.limit > 0 && limit === 0)
    throw new Error(`limit ${g.limit} is smaller than one chunk (${chunkSize} bytes)`);
  const growStep = Math.max(chunkSize, Math.ceil(g.growStep / chunkSize) * chunkSize);
  return { chunkSize, limit, growStep };
}

export class SnapshotFilter implements Filter {
  private readonly gate = new WriteGate();
  private readonly images = new Map<string, SnapshotImage>();
  private readonly published = new Set<string>();
  private readonly source: ImageSource;
  private readonly log: Logger;
  private nextGeneration: number;
  private attached = true;
  private live = false;
  private open = true;

  private readonly snaps: SnapshotSet;
  private readonly cow: CopyEngine;

  private constructor(
    private readonly env: FilterEnv,
    private readonly store: DiffStore,
    private readonly metaBase: StoreMeta,
    private readonly geo: Geometry,
    rec: Recovered,
    private readonly recovery: Recovery & { notes: string[] },
  ) {
    this.log = env.logger;
    this.nextGeneration = metaBase.nextGeneration;
    this.snaps = rec.snaps;
    this.cow = new CopyEngine(
      store,
      rec.map,
      rec.slots,
      rec.snaps,
      { chunkSize: geo.chunkSize, originSize: env.below.size, limit: geo.limit },
      { saveMeta: () => this.saveMeta(), failed: (snaps, reason) => this.onFailed(snaps, reason) },
    );
    this.source = {
      chunkSize: geo.chunkSize,
      originSize: env.below.size,
      origin: env.deviceBelow!,
      find: (c, gen) => this.cow.find(c, gen),
      readSlots: (slot, within, buf) => this.store.readSlots(slot, within, buf),
      isOpen: () => this.open,
    };
    for (const s of this.snaps.all()) this.images.set(s.name, new SnapshotImage(this.source, s));
  }

  /** The prepare step: opens (or creates) the store and rebuilds its state. */
  static async open(args: SnapshotArgs, env: FilterEnv): Promise<SnapshotFilter> {
    if (env.deviceBelow === undefined) {
      throw new Error(
        'the snapshot filter needs a host that provides deviceBelow (to read the origin for images)',
      );
    }
    const wanted = geometry(args);
    const opened = await DiffStore.open({
      parent: args.store,
      exportName: env.exportName,
      backendLabel: env.backendLabel ?? null,
      chunkSize: wanted.chunkSize,
      originSize: env.below.size,
      limit: wanted.limit,
      growStep: wanted.growStep,
      logger: env.logger,
    });
    try {
      const geo = inChunks(wanted, opened.meta.chunkSize);
      if (opened.meta.chunkSize !== wanted.chunkSize && !opened.recovery.created) {
        env.logger.info(
          { store: opened.store.dir, chunkSize: opened.meta.chunkSize },
          'existing store keeps its own chunk size',
        );
      }
      const maxSlots = geo.limit > 0 ? geo.limit / geo.chunkSize : MAX_SLOTS;
      const rec: Recovered = recover(opened, {
        size: env.below.size,
        backendLabel: env.backendLabel ?? null,
        limit: geo.limit,
        maxSlots,
      });
      const filter = new SnapshotFilter(env, opened.store, opened.meta, geo, rec, {
        ...opened.recovery,
        notes: rec.notes,
      });
      // Attached, durably, before any write can reach the origin through us: a crash from now
      // on is recognised as one at the next attach.
      await filter.saveMeta();
      if (rec.rewrite !== null)
        await opened.store.rewriteLog(
          rec.rewrite.records,
          filter.metaContent(),
          rec.rewrite.keepOld,
        );
      for (const note of rec.notes) env.logger.warn({ store: opened.store.dir }, note);
      if (opened.recovery.unclean || rec.notes.length > 0) {
        env.emit('snapshot.recovered', {
          store: opened.store.dir,
          unclean: opened.recovery.unclean,
          notes: rec.notes,
        });
      }
      return filter;
    } catch (err) {
      await opened.store.close();
      throw err;
    }
  }

  // ---- hooks: writes, trims and zeroing preserve what they overwrite ---------------------------

  write(next: Device, data: Buffer, offset: number, flags: number, ctx?: IoContext): Promise<void> {
    return this.mutate(next, offset, data.length, () => next.write(data, offset, flags, ctx));
  }

  trim(
    next: Device,
    offset: number,
    length: number,
    flags: number,
    ctx?: IoContext,
  ): Promise<void> {
    return this.mutate(next, offset, length, () => next.trim(offset, length, flags, ctx));
  }

  writeZeroes(
    next: Device,
    offset: number,
    length: number,
    flags: number,
    ctx?: IoContext,
  ): Promise<void> {
    return this.mutate(next, offset, length, () => next.writeZeroes(offset, length, flags, ctx));
  }

  private mutate(
    next: Device,
    offset: number,
    length: number,
    op: () => Promise<void>,
  ): Promise<void> {
    const frozen = this.gate.gate;
    if (frozen !== null) return frozen.then(() => this.mutate(next, offset, length, op));
    this.gate.enter();
    let done: Promise<void>;
    try {
      done = this.cow.needsCopy(offset, length)
        ? this.cow.preserveRange(next, offset, length).then(op)
        : op();
    } catch (err) {
      done = Promise.reject(err);
    }
    return done.finally(this.gate.leave);
  }

  // ---- life cycle -----------------------------------------------------------------------------

  activate(): void {
    this.live = true;
    for (const s of this.snaps.all()) this.publishImage(s);
  }

  async destroy(policy: string): Promise<void> {
    this.open = false;
    for (const name of [...this.published]) this.unpublish(name);
    if (policy === 'drop') {
      await this.store.drop();
      return;
    }
    assert(policy === 'keep', `unknown removal policy ${policy}`);
    this.attached = false;
    try {
      await this.saveMeta();
    } finally {
      await this.store.close();
    }
  }

  // ---- commands -------------------------------------------------------------------------------

  async control(command: string, args: Record<string, unknown>): Promise<unknown> {
    switch (command) {
      case 'take': {
        const a = nameArgs(args);
        return this.take(a.name, a.timeoutMs);
      }
      case 'delete': {
        const a = nameArgs(args);
        return this.delete(a.name, a.timeoutMs);
      }
      case 'list':
        noArgs(args);
        return this.list();
      case 'status':
        noArgs(args);
        return this.status();
      case 'verify':
        noArgs(args);
        this.checkOpen();
        return this.cow.verify();
      default:
        throw unknownCommand('snapshot', command, COMMANDS);
    }
  }

  get exportName(): string {
    return this.env.exportName;
  }

  /** Takes a snapshot: the instant is when writes in flight have drained. */
  async take(name: string, timeoutMs = DEFAULT_FREEZE_TIMEOUT_MS): Promise<SnapshotInfo> {
    this.checkOpen();
    this.checkNewName(name);
    await this.flushOrigin();
    return this.exclusive(async () => {
      const thaw = await this.freeze(timeoutMs);
      try {
        return await this.takeFrozen(name);
      } finally {
        thaw();
      }
    });
  }

  /** Deletes a snapshot and frees the store space only it used. */
  async delete(
    name: string,
    timeoutMs = DEFAULT_FREEZE_TIMEOUT_MS,
  ): Promise<{ name: string; generation: number; freedChunks: number }> {
    this.checkOpen();
    if (this.snaps.get(name) === undefined)
      throw new FilterCommandError(`no snapshot named "${name}"`);
    return this.exclusive(async () => {
      const thaw = await this.freeze(timeoutMs);
      try {
        return await this.deleteFrozen(name);
      } finally {
        thaw();
      }
    });
  }

  list(): SnapshotInfo[] {
    return this.snaps
      .all()
      .filter((s) => s.state !== 'pending' && s.state !== 'deleted')
      .map((s) => this.describe(s));
  }

  /** A snapshot's image device, for library users (the same one that is published). */
  image(name: string): SnapshotImage | undefined {
    const s = this.snaps.get(name);
    return s !== undefined && s.state !== 'pending' ? this.images.get(name) : undefined;
  }

  status(): unknown {
    const cs = this.geo.chunkSize;
    const owned = new Map<number, { chunks: number; bytes: number }>();
    const gens = this.snaps.all().map((s) => s.generation);
    for (const g of gens) owned.set(g, { chunks: 0, bytes: 0 });
    this.cow.map.forEach((_c, slot, low, high) => {
      for (const g of gens) {
        if (g > low && g <= high) {
          const o = owned.get(g)!;
          o.chunks++;
          if (slot !== 0xffffffff) o.bytes += cs;
        }
      }
    });
    const slots = this.cow.slots;
    return {
      store: {
        dir: this.store.dir,
        chunkSize: cs,
        limit: this.geo.limit,
        growStep: this.geo.growStep,
        dataBytes: this.store.dataBytes,
        usedBytes: slots.inUse * cs,
        usedSlots: slots.inUse,
        freeSlots: slots.freeSlots,
        logBytes: this.store.logBytes,
        commits: this.store.batches,
        broken: this.store.broken?.message ?? null,
      },
      origin: { size: this.env.below.size, chunks: this.cow.map.chunkCount },
      copies: {
        held: this.cow.map.size,
        copiedSinceAttach: this.cow.copied,
        bytesCopiedSinceAttach: this.cow.bytesCopied,
        zeroChunksSinceAttach: this.cow.zeroCopies,
        overflows: this.cow.overflows,
        inFlight: this.cow.inFlight,
      },
      writes: { inFlight: this.gate.inFlight, frozen: this.gate.gate !== null },
      memoryBytes: this.cow.map.memoryBytes,
      recovery: {
        unclean: this.recovery.unclean,
        droppedRecords: this.recovery.droppedRecords,
        notes: this.recovery.notes,
      },
      snapshots: this.list().map((info) => ({ ...info, ...owned.get(info.generation)! })),
    };
  }

  // ---- the pieces of take and delete, also used by group takes (group.ts) ---------------------

  /** Runs `fn` with no other take or delete on this filter at the same time. */
  exclusive<T>(fn: () => Promise<T>): Promise<T> {
    return this.gate.exclusive(fn);
  }

  /** Holds writes and waits for those in flight; resolves with the thaw function. */
  async freeze(timeoutMs: number): Promise<() => void> {
    try {
      return await this.gate.freeze(timeoutMs);
    } catch (err) {
      throw new Error(
        `export "${this.exportName}": cannot hold writes still: ${(err as Error).message}; nothing changed`,
        { cause: err },
      );
    }
  }

  /**
   * Makes the origin's acknowledged writes durable: a snapshot then survives a power loss,
   * not only a daemon crash (the page cache keeps those). Done before freezing, so that the
   * flush never waits inside a frozen gate for a stack change that waits for our held writes.
   */
  async flushOrigin(): Promise<void> {
    const origin = this.env.deviceBelow!;
    if (origin.info().caps.flush) await origin.flush(0);
  }

  /** Records a new snapshot; writes must be frozen. */
  async takeFrozen(name: string): Promise<SnapshotInfo> {
    assert(
      this.gate.gate !== null && this.gate.inFlight === 0,
      'snapshot taken while writes are in flight',
    );
    this.checkOpen();
    this.checkNewName(name);
    if (this.store.broken !== null)
      throw new Error(`the difference store is broken: ${this.store.broken.message}`);
    const generation = this.nextGeneration;
    assert(generation <= MAX_GENERATION, 'snapshot generations exhausted');
    const snap: Snap = {
      id: randomUUID(),
      name,
      generation,
      takenAt: new Date().toISOString(),
      state: 'pending',
      reason: null,
      durable: null,
      deleting: false,
    };
    this.snaps.add(snap);
    this.nextGeneration++; // never reused, even if this take fails
    try {
      await this.saveMeta();
    } catch (err) {
      this.snaps.remove(snap);
      await this.saveMeta().catch((e: unknown) =>
        this.log.error({ err: e }, 'rewriting the meta after a failed take failed'),
      );
      throw new Error(`recording snapshot "${name}" failed: ${(err as Error).message}`, {
        cause: err,
      });
    }
    snap.state = 'active';
    this.snaps.recompute();
    // Writes are still held: the other filters' change maps are exact for this instant.
    const views = this.env.captureInstant?.() ?? [];
    this.images.set(name, new SnapshotImage(this.source, snap, views));
    this.publishImage(snap);
    const info = this.describe(snap);
    this.env.emit('snapshot.taken', { name, generation, id: snap.id, image: info.image });
    return info;
  }

  /** Deletes a snapshot; writes must be frozen. */
  async deleteFrozen(
    name: string,
  ): Promise<{ name: string; generation: number; freedChunks: number }> {
    assert(this.gate.gate !== null, 'snapshot deleted while writes are not frozen');
    this.checkOpen();
    const s = this.snaps.get(name);
    if (s === undefined || s.state === 'pending')
      throw new FilterCommandError(`no snapshot named "${name}"`);
    s.deleting = true;
    try {
      await this.saveMeta();
    } catch (err) {
      s.deleting = false;
      throw err;
    }
    // On disk it is gone: only now may its slots be reused.
    this.unpublish(this.imageName(name));
    this.images.delete(name);
    this.snaps.remove(s);
    const freedChunks = this.cow.pruneDead();
    this.env.emit('snapshot.deleted', { name, generation: s.generation, freedChunks });
    return { name, generation: s.generation, freedChunks };
  }

  // ---- internals ------------------------------------------------------------------------------

  metaContent(): StoreMeta {
    return {
      ...this.metaBase,
      backend: this.env.backendLabel ?? this.metaBase.backend,
      originSize: this.env.below.size,
      nextGeneration: this.nextGeneration,
      attached: this.attached,
      snapshots: this.snaps.toRecords(),
    };
  }

  private saveMeta(): Promise<void> {
    return this.store.writeMeta(() => this.metaContent());
  }

  private onFailed(snaps: readonly Snap[], reason: string): void {
    for (const s of snaps) {
      this.log.warn({ snapshot: s.name, generation: s.generation, reason }, 'snapshot failed');
      this.env.emit('snapshot.failed', { name: s.name, generation: s.generation, reason });
    }
    // The FAIL record made it durable; the meta catches up for people reading it.
    this.saveMeta().catch((err: unknown) =>
      this.log.error({ err }, 'recording failed snapshots in the meta failed'),
    );
  }

  private checkOpen(): void {
    if (!this.open)
      throw new Error(`the snapshot filter of export "${this.env.exportName}" has been removed`);
  }

  private checkNewName(name: string): void {
    if (!SNAPSHOT_NAME.test(name))
      throw new FilterCommandError(
        `invalid snapshot name "${name}": 1-64 letters, digits, '.', '_' or '-'`,
      );
    if (this.snaps.get(name) !== undefined)
      throw new FilterCommandError(`a snapshot named "${name}" already exists`);
    if (this.snaps.count >= MAX_SNAPSHOTS)
      throw new FilterCommandError(
        `at most ${MAX_SNAPSHOTS} snapshots per export; delete one first`,
      );
  }

  private describe(s: Snap): SnapshotInfo {
    return {
      id: s.id,
      name: s.name,
      generation: s.generation,
      takenAt: s.takenAt,
      state: s.state === 'active' ? 'active' : 'failed',
      reason: s.reason,
      image: this.imageName(s.name),
    };
  }

  private imageName(name: string): string {
    return `${this.env.exportName}@${name}`;
  }

  private publishImage(s: Snap): void {
    const name = this.imageName(s.name);
    const image = this.images.get(s.name);
    if (
      !this.live ||
      this.published.has(name) ||
      image === undefined ||
      this.env.publishExport === undefined
    )
      return;
    try {
      this.env.publishExport(name, image, {
        readOnly: true,
        description: `snapshot "${s.name}" of ${this.env.exportName} taken ${s.takenAt}`,
      });
      this.published.add(name);
    } catch (err) {
      this.log.warn({ err, image: name }, 'snapshot image not published');
      this.env.emit('snapshot.image-not-published', {
        name: s.name,
        image: name,
        error: (err as Error).message,
      });
    }
  }

  private unpublish(name: string): void {
    if (!this.published.delete(name)) return;
    this.env.unpublishExport?.(name);
  }
}
