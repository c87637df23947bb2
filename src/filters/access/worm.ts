/**
 * Write-once state of the access filter: which blocks of the export have been written (sealed)
 * and may never be written, trimmed or zeroed again; and its persistence.
 *
 * With `dir`, DIR/EXPORT/FILTER/ holds (docs/access-format.md)
 *
 *   worm.map      the bitmap of sealed blocks, replaced atomically
 *   worm.journal  seal records since that map, appended and fdatasync'd (group commit) before
 *                 the write that seals the blocks goes down
 *   lock          the pid of the process that has the state attached
 *
 * Bits are only ever set, so recovery is the union of the map and the journal's valid records;
 * a torn journal tail was never acknowledged. Anything else that does not add up (another
 * device size, a damaged map) refuses the attach: a WORM state is never silently reset.
 */
import fs from 'node:fs';
import { join } from 'node:path';
import type { Logger } from 'pino';
import { closeFd, fdatasync, pwriteFull } from '../../backends/fdio.js';
import { makeDirs } from '../../core/make-dirs.js';
import {
  readIfExists,
  fsyncDir,
  ftruncateFd,
  openFd,
  takeLock,
  writeFileAtomic,
} from '../../core/durable-files.js';
import {
  FLAG_CLEAN,
  FormatError,
  JOURNAL_HEADER_BYTES,
  RECORD_BYTES,
  decodeJournalHeader,
  decodeMap,
  decodeRecords,
  encodeJournalHeader,
  encodeMap,
  encodeRecord,
  bitmapBytes,
} from './worm-format.js';

const MAP_FILE = 'worm.map';
const JOURNAL_FILE = 'worm.journal';
const LOCK_FILE = 'lock';
/** Journal size that triggers folding it into the map (or half the bitmap, if larger). */
const JOURNAL_LIMIT = 1024 * 1024;
/** Most blocks a WORM map tracks (a 256 MiB bitmap). */
export const MAX_WORM_BLOCKS = 2 ** 31;

export class WormMap {
  readonly blockCount: number;
  readonly bits: Uint8Array;
  sealed = 0;

  constructor(
    readonly size: number,
    readonly blockSize: number,
    bits?: Uint8Array,
  ) {
    this.blockCount = Math.ceil(size / blockSize);
    if (this.blockCount > MAX_WORM_BLOCKS)
      throw new Error(
        `a ${size}-byte device has more than ${MAX_WORM_BLOCKS} blocks of ${blockSize} bytes: choose a larger wormBlockSize`,
      );
    this.bits = bits ?? new Uint8Array(bitmapBytes(this.blockCount));
    if (bits !== undefined)
      for (let b = 0; b < this.blockCount; b++) if (this.has(b)) this.sealed++;
  }

  has(b: number): boolean {
    return (this.bits[b >>> 3]! & (1 << (b & 7))) !== 0;
  }

  set(b: number): boolean {
    const i = b >>> 3;
    const m = 1 << (b & 7);
    if ((this.bits[i]! & m) !== 0) return false;
    this.bits[i] = this.bits[i]! | m;
    this.sealed++;
    return true;
  }

  /** Whether a block of [first, end) is sealed. */
  anySealed(first: number, end: number): boolean {
    if (this.sealed === 0) return false;
    for (let b = first; b < end; b++) if (this.has(b)) return true;
    return false;
  }

  /** Seals blocks [start, start + count) (a replayed record). */
  apply(start: number, count: number): void {
    for (let b = start; b < start + count; b++) this.set(b);
  }

  get memoryBytes(): number {
    return this.bits.length;
  }
}

export interface WormRecovery {
  state: 'memory' | 'created' | 'clean' | 'recovered';
  replayedRecords: number;
  ignoredBytes: number;
  notes: string[];
}

export interface WormStoreStats {
  dir: string;
  journalBytes: number;
  journalRecords: number;
  commits: number;
  compactions: number;
  lastError: string | null;
}

interface Pending {
  /** Flat [start, count, ...]; null = a barrier. */
  runs: number[] | null;
  resolve: () => void;
  reject: (e: unknown) => void;
}

export class WormStore {
  private queue: Pending[] = [];
  private running = false;
  private journalBytes = JOURNAL_HEADER_BYTES;
  private journalRecords = 0;
  private commits = 0;
  private compactions = 0;
  private lastError: string | null = null;
  private closed = false;
  /** Resolves when the current drain ends (close waits for it). */
  private idle: Promise<void> = Promise.resolve();

  private constructor(
    readonly dir: string,
    private fd: number,
    private epoch: number,
    private readonly map: WormMap,
    private readonly unlock: () => Promise<void>,
    private readonly logger: Logger,
  ) {}

  /** Opens (or creates) DIR/EXPORT/FILTER, replays a journal left by a crash, starts a new one. */
  static async open(o: {
    dir: string;
    exportName: string;
    filterName: string;
    blockSize: number;
    size: number;
    logger: Logger;
  }): Promise<{ store: WormStore; map: WormMap; recovery: WormRecovery }> {
    let st: fs.Stats;
    try {
      st = await fs.promises.stat(o.dir);
    } catch {
      throw new Error(`dir ${o.dir} does not exist (create it first)`);
    }
    if (!st.isDirectory()) throw new Error(`dir ${o.dir} is not a directory`);
    const dir = join(o.dir, o.exportName, o.filterName);
    await makeDirs(dir, 0o700);
    const unlock = await takeLock(join(dir, LOCK_FILE), `WORM state ${dir}`);
    try {
      const { map, epoch: found, recovery } = await load(dir, o);
      // Fold what was found (a replayed journal, or nothing yet) into a map of a new epoch.
      const epoch = (found + 1) >>> 0;
      await writeFileAtomic(dir, MAP_FILE, encodeMap(headerOf(map, epoch, 0), map.bits));
      const fd = await openFd(
        join(dir, JOURNAL_FILE),
        fs.constants.O_RDWR | fs.constants.O_CREAT | fs.constants.O_TRUNC,
      );
      try {
        await pwriteFull(fd, journalHeaderOf(map, epoch), 0);
        await fdatasync(fd);
        await fsyncDir(dir);
      } catch (err) {
        await closeFd(fd);
        throw err;
      }
      for (const note of recovery.notes) o.logger.warn({ dir }, note);
      return { store: new WormStore(dir, fd, epoch, map, unlock, o.logger), map, recovery };
    } catch (err) {
      await unlock();
      throw err;
    }
  }

  /** True while a commit runs: a block sealed in memory may not be durable yet. */
  get busy(): boolean {
    return this.running;
  }

  /** Makes the seals of runs [start, count, ...] durable. */
  seal(runs: number[]): Promise<void> {
    return this.enqueue(runs);
  }

  /** Resolves once everything enqueued so far is durable. */
  barrier(): Promise<void> {
    return this.enqueue(null);
  }

  private enqueue(runs: number[] | null): Promise<void> {
    if (this.closed) return Promise.reject(new Error('the WORM state is closed'));
    return new Promise((resolve, reject) => {
      this.queue.push({ runs, resolve, reject });
      if (!this.running) {
        this.running = true;
        this.idle = this.drain();
      }
    });
  }

  private async drain(): Promise<void> {
    while (this.queue.length > 0) {
      const group = this.queue.splice(0, this.queue.length);
      let count = 0;
      for (const p of group) if (p.runs !== null) count += p.runs.length / 2;
      try {
        if (count > 0) {
          const data = Buffer.allocUnsafe(count * RECORD_BYTES);
          let at = 0;
          for (const p of group) {
            const r = p.runs;
            if (r === null) continue;
            for (let i = 0; i < r.length; i += 2, at += RECORD_BYTES)
              encodeRecord(this.epoch, r[i]!, r[i + 1]!, data, at);
          }
          await pwriteFull(this.fd, data, this.journalBytes);
          await fdatasync(this.fd);
          this.journalBytes += data.length;
          this.journalRecords += count;
          this.commits++;
        }
        for (const p of group) p.resolve();
      } catch (err) {
        this.lastError = (err as Error).message;
        this.logger.error({ err }, 'access: WORM journal commit failed');
        for (const p of group) p.reject(err);
        continue;
      }
      if (this.journalBytes > Math.max(JOURNAL_LIMIT, this.map.memoryBytes / 2)) {
        try {
          await this.compact(0);
          this.compactions++;
        } catch (err) {
          this.lastError = (err as Error).message;
          this.logger.error({ err }, 'access: WORM journal compaction failed');
        }
      }
    }
    this.running = false;
  }

  /**
   * The map of memory (every seal so far, durable or not: more sealed is the safe side) under
   * a new epoch, then an empty journal of that epoch. A crash in between leaves the new map
   * with the old journal, whose records no longer match and are already in the map.
   */
  private async compact(flags: number): Promise<void> {
    const epoch = (this.epoch + 1) >>> 0;
    await writeFileAtomic(
      this.dir,
      MAP_FILE,
      encodeMap(headerOf(this.map, epoch, flags), this.map.bits.slice()),
    );
    this.epoch = epoch;
    await ftruncateFd(this.fd, 0);
    await pwriteFull(this.fd, journalHeaderOf(this.map, epoch), 0);
    await fdatasync(this.fd);
    this.journalBytes = JOURNAL_HEADER_BYTES;
    this.journalRecords = 0;
  }

  /** Clean detach: the whole map, flagged clean; the journal goes. */
  async close(): Promise<void> {
    if (this.closed) return;
    await this.barrier().catch(() => undefined);
    this.closed = true;
    await this.idle;
    try {
      await this.compact(FLAG_CLEAN);
      await closeFd(this.fd);
      await fs.promises.rm(join(this.dir, JOURNAL_FILE), { force: true });
      await fsyncDir(this.dir);
    } finally {
      await this.unlock();
    }
  }

  /** Removal policy "drop": the state goes (the written blocks become writable again). */
  async drop(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.idle;
    await closeFd(this.fd).catch(() => undefined);
    await fs.promises.rm(this.dir, { recursive: true, force: true });
    await this.unlock();
  }

  stats(): WormStoreStats {
    return {
      dir: this.dir,
      journalBytes: this.journalBytes,
      journalRecords: this.journalRecords,
      commits: this.commits,
      compactions: this.compactions,
      lastError: this.lastError,
    };
  }
}

function headerOf(map: WormMap, epoch: number, flags: number) {
  return {
    blockSize: map.blockSize,
    blockCount: map.blockCount,
    deviceSize: map.size,
    epoch,
    flags,
    sealed: map.sealed,
  };
}

function journalHeaderOf(map: WormMap, epoch: number): Buffer {
  return encodeJournalHeader({
    epoch,
    blockSize: map.blockSize,
    blockCount: map.blockCount,
    deviceSize: map.size,
  });
}

async function load(
  dir: string,
  o: { blockSize: number; size: number },
): Promise<{ map: WormMap; epoch: number; recovery: WormRecovery }> {
  const notes: string[] = [];
  const mapBuf = await readIfExists(join(dir, MAP_FILE));
  const journalBuf = await readIfExists(join(dir, JOURNAL_FILE));
  const refuse = (why: string): never => {
    throw new Error(
      `the WORM state in ${dir} ${why}; refusing to attach (a WORM state is never reset silently: inspect it, or remove the directory to start afresh)`,
    );
  };
  if (mapBuf === null) {
    if (journalBuf !== null && journalBuf.length > JOURNAL_HEADER_BYTES)
      refuse('has a journal but no map');
    return {
      map: new WormMap(o.size, o.blockSize),
      epoch: 0,
      recovery: { state: 'created', replayedRecords: 0, ignoredBytes: 0, notes },
    };
  }
  let decoded: ReturnType<typeof decodeMap>;
  try {
    decoded = decodeMap(mapBuf);
  } catch (err) {
    if (!(err instanceof FormatError)) throw err;
    return refuse(`is damaged (${err.message})`);
  }
  const { header, bits } = decoded;
  if (header.deviceSize !== o.size)
    refuse(`is of a ${header.deviceSize}-byte device, this one has ${o.size} bytes`);
  if (header.blockSize !== o.blockSize)
    notes.push(`the existing state keeps its WORM block size of ${header.blockSize} bytes`);
  let map: WormMap;
  try {
    map = new WormMap(o.size, header.blockSize, bits);
  } catch (err) {
    return refuse(`does not fit the device (${(err as Error).message})`);
  }
  if (map.blockCount !== header.blockCount) refuse('has a block count that does not fit its size');
  if (journalBuf === null)
    return {
      map,
      epoch: header.epoch,
      recovery: { state: 'clean', replayedRecords: 0, ignoredBytes: 0, notes },
    };
  let replayed = 0;
  let ignored = journalBuf.length;
  try {
    const jh = decodeJournalHeader(journalBuf);
    if (jh.epoch === header.epoch && jh.blockCount === map.blockCount) {
      const { records, ignoredBytes } = decodeRecords(
        journalBuf.subarray(JOURNAL_HEADER_BYTES),
        jh.epoch,
        map.blockCount,
      );
      for (const [start, count] of records) map.apply(start, count);
      replayed = records.length;
      ignored = ignoredBytes;
    } else notes.push('the journal belongs to an earlier map (already folded into it)');
  } catch (err) {
    if (!(err instanceof FormatError)) throw err;
    // The header is written and synced before any record: a bad one held no records.
    notes.push(`the journal header is unusable (${err.message}); the map is complete without it`);
  }
  if (ignored > 0) notes.push(`${ignored} bytes of torn journal tail ignored (never acknowledged)`);
  return {
    map,
    epoch: header.epoch,
    recovery: { state: 'recovered', replayedRecords: replayed, ignoredBytes: ignored, notes },
  };
}
