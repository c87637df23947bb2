/**
 * Small durable-file helpers shared by every filter that keeps state on disk (snapshot
 * stores, change maps, WORM maps, audit logs): fd-level calls, atomic replacement of a small
 * file (temp + fsync + rename + fsync of the directory), and a lock file naming the holding
 * process, so that two daemons never open one state.
 */
import fs from 'node:fs';
import { join } from 'node:path';
import { closeFd, pwriteFull } from '../backends/fdio.js';

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

/** The file's content, or null if it does not exist. */
export async function readIfExists(path: string): Promise<Buffer | null> {
  try {
    return await fs.promises.readFile(path);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw err;
  }
}

/** Whether a process with this pid exists (signal 0 probes without sending anything). */
export function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** Lock files held in this process: one holder at a time, in process too. */
const heldHere = new Set<string>();

/**
 * Takes the lock file at `path` for this process: a lock left by a process that died
 * (kill -9) is taken over; one held by a live process, or already by this one, is refused
 * with a message naming `what`. Returns the release function.
 */
export async function takeLock(path: string, what: string): Promise<() => Promise<void>> {
  if (heldHere.has(path)) throw new Error(`${what} is already attached in this process`);
  const text = await readIfExists(path);
  const owner = text === null ? undefined : Number.parseInt(text.toString('utf8'), 10);
  if (
    owner !== undefined &&
    Number.isSafeInteger(owner) &&
    owner !== process.pid &&
    pidAlive(owner)
  )
    throw new Error(`${what} is in use by process ${owner}`);
  heldHere.add(path);
  try {
    await fs.promises.writeFile(path, `${process.pid}\n`, { mode: 0o600 });
  } catch (err) {
    heldHere.delete(path);
    throw err;
  }
  return async () => {
    heldHere.delete(path);
    await fs.promises.rm(path, { force: true });
  };
}
