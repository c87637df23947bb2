/**
 * `devfilter restore`: writes the guest-visible content of a backup chain (the top qcow2 image
 * and its backing files) to a regular file, a block device or an NBD export.
 *
 * The chain is walked by allocation extents, so ranges that read as zeros (zero clusters, and
 * clusters unallocated all the way down) are never read: a regular file gets holes there, a
 * block device or an export gets them zeroed (so stale data on the target is cleared). Data
 * is read in chunks of at most `chunkBytes`, with a few writes in flight: memory is bounded by
 * PIPELINE_DEPTH chunk buffers. A regular file is built as `TARGET.partial` and renamed into
 * place once synced, so an interrupted restore never leaves a TARGET that looks complete.
 */
import fs from 'node:fs';
import path from 'node:path';
import { ExtentState, MIB } from '../core/device.js';
import { assert } from '../core/errors.js';
import { closeFd, fdatasync, pwriteFull } from '../backends/fdio.js';
import {
  FALLOC_FL_KEEP_SIZE,
  FALLOC_FL_ZERO_RANGE,
  blockDeviceSize,
  fallocate,
  isUnsupported,
} from '../backends/libc.js';
import { NbdClient } from '../nbd/client.js';
import { parseNbdUri } from '../nbd/client-uri.js';
import { TFlag } from '../nbd/protocol.js';
import { manifestPathOf, readManifest } from './manifest.js';
import { openQcow2, Qcow2Image, type ImageDevice } from './qcow2-reader.js';
import { PARTIAL_SUFFIX, fsyncDir, headerSize } from './qcow2-writer.js';
import { verifyChain, type VerifyProblem } from './verify.js';

export interface RestoreProgress {
  /** Bytes of the virtual size handled so far (data written or zero range covered). */
  doneBytes: number;
  /** The virtual size. */
  totalBytes: number;
  /** Bytes of data read and written so far. */
  dataBytes: number;
}

export interface RestoreOptions {
  /**
   * Overwrite an existing regular file (default false: refuse with a clear error). Block
   * devices and NBD exports are always written in place.
   */
  force?: boolean;
  /**
   * Verify the chain against its manifests first (default true) — refuse to restore a damaged
   * chain, listing the problems.
   */
  verify?: boolean;
  /**
   * Called with progress as bytes are processed: at most every PROGRESS_INTERVAL_MS, and once
   * at the end. An exception thrown here aborts the restore (and is what it rejects with).
   */
  onProgress?: (p: RestoreProgress) => void;
  /** Max bytes per read/write request (default 4 MiB). */
  chunkBytes?: number;
}

export type RestoreTargetKind = 'file' | 'block-device' | 'nbd';

export interface RestoreResult {
  target: string;
  kind: RestoreTargetKind;
  /** The exact size restored (from the top image's manifest, else the image's size). */
  virtualSize: number;
  /** Bytes read from the chain and written. */
  dataBytes: number;
  /** Bytes that read as zeros: left as holes in a file, zeroed on a device or export. */
  zeroBytes: number;
  seconds: number;
  /** Size of the target: the virtual size for a file; a device or export may be larger. */
  targetSize: number;
  /** Facts worth telling that are not errors (a larger target, a raw base image, ...). */
  notes: string[];
}

/** A restore refused or failed; `problems` lists what verification found, when that is why. */
export class RestoreError extends Error {
  readonly problems: readonly VerifyProblem[];

  constructor(message: string, problems: readonly VerifyProblem[] = [], cause?: unknown) {
    super(message, cause === undefined ? undefined : { cause });
    this.name = 'RestoreError';
    this.problems = problems;
  }
}

export const DEFAULT_RESTORE_CHUNK_BYTES = 4 * MIB;
/** Smallest chunk accepted; chunks are rounded down to a multiple of it. */
const MIN_CHUNK_BYTES = 4096;
const MAX_CHUNK_BYTES = 256 * MIB;
/** Writes in flight at once, each holding one chunk buffer (zero requests hold none). */
const PIPELINE_DEPTH = 4;
/** One NBD write-zeroes request covers at most this much (the wire length is 32-bit). */
const MAX_NBD_ZERO_BYTES = 1024 * MIB;
const PROGRESS_INTERVAL_MS = 100;
/** Verification problems spelled out in the error message; the rest are counted. */
const MAX_LISTED_PROBLEMS = 20;

const NBD_URI = /^[A-Za-z][A-Za-z0-9+.-]*:\/\//;

function message(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

/** Where restored bytes go. Ranges never overlap; writes may be issued without awaiting. */
interface Sink {
  readonly kind: RestoreTargetKind;
  readonly size: number;
  /** Stores `data` at `offset`; `data` may be reused once the promise settles. */
  writeData(data: Buffer, offset: number): Promise<void>;
  /** Makes [offset, offset + length) read as zeros. */
  writeZeroes(offset: number, length: number): Promise<void>;
  /** Makes everything durable and, for a file, publishes it. */
  finish(): Promise<void>;
  /** Releases everything after a failure and removes what a file restore left. Never throws. */
  abort(): Promise<void>;
}

/**
 * Restores the chain whose top image is `source` to `target`: an NBD URI (`nbd://`,
 * `nbd+unix://`), a block device, or a regular file (created; an existing one only with
 * `force`).
 */
export async function restoreChain(
  source: string,
  target: string,
  opts: RestoreOptions = {},
): Promise<RestoreResult> {
  const started = process.hrtime.bigint();
  const chunkBytes = checkChunkBytes(opts.chunkBytes ?? DEFAULT_RESTORE_CHUNK_BYTES);
  const notes: string[] = [];
  await checkSource(source);

  if (opts.verify ?? true) {
    let report;
    try {
      report = await verifyChain(source);
    } catch (err) {
      throw new RestoreError(`cannot verify backup ${source}: ${message(err)}`, [], err);
    }
    if (!report.ok) throw damagedChainError(source, report.problems);
    notes.push(...report.notes);
  }

  let image: Qcow2Image;
  try {
    image = await openQcow2(source);
  } catch (err) {
    throw new RestoreError(`cannot open backup ${source}: ${message(err)}`, [], err);
  }
  let sink: Sink | undefined;
  try {
    const virtualSize = await exactSize(source, image, opts.verify ?? true, notes);
    sink = await openSink(target, virtualSize, opts.force ?? false, notes, chainFiles(image));
    const counts = await copy(image, sink, virtualSize, chunkBytes, opts.onProgress);
    await sink.finish();
    return {
      target,
      kind: sink.kind,
      virtualSize,
      dataBytes: counts.dataBytes,
      zeroBytes: counts.zeroBytes,
      seconds: Number(process.hrtime.bigint() - started) / 1e9,
      targetSize: sink.size,
      notes,
    };
  } catch (err) {
    await sink?.abort();
    if (err instanceof RestoreError) throw err;
    throw new RestoreError(`restore of ${source} to ${target} failed: ${message(err)}`, [], err);
  } finally {
    await image.close();
  }
}

function checkChunkBytes(chunkBytes: number): number {
  if (
    !Number.isSafeInteger(chunkBytes) ||
    chunkBytes < MIN_CHUNK_BYTES ||
    chunkBytes > MAX_CHUNK_BYTES
  ) {
    throw new RangeError(
      `chunkBytes must be an integer in ${MIN_CHUNK_BYTES}..${MAX_CHUNK_BYTES}, got ${chunkBytes}`,
    );
  }
  return chunkBytes - (chunkBytes % MIN_CHUNK_BYTES);
}

async function checkSource(source: string): Promise<void> {
  let stat: fs.Stats;
  try {
    stat = await fs.promises.stat(source);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') {
      throw new RestoreError(`backup image not found: ${source}`, [], err);
    }
    throw new RestoreError(`cannot read backup image ${source}: ${message(err)}`, [], err);
  }
  if (!stat.isFile()) throw new RestoreError(`backup image is not a regular file: ${source}`);
}

function damagedChainError(source: string, problems: VerifyProblem[]): RestoreError {
  const listed = problems
    .slice(0, MAX_LISTED_PROBLEMS)
    .map((p) => `\n  ${p.image}: ${p.message}`)
    .join('');
  const more =
    problems.length > MAX_LISTED_PROBLEMS
      ? `\n  ... and ${problems.length - MAX_LISTED_PROBLEMS} more`
      : '';
  return new RestoreError(
    `refusing to restore ${source}: the backup chain failed verification ` +
      `(${problems.length} problem${problems.length === 1 ? '' : 's'}):${listed}${more}`,
    problems,
  );
}

/**
 * The exact virtual size: the top image's manifest says it (the header holds it rounded up to
 * 512 bytes). Without a manifest, the image's size. A manifest that disagrees with the image
 * is refused; with verification off, an unreadable one is noted and ignored.
 */
async function exactSize(
  source: string,
  image: Qcow2Image,
  verified: boolean,
  notes: string[],
): Promise<number> {
  const imageSize = image.info().size;
  let manifestSize: number | undefined;
  try {
    manifestSize = (await readManifest(manifestPathOf(source)))?.body.virtualSize;
  } catch (err) {
    if (verified) throw err; // verification read it moments ago: something changed under us
    notes.push(`${manifestPathOf(source)} unreadable (${message(err)}); using the image size`);
  }
  if (manifestSize === undefined) {
    if (!verified) notes.push(`${source}: no manifest; restoring the image size ${imageSize}`);
    return imageSize;
  }
  if (headerSize(manifestSize) !== imageSize) {
    throw new RestoreError(
      `${source}: the manifest's virtual size ${manifestSize} does not match the image's ${imageSize}`,
    );
  }
  return manifestSize;
}

/** The files of the opened chain, top first. */
function chainFiles(image: Qcow2Image): string[] {
  const files: string[] = [];
  let level: ImageDevice | undefined = image;
  while (level !== undefined) {
    files.push(level.path);
    level = level instanceof Qcow2Image ? level.backing : undefined;
  }
  return files;
}

async function openSink(
  target: string,
  virtualSize: number,
  force: boolean,
  notes: string[],
  chain: string[],
): Promise<Sink> {
  if (NBD_URI.test(target)) return NbdSink.open(target, virtualSize, notes);
  let stat: fs.Stats | undefined;
  try {
    stat = await fs.promises.stat(target);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') {
      throw new RestoreError(`cannot inspect restore target ${target}: ${message(err)}`, [], err);
    }
  }
  if (stat === undefined) return FileSink.create(target, virtualSize, undefined);
  if (stat.isBlockDevice()) return BlockDeviceSink.open(target, virtualSize, notes);
  if (!stat.isFile()) {
    throw new RestoreError(`restore target ${target} is neither a regular file nor a block device`);
  }
  if (!force) {
    throw new RestoreError(`restore target already exists: ${target} (use force to overwrite it)`);
  }
  // Through a symbolic link, the file it names is replaced (the link stays).
  const real = await fs.promises.realpath(target);
  for (const file of chain) {
    if ((await fs.promises.realpath(file)) === real) {
      throw new RestoreError(`restore target ${target} is part of the backup chain (${file})`);
    }
  }
  return FileSink.create(real, virtualSize, stat.mode & 0o7777);
}

/** Walks [0, virtualSize) by extents and copies it to the sink. */
async function copy(
  image: Qcow2Image,
  sink: Sink,
  virtualSize: number,
  chunkBytes: number,
  onProgress: RestoreOptions['onProgress'],
): Promise<{ dataBytes: number; zeroBytes: number }> {
  assert(virtualSize <= image.info().size, 'virtual size within the image');
  assert(virtualSize <= sink.size, 'virtual size within the target');
  const pipeline = new Pipeline(PIPELINE_DEPTH, chunkBytes);
  let dataBytes = 0;
  let zeroBytes = 0;
  let offset = 0;
  let lastProgress = 0;
  const progress = (final: boolean): void => {
    if (onProgress === undefined) return;
    const now = Date.now();
    if (!final && now - lastProgress < PROGRESS_INTERVAL_MS) return;
    lastProgress = now;
    onProgress({ doneBytes: offset, totalBytes: virtualSize, dataBytes });
  };
  try {
    while (offset < virtualSize) {
      const extents = await image.blockStatus(offset, virtualSize - offset, 0);
      assert(extents.length > 0, 'blockStatus answers with at least one extent');
      for (const extent of extents) {
        const end = Math.min(virtualSize, offset + extent.length);
        if (end <= offset) break;
        if ((extent.state & ExtentState.ZERO) !== 0) {
          const length = end - offset;
          const at = offset;
          await pipeline.run(undefined, () =>
            sink.writeZeroes(at, length).catch(targetError('zeroing', at, length)),
          );
          zeroBytes += length;
          offset = end;
          progress(false);
          continue;
        }
        while (offset < end) {
          // Chunks end on chunk-size boundaries, so requests stay aligned to the target's.
          const length = Math.min(end, offset - (offset % chunkBytes) + chunkBytes) - offset;
          const buf = await pipeline.buffer();
          const piece = buf.subarray(0, length);
          try {
            await image.read(piece, offset, 0);
          } catch (err) {
            throw new RestoreError(
              `reading the backup at offset ${offset} (${length} bytes): ${message(err)}`,
              [],
              err,
            );
          }
          const at = offset;
          await pipeline.run(buf, () =>
            sink.writeData(piece, at).catch(targetError('writing', at, length)),
          );
          dataBytes += length;
          offset += length;
          progress(false);
        }
      }
    }
    await pipeline.drain();
  } catch (err) {
    await pipeline.settle();
    throw err;
  }
  assert(offset === virtualSize, 'the walk covered the virtual size exactly');
  assert(dataBytes + zeroBytes === virtualSize, 'every byte is data or zeros');
  progress(true);
  return { dataBytes, zeroBytes };
}

function targetError(what: string, offset: number, length: number): (err: unknown) => never {
  return (err) => {
    throw new RestoreError(
      `${what} the target at offset ${offset} (${length} bytes): ${message(err)}`,
      [],
      err,
    );
  };
}

/**
 * Bounded concurrency for target writes: at most `depth` in flight, each data write holding
 * one of at most `depth` chunk buffers until it settles. The first failure is kept and
 * rethrown by the next call.
 */
class Pipeline {
  readonly #depth: number;
  readonly #chunkBytes: number;
  readonly #free: Buffer[] = [];
  #allocated = 0;
  readonly #inflight = new Set<Promise<void>>();
  #failure: { err: unknown } | undefined;

  constructor(depth: number, chunkBytes: number) {
    this.#depth = depth;
    this.#chunkBytes = chunkBytes;
  }

  /** A chunk buffer: a free one, a new one while fewer than `depth` exist, else the next freed. */
  async buffer(): Promise<Buffer> {
    for (;;) {
      this.#check();
      const free = this.#free.pop();
      if (free !== undefined) return free;
      if (this.#allocated < this.#depth) {
        this.#allocated++;
        return Buffer.allocUnsafe(this.#chunkBytes);
      }
      assert(this.#inflight.size > 0, 'every chunk buffer is held by a write in flight');
      await Promise.race(this.#inflight);
    }
  }

  /** Starts `op` once fewer than `depth` are in flight; `buf` is freed when it settles. */
  async run(buf: Buffer | undefined, op: () => Promise<void>): Promise<void> {
    while (this.#inflight.size >= this.#depth) {
      this.#check();
      await Promise.race(this.#inflight);
    }
    this.#check();
    const p: Promise<void> = op()
      .catch((err: unknown) => {
        this.#failure ??= { err };
      })
      .finally(() => {
        this.#inflight.delete(p);
        if (buf !== undefined) this.#free.push(buf);
      });
    this.#inflight.add(p);
  }

  /** Waits for every write; rejects with the first failure. */
  async drain(): Promise<void> {
    await this.settle();
    this.#check();
  }

  /** Waits for every write, ignoring failures (before cleaning up after one). */
  async settle(): Promise<void> {
    while (this.#inflight.size > 0) await Promise.all(this.#inflight);
  }

  #check(): void {
    if (this.#failure !== undefined) throw this.#failure.err;
  }
}

function openFd(file: string, flags: number, mode?: number): Promise<number> {
  return new Promise((resolve, reject) => {
    fs.open(file, flags, mode, (err, fd) => (err ? reject(err) : resolve(fd)));
  });
}

function ftruncate(fd: number, length: number): Promise<void> {
  return new Promise((resolve, reject) => {
    fs.ftruncate(fd, length, (err) => (err ? reject(err) : resolve()));
  });
}

function fchmod(fd: number, mode: number): Promise<void> {
  return new Promise((resolve, reject) => {
    fs.fchmod(fd, mode, (err) => (err ? reject(err) : resolve()));
  });
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

/**
 * A regular file, built as TARGET.partial: truncated to the virtual size (so zero ranges are
 * holes), data written, synced, renamed to TARGET, directory synced.
 */
class FileSink implements Sink {
  readonly kind = 'file' as const;
  readonly size: number;
  readonly #target: string;
  readonly #partial: string;
  readonly #replace: boolean;
  #fd: number | undefined;

  private constructor(target: string, partial: string, fd: number, size: number, replace: boolean) {
    this.#target = target;
    this.#partial = partial;
    this.#fd = fd;
    this.size = size;
    this.#replace = replace;
  }

  /** `mode`: that of the file being replaced, kept; undefined for a new file (0600). */
  static async create(target: string, size: number, mode: number | undefined): Promise<FileSink> {
    const partial = target + PARTIAL_SUFFIX;
    let fd: number;
    try {
      // A leftover TARGET.partial from an interrupted restore is replaced.
      fd = await openFd(
        partial,
        fs.constants.O_WRONLY | fs.constants.O_CREAT | fs.constants.O_TRUNC,
        0o600,
      );
    } catch (err) {
      throw new RestoreError(`cannot create restore target ${partial}: ${message(err)}`, [], err);
    }
    try {
      if (mode !== undefined) await fchmod(fd, mode);
      await ftruncate(fd, size);
    } catch (err) {
      await closeFd(fd).catch(() => undefined);
      await fs.promises.rm(partial, { force: true });
      throw new RestoreError(`cannot size restore target ${partial}: ${message(err)}`, [], err);
    }
    return new FileSink(target, partial, fd, size, mode !== undefined);
  }

  writeData(data: Buffer, offset: number): Promise<void> {
    assert(this.#fd !== undefined, 'file sink is open');
    assert(offset + data.length <= this.size, 'data write within the file');
    return pwriteFull(this.#fd, data, offset);
  }

  writeZeroes(offset: number, length: number): Promise<void> {
    // The file was created empty and truncated to size: the range is a hole already.
    assert(offset + length <= this.size, 'zero range within the file');
    return Promise.resolve();
  }

  async finish(): Promise<void> {
    const fd = this.#fd;
    assert(fd !== undefined, 'file sink is open');
    await fdatasync(fd);
    this.#fd = undefined;
    await closeFd(fd);
    if (!this.#replace && (await exists(this.#target))) {
      throw new RestoreError(`restore target appeared while restoring: ${this.#target}`);
    }
    await fs.promises.rename(this.#partial, this.#target);
    await fsyncDir(path.dirname(this.#target));
  }

  async abort(): Promise<void> {
    const fd = this.#fd;
    this.#fd = undefined;
    if (fd !== undefined) await closeFd(fd).catch(() => undefined);
    await fs.promises.rm(this.#partial, { force: true }).catch(() => undefined);
  }
}

/**
 * A block device, written in place: opened O_WRONLY | O_EXCL (Linux refuses that while the
 * device is mounted or otherwise held exclusively), zero ranges zeroed with
 * fallocate(FALLOC_FL_ZERO_RANGE) where the device offers it, else by writing zeros.
 */
class BlockDeviceSink implements Sink {
  readonly kind = 'block-device' as const;
  readonly size: number;
  readonly #fd: number;
  #closed = false;
  #canZeroRange = true;
  #zeros: Buffer | undefined;

  private constructor(fd: number, size: number) {
    this.#fd = fd;
    this.size = size;
  }

  static async open(
    device: string,
    virtualSize: number,
    notes: string[],
  ): Promise<BlockDeviceSink> {
    let fd: number;
    try {
      fd = await openFd(device, fs.constants.O_WRONLY | fs.constants.O_EXCL);
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      const why =
        code === 'EBUSY' ? 'it is in use (mounted or held open exclusively)' : message(err);
      throw new RestoreError(`cannot open block device ${device} for writing: ${why}`, [], err);
    }
    try {
      const size = blockDeviceSize(fd);
      checkTargetSize(device, 'block device', size, virtualSize, notes);
      return new BlockDeviceSink(fd, size);
    } catch (err) {
      await closeFd(fd).catch(() => undefined);
      throw err;
    }
  }

  writeData(data: Buffer, offset: number): Promise<void> {
    assert(offset + data.length <= this.size, 'data write within the device');
    return pwriteFull(this.#fd, data, offset);
  }

  async writeZeroes(offset: number, length: number): Promise<void> {
    assert(offset + length <= this.size, 'zero range within the device');
    const end = offset + length;
    // fallocate on a block device takes 512-byte aligned ranges; the edges are written.
    const alignedStart = Math.ceil(offset / 512) * 512;
    const alignedEnd = Math.floor(end / 512) * 512;
    if (this.#canZeroRange && alignedEnd > alignedStart) {
      try {
        await fallocate(
          this.#fd,
          FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE,
          alignedStart,
          alignedEnd - alignedStart,
        );
        await this.#writeZeros(offset, alignedStart);
        await this.#writeZeros(alignedEnd, end);
        return;
      } catch (err) {
        const code = (err as { code?: unknown }).code;
        if (!isUnsupported(err) && code !== 'EINVAL' && code !== 'ENODEV') throw err;
        this.#canZeroRange = false;
      }
    }
    await this.#writeZeros(offset, end);
  }

  async #writeZeros(from: number, to: number): Promise<void> {
    this.#zeros ??= Buffer.alloc(MIB);
    for (let at = from; at < to; at += this.#zeros.length) {
      await pwriteFull(
        this.#fd,
        this.#zeros.subarray(0, Math.min(this.#zeros.length, to - at)),
        at,
      );
    }
  }

  async finish(): Promise<void> {
    await fdatasync(this.#fd);
    this.#closed = true;
    await closeFd(this.#fd);
  }

  async abort(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    await closeFd(this.#fd).catch(() => undefined);
  }
}

function checkTargetSize(
  target: string,
  what: string,
  size: number,
  virtualSize: number,
  notes: string[],
): void {
  if (size < virtualSize) {
    throw new RestoreError(
      `${what} ${target} is too small: ${size} bytes, the backup needs ${virtualSize}`,
    );
  }
  if (size > virtualSize) {
    notes.push(
      `${what} ${target} is larger than the backup (${size} > ${virtualSize} bytes): ` +
        `only the first ${virtualSize} bytes were written`,
    );
  }
}

/** An NBD export, written in place: data with WRITE, zero ranges with WRITE_ZEROES, then FLUSH. */
class NbdSink implements Sink {
  readonly kind = 'nbd' as const;
  readonly size: number;
  readonly #client: NbdClient;
  readonly #target: string;
  readonly #notes: string[];
  #zeros: Buffer | undefined;

  private constructor(client: NbdClient, target: string, notes: string[]) {
    this.#client = client;
    this.size = client.size;
    this.#target = target;
    this.#notes = notes;
  }

  static async open(target: string, virtualSize: number, notes: string[]): Promise<NbdSink> {
    const uri = parseNbdUri(target);
    if (uri.tls) {
      throw new RestoreError(
        `${target}: NBD over TLS (nbds://) is not supported; use nbd:// or nbd+unix://`,
      );
    }
    let client: NbdClient;
    try {
      // Only allocation matters here, and none is asked: no meta contexts.
      client = await NbdClient.fromUri(target, { metaContexts: [] });
    } catch (err) {
      throw new RestoreError(`cannot connect to NBD export ${target}: ${message(err)}`, [], err);
    }
    try {
      if (client.has(TFlag.READ_ONLY)) {
        throw new RestoreError(`NBD export ${target} is read-only`);
      }
      checkTargetSize(target, 'NBD export', client.size, virtualSize, notes);
      if (!client.has(TFlag.SEND_WRITE_ZEROES)) {
        notes.push(`${target}: no write-zeroes support; zero ranges were written as zeros`);
      }
      if (!client.has(TFlag.SEND_FLUSH)) {
        notes.push(`${target}: the export cannot flush; durability is up to the server`);
      }
      return new NbdSink(client, target, notes);
    } catch (err) {
      await client.close();
      throw err;
    }
  }

  writeData(data: Buffer, offset: number): Promise<void> {
    assert(offset + data.length <= this.size, 'data write within the export');
    return this.#client.write(offset, data);
  }

  async writeZeroes(offset: number, length: number): Promise<void> {
    assert(offset + length <= this.size, 'zero range within the export');
    const end = offset + length;
    if (this.#client.has(TFlag.SEND_WRITE_ZEROES)) {
      for (let at = offset; at < end; at += MAX_NBD_ZERO_BYTES) {
        await this.#client.writeZeroes(at, Math.min(MAX_NBD_ZERO_BYTES, end - at));
      }
      return;
    }
    this.#zeros ??= Buffer.alloc(MIB);
    for (let at = offset; at < end; at += this.#zeros.length) {
      await this.#client.write(at, this.#zeros.subarray(0, Math.min(this.#zeros.length, end - at)));
    }
  }

  async finish(): Promise<void> {
    if (this.#client.has(TFlag.SEND_FLUSH)) await this.#client.flush();
    try {
      await this.#client.disconnect();
    } catch (err) {
      // Everything was written and flushed; a disconnect that ends untidily loses nothing.
      this.#notes.push(`${this.#target}: disconnect: ${message(err)}`);
    }
  }

  async abort(): Promise<void> {
    await this.#client.close().catch(() => undefined);
  }
}
