/**
 * The file operations the store needs beyond fdio.ts: the shared durable-file helpers
 * (src/core/durable-files.ts), growth with real allocation, and the store's lock file.
 */
import { join } from 'node:path';
import { closeFd, fdatasync } from '../../backends/fdio.js';
import { fallocate, isUnsupported } from '../../backends/libc.js';
import { ftruncateFd, takeLock } from '../../core/durable-files.js';

export {
  fstatSize,
  fsyncDir,
  fsyncFd,
  ftruncateFd,
  openFd,
  writeFileAtomic,
} from '../../core/durable-files.js';

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

const LOCK_FILE = 'lock';

/**
 * Takes the store's lock: a file naming the holding pid. A lock left by a process that died
 * (kill -9) is taken over; one held by a live process, or by this one, is refused.
 */
export function lockStore(dir: string): Promise<() => Promise<void>> {
  return takeLock(join(dir, LOCK_FILE), `store ${dir}`);
}
