/**
 * A write in flight when a new generation starts may land after that instant, so it belongs
 * to the new generation — and is recorded there before the `generation` command returns,
 * not only once the write completes (a crash in between would otherwise lose it from
 * "changed since N"). A delay below cbt holds the write in flight.
 */
import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { pattern } from '../filters/fixture.js';
import { MiB, startSnapFixture, type SnapFixture } from '../snapshot/fixture.js';

let fx: SnapFixture;
before(async () => {
  fx = await startSnapFixture([{ name: 'disk', size: 4 * MiB }]);
});
after(async () => {
  await fx.close();
});

interface Changed {
  extents: Array<{ offset: number; length: number }>;
}

test('a write in flight across a new generation is in it when the command returns', async () => {
  const dir = join(fx.dir, 'cbt');
  mkdirSync(dir);
  await fx.manager.createFilter('disk', 'fault', {
    name: 'slow',
    args: { rules: [{ action: 'delay', ops: 'write', delayMs: 400 }] },
  });
  await fx.manager.createFilter('disk', 'cbt', {
    name: 'cbt',
    args: { dir },
    position: { at: 'top' },
  });
  const c = await fx.connect('disk');
  const write = c.write(MiB, pattern(4096, 1)); // marked in generation 1, then held below
  await new Promise((r) => setTimeout(r, 100));
  const gen = (await fx.manager.control('disk', 'cbt', 'generation', {})) as { current: number };
  const now = (await fx.manager.control('disk', 'cbt', 'changed', {
    since: gen.current,
  })) as Changed;
  assert.deepEqual(
    now.extents,
    [{ offset: MiB, length: 64 * 1024 }],
    'in the new generation already',
  );
  await write;
});
