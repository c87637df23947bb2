/**
 * On-disk format of the cbt filter's state (docs/cbt-format.md): a map file (the whole change
 * map, replaced atomically) and a journal (records appended, fdatasync'd in groups, of blocks
 * about to change and of new generations since that map). Little-endian throughout; every
 * header and record carries a CRC-32 so that a torn or foreign file is recognised, never
 * trusted.
 */
import { crc32 } from '../../core/crc32.js';

export const MAP_MAGIC = Buffer.from('DFCBTMAP', 'latin1');
export const JOURNAL_MAGIC = Buffer.from('DFCBTJNL', 'latin1');
export const FORMAT_VERSION = 1;

export const MAP_HEADER_BYTES = 64;
export const JOURNAL_HEADER_BYTES = 48;
export const RECORD_BYTES = 24;

/** Map flag: written by a clean detach (informational; the journal's absence is what counts). */
export const FLAG_CLEAN = 1;

export const RecordType = {
  /** Blocks [start, start + count) change in `generation` (written before they do). */
  MARK: 1,
  /** Generation `generation` began. */
  GENERATION: 2,
} as const;

export interface MapHeader {
  blockSize: number;
  blockCount: number;
  deviceSize: number;
  id: string;
  generation: number;
  /** Which journal belongs to this map: the one whose header carries the same epoch. */
  epoch: number;
  flags: number;
}

export interface JournalRecord {
  type: number;
  generation: number;
  start: number;
  count: number;
}

export class FormatError extends Error {
  override name = 'FormatError';
}

const LE = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

export function uuidToBytes(id: string): Buffer {
  const hex = id.replaceAll('-', '');
  if (!/^[0-9a-f]{32}$/i.test(hex)) throw new FormatError(`not a UUID: ${id}`);
  return Buffer.from(hex, 'hex');
}

export function bytesToUuid(b: Buffer): string {
  const h = b.toString('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

/** The map file: header, the generations as u32 LE, then the CRC-32 of those bytes. */
export function encodeMap(h: MapHeader, gens: Uint32Array): Buffer {
  const bodyBytes = gens.length * 4;
  const out = Buffer.allocUnsafe(MAP_HEADER_BYTES + bodyBytes + 4);
  MAP_MAGIC.copy(out, 0);
  out.writeUInt32LE(FORMAT_VERSION, 8);
  out.writeUInt32LE(MAP_HEADER_BYTES, 12);
  out.writeUInt32LE(h.blockSize, 16);
  out.writeUInt32LE(h.blockCount, 20);
  out.writeBigUInt64LE(BigInt(h.deviceSize), 24);
  uuidToBytes(h.id).copy(out, 32);
  out.writeUInt32LE(h.generation, 48);
  out.writeUInt32LE(h.epoch >>> 0, 52);
  out.writeUInt32LE(h.flags, 56);
  out.writeUInt32LE(crc32(out.subarray(0, 60)), 60);
  const body = out.subarray(MAP_HEADER_BYTES, MAP_HEADER_BYTES + bodyBytes);
  if (LE) body.set(new Uint8Array(gens.buffer, gens.byteOffset, bodyBytes));
  else for (let i = 0; i < gens.length; i++) body.writeUInt32LE(gens[i]!, i * 4);
  out.writeUInt32LE(crc32(body), MAP_HEADER_BYTES + bodyBytes);
  return out;
}

export function decodeMapHeader(buf: Buffer): MapHeader {
  if (buf.length < MAP_HEADER_BYTES) throw new FormatError('map file is shorter than its header');
  if (!buf.subarray(0, 8).equals(MAP_MAGIC)) throw new FormatError('not a cbt map file');
  const version = buf.readUInt32LE(8);
  if (version !== FORMAT_VERSION)
    throw new FormatError(`map format version ${version} is not supported`);
  if (buf.readUInt32LE(60) !== crc32(buf.subarray(0, 60)))
    throw new FormatError('map header checksum mismatch');
  if (buf.readUInt32LE(12) !== MAP_HEADER_BYTES) throw new FormatError('map header size mismatch');
  const deviceSize = Number(buf.readBigUInt64LE(24));
  return {
    blockSize: buf.readUInt32LE(16),
    blockCount: buf.readUInt32LE(20),
    deviceSize,
    id: bytesToUuid(buf.subarray(32, 48)),
    generation: buf.readUInt32LE(48),
    epoch: buf.readUInt32LE(52),
    flags: buf.readUInt32LE(56),
  };
}

/** Decodes a whole map file; throws FormatError when anything does not add up. */
export function decodeMap(buf: Buffer): { header: MapHeader; gens: Uint32Array } {
  const header = decodeMapHeader(buf);
  const bodyBytes = header.blockCount * 4;
  if (buf.length !== MAP_HEADER_BYTES + bodyBytes + 4)
    throw new FormatError(
      `map file is ${buf.length} bytes, expected ${MAP_HEADER_BYTES + bodyBytes + 4}`,
    );
  const body = buf.subarray(MAP_HEADER_BYTES, MAP_HEADER_BYTES + bodyBytes);
  if (buf.readUInt32LE(MAP_HEADER_BYTES + bodyBytes) !== crc32(body))
    throw new FormatError('map body checksum mismatch');
  const gens = new Uint32Array(header.blockCount);
  if (LE) new Uint8Array(gens.buffer).set(body);
  else for (let i = 0; i < gens.length; i++) gens[i] = body.readUInt32LE(i * 4);
  for (let i = 0; i < gens.length; i++) {
    if (gens[i]! > header.generation)
      throw new FormatError(`block ${i} has generation ${gens[i]} > ${header.generation}`);
  }
  return { header, gens };
}

export interface JournalHeader {
  epoch: number;
  id: string;
  blockSize: number;
  blockCount: number;
}

export function encodeJournalHeader(h: JournalHeader): Buffer {
  const out = Buffer.alloc(JOURNAL_HEADER_BYTES);
  JOURNAL_MAGIC.copy(out, 0);
  out.writeUInt32LE(FORMAT_VERSION, 8);
  out.writeUInt32LE(h.epoch >>> 0, 12);
  uuidToBytes(h.id).copy(out, 16);
  out.writeUInt32LE(h.blockSize, 32);
  out.writeUInt32LE(h.blockCount, 36);
  out.writeUInt32LE(crc32(out.subarray(0, 44)), 44);
  return out;
}

export function decodeJournalHeader(buf: Buffer): JournalHeader {
  if (buf.length < JOURNAL_HEADER_BYTES)
    throw new FormatError('journal is shorter than its header');
  if (!buf.subarray(0, 8).equals(JOURNAL_MAGIC)) throw new FormatError('not a cbt journal');
  const version = buf.readUInt32LE(8);
  if (version !== FORMAT_VERSION)
    throw new FormatError(`journal format version ${version} is not supported`);
  if (buf.readUInt32LE(44) !== crc32(buf.subarray(0, 44)))
    throw new FormatError('journal header checksum mismatch');
  return {
    epoch: buf.readUInt32LE(12),
    id: bytesToUuid(buf.subarray(16, 32)),
    blockSize: buf.readUInt32LE(32),
    blockCount: buf.readUInt32LE(36),
  };
}

export function encodeRecord(epoch: number, r: JournalRecord, out?: Buffer, at = 0): Buffer {
  const b = out ?? Buffer.allocUnsafe(RECORD_BYTES);
  b.writeUInt16LE(r.type, at);
  b.writeUInt16LE(0, at + 2);
  b.writeUInt32LE(epoch >>> 0, at + 4);
  b.writeUInt32LE(r.generation, at + 8);
  b.writeUInt32LE(r.start, at + 12);
  b.writeUInt32LE(r.count, at + 16);
  b.writeUInt32LE(crc32(b.subarray(at, at + 20)), at + 20);
  return b;
}

/**
 * The valid records of a journal body, in order, up to the first one that is torn, foreign
 * (another epoch) or nonsense — a crash mid-append leaves such a tail, and everything after
 * it was never acknowledged. Returns the records and how many bytes were ignored.
 */
export function decodeRecords(
  body: Buffer,
  epoch: number,
  blockCount: number,
): { records: JournalRecord[]; ignoredBytes: number } {
  const records: JournalRecord[] = [];
  let pos = 0;
  for (; pos + RECORD_BYTES <= body.length; pos += RECORD_BYTES) {
    if (body.readUInt32LE(pos + 20) !== crc32(body.subarray(pos, pos + 20))) break;
    if (body.readUInt32LE(pos + 4) !== epoch >>> 0) break;
    const r: JournalRecord = {
      type: body.readUInt16LE(pos),
      generation: body.readUInt32LE(pos + 8),
      start: body.readUInt32LE(pos + 12),
      count: body.readUInt32LE(pos + 16),
    };
    if (r.generation < 1) break;
    if (r.type === RecordType.MARK) {
      if (r.count < 1 || r.start + r.count > blockCount) break;
    } else if (r.type !== RecordType.GENERATION) break;
    records.push(r);
  }
  return { records, ignoredBytes: body.length - pos };
}
