/**
 * The access filter's audit log writer: JSON lines, hash-chained (audit-format.ts), appended
 * with group commit. A request whose event must be recorded waits until its line is written
 * and fdatasync'd; lines queued at once share one write and one fdatasync. The queue is
 * bounded (`maxQueue` lines): beyond it, a request waits for room before its line is built —
 * and those waits are bounded by the NBD server's in-flight limit per connection.
 *
 * Sequence numbers and hashes are assigned when a batch is written, so a failed write leaves
 * no hole in the chain: the batch's requests fail, the chain resumes where the file ends.
 *
 * On open, an existing log is continued: its last complete line must verify (else the open is
 * refused: the chain would go on from something that is not the log's), a torn tail (bytes
 * after the last newline, from a crash mid-append; never acknowledged) is cut off and recorded
 * in the chain as a `torn-tail` line, and an `open` line marks the start of the run.
 */
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import type { Logger } from 'pino';
import { closeFd, fdatasync, pwriteFull } from '../../backends/fdio.js';
import { ftruncateFd, fsyncDir, openFd, takeLock } from '../../core/durable-files.js';
import {
  AUDIT_FORMAT_VERSION,
  HEADER_TYPE,
  genesisOf,
  parseLine,
  sealLine,
  sha256Hex,
} from './audit-format.js';
import { dirname, resolve } from 'node:path';

export const DEFAULT_AUDIT_QUEUE = 1024;
/** The tail read to find the last line on open; lines are far shorter. */
const TAIL_WINDOW = 1024 * 1024;

export interface AuditLogStats {
  path: string;
  logId: string;
  lastSeq: number;
  lastHash: string;
  bytes: number;
  queued: number;
  written: number;
  commits: number;
  failures: number;
  lastError: string | null;
  /** How the log was found at open: new, continued, or continued after cutting a torn tail. */
  opened: 'created' | 'continued' | 'torn-tail-cut';
}

interface Pending {
  fields: Record<string, unknown>;
  resolve: () => void;
  reject: (e: unknown) => void;
}

export class AuditLog {
  private queue: Pending[] = [];
  private roomWaiters: Array<() => void> = [];
  private running = false;
  private idle: Promise<void> = Promise.resolve();
  private written = 0;
  private commits = 0;
  private failures = 0;
  private lastError: string | null = null;
  /** A failed write may have left bytes past `size`: cut them before the next one. */
  private dirtyTail = false;
  private closed = false;

  private constructor(
    readonly path: string,
    private readonly fd: number,
    private size: number,
    readonly logId: string,
    private seq: number,
    private lastHash: string,
    private readonly maxQueue: number,
    private readonly opened: AuditLogStats['opened'],
    private readonly unlock: () => Promise<void>,
    private readonly logger: Logger,
  ) {}

  /**
   * Opens (or creates) the log at `path` and writes its first lines of this run (the header
   * for a new log; a torn-tail line if one was cut; an `open` line) durably.
   */
  static async open(
    path: string,
    o: { exportName: string; filterName: string; maxQueue?: number; logger: Logger },
  ): Promise<AuditLog> {
    const full = resolve(path);
    const unlock = await takeLock(`${full}.lock`, `audit log ${full}`);
    let fd: number | undefined;
    try {
      fd = await openFd(full, fs.constants.O_RDWR | fs.constants.O_CREAT, 0o600);
      const st = await fs.promises.stat(full);
      if (!st.isFile()) throw new Error(`audit log ${full} is not a regular file`);
      const first: Array<Record<string, unknown>> = [];
      let size = st.size;
      let logId: string;
      let seq: number;
      let lastHash: string;
      let opened: AuditLogStats['opened'] = 'continued';
      if (size === 0) {
        logId = randomBytes(16).toString('hex');
        seq = -1;
        lastHash = genesisOf(logId);
        first.push({
          type: HEADER_TYPE,
          version: AUDIT_FORMAT_VERSION,
          logId,
          created: new Date().toISOString(),
          export: o.exportName,
          filter: o.filterName,
        });
        opened = 'created';
      } else {
        const tail = await readTail(fd, size);
        const lastNl = tail.buf.lastIndexOf(0x0a);
        if (lastNl < 0)
          throw new Error(
            `audit log ${full}: no complete line in its last ${tail.buf.length} bytes; not an audit log this filter can continue`,
          );
        const prevNl = tail.buf.lastIndexOf(0x0a, lastNl - 1);
        const line = tail.buf.subarray(prevNl + 1, lastNl).toString('utf8');
        const parsed = parseLine(line);
        if (!parsed.ok)
          throw new Error(
            `audit log ${full}: its last complete line does not verify (${parsed.reason}); check it with "devfilter audit verify" and move it aside`,
          );
        const s = parsed.fields.seq;
        if (typeof s !== 'number' || !Number.isSafeInteger(s) || s < 0)
          throw new Error(`audit log ${full}: its last line has no valid seq`);
        seq = s;
        lastHash = parsed.hash;
        logId = await readLogId(fd, full);
        const torn = tail.buf.subarray(lastNl + 1);
        if (torn.length > 0) {
          const cutAt = tail.offset + lastNl + 1;
          first.push({
            type: 'torn-tail',
            time: new Date().toISOString(),
            bytes: torn.length,
            sha256: sha256Hex(torn),
            note: 'bytes after the last complete line (an append cut short by a crash) were removed',
          });
          await ftruncateFd(fd, cutAt);
          size = cutAt;
          opened = 'torn-tail-cut';
        }
      }
      first.push({
        type: 'open',
        time: new Date().toISOString(),
        export: o.exportName,
        filter: o.filterName,
        pid: process.pid,
      });
      const log = new AuditLog(
        full,
        fd,
        size,
        logId,
        seq,
        lastHash,
        Math.max(1, o.maxQueue ?? DEFAULT_AUDIT_QUEUE),
        opened,
        unlock,
        o.logger,
      );
      await Promise.all(first.map((f) => log.append(f)));
      if (opened === 'created') await fsyncDir(dirname(full));
      return log;
    } catch (err) {
      if (fd !== undefined) await closeFd(fd).catch(() => undefined);
      await unlock();
      throw err;
    }
  }

  /**
   * Appends a line made of `fields` (seq first, prev and hash added); resolves once it is
   * durable, rejects if it could not be written.
   */
  async append(fields: Record<string, unknown>): Promise<void> {
    while (this.queue.length >= this.maxQueue && !this.closed)
      await new Promise<void>((r) => this.roomWaiters.push(r));
    if (this.closed) throw new Error('the audit log is closed');
    return new Promise((resolve, reject) => {
      this.queue.push({ fields, resolve, reject });
      if (!this.running) {
        this.running = true;
        this.idle = this.drain();
      }
    });
  }

  private async drain(): Promise<void> {
    while (this.queue.length > 0) {
      const batch = this.queue.splice(0, this.queue.length);
      for (const wake of this.roomWaiters.splice(0, this.roomWaiters.length)) wake();
      const seq0 = this.seq;
      const hash0 = this.lastHash;
      let seq = seq0;
      let hash = hash0;
      const lines: string[] = [];
      for (const p of batch) {
        seq++;
        const sealed = sealLine({ seq, ...p.fields, prev: hash });
        lines.push(sealed.line, '\n');
        hash = sealed.hash;
      }
      const data = Buffer.from(lines.join(''), 'utf8');
      try {
        if (this.dirtyTail) {
          await ftruncateFd(this.fd, this.size);
          this.dirtyTail = false;
        }
        await pwriteFull(this.fd, data, this.size);
        await fdatasync(this.fd);
      } catch (err) {
        this.dirtyTail = true;
        this.failures++;
        this.lastError = (err as Error).message;
        this.logger.error({ err, path: this.path }, 'access: audit log write failed');
        for (const p of batch) p.reject(err);
        continue;
      }
      this.size += data.length;
      this.seq = seq;
      this.lastHash = hash;
      this.written += batch.length;
      this.commits++;
      for (const p of batch) p.resolve();
    }
    this.running = false;
  }

  /** Writes a `close` line and closes the file (a clean end of the run). */
  async close(): Promise<void> {
    if (this.closed) return;
    try {
      await this.append({ type: 'close', time: new Date().toISOString(), pid: process.pid });
    } catch {
      // Recorded in lastError; the file is closed all the same.
    }
    this.closed = true;
    for (const wake of this.roomWaiters.splice(0, this.roomWaiters.length)) wake();
    await this.idle;
    await closeFd(this.fd).catch(() => undefined);
    await this.unlock();
  }

  stats(): AuditLogStats {
    return {
      path: this.path,
      logId: this.logId,
      lastSeq: this.seq,
      lastHash: this.lastHash,
      bytes: this.size,
      queued: this.queue.length,
      written: this.written,
      commits: this.commits,
      failures: this.failures,
      lastError: this.lastError,
      opened: this.opened,
    };
  }
}

async function readTail(fd: number, size: number): Promise<{ buf: Buffer; offset: number }> {
  const length = Math.min(size, TAIL_WINDOW);
  const offset = size - length;
  const buf = Buffer.alloc(length);
  await new Promise<void>((res, rej) =>
    fs.read(fd, buf, 0, length, offset, (err) => (err ? rej(err) : res())),
  );
  return { buf, offset };
}

/** The logId of the header (the first line). */
async function readLogId(fd: number, path: string): Promise<string> {
  const buf = Buffer.alloc(Math.min(TAIL_WINDOW, 64 * 1024));
  const n = await new Promise<number>((res, rej) =>
    fs.read(fd, buf, 0, buf.length, 0, (err, k) => (err ? rej(err) : res(k))),
  );
  const nl = buf.subarray(0, n).indexOf(0x0a);
  const parsed = nl < 0 ? null : parseLine(buf.subarray(0, nl).toString('utf8'));
  if (
    parsed === null ||
    !parsed.ok ||
    parsed.fields.type !== HEADER_TYPE ||
    typeof parsed.fields.logId !== 'string'
  )
    throw new Error(`audit log ${path}: its first line is not a valid devfilter audit header`);
  return parsed.fields.logId;
}
