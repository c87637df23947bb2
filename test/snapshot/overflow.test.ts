/**
 * Overflow: with a small store limit and a write storm, the origin sees no error; the
 * snapshots that needed the copies that did not fit fail with the reason, their images answer
 * EIO, an event says so; snapshots that did not need them live on; space comes back.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { DeviceError } from '../../src/core/errors.js';
import { pattern } from '../filters/fixture.js';
import { KiB, MiB, readAll, startSnapFixture, type SnapFixture } from './fixture.js';

const CHUNK = 16 * KiB;
const SIZE = 2 * MiB;
const LIMIT = 8 * CHUNK;

interface Status {
  store: { usedSlots: number; dataBytes: number; limit: number };
  copies: { overflows: number };
  snapshots: { name: string; state: string; reason: string | null }[];
}

describe('snapshot overflow', () => {
  let fx: SnapFixture;
  before(async () => {
    fx = await startSnapFixture([{ name: 'disk', size: SIZE }]);
  });
  after(async () => {
    await fx.close();
  });

  test('a write storm past the limit fails the snapshot, never the origin', async () => {
    const snap = await fx.attach('disk', { chunkSize: CHUNK, limit: LIMIT, growStep: 3 * CHUNK });
    const c = await fx.connect('disk');
    await c.write(0, pattern(SIZE, 1));
    await fx.control('disk', 'take', { name: 'full' });
    const clients = [
      c,
      await fx.connect('disk'),
      await fx.connect('disk'),
      await fx.connect('disk'),
    ];
    const writes: Promise<void>[] = [];
    for (let i = 0; i < SIZE / CHUNK; i++)
      writes.push(clients[i % 4]!.write(i * CHUNK + 7, pattern(CHUNK - 7, 100 + i)));
    await Promise.all(writes); // every origin write succeeds
    const origin = await readAll(fx.backend('disk'));
    for (let i = 0; i < SIZE / CHUNK; i++) {
      assert.ok(
        origin.subarray(i * CHUNK + 7, (i + 1) * CHUNK).equals(pattern(CHUNK - 7, 100 + i)),
        `origin chunk ${i} written`,
      );
    }
    const st = snap.status() as Status;
    const s = st.snapshots.find((x) => x.name === 'full')!;
    assert.equal(s.state, 'failed');
    assert.equal(s.reason, `difference store full: limit ${LIMIT} bytes`);
    assert.ok(
      st.store.dataBytes <= LIMIT,
      `the store never grows past the limit (${st.store.dataBytes})`,
    );
    assert.equal(st.store.usedSlots, 0, "a failed snapshot's copies are released at once");
    assert.ok(
      fx.events.some((e) => e.event === 'snapshot.failed' && e.data?.name === 'full'),
      'an event is emitted',
    );
    await assert.rejects(
      snap.image('full')!.read(Buffer.alloc(512), 0, 0),
      (e: DeviceError) => e.errno === 'EIO' && /difference store full/.test(e.message),
    );
    const ic = await fx.connect('disk@full');
    await assert.rejects(ic.read(0, 512), /EIO|error/i, 'the image answers EIO over NBD');
    await ic.close();

    // Delete it; a new snapshot works in the freed store.
    await fx.control('disk', 'delete', { name: 'full' });
    await fx.control('disk', 'take', { name: 'again' });
    const t = await readAll(fx.backend('disk'));
    for (let i = 0; i < 8; i++) await c.write(i * CHUNK, pattern(CHUNK, 300 + i));
    assert.equal((snap.status() as Status).snapshots[0]!.state, 'active');
    assert.ok((await readAll(snap.image('again')!)).equals(t));
    await fx.control('disk', 'delete', { name: 'again' });
    await fx.detach('disk', 'drop');
  });

  test('only the snapshots that need the copy fail; a restart keeps the verdict', async () => {
    const snap = await fx.attach('disk', { chunkSize: CHUNK, limit: LIMIT });
    const c = await fx.connect('disk');
    await c.write(0, pattern(SIZE, 2));
    const atOld = await readAll(fx.backend('disk'));
    await fx.control('disk', 'take', { name: 'old' });
    for (let i = 0; i < 6; i++) await c.write(i * CHUNK, pattern(CHUNK, 400 + i)); // 6 copies for old
    const atNew = await readAll(fx.backend('disk'));
    await fx.control('disk', 'take', { name: 'new' });
    // Copies of chunks 0..5 for "new" alone: 2 fit, the third overflows and fails only "new".
    for (let i = 0; i < 6; i++) await c.write(i * CHUNK, pattern(CHUNK, 500 + i));
    let st = snap.status() as Status;
    assert.deepEqual(
      st.snapshots.map((s) => [s.name, s.state]),
      [
        ['old', 'active'],
        ['new', 'failed'],
      ],
    );
    assert.equal(st.store.usedSlots, 6, "the failed snapshot's own copies are freed; old's stay");
    assert.ok((await readAll(snap.image('old')!)).equals(atOld), 'the older snapshot is intact');
    assert.ok(!atNew.equals(atOld));
    // Restart (detach, keeping the store; attach again): same verdicts, same images.
    await fx.detach('disk', 'keep');
    const again = await fx.attach('disk', { chunkSize: CHUNK, limit: LIMIT });
    st = again.status() as Status;
    assert.deepEqual(
      st.snapshots.map((s) => [s.name, s.state, s.reason]),
      [
        ['old', 'active', null],
        ['new', 'failed', `difference store full: limit ${LIMIT} bytes`],
      ],
    );
    assert.ok((await readAll(again.image('old')!)).equals(atOld));
    const freed = (await fx.control<{ freedChunks: number }>('disk', 'delete', { name: 'old' }))
      .freedChunks;
    assert.equal(freed, 6);
    assert.equal((again.status() as Status).store.usedSlots, 0);
    await fx.detach('disk', 'drop');
  });
});
