/** The benchmark's export file: one sparse file filled with data, removed at exit. */
import { closeSync, existsSync, ftruncateSync, openSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { removeAtExit, run } from './proc.js';

/** A message that must not be missed in the output (a skipped server, a slower medium). */
export function loud(message: string): void {
  const bar = '!'.repeat(Math.min(100, message.length + 4));
  process.stderr.write(`\n${bar}\n! ${message}\n${bar}\n\n`);
}

/**
 * Creates the export file in /dev/shm (or `dir`) and fills it with fio's pseudo-random data,
 * so that no server reads holes that a file system answers without touching memory.
 */
export async function createFile(
  sizeBytes: number,
  dir: string | undefined,
  name = 'devfilter-bench',
): Promise<{ path: string; filledWith: string }> {
  const base = dir ?? (existsSync('/dev/shm') ? '/dev/shm' : tmpdir());
  if (dir === undefined && base !== '/dev/shm')
    loud(`/dev/shm is missing: the export file goes to ${base}, so numbers are not comparable`);
  const path = join(base, `${name}-${process.pid}.img`);
  removeAtExit(path);
  const fd = openSync(path, 'w');
  ftruncateSync(fd, sizeBytes);
  closeSync(fd);
  const args = [
    '--name=fill',
    '--ioengine=psync',
    '--rw=write',
    '--bs=1M',
    `--size=${sizeBytes}`,
    `--filename=${path}`,
    '--output-format=terse',
  ];
  const r = await run('fio', args, { timeoutMs: 120_000 });
  if (r.code !== 0) throw new Error(`filling ${path} failed: ${r.stderr.trim()}`);
  return { path, filledWith: `fio ${args.slice(0, -2).join(' ')} (fio's pseudo-random buffers)` };
}
