/**
 * The few file operations the store needs beyond fdio.ts: opening by fd, atomic replacement
 * of a small file (temp + fsync + rename + fsync of the directory), directory fsync, growth
 * with real allocation, and a lock file that keeps two daemons off one store.
 */
import fs from 'node:fs';
import { join } from 'node:path';
import { closeFd, fdatasync, pwriteFull } from '../../backends/fdio.js';
import { fallocate, isUnsupported } from '../../backends/libc.js';

export function openFd(path: string, flags: number, mode = 0o600): Promise<number> {
  return new Promise((resolve, reject) =>
    fs.open(path, flags, mode, (err, fd) => (err ? reject(err) : resolve(fd))),
  );
}

export function fstatSize(fd: number): Promise<number> {
  return new Promise((resolve, reject) =>
    fs.fstat(fd, (err, st) => (err ? reject(err) : resolve(st.size))),
  );
}

export function fsyncFd(fd: number): Promise<void> {
  return new Promise((resolve, reject) => fs.fsync(fd, (err) => (err ? reject(err) : resolve())));
}

export function ftruncateFd(fd: number, size: number): Promise<void> {
  return new Promise((resolve, reject) =>
    fs.ftruncate(fd, size, (err) => (err ? reject(err) : resolve())),
  );
}

/** Makes a rename or a file creation in `dir` durable. */
export async function fsyncDir(dir: string): Promise<void> {
  const fd = await openFd(dir, fs.constants.O_RDONLY | fs.constants.O_DIRECTORY);
  try {
    await fsyncFd(fd);
  } finally {
    await closeFd(fd);
  }
}

/** Replaces `dir/name` with `data` so that a crash leaves the old or the new file, whole. */
export async function writeFileAtomic(dir: string, name: string, data: Buffer): Promise<void> {
  const tmp = join(dir, `${name}.tmp`);
  const fd = await openFd(tmp, fs.constants.O_WRONLY | fs.constants.O_CREAT | fs.constants.O_TRUNC);
  try {
    await pwriteFull(fd, data, 0);
    await fsyncFd(fd);
  } finally {
    await closeFd(fd);
  }
  await fs.promises.rename(tmp, join(dir, name));
  await fsyncDir(dir);
}

/**
 * Grows a file to `size` bytes with its blocks allocated, so that running out of host space
 * shows here (where it is an overflow) rather than in a later write of copied data.
 */
export async function growFile(fd: number, from: number, size: number): Promise<void> {
  if (size <= from) return;
  try {
    await fallocate(fd, 0, from, size - from);
  } catch (err) {
    if (!isUnsupported(err)) throw err;
    await ftruncateFd(fd, size); // a file system without fallocate: sparse growth
  }
}

export { closeFd, fdatasync };

/** Whether a process with this pid exists (signal 0 probes without sending anything). */
function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

const LOCK_FILE = 'lock';
/** Stores this process holds, by directory: one holder at a time, in process too. */
const heldHere = new Set<string>();

/**
 * Takes the store's lock: a file naming the holding pid. A lock left by a process that died
 * (kill -9) is taken over; one held by a live process, or by this one, is refused.
 */
export async function lockStore(dir: string): Promise<() => Promise<void>> {
  if (heldHere.has(dir)) throw new Error(`store ${dir} is already attached in this process`);
  const path = join(dir, LOCK_FILE);
  let owner: number | undefined;
  try {
    owner = Number.parseInt(await fs.promises.readFile(path, 'utf8'), 10);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
  }
  if (owner !== undefined && Number.isSafeInteger(owner) && owner !== process.pid && alive(owner)) {
    throw new Error(`store ${dir} is in use by process ${owner}`);
  }
  await fs.promises.writeFile(path, `${process.pid}\n`);
  heldHere.add(dir);
  return async () => {
    heldHere.delete(dir);
    await fs.promises.rm(path, { force: true });
  };
}
