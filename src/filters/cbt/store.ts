/**
 * Persistence of the cbt filter (docs/cbt-format.md): DIR/EXPORT/FILTER/ holds
 *
 *   map      the whole change map, replaced atomically (temp + fsync + rename + fsync dir)
 *   journal  while attached: records of blocks about to change and of new generations since
 *            that map, appended and fdatasync'd before the change goes down
 *   lock     the pid of the process that has the state attached
 *
 * A clean detach writes the map and deletes the journal; a journal found at attach means the
 * last run did not end cleanly, and replaying it restores every block that may have changed.
 * Appends are group-committed: requests that arrive while a commit is running share the next
 * write + fdatasync. Operations that replace the map (reset, compaction, detach) run in the
 * same queue, in order with the records around them.
 */
import { randomUUID } from 'node:crypto';
import fs from 'node:fs';
import { join } from 'node:path';
import type { Logger } from 'pino';
import { closeFd, fdatasync, pwriteFull } from '../../backends/fdio.js';
import {
  fsyncDir,
  ftruncateFd,
  openFd,
  readIfExists,
  takeLock,
  writeFileAtomic,
} from '../../core/durable-files.js';
import {
  FLAG_CLEAN,
  FormatError,
  JOURNAL_HEADER_BYTES,
  RECORD_BYTES,
  RecordType,
  decodeJournalHeader,
  decodeMap,
  decodeRecords,
  encodeJournalHeader,
  encodeMap,
  encodeRecord,
} from './format.js';
import { ChangeMap, blockCountOf } from './map.js';
import { makeDirs } from '../../core/make-dirs.js';

const MAP_FILE = 'map';
const JOURNAL_FILE = 'journal';
const LOCK_FILE = 'lock';

/** The journal is folded into a new map once it is this large (or half the map, if larger). */
export const DEFAULT_JOURNAL_LIMIT = 4 * 1024 * 1024;

export interface Recovery {
  /** How the state was found: new, after a clean detach, or after a crash (journal replayed). */
  state: 'created' | 'clean' | 'recovered' | 'reset';
  /** Journal records replayed (after a crash). */
  replayedRecords: number;
  /** Bytes of torn or foreign journal tail ignored. */
  ignoredBytes: number;
  notes: string[];
}

export interface StoreStats {
  dir: string;
  journalBytes: number;
  journalRecords: number;
  commits: number;
  compactions: number;
  lastError: string | null;
}

type Item =
  | {
      kind: 'records';
      /** Flat [type, generation, start, count, ...]; encoded when written (the epoch may move). */
      recs: number[] | null;
      resolve: () => void;
      reject: (e: unknown) => void;
    }
  | {
      kind: 'task';
      run: () => Promise<void>;
      resolve: () => void;
      reject: (e: unknown) => void;
    };

/** Takes the state directory's lock file (see takeLock). */
function lockDir(dir: string): Promise<() => Promise<void>> {
  return takeLock(join(dir, LOCK_FILE), `cbt state ${dir}`);
}

export interface OpenOptions {
  /** The parent directory (must exist); the state lives in DIR/EXPORT/FILTER. */
  dir: string;
  exportName: string;
  filterName: string;
  /** Block size asked for; an existing state keeps its own. */
  blockSize: number;
  size: number;
  journalLimit: number;
  logger: Logger;
}

export class CbtStore {
  private queue: Item[] = [];
  private running = false;
  /** Marks may be in memory that are on disk nowhere (a commit failed): rewrite first. */
  private unrecorded = false;
  private journalBytes = JOURNAL_HEADER_BYTES;
  private journalRecords = 0;
  private commits = 0;
  private compactions = 0;
  private lastError: string | null = null;
  private closed = false;

  private constructor(
    readonly dir: string,
    private fd: number,
    /** Epoch of the map on disk and of the journal being appended to. */
    private epoch: number,
    private readonly map: ChangeMap,
    private readonly journalLimit: number,
    private readonly unlock: () => Promise<void>,
    private readonly logger: Logger,
  ) {}

  /** Opens (or creates) the state, replays a journal left by a crash, and starts a new one. */
  static async open(
    o: OpenOptions,
  ): Promise<{ store: CbtStore; map: ChangeMap; recovery: Recovery }> {
    let st: fs.Stats;
    try {
      st = await fs.promises.stat(o.dir);
    } catch {
      throw new Error(`dir ${o.dir} does not exist (create it first)`);
    }
    if (!st.isDirectory()) throw new Error(`dir ${o.dir} is not a directory`);
    const dir = join(o.dir, o.exportName, o.filterName);
    await makeDirs(dir, 0o700);
    const unlock = await lockDir(dir);
    try {
      const loaded = await load(dir, o);
      const { map, recovery } = loaded;
      let epoch = loaded.epoch;
      if (loaded.rewrite) {
        // A new history, or a replayed journal: fold everything into a new map first.
        epoch = (epoch + 1) >>> 0;
        await writeFileAtomic(dir, MAP_FILE, encodeMap(mapHeader(map, epoch, 0), map.gens));
      }
      const fd = await openFd(
        join(dir, JOURNAL_FILE),
        fs.constants.O_RDWR | fs.constants.O_CREAT | fs.constants.O_TRUNC,
      );
      try {
        await pwriteFull(fd, journalHeader(map, epoch), 0);
        await fdatasync(fd);
        await fsyncDir(dir);
      } catch (err) {
        await closeFd(fd);
        throw err;
      }
      const store = new CbtStore(dir, fd, epoch, map, o.journalLimit, unlock, o.logger);
      return { store, map, recovery };
    } catch (err) {
      await unlock();
      throw err;
    }
  }

  /** True while records wait or a commit runs: a change already marked may not be durable yet. */
  /**
   * True while a commit runs or marks may be in memory only: a request finding its blocks
   * marked already must then wait (barrier) until they are durable.
   */
  get busy(): boolean {
    return this.running || this.unrecorded;
  }

  /** Makes marks of blocks [start, start + count) pairs in `generation` durable. */
  mark(runs: readonly number[], generation: number): Promise<void> {
    const recs: number[] = [];
    for (let i = 0; i < runs.length; i += 2)
      recs.push(RecordType.MARK, generation, runs[i]!, runs[i + 1]!);
    return this.enqueueRecords(recs);
  }

  /** Makes the start of `generation` durable. */
  generation(generation: number): Promise<void> {
    return this.enqueueRecords([RecordType.GENERATION, generation, 0, 0]);
  }

  /** Resolves once everything enqueued so far is durable. */
  barrier(): Promise<void> {
    return this.enqueueRecords(null);
  }

  /** Writes the (already reset) map as a new history and starts a new journal. */
  reset(): Promise<void> {
    return this.enqueueTask(() => this.rewrite(0));
  }

  /** Clean detach: the whole map, flagged clean; the journal goes. */
  close(): Promise<void> {
    return this.enqueueTask(async () => {
      if (this.closed) return;
      const epoch = (this.epoch + 1) >>> 0;
      await writeFileAtomic(
        this.dir,
        MAP_FILE,
        encodeMap(mapHeader(this.map, epoch, FLAG_CLEAN), this.map.gens),
      );
      this.epoch = epoch;
      await this.shut();
      await fs.promises.rm(join(this.dir, JOURNAL_FILE), { force: true });
      await fsyncDir(this.dir);
      await this.unlock();
    });
  }

  /** Removal policy "drop": the state directory goes. */
  drop(): Promise<void> {
    return this.enqueueTask(async () => {
      await this.shut();
      await fs.promises.rm(this.dir, { recursive: true, force: true });
      await this.unlock();
    });
  }

  stats(): StoreStats {
    return {
      dir: this.dir,
      journalBytes: this.journalBytes,
      journalRecords: this.journalRecords,
      commits: this.commits,
      compactions: this.compactions,
      lastError: this.lastError,
    };
  }

  // ---- the queue ------------------------------------------------------------------------------

  private enqueueRecords(recs: number[] | null): Promise<void> {
    return new Promise((resolve, reject) => {
      this.queue.push({ kind: 'records', recs, resolve, reject });
      this.kick();
    });
  }

  private enqueueTask(run: () => Promise<void>): Promise<void> {
    return new Promise((resolve, reject) => {
      this.queue.push({ kind: 'task', run, resolve, reject });
      this.kick();
    });
  }

  private kick(): void {
    if (this.running) return;
    this.running = true;
    void this.drain();
  }

  private async drain(): Promise<void> {
    while (this.queue.length > 0) {
      const head = this.queue[0]!;
      if (head.kind === 'task') {
        this.queue.shift();
        try {
          if (this.closed) throw new Error('the cbt state is closed');
          await head.run();
          head.resolve();
        } catch (err) {
          this.lastError = (err as Error).message;
          head.reject(err);
        }
        continue;
      }
      // A group: every record waiting up to the next task, in one write and one fdatasync.
      let n = 0;
      while (n < this.queue.length && this.queue[n]!.kind === 'records') n++;
      const group = this.queue.splice(0, n) as Array<Extract<Item, { kind: 'records' }>>;
      let count = 0;
      for (const item of group) if (item.recs !== null) count += item.recs.length / 4;
      try {
        if (this.unrecorded) {
          // A failed commit left marks in memory that the journal does not have (and later
          // requests to those blocks skip the journal): write the whole map first.
          if (this.closed) throw new Error('the cbt state is closed');
          await this.rewrite(0);
          this.unrecorded = false;
          this.compactions++;
        }
        if (count > 0) {
          if (this.closed) throw new Error('the cbt state is closed');
          const data = Buffer.allocUnsafe(count * RECORD_BYTES);
          let at = 0;
          for (const item of group) {
            const r = item.recs;
            if (r === null) continue;
            for (let i = 0; i < r.length; i += 4, at += RECORD_BYTES) {
              const rec = {
                type: r[i]!,
                generation: r[i + 1]!,
                start: r[i + 2]!,
                count: r[i + 3]!,
              };
              encodeRecord(this.epoch, rec, data, at);
            }
          }
          await pwriteFull(this.fd, data, this.journalBytes);
          await fdatasync(this.fd);
          this.journalBytes += data.length;
          this.journalRecords += data.length / RECORD_BYTES;
          this.commits++;
        }
        for (const item of group) item.resolve();
      } catch (err) {
        this.lastError = (err as Error).message;
        this.logger.error({ err }, 'cbt journal commit failed');
        // The group's marks are in memory, not on disk: until the whole map is written, every
        // request waits for it (and fails while it cannot be written).
        this.unrecorded = true;
        for (const item of group) item.reject(err);
        continue;
      }
      if (!this.closed && this.journalBytes > this.limit()) {
        try {
          await this.rewrite(0);
          this.compactions++;
        } catch (err) {
          // The map may have been replaced with the journal not yet restarted under the new
          // epoch (then later records would be ignored at replay): the next commit rewrites
          // everything before it writes records again.
          this.unrecorded = true;
          this.lastError = (err as Error).message;
          this.logger.error({ err }, 'cbt journal compaction failed');
        }
      }
    }
    this.running = false;
  }

  private limit(): number {
    return Math.max(this.journalLimit, this.map.memoryBytes / 2);
  }

  /**
   * Folds the journal into a new map: the map (a copy of memory, which holds every mark made so
   * far, durable or not) under a new epoch, then an empty journal of that epoch. A crash in
   * between leaves the new map with the old journal, which no longer matches and is ignored.
   */
  private async rewrite(flags: number): Promise<void> {
    const epoch = (this.epoch + 1) >>> 0;
    const image = encodeMap(mapHeader(this.map, epoch, flags), this.map.gens.slice());
    await writeFileAtomic(this.dir, MAP_FILE, image);
    this.epoch = epoch;
    await ftruncateFd(this.fd, 0);
    await pwriteFull(this.fd, journalHeader(this.map, epoch), 0);
    await fdatasync(this.fd);
    this.journalBytes = JOURNAL_HEADER_BYTES;
    this.journalRecords = 0;
  }

  private async shut(): Promise<void> {
    this.closed = true;
    await closeFd(this.fd);
  }
}

function mapHeader(map: ChangeMap, epoch: number, flags: number): Parameters<typeof encodeMap>[0] {
  return {
    blockSize: map.blockSize,
    blockCount: map.blockCount,
    deviceSize: map.size,
    id: map.id,
    generation: map.generation,
    epoch,
    flags,
  };
}

function journalHeader(map: ChangeMap, epoch: number): Buffer {
  return encodeJournalHeader({
    epoch,
    id: map.id,
    blockSize: map.blockSize,
    blockCount: map.blockCount,
  });
}

/** Reads map and journal; decides what the history is now and whether the map needs writing. */
async function load(
  dir: string,
  o: OpenOptions,
): Promise<{ map: ChangeMap; epoch: number; rewrite: boolean; recovery: Recovery }> {
  const notes: string[] = [];
  const fresh = (
    state: Recovery['state'],
  ): {
    map: ChangeMap;
    epoch: number;
    rewrite: boolean;
    recovery: Recovery;
  } => ({
    map: new ChangeMap(o.size, o.blockSize, { generation: 1, id: randomUUID() }),
    epoch: 0,
    rewrite: true,
    recovery: { state, replayedRecords: 0, ignoredBytes: 0, notes },
  });
  const mapBuf = await readIfExists(join(dir, MAP_FILE));
  const journalBuf = await readIfExists(join(dir, JOURNAL_FILE));
  if (mapBuf === null) {
    if (journalBuf !== null) notes.push('a journal without a map was found and ignored');
    return fresh(journalBuf === null ? 'created' : 'reset');
  }
  let decoded: ReturnType<typeof decodeMap>;
  try {
    decoded = decodeMap(mapBuf);
  } catch (err) {
    if (!(err instanceof FormatError)) throw err;
    notes.push(`the map file is unusable (${err.message}): a new history begins`);
    o.logger.warn({ dir, err: err.message }, 'cbt: map unusable, history reset');
    return fresh('reset');
  }
  const { header, gens } = decoded;
  if (
    header.deviceSize !== o.size ||
    header.blockCount !== blockCountOf(o.size, header.blockSize)
  ) {
    notes.push(
      `the device is ${o.size} bytes, the map was of ${header.deviceSize}: a new history begins`,
    );
    return fresh('reset');
  }
  if (header.blockSize !== o.blockSize)
    notes.push(`the existing state keeps its block size of ${header.blockSize} bytes`);
  const map = new ChangeMap(o.size, header.blockSize, {
    gens,
    generation: header.generation,
    id: header.id,
  });
  if (journalBuf === null) {
    return {
      map,
      epoch: header.epoch,
      rewrite: false,
      recovery: { state: 'clean', replayedRecords: 0, ignoredBytes: 0, notes },
    };
  }
  // The last run did not detach cleanly: replay what it journaled since this map.
  let replayed = 0;
  let ignored = journalBuf.length;
  try {
    const jh = decodeJournalHeader(journalBuf);
    if (jh.epoch === header.epoch && jh.id === header.id && jh.blockCount === map.blockCount) {
      const { records, ignoredBytes } = decodeRecords(
        journalBuf.subarray(JOURNAL_HEADER_BYTES),
        jh.epoch,
        map.blockCount,
      );
      let generation = map.generation;
      for (const r of records) {
        if (r.generation > generation) generation = r.generation;
        if (r.type === RecordType.MARK) map.apply(r.start, r.count, r.generation);
      }
      map.generation = generation;
      map.dirtyNow = map.countSince(generation);
      replayed = records.length;
      ignored = ignoredBytes;
    } else {
      notes.push('the journal belongs to an earlier map (already folded into it)');
    }
  } catch (err) {
    if (!(err instanceof FormatError)) throw err;
    notes.push(`the journal header is unusable (${err.message}); the map is complete without it`);
  }
  o.logger.warn(
    { dir, replayed, ignoredBytes: ignored },
    'cbt: the last run did not detach cleanly; journal replayed',
  );
  return {
    map,
    epoch: header.epoch,
    rewrite: true,
    recovery: { state: 'recovered', replayedRecords: replayed, ignoredBytes: ignored, notes },
  };
}
