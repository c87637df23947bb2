/**
 * `mkdir -p` that always ends. Node's own recursive mkdir (sync and async alike, Node 20)
 * loops forever — burning the thread pool — when the kernel answers ENOENT for a directory
 * whose parent exists, as /proc and /sys do; a store path given by a user must never hang
 * the daemon. Bounded by the depth of the path.
 */
import fs from 'node:fs';
import { dirname, resolve } from 'node:path';

function missingParent(path: string): NodeJS.ErrnoException {
  const err: NodeJS.ErrnoException = new Error(
    `cannot create directory ${path}: the file system refuses it (ENOENT with its parent present)`,
  );
  err.code = 'ENOENT';
  err.path = path;
  return err;
}

/** Creates `path` and any missing parents (new ones get `mode`); resolves if it exists. */
export async function makeDirs(path: string, mode = 0o777): Promise<void> {
  const target = resolve(path);
  const missing: string[] = [];
  // Walk up to the first directory that exists, then create downwards.
  for (let dir = target; ; dir = dirname(dir)) {
    try {
      const st = await fs.promises.stat(dir);
      if (!st.isDirectory()) {
        const err: NodeJS.ErrnoException = new Error(`${dir} exists and is not a directory`);
        err.code = 'ENOTDIR';
        err.path = dir;
        throw err;
      }
      break;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT' || dirname(dir) === dir) throw err;
      missing.push(dir);
    }
  }
  for (const dir of missing.reverse()) {
    try {
      await fs.promises.mkdir(dir, { mode });
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === 'EEXIST') continue; // made meanwhile by someone else
      if (code === 'ENOENT') throw missingParent(dir);
      throw err;
    }
  }
}

/** The same, synchronously (for start-up paths). */
export function makeDirsSync(path: string, mode = 0o777): void {
  const target = resolve(path);
  const missing: string[] = [];
  for (let dir = target; ; dir = dirname(dir)) {
    try {
      if (!fs.statSync(dir).isDirectory()) {
        const err: NodeJS.ErrnoException = new Error(`${dir} exists and is not a directory`);
        err.code = 'ENOTDIR';
        err.path = dir;
        throw err;
      }
      break;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT' || dirname(dir) === dir) throw err;
      missing.push(dir);
    }
  }
  for (const dir of missing.reverse()) {
    try {
      fs.mkdirSync(dir, { mode });
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === 'EEXIST') continue;
      if (code === 'ENOENT') throw missingParent(dir);
      throw err;
    }
  }
}
