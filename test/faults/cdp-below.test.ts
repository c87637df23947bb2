/**
 * Faults beneath the cdp filter (torture issue, item 2): a seeded `fault` filter between the
 * cdp filter and the backend fails reads (so the filter's fetch of a block's old content),
 * writes, trims, zeroing, flushes and block status, tears writes and drops some, while several
 * connections write over one another. Every request must be answered — success or an errno,
 * no hang — and the filter must not mistake a failing device for a failing journal: after the
 * faults are gone the history is whole, every mark taken between rounds (nothing in flight)
 * shows exactly what the device below held at that moment, a rollback to a mark restores it,
 * and a detach and attach with the same dir reopens the journal cleanly.
 */
import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { pattern } from '../filters/fixture.js';
import {
  KiB,
  MiB,
  Rng,
  firstDiff,
  readAll,
  readAllNbd,
  startSnapFixture,
  type SnapFixture,
} from '../snapshot/fixture.js';
import {
  FAULT_RULES,
  Tally,
  injected,
  randomRequest,
  seedFrom,
  type RequestMix,
} from './common.js';

const SIZE = 2 * MiB;
const BLOCK = 4 * KiB;
/** Anywhere on the device, unaligned now and then: connections overlap. */
const MIX: RequestMix = {
  size: SIZE,
  block: BLOCK,
  unaligned: 0.2,
  unalignedBlocks: 3,
  alignedBlocks: 8,
  write: 0.6,
  trim: 0.72,
  zero: 0.84,
  read: 0.95,
};
const SEED = seedFrom('CDP_FAULT_SEED');
const ROUNDS = 6;
const WORKERS = 4;
const OPS_PER_WORKER = 50;

interface Status {
  state: string;
  failure: unknown;
  newest: { point: number };
  recovery: { state: string; tornBytes: number; notes: string[] };
  rollback: { state: string } | null;
}

describe(`faults below the cdp filter (CDP_FAULT_SEED=${SEED})`, () => {
  let fx: SnapFixture;
  let dir: string;
  const args = () => ({ dir, blockSize: BLOCK, keepBytes: '64M', segmentSize: '256K' });
  const status = () => fx.manager.filterStatus('disk', 'cdp').status as Status;
  /** What the device held at each mark, read beneath every filter. */
  const truth = new Map<string, Buffer>();

  before(async () => {
    fx = await startSnapFixture([{ name: 'disk', size: SIZE }]);
    dir = join(fx.dir, 'cdp');
    mkdirSync(dir);
  });
  after(async () => {
    await fx.close();
  });

  async function checkMarks(when: string): Promise<void> {
    for (const [name, want] of truth) {
      const v = (await fx.manager.control('disk', 'cdp', 'view', { mark: name })) as {
        name: string;
      };
      const c = await fx.connect(v.name);
      const got = await readAllNbd(c);
      await c.close();
      await fx.manager.control('disk', 'cdp', 'close-view', { name: v.name });
      const at = firstDiff(got, want);
      assert.equal(
        at,
        -1,
        `${when}: view of mark ${name} differs from the device at the mark at byte ${at} (block ${Math.floor(at / BLOCK)})`,
      );
    }
  }

  test('every request is answered; views of marks equal the device at the mark', async (t) => {
    const rng = new Rng(SEED);
    await fx.manager.createFilter('disk', 'cdp', { name: 'cdp', args: args() });
    // Below the cdp filter: its reads of old content and the changes themselves meet the faults.
    await fx.manager.createFilter('disk', 'fault', {
      name: 'faults',
      args: { seed: SEED, rules: [] },
      position: { at: 'bottom' },
    });
    const clients = await Promise.all(Array.from({ length: WORKERS }, () => fx.connect('disk')));
    await clients[0]!.write(0, pattern(SIZE, SEED));
    const tally = new Tally();

    for (let round = 0; round < ROUNDS; round++) {
      // A mark with nothing in flight and the faults off: the model is the device below.
      await fx.manager.control('disk', 'faults', 'clear', {});
      const name = `r${round}`;
      await fx.manager.control('disk', 'cdp', 'mark', { name });
      truth.set(name, await readAll(fx.backend('disk')));
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
    await fx.manager.control('disk', 'cdp', 'mark', { name: 'end' });
    truth.set('end', await readAll(fx.backend('disk')));
    t.diagnostic(tally.toString());
    t.diagnostic(`injected: ${injected(fx, 'disk')}`);
    assert.ok(tally.ok > 0 && tally.failed > 0, 'the faults hit some requests and spared others');
    assert.ok(!tally.errors.has('EPERM'), 'nothing here refuses a request');

    // A failing device is not a failing journal: the history is whole.
    const s = status();
    assert.equal(s.failure, null, `the journal was not failed: ${JSON.stringify(s.failure)}`);
    assert.equal(s.state, 'active');
    await checkMarks('faults cleared');
    t.diagnostic(`${truth.size} marks checked, newest point ${s.newest.point}`);
    // The export still serves through the whole stack.
    await clients[0]!.write(0, pattern(BLOCK, 7));
    assert.ok((await clients[0]!.read(0, BLOCK)).equals(pattern(BLOCK, 7)));
    await fx.manager.control('disk', 'cdp', 'mark', { name: 'after' });
    truth.set('after', await readAll(fx.backend('disk')));
  });

  test('a rollback to a mark taken during the faults restores it; its undo the present', async () => {
    await fx.manager.removeFilter('disk', 'faults');
    const target = `r${Math.floor(ROUNDS / 2)}`;
    const present = await readAll(fx.backend('disk'));
    const r = (await fx.manager.control('disk', 'cdp', 'rollback', { mark: target })) as {
      id: number;
    };
    let got = await readAll(fx.backend('disk'));
    assert.equal(firstDiff(got, truth.get(target)!), -1, `rolled back to ${target}`);
    await fx.manager.control('disk', 'cdp', 'rollback', { mark: `before-rollback-${r.id}` });
    got = await readAll(fx.backend('disk'));
    assert.equal(firstDiff(got, present), -1, 'the undo brought the present back');
    assert.equal(status().rollback?.state, 'done');
  });

  test('detach and attach with the same dir: the journal reopens cleanly, marks intact', async () => {
    const recovered = () => fx.events.filter((e) => e.event === 'cdp.recovered').length;
    const failed = () => fx.events.filter((e) => e.event === 'cdp.failed').length;
    const before = recovered();
    const newest = status().newest.point;
    await fx.manager.removeFilter('disk', 'cdp', { policy: 'keep' });
    await fx.manager.createFilter('disk', 'cdp', { name: 'cdp', args: args() });
    const s = status();
    assert.equal(s.state, 'active');
    assert.equal(s.failure, null);
    assert.equal(s.recovery.state, 'opened', 'the history was continued, not started anew');
    assert.deepEqual(s.recovery.notes, [], 'no history given up or dropped');
    assert.equal(s.recovery.tornBytes, 0);
    assert.equal(s.newest.point, newest, 'every change is still in the history');
    assert.equal(recovered(), before, 'no recovery was needed');
    assert.equal(failed(), 0, 'the journal never failed');
    await checkMarks('after re-attach');
  });
});
