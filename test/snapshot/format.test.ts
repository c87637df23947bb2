/**
 * The on-disk format: CRC-32 (native and portable agree), meta and record round trips and
 * their checks, and which log records replay trusts after a crash (log-parse.ts).
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { crc32, crc32Portable } from '../../src/core/crc32.js';
import {
  FormatError,
  LOG_HEADER_SIZE,
  NO_SLOT,
  RECORD_SIZE,
  RecordType,
  decodeMeta,
  decodeRecord,
  encodeLogHeader,
  encodeMeta,
  encodeRecord,
  type LogRecord,
  type StoreMeta,
} from '../../src/filters/snapshot/format.js';
import { parseLog } from '../../src/filters/snapshot/log-parse.js';
import { pattern } from '../filters/fixture.js';

const STORE_ID = '0123456789abcdef0123456789abcdef';

test('CRC-32: the known check value; native and portable agree', () => {
  assert.equal(crc32Portable(Buffer.from('123456789')), 0xcbf43926);
  assert.equal(crc32(Buffer.from('123456789')), 0xcbf43926);
  for (const n of [0, 1, 31, 4096, 65537])
    assert.equal(crc32(pattern(n, n + 1)), crc32Portable(pattern(n, n + 1)));
});

test('meta: round trip; damage, other versions and bad fields are refused', () => {
  const meta: StoreMeta = {
    storeId: STORE_ID,
    export: 'disk',
    backend: 'file:/x',
    chunkSize: 65536,
    originSize: 1 << 30,
    createdAt: '2024-01-01T00:00:00.000Z',
    nextGeneration: 3,
    attached: true,
    snapshots: [{ id: 'i', name: 'a', generation: 2, takenAt: 't', state: 'active', reason: null }],
  };
  const buf = encodeMeta(meta);
  assert.deepEqual(decodeMeta(buf), meta);
  const flipped = Buffer.from(buf);
  flipped[buf.length - 3]! ^= 1;
  assert.throws(() => decodeMeta(flipped), /checksum mismatch/);
  const version = Buffer.from(buf);
  version.writeUInt32LE(2, 8);
  assert.throws(() => decodeMeta(version), /format version 2/);
  assert.throws(() => decodeMeta(buf.subarray(0, 40)), FormatError);
  assert.throws(
    () => decodeMeta(encodeMeta({ ...meta, nextGeneration: 2 })),
    /generation 2, outside/,
  );
  assert.throws(() => decodeMeta(encodeMeta({ ...meta, chunkSize: 1000 })), /chunkSize/);
});

function rec(batch: number, chunk: number, over: Partial<LogRecord> = {}): LogRecord {
  return {
    type: RecordType.COPY,
    batch,
    chunk,
    slot: chunk,
    genLow: 0,
    genHigh: 1,
    dataCrc: 7,
    ...over,
  };
}

function logOf(records: LogRecord[]): Buffer {
  const buf = Buffer.alloc(LOG_HEADER_SIZE + records.length * RECORD_SIZE);
  encodeLogHeader(65536, STORE_ID).copy(buf, 0);
  records.forEach((r, i) => encodeRecord(r, buf, LOG_HEADER_SIZE + i * RECORD_SIZE));
  return buf;
}

function damage(buf: Buffer, index: number): Buffer {
  const out = Buffer.from(buf);
  out[LOG_HEADER_SIZE + index * RECORD_SIZE + 9]! ^= 0xff;
  return out;
}

test('records: round trip; checksums and field rules', () => {
  const buf = Buffer.alloc(RECORD_SIZE);
  const r = rec(5, 9, { slot: 3, genLow: 2, genHigh: 4, dataCrc: 0xdeadbeef });
  encodeRecord(r, buf, 0);
  assert.deepEqual(decodeRecord(buf, 0), r);
  buf[12]! ^= 1;
  assert.equal(decodeRecord(buf, 0), 'checksum mismatch');
  const bad = Buffer.alloc(RECORD_SIZE);
  encodeRecord(rec(1, 1, { genLow: 3, genHigh: 3 }), bad, 0);
  assert.match(decodeRecord(bad, 0) as string, /empty generation range/);
  encodeRecord(rec(1, 1, { type: RecordType.ZERO, slot: 5 }), bad, 0);
  assert.match(decodeRecord(bad, 0) as string, /slot on a record/);
  encodeRecord(rec(1, 1, { slot: NO_SLOT }), bad, 0);
  assert.match(decodeRecord(bad, 0) as string, /without a slot/);
});

test('log replay: synced batches are trusted; the last batch is checked; damage before it is corruption', () => {
  const records = [rec(1, 0), rec(1, 1), rec(2, 2), rec(3, 3), rec(3, 4)];
  const clean = parseLog(logOf(records));
  assert.equal(clean.corrupt, null);
  assert.deepEqual(
    clean.synced.map((r) => r.chunk),
    [0, 1, 2],
  );
  assert.deepEqual(
    clean.last.map((r) => r.chunk),
    [3, 4],
  );
  assert.equal(clean.lastBatch, 3);

  // A torn (short) record at the end: the remains of an unsynced batch.
  const torn = parseLog(Buffer.concat([logOf(records), Buffer.alloc(13, 0xaa)]));
  assert.equal(torn.corrupt, null);
  assert.equal(torn.droppedTail, 1);
  assert.equal(torn.last.length, 2);

  // A bad record inside the last batch (persisted out of order): dropped, the rest kept for checking.
  const inLast = parseLog(damage(logOf(records), 3));
  assert.equal(inLast.corrupt, null);
  assert.deepEqual(
    inLast.last.map((r) => r.chunk),
    [4],
  );
  // A bad record after the last good one, in a batch of its own: dropped.
  const after = parseLog(damage(logOf([...records, rec(4, 5)]), 5));
  assert.equal(after.corrupt, null);
  assert.equal(after.droppedTail, 1);
  assert.equal(after.lastBatch, 3);

  // A bad record followed by records of a later batch: it was synced, so this is damage.
  const middle = parseLog(damage(logOf(records), 1));
  assert.match(middle.corrupt!, /record 1 .*checksum mismatch, followed by synced records/);
  // Batches going backwards.
  assert.match(parseLog(logOf([rec(2, 0), rec(1, 1)])).corrupt!, /batch 1 after batch 2/);
  // An empty log.
  assert.deepEqual(parseLog(logOf([])), {
    synced: [],
    last: [],
    droppedTail: 0,
    corrupt: null,
    lastBatch: 0,
  });
});
