import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { toDeviceError } from '../../src/core/errors.js';
import {
  FALLOC_FL_KEEP_SIZE,
  FALLOC_FL_PUNCH_HOLE,
  FALLOC_FL_ZERO_RANGE,
  SEEK_DATA,
  SEEK_HOLE,
  blockDeviceSize,
  fallocate,
  isUnsupported,
  lseek,
} from '../../src/backends/libc.js';

/** Runs `fn` with an fd on a fresh file of `size` bytes under `base`, then cleans up. */
async function withFile(base: string, size: number, fn: (fd: number) => Promise<void>) {
  const path = join(base, `devfilter-libc-${process.pid}-${Math.random().toString(36).slice(2)}`);
  fs.writeFileSync(path, Buffer.alloc(size, 1));
  const fd = fs.openSync(path, 'r+');
  try {
    await fn(fd);
  } finally {
    fs.closeSync(fd);
    fs.rmSync(path, { force: true });
  }
}

describe('libc bindings', () => {
  it('report failures like Node, with the errno of the failing call', async () => {
    assert.throws(() => lseek(-1, 0, SEEK_DATA), { code: 'EBADF', syscall: 'lseek' });
    // The async path: errno comes from the worker thread that ran the call.
    await assert.rejects(fallocate(-1, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 4096), {
      name: 'SysError',
      code: 'EBADF',
      syscall: 'fallocate',
    });
  });

  it('find data and holes with lseek', async () => {
    await withFile(os.tmpdir(), 1 << 20, async (fd) => {
      await fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 1 << 19);
      assert.equal(lseek(fd, 0, SEEK_DATA), 1 << 19);
      assert.equal(lseek(fd, 1 << 19, SEEK_HOLE), 1 << 20);
      assert.throws(() => lseek(fd, 1 << 20, SEEK_DATA), { code: 'ENXIO' });
      // Not a block device: the size comes from the end of the file.
      assert.equal(blockDeviceSize(fd), 1 << 20);
    });
  });

  it('name an unsupported mode EOPNOTSUPP, which maps to ENOTSUP', async (t) => {
    if (!fs.existsSync('/dev/shm')) return t.skip('no /dev/shm');
    // tmpfs has no FALLOC_FL_ZERO_RANGE.
    await withFile('/dev/shm', 8192, async (fd) => {
      const err = await fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 0, 4096).then(
        () => assert.fail('ZERO_RANGE succeeded on tmpfs'),
        (e: unknown) => e,
      );
      assert.equal((err as { code?: string }).code, 'EOPNOTSUPP');
      assert.ok(isUnsupported(err));
      assert.equal(toDeviceError(err).errno, 'ENOTSUP');
    });
  });
});
