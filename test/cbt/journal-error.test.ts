/**
 * A journal commit that fails (the state's disk full or failing) fails its request with EIO —
 * and leaves no change untracked behind it: the marks it made in memory are written (the
 * whole map) before any later request to those blocks goes down. (Found in review: a retry
 * of the failed write skipped the journal, and a crash then lost the change.)
 */
import assert from 'node:assert/strict';
import { closeSync, mkdirSync, openSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { CbtFilter } from '../../src/filters/cbt/cbt.js';
import { decodeMap } from '../../src/filters/cbt/format.js';
import { pattern } from '../filters/fixture.js';
import { MiB, startSnapFixture, type SnapFixture } from '../snapshot/fixture.js';

let fx: SnapFixture;

before(async () => {
  fx = await startSnapFixture([{ name: 'disk', size: 4 * MiB }]);
});
after(async () => {
  await fx.close();
});

test('a failed commit fails its request; the retry waits until the whole map is durable', async () => {
  const dir = join(fx.dir, 'cbt');
  mkdirSync(dir);
  await fx.manager.createFilter('disk', 'cbt', { name: 'cbt', args: { dir } });
  const filter = fx.manager
    .getExport('disk')
    .stack.filters()
    .find((e) => e.name === 'cbt')!.filter as CbtFilter;
  const store = (filter as unknown as { store: { fd: number } }).store;
  const c = await fx.connect('disk');
  const real = store.fd;
  const full = openSync('/dev/full', 'r+');
  store.fd = full; // the journal's disk is full
  try {
    await assert.rejects(c.write(0, pattern(4096, 1)), /EIO/);
  } finally {
    store.fd = real;
    closeSync(full);
  }
  // The retry finds block 0 marked in memory already; it must not go down unrecorded.
  await c.write(0, pattern(4096, 1));
  const map = decodeMap(readFileSync(join(dir, 'disk', 'cbt', 'map')));
  assert.ok(map.gens[0]! >= 1, 'block 0 is in the map on disk before the write was answered');
  const st = filter.status() as { persistence: { lastError: string | null } };
  assert.match(st.persistence.lastError ?? '', /ENOSPC|no space/i);
});
