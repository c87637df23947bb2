/**
 * A read-only Device over a qcow2 image and its backing chain (written from QEMU's
 * specification, docs/interop/qcow2.txt), so that a backup can be served as an export,
 * restored, or verified.
 *
 * Reads what this project writes and what `qemu-img create`/`convert` produce without
 * compression, encryption or an external data file: versions 2 and 3, any cluster size QEMU
 * accepts (512 B..2 MiB), zero clusters, backing files in qcow2 or raw format. Everything else
 * is refused by name when the image is opened (or, for a compressed cluster, when it is met).
 * Every offset read from the file is checked against the file's size and the cluster
 * alignment before it is used: a hostile image gives an error naming the file and the
 * offending field, never a read out of range. Refcounts and internal snapshots are not read.
 */
import fs from 'node:fs';
import path from 'node:path';
import {
  DEFAULT_BLOCK_SIZE,
  ExtentState,
  RequestFlags,
  readOnlyImageCaps,
  type Device,
  type DeviceInfo,
  type Extent,
} from '../core/device.js';
import { DeviceError, toDeviceError } from '../core/errors.js';
import { checkRange, checkStatusRange, closedError, readOnlyError } from '../backends/checks.js';
import { closeFd, preadFull } from '../backends/fdio.js';
import {
  HEADER_V3_LENGTH,
  MAX_CLUSTER_BITS,
  QCOW2_MAGIC,
  Qcow2FormatError,
  entryOffset,
  parseHeader,
  type Qcow2Header,
} from './qcow2-format.js';

export interface OpenImageOptions {
  /** Open the backing chain too (default). False: unallocated clusters read as zeros. */
  followBacking?: boolean;
  /** Longest chain accepted, counting the top image. 64 by default. */
  maxChainDepth?: number;
  /** Memory for cached L2 tables (one cluster each), per image: 4 MiB by default, >= 2 tables. */
  l2CacheBytes?: number;
}

/** The kinds of a guest cluster in one image's own mapping. */
export type ClusterKind = 'data' | 'zero' | 'unallocated';

/** A run of guest clusters of one kind; for 'data', at consecutive host offsets. */
export interface ClusterRun {
  firstCluster: number;
  count: number;
  kind: ClusterKind;
  /** Host offset of the first cluster ('data' only; 0 otherwise). */
  hostOffset: number;
}

/** Any image in a chain: the qcow2 reader or a raw file. */
export interface ImageDevice extends Device {
  readonly path: string;
  readonly format: 'qcow2' | 'raw';
}

const HOLE_ZERO = ExtentState.HOLE | ExtentState.ZERO;
const MAX_EXTENTS = 1024;
const DEFAULT_CHAIN_DEPTH = 64;
const DEFAULT_L2_CACHE_BYTES = 4 * 1024 * 1024;
/** A read coalesces at most this much host-contiguous data into one pread. */
const MAX_RUN_BYTES = 8 * 1024 * 1024;

function readOnlyInfo(size: number, preferred: number): DeviceInfo {
  return Object.freeze({
    size,
    blockSize: Object.freeze({
      minimum: 1,
      preferred: Math.min(Math.max(preferred, 4096), DEFAULT_BLOCK_SIZE.maximum),
      maximum: DEFAULT_BLOCK_SIZE.maximum,
    }),
    caps: readOnlyImageCaps(false),
  });
}

function openReadOnly(file: string): Promise<number> {
  return new Promise((resolve, reject) => {
    fs.open(file, fs.constants.O_RDONLY, (err, fd) => {
      if (!err) return resolve(fd);
      if (err.code === 'ENOENT') reject(new Error(`image not found: ${file}`, { cause: err }));
      else reject(err);
    });
  });
}

function fstat(fd: number): Promise<fs.Stats> {
  return new Promise((resolve, reject) => fs.fstat(fd, (e, s) => (e ? reject(e) : resolve(s))));
}

/** Shared by both image kinds: the Device methods a read-only image refuses or ignores. */
abstract class ReadOnlyImage {
  #inflight = 0;
  #drained: (() => void) | undefined;
  #closing: Promise<void> | undefined;

  protected abstract closeResources(): Promise<void>;

  write(_data: Buffer, _offset: number, _flags: number): Promise<void> {
    return Promise.reject(readOnlyError('write'));
  }
  trim(_offset: number, _length: number, _flags: number): Promise<void> {
    return Promise.reject(readOnlyError('trim'));
  }
  writeZeroes(_offset: number, _length: number, _flags: number): Promise<void> {
    return Promise.reject(readOnlyError('writeZeroes'));
  }
  flush(_flags: number): Promise<void> {
    return this.run('flush', async () => undefined);
  }
  cache(_offset: number, _length: number, _flags: number): Promise<void> {
    return this.run('cache', async () => undefined);
  }

  close(): Promise<void> {
    this.#closing ??= (async () => {
      if (this.#inflight > 0) await new Promise<void>((resolve) => (this.#drained = resolve));
      await this.closeResources();
    })();
    return this.#closing;
  }

  /** Every request runs here: refused once closing, counted while in flight, errors mapped. */
  protected async run<T>(op: string, fn: () => Promise<T>): Promise<T> {
    if (this.#closing) throw closedError(op);
    this.#inflight++;
    try {
      return await fn();
    } catch (err) {
      throw toDeviceError(err);
    } finally {
      if (--this.#inflight === 0) this.#drained?.();
    }
  }
}

/** A raw file as a backing image: read-only, reads past its end are the caller's concern. */
export class RawImage extends ReadOnlyImage implements ImageDevice {
  readonly path: string;
  readonly format = 'raw' as const;
  readonly #fd: number;
  readonly #info: DeviceInfo;

  private constructor(file: string, fd: number, size: number) {
    super();
    this.path = file;
    this.#fd = fd;
    this.#info = readOnlyInfo(size, 4096);
  }

  static async open(file: string): Promise<RawImage> {
    const fd = await openReadOnly(file);
    try {
      const stat = await fstat(fd);
      if (!stat.isFile()) throw new Error(`${file}: not a regular file`);
      return new RawImage(file, fd, stat.size);
    } catch (err) {
      await closeFd(fd);
      throw err;
    }
  }

  info(): DeviceInfo {
    return this.#info;
  }

  read(buf: Buffer, offset: number, _flags: number): Promise<void> {
    return this.run('read', async () => {
      checkRange('read', offset, buf.length, this.#info.size);
      await preadFull(this.#fd, buf, offset);
    });
  }

  blockStatus(offset: number, length: number, _flags: number): Promise<Extent[]> {
    return this.run('blockStatus', async () => {
      checkStatusRange(offset, length, this.#info.size);
      return [{ length, state: 0 }];
    });
  }

  protected closeResources(): Promise<void> {
    return closeFd(this.#fd);
  }
}

/** One image of a qcow2 chain; `backing` is the rest of the chain. */
export class Qcow2Image extends ReadOnlyImage implements ImageDevice {
  readonly path: string;
  readonly format = 'qcow2' as const;
  readonly header: Qcow2Header;
  /** Absolute path of the backing file, if the header names one. */
  readonly backingPath: string | undefined;
  /** The opened backing image (undefined without one, or when not following the chain). */
  readonly backing: ImageDevice | undefined;
  readonly fileSize: number;
  readonly #fd: number;
  readonly #info: DeviceInfo;
  readonly #cs: number;
  readonly #l2Entries: number;
  /** The L1 entries that cover the virtual size (others are never needed). */
  readonly #l1: Buffer;
  readonly #l2Cache = new Map<number, Promise<Buffer>>();
  readonly #l2CacheLimit: number;

  /** Use Qcow2Image.open or openQcow2. */
  constructor(
    file: string,
    fd: number,
    fileSize: number,
    header: Qcow2Header,
    l1: Buffer,
    backingPath: string | undefined,
    backing: ImageDevice | undefined,
    l2CacheTables: number,
  ) {
    super();
    this.path = file;
    this.#fd = fd;
    this.fileSize = fileSize;
    this.header = header;
    this.#l1 = l1;
    this.backingPath = backingPath;
    this.backing = backing;
    this.#cs = header.clusterSize;
    this.#l2Entries = header.clusterSize / 8;
    this.#l2CacheLimit = l2CacheTables;
    this.#info = readOnlyInfo(header.size, header.clusterSize);
  }

  /** Opens `file` as qcow2 (refusing anything else) and, by default, its backing chain. */
  static async open(file: string, options: OpenImageOptions = {}): Promise<Qcow2Image> {
    return openQcow2Level(file, options, 1, new Set());
  }

  info(): DeviceInfo {
    return this.#info;
  }

  read(buf: Buffer, offset: number, _flags: number): Promise<void> {
    return this.run('read', async () => {
      checkRange('read', offset, buf.length, this.#info.size);
      const cs = this.#cs;
      let done = 0;
      while (done < buf.length) {
        const guest = offset + done;
        const within = guest % cs;
        const cluster = (guest - within) / cs;
        const wantClusters = Math.ceil((within + buf.length - done) / cs);
        const run = await this.mapRun(cluster, Math.min(wantClusters, MAX_RUN_BYTES / cs));
        const n = Math.min(run.count * cs - within, buf.length - done);
        const piece = buf.subarray(done, done + n);
        if (run.kind === 'data') await preadFull(this.#fd, piece, run.hostOffset + within);
        else if (run.kind === 'zero') piece.fill(0);
        else await this.#readBacking(piece, guest);
        done += n;
      }
    });
  }

  blockStatus(offset: number, length: number, flags: number): Promise<Extent[]> {
    return this.run('blockStatus', async () => {
      checkStatusRange(offset, length, this.#info.size);
      const one = (flags & RequestFlags.REQ_ONE) !== 0;
      const out: Extent[] = [];
      const push = (len: number, state: number): void => {
        const last = out[out.length - 1];
        if (last && last.state === state) last.length += len;
        else out.push({ length: len, state });
      };
      const cs = this.#cs;
      const end = offset + length;
      let pos = offset;
      while (pos < end && out.length < MAX_EXTENTS) {
        const within = pos % cs;
        const cluster = (pos - within) / cs;
        const run = await this.mapRun(cluster, Math.ceil((end - cluster * cs) / cs));
        const runEnd = Math.min(end, (cluster + run.count) * cs);
        if (run.kind === 'data') push(runEnd - pos, 0);
        else if (run.kind === 'zero') push(runEnd - pos, HOLE_ZERO);
        else await this.#backingStatus(pos, runEnd, push);
        pos = runEnd;
        if (one && out.length > 0) break;
      }
      return one ? out.slice(0, 1) : out;
    });
  }

  /**
   * This image's own mapping from `firstCluster` on: the longest run (at most `maxClusters`)
   * of clusters of one kind, and for data, at consecutive host offsets. Never follows the
   * backing file. Throws (naming the field) for a damaged or unsupported entry.
   */
  async mapRun(firstCluster: number, maxClusters: number): Promise<ClusterRun> {
    const totalClusters = Math.ceil(this.header.size / this.#cs);
    const limit = Math.max(1, Math.min(maxClusters, totalClusters - firstCluster));
    const l1Index = Math.floor(firstCluster / this.#l2Entries);
    const tableEnd = (l1Index + 1) * this.#l2Entries;
    const table = await this.#l2Table(l1Index);
    if (table === undefined) {
      const count = Math.min(limit, tableEnd - firstCluster);
      return { firstCluster, count, kind: 'unallocated', hostOffset: 0 };
    }
    const first = this.#decode(table, firstCluster);
    let count = 1;
    while (count < limit && firstCluster + count < tableEnd) {
      const next = this.#decode(table, firstCluster + count);
      if (next.kind !== first.kind) break;
      if (first.kind === 'data' && next.host !== first.host + count * this.#cs) break;
      count++;
    }
    return { firstCluster, count, kind: first.kind, hostOffset: first.host };
  }

  /**
   * Reads `buf.length` bytes at host offset `hostOffset` of this image's file (for verify:
   * a data cluster's stored bytes). Bytes past the end of the file read as zeros.
   */
  readHost(buf: Buffer, hostOffset: number): Promise<void> {
    return this.run('readHost', () => preadFull(this.#fd, buf, hostOffset));
  }

  protected async closeResources(): Promise<void> {
    await closeFd(this.#fd);
    await this.backing?.close();
  }

  #fail(why: string): never {
    throw new DeviceError('EIO', `${this.path}: ${why}`);
  }

  /** The L2 table of L1 entry `index`, or undefined if it is unallocated. */
  #l2Table(index: number): Promise<Buffer | undefined> | Buffer | undefined {
    const hi = this.#l1.readUInt32BE(index * 8);
    const lo = this.#l1.readUInt32BE(index * 8 + 4);
    const offset = entryOffset(hi, lo);
    if (offset === 0) return undefined;
    if ((hi & 0x7f000000) !== 0 || (lo & 0x1ff) !== 0) {
      this.#fail(`L1 entry ${index} has reserved bits set`);
    }
    if (offset % this.#cs !== 0)
      this.#fail(`L1 entry ${index}: L2 table offset ${offset} unaligned`);
    if (offset + this.#cs > this.fileSize) {
      this.#fail(
        `L1 entry ${index}: L2 table at ${offset} lies beyond end of file (${this.fileSize})`,
      );
    }
    const cached = this.#l2Cache.get(index);
    if (cached !== undefined) {
      this.#l2Cache.delete(index); // refresh its place in the LRU order
      this.#l2Cache.set(index, cached);
      return cached;
    }
    const loading = (async () => {
      const table = Buffer.allocUnsafe(this.#cs);
      await preadFull(this.#fd, table, offset);
      return table;
    })();
    loading.catch(() => this.#l2Cache.delete(index));
    this.#l2Cache.set(index, loading);
    if (this.#l2Cache.size > this.#l2CacheLimit) {
      this.#l2Cache.delete(this.#l2Cache.keys().next().value!);
    }
    return loading;
  }

  #decode(table: Buffer, cluster: number): { kind: ClusterKind; host: number } {
    const pos = (cluster % this.#l2Entries) * 8;
    const hi = table.readUInt32BE(pos);
    const lo = table.readUInt32BE(pos + 4);
    const where = `L2 entry for guest offset ${cluster * this.#cs}`;
    if (hi & 0x40000000) {
      this.#fail(`${where}: compressed clusters are not supported`);
    }
    const zeroFlag = (lo & 1) !== 0;
    if ((hi & 0x3f000000) !== 0 || (lo & 0x1fe) !== 0 || (zeroFlag && this.header.version < 3)) {
      this.#fail(`${where} has reserved bits set`);
    }
    if (zeroFlag) return { kind: 'zero', host: 0 };
    const host = entryOffset(hi, lo);
    if (host === 0) {
      if (hi & 0x80000000) this.#fail(`${where}: host offset 0 marked as allocated`);
      return { kind: 'unallocated', host: 0 };
    }
    if (host % this.#cs !== 0) this.#fail(`${where}: host offset ${host} is unaligned`);
    if (host >= this.fileSize) {
      this.#fail(`${where}: data cluster at ${host} lies beyond end of file (${this.fileSize})`);
    }
    return { kind: 'data', host };
  }

  async #readBacking(piece: Buffer, guest: number): Promise<void> {
    const backing = this.backing;
    const backingSize = backing?.info().size ?? 0;
    const inBacking = Math.max(0, Math.min(piece.length, backingSize - guest));
    if (inBacking > 0) await backing!.read(piece.subarray(0, inBacking), guest, 0);
    piece.fill(0, inBacking);
  }

  async #backingStatus(
    pos: number,
    end: number,
    push: (length: number, state: number) => void,
  ): Promise<void> {
    const backing = this.backing;
    const backingEnd = Math.min(end, backing?.info().size ?? 0);
    while (pos < backingEnd) {
      const extents = await backing!.blockStatus(pos, backingEnd - pos, 0);
      const before = pos;
      for (const e of extents) {
        const len = Math.min(e.length, backingEnd - pos);
        if (len <= 0) break;
        // Data below is data here; a backing file's hole is a hole of this image too.
        push(len, e.state & HOLE_ZERO);
        pos += len;
      }
      if (pos === before) {
        // A device that answers with no extent breaks its contract; calling the rest data is
        // always true, and ends the loop.
        push(backingEnd - pos, 0);
        pos = backingEnd;
      }
    }
    if (pos < end) push(end - pos, HOLE_ZERO);
  }
}

/** Resolves a backing file name as QEMU does: relative to the image's directory. */
export function resolveBackingPath(imagePath: string, backingFile: string): string {
  if (backingFile.startsWith('json:')) {
    throw new Qcow2FormatError(`${imagePath}: json: backing file specifications are not supported`);
  }
  return path.resolve(path.dirname(imagePath), backingFile);
}

async function isQcow2File(file: string): Promise<boolean> {
  const fd = await openReadOnly(file);
  try {
    const buf = Buffer.alloc(4);
    await preadFull(fd, buf, 0);
    return buf.readUInt32BE(0) === QCOW2_MAGIC;
  } finally {
    await closeFd(fd);
  }
}

/**
 * Opens an image of either format: `format` as the referring header says, or found from the
 * file's magic when undefined (a file without the qcow2 magic is raw).
 */
export async function openImage(
  file: string,
  format: string | undefined,
  options: OpenImageOptions = {},
): Promise<ImageDevice> {
  return openLevel(file, format, options, 1, new Set());
}

async function openLevel(
  file: string,
  format: string | undefined,
  options: OpenImageOptions,
  depth: number,
  seen: Set<string>,
): Promise<ImageDevice> {
  if (format !== undefined && format !== 'qcow2' && format !== 'raw') {
    throw new Qcow2FormatError(`${file}: backing format '${format}' is not supported`);
  }
  const qcow2 = format === 'qcow2' || (format === undefined && (await isQcow2File(file)));
  if (!qcow2) return RawImage.open(file);
  return openQcow2Level(file, options, depth, seen);
}

async function openQcow2Level(
  file: string,
  options: OpenImageOptions,
  depth: number,
  seen: Set<string>,
): Promise<Qcow2Image> {
  const maxDepth = options.maxChainDepth ?? DEFAULT_CHAIN_DEPTH;
  if (depth > maxDepth)
    throw new Qcow2FormatError(`${file}: backing chain longer than ${maxDepth}`);
  const fd = await openReadOnly(file);
  let backing: ImageDevice | undefined;
  try {
    const stat = await fstat(fd);
    if (!stat.isFile()) throw new Qcow2FormatError(`${file}: not a regular file`);
    const real = await fs.promises.realpath(file);
    if (seen.has(real)) throw new Qcow2FormatError(`${file}: backing chain loops back to itself`);
    seen.add(real);
    // The header and its extensions lie in the first cluster; read the largest one QEMU allows,
    // clipped to the file.
    const first = Buffer.alloc(
      Math.min(2 ** MAX_CLUSTER_BITS, Math.max(stat.size, HEADER_V3_LENGTH)),
    );
    await preadFull(fd, first, 0);
    const header = parseHeader(
      first.subarray(0, Math.min(first.length, stat.size)),
      stat.size,
      file,
    );
    const totalClusters = Math.ceil(header.size / header.clusterSize);
    const l1Needed = Math.ceil(totalClusters / (header.clusterSize / 8));
    const l1 = Buffer.alloc(l1Needed * 8);
    if (l1Needed > 0) await preadFull(fd, l1, header.l1TableOffset);
    let backingPath: string | undefined;
    if (header.backingFile !== undefined) {
      backingPath = resolveBackingPath(file, header.backingFile);
      if (options.followBacking ?? true) {
        try {
          backing = await openLevel(backingPath, header.backingFormat, options, depth + 1, seen);
        } catch (err) {
          const why = err instanceof Error ? err.message : String(err);
          throw new Qcow2FormatError(`${file}: cannot open backing file: ${why}`);
        }
      }
    }
    return new Qcow2Image(
      file,
      fd,
      stat.size,
      header,
      l1,
      backingPath,
      backing,
      Math.max(
        2,
        Math.floor((options.l2CacheBytes ?? DEFAULT_L2_CACHE_BYTES) / header.clusterSize),
      ),
    );
  } catch (err) {
    await closeFd(fd);
    throw err;
  }
}

/** Opens the qcow2 image at `file` with its backing chain: the entry point for restore. */
export function openQcow2(file: string, options: OpenImageOptions = {}): Promise<Qcow2Image> {
  return Qcow2Image.open(file, options);
}
