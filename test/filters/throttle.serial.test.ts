/**
 * Timing-sensitive, so it runs alone after the rest of the suite (".serial" in the name, see
 * scripts/run-tests.js). The throttle filter through real NBD connections: measured IOPS and bytes/s within 10% of
 * the limits, a fair share for two connections (one greedy), limits changed live, queued
 * requests released when a limit is lifted, and validation.
 */
import assert from 'node:assert/strict';
import { after, afterEach, before, describe, test } from 'node:test';
import { KiB, MiB, pattern, startFixture, type Fixture } from './fixture.js';

interface ThrottleStatus {
  limits: Record<string, number>;
  buckets: Record<string, { rate: number; capacity: number; tokens: number }>;
  queued: {
    read: number;
    write: number;
    connections: Array<{ id: number; client: string; read: number; write: number }>;
  };
  read: { passed: number; bytes: number; throttled: number; waitMs: number; maxWaitMs: number };
  write: { passed: number; bytes: number; throttled: number; waitMs: number; maxWaitMs: number };
}

/**
 * Runs `concurrency` loops of `op` for `ms`, recording completion times (relative to the
 * start); returns them with the elapsed time.
 */
async function load(
  ms: number,
  concurrency: number,
  op: () => Promise<unknown>,
): Promise<number[]> {
  const t0 = performance.now();
  const done: number[] = [];
  await Promise.all(
    Array.from({ length: concurrency }, async () => {
      while (performance.now() - t0 < ms) {
        await op();
        done.push(performance.now() - t0);
      }
    }),
  );
  return done;
}

/** Completions per second inside [from, to) ms. */
function rateIn(times: number[], from: number, to: number, weight = 1): number {
  return (times.filter((t) => t >= from && t < to).length * weight) / ((to - from) / 1000);
}

describe('throttle filter', () => {
  let fx: Fixture;
  before(async () => {
    fx = await startFixture({ size: 64 * MiB });
  });
  after(async () => {
    await fx.close();
  });
  // A failed assertion must not leave its throttle behind for the next test.
  afterEach(async () => {
    await fx.manager.removeAll('mem');
  });

  test('IOPS and bytes/s limits hold within 10%', async (t) => {
    await fx.manager.createFilter('mem', 'throttle', {
      name: 't',
      args: { readIops: '200', writeBps: '4M', burst: '0.05' },
    });
    const a = await fx.connect();
    const b = await fx.connect();
    const block = pattern(64 * KiB, 1);
    // Reads and writes are separate classes with separate buckets: measure both at once.
    const [reads, writes] = await Promise.all([
      load(2200, 8, () => a.read(Math.floor(Math.random() * 1000) * 4096, 4096)),
      load(2200, 8, () => b.write(Math.floor(Math.random() * 900) * 64 * KiB, block)),
    ]);
    // Steady state: after the initial burst has been spent.
    const iops = rateIn(reads, 200, 2200);
    const bps = rateIn(writes, 200, 2200, 64 * KiB);
    t.diagnostic(
      `read IOPS ${iops.toFixed(1)} (limit 200, ${((iops / 200 - 1) * 100).toFixed(2)}%)`,
    );
    t.diagnostic(
      `write bytes/s ${(bps / MiB).toFixed(3)} MiB/s (limit 4 MiB/s, ${((bps / (4 * MiB) - 1) * 100).toFixed(2)}%)`,
    );
    assert.ok(Math.abs(iops / 200 - 1) < 0.1, `read IOPS ${iops}`);
    assert.ok(Math.abs(bps / (4 * MiB) - 1) < 0.1, `write bytes/s ${bps}`);
    const s = fx.status<ThrottleStatus>('t');
    assert.deepEqual(Object.keys(s.buckets).sort(), ['readIops', 'writeBps']);
    assert.equal(s.read.passed, reads.length);
    assert.equal(s.write.bytes, writes.length * 64 * KiB);
    assert.ok(s.read.throttled > 0 && s.read.waitMs > 0);
    assert.equal(s.queued.read + s.queued.write, 0);
    // Flush, cache and block status are not throttled.
    const t0 = performance.now();
    for (let i = 0; i < 50; i++) {
      await a.flush();
      await a.cache(0, 4096);
      await a.blockStatus(0, MiB);
    }
    assert.ok(performance.now() - t0 < 1000);
    await fx.manager.removeFilter('mem', 't');
  });

  test('two connections get a fair share, however greedy one of them is', async (t) => {
    await fx.manager.createFilter('mem', 'throttle', {
      name: 'fair',
      args: { iops: 300, burst: 0.05 },
    });
    const greedy = await fx.connect();
    const polite = await fx.connect();
    const [g, p] = await Promise.all([
      load(2000, 32, () => greedy.read(Math.floor(Math.random() * 1000) * 4096, 4096)),
      load(2000, 4, () => polite.read(Math.floor(Math.random() * 1000) * 4096, 4096)),
    ]);
    // Steady state: after the first burst, and before the end (when the greedy one's last 32
    // requests have the device to themselves).
    const gr = rateIn(g, 200, 1900);
    const pr = rateIn(p, 200, 1900);
    const total = rateIn([...g, ...p], 200, 1900);
    t.diagnostic(
      `greedy (32 in flight) ${gr.toFixed(1)} IOPS, polite (4 in flight) ${pr.toFixed(1)} IOPS; total ${total.toFixed(1)} (limit 300)`,
    );
    assert.ok(Math.abs(gr / pr - 1) < 0.25, `greedy ${gr} vs polite ${pr}`);
    assert.ok(Math.abs(total / 300 - 1) < 0.1, `total IOPS ${total}`);
    await fx.manager.removeFilter('mem', 'fair');
  });

  test('limits changed live take effect at once', async (t) => {
    await fx.manager.createFilter('mem', 'throttle', {
      name: 'live',
      args: { iops: 100, burst: 0.05 },
    });
    const c = await fx.connect();
    const stop = performance.now() + 2000;
    const times: number[] = [];
    const t0 = performance.now();
    const workers = Array.from({ length: 8 }, async () => {
      while (performance.now() < stop) {
        await c.read(0, 4096);
        times.push(performance.now() - t0);
      }
    });
    await new Promise((resolve) => setTimeout(resolve, 1000));
    await fx.control('live', 'set', { iops: '400' });
    await Promise.all(workers);
    const before = rateIn(times, 100, 1000);
    const afterChange = rateIn(times, 1100, 2000);
    t.diagnostic(
      `100 IOPS limit: ${before.toFixed(1)}; after set iops=400: ${afterChange.toFixed(1)}`,
    );
    assert.ok(Math.abs(before / 100 - 1) < 0.15, `before: ${before}`);
    assert.ok(Math.abs(afterChange / 400 - 1) < 0.15, `after: ${afterChange}`);

    // Lifting the limit releases everything that waits, at once.
    await fx.control('live', 'set', { iops: 2 });
    await new Promise((resolve) => setTimeout(resolve, 1100)); // let the burst bucket drain
    const pending = Array.from({ length: 16 }, (_, i) => c.read(i * 4096, 4096));
    await new Promise((resolve) => setTimeout(resolve, 50));
    assert.ok(fx.status<ThrottleStatus>('live').queued.read >= 14);
    const s = fx.status<ThrottleStatus>('live');
    assert.equal(s.queued.connections.length, 1);
    assert.match(s.queued.connections[0]!.client, /^unix/);
    const released = performance.now();
    await fx.control('live', 'set', { iops: 0 });
    await Promise.all(pending);
    assert.ok(performance.now() - released < 200, 'released at once');
    assert.deepEqual(fx.status<ThrottleStatus>('live').buckets, {});
    await fx.manager.removeFilter('mem', 'live');
  });

  test('removing a throttle lets its queue go at once instead of waiting out the limit', async () => {
    await fx.manager.createFilter('mem', 'throttle', {
      name: 'slow',
      args: { iops: '2', burst: '0.5' },
    });
    const c = await fx.connect();
    // 2 IOPS: 40 queued reads would need 20 s, twice the change timeout.
    const reads = Array.from({ length: 40 }, (_, i) => c.read(i * 4096, 4096));
    await new Promise((r) => setTimeout(r, 100));
    const started = performance.now();
    await fx.manager.removeFilter('mem', 'slow', { timeoutMs: 2000 });
    await Promise.all(reads);
    assert.ok(performance.now() - started < 2000, 'the removal waited for the queue');
    assert.deepEqual(fx.manager.listFilters('mem'), []);
  });

  test('sizes, validation and reset', async () => {
    await fx.manager.createFilter('mem', 'throttle', {
      name: 'v',
      args: { bps: '1M', writeIopsBurst: 5, readBpsBurst: '128K', readBps: '2M' },
    });
    let s = fx.status<ThrottleStatus>('v');
    assert.equal(s.limits.bps, MiB);
    assert.deepEqual(s.buckets.bps, { rate: MiB, capacity: MiB, tokens: MiB });
    assert.equal(s.buckets.readBps!.capacity, 128 * KiB);
    assert.equal(s.buckets.writeIops, undefined, 'a bucket size alone sets no limit');
    await assert.rejects(fx.control('v', 'set', { iops: -1 }), /iops must be >= 0/);
    await assert.rejects(fx.control('v', 'set', { bps: 'fast' }), /bps: invalid size/);
    await assert.rejects(fx.control('v', 'set', { burst: 0 }), /burst must be > 0/);
    await assert.rejects(fx.control('v', 'set', { speed: 1 }), /unknown argument "speed"/);
    await assert.rejects(fx.control('v', 'nope'), /throttle has no command "nope"/);
    await assert.rejects(
      fx.manager.createFilter('mem', 'throttle', { args: { iops: 'lots' } }),
      /iops must be number/,
    );
    s = await fx.control<ThrottleStatus>('v', 'set', { writeIops: '50' });
    assert.equal(s.limits.writeIops, 50);
    assert.equal(s.buckets.writeIops!.capacity, 5);
    assert.equal(s.limits.bps, MiB, 'set changes only what it names');
    const c = await fx.connect();
    await c.write(0, pattern(4096, 1));
    assert.equal(fx.status<ThrottleStatus>('v').write.passed, 1);
    await fx.control('v', 'reset');
    assert.equal(fx.status<ThrottleStatus>('v').write.passed, 0);
    await fx.manager.removeFilter('mem', 'v');
  });
});
