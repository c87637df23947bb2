/**
 * A streaming writer of qcow2 version 3 backup images (written from QEMU's specification,
 * docs/interop/qcow2.txt; the layout we produce is in docs/backup-format.md).
 *
 * The caller hands over the image's content in increasing offset order: `writeData` for data
 * and `writeZeroes` for ranges that must read as zeros; whatever is never mentioned stays
 * unallocated (reads from the backing file, or zeros without one). Data clusters are appended
 * to the file as they come, starting at cluster 1; `finish()` appends the L2 tables, the L1
 * table, the refcount table and blocks, writes the header into cluster 0, syncs, and only then
 * publishes the image under its final name. Until then it lives at `DEST.partial` with a
 * zeroed first cluster: not even a qcow2 image. So an interrupted backup never leaves a file
 * at DEST that looks complete.
 *
 * Alongside, `DEST.manifest` records every stored cluster's CRC-32, a SHA-256 of the stored
 * data and the link to the backing image's manifest, for `backup verify`.
 *
 * Memory: the writer keeps one run record (17 bytes) per run of same-kind clusters and one
 * CRC (4 bytes) per data cluster; L2 tables are generated one at a time in finish().
 */
import { createHash, randomBytes, type Hash } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { closeFd, pwriteFull } from '../backends/fdio.js';
import { crc32 } from '../core/crc32.js';
import {
  ExtentKind,
  MANIFEST_VERSION,
  MAX_EXTENT_CLUSTERS,
  encodeManifest,
  manifestPathOf,
  readManifest,
  type BackupMetadata,
  type ExtentKindValue,
  type ManifestBody,
} from './manifest.js';
import { QCOW2_MAGIC, REFCOUNT_ORDER, encodeHeader, writeU64BE } from './qcow2-format.js';

export const DEFAULT_CLUSTER_SIZE = 64 * 1024;
export const MIN_WRITER_CLUSTER_SIZE = 4096;
export const MAX_WRITER_CLUSTER_SIZE = 2 * 1024 * 1024;
export const PARTIAL_SUFFIX = '.partial';

export interface Qcow2WriterOptions {
  /** Virtual size in bytes. */
  size: number;
  /** Power of two, 4 KiB..2 MiB; 64 KiB by default. */
  clusterSize?: number;
  /**
   * Backing file name exactly as it is to be stored in the header: relative names are
   * resolved against the directory of DEST (as QEMU does). It must exist.
   */
  backingFile?: string;
  /** Format of the backing file, recorded in the backing format extension; 'qcow2' by default. */
  backingFormat?: 'qcow2' | 'raw';
  /**
   * Digest of the backing image's manifest, recorded to chain the manifests. By default it is
   * read from BACKING.manifest, or null if the backing file has none (a raw backing file).
   */
  backingManifestDigest?: string | null;
  /** Free-form facts stored in the manifest (export name, generation, snapshot time...). */
  metadata?: BackupMetadata;
  /**
   * Store all-zero data clusters as zero clusters (with a backing file) or leave them
   * unallocated (without one) instead of writing them. True by default.
   */
  detectZeroes?: boolean;
  /** Replace an existing DEST (and its manifest) at finish. False by default: refused. */
  overwrite?: boolean;
}

export interface Qcow2WriteResult {
  path: string;
  manifestPath: string;
  /** SHA-256 (hex) of the manifest; an incremental on top of this image records it. */
  manifestDigest: string;
  backupId: string;
  dataClusters: number;
  zeroClusters: number;
  /** Size of the image file in bytes. */
  fileSize: number;
}

export interface Qcow2Writer {
  readonly path: string;
  readonly partialPath: string;
  readonly manifestPath: string;
  readonly size: number;
  readonly clusterSize: number;
  /**
   * Stores `data` at `offset`. Offsets and lengths are multiples of the cluster size, except
   * that a range may end at the end of the device; ranges (of writeData and writeZeroes
   * together) come in increasing, non-overlapping order. Calls may be issued without waiting:
   * they run in call order. Breaking a rule rejects with a RangeError and changes nothing.
   */
  writeData(offset: number, data: Buffer): Promise<void>;
  /** Marks a range as reading zeros (zero clusters with a backing file; nothing without). */
  writeZeroes(offset: number, length: number): Promise<void>;
  /** Writes the metadata, syncs, and atomically publishes DEST and DEST.manifest. */
  finish(): Promise<Qcow2WriteResult>;
  /** Stops and removes the partial files. Safe to call at any time, also after a failure. */
  abort(): Promise<void>;
}

/** Grows as runs are added; parallel typed arrays keep each run at 17 bytes. */
class RunList {
  first = new Float64Array(64);
  count = new Uint32Array(64);
  kind = new Uint8Array(64);
  length = 0;

  add(firstCluster: number, clusters: number, kind: ExtentKindValue): void {
    const last = this.length - 1;
    if (
      last >= 0 &&
      this.kind[last] === kind &&
      this.first[last]! + this.count[last]! === firstCluster
    ) {
      const room = MAX_EXTENT_CLUSTERS - this.count[last]!;
      const take = Math.min(room, clusters);
      this.count[last] = this.count[last]! + take;
      firstCluster += take;
      clusters -= take;
    }
    while (clusters > 0) {
      if (this.length === this.first.length) this.#grow();
      const take = Math.min(MAX_EXTENT_CLUSTERS, clusters);
      this.first[this.length] = firstCluster;
      this.count[this.length] = take;
      this.kind[this.length] = kind;
      this.length++;
      firstCluster += take;
      clusters -= take;
    }
  }

  #grow(): void {
    const n = this.first.length * 2;
    const first = new Float64Array(n);
    first.set(this.first);
    const count = new Uint32Array(n);
    count.set(this.count);
    const kind = new Uint8Array(n);
    kind.set(this.kind);
    this.first = first;
    this.count = count;
    this.kind = kind;
  }
}

class CrcList {
  values = new Uint32Array(1024);
  length = 0;

  push(value: number): void {
    if (this.length === this.values.length) {
      const grown = new Uint32Array(this.values.length * 2);
      grown.set(this.values);
      this.values = grown;
    }
    this.values[this.length++] = value;
  }

  view(): Uint32Array {
    return this.values.subarray(0, this.length);
  }
}

type State = 'open' | 'finishing' | 'done' | 'aborted' | 'failed';

function openFd(file: string, flags: string | number, mode?: number): Promise<number> {
  return new Promise((resolve, reject) => {
    fs.open(file, flags, mode, (err, fd) => (err ? reject(err) : resolve(fd)));
  });
}

function fsyncFd(fd: number): Promise<void> {
  return new Promise((resolve, reject) => fs.fsync(fd, (err) => (err ? reject(err) : resolve())));
}

/**
 * The virtual size recorded in the header: QEMU counts a qcow2 image's size in whole 512-byte
 * sectors and would ignore a partial last sector, so the header says the size rounded up to
 * 512 (the extra bytes read as zeros). The manifest keeps the exact size.
 */
export function headerSize(size: number): number {
  return Math.ceil(size / 512) * 512;
}

/** Makes renames and creations in `dir` durable. */
export async function fsyncDir(dir: string): Promise<void> {
  const fd = await openFd(dir, fs.constants.O_RDONLY | fs.constants.O_DIRECTORY);
  try {
    await fsyncFd(fd);
  } finally {
    await closeFd(fd);
  }
}

async function exists(file: string): Promise<boolean> {
  try {
    await fs.promises.lstat(file);
    return true;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return false;
    throw err;
  }
}

async function removeIfPresent(file: string): Promise<void> {
  await fs.promises.rm(file, { force: true });
}

function isZeroBuffer(buf: Buffer, zero: Buffer): boolean {
  return buf.length <= zero.length && buf.equals(zero.subarray(0, buf.length));
}

async function resolveBackingDigest(
  dest: string,
  options: Qcow2WriterOptions,
): Promise<string | null> {
  const backingPath = path.resolve(path.dirname(dest), options.backingFile!);
  if (!(await exists(backingPath))) {
    throw new Error(`backing file not found: ${backingPath}`);
  }
  if (options.backingManifestDigest !== undefined) return options.backingManifestDigest;
  if ((options.backingFormat ?? 'qcow2') !== 'qcow2') return null;
  const manifest = await readManifest(manifestPathOf(backingPath));
  return manifest?.digest ?? null;
}

function checkOptions(options: Qcow2WriterOptions): number {
  const { size, clusterSize = DEFAULT_CLUSTER_SIZE } = options;
  if (!Number.isSafeInteger(size) || size < 0) {
    throw new RangeError(`size must be a safe integer >= 0, got ${size}`);
  }
  if (
    !Number.isSafeInteger(clusterSize) ||
    clusterSize < MIN_WRITER_CLUSTER_SIZE ||
    clusterSize > MAX_WRITER_CLUSTER_SIZE ||
    (clusterSize & (clusterSize - 1)) !== 0
  ) {
    throw new RangeError(`clusterSize must be a power of two in 4096..2097152, got ${clusterSize}`);
  }
  const clusters = Math.ceil(size / clusterSize);
  if (Math.ceil(clusters / (clusterSize / 8)) > 32 * 1024 * 1024) {
    throw new RangeError(`size ${size} is too large for clusterSize ${clusterSize}`);
  }
  if (options.backingFile !== undefined) {
    const name = Buffer.byteLength(options.backingFile, 'utf8');
    if (name === 0 || name > 1023) throw new RangeError('backingFile must be 1..1023 bytes');
    if (options.backingFile.startsWith('json:')) {
      throw new RangeError('backingFile must be a file name, not a json: specification');
    }
  }
  if (options.backingFormat !== undefined && options.backingFile === undefined) {
    throw new RangeError('backingFormat needs a backingFile');
  }
  return clusterSize;
}

/**
 * Starts a backup image at `dest`. The data goes to `dest.partial` (replaced if a previous,
 * interrupted run left one); `dest` itself must not exist unless `overwrite` is set.
 */
export async function createQcow2Writer(
  dest: string,
  options: Qcow2WriterOptions,
): Promise<Qcow2Writer> {
  const clusterSize = checkOptions(options);
  const manifestPath = manifestPathOf(dest);
  if (!options.overwrite) {
    if (await exists(dest)) throw new Error(`backup destination already exists: ${dest}`);
    // A manifest without its image is what a run interrupted between the two renames of
    // finish() leaves (DEST appearing is the commit point): not a backup, replaced.
    await fs.promises.rm(manifestPath, { force: true });
  }
  const backingDigest =
    options.backingFile !== undefined ? await resolveBackingDigest(dest, options) : null;
  const partialPath = dest + PARTIAL_SUFFIX;
  const fd = await openFd(
    partialPath,
    fs.constants.O_WRONLY | fs.constants.O_CREAT | fs.constants.O_TRUNC,
    0o600,
  );
  return new Writer(dest, partialPath, manifestPath, fd, clusterSize, options, backingDigest);
}

class Writer implements Qcow2Writer {
  readonly path: string;
  readonly partialPath: string;
  readonly manifestPath: string;
  readonly size: number;
  readonly clusterSize: number;
  readonly #options: Qcow2WriterOptions;
  readonly #backingDigest: string | null;
  readonly #hasBacking: boolean;
  readonly #detectZeroes: boolean;
  readonly #zero: Buffer;
  readonly #backupId = randomBytes(16);
  #fd: number | undefined;
  #state: State = 'open';
  #failure: unknown;
  /** Next offset a range may start at. */
  #cursor = 0;
  /** Data clusters written so far; data cluster i sits at host cluster 1 + i. */
  #dataClusters = 0;
  #zeroClusters = 0;
  readonly #runs = new RunList();
  readonly #crcs = new CrcList();
  readonly #sha: Hash = createHash('sha256');
  #tail: Promise<void> = Promise.resolve();

  constructor(
    dest: string,
    partialPath: string,
    manifestPath: string,
    fd: number,
    clusterSize: number,
    options: Qcow2WriterOptions,
    backingDigest: string | null,
  ) {
    this.path = dest;
    this.partialPath = partialPath;
    this.manifestPath = manifestPath;
    this.#fd = fd;
    this.size = options.size;
    this.clusterSize = clusterSize;
    this.#options = options;
    this.#backingDigest = backingDigest;
    this.#hasBacking = options.backingFile !== undefined;
    this.#detectZeroes = options.detectZeroes ?? true;
    this.#zero = Buffer.alloc(clusterSize);
  }

  writeData(offset: number, data: Buffer): Promise<void> {
    try {
      this.#claim('writeData', offset, data.length);
    } catch (err) {
      return Promise.reject(err);
    }
    return this.#enqueue(() => this.#storeData(offset, data));
  }

  writeZeroes(offset: number, length: number): Promise<void> {
    try {
      this.#claim('writeZeroes', offset, length);
    } catch (err) {
      return Promise.reject(err);
    }
    return this.#enqueue(async () => {
      if (length === 0 || !this.#hasBacking) return;
      const first = offset / this.clusterSize;
      const clusters = Math.ceil(length / this.clusterSize);
      this.#runs.add(first, clusters, ExtentKind.ZERO);
      this.#zeroClusters += clusters;
    });
  }

  async finish(): Promise<Qcow2WriteResult> {
    if (this.#state !== 'open') throw this.#stateError('finish');
    this.#state = 'finishing';
    await this.#tail.catch(() => undefined);
    if (this.#failure !== undefined) {
      this.#state = 'failed';
      throw this.#failure;
    }
    const finishing = this.#finish().then(
      (result) => {
        this.#state = 'done';
        return result;
      },
      (err: unknown) => {
        this.#state = 'failed';
        this.#failure = err;
        throw err;
      },
    );
    // abort() waits for this too, and then removes what a failed finish left behind.
    this.#tail = finishing.then(
      () => undefined,
      () => undefined,
    );
    return finishing;
  }

  async abort(): Promise<void> {
    if (this.#state === 'done' || this.#state === 'aborted') return;
    if (this.#state !== 'finishing') this.#state = 'aborted';
    await this.#tail.catch(() => undefined);
    // finish won the race: the backup is complete. (The state changed during the await.)
    if ((this.#state as State) === 'done') return;
    this.#state = 'aborted';
    await this.#closeFile();
    await removeIfPresent(this.partialPath);
    await removeIfPresent(this.manifestPath + PARTIAL_SUFFIX);
  }

  /** Checks a range synchronously and advances the cursor, so misuse fails at the call. */
  #claim(op: string, offset: number, length: number): void {
    if (this.#state !== 'open') throw this.#stateError(op);
    const cs = this.clusterSize;
    const end = offset + length;
    if (
      !Number.isSafeInteger(offset) ||
      !Number.isSafeInteger(length) ||
      offset < 0 ||
      length < 0 ||
      end > this.size
    ) {
      throw new RangeError(`${op}: range ${offset}+${length} outside image of ${this.size}`);
    }
    if (offset % cs !== 0 || (end % cs !== 0 && end !== this.size)) {
      throw new RangeError(
        `${op}: range ${offset}+${length} is not aligned to the cluster size ${cs} ` +
          '(only the end of the image may be unaligned)',
      );
    }
    if (offset < this.#cursor) {
      throw new RangeError(
        `${op}: range ${offset}+${length} is not in increasing order (next offset must be >= ${this.#cursor})`,
      );
    }
    this.#cursor = end;
  }

  #stateError(op: string): Error {
    return new Error(`${op}: the writer is ${this.#state}`, { cause: this.#failure });
  }

  #enqueue(fn: () => Promise<void>): Promise<void> {
    const run = this.#tail.then(() => {
      if (this.#failure !== undefined) throw this.#stateError('write');
      return fn().catch((err: unknown) => {
        this.#failure ??= err;
        throw err;
      });
    });
    this.#tail = run.catch(() => undefined);
    return run;
  }

  async #storeData(offset: number, data: Buffer): Promise<void> {
    const cs = this.clusterSize;
    let runStart = -1; // byte index in `data` of the pending run of data clusters
    const flush = async (endByte: number): Promise<void> => {
      if (runStart < 0) return;
      const host = (1 + this.#dataClusters) * cs;
      const piece = data.subarray(runStart, endByte);
      await pwriteFull(this.#fd!, piece, host);
      const clusters = Math.ceil(piece.length / cs);
      this.#runs.add((offset + runStart) / cs, clusters, ExtentKind.DATA);
      this.#dataClusters += clusters;
      runStart = -1;
    };
    for (let at = 0; at < data.length; at += cs) {
      const cluster = data.subarray(at, Math.min(at + cs, data.length));
      if (this.#detectZeroes && isZeroBuffer(cluster, this.#zero)) {
        await flush(at);
        if (this.#hasBacking) {
          this.#runs.add((offset + at) / cs, 1, ExtentKind.ZERO);
          this.#zeroClusters++;
        }
        continue;
      }
      if (runStart < 0) runStart = at;
      this.#crcs.push(crc32(cluster));
      this.#sha.update(cluster);
    }
    await flush(data.length);
  }

  async #finish(): Promise<Qcow2WriteResult> {
    const fd = this.#fd!;
    const cs = this.clusterSize;
    const l2Entries = cs / 8;
    const totalClusters = Math.ceil(this.size / cs);
    const l1Size = Math.ceil(totalClusters / l2Entries);
    const runs = this.#runs;

    // Layout after the data: L2 tables (one per L1 entry that maps anything), the L1 table,
    // the refcount table, the refcount blocks. Every cluster of the file is used exactly once.
    let l2Tables = 0;
    let lastL1 = -1;
    for (let i = 0; i < runs.length; i++) {
      const a = Math.floor(runs.first[i]! / l2Entries);
      const b = Math.floor((runs.first[i]! + runs.count[i]! - 1) / l2Entries);
      l2Tables += b - Math.max(a, lastL1 + 1) + 1;
      lastL1 = b;
    }
    const l2Start = 1 + this.#dataClusters;
    const l1Start = l2Start + l2Tables;
    const l1Clusters = Math.ceil((l1Size * 8) / cs);
    const beforeRefcounts = l1Start + l1Clusters;
    const perBlock = (cs * 8) / 2 ** REFCOUNT_ORDER;
    let blocks = 0;
    let tableClusters = 0;
    for (;;) {
      const total = beforeRefcounts + tableClusters + blocks;
      const needBlocks = Math.ceil(total / perBlock);
      const needTable = Math.ceil((needBlocks * 8) / cs);
      if (needBlocks === blocks && needTable === tableClusters) break;
      blocks = needBlocks;
      tableClusters = needTable;
    }
    const refTableStart = beforeRefcounts;
    const blocksStart = refTableStart + tableClusters;
    const totalFileClusters = blocksStart + blocks;

    // L2 tables, generated one at a time in L1 order; data host clusters are in guest order.
    const l1 = Buffer.alloc(l1Clusters * cs);
    const l2 = Buffer.alloc(cs);
    let l2Index = -1;
    let l2Written = 0;
    let host = 1;
    const emit = async (): Promise<void> => {
      if (l2Index < 0) return;
      const at = l2Start + l2Written;
      await pwriteFull(fd, l2, at * cs);
      writeU64BE(l1, l2Index * 8, at * cs);
      l1[l2Index * 8] |= 0x80; // COPIED: refcount is exactly one
      l2Written++;
      l2.fill(0);
    };
    for (let i = 0; i < runs.length; i++) {
      const kind = runs.kind[i]!;
      const end = runs.first[i]! + runs.count[i]!;
      for (let g = runs.first[i]!; g < end; g++) {
        const index = Math.floor(g / l2Entries);
        if (index !== l2Index) {
          await emit();
          l2Index = index;
        }
        const pos = (g % l2Entries) * 8;
        if (kind === ExtentKind.DATA) {
          writeU64BE(l2, pos, host * cs);
          l2[pos] |= 0x80; // COPIED
          host++;
        } else {
          l2[pos + 7] = 1; // zero flag, no host cluster
        }
      }
    }
    await emit();
    if (l2Written !== l2Tables || host !== l2Start) {
      throw new Error('assertion failed: qcow2 layout does not add up');
    }
    await pwriteFull(fd, l1, l1Start * cs);

    const table = Buffer.alloc(tableClusters * cs);
    for (let b = 0; b < blocks; b++) writeU64BE(table, b * 8, (blocksStart + b) * cs);
    await pwriteFull(fd, table, refTableStart * cs);
    const block = Buffer.alloc(cs);
    for (let b = 0; b < blocks; b++) {
      block.fill(0);
      const n = Math.min(perBlock, totalFileClusters - b * perBlock);
      for (let i = 0; i < n; i++) block.writeUInt16BE(1, i * 2);
      await pwriteFull(fd, block, (blocksStart + b) * cs);
    }

    const header = encodeHeader({
      clusterBits: Math.log2(cs),
      size: headerSize(this.size),
      l1Size,
      l1TableOffset: l1Start * cs,
      refcountTableOffset: refTableStart * cs,
      refcountTableClusters: tableClusters,
      ...(this.#hasBacking
        ? {
            backingFile: this.#options.backingFile!,
            backingFormat: this.#options.backingFormat ?? 'qcow2',
          }
        : {}),
      backupId: this.#backupId,
      manifestVersion: MANIFEST_VERSION,
    });
    if (header.readUInt32BE(0) !== QCOW2_MAGIC) throw new Error('assertion failed: header');
    await pwriteFull(fd, header, 0);
    await fsyncFd(fd);
    await this.#closeFile();

    const body: ManifestBody = {
      backupId: this.#backupId.toString('hex'),
      image: path.basename(this.path),
      virtualSize: this.size,
      clusterSize: cs,
      backing: this.#hasBacking
        ? {
            file: this.#options.backingFile!,
            format: this.#options.backingFormat ?? 'qcow2',
            manifestDigest: this.#backingDigest,
          }
        : null,
      createdAt: new Date().toISOString(),
      clusterChecksum: 'crc32',
      dataClusters: this.#dataClusters,
      zeroClusters: this.#zeroClusters,
      dataSha256: this.#sha.digest('hex'),
      metadata: this.#options.metadata ?? {},
    };
    const manifest = encodeManifest(
      body,
      { first: runs.first, count: runs.count, kind: runs.kind, length: runs.length },
      this.#crcs.view(),
    );
    const manifestPartial = this.manifestPath + PARTIAL_SUFFIX;
    const mfd = await openFd(
      manifestPartial,
      fs.constants.O_WRONLY | fs.constants.O_CREAT | fs.constants.O_TRUNC,
      0o600,
    );
    try {
      await pwriteFull(mfd, manifest.bytes, 0);
      await fsyncFd(mfd);
    } finally {
      await closeFd(mfd);
    }

    // Publish: the manifest first, the image last. DEST appearing is the commit point; a
    // manifest without its image is a leftover the next attempt replaces.
    const dir = path.dirname(this.path);
    if (!this.#options.overwrite && (await exists(this.path)))
      throw new Error(`backup destination already exists: ${this.path}`);
    await fs.promises.rename(manifestPartial, this.manifestPath);
    await fsyncDir(dir);
    await fs.promises.rename(this.partialPath, this.path);
    await fsyncDir(dir);
    return {
      path: this.path,
      manifestPath: this.manifestPath,
      manifestDigest: manifest.digest,
      backupId: body.backupId,
      dataClusters: this.#dataClusters,
      zeroClusters: this.#zeroClusters,
      fileSize: totalFileClusters * cs,
    };
  }

  async #closeFile(): Promise<void> {
    const fd = this.#fd;
    if (fd === undefined) return;
    this.#fd = undefined;
    await closeFd(fd);
  }
}
