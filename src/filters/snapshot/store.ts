/**
 * The difference store on disk: one directory per origin export holding the meta file, the
 * record log and the slot data file (format in format.ts and docs/snapshot-format.md).
 *
 * This module does the I/O and the durability: atomic meta rewrites, slot reads and writes,
 * growth of the data file in steps up to the limit, and the group commit of log records —
 * records queued while a sync is in flight go out together in the next batch, one write and
 * one sync of each file per batch, and a batch is appended only after the previous one is
 * synced (so that at most the last batch in the log can be unsynced after a crash; see
 * log-parse.ts). What the records mean is the filter's business.
 */
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import { join } from 'node:path';
import type { Logger } from 'pino';
import { MAX_IOVECS, preadFull, pwriteFull, pwritevFull } from '../../backends/fdio.js';
import { assert } from '../../core/errors.js';
import { crc32 } from '../../core/crc32.js';
import {
  DATA_FILE,
  FORMAT_VERSION,
  LOG_FILE,
  LOG_HEADER_SIZE,
  META_FILE,
  RECORD_SIZE,
  RecordType,
  NO_SLOT,
  FormatError,
  checkLogHeader,
  decodeMeta,
  encodeLogHeader,
  encodeMeta,
  encodeRecord,
  type LogRecord,
  type StoreMeta,
} from './format.js';
import {
  closeFd,
  fdatasync,
  fsyncDir,
  fsyncFd,
  fstatSize,
  growFile,
  lockStore,
  openFd,
  writeFileAtomic,
} from './files.js';
import { parseLog } from './log-parse.js';
import { makeDirs } from '../../core/make-dirs.js';

/** Records waiting for a commit; bounded by the copies in flight, which requests bound. */
const MAX_PENDING_RECORDS = 1 << 20;

export interface StoreOptions {
  /** The `store` argument: the directory that holds one store directory per export. */
  parent: string;
  exportName: string;
  backendLabel: string | null;
  /** Chunk size for a new store; an existing store keeps its own. */
  chunkSize: number;
  originSize: number;
  /** Largest data file size in bytes (a multiple of the chunk size); 0 = unlimited. */
  limit: number;
  /** Growth step of the data file in bytes. */
  growStep: number;
  logger: Logger;
}

export interface Recovery {
  /** The store was created by this open. */
  created: boolean;
  /** The meta said "attached": the last holder did not detach cleanly (crash, kill -9). */
  unclean: boolean;
  /** Records of the unsynced tail that were dropped (torn, or their data never landed). */
  droppedRecords: number;
  /** The log is damaged beyond its tail: no snapshot can be trusted. */
  corrupt: string | null;
}

export interface OpenedStore {
  store: DiffStore;
  meta: StoreMeta;
  /** Trusted records in log order. */
  records: LogRecord[];
  recovery: Recovery;
}

/** A copy's data could not be written to its slot: that copy failed, the store did not. */
export class SlotWriteError extends Error {
  constructor(override readonly cause: Error) {
    super(`writing a copy to diff.data failed: ${cause.message}`, { cause });
    this.name = 'SlotWriteError';
  }
}

/** A copy's data, written into its slot by the group commit that logs its record. */
export interface SlotData {
  slot: number;
  data: Buffer;
}

interface Waiter {
  records: readonly LogRecord[];
  slots: readonly SlotData[];
  resolve: () => void;
  reject: (err: Error) => void;
}

export function storeDir(parent: string, exportName: string): string {
  // Export names may hold any character; the directory name must be one path component.
  return join(parent, encodeURIComponent(exportName));
}

export class DiffStore {
  readonly dir: string;
  readonly chunkSize: number;
  private logSize: number;
  private dataSize: number;
  private batch: number;
  private pending: Waiter[] = [];
  private pendingRecords = 0;
  private committing: Promise<void> | null = null;
  /** Set after a failed log write or sync: the log's state is unknown, nothing more goes in. */
  private brokenBy: Error | null = null;
  private growingAhead = false;
  private growing: Promise<void> = Promise.resolve();
  private metaWrite: Promise<void> = Promise.resolve();
  private closed = false;
  private reads = 0;
  private readsDrained: (() => void) | null = null;
  // Totals since open, for status.
  batches = 0;
  recordsCommitted = 0;

  private constructor(
    dir: string,
    chunkSize: number,
    private logFd: number,
    private readonly dataFd: number,
    sizes: { log: number; data: number; batch: number },
    private readonly unlock: () => Promise<void>,
    private readonly opts: StoreOptions,
  ) {
    this.dir = dir;
    this.chunkSize = chunkSize;
    this.logSize = sizes.log;
    this.dataSize = sizes.data;
    this.batch = sizes.batch;
  }

  static async open(opts: StoreOptions): Promise<OpenedStore> {
    const dir = storeDir(opts.parent, opts.exportName);
    await makeDirs(dir, 0o700);
    const unlock = await lockStore(dir);
    const fds: number[] = [];
    try {
      let meta = await readMeta(dir);
      const created = meta === null;
      if (meta === null) meta = await createStore(dir, opts);
      if (meta.export !== opts.exportName) {
        throw new Error(
          `store ${dir} belongs to export "${meta.export}", not "${opts.exportName}"`,
        );
      }
      const logFd = await openFd(join(dir, LOG_FILE), fs.constants.O_RDWR);
      fds.push(logFd);
      const dataFd = await openFd(join(dir, DATA_FILE), fs.constants.O_RDWR);
      fds.push(dataFd);
      const logBuf = await fs.promises.readFile(join(dir, LOG_FILE));
      checkLogHeader(logBuf, meta.chunkSize, meta.storeId);
      const parsed = parseLog(logBuf);
      const dataSize = await fstatSize(dataFd);
      const recovery: Recovery = {
        created,
        unclean: meta.attached,
        droppedRecords: parsed.droppedTail,
        corrupt: parsed.corrupt,
      };
      let records: LogRecord[] = [];
      if (parsed.corrupt === null) {
        // After a clean detach every batch was synced; after a crash the last one may not be.
        const last = meta.attached
          ? await verifyLastBatch(dataFd, dataSize, meta, parsed.last)
          : parsed.last;
        recovery.droppedRecords += parsed.last.length - last.length;
        records = [...parsed.synced, ...last];
        const beyond = records.find(
          (r) => r.type === RecordType.COPY && (r.slot + 1) * meta.chunkSize > dataSize,
        );
        if (beyond !== undefined) {
          recovery.corrupt = `a synced record points at slot ${beyond.slot}, past the end of ${DATA_FILE} (${dataSize} bytes)`;
          records = [];
        }
      }
      const store = new DiffStore(
        dir,
        meta.chunkSize,
        logFd,
        dataFd,
        { log: logBuf.length, data: dataSize, batch: parsed.lastBatch },
        unlock,
        opts,
      );
      return { store, meta, records, recovery };
    } catch (err) {
      for (const fd of fds) await closeFd(fd).catch(() => undefined);
      await unlock();
      throw err;
    }
  }

  /** Bytes of diff.data (allocated slots, used or free). */
  get dataBytes(): number {
    return this.dataSize;
  }

  get logBytes(): number {
    return this.logSize;
  }

  /** Why the store stopped taking records, or null. */
  get broken(): Error | null {
    return this.brokenBy;
  }

  /**
   * Makes sure slot `slot` lies inside diff.data, growing it by whole steps (never past the
   * limit, which the caller's slot pool already respects). Throws the host's error (ENOSPC
   * when the host file system is full). Once half of the last step is in use, the next step
   * is allocated in the background, so that copies seldom wait for an allocation (on tmpfs,
   * 64 MiB of fresh pages take tens of milliseconds).
   */
  reserve(slot: number): Promise<void> {
    const need = (slot + 1) * this.chunkSize;
    const step = this.growStepBytes();
    if (need <= this.dataSize) {
      if (!this.growingAhead && need > this.dataSize - step / 2) this.growAhead();
      return Promise.resolve();
    }
    return this.growTo(need);
  }

  private growStepBytes(): number {
    // In whole chunks of this store's own chunk size (which may differ from the argument's).
    const cs = this.chunkSize;
    return Math.max(cs, Math.ceil(this.opts.growStep / cs) * cs);
  }

  private growTo(need: number): Promise<void> {
    const run = async (): Promise<void> => {
      if (need <= this.dataSize) return; // a grow queued before us covered it
      const cs = this.chunkSize;
      const step = this.growStepBytes();
      const limit = Math.floor(this.opts.limit / cs) * cs;
      let target = Math.ceil(need / step) * step;
      if (limit > 0) target = Math.min(target, limit);
      assert(target >= need, 'slot beyond the store limit');
      await growFile(this.dataFd, this.dataSize, target);
      this.dataSize = target;
    };
    const grown = this.growing.then(run, run);
    this.growing = grown.catch(() => undefined);
    return grown;
  }

  /** Allocates the next step now; a failure is left for the copy that needs it to meet. */
  private growAhead(): void {
    const limit = Math.floor(this.opts.limit / this.chunkSize) * this.chunkSize;
    if (this.closed || (limit > 0 && this.dataSize >= limit)) return;
    this.growingAhead = true;
    void this.growTo(this.dataSize + 1)
      .catch(() => undefined)
      .finally(() => (this.growingAhead = false));
  }

  /** Reads `buf.length` bytes from slot `slot`, `within` bytes in (may run on into the next slots). */
  async readSlots(slot: number, within: number, buf: Buffer): Promise<void> {
    const at = slot * this.chunkSize + within;
    assert(
      within < this.chunkSize && at + buf.length <= this.dataSize,
      'slot read outside diff.data',
    );
    // Image reads race with a detach: the fd must not be closed (and its number reused) under them.
    if (this.closed) throw new Error('difference store is closed');
    this.reads++;
    try {
      await preadFull(this.dataFd, buf, at);
    } finally {
      if (--this.reads === 0) this.readsDrained?.();
    }
  }

  /** The log as written so far (header included), for `verify`. */
  async readLog(): Promise<Buffer> {
    if (this.closed) throw new Error('difference store is closed');
    const buf = Buffer.allocUnsafe(this.logSize);
    this.reads++;
    try {
      await preadFull(this.logFd, buf, 0);
    } finally {
      if (--this.reads === 0) this.readsDrained?.();
    }
    return buf;
  }

  /**
   * Appends records durably, with the copies' data: resolves once the data is in its slots and
   * the records are in the log, both on stable storage. Concurrent calls share one group
   * commit: the slots of a batch go out as few writev(2) calls as their runs of consecutive
   * slots, then one log write, then one sync per file.
   */
  commit(records: readonly LogRecord[], slots: readonly SlotData[] = []): Promise<void> {
    if (this.brokenBy !== null) return Promise.reject(this.brokenBy);
    if (this.closed) return Promise.reject(new Error('difference store is closed'));
    assert(
      this.pendingRecords + records.length <= MAX_PENDING_RECORDS,
      'commit queue is unbounded',
    );
    for (const s of slots)
      assert(
        s.data.length <= this.chunkSize && (s.slot + 1) * this.chunkSize <= this.dataSize,
        'slot write outside diff.data',
      );
    return new Promise<void>((resolve, reject) => {
      this.pending.push({ records, slots, resolve, reject });
      this.pendingRecords += records.length;
      this.committing ??= this.commitLoop();
    });
  }

  private async commitLoop(): Promise<void> {
    try {
      while (this.pending.length > 0) {
        const waiters = this.pending;
        this.pending = [];
        this.pendingRecords = 0;
        try {
          for (const w of await this.writeBatch(waiters)) w.resolve();
        } catch (err) {
          // The log may now hold part of this batch: nothing more may follow it.
          this.brokenBy = new Error(`difference store ${this.dir}: ${(err as Error).message}`, {
            cause: err,
          });
          for (const w of [...waiters, ...this.pending]) w.reject(this.brokenBy);
          this.pending = [];
          this.pendingRecords = 0;
        }
      }
    } finally {
      this.committing = null;
    }
  }

  /**
   * Writes the slots of a batch: one writev per run of consecutive whole-chunk slots. A run
   * that fails fails only the waiters with a slot in it (SlotWriteError: their copies did not
   * happen, their records are left out of the log); the rest of the batch goes on.
   */
  private async writeSlots(waiters: readonly Waiter[]): Promise<Set<Waiter>> {
    const all: Array<{ s: SlotData; w: Waiter }> = [];
    for (const w of waiters) for (const s of w.slots) all.push({ s, w });
    const failed = new Set<Waiter>();
    if (all.length === 0) return failed;
    all.sort((a, b) => a.s.slot - b.s.slot);
    const runs: Array<{ first: number; bufs: Buffer[]; owners: Waiter[] }> = [];
    let prev: SlotData | undefined;
    for (const { s, w } of all) {
      const run = runs[runs.length - 1];
      // A short chunk (the origin's last) ends a run: the next slot starts a chunk further.
      const follows =
        prev !== undefined && s.slot === prev.slot + 1 && prev.data.length === this.chunkSize;
      if (run !== undefined && follows && run.bufs.length < MAX_IOVECS) {
        run.bufs.push(s.data);
        run.owners.push(w);
      } else runs.push({ first: s.slot, bufs: [s.data], owners: [w] });
      prev = s;
    }
    await Promise.all(
      runs.map(async (r) => {
        try {
          await pwritevFull(this.dataFd, r.bufs, r.first * this.chunkSize);
        } catch (err) {
          for (const w of r.owners) {
            if (failed.has(w)) continue;
            failed.add(w);
            w.reject(new SlotWriteError(err as Error));
          }
        }
      }),
    );
    return failed;
  }

  /** Commits a batch; returns the waiters whose records are now durable. */
  private async writeBatch(waiters: readonly Waiter[]): Promise<Waiter[]> {
    // Data first: a record may reach the log only once its copy is in its slot (replay checks
    // the last batch's CRCs against the slots, which covers a crash between the two syncs).
    const failed = await this.writeSlots(waiters);
    const ok = failed.size === 0 ? [...waiters] : waiters.filter((w) => !failed.has(w));
    let count = 0;
    for (const w of ok) count += w.records.length;
    if (count === 0) return ok;
    const batch = ++this.batch;
    assert(batch <= 0xffffffff, 'batch counter overflow');
    const buf = Buffer.alloc(count * RECORD_SIZE);
    let at = 0;
    let copies = false;
    for (const w of ok) {
      for (const r of w.records) {
        encodeRecord({ ...r, batch }, buf, at);
        at += RECORD_SIZE;
        copies ||= r.type === RecordType.COPY;
      }
    }
    await pwriteFull(this.logFd, buf, this.logSize);
    this.logSize += buf.length;
    // Both files in parallel: the batch counts only once both are durable.
    await Promise.all([fdatasync(this.logFd), copies ? fdatasync(this.dataFd) : undefined]);
    this.batches++;
    this.recordsCommitted += count;
    return ok;
  }

  /**
   * Replaces the log with `records` (batch 0) and a checkpoint (batch 1), atomically. Only
   * while nothing is being committed (at open). A damaged log is kept beside it for forensics.
   */
  async rewriteLog(
    records: readonly LogRecord[],
    meta: StoreMeta,
    keepOld: string | null,
  ): Promise<void> {
    assert(
      this.committing === null && this.pending.length === 0,
      'log rewrite while commits are in flight',
    );
    const all = [...records.map((r) => ({ ...r, batch: 0 })), checkpoint(1)];
    const buf = Buffer.alloc(LOG_HEADER_SIZE + all.length * RECORD_SIZE);
    encodeLogHeader(meta.chunkSize, meta.storeId).copy(buf, 0);
    all.forEach((r, i) => encodeRecord(r, buf, LOG_HEADER_SIZE + i * RECORD_SIZE));
    const tmp = join(this.dir, `${LOG_FILE}.tmp`);
    const fd = await openFd(tmp, fs.constants.O_RDWR | fs.constants.O_CREAT | fs.constants.O_TRUNC);
    try {
      await pwriteFull(fd, buf, 0);
      await fsyncFd(fd);
    } catch (err) {
      await closeFd(fd);
      throw err;
    }
    if (keepOld !== null)
      await fs.promises.rename(join(this.dir, LOG_FILE), join(this.dir, keepOld));
    await fs.promises.rename(tmp, join(this.dir, LOG_FILE));
    await fsyncDir(this.dir);
    await closeFd(this.logFd);
    this.logFd = fd;
    this.logSize = buf.length;
    this.batch = 1;
  }

  /**
   * Writes the meta atomically; writes are serialised in the order asked, and each takes its
   * content from `content()` when its turn comes, so the last write always has the newest state.
   */
  writeMeta(content: () => StoreMeta): Promise<void> {
    const run = (): Promise<void> => writeFileAtomic(this.dir, META_FILE, encodeMeta(content()));
    const written = this.metaWrite.then(run, run);
    this.metaWrite = written.catch(() => undefined);
    return written;
  }

  /** Waits for commits and meta writes, then closes the files and releases the lock. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.committing;
    await this.metaWrite;
    await this.growing;
    if (this.reads > 0) await new Promise<void>((resolve) => (this.readsDrained = resolve));
    await closeFd(this.logFd).catch(() => undefined);
    await closeFd(this.dataFd).catch(() => undefined);
    await this.unlock();
  }

  /** Closes the store and deletes its files and directory (removal policy 'drop'). */
  async drop(): Promise<void> {
    await this.close();
    const ours = (f: string): boolean =>
      [META_FILE, LOG_FILE, DATA_FILE, `${META_FILE}.tmp`, `${LOG_FILE}.tmp`].includes(f) ||
      f.startsWith(`${LOG_FILE}.damaged-`);
    for (const f of await fs.promises.readdir(this.dir))
      if (ours(f)) await fs.promises.rm(join(this.dir, f), { force: true });
    // Only if empty: a file that is not ours stays, and so does the directory holding it.
    await fs.promises.rmdir(this.dir).catch(() => undefined);
  }
}

function checkpoint(batch: number): LogRecord {
  return {
    type: RecordType.CHECKPOINT,
    batch,
    chunk: 0,
    slot: NO_SLOT,
    genLow: 0,
    genHigh: 0,
    dataCrc: 0,
  };
}

async function readMeta(dir: string): Promise<StoreMeta | null> {
  let buf: Buffer;
  try {
    buf = await fs.promises.readFile(join(dir, META_FILE));
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw err;
  }
  try {
    return decodeMeta(buf);
  } catch (err) {
    if (err instanceof FormatError) throw new Error(`store ${dir}: ${err.message}`);
    throw err;
  }
}

/** Creates the log and data files, then the meta, whose presence says the store exists. */
async function createStore(dir: string, opts: StoreOptions): Promise<StoreMeta> {
  const meta: StoreMeta = {
    storeId: randomBytes(16).toString('hex'),
    export: opts.exportName,
    backend: opts.backendLabel,
    chunkSize: opts.chunkSize,
    originSize: opts.originSize,
    createdAt: new Date().toISOString(),
    nextGeneration: 1,
    attached: false,
    snapshots: [],
  };
  assert(FORMAT_VERSION === 1, 'store creation writes format version 1');
  const create = fs.constants.O_RDWR | fs.constants.O_CREAT | fs.constants.O_TRUNC;
  const logFd = await openFd(join(dir, LOG_FILE), create);
  try {
    await pwriteFull(logFd, encodeLogHeader(meta.chunkSize, meta.storeId), 0);
    await fsyncFd(logFd);
  } finally {
    await closeFd(logFd);
  }
  const dataFd = await openFd(join(dir, DATA_FILE), create);
  try {
    await fsyncFd(dataFd);
  } finally {
    await closeFd(dataFd);
  }
  await fsyncDir(dir);
  await writeFileAtomic(dir, META_FILE, encodeMeta(meta));
  return meta;
}

/** Keeps the records of the last batch whose copied data reads back with its CRC. */
async function verifyLastBatch(
  dataFd: number,
  dataSize: number,
  meta: StoreMeta,
  last: LogRecord[],
): Promise<LogRecord[]> {
  const kept: LogRecord[] = [];
  const buf = Buffer.allocUnsafe(meta.chunkSize);
  for (const r of last) {
    if (r.type !== RecordType.COPY) {
      kept.push(r);
      continue;
    }
    const length = Math.min(meta.chunkSize, meta.originSize - r.chunk * meta.chunkSize);
    if (length <= 0 || (r.slot + 1) * meta.chunkSize > dataSize) continue;
    const piece = buf.subarray(0, length);
    await preadFull(dataFd, piece, r.slot * meta.chunkSize);
    if (crc32(piece) === r.dataCrc) kept.push(r);
  }
  return kept;
}
