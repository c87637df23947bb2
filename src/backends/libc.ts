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
const POSIX_FADV_DONTNEED = 4;
const PR_SET_IO_FLUSHER = 57;
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
  pread(fd: number, buf: Buffer, length: number, offset: number): number | bigint;
  pwrite(fd: number, buf: Buffer, length: number, offset: number): number | bigint;
  preadv2(fd: number, iov: Buffer, count: number, offset: number, flags: number): number | bigint;
  fstatfs(fd: number, out: Buffer): number;
  getsockopt(fd: number, level: number, name: number, value: Buffer, length: Buffer): number;
  setsockopt(fd: number, level: number, name: number, value: Buffer, length: number): number;
  prctl(option: number, a2: number, a3: number, a4: number, a5: number): number;
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
      pread: lib.func('int64_t pread64(int fd, void *buf, uint64_t count, int64_t offset)'),
      pwrite: lib.func('int64_t pwrite64(int fd, const void *buf, uint64_t count, int64_t offset)'),
      preadv2: lib.func(
        'int64_t preadv64v2(int fd, void *iov, int iovcnt, int64_t offset, int flags)',
      ),
      fstatfs: lib.func('int fstatfs64(int fd, void *buf)'),
      getsockopt: lib.func(
        'int getsockopt(int fd, int level, int optname, void *optval, void *optlen)',
      ),
      setsockopt: lib.func(
        'int setsockopt(int fd, int level, int optname, const void *optval, uint32_t optlen)',
      ),
      prctl: lib.func(
        'int prctl(int option, unsigned long a2, unsigned long a3, unsigned long a4, unsigned long a5)',
      ),
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

/**
 * posix_fadvise(2) DONTNEED over the whole file: drops its clean cached pages. For a block
 * device, whose page cache other users (device-mapper) bypass, so that it holds nothing stale.
 */
export function dropPageCache(fd: number): Promise<void> {
  const { posixFadvise } = load();
  return new Promise((resolve, reject) => {
    posixFadvise.async(fd, 0, 0, POSIX_FADV_DONTNEED, (err, result) => {
      if (err) reject(err);
      else if (result !== 0) reject(new SysError('posix_fadvise', result));
      else resolve();
    });
  });
}

/**
 * prctl(PR_SET_IO_FLUSHER): the kernel treats this process as part of the I/O path (memory
 * reclaim does not wait on it for I/O it must itself serve). Linux 5.6+, CAP_SYS_RESOURCE.
 */
export function setIoFlusher(): void {
  if (load().prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) !== 0)
    throw new SysError('prctl(PR_SET_IO_FLUSHER)', koffi.errno());
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

/** preadv2 flag: fail with EAGAIN instead of waiting for the device (page-cache hits only). */
const RWF_NOWAIT = 0x08;
const EAGAIN = constants.errno.EAGAIN;

/** One iovec, reused: calls on the main thread never overlap. */
const iov = Buffer.alloc(16);

/**
 * Synchronous calls on the event loop's thread, for the cases where they cannot wait for a
 * device: they cost a couple of microseconds where a thread-pool round trip costs ten or more.
 * Each returns the byte count, or -1 when the data is not at hand without waiting (NOWAIT).
 */
export function preadNoWait(fd: number, buf: Buffer, offset: number): number {
  iov.writeBigUInt64LE(BigInt(koffi.address(buf)), 0);
  iov.writeBigUInt64LE(BigInt(buf.length), 8);
  const n = Number(load().preadv2(fd, iov, 1, offset, RWF_NOWAIT));
  if (n >= 0) return n;
  const errnum = koffi.errno();
  if (errnum === EAGAIN) return -1;
  throw new SysError('preadv2', errnum);
}

/** pread(2) on the main thread: only for files whose pages live in memory (tmpfs). */
export function preadSync(fd: number, buf: Buffer, offset: number): number {
  const n = Number(load().pread(fd, buf, buf.length, offset));
  if (n < 0) throw new SysError('pread', koffi.errno());
  return n;
}

/** pwrite(2) on the main thread: only for files whose pages live in memory (tmpfs). */
export function pwriteSync(fd: number, data: Buffer, offset: number): number {
  const n = Number(load().pwrite(fd, data, data.length, offset));
  if (n < 0) throw new SysError('pwrite', koffi.errno());
  return n;
}

const TMPFS_MAGIC = 0x01021994;
const RAMFS_MAGIC = 0x858458f6;

/** True when the file's data lives in memory (tmpfs, ramfs): its I/O never waits for a device. */
export function isMemoryFileSystem(fd: number): boolean {
  const out = Buffer.alloc(128); // struct statfs64; f_type is its first field
  if (load().fstatfs(fd, out) !== 0) return false;
  const type = Number(out.readBigInt64LE(0));
  return type === TMPFS_MAGIC || type === RAMFS_MAGIC;
}

/** Whether NOWAIT reads work on this fd (they need kernel and file-system support). */
export function supportsNoWaitRead(fd: number): boolean {
  try {
    preadNoWait(fd, Buffer.alloc(1), 0);
    return true;
  } catch {
    return false;
  }
}

const SOL_SOCKET = 1;
const SO_SNDBUF = 7;
const SO_PEERCRED = 17;

/**
 * The process at the other end of a unix socket, as the kernel recorded it when the
 * connection was made (SO_PEERCRED): who a client is, for rules and logs.
 */
export function peerCredentials(fd: number): { pid: number; uid: number; gid: number } {
  const cred = Buffer.alloc(12); // struct ucred { pid_t pid; uid_t uid; gid_t gid; }
  const len = Buffer.alloc(4);
  len.writeUInt32LE(cred.length, 0);
  if (load().getsockopt(fd, SOL_SOCKET, SO_PEERCRED, cred, len) !== 0)
    throw new SysError('getsockopt', koffi.errno());
  return { pid: cred.readInt32LE(0), uid: cred.readUInt32LE(4), gid: cred.readUInt32LE(8) };
}

/**
 * Asks for a socket send buffer of `bytes` (SO_SNDBUF; the kernel caps it at
 * net.core.wmem_max and doubles it for its own bookkeeping). Returns whether it was taken.
 */
export function setSendBuffer(fd: number, bytes: number): boolean {
  const value = Buffer.alloc(4);
  value.writeInt32LE(bytes, 0);
  return load().setsockopt(fd, SOL_SOCKET, SO_SNDBUF, value, 4) === 0;
}
