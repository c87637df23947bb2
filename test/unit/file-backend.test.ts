import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it, type TestContext } from 'node:test';
import { DEFAULT_BLOCK_SIZE, MIB, RequestFlags } from '../../src/core/device.js';
import { DIRECT_ALIGNMENT, FileBackend } from '../../src/backends/file.js';
import { DATA, HOLE_ZERO, deviceError, dirty, isZero, pattern } from './helpers.js';

const { FUA, NO_HOLE, FAST_ZERO, REQ_ONE } = RequestFlags;
const SIZE = 4 * MIB;

let dir: string;
let counter = 0;

before(() => {
  dir = fs.mkdtempSync(join(os.tmpdir(), 'devfilter-file-'));
});
after(() => {
  fs.rmSync(dir, { recursive: true, force: true });
});

/** A fresh path under the test directory, or under `base` (for a particular file system). */
function tempPath(base = dir): string {
  return join(base, `disk-${process.pid}-${counter++}.img`);
}

/** Allocated bytes of a file as the file system counts them (st_blocks is in 512-byte units). */
function allocated(path: string): number {
  return fs.statSync(path).blocks * 512;
}

async function openFilled(path = tempPath()): Promise<FileBackend> {
  const dev = await FileBackend.open(path, { create: { size: SIZE } });
  await dev.write(pattern(SIZE, 3), 0, 0);
  await dev.flush(0);
  return dev;
}

async function readRange(dev: FileBackend, offset: number, length: number): Promise<Buffer> {
  const buf = dirty(length);
  await dev.read(buf, offset, 0);
  return buf;
}

describe('FileBackend: opening', () => {
  it('creates a sparse file of the given size', async () => {
    const path = tempPath();
    const dev = await FileBackend.open(path, { create: { size: SIZE } });
    try {
      assert.equal(fs.statSync(path).size, SIZE);
      assert.equal(allocated(path), 0);
      assert.equal(dev.info().size, SIZE);
      assert.deepEqual(dev.info().blockSize, DEFAULT_BLOCK_SIZE);
      assert.equal(dev.info().caps.readOnly, false);
      assert.equal(dev.info().caps.fastZero, true);
      assert.deepEqual(await dev.blockStatus(0, SIZE, 0), [{ length: SIZE, state: HOLE_ZERO }]);
      assert.ok(isZero(await readRange(dev, 0, SIZE)));
    } finally {
      await dev.close();
    }
  });

  it('keeps an existing file when asked to create it', async () => {
    const path = tempPath();
    fs.writeFileSync(path, pattern(8192));
    const dev = await FileBackend.open(path, { create: { size: SIZE } });
    try {
      assert.equal(dev.info().size, 8192);
      assert.deepEqual(await readRange(dev, 0, 8192), pattern(8192));
    } finally {
      await dev.close();
    }
  });

  it('reports a missing file clearly', async () => {
    const path = tempPath();
    await assert.rejects(FileBackend.open(path), { message: `file not found: ${path}` });
  });

  it('refuses a directory', async () => {
    await assert.rejects(FileBackend.open(dir, { readOnly: true }), /not a regular file/);
  });
});

describe('FileBackend: data', () => {
  it('round-trips unaligned writes across block boundaries', async () => {
    const dev = await FileBackend.open(tempPath(), { create: { size: SIZE } });
    try {
      const data = pattern(3 * 4096 + 777, 9);
      const offset = 4096 - 123;
      await dev.write(data, offset, 0);
      assert.deepEqual(await readRange(dev, offset, data.length), data);
      const around = await readRange(dev, offset - 1000, data.length + 2000);
      assert.ok(isZero(around.subarray(0, 1000)));
      assert.deepEqual(around.subarray(1000, 1000 + data.length), data);
      assert.ok(isZero(around.subarray(1000 + data.length)));
      // Beyond what was written the device reads zeros, right up to its end.
      assert.ok(isZero(await readRange(dev, SIZE - 5000, 5000)));
    } finally {
      await dev.close();
    }
  });

  it('reads zeros and reports a hole past a file that shrank under it', async () => {
    const path = tempPath();
    const dev = await FileBackend.open(path, { create: { size: SIZE } });
    try {
      await dev.write(pattern(SIZE), 0, 0);
      fs.truncateSync(path, SIZE - MIB);
      const tail = await readRange(dev, SIZE - MIB - 100, MIB + 100);
      assert.deepEqual(tail.subarray(0, 100), pattern(SIZE).subarray(SIZE - MIB - 100, SIZE - MIB));
      assert.ok(isZero(tail.subarray(100)));
      assert.deepEqual(await dev.blockStatus(SIZE - 2 * MIB, 2 * MIB, 0), [
        { length: MIB, state: DATA },
        { length: MIB, state: HOLE_ZERO },
      ]);
    } finally {
      await dev.close();
    }
  });

  it('writes with FUA, flushes and caches', async () => {
    const dev = await FileBackend.open(tempPath(), { create: { size: SIZE } });
    try {
      await dev.write(pattern(5000, 4), 10, FUA);
      await dev.writeZeroes(100, 50, FUA);
      await dev.trim(MIB, MIB, FUA);
      await dev.flush(0);
      await dev.cache(0, SIZE, 0);
      const expected = pattern(5000, 4);
      expected.fill(0, 90, 140);
      assert.deepEqual(await readRange(dev, 10, 5000), expected);
    } finally {
      await dev.close();
    }
  });
});

describe('FileBackend: sparseness', () => {
  it('trim punches a hole that blockStatus reports', async () => {
    const path = tempPath();
    const dev = await openFilled(path);
    try {
      const before = allocated(path);
      assert.ok(before >= SIZE, `expected ${SIZE} bytes allocated, have ${before}`);
      await dev.trim(MIB, MIB, 0);
      assert.ok(allocated(path) <= before - MIB, `trim freed only ${before - allocated(path)}`);
      assert.deepEqual(await dev.blockStatus(0, SIZE, 0), [
        { length: MIB, state: DATA },
        { length: MIB, state: HOLE_ZERO },
        { length: 2 * MIB, state: DATA },
      ]);
      // Data on either side of the hole is intact.
      assert.deepEqual(await readRange(dev, 0, MIB), pattern(SIZE, 3).subarray(0, MIB));
      assert.deepEqual(
        await readRange(dev, 2 * MIB, MIB),
        pattern(SIZE, 3).subarray(2 * MIB, 3 * MIB),
      );
    } finally {
      await dev.close();
    }
  });

  it('blockStatus starts exactly at the offset and stays inside the request', async () => {
    const dev = await openFilled();
    try {
      await dev.trim(MIB, MIB, 0);
      const half = MIB / 2;
      assert.deepEqual(await dev.blockStatus(MIB + half, MIB, 0), [
        { length: half, state: HOLE_ZERO },
        { length: half, state: DATA },
      ]);
      assert.deepEqual(await dev.blockStatus(100, 10, 0), [{ length: 10, state: DATA }]);
      assert.deepEqual(await dev.blockStatus(MIB + half, MIB, REQ_ONE), [
        { length: half, state: HOLE_ZERO },
      ]);
      assert.deepEqual(await dev.blockStatus(0, SIZE, REQ_ONE), [{ length: MIB, state: DATA }]);
    } finally {
      await dev.close();
    }
  });

  it('blockStatus returns at most 1024 extents', async () => {
    const dev = await FileBackend.open(tempPath(), { create: { size: SIZE } });
    try {
      // Data in every other 4 KiB block: 1024 data and 1024 hole extents in all.
      const block = pattern(4096);
      for (let at = 0; at < SIZE; at += 8192) await dev.write(block, at, 0);
      const extents = await dev.blockStatus(0, SIZE, 0);
      assert.equal(extents.length, 1024);
      extents.forEach((e, i) =>
        assert.deepEqual(e, { length: 4096, state: i % 2 ? HOLE_ZERO : DATA }),
      );
    } finally {
      await dev.close();
    }
  });

  it('writeZeroes without NO_HOLE punches a hole', async () => {
    const path = tempPath();
    const dev = await openFilled(path);
    try {
      const before = allocated(path);
      await dev.writeZeroes(MIB + 1000, 2 * MIB, 0);
      assert.ok(allocated(path) < before - MIB, 'expected blocks to be freed');
      const back = await readRange(dev, MIB, 2 * MIB + 2000);
      assert.deepEqual(back.subarray(0, 1000), pattern(SIZE, 3).subarray(MIB, MIB + 1000));
      assert.ok(isZero(back.subarray(1000, 1000 + 2 * MIB)));
      assert.deepEqual(
        back.subarray(1000 + 2 * MIB),
        pattern(SIZE, 3).subarray(3 * MIB + 1000, 3 * MIB + 2000),
      );
    } finally {
      await dev.close();
    }
  });

  it('writeZeroes with NO_HOLE zeros but keeps the blocks allocated', async () => {
    const path = tempPath();
    const dev = await openFilled(path);
    try {
      const before = allocated(path);
      await dev.writeZeroes(MIB - 10, 2 * MIB + 20, NO_HOLE);
      assert.ok(allocated(path) >= before, `blocks freed: ${before} -> ${allocated(path)}`);
      const back = await readRange(dev, MIB - 20, 2 * MIB + 40);
      assert.deepEqual(back.subarray(0, 10), pattern(SIZE, 3).subarray(MIB - 20, MIB - 10));
      assert.ok(isZero(back.subarray(10, 10 + 2 * MIB + 20)));
      assert.deepEqual(
        back.subarray(30 + 2 * MIB),
        pattern(SIZE, 3).subarray(3 * MIB + 10, 3 * MIB + 20),
      );
    } finally {
      await dev.close();
    }
  });

  it('FAST_ZERO zeros where fallocate can', async () => {
    const dev = await openFilled();
    try {
      await dev.writeZeroes(0, MIB, FAST_ZERO);
      await dev.writeZeroes(MIB, MIB, FAST_ZERO | NO_HOLE);
      assert.ok(isZero(await readRange(dev, 0, 2 * MIB)));
    } finally {
      await dev.close();
    }
  });
});

/** tmpfs punches holes but has no FALLOC_FL_ZERO_RANGE: the NO_HOLE fallbacks run there. */
describe('FileBackend: on a file system without ZERO_RANGE', () => {
  function shmPath(t: TestContext): string | undefined {
    const shm = '/dev/shm';
    if (!fs.existsSync(shm)) {
      t.skip('no /dev/shm');
      return undefined;
    }
    return tempPath(shm);
  }

  it('FAST_ZERO with NO_HOLE fails with ENOTSUP and changes nothing', async (t) => {
    const path = shmPath(t);
    if (!path) return;
    const dev = await openFilled(path);
    try {
      await assert.rejects(dev.writeZeroes(0, MIB, FAST_ZERO | NO_HOLE), deviceError('ENOTSUP'));
      assert.deepEqual(await readRange(dev, 0, MIB), pattern(SIZE, 3).subarray(0, MIB));
    } finally {
      await dev.close();
      fs.rmSync(path, { force: true });
    }
  });

  it('NO_HOLE falls back to writing zeros, keeping blocks allocated', async (t) => {
    const path = shmPath(t);
    if (!path) return;
    const dev = await openFilled(path);
    try {
      const before = allocated(path);
      // Bigger than one zero chunk, unaligned at both ends.
      await dev.writeZeroes(100, 2 * MIB + 500, NO_HOLE);
      assert.ok(allocated(path) >= before);
      const back = await readRange(dev, 0, 3 * MIB);
      assert.deepEqual(back.subarray(0, 100), pattern(SIZE, 3).subarray(0, 100));
      assert.ok(isZero(back.subarray(100, 2 * MIB + 600)));
      assert.deepEqual(
        back.subarray(2 * MIB + 600),
        pattern(SIZE, 3).subarray(2 * MIB + 600, 3 * MIB),
      );
      // Without NO_HOLE a hole is punched, and FAST_ZERO is satisfied by it.
      await dev.writeZeroes(2 * MIB, MIB, FAST_ZERO);
      assert.ok(allocated(path) <= before - MIB);
      assert.ok(isZero(await readRange(dev, 2 * MIB, MIB)));
    } finally {
      await dev.close();
      fs.rmSync(path, { force: true });
    }
  });
});

describe('FileBackend: refusals', () => {
  it('rejects changes when read-only, but reads', async () => {
    const path = tempPath();
    fs.writeFileSync(path, pattern(8192));
    const dev = await FileBackend.open(path, { readOnly: true });
    try {
      assert.equal(dev.info().caps.readOnly, true);
      await assert.rejects(dev.write(Buffer.alloc(10), 0, 0), deviceError('EPERM'));
      await assert.rejects(dev.trim(0, 4096, 0), deviceError('EPERM'));
      await assert.rejects(dev.writeZeroes(0, 4096, 0), deviceError('EPERM'));
      assert.deepEqual(await readRange(dev, 0, 8192), pattern(8192));
      assert.deepEqual(fs.readFileSync(path), pattern(8192));
    } finally {
      await dev.close();
    }
  });

  it('rejects ranges outside the device', async () => {
    const path = tempPath();
    const dev = await FileBackend.open(path, { create: { size: 8192 } });
    try {
      await assert.rejects(dev.read(Buffer.alloc(2), 8191, 0), deviceError('EINVAL'));
      await assert.rejects(dev.read(Buffer.alloc(2), -1, 0), deviceError('EINVAL'));
      await assert.rejects(dev.write(Buffer.alloc(2), 8191, 0), deviceError('ENOSPC'));
      await assert.rejects(dev.writeZeroes(4096, 4097, 0), deviceError('ENOSPC'));
      await assert.rejects(dev.trim(0, 8193, 0), deviceError('EINVAL'));
      await assert.rejects(dev.blockStatus(8192, 1, 0), deviceError('EINVAL'));
      await assert.rejects(dev.blockStatus(0, 0, 0), deviceError('EINVAL'));
      // The file did not grow.
      assert.equal(fs.statSync(path).size, 8192);
    } finally {
      await dev.close();
    }
  });

  it('refuses requests after close, and waits for those in flight', async () => {
    const path = tempPath();
    const dev = await FileBackend.open(path, { create: { size: SIZE } });
    // With FUA the write is two syscalls; the second would hit a closed fd (EBADF) if close
    // did not wait.
    const writing = dev.write(pattern(SIZE), 0, FUA);
    const closing = dev.close();
    await writing;
    await closing;
    assert.deepEqual(fs.readFileSync(path), pattern(SIZE));
    await assert.rejects(dev.read(Buffer.alloc(1), 0, 0), deviceError('ESHUTDOWN'));
    await assert.rejects(dev.flush(0), deviceError('ESHUTDOWN'));
    await dev.close();
  });
});

describe('FileBackend: direct I/O', () => {
  async function openDirect(t: TestContext, path: string): Promise<FileBackend | undefined> {
    try {
      return await FileBackend.open(path, { direct: true, create: { size: SIZE } });
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EINVAL') throw err;
      t.skip(`O_DIRECT unsupported under ${dir}`);
      return undefined;
    }
  }

  it('advertises and enforces aligned requests', async (t) => {
    const dev = await openDirect(t, tempPath());
    if (!dev) return;
    try {
      assert.equal(dev.info().blockSize.minimum, DIRECT_ALIGNMENT);
      await assert.rejects(dev.write(Buffer.alloc(4096), 100, 0), deviceError('EINVAL'));
      await assert.rejects(dev.read(Buffer.alloc(100), 0, 0), deviceError('EINVAL'));
      await assert.rejects(dev.writeZeroes(0, 100, 0), deviceError('EINVAL'));
    } finally {
      await dev.close();
    }
  });

  it('round-trips through buffers at any address', async (t) => {
    const dev = await openDirect(t, tempPath());
    if (!dev) return;
    try {
      // A Buffer one byte into its memory is never 4096-aligned: it takes the bounce path,
      // and at 3 MiB it needs several bounce chunks.
      const data = pattern(3 * MIB + 1, 5).subarray(1);
      const expected = Buffer.from(data);
      await dev.write(data, 4096, FUA);
      const back = dirty(3 * MIB + 1).subarray(1);
      await dev.read(back, 4096, 0);
      assert.deepEqual(back, expected);
      await dev.writeZeroes(8192, 8192, NO_HOLE);
      expected.fill(0, 4096, 12288);
      await dev.read(back, 4096, 0);
      assert.deepEqual(back, expected);
    } finally {
      await dev.close();
    }
  });

  it('refuses a file whose size is not a multiple of the alignment', async () => {
    const path = tempPath();
    fs.writeFileSync(path, pattern(5000));
    await assert.rejects(FileBackend.open(path, { direct: true }), /not a multiple of 4096/);
  });
});

describe('FileBackend: block device', () => {
  /** A loop device over a fresh image; needs root and losetup, else the test is skipped. */
  function attachLoop(t: TestContext, image: string): string | undefined {
    if (process.getuid?.() !== 0) {
      t.skip('needs root for a loop device');
      return undefined;
    }
    const result = spawnSync('losetup', ['--find', '--show', image], { encoding: 'utf8' });
    if (result.status !== 0) {
      t.skip(`losetup unavailable: ${result.error?.message ?? result.stderr.trim()}`);
      return undefined;
    }
    return result.stdout.trim();
  }

  it('serves a loop device', async (t) => {
    const image = tempPath();
    fs.writeFileSync(image, pattern(8 * MIB, 2));
    const loop = attachLoop(t, image);
    if (!loop) return;
    try {
      const dev = await FileBackend.open(loop);
      try {
        assert.equal(dev.info().size, 8 * MIB);
        assert.deepEqual(await dev.blockStatus(1000, 5000, 0), [{ length: 5000, state: DATA }]);
        await dev.write(pattern(10000, 6), 3000, FUA);
        assert.deepEqual(await readRange(dev, 3000, 10000), pattern(10000, 6));
        // Unaligned at both ends: the edges are written, the middle goes to fallocate.
        await dev.writeZeroes(MIB + 100, MIB, 0);
        await dev.writeZeroes(3 * MIB + 100, 10, NO_HOLE);
        const back = await readRange(dev, MIB, 3 * MIB);
        const expected = pattern(8 * MIB, 2).subarray(MIB, 4 * MIB);
        expected.fill(0, 100, MIB + 100);
        expected.fill(0, 2 * MIB + 100, 2 * MIB + 110);
        assert.deepEqual(back, expected);
        await dev.trim(5 * MIB, MIB, 0);
      } finally {
        await dev.close();
      }
    } finally {
      spawnSync('losetup', ['--detach', loop]);
    }
  });
});

describe('FileBackend: inline I/O paths', () => {
  /** Random reads and writes against a model, so each inline path is checked for content. */
  async function exercise(dev: FileBackend): Promise<void> {
    const model = Buffer.alloc(SIZE);
    let seed = 99;
    const rand = (n: number): number => {
      seed = (seed * 1103515245 + 12345) % 2 ** 31;
      return seed % n;
    };
    for (let i = 0; i < 500; i++) {
      const off = rand(SIZE - 70_000);
      const len = 1 + rand(65_536);
      if (i % 3 === 0) {
        const data = pattern(len, i);
        await dev.write(data, off, i % 10 === 0 ? FUA : 0);
        data.copy(model, off);
      } else {
        const got = Buffer.alloc(len);
        await dev.read(got, off, 0);
        assert.ok(got.equals(model.subarray(off, off + len)), `read ${off}+${len} differs`);
      }
    }
  }

  it('uses inline reads and writes on tmpfs, with correct content', async (t) => {
    if (!fs.existsSync('/dev/shm')) return t.skip('no /dev/shm');
    const path = tempPath('/dev/shm');
    try {
      const dev = await FileBackend.open(path, { create: { size: SIZE } });
      assert.equal(dev.inlineIo, 'memory');
      await exercise(dev);
      fs.truncateSync(path, SIZE / 2); // shrunk behind our back: the rest reads as zeros
      const tail = Buffer.alloc(4096, 0xff);
      await dev.read(tail, SIZE - 4096, 0);
      assert.ok(tail.every((b) => b === 0));
      await dev.close();
    } finally {
      fs.rmSync(path, { force: true });
    }
  });

  it('uses NOWAIT reads from the page cache on a disk file system, with correct content', async () => {
    const dev = await FileBackend.open(tempPath(), { create: { size: SIZE } });
    // ext4, xfs and btrfs on current kernels support it; others fall back to the thread pool.
    assert.ok(dev.inlineIo === 'nowait' || dev.inlineIo === 'pool', dev.inlineIo);
    await exercise(dev);
    await dev.close();
  });

  it('uses the thread pool for direct I/O', async () => {
    const dev = await FileBackend.open(tempPath(), { create: { size: SIZE }, direct: true }).catch(
      () => undefined,
    );
    if (dev === undefined) return; // no O_DIRECT here: covered by the direct I/O tests' skip
    assert.equal(dev.inlineIo, 'pool');
    await dev.close();
  });
});
