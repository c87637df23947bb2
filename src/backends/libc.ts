/**
 * The few Linux calls Node's fs lacks (fallocate, SEEK_DATA/SEEK_HOLE, BLKGETSIZE64,
 * posix_fadvise), bound through koffi. glibc is loaded on first use, not at import, so merely
 * importing a backend works on a host without it; the first call then fails clearly.
 *
 * Failures throw a SysError shaped like Node's own (`code` such as 'ENXIO' or 'EOPNOTSUPP',
 * negative `errno`, `syscall`), so toDeviceError() folds them like any fs error.
 */
import koffi from 'koffi';
import { constants } from 'node:os';

export const FALLOC_FL_KEEP_SIZE = 0x01;
export const FALLOC_FL_PUNCH_HOLE = 0x02;
export const FALLOC_FL_ZERO_RANGE = 0x10;

export const SEEK_END = 2;
export const SEEK_DATA = 3;
export const SEEK_HOLE = 4;

const POSIX_FADV_WILLNEED = 3;
/** _IOR(0x12, 114, size_t) on 64-bit Linux. */
const BLKGETSIZE64 = 0x80081272;

export class SysError extends Error {
  readonly code: string;
  readonly errno: number;
  readonly syscall: string;

  constructor(syscall: string, errnum: number) {
    const code = errnoName(errnum);
    super(`${syscall} failed: ${code} (errno ${errnum})`);
    this.name = 'SysError';
    this.code = code;
    this.errno = -errnum;
    this.syscall = syscall;
  }
}

/** True for the "this file system or device can't do that" answers of fallocate. */
export function isUnsupported(err: unknown): boolean {
  const code = (err as { code?: unknown } | null)?.code;
  return code === 'EOPNOTSUPP' || code === 'ENOTSUP';
}

let errnoNames: Map<number, string> | undefined;

function errnoName(errnum: number): string {
  if (!errnoNames) {
    errnoNames = new Map();
    for (const [name, value] of Object.entries(constants.errno)) {
      if (!errnoNames.has(value)) errnoNames.set(value, name);
    }
    // Aliases share a number; name it as the kernel does (ENOTSUP is EOPNOTSUPP on Linux).
    for (const name of ['EOPNOTSUPP', 'EAGAIN'] as const) {
      errnoNames.set(constants.errno[name], name);
    }
  }
  return errnoNames.get(errnum) ?? `errno ${errnum}`;
}

type Callback<T> = (err: unknown, result: T) => void;

interface Libc {
  fallocate: {
    async(fd: number, mode: number, offset: number, length: number, cb: Callback<number>): void;
  };
  posixFadvise: {
    async(fd: number, offset: number, length: number, advice: number, cb: Callback<number>): void;
  };
  lseek(fd: number, offset: number, whence: number): number | bigint;
  ioctl(fd: number, request: number, type: string, arg: Buffer): number;
}

let libc: Libc | undefined;

function load(): Libc {
  if (!libc) {
    const lib = koffi.load('libc.so.6');
    // The *64 names take a 64-bit off_t on every architecture (aliases on 64-bit ones).
    libc = {
      fallocate: lib.func('int fallocate64(int fd, int mode, int64_t offset, int64_t len)'),
      posixFadvise: lib.func(
        'int posix_fadvise64(int fd, int64_t offset, int64_t len, int advice)',
      ),
      lseek: lib.func('int64_t lseek64(int fd, int64_t offset, int whence)'),
      ioctl: lib.func('int ioctl(int fd, unsigned long request, ...)'),
    };
  }
  return libc;
}

/**
 * fallocate(2) on a worker thread: punching or zeroing a large range can take a while, and the
 * event loop must not wait for it. koffi restores the worker's errno around the callback.
 */
export function fallocate(fd: number, mode: number, offset: number, length: number): Promise<void> {
  const { fallocate: fn } = load();
  return new Promise((resolve, reject) => {
    fn.async(fd, mode, offset, length, (err, result) => {
      const errnum = koffi.errno();
      if (err) reject(err);
      else if (result !== 0) reject(new SysError('fallocate', errnum));
      else resolve();
    });
  });
}

/** posix_fadvise(2) WILLNEED: starts readahead, which may block, hence the worker thread. */
export function adviseWillNeed(fd: number, offset: number, length: number): Promise<void> {
  const { posixFadvise } = load();
  return new Promise((resolve, reject) => {
    posixFadvise.async(fd, offset, length, POSIX_FADV_WILLNEED, (err, result) => {
      // posix_fadvise returns the error number instead of setting errno.
      if (err) reject(err);
      else if (result !== 0) reject(new SysError('posix_fadvise', result));
      else resolve();
    });
  });
}

/** lseek(2), synchronous: SEEK_DATA/SEEK_HOLE only consult the extent map. */
export function lseek(fd: number, offset: number, whence: number): number {
  const result = Number(load().lseek(fd, offset, whence));
  if (result < 0) throw new SysError('lseek', koffi.errno());
  return result;
}

/** Size of a block device in bytes: BLKGETSIZE64, or the end offset if that ioctl fails. */
export function blockDeviceSize(fd: number): number {
  const out = Buffer.alloc(8);
  if (load().ioctl(fd, BLKGETSIZE64, 'void *', out) === 0) {
    return Number(out.readBigUInt64LE(0));
  }
  return lseek(fd, 0, SEEK_END);
}
