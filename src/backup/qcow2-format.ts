/**
 * The qcow2 on-disk structures this project reads and writes, from QEMU's specification
 * (docs/interop/qcow2.txt): the header, its extensions, and L1/L2 entries. All qcow2 integers
 * are big-endian. Offsets are JavaScript numbers; a 64-bit field that does not fit a safe
 * integer is refused when parsed, so nothing downstream ever sees an imprecise offset.
 *
 * What we write and what the reader refuses is described in docs/backup-format.md.
 */

export const QCOW2_MAGIC = 0x514649fb; // "QFI\xfb"
/** Header length of a version 3 image without the optional compression_type field. */
export const HEADER_V3_LENGTH = 104;
export const HEADER_V2_LENGTH = 72;

export const MIN_CLUSTER_BITS = 9;
/** QEMU's implementation limit (2 MiB clusters); larger images would not open there either. */
export const MAX_CLUSTER_BITS = 21;
/** QEMU's limit on the active L1 table: 32 MiB, i.e. 4 Mi entries. */
export const MAX_L1_ENTRIES = (32 * 1024 * 1024) / 8;
export const MAX_BACKING_NAME = 1023;
/** refcount_order we write: 16-bit refcounts, QEMU's default. */
export const REFCOUNT_ORDER = 4;

/** Header extension types. */
export const EXT_END = 0;
export const EXT_BACKING_FORMAT = 0xe2792aca;
export const EXT_FEATURE_NAMES = 0x6803f857;
export const EXT_BITMAPS = 0x23852875;
export const EXT_CRYPTO = 0x0537be77;
export const EXT_DATA_FILE = 0x44415441;
/**
 * Our own extension ("dfbk"): ties the image to its manifest with a random backup id. QEMU
 * ignores unknown extensions (the spec says they "can be safely ignored") and preserves them
 * when it rewrites a header.
 */
export const EXT_DEVFILTER = 0x6466626b;
export const DEVFILTER_EXT_LENGTH = 24;

/** Incompatible feature bits, by the names the reader's errors use. */
export const INCOMPAT_DIRTY = 1;
export const INCOMPAT_CORRUPT = 2;
export const INCOMPAT_DATA_FILE = 4;
export const INCOMPAT_COMPRESSION = 8;
export const INCOMPAT_EXTL2 = 16;

const TWO32 = 2 ** 32;

/** Writes a non-negative safe integer as a big-endian u64. */
export function writeU64BE(buf: Buffer, pos: number, value: number): void {
  buf.writeUInt32BE(Math.floor(value / TWO32), pos);
  buf.writeUInt32BE(value % TWO32, pos + 4);
}

/** Reads a big-endian u64; undefined if it is not a safe integer. */
export function readU64BE(buf: Buffer, pos: number): number | undefined {
  const hi = buf.readUInt32BE(pos);
  if (hi >= 2 ** 21) return undefined;
  return hi * TWO32 + buf.readUInt32BE(pos + 4);
}

/** Offset bits 9..55 of an L1 or L2 entry, split into the entry's two 32-bit halves. */
export function entryOffset(hi: number, lo: number): number {
  return (hi & 0x00ffffff) * TWO32 + (lo - (lo & 0x1ff));
}

export interface Qcow2Header {
  version: 2 | 3;
  backingFileOffset: number;
  backingFileSize: number;
  clusterBits: number;
  clusterSize: number;
  size: number;
  cryptMethod: number;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  nbSnapshots: number;
  snapshotsOffset: number;
  incompatibleFeatures: bigint;
  compatibleFeatures: bigint;
  autoclearFeatures: bigint;
  refcountOrder: number;
  headerLength: number;
  /** Header extensions found, in order (data copied out of the header cluster). */
  extensions: { type: number; data: Buffer }[];
  /** Backing file name as stored, or undefined. */
  backingFile: string | undefined;
  /** From the backing format extension, or undefined if absent. */
  backingFormat: string | undefined;
  /** From our own extension: hex backup id, or undefined. */
  backupId: string | undefined;
}

const INCOMPAT_NAMES: [bigint, string][] = [
  [BigInt(INCOMPAT_CORRUPT), 'corrupt bit (the image is marked corrupt)'],
  [BigInt(INCOMPAT_DATA_FILE), 'external data file'],
  [BigInt(INCOMPAT_COMPRESSION), 'non-zlib compression type'],
  [BigInt(INCOMPAT_EXTL2), 'extended L2 entries (subclusters)'],
];

/** Thrown for anything wrong with an image's structure; the message names the file. */
export class Qcow2FormatError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'Qcow2FormatError';
  }
}

/**
 * Parses and checks the header cluster (or the first bytes of the file, if shorter).
 * `fileSize` bounds every table offset. Refuses what the reader cannot read correctly,
 * naming the feature.
 */
export function parseHeader(buf: Buffer, fileSize: number, name: string): Qcow2Header {
  const fail = (why: string): never => {
    throw new Qcow2FormatError(`${name}: ${why}`);
  };
  if (buf.length < HEADER_V2_LENGTH) fail(`too short for a qcow2 header (${buf.length} bytes)`);
  if (buf.readUInt32BE(0) !== QCOW2_MAGIC) fail('not a qcow2 image (bad magic)');
  const version = buf.readUInt32BE(4);
  if (version !== 2 && version !== 3) fail(`unsupported qcow2 version ${version}`);
  const u64 = (pos: number, field: string): number =>
    readU64BE(buf, pos) ?? fail(`${field} is out of range`);
  const clusterBits = buf.readUInt32BE(20);
  if (clusterBits < MIN_CLUSTER_BITS || clusterBits > MAX_CLUSTER_BITS) {
    fail(`cluster_bits ${clusterBits} out of range (${MIN_CLUSTER_BITS}..${MAX_CLUSTER_BITS})`);
  }
  const clusterSize = 2 ** clusterBits;
  const header: Qcow2Header = {
    version: version as 2 | 3,
    backingFileOffset: u64(8, 'backing_file_offset'),
    backingFileSize: buf.readUInt32BE(16),
    clusterBits,
    clusterSize,
    size: u64(24, 'size'),
    cryptMethod: buf.readUInt32BE(32),
    l1Size: buf.readUInt32BE(36),
    l1TableOffset: u64(40, 'l1_table_offset'),
    refcountTableOffset: u64(48, 'refcount_table_offset'),
    refcountTableClusters: buf.readUInt32BE(56),
    nbSnapshots: buf.readUInt32BE(60),
    snapshotsOffset: u64(64, 'snapshots_offset'),
    incompatibleFeatures: 0n,
    compatibleFeatures: 0n,
    autoclearFeatures: 0n,
    refcountOrder: 4,
    headerLength: HEADER_V2_LENGTH,
    extensions: [],
    backingFile: undefined,
    backingFormat: undefined,
    backupId: undefined,
  };
  if (version === 3) {
    if (buf.length < HEADER_V3_LENGTH) fail('too short for a version 3 header');
    header.incompatibleFeatures = buf.readBigUInt64BE(72);
    header.compatibleFeatures = buf.readBigUInt64BE(80);
    header.autoclearFeatures = buf.readBigUInt64BE(88);
    header.refcountOrder = buf.readUInt32BE(96);
    header.headerLength = buf.readUInt32BE(100);
    if (header.refcountOrder > 6) fail(`refcount_order ${header.refcountOrder} exceeds 6`);
    if (
      header.headerLength < HEADER_V3_LENGTH ||
      header.headerLength % 8 !== 0 ||
      header.headerLength > Math.min(clusterSize, buf.length)
    ) {
      fail(`invalid header_length ${header.headerLength}`);
    }
  }
  // Refuse, by name, every feature whose absence the reader relies on.
  if (header.cryptMethod !== 0) {
    fail(`encryption is not supported (crypt_method ${header.cryptMethod})`);
  }
  const refused: string[] = [];
  let known = BigInt(INCOMPAT_DIRTY);
  for (const [bit, label] of INCOMPAT_NAMES) {
    known |= bit;
    if (header.incompatibleFeatures & bit) refused.push(label);
  }
  const unknown = header.incompatibleFeatures & ~known;
  if (unknown) refused.push(`unknown incompatible feature bits 0x${unknown.toString(16)}`);
  if (refused.length > 0) fail(`unsupported feature(s): ${refused.join(', ')}`);

  const clustersOf = (bytes: number): number => Math.ceil(bytes / clusterSize);
  const l2Entries = clusterSize / 8;
  const needL1 = clustersOf(clustersOf(header.size) * 8);
  if (needL1 > MAX_L1_ENTRIES) fail(`virtual size ${header.size} is too large`);
  if (header.l1Size > MAX_L1_ENTRIES) fail(`L1 table too large (${header.l1Size} entries)`);
  if (header.l1Size < Math.ceil(clustersOf(header.size) / l2Entries)) {
    fail(`L1 table too small (${header.l1Size} entries) for virtual size ${header.size}`);
  }
  if (header.l1Size > 0) {
    if (header.l1TableOffset % clusterSize !== 0 || header.l1TableOffset === 0) {
      fail(`L1 table offset ${header.l1TableOffset} is not a valid cluster offset`);
    }
    if (header.l1TableOffset + header.l1Size * 8 > fileSize) {
      fail(
        `L1 table (${header.l1Size} entries at ${header.l1TableOffset}) extends beyond end of file (${fileSize})`,
      );
    }
  }

  if (header.version === 3) parseExtensions(buf, header, fail);

  if (header.backingFileOffset !== 0) {
    const end = header.backingFileOffset + header.backingFileSize;
    if (header.backingFileSize > MAX_BACKING_NAME) {
      fail(`backing file name too long (${header.backingFileSize} bytes, at most 1023)`);
    }
    if (header.backingFileSize === 0 || end > Math.min(clusterSize, buf.length)) {
      fail('backing file name lies outside the header cluster');
    }
    header.backingFile = buf.toString('utf8', header.backingFileOffset, end);
  }
  return header;
}

function parseExtensions(buf: Buffer, header: Qcow2Header, fail: (why: string) => never): void {
  const limit = Math.min(header.clusterSize, buf.length);
  let pos = header.headerLength;
  const seen = new Set<number>();
  for (;;) {
    if (pos + 8 > limit) fail('header extensions run past the header cluster');
    const type = buf.readUInt32BE(pos);
    const length = buf.readUInt32BE(pos + 4);
    if (type === EXT_END) break;
    const end = pos + 8 + length;
    if (end > limit) fail(`header extension 0x${type.toString(16)} runs past the header cluster`);
    if (seen.has(type)) fail(`header extension 0x${type.toString(16)} appears twice`);
    seen.add(type);
    const data = Buffer.from(buf.subarray(pos + 8, end));
    header.extensions.push({ type, data });
    if (type === EXT_BACKING_FORMAT) header.backingFormat = data.toString('utf8');
    if (type === EXT_DEVFILTER && length >= 16) header.backupId = data.toString('hex', 0, 16);
    pos = end + ((8 - (length % 8)) % 8);
  }
}

export interface HeaderFields {
  clusterBits: number;
  size: number;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  backingFile?: string;
  backingFormat?: string;
  /** 16 bytes, recorded in our own extension. */
  backupId: Buffer;
  manifestVersion: number;
}

/** Encodes the header cluster of a version 3 image as this project writes it. */
export function encodeHeader(f: HeaderFields): Buffer {
  const clusterSize = 2 ** f.clusterBits;
  const buf = Buffer.alloc(clusterSize);
  buf.writeUInt32BE(QCOW2_MAGIC, 0);
  buf.writeUInt32BE(3, 4);
  buf.writeUInt32BE(f.clusterBits, 20);
  writeU64BE(buf, 24, f.size);
  buf.writeUInt32BE(0, 32); // no encryption
  buf.writeUInt32BE(f.l1Size, 36);
  writeU64BE(buf, 40, f.l1TableOffset);
  writeU64BE(buf, 48, f.refcountTableOffset);
  buf.writeUInt32BE(f.refcountTableClusters, 56);
  // nb_snapshots, snapshots_offset, all three feature bitmaps: zero.
  buf.writeUInt32BE(REFCOUNT_ORDER, 96);
  buf.writeUInt32BE(HEADER_V3_LENGTH, 100);
  let pos = HEADER_V3_LENGTH;
  const extension = (type: number, data: Buffer): void => {
    buf.writeUInt32BE(type, pos);
    buf.writeUInt32BE(data.length, pos + 4);
    data.copy(buf, pos + 8);
    pos += 8 + Math.ceil(data.length / 8) * 8;
  };
  if (f.backingFile !== undefined) {
    extension(EXT_BACKING_FORMAT, Buffer.from(f.backingFormat ?? 'qcow2', 'utf8'));
  }
  const ours = Buffer.alloc(DEVFILTER_EXT_LENGTH);
  f.backupId.copy(ours, 0, 0, 16);
  ours.writeUInt32BE(f.manifestVersion, 16);
  extension(EXT_DEVFILTER, ours);
  pos += 8; // end-of-extensions marker: type 0, length 0 (already zero)
  if (f.backingFile !== undefined) {
    const name = Buffer.from(f.backingFile, 'utf8');
    if (name.length === 0 || name.length > MAX_BACKING_NAME || pos + name.length > clusterSize) {
      throw new RangeError(`backing file name must be 1..${MAX_BACKING_NAME} bytes`);
    }
    writeU64BE(buf, 8, pos);
    buf.writeUInt32BE(name.length, 16);
    name.copy(buf, pos);
  }
  return buf;
}
