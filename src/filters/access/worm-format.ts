/**
 * On-disk format of the access filter's write-once (WORM) state (docs/access-format.md): a map
 * file (a bitmap of sealed blocks, replaced atomically) and a journal of blocks sealed since
 * that map (records appended and fdatasync'd before the first write of a block goes down).
 * Little-endian; every header and record carries a CRC-32, so a torn or foreign file is
 * recognised, never trusted.
 */
import { crc32 } from '../../core/crc32.js';

export const MAP_MAGIC = Buffer.from('DFWORMAP', 'latin1');
export const JOURNAL_MAGIC = Buffer.from('DFWORMJL', 'latin1');
export const FORMAT_VERSION = 1;

export const MAP_HEADER_BYTES = 64;
export const JOURNAL_HEADER_BYTES = 48;
export const RECORD_BYTES = 24;

/** Map flag: written by a clean detach. */
export const FLAG_CLEAN = 1;
/** Journal record: blocks [start, start + count) are sealed. */
export const RECORD_SEAL = 1;

export class FormatError extends Error {
  override name = 'FormatError';
}

export interface MapHeader {
  blockSize: number;
  blockCount: number;
  deviceSize: number;
  epoch: number;
  flags: number;
  sealed: number;
}

export function bitmapBytes(blockCount: number): number {
  return Math.ceil(blockCount / 8);
}

/** Header, the bitmap (bit i of byte i >> 3, least significant first), CRC-32 of the bitmap. */
export function encodeMap(h: MapHeader, bits: Uint8Array): Buffer {
  const bodyBytes = bitmapBytes(h.blockCount);
  const out = Buffer.alloc(MAP_HEADER_BYTES + bodyBytes + 4);
  MAP_MAGIC.copy(out, 0);
  out.writeUInt32LE(FORMAT_VERSION, 8);
  out.writeUInt32LE(MAP_HEADER_BYTES, 12);
  out.writeUInt32LE(h.blockSize, 16);
  out.writeBigUInt64LE(BigInt(h.blockCount), 24);
  out.writeBigUInt64LE(BigInt(h.deviceSize), 32);
  out.writeUInt32LE(h.epoch >>> 0, 40);
  out.writeUInt32LE(h.flags, 44);
  out.writeBigUInt64LE(BigInt(h.sealed), 48);
  out.writeUInt32LE(crc32(out.subarray(0, 60)), 60);
  out.set(bits.subarray(0, bodyBytes), MAP_HEADER_BYTES);
  out.writeUInt32LE(
    crc32(out.subarray(MAP_HEADER_BYTES, MAP_HEADER_BYTES + bodyBytes)),
    MAP_HEADER_BYTES + bodyBytes,
  );
  return out;
}

export function decodeMap(buf: Buffer): { header: MapHeader; bits: Uint8Array } {
  if (buf.length < MAP_HEADER_BYTES) throw new FormatError('map file is shorter than its header');
  if (!buf.subarray(0, 8).equals(MAP_MAGIC)) throw new FormatError('not a WORM map file');
  const version = buf.readUInt32LE(8);
  if (version !== FORMAT_VERSION)
    throw new FormatError(`map format version ${version} is not supported`);
  if (buf.readUInt32LE(60) !== crc32(buf.subarray(0, 60)))
    throw new FormatError('map header checksum mismatch');
  if (buf.readUInt32LE(12) !== MAP_HEADER_BYTES) throw new FormatError('map header size mismatch');
  const header: MapHeader = {
    blockSize: buf.readUInt32LE(16),
    blockCount: Number(buf.readBigUInt64LE(24)),
    deviceSize: Number(buf.readBigUInt64LE(32)),
    epoch: buf.readUInt32LE(40),
    flags: buf.readUInt32LE(44),
    sealed: Number(buf.readBigUInt64LE(48)),
  };
  const bodyBytes = bitmapBytes(header.blockCount);
  if (buf.length !== MAP_HEADER_BYTES + bodyBytes + 4)
    throw new FormatError(
      `map file is ${buf.length} bytes, expected ${MAP_HEADER_BYTES + bodyBytes + 4}`,
    );
  const body = buf.subarray(MAP_HEADER_BYTES, MAP_HEADER_BYTES + bodyBytes);
  if (buf.readUInt32LE(MAP_HEADER_BYTES + bodyBytes) !== crc32(body))
    throw new FormatError('map bitmap checksum mismatch');
  return { header, bits: new Uint8Array(body) };
}

export interface JournalHeader {
  epoch: number;
  blockSize: number;
  blockCount: number;
  deviceSize: number;
}

export function encodeJournalHeader(h: JournalHeader): Buffer {
  const out = Buffer.alloc(JOURNAL_HEADER_BYTES);
  JOURNAL_MAGIC.copy(out, 0);
  out.writeUInt32LE(FORMAT_VERSION, 8);
  out.writeUInt32LE(h.epoch >>> 0, 12);
  out.writeUInt32LE(h.blockSize, 16);
  out.writeBigUInt64LE(BigInt(h.blockCount), 24);
  out.writeBigUInt64LE(BigInt(h.deviceSize), 32);
  out.writeUInt32LE(crc32(out.subarray(0, 44)), 44);
  return out;
}

export function decodeJournalHeader(buf: Buffer): JournalHeader {
  if (buf.length < JOURNAL_HEADER_BYTES)
    throw new FormatError('journal is shorter than its header');
  if (!buf.subarray(0, 8).equals(JOURNAL_MAGIC)) throw new FormatError('not a WORM journal');
  const version = buf.readUInt32LE(8);
  if (version !== FORMAT_VERSION)
    throw new FormatError(`journal format version ${version} is not supported`);
  if (buf.readUInt32LE(44) !== crc32(buf.subarray(0, 44)))
    throw new FormatError('journal header checksum mismatch');
  return {
    epoch: buf.readUInt32LE(12),
    blockSize: buf.readUInt32LE(16),
    blockCount: Number(buf.readBigUInt64LE(24)),
    deviceSize: Number(buf.readBigUInt64LE(32)),
  };
}

export function encodeRecord(epoch: number, start: number, count: number, out: Buffer, at: number) {
  out.writeUInt16LE(RECORD_SEAL, at);
  out.writeUInt16LE(0, at + 2);
  out.writeUInt32LE(epoch >>> 0, at + 4);
  out.writeBigUInt64LE(BigInt(start), at + 8);
  out.writeUInt32LE(count, at + 16);
  out.writeUInt32LE(crc32(out.subarray(at, at + 20)), at + 20);
}

/**
 * The valid seal records of a journal body, in order, up to the first one that is torn,
 * foreign (another epoch) or nonsense: a crash mid-append leaves such a tail, and nothing after
 * it was acknowledged.
 */
export function decodeRecords(
  body: Buffer,
  epoch: number,
  blockCount: number,
): { records: Array<[number, number]>; ignoredBytes: number } {
  const records: Array<[number, number]> = [];
  let pos = 0;
  for (; pos + RECORD_BYTES <= body.length; pos += RECORD_BYTES) {
    if (body.readUInt32LE(pos + 20) !== crc32(body.subarray(pos, pos + 20))) break;
    if (body.readUInt16LE(pos) !== RECORD_SEAL) break;
    if (body.readUInt32LE(pos + 4) !== epoch >>> 0) break;
    const start = Number(body.readBigUInt64LE(pos + 8));
    const count = body.readUInt32LE(pos + 16);
    if (count < 1 || start + count > blockCount) break;
    records.push([start, count]);
  }
  return { records, ignoredBytes: body.length - pos };
}
