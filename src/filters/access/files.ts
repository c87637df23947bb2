/**
 * Durable-file helpers of the access filter's state (the same patterns as the cbt store:
 * atomic replace with temp + fsync + rename + fsync of the directory, and a pid lock file).
 */
import fs from 'node:fs';
import { join } from 'node:path';
import { closeFd, pwriteFull } from '../../backends/fdio.js';

export function openFd(path: string, flags: number, mode = 0o600): Promise<number> {
  return new Promise((resolve, reject) =>
    fs.open(path, flags, mode, (err, fd) => (err ? reject(err) : resolve(fd))),
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

export async function fsyncDir(dir: string): Promise<void> {
  const fd = await openFd(dir, fs.constants.O_RDONLY | fs.constants.O_DIRECTORY);
  try {
    await fsyncFd(fd);
  } finally {
    await closeFd(fd);
  }
}

/** Replaces dir/name with data: a crash leaves the old or the new file, whole. */
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

export async function readIfExists(path: string): Promise<Buffer | null> {
  try {
    return await fs.promises.readFile(path);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw err;
  }
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** Paths held in this process (one holder at a time, in process too). */
const heldHere = new Set<string>();

/**
 * Takes `path` (a lock file) for this process: refused while another live process, or another
 * holder in this one, has it. Returns the release function.
 */
export async function takeLock(path: string, what: string): Promise<() => Promise<void>> {
  if (heldHere.has(path)) throw new Error(`${what} is already in use in this process`);
  const text = await readIfExists(path);
  const owner = text === null ? undefined : Number.parseInt(text.toString('utf8'), 10);
  if (owner !== undefined && Number.isSafeInteger(owner) && owner !== process.pid && alive(owner))
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
