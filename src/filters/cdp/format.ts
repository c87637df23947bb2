/**
 * The cdp journal's on-disk format (docs/cdp-format.md): a `meta` file naming the history, and
 * numbered segment files of checksummed records. Integers are little-endian; CRC-32 is zlib's.
 * Pure encoding and decoding: no I/O here.
 */
import { crc32 } from '../../core/crc32.js';
import { assert } from '../../core/errors.js';

export const FORMAT_VERSION = 1;
export const SEGMENT_MAGIC = Buffer.from('DFCDPSEG', 'latin1');
export const SEGMENT_HEADER_BYTES = 64;
/** "CDPR" as a little-endian u32: every record starts with it. */
export const RECORD_MAGIC = 0x52504443;
export const RECORD_HEADER_BYTES = 48;
/** The largest payload a record may carry (a whole NBD write of 32 MiB fits). */
export const MAX_PAYLOAD_BYTES = 32 * 1024 * 1024;

export const RecordType = {
  /** Old content of blocks [start, start + count), about to be changed by change `seq`. */
  UNDO_DATA: 1,
  /** The same, where the old content was all zeros (no payload). */
  UNDO_ZERO: 2,
  /** A named point: payload = JSON {name}; seq = the point. */
  MARK: 3,
  /** A mark deleted: payload = JSON {name}. */
  UNMARK: 4,
  /** A rollback begins: payload = JSON {id, target, from}; seq = from. */
  ROLLBACK_BEGIN: 5,
  /** A rollback finished: payload = JSON {id, target, from, to}; seq = to. */
  ROLLBACK_END: 6,
} as const;
export type RecordTypeValue = (typeof RecordType)[keyof typeof RecordType];

/** What the client did to cause an undo record (shown by the timeline and in status). */
export const ChangeOp = { WRITE: 1, TRIM: 2, ZERO: 3, ROLLBACK: 4 } as const;
export type ChangeOpValue = (typeof ChangeOp)[keyof typeof ChangeOp];

export class FormatError extends Error {
  override name = 'FormatError';
}

export interface RecordHeader {
  type: RecordTypeValue;
  op: number;
  payloadBytes: number;
  /** Change records: their sequence number; points (marks, rollbacks): the point. */
  seq: number;
  /** Wall-clock milliseconds since the epoch, never decreasing within a history. */
  timeMs: number;
  blockStart: number;
  blockCount: number;
  payloadCrc: number;
}

export interface SegmentHeader {
  historyId: string;
  segmentNo: number;
  /** The first change sequence number this segment may hold. */
  firstSeq: number;
  createdMs: number;
  blockSize: number;
}

function writeU64(buf: Buffer, at: number, value: number): void {
  assert(Number.isSafeInteger(value) && value >= 0, `u64 field out of range: ${value}`);
  buf.writeUInt32LE(value % 0x1_0000_0000, at);
  buf.writeUInt32LE(Math.floor(value / 0x1_0000_0000), at + 4);
}

function readU64(buf: Buffer, at: number): number {
  const hi = buf.readUInt32LE(at + 4);
  if (hi > 0x1f_ffff) throw new FormatError(`u64 field at ${at} beyond 2^53`);
  return hi * 0x1_0000_0000 + buf.readUInt32LE(at);
}

function uuidBytes(id: string): Buffer {
  const hex = id.replaceAll('-', '');
  assert(/^[0-9a-f]{32}$/.test(hex), `history id is not a UUID: ${id}`);
  return Buffer.from(hex, 'hex');
}

function uuidText(b: Buffer): string {
  const h = b.toString('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

export function encodeSegmentHeader(h: SegmentHeader): Buffer {
  const b = Buffer.alloc(SEGMENT_HEADER_BYTES);
  SEGMENT_MAGIC.copy(b, 0);
  b.writeUInt32LE(FORMAT_VERSION, 8);
  b.writeUInt32LE(SEGMENT_HEADER_BYTES, 12);
  uuidBytes(h.historyId).copy(b, 16);
  writeU64(b, 32, h.segmentNo);
  writeU64(b, 40, h.firstSeq);
  writeU64(b, 48, h.createdMs);
  b.writeUInt32LE(h.blockSize, 56);
  b.writeUInt32LE(crc32(b.subarray(0, 60)), 60);
  return b;
}

export function decodeSegmentHeader(b: Buffer): SegmentHeader {
  if (b.length < SEGMENT_HEADER_BYTES) throw new FormatError('segment header is truncated');
  if (!b.subarray(0, 8).equals(SEGMENT_MAGIC)) throw new FormatError('not a cdp segment (magic)');
  const version = b.readUInt32LE(8);
  if (version !== FORMAT_VERSION)
    throw new FormatError(`segment format version ${version} is not supported`);
  if (b.readUInt32LE(60) !== crc32(b.subarray(0, 60)))
    throw new FormatError('segment header checksum mismatch');
  return {
    historyId: uuidText(b.subarray(16, 32)),
    segmentNo: readU64(b, 32),
    firstSeq: readU64(b, 40),
    createdMs: readU64(b, 48),
    blockSize: b.readUInt32LE(56),
  };
}

/** Writes a record header into `b` (RECORD_HEADER_BYTES long); the payload's CRC is given. */
export function encodeRecordHeader(b: Buffer, h: RecordHeader): void {
  assert(b.length === RECORD_HEADER_BYTES, 'record header buffer size');
  assert(h.payloadBytes <= MAX_PAYLOAD_BYTES, `record payload too large: ${h.payloadBytes}`);
  b.writeUInt32LE(RECORD_MAGIC, 0);
  b.writeUInt8(h.type, 4);
  b.writeUInt8(h.op, 5);
  b.writeUInt16LE(0, 6);
  b.writeUInt32LE(h.payloadBytes, 8);
  writeU64(b, 12, h.seq);
  writeU64(b, 20, h.timeMs);
  writeU64(b, 28, h.blockStart);
  b.writeUInt32LE(h.blockCount, 36);
  b.writeUInt32LE(h.payloadCrc, 40);
  b.writeUInt32LE(crc32(b.subarray(0, 44)), 44);
}

/** The header at `b[at..]`, or null when it is not a whole, valid record header (a torn tail). */
export function decodeRecordHeader(b: Buffer, at: number): RecordHeader | null {
  if (at + RECORD_HEADER_BYTES > b.length) return null;
  if (b.readUInt32LE(at) !== RECORD_MAGIC) return null;
  if (b.readUInt32LE(at + 44) !== crc32(b.subarray(at, at + 44))) return null;
  const type = b.readUInt8(at + 4);
  if (type < RecordType.UNDO_DATA || type > RecordType.ROLLBACK_END) return null;
  const payloadBytes = b.readUInt32LE(at + 8);
  if (payloadBytes > MAX_PAYLOAD_BYTES) return null;
  try {
    return {
      type: type as RecordTypeValue,
      op: b.readUInt8(at + 5),
      payloadBytes,
      seq: readU64(b, at + 12),
      timeMs: readU64(b, at + 20),
      blockStart: readU64(b, at + 28),
      blockCount: b.readUInt32LE(at + 36),
      payloadCrc: b.readUInt32LE(at + 40),
    };
  } catch {
    return null;
  }
}

/** The meta file: which history the segments belong to and the device they describe. */
export interface Meta {
  format: 'devfilter-cdp';
  version: number;
  historyId: string;
  size: number;
  blockSize: number;
  createdMs: number;
}

export function encodeMeta(m: Omit<Meta, 'format' | 'version'>): Buffer {
  const body = JSON.stringify({ format: 'devfilter-cdp', version: FORMAT_VERSION, ...m });
  return Buffer.from(`${body}\n${crc32(Buffer.from(body)).toString(16).padStart(8, '0')}\n`);
}

export function decodeMeta(b: Buffer): Meta {
  const text = b.toString('utf8');
  const m = /^(.*)\n([0-9a-f]{8})\n$/s.exec(text);
  if (m === null) throw new FormatError('meta file is malformed');
  if (Number.parseInt(m[2]!, 16) !== crc32(Buffer.from(m[1]!)))
    throw new FormatError('meta file checksum mismatch');
  const meta = JSON.parse(m[1]!) as Meta;
  if (meta.format !== 'devfilter-cdp') throw new FormatError('meta file is not a cdp journal');
  if (meta.version !== FORMAT_VERSION)
    throw new FormatError(`cdp format version ${meta.version} is not supported`);
  return meta;
}

/** Segment file names sort in segment order. */
export function segmentFileName(no: number): string {
  return `${no.toString(16).padStart(16, '0')}.seg`;
}

export function parseSegmentFileName(name: string): number | null {
  const m = /^([0-9a-f]{16})\.seg$/.exec(name);
  return m === null ? null : Number.parseInt(m[1]!, 16);
}
