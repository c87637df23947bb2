/**
 * The cbt filter: changed block tracking. For each block of the export, the generation in which
 * it last changed (write, trim, write-zeroes); commands start a generation, list what changed
 * since one, reset the history (a new id) or mark ranges changed. The map is readable as
 * block-status contexts — `qemu:dirty-bitmap:NAME`, `devfilter:cbt:NAME` and
 * `devfilter:cbt:NAME:since:N` — through the core's extra-context hook, so that nbdinfo --map
 * and QEMU-style backup tools read it unchanged; the filter itself knows nothing of NBD.
 *
 * With `dir`, the map survives restarts (store.ts): a block's change is journaled (and
 * fdatasync'd) before the request that changes it goes down — only the first change of a block
 * in a generation costs that — so after kill -9 the map may report more, never fewer.
 * map.ts holds the map; format.ts the on-disk format (docs/cbt-format.md).
 */
import { randomUUID } from 'node:crypto';
import type { Device, DeviceInfo, Extent, IoContext } from '../../core/device.js';
import { RequestFlags } from '../../core/device.js';
import { DeviceError } from '../../core/errors.js';
import {
  FilterCommandError,
  passContextStatus,
  type Filter,
  type FilterEnv,
  type InstantView,
} from '../../core/filter.js';
import { commandValidator, sizeArg, unknownCommand } from '../args.js';
import {
  ChangeMap,
  ChangeView,
  MAX_BLOCKS,
  MAX_GENERATION,
  blockCountOf,
  isPowerOfTwo,
  statusExtents,
} from './map.js';
import { CbtStore, DEFAULT_JOURNAL_LIMIT, type Recovery } from './store.js';

// A type, not an interface: it must fit Record<string, unknown> (the registry's argument type).
export type CbtArgs = {
  /** Tracking unit: a power of two, 4 KiB..64 MiB; a number or a size string ("64K"). */
  blockSize?: number | string;
  /** Parent directory of the persistent state; absent = in memory only. */
  dir?: string;
  /** Journal size that triggers folding it into the map. */
  journalLimit?: number | string;
};

export const DEFAULT_BLOCK_SIZE = 64 * 1024;
export const MIN_BLOCK_SIZE = 4096;
export const MAX_BLOCK_SIZE = 64 * 1024 * 1024;
export const REMOVAL_POLICIES = ['keep', 'drop'] as const;
/** Extents one `changed` answer lists by default; more with `limit`, or continue at `next`. */
export const DEFAULT_CHANGED_LIMIT = 100_000;
export const MAX_CHANGED_LIMIT = 1_000_000;

const COMMANDS = ['generation', 'changed', 'reset', 'mark-dirty', 'bitmap', 'status'] as const;

const noArgs = commandValidator<Record<string, never>>(
  { type: 'object', properties: {}, additionalProperties: false },
  'cbt',
);
const changedArgs = commandValidator<{
  since?: number;
  id?: string;
  offset?: number;
  length?: number;
  limit?: number;
}>(
  {
    type: 'object',
    properties: {
      since: {
        type: 'integer',
        minimum: 0,
        description: 'generation: blocks changed in it or later (default: the current one)',
      },
      id: {
        type: 'string',
        description: 'the generation id the caller knows: refused if the history was reset',
      },
      offset: { type: 'integer', minimum: 0, default: 0 },
      length: { type: 'integer', minimum: 0 },
      limit: { type: 'integer', minimum: 1, maximum: MAX_CHANGED_LIMIT },
    },
    additionalProperties: false,
  },
  'changed',
);
const rangeArgs = commandValidator<{ offset: number; length: number }>(
  {
    type: 'object',
    properties: {
      offset: { type: 'integer', minimum: 0 },
      length: { type: 'integer', minimum: 0 },
    },
    required: ['offset', 'length'],
    additionalProperties: false,
  },
  'mark-dirty',
);
const bitmapArgs = commandValidator<{ since: number | string }>(
  {
    type: 'object',
    properties: {
      since: {
        anyOf: [{ type: 'integer', minimum: 1 }, { const: 'current' }],
        description:
          'what qemu:dirty-bitmap:NAME reports: changed since generation N, or "current"',
      },
    },
    required: ['since'],
    additionalProperties: false,
  },
  'bitmap',
);

/** Checks the arguments beyond the schema; throws with a message that says what is wrong. */
export function checkArgs(
  args: CbtArgs,
  size: number,
): { blockSize: number; journalLimit: number } {
  const blockSize = sizeArg('blockSize', args.blockSize, DEFAULT_BLOCK_SIZE);
  if (!isPowerOfTwo(blockSize) || blockSize < MIN_BLOCK_SIZE || blockSize > MAX_BLOCK_SIZE)
    throw new Error(
      `blockSize must be a power of two from ${MIN_BLOCK_SIZE} to ${MAX_BLOCK_SIZE} bytes, got ${blockSize}`,
    );
  const blocks = blockCountOf(size, blockSize);
  if (blocks > MAX_BLOCKS)
    throw new Error(
      `a ${size}-byte device has ${blocks} blocks of ${blockSize} bytes, more than the ${MAX_BLOCKS} a map may hold: choose a larger blockSize`,
    );
  const journalLimit = sizeArg('journalLimit', args.journalLimit, DEFAULT_JOURNAL_LIMIT);
  if (journalLimit < 4096) throw new Error('journalLimit must be at least 4096 bytes');
  return { blockSize, journalLimit };
}

const toEio = (err: unknown): never => {
  throw new DeviceError('EIO', `cbt: recording the change failed: ${(err as Error).message}`, {
    cause: err,
  });
};

export class CbtFilter implements Filter {
  /** What qemu:dirty-bitmap:NAME reports: changed since this generation; null = the current. */
  private bitmapSince: number | null = null;
  /** Block ranges [first, end) of the writes, trims and zeroings in flight. */
  private readonly inFlight = new Set<[number, number]>();
  private readonly qemuContext: string;
  private readonly ownContext: string;
  private readonly sincePrefix: string;

  private constructor(
    private readonly env: FilterEnv,
    private readonly map: ChangeMap,
    private readonly store: CbtStore | null,
    private readonly recovery: Recovery,
  ) {
    this.qemuContext = `qemu:dirty-bitmap:${env.filterName}`;
    this.ownContext = `devfilter:cbt:${env.filterName}`;
    this.sincePrefix = `devfilter:cbt:${env.filterName}:since:`;
  }

  /** The prepare step: checks arguments, opens (or creates) the state and replays a journal. */
  static async open(args: CbtArgs, env: FilterEnv): Promise<CbtFilter> {
    const size = env.below.size;
    const { blockSize, journalLimit } = checkArgs(args, size);
    if (args.dir === undefined) {
      const map = new ChangeMap(size, blockSize, { generation: 1, id: randomUUID() });
      return new CbtFilter(env, map, null, {
        state: 'created',
        replayedRecords: 0,
        ignoredBytes: 0,
        notes: [],
      });
    }
    const { store, map, recovery } = await CbtStore.open({
      dir: args.dir,
      exportName: env.exportName,
      filterName: env.filterName,
      blockSize,
      size,
      journalLimit,
      logger: env.logger,
    });
    for (const note of recovery.notes) env.logger.warn({ dir: store.dir }, note);
    if (recovery.state === 'recovered' || recovery.state === 'reset')
      env.emit('cbt.recovered', {
        dir: store.dir,
        state: recovery.state,
        replayedRecords: recovery.replayedRecords,
        notes: recovery.notes,
      });
    return new CbtFilter(env, map, store, recovery);
  }

  info(below: DeviceInfo): DeviceInfo {
    return {
      ...below,
      statusContexts: [...(below.statusContexts ?? []), this.qemuContext, this.ownContext],
      statusContextFamilies: [...(below.statusContextFamilies ?? []), this.sincePrefix],
    };
  }

  // ---- hooks: every change is recorded before it goes down -----------------------------------

  write(next: Device, data: Buffer, offset: number, flags: number, ctx?: IoContext): Promise<void> {
    return this.mutate(offset, data.length, () => next.write(data, offset, flags, ctx));
  }

  trim(
    next: Device,
    offset: number,
    length: number,
    flags: number,
    ctx?: IoContext,
  ): Promise<void> {
    return this.mutate(offset, length, () => next.trim(offset, length, flags, ctx));
  }

  writeZeroes(
    next: Device,
    offset: number,
    length: number,
    flags: number,
    ctx?: IoContext,
  ): Promise<void> {
    return this.mutate(offset, length, () => next.writeZeroes(offset, length, flags, ctx));
  }

  contextStatus(
    next: Device,
    context: string,
    offset: number,
    length: number,
    flags: number,
    ctx?: IoContext,
  ): Promise<Extent[]> {
    const since = this.sinceOf(context);
    if (since === undefined) return passContextStatus(next, context, offset, length, flags, ctx);
    const gens = this.map.gens;
    const t = Math.max(1, since);
    const max = (flags & RequestFlags.REQ_ONE) !== 0 ? 1 : undefined;
    return Promise.resolve(
      statusExtents((b) => gens[b]! >= t, this.map.blockSize, this.map.size, offset, length, max),
    );
  }

  /**
   * Marks the blocks, waits until the mark is durable, runs the request; if a new generation
   * (or a reset) began meanwhile, marks them again in it before completing — the request may
   * land after that instant. A request that fails below stays marked: over-report, never under.
   */
  private mutate(offset: number, length: number, op: () => Promise<void>): Promise<void> {
    const [first, end] = this.map.blocksOf(offset, length);
    if (first === end) return op();
    const epoch = this.map.epoch;
    let before: Promise<void> | null;
    try {
      before = this.note(first, end);
    } catch (err) {
      return Promise.reject(err);
    }
    // In flight until it settles: a new generation marks it durably before it begins.
    const entry: [number, number] = [first, end];
    this.inFlight.add(entry);
    const run = (before === null ? op() : before.then(op)).finally(() =>
      this.inFlight.delete(entry),
    );
    return run.then(
      () => (this.map.epoch === epoch ? undefined : (this.note(first, end) ?? undefined)),
      async (err: unknown) => {
        if (this.map.epoch !== epoch) await this.note(first, end);
        throw err;
      },
    );
  }

  /** Marks blocks [first, end) in the current generation; a promise when it must be awaited. */
  private note(first: number, end: number): Promise<void> | null {
    const runs = this.map.mark(first, end);
    const store = this.store;
    if (store === null) return null;
    if (runs !== null) return store.mark(runs, this.map.generation).catch(toEio);
    // Marked already, but perhaps by a request whose record is still on its way to disk.
    return store.busy ? store.barrier().catch(toEio) : null;
  }

  private sinceOf(context: string): number | undefined {
    if (context === this.qemuContext) return this.bitmapSince ?? this.map.generation;
    if (context === this.ownContext) return this.map.generation;
    if (context.startsWith(this.sincePrefix)) {
      const digits = context.slice(this.sincePrefix.length);
      if (/^[0-9]{1,15}$/.test(digits)) return Number(digits);
    }
    return undefined;
  }

  // ---- life cycle -----------------------------------------------------------------------------

  async destroy(policy: string): Promise<void> {
    if (this.store === null) return;
    if (policy === 'drop') await this.store.drop();
    else await this.store.close();
  }

  // ---- commands -------------------------------------------------------------------------------

  async control(command: string, args: Record<string, unknown>): Promise<unknown> {
    switch (command) {
      case 'generation':
        noArgs(args);
        return this.newGeneration();
      case 'changed': {
        const a = changedArgs(args);
        return this.changed(a);
      }
      case 'reset':
        noArgs(args);
        return this.reset();
      case 'mark-dirty': {
        const a = rangeArgs(args);
        return this.markDirty(a.offset, a.length);
      }
      case 'bitmap': {
        const a = bitmapArgs(args);
        this.bitmapSince = a.since === 'current' ? null : Number(a.since);
        return { context: this.qemuContext, since: a.since };
      }
      case 'status':
        noArgs(args);
        return this.status();
      default:
        throw unknownCommand('cbt', command, COMMANDS);
    }
  }

  /** Starts a new generation, durably; returns the previous and the new number. */
  async newGeneration(): Promise<{ id: string; previous: number; current: number }> {
    if (this.map.generation >= MAX_GENERATION)
      throw new FilterCommandError(
        `generation ${this.map.generation} is the last one; reset the history`,
      );
    const r = this.map.newGeneration();
    // Requests in flight may land after this instant: they belong to the new generation too,
    // durably before the command returns (the backup's snapshot follows it). Their own
    // re-mark after completing would come too late for a crash in between.
    const runs: number[] = [];
    for (const [first, end] of this.inFlight) {
      const marked = this.map.mark(first, end);
      if (marked !== null) runs.push(...marked);
    }
    await Promise.all([
      this.store?.generation(r.current),
      runs.length > 0 ? this.store?.mark(runs, r.current) : undefined,
    ]);
    this.env.emit('cbt.generation', { id: this.map.id, ...r });
    return { id: this.map.id, ...r };
  }

  /** The changed extents since generation `since` (default: the current one). */
  changed(a: { since?: number; id?: string; offset?: number; length?: number; limit?: number }): {
    id: string;
    generation: number;
    since: number;
    blockSize: number;
    extents: Array<{ offset: number; length: number }>;
    bytes: number;
    blocks: number;
    next: number | null;
  } {
    const map = this.map;
    if (a.id !== undefined && a.id !== map.id)
      throw new FilterCommandError(
        `the history was reset: generation id is ${map.id}, not ${a.id}; a full backup is needed`,
      );
    const since = a.since ?? map.generation;
    const offset = a.offset ?? 0;
    if (offset > map.size)
      throw new FilterCommandError(`offset ${offset} is past the end (${map.size} bytes)`);
    const length = Math.min(a.length ?? map.size - offset, map.size - offset);
    const list = map.changed(since, offset, length, a.limit ?? DEFAULT_CHANGED_LIMIT);
    return {
      id: map.id,
      generation: map.generation,
      since,
      blockSize: map.blockSize,
      ...list,
    };
  }

  /** Forgets the history: every block unchanged, generation 1, a new id. */
  async reset(): Promise<{ id: string; previousId: string; generation: number }> {
    const previousId = this.map.id;
    this.map.reset(randomUUID());
    this.bitmapSince = null;
    await this.store?.reset();
    this.env.emit('cbt.reset', { id: this.map.id, previousId });
    return { id: this.map.id, previousId, generation: this.map.generation };
  }

  /** Marks a byte range changed in the current generation (durably, with `dir`). */
  async markDirty(
    offset: number,
    length: number,
  ): Promise<{ generation: number; newlyMarkedBlocks: number }> {
    if (offset > this.map.size || length > this.map.size - offset)
      throw new FilterCommandError(
        `range [${offset}, +${length}) is beyond the end of the device (${this.map.size} bytes)`,
      );
    const [first, end] = this.map.blocksOf(offset, length);
    const before = this.map.dirtyNow;
    await this.note(first, end);
    return { generation: this.map.generation, newlyMarkedBlocks: this.map.dirtyNow - before };
  }

  /**
   * For a snapshot taken now: what `qemu:dirty-bitmap:NAME` and `devfilter:cbt:NAME` report
   * at this instant (changed since the `bitmap since` setting, or in the current generation),
   * frozen, 1 bit per block. Its image answers both contexts with it.
   */
  instantView(): InstantView {
    const view = this.map.view(this.bitmapSince ?? this.map.generation);
    const own = this.bitmapSince === null ? view : this.map.view(this.map.generation);
    return {
      statusContexts: [this.qemuContext, this.ownContext],
      contextStatus: (context, offset, length, flags) => {
        const v = context === this.qemuContext ? view : own;
        const extents = v.status(offset, length);
        return (flags & RequestFlags.REQ_ONE) !== 0 ? extents.slice(0, 1) : extents;
      },
      facts: { id: view.meta.id, since: view.meta.since, generation: view.meta.generation },
    };
  }

  /**
   * An immutable "changed since `since`" as of now, for a snapshot image to serve later as
   * its frozen map (take it while writes are held still for an exact instant).
   */
  view(since: number = this.map.generation): ChangeView {
    return this.map.view(since);
  }

  get generationId(): string {
    return this.map.id;
  }

  get generation(): number {
    return this.map.generation;
  }

  status(): unknown {
    const map = this.map;
    const store = this.store?.stats();
    return {
      id: map.id,
      generation: map.generation,
      blockSize: map.blockSize,
      blocks: map.blockCount,
      deviceSize: map.size,
      dirtyBlocks: map.dirtyNow,
      dirtyBytes: Math.min(map.dirtyNow * map.blockSize, map.size),
      memoryBytes: map.memoryBytes,
      contexts: {
        qemu: this.qemuContext,
        current: this.ownContext,
        since: `${this.sincePrefix}N`,
        qemuReports: this.bitmapSince === null ? 'current' : this.bitmapSince,
      },
      persistence:
        store === undefined
          ? { mode: 'memory', note: 'no dir: the map is lost when the filter goes' }
          : {
              mode: 'journal',
              dir: store.dir,
              state: this.recovery.state,
              recovered: this.recovery.state === 'recovered',
              replayedRecords: this.recovery.replayedRecords,
              ignoredBytes: this.recovery.ignoredBytes,
              notes: this.recovery.notes,
              journalBytes: store.journalBytes,
              journalRecords: store.journalRecords,
              commits: store.commits,
              compactions: store.compactions,
              lastError: store.lastError,
            },
    };
  }
}
