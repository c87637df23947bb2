/**
 * `verify` reads every copy in the difference store back against the CRC of its log record.
 * A clean store verifies clean; a byte flipped in a copy's slot (media corruption, a stray
 * writer) is found, and the snapshots that copy serves fail with the reason — durably, so that
 * they stay failed after a restart — instead of serving wrong data. Snapshots the damaged copy
 * does not serve stay intact.
 */
import assert from 'node:assert/strict';
import { closeSync, openSync, readSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { pattern } from '../filters/fixture.js';
import { KiB, MiB, readAllNbd, startSnapFixture, type SnapFixture } from './fixture.js';

const CHUNK = 16 * KiB;
const SIZE = 2 * MiB;

interface Report {
  checked: number;
  bytes: number;
  skipped: number;
  damaged: { chunk: number; slot: number; generations: [number, number]; why: string }[];
  failed: string[];
}

interface Listed {
  name: string;
  state: string;
  reason: string | null;
}

describe('snapshot verify', () => {
  let fx: SnapFixture;
  before(async () => {
    fx = await startSnapFixture([{ name: 'disk', size: SIZE }]);
  });
  after(async () => {
    await fx.close();
  });

  test('finds a damaged copy and fails exactly the snapshots it serves', async () => {
    await fx.attach('disk', { chunkSize: CHUNK });
    const c = await fx.connect('disk');
    await c.write(0, pattern(SIZE, 1));
    await fx.control('disk', 'take', { name: 'old' });
    // Chunks 0-3 change after "old": copies serve "old" only.
    await c.write(0, pattern(4 * CHUNK, 2));
    await fx.control('disk', 'take', { name: 'new' });
    // Chunks 8-9 change after "new": their copies serve both snapshots.
    await c.write(8 * CHUNK, pattern(2 * CHUNK, 3));

    const clean = await fx.control<Report>('disk', 'verify');
    assert.equal(clean.checked, 6);
    assert.equal(clean.bytes, 6 * CHUNK);
    assert.deepEqual(clean.damaged, []);
    assert.deepEqual(clean.failed, []);

    // Flip one byte in the slot holding chunk 2's copy (serves "old" only).
    const storeDir = join(fx.storeDir, 'disk');
    const data = openSync(join(storeDir, 'diff.data'), 'r+');
    let slot = -1;
    try {
      const want = pattern(SIZE, 1).subarray(2 * CHUNK, 3 * CHUNK);
      const buf = Buffer.alloc(CHUNK);
      for (let s = 0; s < 6 && slot < 0; s++) {
        readSync(data, buf, 0, CHUNK, s * CHUNK);
        if (buf.equals(want)) slot = s;
      }
      assert.ok(slot >= 0, "chunk 2's copy is in the store");
      readSync(data, buf, 0, 1, slot * CHUNK + 100);
      buf[0] = buf[0]! ^ 0xff;
      writeSync(data, buf, 0, 1, slot * CHUNK + 100);
    } finally {
      closeSync(data);
    }

    const report = await fx.control<Report>('disk', 'verify');
    assert.equal(report.checked, 6);
    assert.equal(report.damaged.length, 1);
    assert.equal(report.damaged[0]!.chunk, 2);
    assert.equal(report.damaged[0]!.slot, slot);
    assert.match(report.damaged[0]!.why, /CRC/);
    assert.deepEqual(report.failed, ['old']);

    const list = await fx.control<Listed[]>('disk', 'list');
    const old = list.find((s) => s.name === 'old')!;
    assert.equal(old.state, 'failed');
    assert.match(old.reason!, /damaged: copy of chunk 2/);
    assert.equal(list.find((s) => s.name === 'new')!.state, 'active');

    // The failed image refuses to serve; the other one still reads exactly its instant.
    const oldImage = await fx.connect('disk@old');
    await assert.rejects(oldImage.read(0, 4096), /EIO|error/i);
    const newImage = await fx.connect('disk@new');
    const expected = Buffer.from(pattern(SIZE, 1));
    pattern(4 * CHUNK, 2).copy(expected, 0);
    assert.ok((await readAllNbd(newImage)).equals(expected), 'image "new" is intact');

    // The failure is durable: it survives a detach and re-attach.
    await fx.detach('disk');
    await fx.attach('disk', { chunkSize: CHUNK });
    const again = await fx.control<Listed[]>('disk', 'list');
    assert.equal(again.find((s) => s.name === 'old')!.state, 'failed');
    assert.match(again.find((s) => s.name === 'old')!.reason!, /damaged/);
    assert.equal(again.find((s) => s.name === 'new')!.state, 'active');
    const after = await fx.control<Report>('disk', 'verify');
    assert.deepEqual(after.damaged, [], 'the damaged copy served only "old" and was freed');
  });

  test('refuses arguments', async () => {
    await assert.rejects(fx.control('disk', 'verify', { deep: true }), /deep|additional/i);
  });
});
