/**
 * The cdp filter: continuous data protection. Before a write, trim or write-zeroes changes a
 * block, the block's old content is appended to a journal (an undo record with a sequence
 * number and a wall-clock time) and made durable; only then does the change go down. So the
 * device always holds the present, the journal every past state still retained, and:
 *
 *  - a view of point T (a read-only export) reads each block from the first undo record after
 *    T that touched it, or from the device when nothing touched it since T (view.ts);
 *  - retention drops the oldest segments whole: no folding, no rewriting, no stall;
 *  - a rollback to T writes the blocks changed since T back to their content at T through the
 *    same journaled path, so the rollback is itself history and can be undone.
 *
 * Module map: format.ts is the on-disk format (docs/cdp-format.md), journal.ts the segment
 * files and group commit, history.ts the in-memory index, view.ts the views. Design notes and
 * the user's guide are in docs/cdp.md.
 */
import type { Device, Extent, IoContext } from '../../core/device.js';
import { ExtentState, RequestFlags } from '../../core/device.js';
import { DeviceError, assert, toDeviceError } from '../../core/errors.js';
import { FilterCommandError, type Filter, type FilterEnv } from '../../core/filter.js';
import { crc32 } from '../../core/crc32.js';
import { unknownCommand } from '../args.js';
import { WriteGate, WriteGateTimeout } from '../gate.js';
import {
  ChangeOp,
  MAX_PAYLOAD_BYTES,
  RecordType,
  type ChangeOpValue,
  type RecordHeader,
} from './format.js';
import { ChangeLog } from './history.js';
import { Journal, type RecordLocation, type ScanReport } from './journal.js';
import { CdpView } from './view.js';
import {
  COMMANDS,
  markArgs,
  nameArgs,
  noArgs,
  resolveArgs,
  rollbackArgs,
  timelineArgs,
  viewArgs,
  type PointArgs,
} from './commands.js';
import { DEFAULT_PAUSE_TIMEOUT_MS, checkArgs, type CdpArgs, type Settings } from './settings.js';

/** How often the age limit is looked at. */
const RETENTION_INTERVAL_MS = 1000;
/** Index rows dropped between yields to client I/O while retention runs. */
const DROP_BATCH = 4096;
const NAME = /^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$/;
/** At most this many index chunks per device: keeps the index's map far below its limit. */
const MAX_INDEX_CHUNKS = 4 * 1024 * 1024;
/** Most buckets a timeline answers with. */
const MAX_TIMELINE_BUCKETS = 10_000;
const ZEROS = Buffer.alloc(64 * 1024);

function isZero(buf: Buffer): boolean {
  for (let i = 0; i < buf.length; i += ZEROS.length) {
    const n = Math.min(ZEROS.length, buf.length - i);
    if (!buf.subarray(i, i + n).equals(n === ZEROS.length ? ZEROS : ZEROS.subarray(0, n)))
      return false;
  }
  return true;
}

interface Mark {
  point: number;
  timeMs: number;
  /** The segment holding its record (rewritten when that segment expires). */
  segmentNo: number;
}

interface OpenView {
  name: string;
  point: number;
  pin: object;
  device: CdpView;
  openedAt: string;
}

interface HeldRange {
  b0: number;
  b1: number;
  done: Promise<void>;
  release: () => void;
}

interface Rollback {
  id: number;
  target: number;
  from: number;
  state: 'running' | 'interrupted' | 'done' | 'failed';
  blocksRestored: number;
  startedAt: string;
  error?: string;
}

export class CdpFilter implements Filter {
  private log = new ChangeLog();
  private marks = new Map<string, Mark>();
  private readonly views = new Map<string, OpenView>();
  /** Changes whose undo record is (being) journaled and whose own I/O has not finished. */
  private readonly inFlight = new Set<number>();
  private waiters: { point: number; resolve: () => void }[] = [];
  private held: HeldRange[] = [];
  /** The next change's sequence number. */
  private seqCounter = 1;
  private lastTimeMs = 0;
  private failure: { reason: string; at: string } | null = null;
  /** keep-serving after a failure: resolves once the history is marked lost on disk. */
  private givenUp: Promise<void> = Promise.resolve();
  private rollback: Rollback | null = null;
  private rollbackCount = 0;
  /** Client requests pass here; a rollback holds them all. */
  private readonly gate = new WriteGate();
  private retentionTimer: NodeJS.Timeout | null = null;
  private retentionRunning: Promise<void> | null = null;
  private retentionWanted = false;
  private droppedSegments = 0;
  /** Retention is dropping the changes up to this point: no view or rollback may need them. */
  private droppingThrough = -1;
  /** Points that views and a running rollback read from: retention keeps what they need. */
  private readonly pins = new Map<object, number>();
  /** Marks, rollbacks, resets, resumes and retention's mark rewrites run one at a time. */
  private opChain: Promise<unknown> = Promise.resolve();
  private closed = false;

  private constructor(
    private readonly env: FilterEnv,
    private readonly settings: Settings,
    private journal: Journal,
    private report: ScanReport,
  ) {}

  /** The prepare step: checks arguments, opens (or creates) the journal and indexes it. */
  static async open(args: CdpArgs, env: FilterEnv): Promise<CdpFilter> {
    const settings = checkArgs(args, env.below.size);
    const filter = new CdpFilter(env, settings, null as unknown as Journal, null as never);
    await filter.openJournal(args.dir);
    return filter;
  }

  /** Blocks per index chunk: at least 16, and so that a device has at most 4M chunks. */
  private get chunkBlocks(): number {
    const blocks = Math.ceil(this.env.below.size / this.settings.blockSize);
    return Math.max(16, Math.ceil(blocks / MAX_INDEX_CHUNKS));
  }

  private async openJournal(dir: string): Promise<void> {
    let log = new ChangeLog(this.chunkBlocks);
    const marks = new Map<string, Mark>();
    let pendingRollback: { id: number; target: number; from: number } | null = null;
    let lastTime = 0;
    let maxRollbackId = 0;
    const { journal, report } = await Journal.open({
      dir,
      size: this.env.below.size,
      blockSize: this.settings.blockSize,
      segmentBytes: this.settings.segmentBytes,
      // A segment also ends at an eighth of the index limit, so that retention can always
      // bring the index back under it by dropping old segments.
      segmentWeight: Math.max(1, Math.floor(this.settings.indexLimit / 8)),
      weightOf: (h) =>
        h.type === RecordType.UNDO_DATA || h.type === RecordType.UNDO_ZERO
          ? ChangeLog.entriesOf(h.blockStart, h.blockCount, this.chunkBlocks)
          : 0,
      logger: this.env.logger,
      onRecord: (h, at, payload) => {
        lastTime = Math.max(lastTime, h.timeMs);
        if (h.type === RecordType.UNDO_DATA || h.type === RecordType.UNDO_ZERO) {
          if (log.rows === 0 && log.nextSeq !== h.seq) log.resetTo(h.seq);
          log.append(rowOf(h, at));
          return;
        }
        const body = parseBody(payload);
        if (h.type === RecordType.MARK && typeof body.name === 'string') {
          const markedAt = typeof body.markedAt === 'number' ? body.markedAt : h.timeMs;
          marks.set(body.name, { point: h.seq, timeMs: markedAt, segmentNo: at.segmentNo });
          const n = /^before-rollback-(\d+)$/.exec(body.name);
          if (n !== null) maxRollbackId = Math.max(maxRollbackId, Number(n[1]));
        } else if (h.type === RecordType.UNMARK && typeof body.name === 'string')
          marks.delete(body.name);
        else if (h.type === RecordType.ROLLBACK_BEGIN) {
          pendingRollback = {
            id: Number(body.id),
            target: Number(body.target),
            from: Number(body.from),
          };
          maxRollbackId = Math.max(maxRollbackId, Number(body.id) || 0);
        } else if (h.type === RecordType.ROLLBACK_END) pendingRollback = null;
      },
      onDiscard: () => {
        log = new ChangeLog(this.chunkBlocks);
        marks.clear();
        pendingRollback = null;
      },
    });
    this.log = log;
    this.marks = marks;
    this.journal = journal;
    this.report = report;
    this.seqCounter = journal.active.lastSeq + 1;
    if (this.log.rows === 0) this.log.resetTo(this.seqCounter);
    assert(this.log.firstSeq >= journal.segments[0]!.firstSeq, 'index older than the journal');
    assert(this.log.nextSeq === this.seqCounter, 'index and journal disagree on the next change');
    this.lastTimeMs = lastTime;
    this.rollbackCount = maxRollbackId;
    const oldest = this.oldestPoint();
    for (const [name, m] of this.marks) if (m.point < oldest) this.marks.delete(name);
    const pr = pendingRollback as { id: number; target: number; from: number } | null;
    if (pr !== null)
      this.rollback = {
        ...pr,
        state: 'interrupted',
        blocksRestored: 0,
        startedAt: new Date(lastTime).toISOString(),
      };
    journal.onCommitted = (h, at) => this.committed(h, at);
    for (const note of report.notes) this.env.logger.warn({ dir }, note);
    if (report.tornBytes > 0 || report.notes.length > 0 || this.rollback !== null)
      this.env.emit('cdp.recovered', {
        dir,
        tornBytes: report.tornBytes,
        notes: report.notes,
        interruptedRollback: this.rollback !== null,
      });
  }

  // ---- hooks ----------------------------------------------------------------------------------

  read(next: Device, buf: Buffer, offset: number, flags: number, ctx?: IoContext): Promise<void> {
    return this.pass(() => next.read(buf, offset, flags, ctx));
  }

  write(next: Device, data: Buffer, offset: number, flags: number, ctx?: IoContext): Promise<void> {
    return this.pass(() =>
      this.change(next, ChangeOp.WRITE, offset, data.length, () =>
        next.write(data, offset, flags, ctx),
      ),
    );
  }

  trim(
    next: Device,
    offset: number,
    length: number,
    flags: number,
    ctx?: IoContext,
  ): Promise<void> {
    return this.pass(() =>
      this.change(next, ChangeOp.TRIM, offset, length, () => next.trim(offset, length, flags, ctx)),
    );
  }

  writeZeroes(
    next: Device,
    offset: number,
    length: number,
    flags: number,
    ctx?: IoContext,
  ): Promise<void> {
    return this.pass(() =>
      this.change(next, ChangeOp.ZERO, offset, length, () =>
        next.writeZeroes(offset, length, flags, ctx),
      ),
    );
  }

  // Every undo record is durable before its change goes down, so a flush has only the
  // device's own data to make durable.
  flush(next: Device, flags: number, ctx?: IoContext): Promise<void> {
    return this.pass(() => next.flush(flags, ctx));
  }

  cache(
    next: Device,
    offset: number,
    length: number,
    flags: number,
    ctx?: IoContext,
  ): Promise<void> {
    return this.pass(() => next.cache(offset, length, flags, ctx));
  }

  blockStatus(
    next: Device,
    offset: number,
    length: number,
    flags: number,
    ctx?: IoContext,
  ): Promise<Extent[]> {
    return this.pass(() => next.blockStatus(offset, length, flags, ctx));
  }

  /** Runs a client request through the gate a rollback closes. */
  private pass<T>(op: () => Promise<T>): Promise<T> {
    const frozen = this.gate.gate;
    if (frozen !== null) return frozen.then(() => this.pass(op));
    this.gate.enter();
    let done: Promise<T>;
    try {
      done = op();
    } catch (err) {
      done = Promise.reject(err);
    }
    return done.finally(this.gate.leave);
  }

  // ---- journaling a change --------------------------------------------------------------------

  /**
   * Journals the old content of the blocks [offset, offset + length) touches, then runs
   * `apply` (the change itself). Overlapping changes run one after the other, so that each
   * undo record holds what the one before it left.
   */
  private async change(
    next: Device,
    op: ChangeOpValue,
    offset: number,
    length: number,
    apply: () => Promise<void>,
  ): Promise<void> {
    if (this.failure !== null || this.closed) {
      if (this.settings.onError === 'stop-writes' && this.failure !== null)
        throw new DeviceError(
          'EIO',
          `cdp: the journal failed (${this.failure.reason}); writes are stopped`,
        );
      if (this.failure !== null) await this.historyGivenUp();
      return apply();
    }
    if (length === 0) return apply();
    const B = this.settings.blockSize;
    const b0 = Math.floor(offset / B);
    const b1 = Math.ceil((offset + length) / B);
    const held = await this.lockBlocks(b0, b1);
    const seqs: number[] = [];
    try {
      const piece = Math.max(1, Math.floor(MAX_PAYLOAD_BYTES / B));
      try {
        for (let p = b0; p < b1; p += piece)
          seqs.push(await this.journalUndo(next, op, p, Math.min(b1, p + piece)));
      } catch (err) {
        // The device below failed to give the old content: the change cannot be journaled,
        // so it does not happen, and the client gets the device's error.
        if (!(err instanceof JournalFailure)) throw err;
        this.journalFailed(err.cause);
        if (this.settings.onError === 'stop-writes') throw toJournalError(err.cause);
        await this.historyGivenUp();
      }
      await apply();
    } finally {
      for (const s of seqs) this.inFlight.delete(s);
      if (seqs.length > 0) this.wakeWaiters();
      this.unlockBlocks(held);
    }
  }

  /** Journals the content of blocks [b0, b1) as it is now; resolves once durable. */
  private async journalUndo(
    next: Device,
    op: ChangeOpValue,
    b0: number,
    b1: number,
  ): Promise<number> {
    const B = this.settings.blockSize;
    const from = b0 * B;
    const to = Math.min(b1 * B, this.env.below.size);
    let payload: Buffer | null = null;
    if (op === ChangeOp.WRITE || !(await readsAsZero(next, from, to - from))) {
      const old = Buffer.allocUnsafe((b1 - b0) * B);
      await next.read(old.subarray(0, to - from), from, 0);
      old.fill(0, to - from);
      if (!isZero(old)) payload = old;
    }
    if (this.failure !== null) throw new JournalFailure(new Error(this.failure.reason));
    const seq = this.seqCounter++;
    this.inFlight.add(seq);
    this.lastTimeMs = Math.max(this.lastTimeMs, Date.now());
    const header: RecordHeader = {
      type: payload === null ? RecordType.UNDO_ZERO : RecordType.UNDO_DATA,
      op,
      payloadBytes: payload?.length ?? 0,
      seq,
      timeMs: this.lastTimeMs,
      blockStart: b0,
      blockCount: b1 - b0,
      payloadCrc: payload === null ? 0 : crc32(payload),
    };
    try {
      await this.journal.append(header, payload);
    } catch (err) {
      this.inFlight.delete(seq);
      this.wakeWaiters();
      throw new JournalFailure(err);
    }
    return seq;
  }

  /** A durable record, in journal order: index it (before its change goes down). */
  private committed(h: RecordHeader, at: RecordLocation): void {
    if (h.type === RecordType.UNDO_DATA || h.type === RecordType.UNDO_ZERO) {
      if (this.failure !== null) return;
      this.log.append(rowOf(h, at));
      if (
        this.journal.bytes > this.settings.keepBytes ||
        this.log.blockEntries > this.settings.indexLimit
      )
        this.scheduleRetention();
    }
  }

  private journalFailed(err: unknown): void {
    if (this.failure !== null) return;
    const reason = err instanceof Error ? err.message : String(err);
    this.failure = { reason, at: new Date().toISOString() };
    this.env.logger.error({ err: reason }, 'cdp journal failed');
    if (this.settings.onError === 'keep-serving') {
      // Changes now go down unjournaled: no past point can be shown faithfully any more.
      for (const v of this.views.values()) v.device.invalidate(`the journal failed: ${reason}`);
      this.givenUp = this.journal.giveUp();
      this.env.emit('cdp.failed', { reason, history: 'lost', writes: 'served' });
    } else this.env.emit('cdp.failed', { reason, history: 'kept', writes: 'stopped' });
  }

  /**
   * Before the first change goes down unjournaled, the history is made unopenable on disk
   * (its meta file removed): a restart must not take it for a whole one. If even that fails,
   * the change fails (EIO): nothing may be written that a later view would show wrongly.
   */
  private async historyGivenUp(): Promise<void> {
    try {
      await this.givenUp;
    } catch (err) {
      throw new DeviceError(
        'EIO',
        `cdp: the journal failed and its history could not be marked lost: ${(err as Error).message}`,
      );
    }
  }

  private async lockBlocks(b0: number, b1: number): Promise<HeldRange> {
    for (;;) {
      const busy = this.held.find((h) => h.b0 < b1 && b0 < h.b1);
      if (busy === undefined) break;
      await busy.done;
    }
    let release!: () => void;
    const done = new Promise<void>((r) => (release = r));
    const h: HeldRange = { b0, b1, done, release };
    this.held.push(h);
    return h;
  }

  private unlockBlocks(h: HeldRange): void {
    const i = this.held.indexOf(h);
    assert(i >= 0, 'unlocking a block range that is not held');
    this.held.splice(i, 1);
    h.release();
  }

  // ---- points ---------------------------------------------------------------------------------

  /** Every change up to this point has finished going down. */
  private completedPoint(): number {
    let min = this.seqCounter;
    for (const s of this.inFlight) if (s < min) min = s;
    return min - 1;
  }

  /** Resolves once every change up to `point` has finished going down. */
  private waitCompleted(point: number): Promise<void> {
    if (this.completedPoint() >= point) return Promise.resolve();
    return new Promise((resolve) => this.waiters.push({ point, resolve }));
  }

  private wakeWaiters(): void {
    if (this.waiters.length === 0) return;
    const done = this.completedPoint();
    const still: typeof this.waiters = [];
    for (const w of this.waiters) {
      if (w.point <= done) w.resolve();
      else still.push(w);
    }
    this.waiters = still;
  }

  /** The oldest point a view or rollback may ask for. */
  oldestPoint(): number {
    const physical = Math.max(this.journal.segments[0]!.firstSeq - 1, this.droppingThrough);
    if (this.settings.keepMs === 0 || this.log.rows === 0) return physical;
    return Math.max(physical, this.log.lastSeqAtOrBefore(Date.now() - this.settings.keepMs));
  }

  /** Runs `fn` after every other serialised operation has finished. */
  private serial<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.opChain.then(fn, fn);
    this.opChain = run.catch(() => undefined);
    return run;
  }

  /**
   * Resolves a point and pins it in the same turn of the event loop, so that retention
   * (which looks at the pins before each segment) cannot take what it needs meanwhile.
   */
  private pinPoint(p: PointArgs): { point: number; pin: object } {
    const point = this.resolvePoint(p);
    const pin = {};
    this.pins.set(pin, point);
    return { point, pin };
  }

  /** The time a point came to be: that of its change (null for one no longer indexed). */
  private pointTime(point: number): string | null {
    if (point < this.log.firstSeq || point >= this.log.nextSeq) return null;
    return new Date(this.log.timeOf(point)).toISOString();
  }

  /** A point named by sequence number, time or mark; checked to be within the history. */
  resolvePoint(p: PointArgs): number {
    const given = [p.seq, p.at, p.mark].filter((v) => v !== undefined).length;
    if (given !== 1) throw new FilterCommandError('give exactly one of seq, at or mark');
    let point: number;
    if (p.mark !== undefined) {
      const m = this.marks.get(p.mark);
      if (m === undefined) throw new FilterCommandError(`no mark named "${p.mark}"`);
      point = m.point;
    } else if (p.at !== undefined) {
      const ms = /^[0-9]+$/.test(p.at) ? Number(p.at) : Date.parse(p.at);
      if (!Number.isFinite(ms))
        throw new FilterCommandError(`at: "${p.at}" is not a time (use ISO 8601)`);
      const now = Date.now();
      if (ms > now + 1000)
        throw new FilterCommandError(`at: ${new Date(ms).toISOString()} is in the future`);
      // The first segment began when the last change before it was made (or the history
      // began): what the device held before then is not known.
      const since = this.journal.segments[0]!.createdMs;
      if (ms < since)
        throw new FilterCommandError(
          `at: ${new Date(ms).toISOString()} is older than the history kept (it starts at ${new Date(since).toISOString()})`,
        );
      point = ms >= now ? this.seqCounter - 1 : this.log.lastSeqAtOrBefore(ms);
    } else point = p.seq!;
    const newest = this.seqCounter - 1;
    if (point > newest)
      throw new FilterCommandError(`point ${point} is in the future (the newest is ${newest})`);
    const oldest = this.oldestPoint();
    if (point < oldest)
      throw new FilterCommandError(
        `point ${point} is older than the oldest point kept (${oldest}${this.describeOldest()})`,
      );
    return point;
  }

  private describeOldest(): string {
    const t = this.pointTime(this.oldestPoint() + 1);
    return t === null ? '' : `, just before ${t}`;
  }

  // ---- commands -------------------------------------------------------------------------------

  async control(command: string, raw: Record<string, unknown>): Promise<unknown> {
    switch (command) {
      case 'status':
        noArgs(raw);
        return this.status();
      case 'mark':
        return this.mark(markArgs(raw));
      case 'unmark':
        return this.unmark(nameArgs(raw).name);
      case 'marks':
        noArgs(raw);
        return this.listMarks();
      case 'resolve': {
        const point = this.resolvePoint(resolveArgs(raw));
        return { point, time: this.pointTime(point) };
      }
      case 'view':
        return this.openView(viewArgs(raw));
      case 'close-view':
        return this.closeView(nameArgs(raw).name);
      case 'views':
        noArgs(raw);
        return this.listViews();
      case 'rollback':
        return this.rollbackTo(rollbackArgs(raw));
      case 'timeline':
        return this.timeline(timelineArgs(raw));
      case 'retain':
        noArgs(raw);
        await this.runRetention();
        return this.status();
      case 'resume':
        noArgs(raw);
        return this.resume();
      case 'reset':
        noArgs(raw);
        return this.reset();
      default:
        throw unknownCommand('cdp', command, COMMANDS);
    }
  }

  private checkUsable(): void {
    if (this.closed) throw new FilterCommandError('the cdp filter is closed');
    if (this.failure !== null && this.settings.onError === 'keep-serving')
      throw new FilterCommandError(
        `the history was lost when the journal failed (${this.failure.reason}): reset it to start a new one`,
      );
  }

  private mark(a: PointArgs & { name: string }): Promise<unknown> {
    return this.serial(() => this.markNow(a));
  }

  private async markNow(a: PointArgs & { name: string }): Promise<unknown> {
    this.checkUsable();
    if (!NAME.test(a.name))
      throw new FilterCommandError(
        `mark name "${a.name}": 1-64 letters, digits, '.', '_', ':' or '-', starting with a letter or digit`,
      );
    if (this.marks.has(a.name)) throw new FilterCommandError(`mark "${a.name}" exists`);
    let point: number;
    if (a.seq === undefined && a.at === undefined && a.mark === undefined) {
      // Now: every change acknowledged before this command is in the point.
      point = this.seqCounter - 1;
      await this.waitCompleted(point);
    } else point = this.resolvePoint(a);
    const m = await this.appendMark(a.name, point);
    this.env.emit('cdp.marked', { name: a.name, point });
    return { name: a.name, point, time: new Date(m.timeMs).toISOString() };
  }

  /** Journals mark `name` of `point` (made at `markedAt`, default now) and records it. */
  private async appendMark(name: string, point: number, markedAt?: number): Promise<Mark> {
    this.lastTimeMs = Math.max(this.lastTimeMs, Date.now());
    const t = markedAt ?? this.lastTimeMs;
    const at = await this.appendNote(RecordType.MARK, point, { name, markedAt: t });
    const m: Mark = { point, timeMs: t, segmentNo: at.segmentNo };
    this.marks.set(name, m);
    return m;
  }

  private appendNote(
    type: (typeof RecordType)['MARK' | 'UNMARK' | 'ROLLBACK_BEGIN' | 'ROLLBACK_END'],
    point: number,
    body: Record<string, unknown>,
    timeMs = Math.max(this.lastTimeMs, Date.now()),
  ): Promise<RecordLocation> {
    const payload = Buffer.from(JSON.stringify(body));
    return this.journal.append(
      {
        type,
        op: 0,
        payloadBytes: payload.length,
        seq: point,
        timeMs,
        blockStart: 0,
        blockCount: 0,
        payloadCrc: crc32(payload),
      },
      payload,
    );
  }

  private unmark(name: string): Promise<unknown> {
    return this.serial(async () => {
      this.checkUsable();
      if (!this.marks.has(name)) throw new FilterCommandError(`no mark named "${name}"`);
      await this.appendNote(RecordType.UNMARK, 0, { name });
      this.marks.delete(name);
      return { name, removed: true };
    });
  }

  private listMarks(): unknown[] {
    return [...this.marks.entries()]
      .sort((a, b) => a[1].point - b[1].point || a[1].timeMs - b[1].timeMs)
      .map(([name, m]) => ({
        name,
        point: m.point,
        markedAt: new Date(m.timeMs).toISOString(),
      }));
  }

  private async openView(a: PointArgs & { name?: string }): Promise<unknown> {
    this.checkUsable();
    if (this.env.publishExport === undefined)
      throw new FilterCommandError('this host cannot publish exports: no views');
    const { point, pin } = this.pinPoint(a);
    let device: CdpView;
    let name: string;
    try {
      await this.waitCompleted(point);
      name = a.name ?? this.freeViewName(point);
      if (this.views.has(name)) throw new FilterCommandError(`a view named "${name}" is open`);
      device = new CdpView(this.viewSource(), point);
      this.env.publishExport(name, device, {
        readOnly: true,
        description: `${this.env.exportName} as of point ${point}`,
      });
    } catch (err) {
      this.pins.delete(pin);
      throw err;
    }
    const v: OpenView = { name, point, pin, device, openedAt: new Date().toISOString() };
    this.views.set(name, v);
    this.env.emit('cdp.view-opened', { name, point });
    return { name, point, time: this.pointTime(point) };
  }

  private freeViewName(point: number): string {
    const base = `${this.env.exportName}@cdp-${point}`;
    if (!this.views.has(base)) return base;
    for (let i = 2; ; i++) if (!this.views.has(`${base}-${i}`)) return `${base}-${i}`;
  }

  private viewSource() {
    return {
      blockSize: this.settings.blockSize,
      size: this.env.below.size,
      log: this.log,
      origin: this.env.deviceBelow!,
      readPayload: (no: number, pos: number, buf: Buffer) => this.journal.readPayload(no, pos, buf),
    };
  }

  private closeView(name: string): unknown {
    const v = this.views.get(name);
    if (v === undefined) throw new FilterCommandError(`no view named "${name}"`);
    this.dropView(v);
    this.scheduleRetention(); // it may have held old segments
    return { name, closed: true };
  }

  private dropView(v: OpenView): void {
    this.views.delete(v.name);
    this.pins.delete(v.pin);
    v.device.invalidate('closed');
    this.env.unpublishExport?.(v.name);
    this.env.emit('cdp.view-closed', { name: v.name, point: v.point });
  }

  private listViews(): unknown[] {
    return [...this.views.values()].map((v) => ({
      name: v.name,
      point: v.point,
      time: this.pointTime(v.point),
      openedAt: v.openedAt,
      valid: v.device.isOpen,
    }));
  }

  // ---- rollback -------------------------------------------------------------------------------

  /**
   * Brings the export back to `point`: client requests are held (the export pauses) and
   * drained, the blocks changed since the point are written back to their content then —
   * journaled like any change, so the rollback can itself be rolled back (to the mark
   * `before-rollback-N` made first) — the device is flushed, and the requests resume.
   */
  private rollbackTo(a: PointArgs & { timeoutMs: number }): Promise<unknown> {
    return this.serial(() => this.rollbackNow(a));
  }

  private async rollbackNow(a: PointArgs & { timeoutMs: number }): Promise<unknown> {
    this.checkUsable();
    const { point: target, pin } = this.pinPoint(a);
    try {
      return await this.rollbackPinned(a, target);
    } finally {
      this.pins.delete(pin);
    }
  }

  private async rollbackPinned(a: { timeoutMs: number }, target: number): Promise<unknown> {
    const below = this.env.deviceBelow;
    if (below === undefined) throw new FilterCommandError('the filter is not in a stack');
    let thaw: () => void;
    try {
      thaw = await this.gate.exclusive(() => this.gate.freeze(a.timeoutMs));
    } catch (err) {
      if (err instanceof WriteGateTimeout)
        throw new FilterCommandError(`rollback refused, nothing changed: ${err.message}`);
      throw err;
    }
    // A fresh id whose undo mark is free: the mark names the present for the undo.
    let id = ++this.rollbackCount;
    while (this.marks.has(`before-rollback-${id}`)) id = ++this.rollbackCount;
    const before = `before-rollback-${id}`;
    const rb: Rollback = {
      id,
      target,
      from: 0,
      state: 'running',
      blocksRestored: 0,
      startedAt: new Date().toISOString(),
    };
    try {
      await this.waitCompleted(this.seqCounter - 1);
      rb.from = this.seqCounter - 1;
      this.rollback = rb;
      await this.appendMark(before, rb.from);
      await this.appendNote(RecordType.ROLLBACK_BEGIN, rb.from, { id, target, from: rb.from });
      this.env.emit('cdp.rollback-started', { id, target, from: rb.from });
      await this.restore(below, target, rb);
      if (below.info().caps.flush) await below.flush(0);
      const to = this.seqCounter - 1;
      await this.appendNote(RecordType.ROLLBACK_END, to, { id, target, from: rb.from, to });
      rb.state = 'done';
      this.env.emit('cdp.rollback-done', { id, target, from: rb.from, to });
      return {
        id,
        target,
        from: rb.from,
        to,
        blocksRestored: rb.blocksRestored,
        undo: `mark ${before}`,
      };
    } catch (err) {
      rb.state = 'failed';
      rb.error = err instanceof Error ? err.message : String(err);
      this.env.emit('cdp.rollback-failed', { id, target, error: rb.error });
      throw new FilterCommandError(
        `rollback ${id} failed part way (${rb.error}); the export holds a mix of both points: roll back again, to ${target} or to mark ${before}`,
      );
    } finally {
      thaw();
    }
  }

  /** Writes every block changed after `target` (up to rb.from) back to its content then. */
  private async restore(below: Device, target: number, rb: Rollback): Promise<void> {
    const B = this.settings.blockSize;
    const size = this.env.below.size;
    const done = new BlockSet();
    for (let seq = target + 1; seq <= rb.from; seq++) {
      const row = this.log.row(seq);
      // Runs of this change's blocks that no earlier change after the target restored.
      for (let b = row.blockStart; b < row.blockStart + row.blockCount;) {
        if (done.has(b)) {
          b++;
          continue;
        }
        let e = b;
        while (e < row.blockStart + row.blockCount && !done.has(e)) done.add(e++);
        const from = b * B;
        const to = Math.min(e * B, size);
        if (row.type === RecordType.UNDO_ZERO && below.info().caps.zero) {
          await this.change(below, ChangeOp.ROLLBACK, from, to - from, () =>
            below.writeZeroes(from, to - from, 0),
          );
        } else if (row.type === RecordType.UNDO_ZERO) {
          const zeros = Buffer.alloc(to - from);
          await this.change(below, ChangeOp.ROLLBACK, from, to - from, () =>
            below.write(zeros, from, 0),
          );
        } else {
          const data = Buffer.allocUnsafe(to - from);
          await this.journal.readPayload(
            row.segmentNo,
            row.payloadPos + (b - row.blockStart) * B,
            data,
          );
          await this.change(below, ChangeOp.ROLLBACK, from, to - from, () =>
            below.write(data, from, 0),
          );
        }
        if (this.failure !== null) throw new Error(`the journal failed: ${this.failure.reason}`);
        rb.blocksRestored += e - b;
        b = e;
      }
    }
  }

  // ---- retention ------------------------------------------------------------------------------

  private scheduleRetention(): void {
    if (this.closed) return;
    if (this.retentionRunning !== null) {
      this.retentionWanted = true;
      return;
    }
    void this.runRetention();
  }

  /** Drops the oldest segments that the limits let go and no view or rollback needs. */
  runRetention(): Promise<void> {
    if (this.retentionRunning !== null) {
      this.retentionWanted = true;
      return this.retentionRunning;
    }
    const run = (async () => {
      try {
        do {
          this.retentionWanted = false;
          await this.retainOnce();
        } while (this.retentionWanted && !this.closed);
      } catch (err) {
        this.env.logger.error({ err: (err as Error).message }, 'cdp retention failed');
      } finally {
        this.retentionRunning = null;
      }
    })();
    this.retentionRunning = run;
    return run;
  }

  private retainOnce(): Promise<void> {
    return this.serial(() => this.retainNow());
  }

  private async retainNow(): Promise<void> {
    let dropped = 0;
    for (;;) {
      const segs = this.journal.segments;
      if (segs.length < 2 || this.closed || this.failure !== null) break;
      const seg = segs[0]!;
      if (seg.lastSeq > this.pinnedPoint()) break;
      const overBytes = this.journal.bytes > this.settings.keepBytes;
      const overIndex = this.log.blockEntries > this.settings.indexLimit;
      const expired = this.settings.keepMs > 0 && seg.lastSeq <= this.ageOldest();
      if (!overBytes && !overIndex && !expired) break;
      // From here on no view or rollback may ask for a point this segment is needed for.
      this.droppingThrough = Math.max(this.droppingThrough, seg.lastSeq);
      // Marks journaled in this segment whose points stay reachable are written again first,
      // durably, so that a crash in between loses none.
      for (const [name, m] of [...this.marks]) {
        if (m.segmentNo !== seg.no) continue;
        if (m.point < seg.lastSeq) this.marks.delete(name);
        else await this.appendMark(name, m.point, m.timeMs);
      }
      // Unindex its changes (in batches, yielding to client I/O), then delete the file.
      let n = 0;
      while (this.log.rows > 0 && this.log.firstSeq <= seg.lastSeq) {
        this.log.dropOldest();
        if (++n % DROP_BATCH === 0) await new Promise((r) => setImmediate(r));
      }
      await this.journal.dropOldestSegment();
      this.droppedSegments++;
      dropped++;
    }
    if (dropped === 0) return;
    const oldest = this.oldestPoint();
    for (const [name, m] of this.marks) if (m.point < oldest) this.marks.delete(name);
    this.env.emit('cdp.retained', {
      droppedSegments: dropped,
      oldest,
      journalBytes: this.journal.bytes,
    });
  }

  /** Views and a running rollback need the changes after their points. */
  private pinnedPoint(): number {
    let pin = Number.MAX_SAFE_INTEGER;
    for (const p of this.pins.values()) pin = Math.min(pin, p);
    return pin;
  }

  private ageOldest(): number {
    return this.log.rows === 0
      ? this.log.firstSeq - 1
      : this.log.lastSeqAtOrBefore(Date.now() - this.settings.keepMs);
  }

  // ---- timeline, status, reset ----------------------------------------------------------------

  private timeline(a: { minutes: number; bucketSeconds: number }): unknown {
    const now = Date.now();
    const bucketMs = a.bucketSeconds * 1000;
    const end = Math.ceil(now / bucketMs) * bucketMs;
    const start = end - Math.ceil((a.minutes * 60_000) / bucketMs) * bucketMs;
    const count = Math.round((end - start) / bucketMs);
    if (count > MAX_TIMELINE_BUCKETS)
      throw new FilterCommandError(
        `timeline: ${count} buckets asked for, at most ${MAX_TIMELINE_BUCKETS}: use fewer minutes or wider buckets`,
      );
    const buckets = Array.from({ length: count }, (_, i) => ({
      start: new Date(start + i * bucketMs).toISOString(),
      changes: 0,
      bytes: 0,
      rollback: 0,
    }));
    const B = this.settings.blockSize;
    const from = this.log.lastSeqAtOrBefore(start - 1) + 1;
    this.log.forEachFrom(from, (t, blocks, op) => {
      const i = Math.floor((t - start) / bucketMs);
      const bucket = buckets[i];
      if (bucket === undefined) return;
      if (op === ChangeOp.ROLLBACK) bucket.rollback++;
      else bucket.changes++;
      bucket.bytes += blocks * B;
    });
    const oldest = this.oldestPoint();
    return {
      from: new Date(start).toISOString(),
      to: new Date(end).toISOString(),
      bucketSeconds: a.bucketSeconds,
      buckets,
      marks: this.listMarks(),
      oldest: { point: oldest, before: this.pointTime(oldest + 1) },
      newest: { point: this.seqCounter - 1, time: this.pointTime(this.seqCounter - 1) },
      retention: this.retentionFacts(),
    };
  }

  private retentionFacts() {
    return {
      keepHours: this.settings.keepMs / 3600_000,
      keepBytes: this.settings.keepBytes,
      indexLimit: this.settings.indexLimit,
      heldBy: [...this.views.values()]
        .filter((v) => v.device.isOpen && this.journal.segments[0]!.lastSeq > v.point)
        .map((v) => v.name),
      droppedSegments: this.droppedSegments,
    };
  }

  status(): unknown {
    const oldest = this.oldestPoint();
    const newest = this.seqCounter - 1;
    return {
      state:
        this.failure === null
          ? 'active'
          : this.settings.onError === 'keep-serving'
            ? 'failed (history lost, writes served)'
            : 'failed (history kept, writes stopped)',
      dir: this.journal.dir,
      historyId: this.journal.historyId,
      blockSize: this.settings.blockSize,
      oldest: { point: oldest, before: this.pointTime(oldest + 1) },
      newest: { point: newest, time: this.pointTime(newest) },
      changes: this.log.rows,
      journal: {
        bytes: this.journal.bytes,
        segments: this.journal.segments.length,
        commits: this.journal.commits,
      },
      index: {
        entries: this.log.blockEntries,
        chunks: this.log.touchedChunks,
        chunkBlocks: this.log.chunkBlocks,
        // About 8 bytes per list entry and 80 per chunk (map slot, list), 37 per change row.
        approxBytes: this.log.blockEntries * 8 + this.log.touchedChunks * 80 + this.log.rows * 37,
      },
      retention: this.retentionFacts(),
      marks: this.marks.size,
      views: this.listViews(),
      inFlight: this.inFlight.size,
      paused: this.gate.gate !== null,
      rollback: this.rollback,
      failure: this.failure,
      recovery: this.report,
    };
  }

  /**
   * After a journal failure with onError=stop-writes (the disk full, say, and space made):
   * reopens the journal — cutting what the failed commit left — and lets writes go again,
   * with the history intact.
   */
  private resume(): Promise<unknown> {
    return this.serial(() => this.resumeNow());
  }

  private async resumeNow(): Promise<unknown> {
    if (this.failure === null) throw new FilterCommandError('the journal has not failed');
    if (this.settings.onError !== 'stop-writes')
      throw new FilterCommandError('the history was lost when the journal failed: reset it');
    const thaw = await this.gate.exclusive(() => this.gate.freeze(DEFAULT_PAUSE_TIMEOUT_MS));
    try {
      const dir = this.journal.dir;
      await this.retentionRunning;
      await this.journal.close();
      for (const v of [...this.views.values()]) this.dropView(v);
      this.inFlight.clear();
      this.wakeWaiters();
      await this.openJournal(dir);
      this.failure = null;
      this.env.emit('cdp.resumed', { point: this.seqCounter - 1 });
      return { resumed: true, point: this.seqCounter - 1 };
    } finally {
      thaw();
    }
  }

  /** Starts a new, empty history (after a failure, or to let the old one go at once). */
  private reset(): Promise<unknown> {
    return this.serial(() => this.resetNow());
  }

  private async resetNow(): Promise<unknown> {
    const thaw = await this.gate.exclusive(() => this.gate.freeze(DEFAULT_PAUSE_TIMEOUT_MS));
    try {
      for (const v of [...this.views.values()]) this.dropView(v);
      const dir = this.journal.dir;
      await this.retentionRunning;
      await this.journal.destroy();
      this.failure = null;
      this.rollback = null;
      this.inFlight.clear();
      this.wakeWaiters();
      await this.openJournal(dir);
      this.env.emit('cdp.reset', { historyId: this.journal.historyId });
      return { historyId: this.journal.historyId, point: this.seqCounter - 1 };
    } finally {
      thaw();
    }
  }

  // ---- life cycle -----------------------------------------------------------------------------

  activate(): void {
    if (this.retentionTimer !== null || this.closed) return;
    this.retentionTimer = setInterval(() => {
      if (this.settings.keepMs > 0 && this.journal.segments.length > 1) this.scheduleRetention();
    }, RETENTION_INTERVAL_MS);
    this.retentionTimer.unref();
  }

  async destroy(policy: string): Promise<void> {
    this.closed = true;
    if (this.retentionTimer !== null) clearInterval(this.retentionTimer);
    for (const v of [...this.views.values()]) this.dropView(v);
    await this.retentionRunning;
    if (policy === 'discard') await this.journal.destroy();
    else await this.journal.close();
  }
}

/** A set of block numbers, as bitmaps of 32768 blocks allocated where blocks are added. */
class BlockSet {
  private readonly pages = new Map<number, Uint8Array>();

  has(b: number): boolean {
    const page = this.pages.get(Math.floor(b / 32768));
    const i = b % 32768;
    return page !== undefined && (page[i >> 3]! & (1 << (i & 7))) !== 0;
  }

  add(b: number): void {
    const key = Math.floor(b / 32768);
    let page = this.pages.get(key);
    if (page === undefined) this.pages.set(key, (page = new Uint8Array(4096)));
    const i = b % 32768;
    page[i >> 3]! |= 1 << (i & 7);
  }
}

/** The journal could not take a record (as opposed to the device failing a read). */
class JournalFailure extends Error {
  constructor(override readonly cause: unknown) {
    super(cause instanceof Error ? cause.message : String(cause));
  }
}

function rowOf(h: RecordHeader, at: RecordLocation) {
  return {
    seq: h.seq,
    timeMs: h.timeMs,
    blockStart: h.blockStart,
    blockCount: h.blockCount,
    type: h.type,
    op: h.op,
    segmentNo: at.segmentNo,
    payloadPos: at.payloadPos,
  };
}

function parseBody(payload: Buffer | null): Record<string, unknown> {
  if (payload === null) return {};
  try {
    const v = JSON.parse(payload.toString('utf8')) as unknown;
    return typeof v === 'object' && v !== null ? (v as Record<string, unknown>) : {};
  } catch {
    return {};
  }
}

/** Whether the range reads as zeros by the device's own account (saves reading it). */
async function readsAsZero(next: Device, offset: number, length: number): Promise<boolean> {
  if (length === 0) return true;
  try {
    const [e] = await next.blockStatus(offset, length, RequestFlags.REQ_ONE);
    return e !== undefined && e.length >= length && (e.state & ExtentState.ZERO) !== 0;
  } catch {
    return false;
  }
}

function toJournalError(err: unknown): DeviceError {
  const e = toDeviceError(err);
  return new DeviceError(
    e.errno === 'ENOSPC' ? 'ENOSPC' : 'EIO',
    `cdp: journaling the change failed: ${e.message}`,
    { cause: err },
  );
}
