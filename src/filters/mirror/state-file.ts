/**
 * The mirror's resume state: one small file per mirror, replaced atomically (temp file, fsync,
 * rename, fsync of the directory). Layout, all integers little-endian:
 *
 *   0   8  magic "DFMIRROR"
 *   8   4  version (1)
 *   12  4  header length H
 *   16  H  header, JSON (MirrorStateHeader)
 *   ..  4  bitmap length B
 *   ..  B  the dirty map: bit i set = chunk i must be copied (LSB first)
 *   ..  4  CRC-32 of everything before it
 *
 * `clean` says whether the bitmap is exact: true only when written after the mirror left the
 * stack (no write can reach the source without passing the mirror then). A file with
 * `clean: false` is what a crash leaves: the map is not trusted and every chunk is copied again.
 */
import fs from 'node:fs';
import { basename, dirname, join } from 'node:path';
import { fsyncDir, readIfExists, writeFileAtomic } from '../../core/durable-files.js';
import { crc32 } from '../../core/crc32.js';

const MAGIC = Buffer.from('DFMIRROR', 'ascii');
export const STATE_VERSION = 1;

export interface MirrorStateHeader {
  target: string;
  size: number;
  chunkSize: number;
  clean: boolean;
  savedAt: string;
  /** Bytes copied to the target over the mirror's life, for status. */
  bytesCopied: number;
}

export interface MirrorState {
  header: MirrorStateHeader;
  bitmap: Buffer;
}

export function encodeState(s: MirrorState): Buffer {
  const header = Buffer.from(JSON.stringify(s.header), 'utf8');
  const out = Buffer.alloc(8 + 4 + 4 + header.length + 4 + s.bitmap.length + 4);
  let o = MAGIC.copy(out, 0);
  o = out.writeUInt32LE(STATE_VERSION, o);
  o = out.writeUInt32LE(header.length, o);
  o += header.copy(out, o);
  o = out.writeUInt32LE(s.bitmap.length, o);
  o += s.bitmap.copy(out, o);
  out.writeUInt32LE(crc32(out.subarray(0, o)), o);
  return out;
}

export function decodeState(data: Buffer, what: string): MirrorState {
  const bad = (why: string): never => {
    throw new Error(`${what}: not a valid mirror state file: ${why}`);
  };
  if (data.length < 24 || !data.subarray(0, 8).equals(MAGIC)) bad('bad magic');
  const crcAt = data.length - 4;
  if (crc32(data.subarray(0, crcAt)) !== data.readUInt32LE(crcAt)) bad('checksum mismatch');
  const version = data.readUInt32LE(8);
  if (version !== STATE_VERSION) bad(`version ${version} (this devfilter reads ${STATE_VERSION})`);
  const h = data.readUInt32LE(12);
  if (16 + h + 4 > crcAt) bad('truncated header');
  const header = JSON.parse(data.subarray(16, 16 + h).toString('utf8')) as MirrorStateHeader;
  const b = data.readUInt32LE(16 + h);
  if (16 + h + 4 + b !== crcAt) bad('bitmap length does not match the file');
  return { header, bitmap: Buffer.from(data.subarray(20 + h, 20 + h + b)) };
}

export async function readState(path: string): Promise<MirrorState | undefined> {
  const data = await readIfExists(path);
  return data === null ? undefined : decodeState(data, path);
}

export function writeState(path: string, s: MirrorState): Promise<void> {
  return writeFileAtomic(dirname(path), basename(path), encodeState(s));
}

export async function removeState(path: string): Promise<void> {
  await fs.promises.rm(path, { force: true });
  await fs.promises.rm(`${path}.tmp`, { force: true });
  await fsyncDir(dirname(path)).catch(() => undefined);
}

/** Where the state of mirror FILTER on export EXPORT lives under `stateDir`. */
export function statePath(stateDir: string, exportName: string, filterName: string): string {
  return join(stateDir, `${encodeURIComponent(exportName)}.${filterName}.mirror-state`);
}
