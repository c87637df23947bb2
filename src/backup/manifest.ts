/**
 * The backup manifest: a sidecar file `IMAGE.manifest` next to every qcow2 backup image,
 * holding what `backup verify` checks the image against — which clusters the image holds, a
 * CRC-32 per stored cluster, a SHA-256 of all stored data, the link to the backing image's
 * manifest, and the caller's metadata. Versioned and checksummed; layout in
 * docs/backup-format.md.
 */
import { createHash } from 'node:crypto';
import fs from 'node:fs';

export const MANIFEST_MAGIC = 'DFBKMANI';
export const MANIFEST_VERSION = 1;
export const MANIFEST_SUFFIX = '.manifest';
export const MANIFEST_HEADER_SIZE = 64;
export const EXTENT_RECORD_SIZE = 16;
/** The JSON body is small: metadata, names, sizes. */
export const MAX_BODY_LENGTH = 1024 * 1024;
/** A run of clusters in one extent record is at most this long (the count is a u32). */
export const MAX_EXTENT_CLUSTERS = 0xffffffff;

export const ExtentKind = { DATA: 1, ZERO: 2 } as const;
export type ExtentKindValue = (typeof ExtentKind)[keyof typeof ExtentKind];

export type JsonValue =
  string | number | boolean | null | JsonValue[] | { [key: string]: JsonValue };

/**
 * Free-form facts supplied by the caller. The names below are the ones `devfilter backup`
 * is expected to use; any other JSON-serialisable key is kept as given.
 */
export interface BackupMetadata {
  export?: string;
  generationId?: string;
  generation?: number;
  snapshotTime?: string;
  [key: string]: JsonValue | undefined;
}

export interface ManifestBody {
  /** 32 hex digits; also in the image's own header extension. */
  backupId: string;
  /** Base name of the image file the manifest describes. */
  image: string;
  virtualSize: number;
  clusterSize: number;
  backing: {
    /** As stored in the image header (relative to the image's directory unless absolute). */
    file: string;
    format: 'qcow2' | 'raw';
    /** Digest of the backing image's manifest, or null when it has none (e.g. raw). */
    manifestDigest: string | null;
  } | null;
  createdAt: string;
  /** Per-cluster checksum algorithm: always "crc32" (IEEE) in version 1. */
  clusterChecksum: 'crc32';
  dataClusters: number;
  zeroClusters: number;
  /** SHA-256 (hex) of the guest-visible bytes of every data cluster, in guest order. */
  dataSha256: string;
  metadata: BackupMetadata;
}

export interface Manifest {
  body: ManifestBody;
  /** Sorted, non-overlapping runs: first guest cluster, count, kind. */
  extentFirst: Float64Array;
  extentCount: Uint32Array;
  extentKind: Uint8Array;
  /** CRC-32 of each data cluster's guest-visible bytes, in guest order. */
  crcs: Uint32Array;
  /** SHA-256 (hex) of the manifest file (with the digest field left out). */
  digest: string;
}

export function manifestPathOf(imagePath: string): string {
  return imagePath + MANIFEST_SUFFIX;
}

function digestOf(file: Buffer): Buffer {
  return createHash('sha256')
    .update(file.subarray(0, 32))
    .update(file.subarray(MANIFEST_HEADER_SIZE))
    .digest();
}

/** Encodes a manifest; returns the file's bytes and its digest. */
export function encodeManifest(
  body: ManifestBody,
  extents: { first: Float64Array; count: Uint32Array; kind: Uint8Array; length: number },
  crcs: Uint32Array,
): { bytes: Buffer; digest: string } {
  const json = Buffer.from(JSON.stringify(body), 'utf8');
  if (json.length > MAX_BODY_LENGTH) throw new RangeError('manifest metadata is too large');
  const size =
    MANIFEST_HEADER_SIZE + json.length + extents.length * EXTENT_RECORD_SIZE + crcs.length * 4;
  const out = Buffer.alloc(size);
  out.write(MANIFEST_MAGIC, 0, 'latin1');
  out.writeUInt32LE(MANIFEST_VERSION, 8);
  out.writeUInt32LE(json.length, 12);
  out.writeUInt32LE(extents.length, 16);
  out.writeUInt32LE(crcs.length % 2 ** 32, 20);
  out.writeUInt32LE(Math.floor(crcs.length / 2 ** 32), 24);
  let pos = MANIFEST_HEADER_SIZE;
  json.copy(out, pos);
  pos += json.length;
  for (let i = 0; i < extents.length; i++) {
    const first = extents.first[i]!;
    out.writeUInt32LE(first % 2 ** 32, pos);
    out.writeUInt32LE(Math.floor(first / 2 ** 32), pos + 4);
    out.writeUInt32LE(extents.count[i]!, pos + 8);
    out.writeUInt8(extents.kind[i]!, pos + 12);
    pos += EXTENT_RECORD_SIZE;
  }
  for (let i = 0; i < crcs.length; i++, pos += 4) out.writeUInt32LE(crcs[i]!, pos);
  const digest = digestOf(out);
  digest.copy(out, 32);
  return { bytes: out, digest: digest.toString('hex') };
}

export class ManifestError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'ManifestError';
  }
}

/** Decodes and checks a manifest file's bytes: magic, version, lengths, digest, fields. */
export function decodeManifest(file: Buffer, name: string): Manifest {
  const fail = (why: string): never => {
    throw new ManifestError(`${name}: ${why}`);
  };
  if (file.length < MANIFEST_HEADER_SIZE) fail('too short for a manifest');
  if (file.toString('latin1', 0, 8) !== MANIFEST_MAGIC) fail('not a backup manifest (bad magic)');
  const version = file.readUInt32LE(8);
  if (version !== MANIFEST_VERSION) fail(`unsupported manifest version ${version}`);
  const bodyLength = file.readUInt32LE(12);
  const extentCount = file.readUInt32LE(16);
  const crcCount = file.readUInt32LE(20) + file.readUInt32LE(24) * 2 ** 32;
  if (file.readUInt32LE(28) !== 0) fail('reserved header field is not zero');
  if (bodyLength > MAX_BODY_LENGTH) fail(`body length ${bodyLength} exceeds 1 MiB`);
  const expected =
    MANIFEST_HEADER_SIZE + bodyLength + extentCount * EXTENT_RECORD_SIZE + crcCount * 4;
  if (file.length !== expected) fail(`length ${file.length} does not match its header`);
  const digest = digestOf(file);
  if (!digest.equals(file.subarray(32, 64))) fail('checksum mismatch (the manifest is damaged)');

  let body: ManifestBody;
  try {
    body = JSON.parse(file.toString('utf8', 64, 64 + bodyLength)) as ManifestBody;
  } catch {
    return fail('body is not valid JSON');
  }
  checkBody(body, fail);
  const totalClusters = Math.ceil(body.virtualSize / body.clusterSize);

  const extentFirst = new Float64Array(extentCount);
  const counts = new Uint32Array(extentCount);
  const kinds = new Uint8Array(extentCount);
  let pos = MANIFEST_HEADER_SIZE + bodyLength;
  let next = 0;
  let data = 0;
  let zero = 0;
  for (let i = 0; i < extentCount; i++, pos += EXTENT_RECORD_SIZE) {
    const first = file.readUInt32LE(pos) + file.readUInt32LE(pos + 4) * 2 ** 32;
    const count = file.readUInt32LE(pos + 8);
    const kind = file.readUInt8(pos + 12);
    if (kind !== ExtentKind.DATA && kind !== ExtentKind.ZERO) fail(`extent ${i}: bad kind`);
    if (count === 0 || first < next || first + count > totalClusters) {
      fail(`extent ${i}: clusters ${first}+${count} out of order or out of range`);
    }
    extentFirst[i] = first;
    counts[i] = count;
    kinds[i] = kind;
    next = first + count;
    if (kind === ExtentKind.DATA) data += count;
    else zero += count;
  }
  if (data !== crcCount || data !== body.dataClusters || zero !== body.zeroClusters) {
    fail('cluster counts disagree with the extent table');
  }
  const crcs = new Uint32Array(crcCount);
  for (let i = 0; i < crcCount; i++, pos += 4) crcs[i] = file.readUInt32LE(pos);
  return {
    body,
    extentFirst,
    extentCount: counts,
    extentKind: kinds,
    crcs,
    digest: digest.toString('hex'),
  };
}

function checkBody(body: ManifestBody, fail: (why: string) => never): void {
  const isCount = (n: unknown): boolean => Number.isSafeInteger(n) && (n as number) >= 0;
  const isHex = (s: unknown, len: number): boolean =>
    typeof s === 'string' && s.length === len && /^[0-9a-f]+$/.test(s);
  if (typeof body !== 'object' || body === null) fail('body is not an object');
  if (!isHex(body.backupId, 32)) fail('bad backupId');
  if (typeof body.image !== 'string') fail('bad image name');
  if (!isCount(body.virtualSize)) fail('bad virtualSize');
  const cs = body.clusterSize;
  if (!Number.isSafeInteger(cs) || cs < 512 || cs > 2 * 1024 * 1024 || (cs & (cs - 1)) !== 0) {
    fail('bad clusterSize');
  }
  if (body.clusterChecksum !== 'crc32') fail('unknown clusterChecksum');
  if (!isCount(body.dataClusters) || !isCount(body.zeroClusters)) fail('bad cluster counts');
  if (!isHex(body.dataSha256, 64)) fail('bad dataSha256');
  if (typeof body.metadata !== 'object' || body.metadata === null) fail('bad metadata');
  if (body.backing !== null) {
    const b = body.backing;
    if (typeof b !== 'object' || typeof b.file !== 'string') fail('bad backing');
    if (b.format !== 'qcow2' && b.format !== 'raw') fail('bad backing format');
    if (b.manifestDigest !== null && !isHex(b.manifestDigest, 64)) fail('bad backing digest');
  }
}

/**
 * Reads and decodes the manifest at `path`; undefined if there is no such file. Other
 * failures (unreadable, damaged) throw.
 */
export async function readManifest(path: string): Promise<Manifest | undefined> {
  let file: Buffer;
  try {
    const stat = await fs.promises.stat(path);
    // Bound the read: the largest manifest of a 2^53-byte image at 512-byte clusters would
    // not fit in memory anyway; refuse anything past 4 GiB rather than try.
    if (stat.size > 4 * 1024 ** 3) throw new ManifestError(`${path}: too large for a manifest`);
    file = await fs.promises.readFile(path);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw err;
  }
  return decodeManifest(file, path);
}
