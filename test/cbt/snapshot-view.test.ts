/**
 * Snapshot images expose the change map frozen at the snapshot's instant: with a `cbt`
 * filter on the export, the image `EXPORT@SNAP` answers `qemu:dirty-bitmap:NAME` and
 * `devfilter:cbt:NAME` as they were when the snapshot was taken, whatever changes later —
 * read over NBD by our client and by the real nbdinfo.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { NbdClient } from '../../src/nbd/client.js';
import { pattern } from '../filters/fixture.js';
import { run } from '../helpers/run.js';
import { requireTools } from '../helpers/tools.js';
import { KiB, MiB, startSnapFixture, type SnapFixture } from '../snapshot/fixture.js';

const BLOCK = 64 * KiB;
const QEMU = 'qemu:dirty-bitmap:cbt';
const OWN = 'devfilter:cbt:cbt';

let fx: SnapFixture;
let socket: string;

before(async () => {
  fx = await startSnapFixture([{ name: 'disk', size: 4 * MiB }]);
  socket = `${fx.dir}/nbd.sock`;
  await fx.attach('disk', { chunkSize: BLOCK });
  await fx.manager.createFilter('disk', 'cbt', { name: 'cbt', position: { at: 'top' } });
});

after(async () => {
  await fx.close();
});

/** Dirty [start, end) byte ranges of `context` on `exportName`, over NBD. */
async function dirtyRanges(exportName: string, context: string): Promise<Array<[number, number]>> {
  const c = await NbdClient.fromUri(
    `nbd+unix:///${encodeURIComponent(exportName)}?socket=${socket}`,
    { metaContexts: [context] },
  );
  try {
    assert.deepEqual([...c.metaContexts.values()], [context], `${exportName} offers ${context}`);
    const out: Array<[number, number]> = [];
    let at = 0;
    while (at < c.size) {
      const extents = (await c.blockStatus(at, c.size - at)).get(context)!;
      for (const e of extents) {
        const end = Math.min(c.size, at + e.length);
        if ((e.flags & 1) !== 0) {
          const last = out[out.length - 1];
          if (last !== undefined && last[1] === at) last[1] = end;
          else out.push([at, end]);
        }
        at = end;
      }
    }
    return out;
  } finally {
    await c.disconnect();
  }
}

test('an image answers the change map as it was at its instant', async (t) => {
  const c = await fx.connect('disk');
  await c.write(0, pattern(4 * KiB, 1)); // block 0
  await c.write(5 * BLOCK + 100, pattern(200, 2)); // block 5
  await fx.control('disk', 'take', { name: 's1' });
  await c.write(10 * BLOCK, pattern(BLOCK, 3)); // block 10: after the instant

  const frozen: Array<[number, number]> = [
    [0, BLOCK],
    [5 * BLOCK, 6 * BLOCK],
  ];
  assert.deepEqual(await dirtyRanges('disk@s1', QEMU), frozen);
  assert.deepEqual(await dirtyRanges('disk@s1', OWN), frozen);
  assert.deepEqual(await dirtyRanges('disk', QEMU), [...frozen, [10 * BLOCK, 11 * BLOCK]]);

  // With `bitmap since=N`, the image freezes "changed since N".
  const gen = (await fx.manager.control('disk', 'cbt', 'generation', {})) as { previous: number };
  await c.write(20 * BLOCK, pattern(BLOCK, 4));
  await fx.manager.control('disk', 'cbt', 'bitmap', { since: gen.previous });
  await fx.control('disk', 'take', { name: 's2' });
  await c.write(30 * BLOCK, pattern(BLOCK, 5));
  const s2: Array<[number, number]> = [
    ...frozen,
    [10 * BLOCK, 11 * BLOCK],
    [20 * BLOCK, 21 * BLOCK],
  ];
  assert.deepEqual(await dirtyRanges('disk@s2', QEMU), s2);
  assert.deepEqual(await dirtyRanges('disk@s2', OWN), [[20 * BLOCK, 21 * BLOCK]]);
  assert.deepEqual(await dirtyRanges('disk@s1', QEMU), frozen, 's1 did not move');

  if (!requireTools(t, 'nbdinfo')) return;
  const r = await run(
    'nbdinfo',
    [`--map=${QEMU}`, `nbd+unix:///${encodeURIComponent('disk@s1')}?socket=${socket}`],
    { timeoutMs: 30_000 },
  );
  assert.equal(r.code, 0, r.stderr);
  const dirty = r.stdout
    .split('\n')
    .filter((l) => /\bdirty\b/.test(l))
    .map((l) => l.trim().split(/\s+/).slice(0, 2).map(Number));
  assert.deepEqual(dirty, [
    [0, BLOCK],
    [5 * BLOCK, BLOCK],
  ]);
});
