/**
 * The on-disk format of a snapshot difference store (format version 1), byte for byte as
 * docs/snapshot-format.md describes it. Pure encoding and decoding: no I/O here.
 *
 * A store is a directory holding three files:
 * - `snapshot.meta`: the store's identity and its snapshot list, rewritten atomically;
 * - `diff.log`: an append-only log of fixed-size, checksummed records, one per chunk copy;
 * - `diff.data`: the chunk slots the copies live in (slot s at byte s × chunkSize).
 */
import { createHash } from 'node:crypto';
import { assert } from '../../core/errors.js';
import { crc32 } from '../../core/crc32.js';

export const FORMAT_VERSION = 1;

export const META_FILE = 'snapshot.meta';
export const LOG_FILE = 'diff.log';
export const DATA_FILE = 'diff.data';

// ---- meta ------------------------------------------------------------------------------------

export const META_MAGIC = Buffer.from('DFSNMETA', 'latin1');
/** magic (8) + version (4) + body length (4) + SHA-256 of the body (32). */
export const META_HEADER_SIZE = 48;
/** The JSON body stays small (bounded snapshot count); anything bigger is not ours. */
export const MAX_META_BODY = 1 << 20;

export type SnapshotState = 'active' | 'failed';

export interface SnapshotRecord {
  /** Random, globally unique: what a backup catalogue remembers. */
  id: string;
  name: string;
  /** Unique in the store and increasing with time; names the snapshot in log records. */
  generation: number;
  takenAt: string;
  state: SnapshotState;
  /** Why the snapshot failed; null while active. */
  reason: string | null;
}

export interface StoreMeta {
  storeId: string;
  export: string;
  /** The export's backend label when the store was last attached (origin identity). */
  backend: string | null;
  chunkSize: number;
  originSize: number;
  createdAt: string;
  /** The generation the next snapshot gets; generations are never reused. */
  nextGeneration: number;
  /** True while a filter has the store attached; false after a clean detach. */
  attached: boolean;
  snapshots: SnapshotRecord[];
}

export class FormatError extends Error {
  override name = 'FormatError';
}

export function encodeMeta(meta: StoreMeta): Buffer {
  const body = Buffer.from(JSON.stringify(meta), 'utf8');
  assert(body.length <= MAX_META_BODY, 'snapshot meta body exceeds its bound');
  const out = Buffer.alloc(META_HEADER_SIZE + body.length);
  META_MAGIC.copy(out, 0);
  out.writeUInt32LE(FORMAT_VERSION, 8);
  out.writeUInt32LE(body.length, 12);
  createHash('sha256').update(body).digest().copy(out, 16);
  body.copy(out, META_HEADER_SIZE);
  return out;
}

export function decodeMeta(buf: Buffer): StoreMeta {
  if (buf.length < META_HEADER_SIZE || !buf.subarray(0, 8).equals(META_MAGIC)) {
    throw new FormatError(`${META_FILE}: not a devfilter snapshot store (bad magic)`);
  }
  const version = buf.readUInt32LE(8);
  if (version !== FORMAT_VERSION) {
    throw new FormatError(
      `${META_FILE}: format version ${version} is not supported (this devfilter reads ${FORMAT_VERSION})`,
    );
  }
  const length = buf.readUInt32LE(12);
  if (length > MAX_META_BODY || META_HEADER_SIZE + length !== buf.length) {
    throw new FormatError(
      `${META_FILE}: body length ${length} does not match the file (${buf.length} bytes)`,
    );
  }
  const body = buf.subarray(META_HEADER_SIZE);
  if (!createHash('sha256').update(body).digest().equals(buf.subarray(16, 48))) {
    throw new FormatError(`${META_FILE}: checksum mismatch (the file is damaged)`);
  }
  let meta: StoreMeta;
  try {
    meta = JSON.parse(body.toString('utf8')) as StoreMeta;
  } catch (err) {
    throw new FormatError(`${META_FILE}: body is not JSON: ${(err as Error).message}`);
  }
  checkMeta(meta);
  return meta;
}

function checkMeta(m: StoreMeta): void {
  const bad = (what: string): never => {
    throw new FormatError(`${META_FILE}: ${what}`);
  };
  if (typeof m.storeId !== 'string' || !/^[0-9a-f]{32}$/.test(m.storeId))
    bad('storeId is not 32 hex digits');
  if (!isPowerOfTwo(m.chunkSize) || m.chunkSize < MIN_CHUNK || m.chunkSize > MAX_CHUNK)
    bad(`chunkSize ${m.chunkSize} is invalid`);
  if (!Number.isSafeInteger(m.originSize) || m.originSize < 0) bad('originSize is invalid');
  if (
    !Number.isSafeInteger(m.nextGeneration) ||
    m.nextGeneration < 1 ||
    m.nextGeneration > MAX_GENERATION + 1
  )
    bad('nextGeneration is invalid');
  if (!Array.isArray(m.snapshots) || m.snapshots.length > MAX_SNAPSHOTS)
    bad('snapshot list is invalid');
  for (const s of m.snapshots) {
    if (
      !Number.isSafeInteger(s.generation) ||
      s.generation < 1 ||
      s.generation >= m.nextGeneration
    ) {
      bad(
        `snapshot "${s.name}" has generation ${s.generation}, outside 1..${m.nextGeneration - 1}`,
      );
    }
    if (s.state !== 'active' && s.state !== 'failed')
      bad(`snapshot "${s.name}" has unknown state "${String(s.state)}"`);
  }
}

// ---- chunk geometry and limits ---------------------------------------------------------------

export const MIN_CHUNK = 4096;
export const MAX_CHUNK = 4 * 1024 * 1024;
/** Live snapshots per store: bounds the copies per chunk and the meta file. */
export const MAX_SNAPSHOTS = 64;
/** Generations, chunk and slot indexes are u32 on disk; 0xFFFFFFFF means "no slot". */
export const MAX_GENERATION = 0xfffffffe;
export const MAX_CHUNKS = 0xffffffff;
export const NO_SLOT = 0xffffffff;
export const MAX_SLOTS = 0xfffffffe;

export function isPowerOfTwo(n: number): boolean {
  return Number.isSafeInteger(n) && n > 0 && (n & (n - 1)) === 0;
}

// ---- log -------------------------------------------------------------------------------------

export const LOG_MAGIC = Buffer.from('DFSNLOG\0', 'latin1');
export const LOG_HEADER_SIZE = 64;
export const RECORD_SIZE = 32;
export const RECORD_MAGIC = 0x5352; // "RS" little-endian

export const RecordType = {
  /** The chunk's old content is in a slot of diff.data. */
  COPY: 1,
  /** The chunk's old content was all zeros: nothing stored. */
  ZERO: 2,
  /** A snapshot failed (its generation in genHigh, the reason code in chunk). */
  FAIL: 3,
  /**
   * Carries nothing: written in a batch of its own after a log rewrite, so that the rewritten
   * records are not "the last batch" (whose data a crash recovery would re-read).
   */
  CHECKPOINT: 4,
} as const;

export type RecordTypeValue = (typeof RecordType)[keyof typeof RecordType];

/** Why a snapshot failed, as FAIL records carry it. */
export const FailCode = {
  STORE_FULL: 1,
  HOST_FULL: 2,
  STORE_ERROR: 3,
  /** `verify` found a copy whose data does not match the CRC in its record. */
  DAMAGED: 4,
} as const;

export interface LogRecord {
  type: RecordTypeValue;
  /** The group commit the record was written in; increases along the log. */
  batch: number;
  /** Chunk index (COPY, ZERO) or FailCode (FAIL). */
  chunk: number;
  /** Slot in diff.data (COPY) or NO_SLOT. */
  slot: number;
  /** The copy serves the snapshots with generation in (genLow, genHigh]. */
  genLow: number;
  genHigh: number;
  /** CRC-32 of the chunk's content as copied (COPY), else 0. */
  dataCrc: number;
}

export function encodeLogHeader(chunkSize: number, storeId: string): Buffer {
  const out = Buffer.alloc(LOG_HEADER_SIZE);
  LOG_MAGIC.copy(out, 0);
  out.writeUInt32LE(FORMAT_VERSION, 8);
  out.writeUInt32LE(chunkSize, 12);
  Buffer.from(storeId, 'hex').copy(out, 16);
  out.writeUInt32LE(crc32(out.subarray(0, 32)), 32);
  return out;
}

export function checkLogHeader(buf: Buffer, chunkSize: number, storeId: string): void {
  if (buf.length < LOG_HEADER_SIZE || !buf.subarray(0, 8).equals(LOG_MAGIC))
    throw new FormatError(`${LOG_FILE}: bad magic`);
  if (buf.readUInt32LE(32) !== crc32(buf.subarray(0, 32)))
    throw new FormatError(`${LOG_FILE}: header checksum mismatch`);
  const version = buf.readUInt32LE(8);
  if (version !== FORMAT_VERSION)
    throw new FormatError(`${LOG_FILE}: format version ${version} is not supported`);
  if (buf.readUInt32LE(12) !== chunkSize)
    throw new FormatError(
      `${LOG_FILE}: chunk size ${buf.readUInt32LE(12)} differs from the meta's ${chunkSize}`,
    );
  if (buf.subarray(16, 32).toString('hex') !== storeId)
    throw new FormatError(`${LOG_FILE}: belongs to another store`);
}

export function encodeRecord(r: LogRecord, out: Buffer, at: number): void {
  assert(at + RECORD_SIZE <= out.length, 'record outside its buffer');
  out.writeUInt16LE(RECORD_MAGIC, at);
  out.writeUInt8(FORMAT_VERSION, at + 2);
  out.writeUInt8(r.type, at + 3);
  out.writeUInt32LE(r.batch, at + 4);
  out.writeUInt32LE(r.chunk, at + 8);
  out.writeUInt32LE(r.slot, at + 12);
  out.writeUInt32LE(r.genLow, at + 16);
  out.writeUInt32LE(r.genHigh, at + 20);
  out.writeUInt32LE(r.dataCrc, at + 24);
  out.writeUInt32LE(crc32(out.subarray(at, at + 28)), at + 28);
}

/** Decodes the record at `at`, or returns why it is not a valid record. */
export function decodeRecord(buf: Buffer, at: number): LogRecord | string {
  if (at + RECORD_SIZE > buf.length) return 'torn (short) record';
  if (buf.readUInt32LE(at + 28) !== crc32(buf.subarray(at, at + 28))) return 'checksum mismatch';
  if (buf.readUInt16LE(at) !== RECORD_MAGIC) return 'bad record magic';
  if (buf.readUInt8(at + 2) !== FORMAT_VERSION) return `record version ${buf.readUInt8(at + 2)}`;
  const type = buf.readUInt8(at + 3) as RecordTypeValue;
  if (type < RecordType.COPY || type > RecordType.CHECKPOINT) return `unknown record type ${type}`;
  const r: LogRecord = {
    type,
    batch: buf.readUInt32LE(at + 4),
    chunk: buf.readUInt32LE(at + 8),
    slot: buf.readUInt32LE(at + 12),
    genLow: buf.readUInt32LE(at + 16),
    genHigh: buf.readUInt32LE(at + 20),
    dataCrc: buf.readUInt32LE(at + 24),
  };
  if (r.type === RecordType.COPY && r.slot === NO_SLOT) return 'copy record without a slot';
  if (r.type !== RecordType.COPY && r.slot !== NO_SLOT) return 'slot on a record that has none';
  const copies = r.type === RecordType.COPY || r.type === RecordType.ZERO;
  if (copies && r.genLow >= r.genHigh) return `empty generation range (${r.genLow}, ${r.genHigh}]`;
  return r;
}
