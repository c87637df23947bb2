/**
 * Filters attached and detached live: while several connections do verified I/O (every read
 * checked against what that connection wrote), stats, fault and throttle filters are created
 * and removed in varying orders and positions. No request may fail and no write may be lost.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { KiB, MiB, pattern, startFixture, type Fixture } from './fixture.js';

const CONNECTIONS = 4;
/** Loops per connection: requests of one connection overlap, as with real clients. */
const LOOPS = 2;
const WORKERS = CONNECTIONS * LOOPS;
/** Each loop owns a region, so its model of the data stays exact. */
const REGION = MiB;
const BLOCK = 16 * KiB;
const BLOCKS = REGION / BLOCK;

describe('live attach and detach', () => {
  let fx: Fixture;
  before(async () => {
    fx = await startFixture({ size: WORKERS * REGION + 4 * MiB });
  });
  after(async () => {
    await fx.close();
  });

  test('stats, fault and throttle come and go under verified I/O without an error', async (t) => {
    const clients = await Promise.all(Array.from({ length: CONNECTIONS }, () => fx.connect()));
    // model[w][b]: the seed of the pattern last written to block b of worker w's region (0: zeros).
    const model = Array.from({ length: WORKERS }, () => new Array<number>(BLOCKS).fill(0));
    let stop = false;
    const ops = new Array<number>(WORKERS).fill(0);
    let seed = 1;
    const worker = async (w: number): Promise<void> => {
      const c = clients[w % CONNECTIONS]!;
      const base = w * REGION;
      while (!stop) {
        const b = Math.floor(Math.random() * BLOCKS);
        const r = Math.random();
        if (r < 0.45) {
          const s = seed++;
          await c.write(base + b * BLOCK, pattern(BLOCK, s));
          model[w]![b] = s;
        } else if (r < 0.9) {
          const got = await c.read(base + b * BLOCK, BLOCK);
          const s = model[w]![b]!;
          assert.deepEqual(
            got,
            s === 0 ? Buffer.alloc(BLOCK) : pattern(BLOCK, s),
            `worker ${w} block ${b}`,
          );
        } else if (r < 0.95) {
          await c.writeZeroes(base + b * BLOCK, BLOCK);
          model[w]![b] = 0;
        } else {
          await c.flush();
        }
        ops[w]!++;
      }
    };
    const running = Promise.all(Array.from({ length: WORKERS }, (_, w) => worker(w)));
    // Stop the loops at the first failure rather than after the schedule below.
    running.catch(() => (stop = true));
    const pause = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));
    const outside = WORKERS * REGION; // the fault filter's rules aim past every worker's region

    const m = fx.manager;
    let statsSeen = 0;
    for (let cycle = 0; cycle < 4; cycle++) {
      await m.createFilter('mem', 'stats', { name: 'stats' });
      await pause(60);
      await m.createFilter('mem', 'fault', {
        name: 'fault',
        position: { below: 'stats' },
        args: {
          seed: cycle,
          rules: [
            { action: 'delay', ops: 'read', delayMs: 1, probability: 0.2 },
            { action: 'error', start: outside, errno: 'EIO' },
            { action: 'drop', start: outside },
          ],
        },
      });
      await pause(60);
      await m.createFilter('mem', 'throttle', {
        name: 'throttle',
        position: cycle % 2 === 0 ? { at: 'top' } : { at: 'bottom' },
        args: { iops: 4000, bps: '64M' },
      });
      await pause(80);
      await m.control('mem', 'throttle', 'set', { iops: 1500 });
      await m.control('mem', 'fault', 'add-rule', {
        action: 'error',
        ops: 'write',
        start: outside,
        end: outside + 4096,
      });
      await pause(80);
      const s = m.filterStatus('mem', 'stats').status as {
        totals: { requests: number; errors: number };
      };
      assert.equal(s.totals.errors, 0);
      statsSeen += s.totals.requests;
      // Remove in a different order each cycle.
      const order = [
        ['stats', 'fault', 'throttle'],
        ['throttle', 'stats', 'fault'],
        ['fault', 'throttle', 'stats'],
        ['throttle', 'fault', 'stats'],
      ][cycle]!;
      for (const name of order) {
        await m.removeFilter('mem', name);
        await pause(30);
      }
    }
    // And the short way: everything at once.
    await m.createFilter('mem', 'throttle', { name: 'throttle', args: { iops: 3000 } });
    await m.createFilter('mem', 'stats', { name: 'stats', args: { trace: 100 } });
    await m.createFilter('mem', 'fault', { name: 'fault' });
    await pause(80);
    assert.equal(await m.removeAll('mem'), 3);
    await pause(50);
    stop = true;
    await running;

    // Everything every worker believes it wrote is there.
    for (let w = 0; w < WORKERS; w++) {
      const all = await clients[w % CONNECTIONS]!.read(w * REGION, REGION);
      for (let b = 0; b < BLOCKS; b++) {
        const s = model[w]![b]!;
        assert.ok(
          all
            .subarray(b * BLOCK, (b + 1) * BLOCK)
            .equals(s === 0 ? Buffer.alloc(BLOCK) : pattern(BLOCK, s)),
          `worker ${w} block ${b}`,
        );
      }
    }
    const total = ops.reduce((a, b) => a + b, 0);
    const st = fx.exp.stack.stats();
    t.diagnostic(
      `${total} verified requests across ${fx.exp.stack.stats().changes} stack changes (last pause ${st.lastPauseMs.toFixed(2)} ms); stats filters counted ${statsSeen}`,
    );
    assert.ok(total > 200, `enough I/O happened (${total})`);
    assert.ok(statsSeen > 0);
    assert.equal(st.inFlight, 0);
    assert.equal(fx.exp.stack.filters().length, 0);
  });
});
