/**
 * The cdp journal on disk (docs/cdp-format.md): DIR/meta names the history; DIR/NNNN.seg are
 * segments of records appended in sequence order; DIR/lock names the process that has it open.
 *
 * Appends are group-committed: records that arrive while a commit runs share the next
 * writev + fdatasync, so a queue of concurrent writes costs one sync, not one each. A record
 * resolves only once it is durable; the filter lets the change it describes go down only then.
 * Retention drops whole segments from the old end: an unlink, no rewriting.
 */
import { randomUUID } from 'node:crypto';
import fs from 'node:fs';
import { join } from 'node:path';
import type { Logger } from 'pino';
import { closeFd, fdatasync, preadFull, pwritevFull } from '../../backends/fdio.js';
import { crc32 } from '../../core/crc32.js';
import { assert } from '../../core/errors.js';
import {
  fsyncDir,
  ftruncateFd,
  fstatSize,
  openFd,
  readIfExists,
  takeLock,
  writeFileAtomic,
} from '../../core/durable-files.js';
import { makeDirs } from '../../core/make-dirs.js';
import {
  FormatError,
  RECORD_HEADER_BYTES,
  RecordType,
  SEGMENT_HEADER_BYTES,
  decodeMeta,
  decodeRecordHeader,
  decodeSegmentHeader,
  encodeMeta,
  encodeRecordHeader,
  encodeSegmentHeader,
  parseSegmentFileName,
  segmentFileName,
  type RecordHeader,
} from './format.js';

const META_FILE = 'meta';
const LOCK_FILE = 'lock';
/** Records one commit takes at most: bounds a commit's iovecs and its latency. */
const MAX_BATCH_RECORDS = 512;
/** Reading window when scanning a segment at open. */
const SCAN_WINDOW = 1024 * 1024;

export interface SegmentInfo {
  no: number;
  path: string;
  fd: number;
  firstSeq: number;
  /** When it was started: no change it holds is older. */
  createdMs: number;
  /** Bytes written (and durable) so far. */
  bytes: number;
  /** Change records it holds, and the last one's seq (firstSeq - 1 if none). */
  changes: number;
  /** Sum of its records' weights. */
  weight: number;
  lastSeq: number;
}

/** Where a durable record lives. */
export interface RecordLocation {
  segmentNo: number;
  payloadPos: number;
}

export interface ScanReport {
  /** How the journal was found. */
  state: 'created' | 'opened';
  segments: number;
  records: number;
  /** Bytes of torn tail cut off the last segment (a crash during an append). */
  tornBytes: number;
  /** Segments dropped because they were unreadable in the middle, and why. */
  notes: string[];
}

export interface OpenOptions {
  dir: string;
  size: number;
  blockSize: number;
  segmentBytes: number;
  /** A segment also ends when the weights of its records reach this (the index they cost). */
  segmentWeight: number;
  weightOf(h: RecordHeader): number;
  logger: Logger;
  /** Called for each valid record found, in journal order. */
  onRecord(h: RecordHeader, at: RecordLocation, payload: Buffer | null): void;
  /** Everything handed to onRecord so far was dropped (an unreadable segment): forget it. */
  onDiscard(): void;
}

interface Pending {
  header: RecordHeader;
  payload: Buffer | null;
  resolve: (at: RecordLocation) => void;
  reject: (err: unknown) => void;
}

export class Journal {
  private queue: Pending[] = [];
  private running = false;
  private broken: Error | null = null;
  private closed = false;
  commits = 0;
  lastCommitMs = 0;
  /** Called for each record once durable, in journal order, before its append resolves. */
  onCommitted: ((h: RecordHeader, at: RecordLocation) => void) | null = null;

  private constructor(
    readonly dir: string,
    readonly historyId: string,
    readonly blockSize: number,
    private readonly segmentBytes: number,
    private readonly segmentWeight: number,
    private readonly weightOf: (h: RecordHeader) => number,
    readonly segments: SegmentInfo[],
    private readonly unlock: () => Promise<void>,
    private readonly logger: Logger,
  ) {}

  get bytes(): number {
    return this.segments.reduce((n, s) => n + s.bytes, 0);
  }

  get active(): SegmentInfo {
    return this.segments[this.segments.length - 1]!;
  }

  /** The error that stopped appends, if any: the journal takes no more records after one. */
  get failure(): Error | null {
    return this.broken;
  }

  /**
   * Opens DIR (creating it and a new history if there is none), scans every segment and hands
   * each record to `onRecord`, cuts a torn tail, and leaves a segment open for appending.
   */
  static async open(o: OpenOptions): Promise<{ journal: Journal; report: ScanReport }> {
    await makeDirs(o.dir, 0o700);
    const unlock = await takeLock(join(o.dir, LOCK_FILE), `cdp journal ${o.dir}`);
    const segments: SegmentInfo[] = [];
    try {
      const metaBytes = await readIfExists(join(o.dir, META_FILE));
      const names = (await fs.promises.readdir(o.dir))
        .map((n) => ({ n, no: parseSegmentFileName(n) }))
        .filter((e): e is { n: string; no: number } => e.no !== null)
        .sort((a, b) => a.no - b.no);
      let historyId: string;
      let blockSize = o.blockSize;
      const report: ScanReport = {
        state: 'opened',
        segments: 0,
        records: 0,
        tornBytes: 0,
        notes: [],
      };
      if (metaBytes === null) {
        if (names.length > 0) {
          // The history was given up (a journal failure, with writes served unjournaled after
          // it) or its deletion was cut short: its segments describe nothing any more.
          report.notes.push(
            `${names.length} segment(s) of a history given up (no meta file) removed: a new history starts`,
          );
          for (const { n } of names) await fs.promises.rm(join(o.dir, n), { force: true });
          names.length = 0;
        }
        historyId = randomUUID();
        await writeFileAtomic(
          o.dir,
          META_FILE,
          encodeMeta({ historyId, size: o.size, blockSize, createdMs: Date.now() }),
        );
        report.state = 'created';
      } else {
        const meta = decodeMeta(metaBytes);
        if (meta.size !== o.size)
          throw new Error(
            `${o.dir} is the history of a device of ${meta.size} bytes, not ${o.size}: use another dir, or reset it`,
          );
        historyId = meta.historyId;
        blockSize = meta.blockSize;
      }
      const journal = new Journal(
        o.dir,
        historyId,
        blockSize,
        o.segmentBytes,
        o.segmentWeight,
        o.weightOf,
        segments,
        unlock,
        o.logger,
      );
      try {
        await journal.scan(names, o, report);
        if (segments.length === 0) await journal.roll(journal.nextSegmentNo, journal.nextSeq);
      } catch (err) {
        await journal.closeFds();
        throw err;
      }
      return { journal, report };
    } catch (err) {
      await unlock();
      throw err;
    }
  }

  /** Where a new history would continue after segments dropped by the scan. */
  private nextSegmentNo = 1;
  private nextSeq = 1;

  private async scan(
    names: { n: string; no: number }[],
    o: OpenOptions,
    report: ScanReport,
  ): Promise<void> {
    let expectSeq: number | null = null;
    let dropped = false;
    for (let k = 0; k < names.length; k++) {
      const { n, no } = names[k]!;
      const last = k === names.length - 1;
      const path = join(this.dir, n);
      const fd = await openFd(path, fs.constants.O_RDWR);
      const seg: SegmentInfo = {
        no,
        path,
        fd,
        firstSeq: 0,
        createdMs: 0,
        bytes: 0,
        weight: 0,
        changes: 0,
        lastSeq: 0,
      };
      let headerRead = false;
      try {
        const head = Buffer.alloc(SEGMENT_HEADER_BYTES);
        await preadFull(fd, head, 0);
        const h = decodeSegmentHeader(head);
        headerRead = true;
        if (h.historyId !== this.historyId || h.segmentNo !== no || h.blockSize !== this.blockSize)
          throw new FormatError(`segment ${n} belongs to another history`);
        if (expectSeq !== null && h.firstSeq !== expectSeq) {
          // A gap (a segment lost in between): this one and the newer ones are whole; the
          // points before the gap cannot be rebuilt, so the older segments go.
          report.notes.push(
            `segment ${n} starts at change ${h.firstSeq}, not ${expectSeq}: the history before it dropped`,
          );
          await this.dropScanned(o);
          report.segments = 0;
          dropped = true;
        }
        seg.firstSeq = h.firstSeq;
        seg.createdMs = h.createdMs;
        seg.lastSeq = h.firstSeq - 1;
        const fileBytes = await fstatSize(fd);
        const end = await this.scanRecords(seg, fileBytes, last, o.onRecord, report);
        if (end < fileBytes) {
          if (!last) throw new FormatError(`segment ${n} has an unreadable record at byte ${end}`);
          report.tornBytes = fileBytes - end;
          await ftruncateFd(fd, end);
          await fdatasync(fd);
        }
        seg.bytes = end;
        expectSeq = seg.lastSeq + 1;
        this.segments.push(seg);
        report.segments++;
      } catch (err) {
        await closeFd(fd);
        if (!(err instanceof FormatError)) throw err;
        dropped = true;
        this.nextSegmentNo = Math.max(this.nextSegmentNo, no + 1);
        this.nextSeq = Math.max(this.nextSeq, expectSeq ?? 1, seg.lastSeq + 1);
        if (last && !headerRead) {
          // A crash while a new segment was being started: it holds no record yet.
          report.notes.push(`${n}: unfinished new segment removed`);
          await fs.promises.rm(path, { force: true });
          continue;
        }
        // Unreadable in the middle: the points before its end cannot be rebuilt. Drop it and
        // everything older; the history goes on from the next segment.
        report.notes.push(`${err.message}: history up to it dropped`);
        this.logger.warn({ segment: n, err: err.message }, 'cdp journal segment dropped');
        await fs.promises.rm(seg.path, { force: true });
        await this.dropScanned(o);
        report.segments = 0;
        expectSeq = null;
      }
    }
    if (dropped) await fsyncDir(this.dir);
  }

  /** Forgets and deletes the segments scanned so far (older than a gap or a bad segment). */
  private async dropScanned(o: OpenOptions): Promise<void> {
    for (const s of this.segments) {
      await closeFd(s.fd);
      await fs.promises.rm(s.path, { force: true });
    }
    this.segments.length = 0;
    o.onDiscard();
  }

  /** Reads the records of one segment; returns where the valid ones end. */
  private async scanRecords(
    seg: SegmentInfo,
    fileBytes: number,
    checkPayloads: boolean,
    onRecord: OpenOptions['onRecord'],
    report: ScanReport,
  ): Promise<number> {
    let at = SEGMENT_HEADER_BYTES;
    let win = Buffer.alloc(0);
    let winStart = 0;
    const window = async (pos: number, need: number): Promise<Buffer> => {
      if (pos >= winStart && pos + need <= winStart + win.length)
        return win.subarray(pos - winStart, pos - winStart + need);
      const len = Math.min(Math.max(need, SCAN_WINDOW), fileBytes - pos);
      if (len < need) return Buffer.alloc(0);
      win = Buffer.allocUnsafe(len);
      winStart = pos;
      await preadFull(seg.fd, win, pos);
      return win.subarray(0, need);
    };
    while (at + RECORD_HEADER_BYTES <= fileBytes) {
      const hb = await window(at, RECORD_HEADER_BYTES);
      const h = decodeRecordHeader(hb, 0);
      if (h === null) break;
      const payloadPos = at + RECORD_HEADER_BYTES;
      if (payloadPos + h.payloadBytes > fileBytes) break;
      const isChange = h.type === RecordType.UNDO_DATA || h.type === RecordType.UNDO_ZERO;
      if (isChange && h.seq !== seg.lastSeq + 1) break;
      let payload: Buffer | null = null;
      if (h.payloadBytes > 0 && (checkPayloads || !isChange)) {
        payload = Buffer.from(await window(payloadPos, h.payloadBytes));
        if (crc32(payload) !== h.payloadCrc) break;
      }
      if (isChange) {
        seg.lastSeq = h.seq;
        seg.changes++;
        seg.weight += this.weightOf(h);
      }
      onRecord(h, { segmentNo: seg.no, payloadPos }, isChange ? null : payload);
      report.records++;
      at = payloadPos + h.payloadBytes;
    }
    return at;
  }

  /** Starts segment `no` whose first change is `firstSeq`; durable before it is used. */
  private async roll(no: number, firstSeq: number): Promise<void> {
    const path = join(this.dir, segmentFileName(no));
    const fd = await openFd(path, fs.constants.O_RDWR | fs.constants.O_CREAT | fs.constants.O_EXCL);
    const createdMs = Date.now();
    try {
      const head = encodeSegmentHeader({
        historyId: this.historyId,
        segmentNo: no,
        firstSeq,
        createdMs,
        blockSize: this.blockSize,
      });
      await pwritevFull(fd, [head], 0);
      await fdatasync(fd);
      await fsyncDir(this.dir);
    } catch (err) {
      await closeFd(fd);
      await fs.promises.rm(path, { force: true });
      throw err;
    }
    this.segments.push({
      no,
      path,
      fd,
      firstSeq,
      createdMs,
      bytes: SEGMENT_HEADER_BYTES,
      weight: 0,
      changes: 0,
      lastSeq: firstSeq - 1,
    });
  }

  /**
   * Appends a record; resolves with its location once it is durable. The payload is written
   * as given (the caller keeps it unchanged until then). After a failed commit every append
   * fails with that error.
   */
  append(header: RecordHeader, payload: Buffer | null): Promise<RecordLocation> {
    assert((payload?.length ?? 0) === header.payloadBytes, 'record payload length');
    if (this.closed) return Promise.reject(new Error('cdp journal is closed'));
    if (this.broken !== null) return Promise.reject(this.broken);
    return new Promise((resolve, reject) => {
      this.queue.push({ header, payload, resolve, reject });
      if (!this.running) void this.commitLoop();
    });
  }

  private async commitLoop(): Promise<void> {
    this.running = true;
    try {
      while (this.queue.length > 0) {
        const batch = this.queue.splice(0, MAX_BATCH_RECORDS);
        try {
          const locations = await this.commit(batch);
          for (let i = 0; i < batch.length; i++)
            this.onCommitted?.(batch[i]!.header, locations[i]!);
          for (let i = 0; i < batch.length; i++) batch[i]!.resolve(locations[i]!);
        } catch (err) {
          this.broken = err instanceof Error ? err : new Error(String(err));
          this.logger.error({ err: this.broken.message }, 'cdp journal append failed');
          for (const p of batch) p.reject(this.broken);
          for (const p of this.queue.splice(0)) p.reject(this.broken);
        }
      }
    } finally {
      this.running = false;
    }
  }

  private async commit(batch: Pending[]): Promise<RecordLocation[]> {
    const bytes = batch.reduce((n, p) => n + RECORD_HEADER_BYTES + p.header.payloadBytes, 0);
    const weight = batch.reduce((n, p) => n + this.weightOf(p.header), 0);
    let seg = this.active;
    const full = seg.bytes + bytes > this.segmentBytes || seg.weight + weight > this.segmentWeight;
    if (full && seg.bytes > SEGMENT_HEADER_BYTES) {
      await this.roll(seg.no + 1, seg.lastSeq + 1);
      seg = this.active;
    }
    const bufs: Buffer[] = [];
    const locations: RecordLocation[] = [];
    let at = seg.bytes;
    let changes = 0;
    let lastSeq = seg.lastSeq;
    for (const p of batch) {
      const hb = Buffer.allocUnsafe(RECORD_HEADER_BYTES);
      encodeRecordHeader(hb, p.header);
      bufs.push(hb);
      if (p.payload !== null && p.payload.length > 0) bufs.push(p.payload);
      locations.push({ segmentNo: seg.no, payloadPos: at + RECORD_HEADER_BYTES });
      at += RECORD_HEADER_BYTES + p.header.payloadBytes;
      const t = p.header.type;
      if (t === RecordType.UNDO_DATA || t === RecordType.UNDO_ZERO) {
        assert(p.header.seq === lastSeq + 1, `change ${p.header.seq} out of order`);
        lastSeq = p.header.seq;
        changes++;
      }
    }
    await pwritevFull(seg.fd, bufs, seg.bytes);
    await fdatasync(seg.fd);
    seg.bytes = at;
    seg.weight += weight;
    seg.changes += changes;
    seg.lastSeq = lastSeq;
    this.commits++;
    this.lastCommitMs = Date.now();
    return locations;
  }

  /** Reads `buf.length` bytes of payload at `pos` of segment `no`. */
  async readPayload(no: number, pos: number, buf: Buffer): Promise<void> {
    const seg = this.segmentByNo(no);
    assert(seg !== undefined, `segment ${no} is gone`);
    assert(pos + buf.length <= seg.bytes, `read past the durable end of segment ${no}`);
    await preadFull(seg.fd, buf, pos);
  }

  segmentByNo(no: number): SegmentInfo | undefined {
    const first = this.segments[0];
    if (first === undefined) return undefined;
    return this.segments[no - first.no];
  }

  /** Deletes the oldest segment (never the one being appended to). */
  async dropOldestSegment(): Promise<SegmentInfo> {
    assert(this.segments.length > 1, 'dropping the active segment');
    const seg = this.segments.shift()!;
    await closeFd(seg.fd);
    await fs.promises.rm(seg.path, { force: true });
    return seg;
  }

  /** Waits for appends in progress, then closes the files and releases the lock. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    while (this.running) await new Promise((r) => setTimeout(r, 1));
    await this.closeFds();
    await this.unlock();
  }

  /**
   * Marks the history lost on disk (its meta file removed, durably), so that no later open
   * takes its segments for a whole history. An unlink works even on a full disk.
   */
  async giveUp(): Promise<void> {
    await fs.promises.rm(join(this.dir, META_FILE), { force: true });
    await fsyncDir(this.dir);
  }

  /** Closes and deletes the whole journal (the `discard` removal policy, a reset). */
  async destroy(): Promise<void> {
    await this.close();
    // The meta file first: a crash part way leaves segments that the next open removes.
    await this.giveUp();
    for (const s of this.segments) await fs.promises.rm(s.path, { force: true });
  }

  private async closeFds(): Promise<void> {
    for (const s of this.segments) await closeFd(s.fd).catch(() => undefined);
  }
}
