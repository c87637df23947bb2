/**
 * A device backed by a regular file or a block device, through its raw fd.
 *
 * Sparseness is used where the host has it: trim and writeZeroes punch holes, NO_HOLE zeroing
 * uses FALLOC_FL_ZERO_RANGE, blockStatus reads the file's map with SEEK_DATA/SEEK_HOLE. Where a
 * file system lacks an fallocate mode, the backend learns that once and stops asking.
 *
 * Direct mode (O_DIRECT) keeps the host page cache out of the way. It needs offsets and lengths
 * that are multiples of DIRECT_ALIGNMENT, which the backend advertises as its minimum block size
 * and enforces with EINVAL; buffers at unaligned addresses go through an aligned bounce buffer.
 */
import fs from 'node:fs';
import {
  DEFAULT_BLOCK_SIZE,
  ExtentState,
  MIB,
  RequestFlags,
  type BlockSizeLimits,
  type Device,
  type DeviceInfo,
  type Extent,
} from '../core/device.js';
import { DeviceError, toDeviceError } from '../core/errors.js';
import { allocAligned, isAligned } from './aligned.js';
import {
  checkRange,
  checkStatusRange,
  checkWriteRange,
  closedError,
  readOnlyError,
} from './checks.js';
import { closeFd, fdatasync, preadFull, pwriteFull } from './fdio.js';
import {
  FALLOC_FL_KEEP_SIZE,
  FALLOC_FL_PUNCH_HOLE,
  FALLOC_FL_ZERO_RANGE,
  SEEK_DATA,
  SEEK_HOLE,
  adviseWillNeed,
  blockDeviceSize,
  fallocate,
  isMemoryFileSystem,
  isUnsupported,
  lseek,
  preadNoWait,
  preadSync,
  pwriteSync,
  supportsNoWaitRead,
} from './libc.js';

export interface FileBackendOptions {
  readOnly?: boolean;
  /** Open with O_DIRECT: requests must then be DIRECT_ALIGNMENT-aligned. */
  direct?: boolean;
  /** Create the file as a sparse file of this size if it does not exist (kept if it does). */
  create?: { size: number };
}

/** Satisfies O_DIRECT on 512e and 4Kn disks and on the usual file systems alike. */
export const DIRECT_ALIGNMENT = 4096;

/** Fallback zeroing and direct-mode bounce copies go in pieces of this size. */
const CHUNK = MIB;
/** blockStatus answers with at most this many extents; the caller asks again for the rest. */
const MAX_EXTENTS = 1024;

const PUNCH = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE;
const ZERO_RANGE = FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE;
const HOLE_ZERO = ExtentState.HOLE | ExtentState.ZERO;

/** Shared by every backend and never written to; aligned so that direct mode can use it. */
let zeroChunk: Buffer | undefined;
function zeros(): Buffer {
  zeroChunk ??= allocAligned(CHUNK, DIRECT_ALIGNMENT).fill(0);
  return zeroChunk;
}

interface Opened {
  fd: number;
  size: number;
  blockDevice: boolean;
}

const RESOLVED = Promise.resolve();

/**
 * Reads and writes at least this long go to the thread pool even where they could run inline:
 * the copy to or from the page cache then overlaps with the event loop's own work (sending
 * replies, receiving the next payload) on the other core. Measured on tmpfs: 1 MiB reads and
 * writes gain a sixth to a third; 64 KiB requests gain nothing, as the hand-off costs what
 * the copy does.
 */
const INLINE_MAX = 256 * 1024;

/**
 * How reads and writes may skip the thread pool. A thread-pool round trip costs ten
 * microseconds or more; a call on the event loop's thread, a couple — but it must never wait
 * for a device, or every connection would wait with it.
 * - 'memory': the file lives in memory (tmpfs, ramfs): reads and writes run inline.
 * - 'nowait': reads try preadv2(RWF_NOWAIT) inline, which answers from the page cache or
 *   says EAGAIN at once; misses and all writes go to the thread pool.
 * - 'pool': everything goes to the thread pool (O_DIRECT, block devices, older kernels).
 */
type InlineIo = 'memory' | 'nowait' | 'pool';

function inlineIoFor(fd: number, opened: Opened, direct: boolean): InlineIo {
  if (direct || opened.blockDevice) return 'pool';
  if (isMemoryFileSystem(fd)) return 'memory';
  return supportsNoWaitRead(fd) ? 'nowait' : 'pool';
}

export class FileBackend implements Device {
  readonly path: string;
  readonly #fd: number;
  readonly #size: number;
  readonly #blockDevice: boolean;
  readonly #direct: boolean;
  readonly #info: DeviceInfo;
  readonly #inline: InlineIo;
  /** Cleared on the first EOPNOTSUPP, so an unsupporting file system costs one syscall. */
  #canPunch = true;
  #canZeroRange = true;
  /** Requests in flight; close() waits for them so no I/O ever runs on a recycled fd. */
  #inflight = 0;
  #drained: (() => void) | undefined;
  #closing: Promise<void> | undefined;

  private constructor(path: string, opened: Opened, readOnly: boolean, direct: boolean) {
    this.path = path;
    this.#inline = inlineIoFor(opened.fd, opened, direct);
    this.#fd = opened.fd;
    this.#size = opened.size;
    this.#blockDevice = opened.blockDevice;
    this.#direct = direct;
    const blockSize: BlockSizeLimits = direct
      ? {
          minimum: DIRECT_ALIGNMENT,
          preferred: DIRECT_ALIGNMENT,
          maximum: DEFAULT_BLOCK_SIZE.maximum,
        }
      : { ...DEFAULT_BLOCK_SIZE };
    this.#info = Object.freeze({
      size: opened.size,
      blockSize: Object.freeze(blockSize),
      caps: Object.freeze({
        readOnly,
        flush: true,
        fua: true,
        trim: true,
        zero: true,
        fastZero: true,
        cache: true,
        multiConn: true,
        rotational: false,
      }),
    });
  }

  static async open(path: string, options: FileBackendOptions = {}): Promise<FileBackend> {
    const { readOnly = false, direct = false, create } = options;
    if (create) await createSparse(path, create.size);
    const flags =
      (readOnly ? fs.constants.O_RDONLY : fs.constants.O_RDWR) |
      (direct ? fs.constants.O_DIRECT : 0);
    let fd: number;
    try {
      // Not fs.promises.open: an abandoned FileHandle closes its fd when garbage collected.
      fd = await new Promise<number>((resolve, reject) => {
        fs.open(path, flags, (err, n) => (err ? reject(err) : resolve(n)));
      });
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') {
        throw new Error(`file not found: ${path}`, { cause: err });
      }
      throw err;
    }
    try {
      const opened = await inspect(path, fd);
      if (direct && opened.size % DIRECT_ALIGNMENT !== 0) {
        throw new Error(
          `${path}: size ${opened.size} is not a multiple of ${DIRECT_ALIGNMENT}, needed for direct I/O`,
        );
      }
      return new FileBackend(path, opened, readOnly, direct);
    } catch (err) {
      await closeFd(fd);
      throw err;
    }
  }

  info(): DeviceInfo {
    return this.#info;
  }

  /** Which inline I/O path this file uses (see InlineIo); reported in status and logs. */
  get inlineIo(): InlineIo {
    return this.#inline;
  }

  read(buf: Buffer, offset: number, _flags: number): Promise<void> {
    if (this.#inline !== 'pool' && buf.length < INLINE_MAX && this.#closing === undefined) {
      let done: number;
      try {
        checkRange('read', offset, buf.length, this.#size);
        done = this.#readInline(buf, offset);
      } catch (err) {
        return Promise.reject(toDeviceError(err));
      }
      if (done === buf.length) return RESOLVED;
      // A page-cache miss: the rest comes from the thread pool.
      return this.#run('read', () => preadFull(this.#fd, buf.subarray(done), offset + done));
    }
    return this.#run('read', async () => {
      checkRange('read', offset, buf.length, this.#size);
      if (!this.#direct) return preadFull(this.#fd, buf, offset);
      this.#checkAligned('read', offset, buf.length);
      if (isAligned(buf, DIRECT_ALIGNMENT)) return preadFull(this.#fd, buf, offset);
      const bounce = allocAligned(Math.min(buf.length, CHUNK), DIRECT_ALIGNMENT);
      for (let done = 0; done < buf.length; done += bounce.length) {
        const piece = bounce.subarray(0, Math.min(bounce.length, buf.length - done));
        await preadFull(this.#fd, piece, offset + done);
        piece.copy(buf, done);
      }
    });
  }

  write(data: Buffer, offset: number, flags: number): Promise<void> {
    if (this.#inline === 'memory' && data.length < INLINE_MAX && this.#closing === undefined) {
      try {
        this.#checkWritable('write');
        checkWriteRange('write', offset, data.length, this.#size);
        for (let done = 0; done < data.length;) {
          const n = pwriteSync(this.#fd, done === 0 ? data : data.subarray(done), offset + done);
          if (n === 0) throw new DeviceError('EIO', `write at ${offset + done} made no progress`);
          done += n;
        }
      } catch (err) {
        return Promise.reject(toDeviceError(err));
      }
      return flags & RequestFlags.FUA ? this.#run('write', () => this.#fua(flags)) : RESOLVED;
    }
    return this.#run('write', async () => {
      this.#checkWritable('write');
      checkWriteRange('write', offset, data.length, this.#size);
      if (this.#direct) this.#checkAligned('write', offset, data.length);
      if (!this.#direct || isAligned(data, DIRECT_ALIGNMENT)) {
        await pwriteFull(this.#fd, data, offset);
      } else {
        const bounce = allocAligned(Math.min(data.length, CHUNK), DIRECT_ALIGNMENT);
        for (let done = 0; done < data.length; done += bounce.length) {
          const length = Math.min(bounce.length, data.length - done);
          data.copy(bounce, 0, done, done + length);
          await pwriteFull(this.#fd, bounce.subarray(0, length), offset + done);
        }
      }
      await this.#fua(flags);
    });
  }

  flush(_flags: number): Promise<void> {
    return this.#run('flush', () => fdatasync(this.#fd));
  }

  trim(offset: number, length: number, flags: number): Promise<void> {
    return this.#run('trim', async () => {
      this.#checkWritable('trim');
      checkRange('trim', offset, length, this.#size);
      // Trim is advisory: where holes can't be punched, doing nothing is a correct trim.
      if (length > 0 && this.#canPunch) {
        const [start, end] = this.#fallocateRange(offset, length);
        if (end > start && !(await this.#tryFallocate(PUNCH, start, end - start))) {
          this.#canPunch = false;
        }
      }
      await this.#fua(flags);
    });
  }

  writeZeroes(offset: number, length: number, flags: number): Promise<void> {
    return this.#run('writeZeroes', async () => {
      this.#checkWritable('writeZeroes');
      checkWriteRange('writeZeroes', offset, length, this.#size);
      if (this.#direct) this.#checkAligned('writeZeroes', offset, length);
      if (length === 0) return this.#fua(flags);
      const noHole = (flags & RequestFlags.NO_HOLE) !== 0;
      // fallocate takes only whole logical blocks on a block device; the edges are written.
      const [start, end] = this.#fallocateRange(offset, length);
      let zeroed = end === start;
      if (!zeroed) zeroed = await this.#zeroFast(start, end - start, noHole);
      if (!zeroed) {
        // Nothing has been modified yet, as FAST_ZERO requires.
        if (flags & RequestFlags.FAST_ZERO) {
          throw new DeviceError('ENOTSUP', 'writeZeroes: no fast zeroing on this file system');
        }
        await this.#writeZeroBuffers(start, end - start);
      }
      await this.#writeZeroBuffers(offset, start - offset);
      await this.#writeZeroBuffers(end, offset + length - end);
      await this.#fua(flags);
    });
  }

  cache(offset: number, length: number, _flags: number): Promise<void> {
    return this.#run('cache', async () => {
      checkRange('cache', offset, length, this.#size);
      if (length === 0) return;
      // A prefetch hint that fails changes nothing the client could observe.
      await adviseWillNeed(this.#fd, offset, length).catch(() => undefined);
    });
  }

  blockStatus(offset: number, length: number, flags: number): Promise<Extent[]> {
    return this.#run('blockStatus', async () => {
      checkStatusRange(offset, length, this.#size);
      // A block device has no map we can read: all of it counts as data.
      if (this.#blockDevice) return [{ length, state: 0 }];
      return this.#mapExtents(offset, offset + length, (flags & RequestFlags.REQ_ONE) !== 0);
    });
  }

  close(): Promise<void> {
    this.#closing ??= (async () => {
      if (this.#inflight > 0) await new Promise<void>((resolve) => (this.#drained = resolve));
      await closeFd(this.#fd);
    })();
    return this.#closing;
  }

  /** Reads what can be had without waiting; returns the bytes placed in `buf`. */
  #readInline(buf: Buffer, offset: number): number {
    if (this.#inline === 'nowait') return Math.max(0, preadNoWait(this.#fd, buf, offset));
    let done = 0;
    while (done < buf.length) {
      const n = preadSync(this.#fd, done === 0 ? buf : buf.subarray(done), offset + done);
      if (n === 0) {
        buf.fill(0, done); // past the end of a file that shrank under us
        return buf.length;
      }
      done += n;
    }
    return done;
  }

  /**
   * Extents of [offset, end) from the file's own map. Extents never reach past `end`: the
   * caller then need not trim them, and a REQ_ONE answer stays inside the request.
   */
  #mapExtents(offset: number, end: number, one: boolean): Extent[] {
    const extents: Extent[] = [];
    let pos = offset;
    while (pos < end && extents.length < MAX_EXTENTS && !(one && extents.length === 1)) {
      // ENXIO from SEEK_DATA: no data after pos, so a hole to the end (even past a short EOF).
      const data = this.#seek(pos, SEEK_DATA, this.#size);
      if (data > pos) {
        const holeEnd = Math.min(data, end);
        extents.push({ length: holeEnd - pos, state: HOLE_ZERO });
        pos = holeEnd;
        continue;
      }
      // The file may change under us; a hole that is not ahead of pos means "data up to end".
      const hole = this.#seek(pos, SEEK_HOLE, end);
      const dataEnd = hole > pos ? Math.min(hole, end) : end;
      extents.push({ length: dataEnd - pos, state: 0 });
      pos = dataEnd;
    }
    return extents;
  }

  /** lseek for SEEK_DATA/SEEK_HOLE; `ifNone` on ENXIO, and pos itself (data) if unsupported. */
  #seek(pos: number, whence: number, ifNone: number): number {
    try {
      return lseek(this.#fd, pos, whence);
    } catch (err) {
      if ((err as { code?: unknown }).code === 'ENXIO') return ifNone;
      // A file system without a readable map: call everything data, which is always true.
      return whence === SEEK_DATA ? pos : this.#size;
    }
  }

  /** Zeros with fallocate if this file system can; false (and nothing changed) if it can't. */
  async #zeroFast(offset: number, length: number, noHole: boolean): Promise<boolean> {
    // A punched hole reads as zeros and frees the space; NO_HOLE forbids exactly that.
    if (!noHole && this.#canPunch) {
      if (await this.#tryFallocate(PUNCH, offset, length)) return true;
      this.#canPunch = false;
    }
    if (this.#canZeroRange) {
      if (await this.#tryFallocate(ZERO_RANGE, offset, length)) return true;
      this.#canZeroRange = false;
    }
    return false;
  }

  /** fallocate that reports "unsupported" as false instead of throwing. */
  async #tryFallocate(mode: number, offset: number, length: number): Promise<boolean> {
    try {
      await fallocate(this.#fd, mode, offset, length);
      return true;
    } catch (err) {
      if (isUnsupported(err)) return false;
      throw err;
    }
  }

  async #writeZeroBuffers(offset: number, length: number): Promise<void> {
    const zero = zeros();
    for (let done = 0; done < length; done += zero.length) {
      const piece = Math.min(zero.length, length - done);
      await pwriteFull(this.#fd, zero.subarray(0, piece), offset + done);
    }
  }

  /**
   * The part of a range fallocate may be given: all of it for a file, the whole aligned blocks
   * inside it for a block device (which rejects partial logical blocks with EINVAL).
   */
  #fallocateRange(offset: number, length: number): [number, number] {
    if (!this.#blockDevice) return [offset, offset + length];
    const start = Math.ceil(offset / DIRECT_ALIGNMENT) * DIRECT_ALIGNMENT;
    const end = Math.floor((offset + length) / DIRECT_ALIGNMENT) * DIRECT_ALIGNMENT;
    return end > start ? [start, end] : [offset, offset];
  }

  async #fua(flags: number): Promise<void> {
    if (flags & RequestFlags.FUA) await fdatasync(this.#fd);
  }

  #checkWritable(op: string): void {
    if (this.#info.caps.readOnly) throw readOnlyError(op);
  }

  #checkAligned(op: string, offset: number, length: number): void {
    if (offset % DIRECT_ALIGNMENT !== 0 || length % DIRECT_ALIGNMENT !== 0) {
      throw new DeviceError(
        'EINVAL',
        `${op}: direct I/O needs ${DIRECT_ALIGNMENT}-aligned ranges, got ${offset}+${length}`,
      );
    }
  }

  /** Every request runs here: refused once closing, counted while in flight, errors mapped. */
  async #run<T>(op: string, fn: () => Promise<T>): Promise<T> {
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

/** Creates `path` as a sparse file of `size` bytes unless something is already there. */
async function createSparse(path: string, size: number): Promise<void> {
  if (!Number.isSafeInteger(size) || size < 0) {
    throw new RangeError(`create size must be a safe integer >= 0, got ${size}`);
  }
  let handle: fs.promises.FileHandle;
  try {
    handle = await fs.promises.open(path, 'wx');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'EEXIST') return;
    throw err;
  }
  try {
    await handle.truncate(size);
  } finally {
    await handle.close();
  }
}

async function inspect(path: string, fd: number): Promise<Opened> {
  const stat = await new Promise<fs.Stats>((resolve, reject) => {
    fs.fstat(fd, (err, s) => (err ? reject(err) : resolve(s)));
  });
  if (stat.isFile()) return { fd, size: stat.size, blockDevice: false };
  if (stat.isBlockDevice()) return { fd, size: blockDeviceSize(fd), blockDevice: true };
  throw new Error(`${path}: not a regular file or block device`);
}
