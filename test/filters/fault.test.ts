/**
 * The fault filter through a real NBD connection: errors at exactly the configured range,
 * reproducible probabilistic faults by seed, count/after, delay, flakey cycles, dropped and torn
 * writes, live rule changes and validation.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { NbdRequestError, type NbdClient } from '../../src/nbd/client.js';
import { KiB, MiB, pattern, startFixture, type Fixture } from './fixture.js';

interface RuleStatus {
  id: number;
  action: string;
  ops: string[];
  start: number;
  end: number | null;
  matches: number;
  hits: number;
  exhausted: boolean;
  state?: string;
}
interface FaultStatus {
  seed: number;
  rules: RuleStatus[];
  injected: {
    errors: number;
    delayed: number;
    dropped: number;
    droppedBytes: number;
    torn: number;
  };
}

/** The errno name a request failed with, or null if it succeeded. */
async function outcome(p: Promise<unknown>): Promise<string | null> {
  try {
    await p;
    return null;
  } catch (err) {
    if (err instanceof NbdRequestError) return err.errnoName ?? String(err.errno);
    throw err;
  }
}

describe('fault filter', () => {
  let fx: Fixture;
  let c: NbdClient;
  before(async () => {
    fx = await startFixture();
    c = await fx.connect();
  });
  after(async () => {
    await fx.close();
  });

  test('no rules: everything passes', async () => {
    await fx.manager.createFilter('mem', 'fault', { name: 'f' });
    await c.write(0, pattern(64 * KiB, 1));
    assert.deepEqual(await c.read(0, 64 * KiB), pattern(64 * KiB, 1));
    await c.flush();
    await c.trim(MiB, 64 * KiB);
    await c.writeZeroes(2 * MiB, 64 * KiB);
    await c.cache(0, MiB);
    await c.blockStatus(0, MiB);
    const s = fx.status<FaultStatus>('f');
    assert.equal(s.rules.length, 0);
    assert.ok(Number.isInteger(s.seed), 'a random seed is reported');
  });

  test('EIO at exactly the configured range, and not outside it', async () => {
    const start = MiB + 1000; // deliberately unaligned
    const end = MiB + 9000;
    await fx.control('f', 'set-rules', { rules: [{ action: 'error', ops: 'read', start, end }] });
    // 512-byte reads across [1 MiB - 4 KiB, 1 MiB + 16 KiB): a read fails iff it overlaps [start, end).
    let expected = 0;
    for (let off = MiB - 4096; off < MiB + 16384; off += 512) {
      const overlaps = off < end && off + 512 > start;
      if (overlaps) expected++;
      assert.equal(await outcome(c.read(off, 512)), overlaps ? 'EIO' : null, `read at ${off}`);
    }
    // One byte either side of the range.
    assert.equal(await outcome(c.read(start - 1, 1)), null);
    assert.equal(await outcome(c.read(start, 1)), 'EIO');
    assert.equal(await outcome(c.read(end - 1, 1)), 'EIO');
    assert.equal(await outcome(c.read(end, 1)), null);
    // Writes to the range are not affected: the rule names reads only.
    assert.equal(await outcome(c.write(start, pattern(8000, 2))), null);
    const s = fx.status<FaultStatus>('f');
    assert.equal(expected, 17);
    assert.equal(s.rules[0]!.hits, expected + 2);
  });

  test('errno, ops list and sizes given as strings (the command line form)', async () => {
    await fx.control('f', 'set-rules', {
      rules: '[{"action":"error","ops":"write,trim","start":"2M","end":"3M","errno":"ENOSPC"}]',
    });
    assert.equal(await outcome(c.write(2 * MiB, pattern(4096, 1))), 'ENOSPC');
    assert.equal(await outcome(c.trim(3 * MiB - 4096, 4096)), 'ENOSPC');
    assert.equal(await outcome(c.writeZeroes(2 * MiB, 4096)), null);
    assert.equal(await outcome(c.write(3 * MiB, pattern(4096, 1))), null);
    assert.equal(await outcome(c.read(2 * MiB, 4096)), null);
    // A flush has no range: a rule with a range never matches it; one without does.
    await fx.control('f', 'add-rule', { action: 'error', start: '2M', end: '3M' });
    assert.equal(await outcome(c.flush()), null);
    // add-rule takes the rule as its arguments, all strings.
    const added = await fx.control<RuleStatus>('f', 'add-rule', {
      action: 'error',
      ops: 'flush',
      errno: 'EIO',
      count: '1',
    });
    assert.equal(await outcome(c.flush()), 'EIO');
    assert.equal(await outcome(c.flush()), null, 'count=1: fired once');
    assert.equal(fx.status<FaultStatus>('f').rules.find((r) => r.id === added.id)!.exhausted, true);
    await fx.control('f', 'remove-rule', { id: String(added.id) });
    assert.equal(fx.status<FaultStatus>('f').rules.length, 2);
    await fx.control('f', 'clear');
    assert.equal(await outcome(c.write(2 * MiB, pattern(4096, 1))), null);
  });

  test('after and count', async () => {
    await fx.control('f', 'set-rules', {
      rules: [{ action: 'error', ops: 'write', after: 3, count: 2 }],
    });
    const results: Array<string | null> = [];
    for (let i = 0; i < 8; i++) results.push(await outcome(c.write(i * 4096, pattern(4096, i))));
    assert.deepEqual(results, [null, null, null, 'EIO', 'EIO', null, null, null]);
    const r = fx.status<FaultStatus>('f').rules[0]!;
    assert.equal(r.hits, 2);
    assert.equal(r.matches, 5, 'matching stops once the rule is exhausted');
  });

  test('probability with a seed is reproducible', async () => {
    const run = async (seed: number): Promise<string> => {
      await fx.control('f', 'set-rules', {
        seed,
        rules: [
          { action: 'error', ops: 'write', probability: 0.3 },
          { action: 'error', ops: 'read', probability: '0.5', errno: 'EPERM' },
        ],
      });
      let failures = '';
      for (let i = 0; i < 200; i++) {
        failures +=
          (await outcome(c.write((i % 64) * 4096, pattern(4096, i)))) === null ? '.' : 'W';
        failures += (await outcome(c.read((i % 64) * 4096, 512))) === null ? '.' : 'R';
      }
      return failures;
    };
    const a = await run(42);
    const b = await run(42);
    const other = await run(43);
    assert.equal(a, b, 'same seed, same failures');
    assert.notEqual(a, other, 'another seed, other failures');
    const writes = [...a].filter((ch) => ch === 'W').length;
    const reads = [...a].filter((ch) => ch === 'R').length;
    assert.ok(writes > 35 && writes < 85, `~30% of 200 writes fail (${writes})`);
    assert.ok(reads > 70 && reads < 130, `~50% of 200 reads fail (${reads})`);
    assert.equal(fx.status<FaultStatus>('f').seed, 43);
    // A filter created with the seed replays the same sequence too.
    await fx.manager.removeFilter('mem', 'f');
    await fx.manager.createFilter('mem', 'fault', {
      name: 'f',
      args: {
        seed: '42',
        rules: JSON.stringify([
          { action: 'error', ops: 'write', probability: 0.3 },
          { action: 'error', ops: 'read', probability: 0.5, errno: 'EPERM' },
        ]),
      },
    });
    let again = '';
    for (let i = 0; i < 200; i++) {
      again += (await outcome(c.write((i % 64) * 4096, pattern(4096, i)))) === null ? '.' : 'W';
      again += (await outcome(c.read((i % 64) * 4096, 512))) === null ? '.' : 'R';
    }
    assert.equal(again, a);
  });

  test('delay holds matching requests, then passes them', async () => {
    await fx.control('f', 'set-rules', {
      rules: [{ action: 'delay', ops: 'read', delayMs: 120, start: 0, end: MiB }],
    });
    await c.write(0, pattern(4096, 7));
    let t = performance.now();
    assert.deepEqual(await c.read(0, 4096), pattern(4096, 7));
    const slow = performance.now() - t;
    assert.ok(slow >= 115, `delayed read took ${slow.toFixed(1)} ms`);
    t = performance.now();
    await c.read(2 * MiB, 4096);
    const fast = performance.now() - t;
    assert.ok(fast < 60, `read outside the range took ${fast.toFixed(1)} ms`);
    // Delays combine with a later rule: delayed, then failed.
    await fx.control('f', 'add-rule', { action: 'error', ops: 'read', start: 0, end: 4096 });
    t = performance.now();
    assert.equal(await outcome(c.read(0, 512)), 'EIO');
    assert.ok(performance.now() - t >= 115);
    assert.equal(fx.status<FaultStatus>('f').injected.delayed, 2);
    await fx.control('f', 'clear');
  });

  test('flakey: up, then down, in cycles', async () => {
    await fx.control('f', 'set-rules', {
      rules: [{ action: 'flakey', ops: 'read', upMs: 150, downMs: 150, errno: 'EIO' }],
    });
    const t0 = performance.now();
    const samples: Array<{ at: number; ok: boolean }> = [];
    while (performance.now() - t0 < 600) {
      const at = performance.now() - t0;
      const r = await outcome(c.read(0, 512));
      samples.push({ at, ok: r === null });
      await new Promise((resolve) => setTimeout(resolve, 10));
    }
    // Away from the phase edges (±20 ms for scheduling), the outcome follows the cycle.
    const inside = samples.filter((s) => s.at % 150 > 20 && s.at % 150 < 130);
    for (const s of inside) {
      const down = Math.floor(s.at / 150) % 2 === 1;
      assert.equal(s.ok, !down, `read at ${s.at.toFixed(0)} ms`);
    }
    assert.ok(inside.some((s) => s.ok) && inside.some((s) => !s.ok));
    await fx.control('f', 'clear');
  });

  test('drop: a write is lost silently, reads pass', async () => {
    await c.write(4 * MiB, pattern(8192, 100));
    await fx.control('f', 'set-rules', {
      rules: [{ action: 'drop', start: 4 * MiB, end: 5 * MiB }],
    });
    assert.deepEqual(fx.status<FaultStatus>('f').rules[0]!.ops, ['write', 'trim', 'zero']);
    await c.write(4 * MiB, pattern(8192, 200)); // reported success
    await c.writeZeroes(4 * MiB, 4096);
    await c.trim(4 * MiB + 4096, 4096);
    await c.flush();
    assert.deepEqual(await c.read(4 * MiB, 8192), pattern(8192, 100), 'old data is still there');
    await c.write(5 * MiB, pattern(4096, 3)); // outside: not dropped
    assert.deepEqual(await c.read(5 * MiB, 4096), pattern(4096, 3));
    const s = fx.status<FaultStatus>('f');
    assert.equal(s.injected.dropped, 3);
    assert.equal(s.injected.droppedBytes, 8192 + 4096 + 4096);
    await fx.control('f', 'clear');
  });

  test('torn: only the first bytes of a write land', async () => {
    await c.write(6 * MiB, pattern(8192, 1));
    await fx.control('f', 'set-rules', { rules: [{ action: 'torn', tornBytes: 4096, count: 1 }] });
    await c.write(6 * MiB, pattern(8192, 2)); // reported success
    const got = await c.read(6 * MiB, 8192);
    assert.deepEqual(got.subarray(0, 4096), pattern(8192, 2).subarray(0, 4096));
    assert.deepEqual(got.subarray(4096), pattern(8192, 1).subarray(4096));
    // Default: half the write, and an errno if asked for.
    await fx.control('f', 'set-rules', { rules: [{ action: 'torn', errno: 'EIO', count: 1 }] });
    assert.equal(await outcome(c.write(6 * MiB, pattern(8192, 3))), 'EIO');
    const got2 = await c.read(6 * MiB, 8192);
    assert.deepEqual(got2.subarray(0, 4096), pattern(8192, 3).subarray(0, 4096));
    assert.deepEqual(got2.subarray(4096), pattern(8192, 1).subarray(4096));
    await fx.control('f', 'clear');
  });

  test('rules are validated with clear errors', async () => {
    const bad: Array<[unknown, RegExp]> = [
      [
        [{ action: 'explode' }],
        /rules\[0\]: action must be one of "error", "delay", "flakey", "drop", "torn"/,
      ],
      [[{ action: 'error', probability: 2 }], /rules\[0\]: probability must be <= 1/],
      [[{ action: 'error', ops: 'read,frobnicate' }], /unknown operation "frobnicate"/],
      [
        [{ action: 'drop', ops: 'read' }],
        /action "drop" applies only to write, trim, zero \(not read\)/,
      ],
      [[{ action: 'delay' }], /needs delayMs/],
      [[{ action: 'flakey', upMs: 10 }], /needs upMs and downMs/],
      [[{ action: 'error', start: 100, end: 50 }], /end \(50\) must be greater than start \(100\)/],
      [[{ action: 'error', errno: 'EWHATEVER' }], /errno must be one of/],
      [[{ action: 'error', delayMs: 5 }], /delayMs applies only to action delay/],
      [[{ action: 'error', colour: 'red' }], /unknown argument "colour"/],
      [[{ action: 'error', start: '1.3K' }], /start: invalid size/],
      ['[{"action": "error"', /not valid JSON/],
      [42, /rules must be array,string|must be an array of rules/],
    ];
    const before = fx.status<FaultStatus>('f').rules.length;
    for (const [rules, message] of bad) {
      await assert.rejects(fx.control('f', 'set-rules', { rules }), (err: Error) => {
        assert.equal((err as { code?: string }).code, 'invalid');
        assert.match(err.message, message);
        return true;
      });
    }
    assert.equal(
      fx.status<FaultStatus>('f').rules.length,
      before,
      'a refused change changes nothing',
    );
    await assert.rejects(fx.control('f', 'remove-rule', { id: 999 }), /no rule with id 999/);
    await assert.rejects(fx.control('f', 'explode'), /fault has no command "explode"/);
    await assert.rejects(
      fx.manager.createFilter('mem', 'fault', {
        args: { rules: [{ action: 'error', probability: 5 }] },
      }),
      /probability must be <= 1/,
    );
    await assert.rejects(
      fx.manager.createFilter('mem', 'fault', {
        args: { rules: '[{"action":"drop","ops":"flush"}]' },
      }),
      /applies only to/,
    );
  });
});
