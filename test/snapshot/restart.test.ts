/**
 * Restart: a daemon that stops cleanly (filters removed with policy "keep") and starts again
 * on the same store and origin serves the same images, and copy-before-write goes on where
 * it left off. An origin that changed while the store was detached fails the snapshots.
 * Policy "drop" deletes the store.
 */
import assert from 'node:assert/strict';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { decodeMeta } from '../../src/filters/snapshot/format.js';
import { tempDir } from '../helpers/server.js';
import { pattern } from '../filters/fixture.js';
import { KiB, MiB, readAll, readAllNbd, startSnapFixture } from './fixture.js';

const CHUNK = 32 * KiB;
const SIZE = 3 * MiB;

test('snapshots survive a clean restart; the store picks up where it left off', async () => {
  const dir = tempDir('devfilter-snap-restart-');
  try {
    const spec = [{ name: 'disk', size: SIZE, backend: 'file' as const }];
    let fx = await startSnapFixture(spec, { dir: dir.path });
    let c = await fx.connect('disk');
    await c.write(0, pattern(SIZE, 1));
    await fx.attach('disk', { chunkSize: CHUNK });
    await fx.control('disk', 'take', { name: 'a' });
    const atA = await readAll(fx.backend('disk'));
    await c.write(100 * KiB, pattern(300 * KiB, 2));
    await c.trim(MiB, 200 * KiB);
    await fx.control('disk', 'take', { name: 'b' });
    const atB = await readAll(fx.backend('disk'));
    await c.writeZeroes(50 * KiB, 400 * KiB);
    await fx.control('disk', 'take', { name: 'gone' });
    await c.write(2 * MiB, pattern(64 * KiB, 3));
    await fx.control('disk', 'delete', { name: 'gone' });
    await fx.close(); // the daemon stops: filters removed with their default policy, keep

    const meta = decodeMeta(readFileSync(join(fx.storeDir, 'disk', 'snapshot.meta')));
    assert.equal(meta.attached, false, 'a clean stop is recorded');
    assert.deepEqual(
      meta.snapshots.map((s) => s.name),
      ['a', 'b'],
    );

    fx = await startSnapFixture(spec, { dir: dir.path });
    const snap = await fx.attach('disk', { chunkSize: CHUNK });
    const st = snap.status() as {
      recovery: { unclean: boolean };
      snapshots: { name: string; state: string }[];
    };
    assert.equal(st.recovery.unclean, false);
    assert.deepEqual(
      st.snapshots.map((s) => [s.name, s.state]),
      [
        ['a', 'active'],
        ['b', 'active'],
      ],
    );
    for (const [name, want] of [
      ['a', atA],
      ['b', atB],
    ] as const) {
      assert.ok((await readAll(snap.image(name)!)).equals(want), `image ${name} after restart`);
      const ic = await fx.connect(`disk@${name}`);
      assert.ok((await readAllNbd(ic)).equals(want), `image ${name} over NBD after restart`);
      await ic.close();
    }
    // Copy-before-write continues: overwrite everything, images unchanged.
    c = await fx.connect('disk');
    await c.write(0, pattern(SIZE, 9));
    assert.ok((await readAll(snap.image('a')!)).equals(atA));
    assert.ok((await readAll(snap.image('b')!)).equals(atB));
    await fx.detach('disk', 'drop');
    assert.equal(existsSync(join(fx.storeDir, 'disk')), false, 'policy drop removes the store');
    await fx.close();
  } finally {
    dir.cleanup();
  }
});

test('an origin that changed while detached fails the snapshots; a store of another export is refused', async () => {
  const dir = tempDir('devfilter-snap-origin-');
  try {
    let fx = await startSnapFixture([{ name: 'disk', size: 2 * MiB }], { dir: dir.path });
    await fx.attach('disk', { chunkSize: CHUNK });
    await fx.control('disk', 'take', { name: 's' });
    await fx.close();

    fx = await startSnapFixture([{ name: 'disk', size: 4 * MiB }], { dir: dir.path });
    const snap = await fx.attach('disk', { chunkSize: CHUNK });
    const list = snap.list();
    assert.equal(list[0]!.state, 'failed');
    assert.match(list[0]!.reason!, /size changed from 2097152 to 4194304/);
    await fx.detach('disk', 'keep');
    await fx.close();

    // The same store directory under another export name is not this export's store.
    fx = await startSnapFixture([{ name: 'other', size: 4 * MiB }], { dir: dir.path });
    const { renameSync } = await import('node:fs');
    renameSync(join(fx.storeDir, 'disk'), join(fx.storeDir, 'other'));
    await assert.rejects(fx.attach('other', { chunkSize: CHUNK }), /belongs to export "disk"/);
    await fx.close();
  } finally {
    dir.cleanup();
  }
});
