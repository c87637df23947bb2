import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { DEFAULT_BLOCK_SIZE, RequestFlags } from '../../src/core/device.js';
import { MemoryBackend } from '../../src/backends/memory.js';
import { DATA, HOLE_ZERO, deviceError, dirty, isZero, pattern } from './helpers.js';

const PAGE = 4096;
const { FUA, NO_HOLE, FAST_ZERO, REQ_ONE } = RequestFlags;

async function readAll(dev: MemoryBackend): Promise<Buffer> {
  const buf = dirty(dev.info().size);
  await dev.read(buf, 0, 0);
  return buf;
}

/** A device of `pages` pages, every byte 0xaa. */
async function filled(pages: number): Promise<MemoryBackend> {
  const dev = new MemoryBackend({ size: pages * PAGE, pageSize: PAGE });
  await dev.write(Buffer.alloc(pages * PAGE, 0xaa), 0, 0);
  return dev;
}

describe('MemoryBackend', () => {
  it('advertises its size and capabilities', () => {
    const info = new MemoryBackend({ size: 12345 }).info();
    assert.equal(info.size, 12345);
    assert.deepEqual(info.blockSize, DEFAULT_BLOCK_SIZE);
    assert.deepEqual(info.caps, {
      readOnly: false,
      flush: true,
      fua: true,
      trim: true,
      zero: true,
      fastZero: true,
      cache: true,
      multiConn: true,
      rotational: false,
    });
  });

  it('rejects bad sizes and page sizes', () => {
    assert.throws(() => new MemoryBackend({ size: -1 }), RangeError);
    assert.throws(() => new MemoryBackend({ size: 1.5 }), RangeError);
    assert.throws(() => new MemoryBackend({ size: 2 ** 53 }), RangeError);
    assert.throws(() => new MemoryBackend({ size: 4096, pageSize: 3000 }), /power of two/);
    assert.throws(() => new MemoryBackend({ size: 4096, pageSize: 0 }), RangeError);
    assert.equal(new MemoryBackend({ size: 0 }).info().size, 0);
  });

  it('reads zeros where nothing was written', async () => {
    const dev = new MemoryBackend({ size: 3 * PAGE + 100, pageSize: PAGE });
    assert.ok(isZero(await readAll(dev)));
    assert.equal(dev.allocatedBytes(), 0);
  });

  it('round-trips unaligned writes across page boundaries', async () => {
    const dev = new MemoryBackend({ size: 8 * PAGE, pageSize: PAGE });
    const data = pattern(2 * PAGE + 1234, 7);
    const offset = PAGE - 333;
    await dev.write(data, offset, 0);

    const back = dirty(data.length);
    await dev.read(back, offset, 0);
    assert.deepEqual(back, data);

    // An unaligned read straddling the start of the data sees zeros, then the data.
    const edge = dirty(1000);
    await dev.read(edge, offset - 500, 0);
    assert.ok(isZero(edge.subarray(0, 500)));
    assert.deepEqual(edge.subarray(500), data.subarray(0, 500));

    const all = await readAll(dev);
    assert.ok(isZero(all.subarray(0, offset)));
    assert.deepEqual(all.subarray(offset, offset + data.length), data);
    assert.ok(isZero(all.subarray(offset + data.length)));
    // Pages 0..3 are touched by [3763, 3763 + 9426).
    assert.equal(dev.allocatedBytes(), 4 * PAGE);
  });

  it('overwrites part of an allocated page without disturbing the rest', async () => {
    const dev = await filled(2);
    await dev.write(Buffer.from('hello'), PAGE - 2, 0);
    const all = await readAll(dev);
    assert.equal(all.subarray(PAGE - 2, PAGE + 3).toString(), 'hello');
    assert.equal(all[PAGE - 3], 0xaa);
    assert.equal(all[PAGE + 3], 0xaa);
  });

  it('cuts the last page to the device end', async () => {
    const size = 2 * PAGE + 100;
    const dev = new MemoryBackend({ size, pageSize: PAGE });
    await dev.write(pattern(size), 0, 0);
    assert.equal(dev.allocatedBytes(), size);
    assert.deepEqual(await readAll(dev), pattern(size));
  });

  it('trim frees whole pages and zeros the partial edges', async () => {
    const dev = await filled(4);
    const start = 1000;
    const end = 2 * PAGE + 1500;
    await dev.trim(start, end - start, 0);

    const all = await readAll(dev);
    assert.ok(all.subarray(0, start).every((b) => b === 0xaa));
    assert.ok(isZero(all.subarray(start, end)));
    assert.ok(all.subarray(end).every((b) => b === 0xaa));
    // Page 1 was inside the range and is gone; the edge pages 0 and 2 stay.
    assert.equal(dev.allocatedBytes(), 3 * PAGE);
    assert.deepEqual(await dev.blockStatus(0, 4 * PAGE, 0), [
      { length: PAGE, state: DATA },
      { length: PAGE, state: HOLE_ZERO },
      { length: 2 * PAGE, state: DATA },
    ]);
  });

  it('writeZeroes without NO_HOLE punches holes', async () => {
    const dev = await filled(4);
    await dev.writeZeroes(PAGE, 2 * PAGE, 0);
    const all = await readAll(dev);
    assert.ok(isZero(all.subarray(PAGE, 3 * PAGE)));
    assert.equal(all[PAGE - 1], 0xaa);
    assert.equal(all[3 * PAGE], 0xaa);
    assert.equal(dev.allocatedBytes(), 2 * PAGE);
  });

  it('writeZeroes with NO_HOLE zeros in place and keeps pages allocated', async () => {
    const dev = await filled(4);
    await dev.writeZeroes(PAGE, 2 * PAGE, NO_HOLE);
    assert.ok(isZero((await readAll(dev)).subarray(PAGE, 3 * PAGE)));
    assert.equal(dev.allocatedBytes(), 4 * PAGE);

    // On unallocated pages NO_HOLE allocates: the range must be backed afterwards.
    const empty = new MemoryBackend({ size: 4 * PAGE, pageSize: PAGE });
    await empty.writeZeroes(PAGE + 10, PAGE, NO_HOLE | FAST_ZERO);
    assert.equal(empty.allocatedBytes(), 2 * PAGE);
    assert.deepEqual(await empty.blockStatus(0, 4 * PAGE, 0), [
      { length: PAGE, state: HOLE_ZERO },
      { length: 2 * PAGE, state: DATA },
      { length: PAGE, state: HOLE_ZERO },
    ]);
    assert.ok(isZero(await readAll(empty)));
  });

  it('blockStatus merges equal neighbours and starts exactly at the offset', async () => {
    const dev = new MemoryBackend({ size: 8 * PAGE, pageSize: PAGE });
    await dev.write(pattern(2 * PAGE), PAGE, 0); // pages 1, 2
    await dev.write(pattern(10), 5 * PAGE + 7, 0); // page 5
    assert.deepEqual(await dev.blockStatus(100, 8 * PAGE - 100, 0), [
      { length: PAGE - 100, state: HOLE_ZERO },
      { length: 2 * PAGE, state: DATA },
      { length: 2 * PAGE, state: HOLE_ZERO },
      { length: PAGE, state: DATA },
      { length: 2 * PAGE, state: HOLE_ZERO },
    ]);
    // Starting inside a data run, the run is cut at the offset.
    assert.deepEqual(await dev.blockStatus(PAGE + PAGE / 2, PAGE, 0), [
      { length: PAGE + PAGE / 2, state: DATA },
    ]);
  });

  it('blockStatus covers the request, may run to the page end, never past the device', async () => {
    const dev = new MemoryBackend({ size: 2 * PAGE + 100, pageSize: PAGE });
    // Asked for 10 bytes of a hole: answered up to the end of the page.
    assert.deepEqual(await dev.blockStatus(0, 10, 0), [{ length: PAGE, state: HOLE_ZERO }]);
    // The last page ends at the device end, not at a page multiple.
    assert.deepEqual(await dev.blockStatus(2 * PAGE + 50, 10, 0), [
      { length: 50, state: HOLE_ZERO },
    ]);
    const extents = await dev.blockStatus(5, 2 * PAGE + 95, 0);
    assert.deepEqual(extents, [{ length: 2 * PAGE + 95, state: HOLE_ZERO }]);
  });

  it('blockStatus with REQ_ONE gives one extent inside the request', async () => {
    const dev = new MemoryBackend({ size: 8 * PAGE, pageSize: PAGE });
    await dev.write(pattern(PAGE), 2 * PAGE, 0);
    assert.deepEqual(await dev.blockStatus(100, 8 * PAGE - 100, REQ_ONE), [
      { length: 2 * PAGE - 100, state: HOLE_ZERO },
    ]);
    assert.deepEqual(await dev.blockStatus(2 * PAGE, 100, REQ_ONE), [{ length: 100, state: DATA }]);
    assert.deepEqual(await dev.blockStatus(3 * PAGE, 5 * PAGE, REQ_ONE), [
      { length: 5 * PAGE, state: HOLE_ZERO },
    ]);
  });

  it('rejects changes when read-only, but reads', async () => {
    const dev = new MemoryBackend({ size: 2 * PAGE, pageSize: PAGE, readOnly: true });
    assert.equal(dev.info().caps.readOnly, true);
    await assert.rejects(dev.write(pattern(10), 0, 0), deviceError('EPERM'));
    await assert.rejects(dev.trim(0, PAGE, 0), deviceError('EPERM'));
    await assert.rejects(dev.writeZeroes(0, PAGE, NO_HOLE), deviceError('EPERM'));
    const buf = dirty(PAGE);
    await dev.read(buf, 0, 0);
    assert.ok(isZero(buf));
    await dev.flush(0);
  });

  it('rejects ranges outside the device', async () => {
    const dev = new MemoryBackend({ size: 2 * PAGE, pageSize: PAGE });
    await assert.rejects(dev.read(Buffer.alloc(2), 2 * PAGE - 1, 0), deviceError('EINVAL'));
    await assert.rejects(dev.read(Buffer.alloc(2), -1, 0), deviceError('EINVAL'));
    await assert.rejects(dev.write(Buffer.alloc(2), 2 * PAGE - 1, 0), deviceError('ENOSPC'));
    await assert.rejects(dev.write(Buffer.alloc(2), 0.5, 0), deviceError('EINVAL'));
    await assert.rejects(dev.writeZeroes(PAGE, PAGE + 1, 0), deviceError('ENOSPC'));
    await assert.rejects(dev.trim(PAGE, PAGE + 1, 0), deviceError('EINVAL'));
    await assert.rejects(dev.cache(2 * PAGE + 1, 0, 0), deviceError('EINVAL'));
    await assert.rejects(dev.blockStatus(2 * PAGE, 1, 0), deviceError('EINVAL'));
    await assert.rejects(dev.blockStatus(0, 0, 0), deviceError('EINVAL'));
    // Nothing was written by the failed calls.
    assert.equal(dev.allocatedBytes(), 0);
    // Empty requests at the very end are in range.
    await dev.read(Buffer.alloc(0), 2 * PAGE, 0);
    await dev.write(Buffer.alloc(0), 2 * PAGE, 0);
  });

  it('accepts FUA, flush and cache', async () => {
    const dev = new MemoryBackend({ size: 2 * PAGE, pageSize: PAGE });
    await dev.write(pattern(100), 50, FUA);
    await dev.flush(0);
    await dev.cache(0, 2 * PAGE, 0);
    const buf = dirty(100);
    await dev.read(buf, 50, 0);
    assert.deepEqual(buf, pattern(100));
  });

  it('refuses requests after close and frees its memory', async () => {
    const dev = await filled(2);
    await dev.close();
    assert.equal(dev.allocatedBytes(), 0);
    await assert.rejects(dev.read(Buffer.alloc(1), 0, 0), deviceError('ESHUTDOWN'));
    await assert.rejects(dev.write(Buffer.alloc(1), 0, 0), deviceError('ESHUTDOWN'));
    await assert.rejects(dev.flush(0), deviceError('ESHUTDOWN'));
    await assert.rejects(dev.blockStatus(0, 1, 0), deviceError('ESHUTDOWN'));
    await dev.close();
  });
});
