/**
 * Reading the record log back after a restart or a crash: which records can be trusted.
 *
 * Records are written in group commits ("batches"): a batch is appended with one write, then
 * the log and the data file are synced, and only then are the origin writes it protects
 * issued; the next batch is appended only after that. So at most the last batch in the log can
 * be unsynced at a crash, and none of its origin writes can have happened yet. Hence:
 * - bad (torn, checksum-failed) records after the last record of the second-to-last batch are
 *   the remains of that unsynced batch: dropped, harmless;
 * - records of the last batch F are kept only if their copied data reads back with the CRC
 *   they carry (checked by the caller, which can read diff.data): a record whose data did not
 *   reach the disk is dropped, again harmless since its origin write was never issued;
 * - a bad record anywhere before that, or batch numbers that go backwards, mean the log was
 *   damaged after it was synced: the store cannot vouch for any snapshot (the caller fails them).
 */
import { LOG_HEADER_SIZE, RECORD_SIZE, decodeRecord, type LogRecord } from './format.js';

export interface ParsedLog {
  /** Records of batches before the last one, in log order: synced, trusted. */
  synced: LogRecord[];
  /** Records of the last batch: trusted only once their data checks out. */
  last: LogRecord[];
  /** Bad records dropped from the unsynced tail (including a short trailing one). */
  droppedTail: number;
  /** Set when the log is damaged beyond its tail: what and where. */
  corrupt: string | null;
  /** Highest batch number seen (0 if none). */
  lastBatch: number;
}

/** Parses a whole log file (header already checked by the caller). */
export function parseLog(buf: Buffer): ParsedLog {
  const body = buf.length - LOG_HEADER_SIZE;
  const whole = Math.floor(body / RECORD_SIZE);
  const torn = body % RECORD_SIZE !== 0;
  const good: { index: number; r: LogRecord }[] = [];
  const bad: { index: number; why: string }[] = [];
  for (let i = 0; i < whole; i++) {
    const d = decodeRecord(buf, LOG_HEADER_SIZE + i * RECORD_SIZE);
    if (typeof d === 'string') bad.push({ index: i, why: d });
    else good.push({ index: i, r: d });
  }
  if (torn) bad.push({ index: whole, why: 'torn (short) record' });

  const result: ParsedLog = {
    synced: [],
    last: [],
    droppedTail: bad.length,
    corrupt: null,
    lastBatch: 0,
  };
  for (let k = 1; k < good.length; k++) {
    if (good[k]!.r.batch < good[k - 1]!.r.batch) {
      result.corrupt = `record ${good[k]!.index} (offset ${offsetOf(good[k]!.index)}) has batch ${good[k]!.r.batch} after batch ${good[k - 1]!.r.batch}`;
      return result;
    }
  }
  const lastBatch = good.length > 0 ? good[good.length - 1]!.r.batch : 0;
  result.lastBatch = lastBatch;
  // Everything up to the last record of an earlier batch was synced: no bad record may be there.
  let lastSynced = -1;
  for (const g of good) if (g.r.batch < lastBatch) lastSynced = g.index;
  const damaged = bad.find((b) => b.index < lastSynced);
  if (damaged !== undefined) {
    result.corrupt = `record ${damaged.index} (offset ${offsetOf(damaged.index)}): ${damaged.why}, followed by synced records`;
    return result;
  }
  for (const g of good) (g.r.batch < lastBatch ? result.synced : result.last).push(g.r);
  return result;
}

function offsetOf(index: number): number {
  return LOG_HEADER_SIZE + index * RECORD_SIZE;
}
