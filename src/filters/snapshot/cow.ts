/**
 * Copy-before-write: before a write, trim or zeroing reaches a chunk of the origin that a live
 * snapshot still sees as it was, the chunk's old content goes to the difference store — once,
 * for every snapshot that needs it — and is durable (data and log record) before the origin
 * write is issued. DESIGN.md §3.6: the kernel may write the origin back at any moment after
 * issue, so "before acknowledgement" would not be enough.
 *
 * Snapshots have increasing generations. `lastWriteGen[c]` is the newest generation chunk c
 * has been preserved for; a write to c needs a copy while it is below the newest live
 * generation N. The copy serves every snapshot with generation in (lastWriteGen[c], N]: no
 * write reached c after the oldest of them was taken, so all of them saw the same content.
 * One copy per chunk per generation range — never one per snapshot.
 *
 * Concurrent writes to one chunk share its copy through a per-chunk promise (the map holds
 * only chunks being copied, so it is bounded by requests in flight); writes to other chunks
 * never wait on it. Chunks already preserved cost one comparison each.
 */
import type { Device } from '../../core/device.js';
import { assert } from '../../core/errors.js';
import type { CopyMap, SlotPool } from './copy-map.js';
import { crc32 } from '../../core/crc32.js';
import { FailCode, NO_SLOT, RecordType, type LogRecord } from './format.js';
import { parseLog } from './log-parse.js';
import type { Snap, SnapshotSet } from './registry.js';
import { SlotWriteError, type DiffStore } from './store.js';

/** Chunks of one request copied at the same time: bounds buffers per request. */
const WINDOW = 8;

/**
 * Chunk buffers kept for reuse between copies. A fresh 64 KiB buffer per copy made the
 * garbage collector a fifth of the copy path's time; copies in flight rarely exceed this.
 */
const SPARE_BUFFERS = 64;

export interface CowHost {
  /** Rewrites the meta from the current state; resolves once it is durable. */
  saveMeta(): Promise<void>;
  /** Snapshots failed, durably: publish it (event, log, meta). */
  failed(snaps: readonly Snap[], reason: string): void;
}

export interface Geometry {
  chunkSize: number;
  originSize: number;
  /** Store limit in bytes, for messages; 0 = unlimited. */
  limit: number;
}

export interface VerifyReport {
  /** Copies read back and checked. */
  checked: number;
  bytes: number;
  /** Copies freed or replaced while verify ran (nothing to check any more). */
  skipped: number;
  /** Copies whose data does not match their record. */
  damaged: Array<{ chunk: number; slot: number; generations: [number, number]; why: string }>;
  /** Snapshots failed because of them. */
  failed: string[];
}

export class CopyEngine {
  private readonly locks = new Map<number, Promise<void>>();
  private readonly zero: Buffer;
  private readonly spare: Buffer[] = [];
  // Totals since the filter was attached, for status.
  copied = 0;
  zeroCopies = 0;
  bytesCopied = 0;
  overflows = 0;

  constructor(
    private readonly store: DiffStore,
    readonly map: CopyMap,
    readonly slots: SlotPool,
    private readonly snaps: SnapshotSet,
    private readonly geo: Geometry,
    private readonly host: CowHost,
  ) {
    this.zero = Buffer.alloc(geo.chunkSize);
  }

  /** Chunks being copied right now. */
  get inFlight(): number {
    return this.locks.size;
  }

  /** Whether the range touches a chunk not yet preserved for the newest generation. */
  needsCopy(offset: number, length: number): boolean {
    const newest = this.snaps.newest;
    if (newest === 0 || length === 0) return false;
    const cs = this.geo.chunkSize;
    const last = Math.floor((offset + length - 1) / cs);
    const lwg = this.map.lastWriteGen;
    for (let c = Math.floor(offset / cs); c <= last; c++) if (lwg[c]! < newest) return true;
    return false;
  }

  /** Preserves every chunk of the range that needs it; resolves when all copies are durable. */
  async preserveRange(next: Device, offset: number, length: number): Promise<void> {
    const cs = this.geo.chunkSize;
    const first = Math.floor(offset / cs);
    const last = Math.floor((offset + length - 1) / cs);
    const lwg = this.map.lastWriteGen;
    for (let c = first; c <= last; c += WINDOW) {
      const end = Math.min(last, c + WINDOW - 1);
      const work: Promise<void>[] = [];
      for (let k = c; k <= end; k++)
        if (lwg[k]! < this.snaps.newest) work.push(this.preserve(next, k));
      if (work.length === 0) continue;
      // Settle all before failing the request: no copy may outlive the write it belongs to.
      const results = await Promise.allSettled(work);
      for (const r of results) if (r.status === 'rejected') throw r.reason;
    }
  }

  /**
   * Reads every copy in the store back and checks it against the CRC its log record carries.
   * A damaged copy fails the snapshots it serves (durably, like an overflow): they would
   * otherwise be silently wrong. One chunk at a time, so client I/O goes on meanwhile.
   */
  async verify(): Promise<VerifyReport> {
    const cs = this.geo.chunkSize;
    // Listed before the log is read: every listed copy's record is in the log by then, since
    // a copy enters the map only after its record is durable.
    const live: Array<[number, number, number, number]> = [];
    this.map.forEach((c, slot, low, high) => {
      if (slot !== NO_SLOT) live.push([c, slot, low, high]);
    });
    const parsed = parseLog(await this.store.readLog());
    const newest = new Map<number, LogRecord>();
    for (const r of [...parsed.synced, ...parsed.last])
      if (r.type === RecordType.COPY) newest.set(r.slot, r);
    const report: VerifyReport = { checked: 0, bytes: 0, skipped: 0, damaged: [], failed: [] };
    const whole = this.spare.pop() ?? Buffer.allocUnsafe(cs);
    try {
      for (const [c, slot, low, high] of live) {
        const buf = whole.subarray(0, Math.min(cs, this.geo.originSize - c * cs));
        const still = (): boolean => this.map.find(c, high) === slot;
        if (!still()) {
          report.skipped++;
          continue;
        }
        await this.store.readSlots(slot, 0, buf);
        // Freed (and maybe reused) while it was read: what was read proves nothing.
        if (!still()) {
          report.skipped++;
          continue;
        }
        report.checked++;
        report.bytes += buf.length;
        const r = newest.get(slot);
        let why: string | undefined;
        if (r === undefined || r.chunk !== c || r.genLow !== low || r.genHigh !== high)
          why = 'no log record describes this copy';
        else if (crc32(buf) !== r.dataCrc) why = 'data does not match its CRC';
        if (why !== undefined)
          report.damaged.push({ chunk: c, slot, generations: [low, high], why });
      }
    } finally {
      if (this.spare.length < SPARE_BUFFERS) this.spare.push(whole);
    }
    const victims = this.snaps
      .all()
      .filter(
        (s) =>
          s.state === 'active' &&
          report.damaged.some(
            (d) => s.generation > d.generations[0] && s.generation <= d.generations[1],
          ),
      );
    if (victims.length > 0) {
      const first = report.damaged[0]!;
      await this.fail(
        victims,
        FailCode.DAMAGED,
        `difference store damaged: copy of chunk ${first.chunk} (slot ${first.slot}) ${first.why}` +
          (report.damaged.length > 1 ? ` (${report.damaged.length} copies in all)` : ''),
      );
      report.failed = victims.map((v) => v.name);
    }
    return report;
  }

  /** The copy of chunk `c` that generation `gen` sees: a slot, NO_SLOT (zeros), or -1 (none). */
  find(c: number, gen: number): number {
    return this.map.find(c, gen);
  }

  /** Drops copies no live snapshot needs and frees their slots; returns how many went. */
  pruneDead(): number {
    return this.map.prune(
      (low, high) => this.snaps.needed(low, high),
      (slot) => this.slots.release(slot),
    );
  }

  /**
   * Fails snapshots: at once in memory (their images answer EIO), and durably through a FAIL
   * record; until that is on disk they stay `failing`, and writes that skip their copies wait
   * for it (a crash before it would bring them back as active, with chunks missing).
   */
  fail(victims: readonly Snap[], code: number, reason: string): Promise<void> {
    for (const v of victims) assert(v.state === 'active', 'failing a snapshot that is not active');
    const durable = (async () => {
      const records: LogRecord[] = victims.map((v) => ({
        type: RecordType.FAIL,
        batch: 0,
        chunk: code,
        slot: NO_SLOT,
        genLow: 0,
        genHigh: v.generation,
        dataCrc: 0,
      }));
      try {
        await this.store.commit(records);
      } catch (err) {
        await this.failAllThroughMeta(err as Error);
        return;
      }
      this.settleFailed(victims, reason);
    })();
    durable.catch(() => undefined); // writers await it; a rejection nobody awaits is no crash
    for (const v of victims) {
      v.state = 'failing';
      v.reason = reason;
      v.durable = durable;
    }
    return durable;
  }

  private async preserve(next: Device, c: number): Promise<void> {
    for (;;) {
      if (this.map.lastWriteGen[c]! >= this.snaps.newest) return;
      const busy = this.locks.get(c);
      if (busy === undefined) break;
      await busy.catch(() => undefined); // its failure is its writer's; look again
    }
    const work = this.copyChunk(next, c);
    this.locks.set(c, work);
    try {
      await work;
    } finally {
      this.locks.delete(c);
    }
  }

  private async copyChunk(next: Device, c: number): Promise<void> {
    for (;;) {
      const low = this.map.lastWriteGen[c]!;
      const high = this.snaps.newest;
      if (low >= high) return;
      if (this.snaps.within(low, high, ['active']).length > 0) return this.copy(next, c, low, high);
      // Only snapshots whose failure is on its way to disk need this chunk: once it is there,
      // nobody does. Until then the origin write must wait (see fail()).
      const failing = this.snaps.within(low, high, ['failing']);
      assert(failing.length > 0, 'a generation above a chunk with no live snapshot');
      await Promise.all(failing.map((s) => s.durable));
    }
  }

  private async copy(next: Device, c: number, low: number, high: number): Promise<void> {
    const cs = this.geo.chunkSize;
    const whole = this.spare.pop() ?? Buffer.allocUnsafe(cs);
    try {
      await this.copyWith(whole, next, c, low, high);
    } finally {
      // Only once nothing reads it any more: the store has written it and the record is durable.
      if (this.spare.length < SPARE_BUFFERS) this.spare.push(whole);
    }
  }

  private async copyWith(
    whole: Buffer,
    next: Device,
    c: number,
    low: number,
    high: number,
  ): Promise<void> {
    const cs = this.geo.chunkSize;
    const start = c * cs;
    const length = Math.min(cs, this.geo.originSize - start);
    const old = whole.subarray(0, length);
    await next.read(old, start, 0);
    if (old.equals(this.zero.subarray(0, length))) {
      // Zeros need no slot: a trim of never-used space costs one log record per chunk.
      const zero: LogRecord = {
        type: RecordType.ZERO,
        batch: 0,
        chunk: c,
        slot: NO_SLOT,
        genLow: low,
        genHigh: high,
        dataCrc: 0,
      };
      if (!(await this.commitOrBreak([zero], c, high))) return;
      this.map.add(c, NO_SLOT, low, high);
      this.zeroCopies++;
      return;
    }
    const slot = this.slots.take();
    if (slot < 0) {
      return this.overflow(
        c,
        low,
        high,
        FailCode.STORE_FULL,
        `difference store full: limit ${this.geo.limit} bytes`,
      );
    }
    try {
      await this.store.reserve(slot);
    } catch (err) {
      this.slots.release(slot);
      return this.storeWriteFailed(err, c, low, high);
    }
    const record: LogRecord = {
      type: RecordType.COPY,
      batch: 0,
      chunk: c,
      slot,
      genLow: low,
      genHigh: high,
      dataCrc: crc32(old),
    };
    // The data goes into its slot with the group commit that logs the record.
    try {
      await this.store.commit([record], [{ slot, data: old }]);
    } catch (err) {
      if (err instanceof SlotWriteError) {
        this.slots.release(slot);
        return this.storeWriteFailed(err.cause, c, low, high);
      }
      await this.failAllThroughMeta(err as Error);
      if (this.map.lastWriteGen[c]! < high) this.map.lastWriteGen[c] = high;
      return;
    }
    this.map.add(c, slot, low, high);
    this.copied++;
    this.bytesCopied += length;
    // Every snapshot it serves may have failed while it was being made: then nobody needs it.
    if (!this.snaps.needed(low, high)) this.pruneDead();
  }

  /**
   * Commits records; if the log cannot take them, every snapshot fails through the meta and
   * the chunk counts as done (false). Throws only if even that cannot be recorded.
   */
  private async commitOrBreak(records: LogRecord[], c: number, high: number): Promise<boolean> {
    try {
      await this.store.commit(records);
      return true;
    } catch (err) {
      await this.failAllThroughMeta(err as Error);
      if (this.map.lastWriteGen[c]! < high) this.map.lastWriteGen[c] = high;
      return false;
    }
  }

  /**
   * Growing diff.data or writing a copy into it failed: the snapshots that need the copy fail
   * (host full, or an I/O error), the store and the other snapshots go on.
   */
  private storeWriteFailed(err: unknown, c: number, low: number, high: number): Promise<void> {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOSPC' || code === 'EDQUOT' || code === 'EFBIG') {
      return this.overflow(
        c,
        low,
        high,
        FailCode.HOST_FULL,
        `difference store: no space left on the host file system (${this.store.dataBytes} bytes in use)`,
      );
    }
    return this.overflow(
      c,
      low,
      high,
      FailCode.STORE_ERROR,
      `difference store I/O error: ${(err as Error).message}`,
    );
  }

  /** The store cannot hold the copy: the snapshots that need it fail; the write goes on. */
  private async overflow(
    c: number,
    low: number,
    high: number,
    code: number,
    reason: string,
  ): Promise<void> {
    this.overflows++;
    const victims = this.snaps.within(low, high, ['active']);
    if (victims.length > 0) await this.fail(victims, code, reason);
    const failing = this.snaps.within(low, high, ['failing']);
    await Promise.all(failing.map((s) => s.durable));
    if (this.map.lastWriteGen[c]! < high) this.map.lastWriteGen[c] = high;
  }

  /**
   * The log is unusable (a write or sync failed): no snapshot can be kept. Their failure goes
   * into the meta, which is a separate file; if that fails too, they stay `failing` and every
   * write that would need a copy fails with the error — never a silently wrong snapshot.
   */
  private async failAllThroughMeta(cause: Error): Promise<void> {
    const reason = `difference store I/O error: ${cause.message}`;
    const victims = this.snaps.all().filter((s) => s.state === 'active' || s.state === 'failing');
    let settle!: { resolve: () => void; reject: (err: unknown) => void };
    const durable = new Promise<void>((resolve, reject) => (settle = { resolve, reject }));
    durable.catch(() => undefined); // awaited by writers; not an unhandled rejection meanwhile
    // States first: the meta is written from them.
    for (const v of victims) {
      if (v.state === 'active') v.reason = reason;
      v.state = 'failing';
      v.durable = durable;
    }
    try {
      await this.host.saveMeta();
    } catch (err) {
      const wedged = new Error(
        `${reason}; recording the failure failed too: ${(err as Error).message}`,
        { cause: err },
      );
      settle.reject(wedged);
      throw wedged;
    }
    settle.resolve();
    this.settleFailed(victims, reason);
  }

  private settleFailed(victims: readonly Snap[], reason: string): void {
    const settled = victims.filter((v) => v.state === 'failing');
    for (const v of settled) {
      v.state = 'failed';
      v.durable = null;
    }
    this.snaps.recompute();
    this.pruneDead();
    if (settled.length > 0) this.host.failed(settled, reason);
  }
}
