/**
 * Model-based test of the cbt filter: several NBD connections issue random writes, trims and
 * write-zeroes while generations begin (between rounds, and also in the middle of traffic);
 * a model records, for each block, the newest generation the test knew of when it issued a
 * change to it. Afterwards, for every generation N, what the filter reports as changed since
 * N — through `changed` and through the block-status context devfilter:cbt:NAME:since:N —
 * must cover every block the model has at N or later: zero missed. The over-report is
 * measured and printed. Then the map must survive a detach/attach (with journal compactions
 * along the way) unchanged, and a reset must start a new history.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { NbdClient } from '../../src/nbd/client.js';
import { tempDir } from '../helpers/server.js';
import { prng } from '../protocol/raw.js';
import { startFixture, type Fixture, KiB, MiB } from '../filters/fixture.js';

const SIZE = 16 * MiB;
const BLOCK = 16 * KiB;
const BLOCKS = SIZE / BLOCK;

interface Changed {
  id: string;
  generation: number;
  extents: Array<{ offset: number; length: number }>;
  bytes: number;
  blocks: number;
  next: number | null;
}

/** The blocks covered by `changed` extents. */
function blocksOf(c: Changed): Set<number> {
  const out = new Set<number>();
  for (const e of c.extents) {
    assert.equal(e.offset % BLOCK, 0, 'extents are block-aligned');
    for (let b = e.offset / BLOCK; b < Math.ceil((e.offset + e.length) / BLOCK); b++) out.add(b);
  }
  return out;
}

/** The dirty blocks a block-status context reports for the whole device. */
async function contextBlocks(c: NbdClient, context: string): Promise<Set<number>> {
  const out = new Set<number>();
  let offset = 0;
  while (offset < SIZE) {
    const all = await c.blockStatus(offset, Math.min(SIZE - offset, 4 * MiB));
    const extents = all.get(context);
    assert.ok(extents !== undefined && extents.length > 0, `status for ${context}`);
    for (const e of extents) {
      if (e.flags & 1) {
        for (let b = Math.floor(offset / BLOCK); b < Math.ceil((offset + e.length) / BLOCK); b++)
          out.add(b);
      }
      offset += e.length;
    }
  }
  return out;
}

describe('cbt model', () => {
  let fx: Fixture;
  let state: { path: string; cleanup: () => void };
  const args = (): Record<string, unknown> => ({
    dir: state.path,
    blockSize: BLOCK,
    journalLimit: 4096, // ~170 records: compactions happen all along
  });

  before(async () => {
    fx = await startFixture({ size: SIZE });
    state = tempDir('devfilter-cbt-model-');
    await fx.manager.createFilter('mem', 'cbt', { name: 'c', args: args() });
  });
  after(async () => {
    await fx.close();
    state.cleanup();
  });

  /** model[b]: the newest generation known to the test when a change to block b was issued. */
  const model = new Uint32Array(BLOCKS);
  let known = 1;
  let ops = 0;

  async function traffic(seed: number, count: number, clients: NbdClient[]): Promise<void> {
    const rand = prng(seed);
    const loops = clients.flatMap((c, i) =>
      [0, 1, 2].map(async (j) => {
        const r = prng(seed * 31 + i * 7 + j);
        for (let k = 0; k < count; k++) {
          const offset = Math.floor(r() * (SIZE / 512)) * 512;
          const length = Math.min(SIZE - offset, 512 * (1 + Math.floor(r() * 512)));
          const g = known;
          const kind = r();
          if (kind < 0.7) await c.write(offset, Buffer.alloc(length, 1 + (k & 0x7f)));
          else if (kind < 0.85) await c.trim(offset, length);
          else await c.writeZeroes(offset, length);
          ops++;
          for (let b = Math.floor(offset / BLOCK); b < Math.ceil((offset + length) / BLOCK); b++)
            if (model[b]! < g) model[b] = g;
        }
      }),
    );
    // Meanwhile, now and then, a new generation in the middle of the traffic.
    const bumps = (async () => {
      for (let i = 0; i < 2; i++) {
        await new Promise((res) => setTimeout(res, 2 + rand() * 20));
        const r = await fx.control<{ previous: number; current: number }>('c', 'generation');
        assert.equal(r.previous + 1, r.current);
        known = r.current;
      }
    })();
    await Promise.all([...loops, bumps]);
  }

  async function check(what: string, client: NbdClient): Promise<void> {
    const status = fx.status<{ generation: number }>('c');
    let missed = 0;
    let over = 0;
    let truth = 0;
    for (let n = 1; n <= status.generation; n++) {
      const reported = blocksOf(await fx.control<Changed>('c', 'changed', { since: n }));
      for (let b = 0; b < BLOCKS; b++) {
        if (model[b]! >= n) {
          truth++;
          if (!reported.has(b)) missed++;
        } else if (reported.has(b)) over++;
      }
      const context = `devfilter:cbt:c:since:${n}`;
      if ([...client.metaContexts.values()].includes(context)) {
        const viaNbd = await contextBlocks(client, context);
        assert.deepEqual([...viaNbd].sort(), [...reported].sort(), `context since:${n}`);
      }
    }
    process.stdout.write(
      `# cbt model (${what}): ${ops} requests, ${status.generation} generations; blocks changed since N summed over N: ${truth}, missed ${missed}, over-reported ${over} (${truth > 0 ? ((100 * over) / truth).toFixed(2) : 0}%)\n`,
    );
    assert.equal(missed, 0, 'a changed block is missing from the map');
  }

  test('random changes from several connections: nothing missed since any generation', async () => {
    const clients = await Promise.all([
      NbdClient.fromUri(fx.uri, { metaContexts: [] }),
      NbdClient.fromUri(fx.uri, { metaContexts: [] }),
    ]);
    const reader = await NbdClient.fromUri(fx.uri, {
      metaContexts: [
        'devfilter:cbt:c:since:1',
        ...Array.from({ length: 40 }, (_, i) => `devfilter:cbt:c:since:${i + 2}`),
      ],
    });
    try {
      for (let round = 0; round < 6; round++) {
        await traffic(100 + round, 25, clients);
        // A quiet boundary too: generation with nothing in flight.
        known = (await fx.control<{ current: number }>('c', 'generation')).current;
      }
      await check('live', reader);
      const s = fx.status<{ persistence: { compactions: number; lastError: string | null } }>('c');
      assert.ok(s.persistence.compactions > 0, 'the journal was folded into the map');
      assert.equal(s.persistence.lastError, null);
    } finally {
      for (const c of [...clients, reader]) await c.close();
    }
  });

  test('detach and attach again: the same map, history and generation', async () => {
    const before = fx.status<{ id: string; generation: number }>('c');
    const all = await fx.control<Changed>('c', 'changed', { since: 1 });
    await fx.manager.removeFilter('mem', 'c');
    await fx.manager.createFilter('mem', 'cbt', { name: 'c', args: args() });
    const s = fx.status<{
      id: string;
      generation: number;
      persistence: { state: string; recovered: boolean };
    }>('c');
    assert.equal(s.id, before.id);
    assert.equal(s.generation, before.generation);
    assert.equal(s.persistence.state, 'clean');
    assert.equal(s.persistence.recovered, false);
    assert.deepEqual(await fx.control<Changed>('c', 'changed', { since: 1 }), all);
    const reader = await NbdClient.fromUri(fx.uri, {
      metaContexts: ['devfilter:cbt:c:since:1', 'devfilter:cbt:c:since:3'],
    });
    try {
      await check('after re-attach', reader);
    } finally {
      await reader.close();
    }
  });

  test('reset: a new id, nothing changed, old ids refused', async () => {
    const before = fx.status<{ id: string }>('c');
    const r = await fx.control<{ id: string; previousId: string; generation: number }>(
      'c',
      'reset',
    );
    assert.equal(r.previousId, before.id);
    assert.notEqual(r.id, before.id);
    assert.equal(r.generation, 1);
    const c = await fx.control<Changed>('c', 'changed', { since: 1 });
    assert.equal(c.blocks, 0);
    await assert.rejects(
      fx.control('c', 'changed', { since: 1, id: before.id }),
      /history was reset.*full backup/,
    );
    // The reset is durable: a detach/attach keeps the new id.
    await fx.manager.removeFilter('mem', 'c');
    await fx.manager.createFilter('mem', 'cbt', { name: 'c', args: args() });
    assert.equal(fx.status<{ id: string }>('c').id, r.id);
  });
});
