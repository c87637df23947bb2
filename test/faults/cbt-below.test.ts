/**
 * Faults beneath the cbt filter (torture issue, item 2): a seeded `fault` filter between the
 * cbt filter and the backend fails writes, trims, zeroing, reads, flushes and block status,
 * tears writes and drops some, while several connections write over one another and a new
 * generation begins between rounds. The map may over-report (a request that failed below
 * stays marked) but never under-report: every block whose content, read beneath every filter,
 * differs between the start of generation N and a later generation start (or the end) is
 * reported changed since N — by `changed` and by the block-status context alike — and the
 * map, its id and generation come back unchanged after a detach and attach.
 */
import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import type { NbdClient } from '../../src/nbd/client.js';
import { pattern } from '../filters/fixture.js';
import { KiB, MiB, Rng, readAll, startSnapFixture, type SnapFixture } from '../snapshot/fixture.js';
import {
  FAULT_RULES,
  Tally,
  connectWith,
  injected,
  randomRequest,
  seedFrom,
  type RequestMix,
} from './common.js';

const SIZE = 4 * MiB;
const BLOCK = 4 * KiB;
const BLOCKS = SIZE / BLOCK;
/** Mostly a few blocks, unaligned now and then, anywhere: connections overlap. */
const MIX: RequestMix = {
  size: SIZE,
  block: BLOCK,
  unaligned: 0.25,
  unalignedBlocks: 2,
  alignedBlocks: 6,
  write: 0.65,
  trim: 0.8,
  zero: 0.92,
  read: 0.97,
};
const SEED = seedFrom('CBT_FAULT_SEED');
const ROUNDS = 6;
const WORKERS = 4;
const OPS_PER_WORKER = 30;

interface Changed {
  id: string;
  generation: number;
  extents: Array<{ offset: number; length: number }>;
  next: number | null;
}

interface Status {
  id: string;
  generation: number;
  persistence: { state: string; recovered: boolean; lastError: string | null; notes: string[] };
}

/** The blocks whose content differs between two images of the device. */
function differing(a: Buffer, b: Buffer): number[] {
  const out: number[] = [];
  for (let i = 0; i < BLOCKS; i++) {
    const at = i * BLOCK;
    if (!a.subarray(at, at + BLOCK).equals(b.subarray(at, at + BLOCK))) out.push(i);
  }
  return out;
}

describe(`faults below the cbt filter (CBT_FAULT_SEED=${SEED})`, () => {
  let fx: SnapFixture;
  let dir: string;
  const args = () => ({ dir, blockSize: BLOCK, journalLimit: 4096 });
  const status = () => fx.manager.filterStatus('disk', 'cbt').status as Status;
  /** The device below every filter at the start of each generation (and 'end'). */
  const starts: Array<{ generation: number; image: Buffer }> = [];
  let final: Buffer;

  before(async () => {
    fx = await startSnapFixture([{ name: 'disk', size: SIZE }]);
    dir = join(fx.dir, 'cbt');
    mkdirSync(dir);
  });
  after(async () => {
    await fx.close();
  });

  async function changedSince(n: number): Promise<Set<number>> {
    const c = (await fx.manager.control('disk', 'cbt', 'changed', { since: n })) as Changed;
    assert.equal(c.next, null);
    const out = new Set<number>();
    for (const e of c.extents)
      for (let b = e.offset / BLOCK; b < Math.ceil((e.offset + e.length) / BLOCK); b++) out.add(b);
    return out;
  }

  async function contextBlocks(c: NbdClient, context: string): Promise<Set<number>> {
    const out = new Set<number>();
    for (let offset = 0; offset < SIZE;) {
      const extents = (await c.blockStatus(offset, SIZE - offset)).get(context);
      assert.ok(extents !== undefined && extents.length > 0, `status for ${context}`);
      for (const e of extents) {
        if (e.flags & 1)
          for (let b = offset / BLOCK; b < Math.ceil((offset + e.length) / BLOCK); b++) out.add(b);
        offset += e.length;
      }
    }
    return out;
  }

  /** No block that changed after the start of a generation is missing from "since" it. */
  async function checkMap(when: string, t: { diagnostic(s: string): void }): Promise<void> {
    const reader = await connectWith(fx, 'disk', {
      metaContexts: starts.map((s) => `devfilter:cbt:cbt:since:${s.generation}`),
    });
    let truth = 0;
    let over = 0;
    try {
      for (let i = 0; i < starts.length; i++) {
        const { generation, image } = starts[i]!;
        const reported = await changedSince(generation);
        // Every later image: changed since N covers what differs from the start of N.
        const must = new Set<number>();
        for (let j = i + 1; j <= starts.length; j++) {
          const later = j < starts.length ? starts[j]!.image : final;
          for (const b of differing(image, later)) must.add(b);
        }
        const missed = [...must].filter((b) => !reported.has(b));
        assert.deepEqual(
          missed,
          [],
          `${when}: blocks changed since generation ${generation} missing from the map`,
        );
        truth += must.size;
        over += reported.size - must.size;
        const viaNbd = await contextBlocks(reader, `devfilter:cbt:cbt:since:${generation}`);
        assert.deepEqual(
          [...viaNbd].sort((a, b) => a - b),
          [...reported].sort((a, b) => a - b),
          `${when}: the context since:${generation} reports what \`changed\` does`,
        );
      }
    } finally {
      await reader.close();
    }
    t.diagnostic(
      `${when}: ${starts.length} generations, changed blocks summed over them ${truth}, over-reported ${over}`,
    );
  }

  test('the map never under-reports what the device below shows changed', async (t) => {
    const rng = new Rng(SEED);
    await fx.manager.createFilter('disk', 'cbt', { name: 'cbt', args: args() });
    await fx.manager.createFilter('disk', 'fault', {
      name: 'faults',
      args: { seed: SEED, rules: [] },
      position: { at: 'bottom' },
    });
    const clients = await Promise.all(Array.from({ length: WORKERS }, () => fx.connect('disk')));
    await clients[0]!.write(0, pattern(SIZE, SEED));
    const tally = new Tally();

    for (let round = 0; round < ROUNDS; round++) {
      // A generation with nothing in flight and the faults off: its start is the device below.
      await fx.manager.control('disk', 'faults', 'clear', {});
      const g = (await fx.manager.control('disk', 'cbt', 'generation', {})) as {
        current: number;
      };
      starts.push({ generation: g.current, image: await readAll(fx.backend('disk')) });
      await fx.manager.control('disk', 'faults', 'set-rules', { rules: FAULT_RULES });

      await Promise.all(
        clients.map(async (c, w) => {
          for (let i = 0; i < OPS_PER_WORKER; i++) {
            const o = await randomRequest(
              c,
              rng,
              MIX,
              `round ${round} worker ${w} op ${i}`,
              round * 10000 + w * 1000 + i,
            );
            tally.add(o);
          }
        }),
      );
    }
    await fx.manager.control('disk', 'faults', 'clear', {});
    final = await readAll(fx.backend('disk'));
    t.diagnostic(tally.toString());
    t.diagnostic(`injected: ${injected(fx, 'disk')}`);
    assert.ok(tally.ok > 0 && tally.failed > 0, 'the faults hit some requests and spared others');
    assert.ok(!tally.errors.has('EPERM'), 'nothing here refuses a request');
    // The state's disk did not fail: the device's errors are not the journal's.
    assert.equal(status().persistence.lastError, null);
    await checkMap('faults cleared', t);
  });

  test('the map survives a detach and attach: same id, generation and changes', async (t) => {
    await fx.manager.removeFilter('disk', 'faults');
    const before = status();
    const all = new Map<number, Set<number>>();
    for (const s of starts) all.set(s.generation, await changedSince(s.generation));
    await fx.manager.removeFilter('disk', 'cbt', { policy: 'keep' });
    await fx.manager.createFilter('disk', 'cbt', { name: 'cbt', args: args() });
    const s = status();
    assert.equal(s.id, before.id);
    assert.equal(s.generation, before.generation);
    assert.equal(s.persistence.state, 'clean');
    assert.equal(s.persistence.recovered, false);
    assert.deepEqual(s.persistence.notes, []);
    for (const [n, blocks] of all)
      assert.deepEqual(await changedSince(n), blocks, `changed since ${n} after re-attach`);
    await checkMap('after re-attach', t);
  });
});
