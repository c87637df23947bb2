/**
 * Rebuilds the in-memory state of a store from its meta and its trusted log records (after a
 * clean restart or a crash), and decides what can no longer be vouched for:
 * - a damaged log, or a record that contradicts the meta: every snapshot fails;
 * - an origin whose size or backend changed while the store was detached: every snapshot
 *   fails (writes made while detached were never seen, so the images could be wrong);
 * - FAIL records: those snapshots fail, as they did before the restart.
 * Copies no live snapshot needs are dropped and their slots freed. When the log holds dropped
 * or dead records, it is rewritten with the live ones only (see DiffStore.rewriteLog).
 */
import { assert } from '../../core/errors.js';
import { CopyMap, SlotPool } from './copy-map.js';
import { FailCode, LOG_FILE, NO_SLOT, RecordType, type LogRecord } from './format.js';
import { SnapshotSet } from './registry.js';
import type { OpenedStore } from './store.js';

/** Rewrite the log on open when it holds more dead records than this (and than live ones). */
const DEAD_RECORDS_BEFORE_REWRITE = 4096;

export interface OriginFacts {
  size: number;
  backendLabel: string | null;
  /** Store limit in bytes (0 = unlimited), for failure messages. */
  limit: number;
  maxSlots: number;
}

export interface Recovered {
  snaps: SnapshotSet;
  map: CopyMap;
  slots: SlotPool;
  /** What recovery did, for status and the log. */
  notes: string[];
  /** Set when the log must be rewritten: the records to keep, and where the old log goes. */
  rewrite: { records: LogRecord[]; keepOld: string | null } | null;
}

export function failReason(code: number, limit: number): string {
  switch (code) {
    case FailCode.STORE_FULL:
      return `difference store full: limit ${limit} bytes`;
    case FailCode.HOST_FULL:
      return 'difference store: no space left on the host file system';
    case FailCode.DAMAGED:
      return 'difference store damaged: a copy does not match its checksum (found by verify)';
    default:
      return 'difference store I/O error';
  }
}

export function recover(opened: OpenedStore, origin: OriginFacts): Recovered {
  const { meta, recovery } = opened;
  const snaps = SnapshotSet.fromMeta(meta.snapshots);
  const notes: string[] = [];
  const failAll = (reason: string): void => {
    let n = 0;
    for (const s of snaps.all()) {
      if (s.state === 'active') {
        s.state = 'failed';
        s.reason = reason;
        n++;
      }
    }
    if (n > 0) notes.push(`${n} snapshot(s) failed: ${reason}`);
  };

  const chunkCount = Math.ceil(origin.size / meta.chunkSize);
  if (chunkCount > 0x7fffffff) {
    throw new Error(
      `origin of ${origin.size} bytes has too many ${meta.chunkSize}-byte chunks; use a larger chunk size`,
    );
  }
  let corrupt = recovery.corrupt;
  if (corrupt !== null) failAll(`difference store log is damaged: ${corrupt}`);
  const originChanged =
    meta.originSize !== origin.size
      ? `the origin's size changed from ${meta.originSize} to ${origin.size} bytes while the store was detached`
      : meta.backend !== null &&
          origin.backendLabel !== null &&
          meta.backend !== origin.backendLabel
        ? `the origin changed from "${meta.backend}" to "${origin.backendLabel}" while the store was detached`
        : null;
  if (originChanged !== null) failAll(originChanged);
  if (recovery.unclean)
    notes.push('the store was not detached cleanly (crash): state rebuilt from the log');
  if (recovery.droppedRecords > 0) {
    notes.push(
      `${recovery.droppedRecords} record(s) of the unsynced log tail dropped (their origin writes were never issued)`,
    );
  }

  let map = new CopyMap(chunkCount);
  const live: LogRecord[] = [];
  if (corrupt === null && originChanged === null) {
    const problem = replay(opened.records, snaps, map, meta.nextGeneration, origin.limit);
    if (problem !== null) {
      corrupt = problem;
      failAll(`difference store log is inconsistent: ${problem}`);
      map = new CopyMap(chunkCount);
    }
  }
  snaps.recompute();
  map.prune(
    (low, high) => snaps.needed(low, high),
    () => undefined,
  );
  const used: number[] = [];
  map.forEach((_c, slot) => {
    if (slot !== NO_SLOT) used.push(slot);
  });
  const slots = SlotPool.fromUsed(used, origin.maxSlots);

  // The log keeps the records of copies still held: the same test prune() used.
  if (corrupt === null && originChanged === null) {
    const lastUser = lastUsers(opened.records);
    opened.records.forEach((r, i) => {
      const copy = r.type === RecordType.COPY || r.type === RecordType.ZERO;
      if (
        copy &&
        (r.type !== RecordType.COPY || lastUser.get(r.slot) === i) &&
        snaps.needed(r.genLow, r.genHigh)
      )
        live.push(r);
    });
  }
  assert(
    live.length === map.size,
    'log rewrite would keep a different set of copies than memory holds',
  );
  const dead = opened.records.length - live.length;
  const rewrite =
    corrupt !== null ||
    originChanged !== null ||
    recovery.droppedRecords > 0 ||
    dead > Math.max(DEAD_RECORDS_BEFORE_REWRITE, live.length)
      ? { records: live, keepOld: corrupt !== null ? `${LOG_FILE}.damaged-${Date.now()}` : null }
      : null;
  return { snaps, map, slots, notes, rewrite };
}

/** Index of the last record that uses each slot: earlier users were freed before it. */
function lastUsers(records: readonly LogRecord[]): Map<number, number> {
  const last = new Map<number, number>();
  records.forEach((r, i) => {
    if (r.type === RecordType.COPY) last.set(r.slot, i);
  });
  return last;
}

/** Applies the records to `map` and `snaps`; returns what contradicts the meta, or null. */
function replay(
  records: readonly LogRecord[],
  snaps: SnapshotSet,
  map: CopyMap,
  nextGeneration: number,
  limit: number,
): string | null {
  const lastUser = lastUsers(records);
  const byGen = new Map(snaps.all().map((s) => [s.generation, s]));
  for (let i = 0; i < records.length; i++) {
    const r = records[i]!;
    if (r.type === RecordType.CHECKPOINT) continue;
    if (r.genHigh >= nextGeneration)
      return `record ${i} names generation ${r.genHigh}, never handed out`;
    if (r.type === RecordType.FAIL) {
      const s = byGen.get(r.genHigh);
      if (s !== undefined && s.state === 'active') {
        s.state = 'failed';
        s.reason = failReason(r.chunk, limit);
      }
      continue;
    }
    if (r.chunk >= map.chunkCount)
      return `record ${i} names chunk ${r.chunk}, beyond the origin's ${map.chunkCount}`;
    if (r.type === RecordType.COPY && lastUser.get(r.slot) !== i) continue; // its slot was reused
    try {
      map.add(r.chunk, r.type === RecordType.COPY ? r.slot : NO_SLOT, r.genLow, r.genHigh);
    } catch (err) {
      // Copies of one chunk never serve overlapping generations (each starts where the last
      // ended, lastWriteGen only grows): a record that says otherwise is damage, not a guess.
      return `record ${i} (chunk ${r.chunk}): ${(err as Error).message}`;
    }
  }
  return null;
}
