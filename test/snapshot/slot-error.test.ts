/**
 * A copy that cannot be written to the difference store (the host file system full, an I/O
 * error) fails the snapshots that needed it — with the reason — and nothing else: the origin
 * write goes on, the store keeps working, later snapshots are fine. (Found in review: once
 * slot writes joined the group commit, one failed write broke the whole store.)
 */
import assert from 'node:assert/strict';
import { closeSync, openSync } from 'node:fs';
import { after, before, test } from 'node:test';
import { pattern } from '../filters/fixture.js';
import { KiB, MiB, readAllNbd, startSnapFixture, type SnapFixture } from './fixture.js';

const CHUNK = 16 * KiB;
let fx: SnapFixture;

before(async () => {
  fx = await startSnapFixture([{ name: 'disk', size: 2 * MiB }]);
});
after(async () => {
  await fx.close();
});

interface Listed {
  name: string;
  state: string;
  reason: string | null;
}

test('a failed slot write fails its snapshots only; the store goes on', async () => {
  const filter = await fx.attach('disk', { chunkSize: CHUNK });
  const c = await fx.connect('disk');
  await c.write(0, pattern(2 * MiB, 1));
  await fx.control('disk', 'take', { name: 'a' });
  await c.write(0, pattern(CHUNK, 2)); // one copy made the normal way

  // The data file now answers every write with ENOSPC.
  const store = (filter as unknown as { store: { dataFd: number } }).store;
  const real = store.dataFd;
  const full = openSync('/dev/full', 'r+');
  store.dataFd = full;
  try {
    await c.write(4 * CHUNK, pattern(CHUNK, 3)); // needs a copy for "a": it cannot be written
  } finally {
    store.dataFd = real;
    closeSync(full);
  }
  const list = await fx.control<Listed[]>('disk', 'list');
  assert.equal(list[0]!.state, 'failed');
  assert.match(list[0]!.reason!, /no space left on the host file system/);
  const st = filter.status() as { store: { broken: string | null } };
  assert.equal(st.store.broken, null, 'the store itself is fine');

  // The origin got the write; a new snapshot works as ever.
  const origin = Buffer.from(pattern(2 * MiB, 1));
  pattern(CHUNK, 2).copy(origin, 0);
  pattern(CHUNK, 3).copy(origin, 4 * CHUNK);
  assert.ok((await readAllNbd(c)).equals(origin));
  await fx.control('disk', 'take', { name: 'b' });
  await c.write(8 * CHUNK, pattern(CHUNK, 4));
  const b = await fx.connect('disk@b');
  assert.ok((await readAllNbd(b)).equals(origin), 'image b is exact');
});
