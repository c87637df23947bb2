/**
 * Consistency groups: two exports written in lock-step by a client (counter i to A, then
 * counter i to B, each acknowledged before the next). A group snapshot's images show the
 * same instant of both: B's counter is A's or one behind, never anything else. Snapshots of
 * the two taken separately, a moment apart, do not have that property (the control).
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { takeGroupOnExports } from '../../src/filters/snapshot/index.js';
import { KiB, MiB, startSnapFixture, type SnapFixture } from './fixture.js';

const CHUNK = 16 * KiB;
const ROUNDS = 15;

async function counterOf(fx: SnapFixture, exportName: string, snapName: string): Promise<number> {
  const buf = Buffer.alloc(8);
  await fx.filter(exportName).image(snapName)!.read(buf, 4096, 0);
  return Number(buf.readBigUInt64LE(0));
}

describe('snapshot consistency groups', () => {
  let fx: SnapFixture;
  before(async () => {
    fx = await startSnapFixture([
      { name: 'A', size: MiB },
      { name: 'B', size: MiB },
    ]);
    await fx.attach('A', { chunkSize: CHUNK });
    await fx.attach('B', { chunkSize: CHUNK });
  });
  after(async () => {
    await fx.close();
  });

  test('a group snapshot shows one instant of both exports', async () => {
    const a = await fx.connect('A');
    const b = await fx.connect('B');
    let stop = false;
    let i = 0;
    const writer = (async () => {
      const buf = Buffer.alloc(8);
      while (!stop) {
        i++;
        buf.writeBigUInt64LE(BigInt(i));
        await a.write(4096, buf);
        await b.write(4096, buf);
      }
    })();
    try {
      while (i < 3) await new Promise((r) => setTimeout(r, 1)); // the writer is under way
      for (let round = 0; round < ROUNDS; round++) {
        await new Promise((r) => setTimeout(r, 3));
        const infos = await takeGroupOnExports(fx.manager, ['B', 'A'], `g${round}`);
        assert.deepEqual(
          infos.map((x) => x.image),
          [`A@g${round}`, `B@g${round}`],
        );
        const ca = await counterOf(fx, 'A', `g${round}`);
        const cb = await counterOf(fx, 'B', `g${round}`);
        assert.ok(ca - cb === 0 || ca - cb === 1, `group g${round}: A shows ${ca}, B shows ${cb}`);
        assert.ok(ca > 0);
      }
      // The control: separate snapshots a moment apart see different instants.
      await fx.control('A', 'take', { name: 'solo' });
      const before = i;
      while (i < before + 20) await new Promise((r) => setTimeout(r, 1));
      await fx.control('B', 'take', { name: 'solo' });
      const ca = await counterOf(fx, 'A', 'solo');
      const cb = await counterOf(fx, 'B', 'solo');
      assert.ok(cb - ca >= 10, `separate snapshots are further apart (A ${ca}, B ${cb})`);
    } finally {
      stop = true;
      await writer;
    }
    assert.ok(i > ROUNDS, 'the writer kept writing through the group takes');
  });

  test('a group take that cannot be completed leaves nothing behind', async () => {
    await fx.control('B', 'take', { name: 'clash' });
    await assert.rejects(takeGroupOnExports(fx.manager, ['A', 'B'], 'clash'), /already exists/);
    assert.equal(
      fx
        .filter('A')
        .list()
        .some((s) => s.name === 'clash'),
      false,
      'A keeps no half of the group',
    );
    await assert.rejects(
      takeGroupOnExports(fx.manager, ['A', 'nope'], 'x'),
      /no export named "nope"/,
    );
  });
});
