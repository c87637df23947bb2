/**
 * The snapshot filter's basics through real NBD connections: images show the origin as it was,
 * whatever writes, trims and zeroing came after; one copy per chunk serves every snapshot that
 * needs it; images are read-only exports named EXPORT@SNAP, with block status; deleting frees
 * the space; commands refuse bad input.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { ExtentState } from '../../src/core/device.js';
import { pattern } from '../filters/fixture.js';
import { KiB, MiB, readAll, readAllNbd, startSnapFixture, type SnapFixture } from './fixture.js';

const CHUNK = 16 * KiB;
const SIZE = 4 * MiB;

interface Status {
  store: { usedSlots: number; freeSlots: number; usedBytes: number };
  copies: { held: number; copiedSinceAttach: number; zeroChunksSinceAttach: number };
  snapshots: { name: string; generation: number; state: string; chunks: number; image: string }[];
}

describe('snapshot basics', () => {
  let fx: SnapFixture;
  before(async () => {
    fx = await startSnapFixture([{ name: 'disk', size: SIZE }]);
  });
  after(async () => {
    await fx.close();
  });

  test('images keep the content of their instant; copies are shared; delete frees space', async () => {
    const snap = await fx.attach('disk', { chunkSize: CHUNK });
    const c = await fx.connect('disk');
    await c.write(0, pattern(SIZE, 1));
    const t0 = Buffer.from(pattern(SIZE, 1));

    // Three snapshots at one instant: one copy per chunk written must serve all three.
    const a = await fx.control<{ name: string; generation: number; image: string }>(
      'disk',
      'take',
      { name: 'a' },
    );
    assert.equal(a.image, 'disk@a');
    await fx.control('disk', 'take', { name: 'b' });
    await fx.control('disk', 'take', { name: 'c' });
    // Write 10 chunks, partially and wholly, twice: still only 10 copies.
    for (let i = 0; i < 10; i++)
      await c.write(i * CHUNK + (i % 2) * 100, pattern(i % 2 ? 500 : CHUNK, 100 + i));
    for (let i = 0; i < 10; i++) await c.write(i * CHUNK, pattern(CHUNK, 200 + i));
    let st = snap.status() as Status;
    assert.equal(st.store.usedSlots, 10, 'one copy per chunk, not one per snapshot');
    assert.deepEqual(
      st.snapshots.map((s) => [s.name, s.chunks]),
      [
        ['a', 10],
        ['b', 10],
        ['c', 10],
      ],
    );
    const t1 = await readAll(fx.backend('disk'));

    // A newer snapshot; trims and zeroing must preserve too; the copies of the first writes do
    // not serve it (it saw the new data), so chunks 0..9 get new copies for it.
    await fx.control('disk', 'take', { name: 'd' });
    await c.trim(0, 4 * CHUNK);
    await c.writeZeroes(20 * CHUNK, 3 * CHUNK + 5);
    await c.write(2 * MiB - 7, pattern(20, 7)); // crosses a chunk boundary
    st = snap.status() as Status;
    const d = st.snapshots.find((s) => s.name === 'd')!;
    assert.equal(d.chunks, 4 + 4 + 2, 'trim (4) + zero (4) + unaligned write (2)');

    for (const [name, want] of [
      ['a', t0],
      ['b', t0],
      ['c', t0],
      ['d', t1],
    ] as const) {
      assert.ok((await readAll(snap.image(name)!)).equals(want), `image ${name} via its device`);
      const ic = await fx.connect(`disk@${name}`);
      assert.ok((await readAllNbd(ic)).equals(want), `image ${name} via NBD`);
      await assert.rejects(ic.write(0, Buffer.alloc(512)), 'an image is read-only');
      await ic.close();
    }

    // Deleting a, b and c frees the first 10 copies (d does not need them).
    const used = (snap.status() as Status).store.usedSlots;
    await fx.control('disk', 'delete', { name: 'a' });
    await fx.control('disk', 'delete', { name: 'b' });
    assert.equal((snap.status() as Status).store.usedSlots, used, 'c still needs them');
    await fx.control('disk', 'delete', { name: 'c' });
    st = snap.status() as Status;
    assert.equal(st.store.usedSlots, used - 10);
    assert.equal(st.store.freeSlots, 10);
    await assert.rejects(fx.connect('disk@a'), 'a deleted image is no longer an export');
    assert.ok((await readAll(snap.image('d')!)).equals(t1));
    // Freed slots are reused: new copies for d do not grow the store.
    await c.write(40 * CHUNK, pattern(5 * CHUNK, 9));
    st = snap.status() as Status;
    assert.equal(st.store.freeSlots, 5);
    assert.ok((await readAll(snap.image('d')!)).equals(t1));
    await fx.control('disk', 'delete', { name: 'd' });
    assert.deepEqual(await fx.control('disk', 'list'), []);
    await fx.detach('disk', 'drop');
  });

  test('block status of an image: holes where the origin had them, data where copied', async () => {
    const snap = await fx.attach('disk', { chunkSize: CHUNK });
    const c = await fx.connect('disk');
    await c.trim(0, SIZE);
    await c.write(64 * KiB, pattern(64 * KiB, 3)); // memory backend pages are 64 KiB
    await fx.control('disk', 'take', { name: 's' });
    await c.write(0, pattern(64 * KiB, 4)); // over a hole: copied as zeros (no slot)
    await c.trim(64 * KiB, 64 * KiB); // over data: copied into slots
    const img = snap.image('s')!;
    const extents = await img.blockStatus(0, 256 * KiB, 0);
    const states: [number, number][] = [];
    let at = 0;
    for (const e of extents) {
      states.push([at, e.state]);
      at += e.length;
    }
    assert.ok(at >= 256 * KiB);
    const stateAt = (pos: number): number => {
      let s = -1;
      for (const [from, state] of states) if (from <= pos) s = state;
      return s;
    };
    assert.equal(stateAt(0) & ExtentState.ZERO, ExtentState.ZERO, 'zero copy reads as zeros');
    assert.equal(stateAt(64 * KiB), 0, 'copied data is data');
    assert.equal(
      stateAt(128 * KiB),
      ExtentState.HOLE | ExtentState.ZERO,
      'an origin hole stays a hole',
    );
    const st = snap.status() as Status;
    assert.equal(st.copies.zeroChunksSinceAttach, 4);
    assert.equal(st.store.usedSlots, 4);
    // Zero extents really read as zeros; the rest as it was.
    const data = await readAll(img);
    assert.ok(data.subarray(0, 64 * KiB).equals(Buffer.alloc(64 * KiB)));
    assert.ok(data.subarray(64 * KiB, 128 * KiB).equals(pattern(64 * KiB, 3)));
    const ic = await fx.connect('disk@s');
    const nbdExtents = (await ic.blockStatus(0, 256 * KiB)).get('base:allocation') ?? [];
    assert.ok(nbdExtents.length > 0, 'block status over NBD');
    assert.equal(nbdExtents[0]!.flags & ExtentState.ZERO, ExtentState.ZERO);
    await ic.close();
    await fx.detach('disk', 'drop');
  });

  test('commands refuse bad input and name conflicts', async () => {
    await fx.attach('disk', { chunkSize: CHUNK });
    await fx.control('disk', 'take', { name: 'x' });
    await assert.rejects(fx.control('disk', 'take', { name: 'x' }), /already exists/);
    await assert.rejects(fx.control('disk', 'take', { name: 'a@b' }), /invalid snapshot name/);
    await assert.rejects(fx.control('disk', 'take', {}), /name/);
    await assert.rejects(fx.control('disk', 'delete', { name: 'nope' }), /no snapshot named/);
    await assert.rejects(fx.control('disk', 'frobnicate'), /has no command/);
    const list = await fx.control<{ name: string; state: string }[]>('disk', 'list');
    assert.deepEqual(
      list.map((s) => [s.name, s.state]),
      [['x', 'active']],
    );
    await assert.rejects(
      fx.manager.createFilter('disk', 'snapshot', { name: 'snap2', args: { store: fx.storeDir } }),
      /already attached/,
    );
    await assert.rejects(
      fx.manager.createFilter('disk', 'snapshot', {
        name: 'snap3',
        args: { store: fx.storeDir, chunkSize: 1000 },
      }),
      /power of two/,
    );
    await fx.detach('disk', 'drop');
    await assert.rejects(fx.connect('disk@x'), 'images go with the filter');
  });
});
