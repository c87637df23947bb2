/**
 * Faults beneath the access filter (torture issue, item 2): a seeded `fault` filter between
 * the access filter and the backend fails reads (so the write-once zero check), writes, trims
 * and zeroing, tears writes and drops some, while several connections write into a write-once
 * (WORM) range, an audited range, a range whose trims are denied and the rest. Then:
 *
 *  - every request was answered (success or an errno); EPERM came exactly where the rules say;
 *  - WORM state stays consistent with the design (docs/filters.md, access-format.md): a block
 *    whose first write was acknowledged — or failed below: "a write whose first write failed
 *    below stays sealed (the safe side)" — is sealed; a block never sealed still reads as zeros;
 *    a sealed block's content never changes; every sealed block refuses writes (the retry of a
 *    write that failed below too), WORM ranges refuse trims and zeroing, and a block never
 *    claimed takes its first write; the sealed set comes back unchanged after detach/attach;
 *  - the audit log verifies (`audit verify`), ends with a `close` line, holds one `denied` line
 *    per EPERM a client got and one `audit` line per request of the audited range.
 */
import assert from 'node:assert/strict';
import { readFileSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { verifyAuditLog } from '../../src/filters/access/audit-verify.js';
import type { NbdClient } from '../../src/nbd/client.js';
import { pattern } from '../filters/fixture.js';
import { KiB, MiB, Rng, readAll, startSnapFixture, type SnapFixture } from '../snapshot/fixture.js';
import { FAULT_RULES, Tally, attempt, injected, seedFrom, type Outcome } from './common.js';

const SIZE = 2 * MiB;
const BLOCK = 4 * KiB; // wormBlockSize
const WORM_END = MiB; // [0, 1M) write-once
const AUDIT_END = 1.5 * MiB; // [1M, 1.5M) audited
const SEED = seedFrom('ACCESS_FAULT_SEED');
const ROUNDS = 5;
const WORKERS = 4;
const OPS_PER_WORKER = 40;

const RULES = {
  default: 'allow',
  rules: [
    { action: 'audit', ops: 'read,write,trim,zero', range: [WORM_END, AUDIT_END], name: 'audited' },
    { action: 'deny', ops: 'trim', range: [AUDIT_END, 'end'], name: 'no-trim' },
  ],
  worm: [[0, WORM_END]],
};

type Region = 'worm' | 'audit' | 'deny-trim';
type OpName = 'read' | 'write' | 'trim' | 'zero';

interface Req {
  region: Region;
  op: OpName;
  offset: number;
  length: number;
  outcome: Outcome;
}

interface AuditLine {
  type: string;
  op?: string;
  offset?: number;
  length?: number;
  rule?: string;
  action?: string;
  result?: string;
}

const blocksOf = (offset: number, length: number): number[] => {
  const out: number[] = [];
  for (let b = Math.floor(offset / BLOCK); b < Math.ceil((offset + length) / BLOCK); b++)
    out.push(b);
  return out;
};

describe(`faults below the access filter (ACCESS_FAULT_SEED=${SEED})`, () => {
  let fx: SnapFixture;
  let dir: string;
  let auditLog: string;
  const args = () => ({ rules: RULES, dir, auditLog, wormBlockSize: BLOCK });
  const reqs: Req[] = [];
  /** EPERMs the clients got, in every phase: each must have its `denied` line. */
  let eperms = 0;
  /** The WORM range below every filter, and its sealed blocks, between rounds. */
  const images: Array<{ image: Buffer; sealed: Set<number> }> = [];

  before(async () => {
    fx = await startSnapFixture([{ name: 'disk', size: SIZE }]);
    dir = join(fx.dir, 'access');
    mkdirSync(dir);
    auditLog = join(fx.dir, 'audit.log');
  });
  after(async () => {
    await fx.close();
  });

  async function sealed(): Promise<Set<number>> {
    const s = (await fx.manager.control('disk', 'access', 'worm-status', {
      limit: 1_000_000,
    })) as { extents: Array<{ offset: number; length: number }>; next: number | null };
    assert.equal(s.next, null);
    const out = new Set<number>();
    for (const e of s.extents) for (const b of blocksOf(e.offset, e.length)) out.add(b);
    return out;
  }

  async function run(what: string, op: () => Promise<unknown>): Promise<Outcome> {
    const o = await attempt(what, op);
    if (o === 'EPERM') eperms++;
    return o;
  }

  /** One random request, within one region. */
  async function request(c: NbdClient, rng: Rng, what: string, seed: number): Promise<Req> {
    const r = rng.next();
    const region: Region = r < 0.5 ? 'worm' : r < 0.8 ? 'audit' : 'deny-trim';
    const [lo, hi] =
      region === 'worm'
        ? [0, WORM_END]
        : region === 'audit'
          ? [WORM_END, AUDIT_END]
          : [AUDIT_END, SIZE];
    const unaligned = region !== 'worm' || rng.next() < 0.15;
    const length = unaligned ? 1 + rng.int(2 * BLOCK) : BLOCK * (1 + rng.int(3));
    const offset = unaligned
      ? lo + rng.int(hi - lo - length)
      : lo + BLOCK * rng.int((hi - lo - length) / BLOCK + 1);
    const k = rng.next();
    // Mostly writes into the WORM range: first writes, and overwrites to be refused.
    const op: OpName =
      region === 'worm'
        ? k < 0.75
          ? 'write'
          : k < 0.85
            ? 'read'
            : k < 0.93
              ? 'trim'
              : 'zero'
        : k < 0.5
          ? 'write'
          : k < 0.7
            ? 'trim'
            : k < 0.85
              ? 'zero'
              : 'read';
    const label = `${what} ${op} [${offset}, +${length})`;
    const flags = rng.next() < 0.3 ? 1 : 0;
    const outcome = await run(label, () => {
      switch (op) {
        case 'write':
          return c.write(offset, pattern(length, seed), flags);
        case 'trim':
          return c.trim(offset, length, flags);
        case 'zero':
          return c.writeZeroes(offset, length, flags);
        default:
          return c.read(offset, length);
      }
    });
    return { region, op, offset, length, outcome };
  }

  test('WORM state stays consistent whatever fails below', async (t) => {
    const rng = new Rng(SEED);
    await fx.manager.createFilter('disk', 'access', { name: 'access', args: args() });
    await fx.manager.createFilter('disk', 'fault', {
      name: 'faults',
      args: { seed: SEED, rules: [] },
      position: { at: 'bottom' },
    });
    const clients = await Promise.all(Array.from({ length: WORKERS }, () => fx.connect('disk')));
    const tally = new Tally();
    for (let round = 0; round < ROUNDS; round++) {
      await fx.manager.control('disk', 'faults', 'clear', {});
      images.push({
        image: (await readAll(fx.backend('disk'))).subarray(0, WORM_END),
        sealed: await sealed(),
      });
      await fx.manager.control('disk', 'faults', 'set-rules', { rules: FAULT_RULES });
      await Promise.all(
        clients.map(async (c, w) => {
          for (let i = 0; i < OPS_PER_WORKER; i++) {
            const seed = SEED ^ (round * 10000 + w * 1000 + i);
            const req = await request(c, rng, `round ${round} worker ${w} op ${i}`, seed);
            reqs.push(req);
            tally.add(req.outcome);
          }
        }),
      );
    }
    await fx.manager.control('disk', 'faults', 'clear', {});
    t.diagnostic(tally.toString());
    t.diagnostic(`injected: ${injected(fx, 'disk')}`);
    const failedBelow = reqs.filter((r) => r.outcome === 'EIO' || r.outcome === 'ENOSPC');
    assert.ok(
      tally.ok > 0 && failedBelow.length > 0,
      'the faults hit some requests and spared others',
    );

    // EPERM exactly where the rules say: trims and zeroing of the WORM range, trims of the
    // denied range; never in the audited range nor for reads.
    for (const r of reqs) {
      const label = `${r.op} of [${r.offset}, +${r.length}) in the ${r.region} range`;
      if (
        (r.region === 'worm' && (r.op === 'trim' || r.op === 'zero')) ||
        (r.region === 'deny-trim' && r.op === 'trim')
      )
        assert.equal(r.outcome, 'EPERM', `${label} is refused`);
      else if (r.region !== 'worm' || r.op === 'read')
        assert.notEqual(r.outcome, 'EPERM', `${label} is not refused`);
    }

    const now = await sealed();
    const image = (await readAll(fx.backend('disk'))).subarray(0, WORM_END);
    // Acknowledged first writes, and writes that failed below, leave their blocks sealed.
    const wormWrites = reqs.filter((r) => r.region === 'worm' && r.op === 'write');
    for (const r of wormWrites) {
      if (r.outcome === 'EPERM') continue;
      for (const b of blocksOf(r.offset, r.length))
        assert.ok(now.has(b), `block ${b} of a write that ended ${r.outcome} is sealed`);
    }
    // A block never sealed was never written.
    for (let b = 0; b < WORM_END / BLOCK; b++) {
      if (now.has(b)) continue;
      const data = image.subarray(b * BLOCK, (b + 1) * BLOCK);
      assert.ok(
        data.every((x) => x === 0),
        `unsealed block ${b} reads as zeros`,
      );
    }
    // Bits are only set, and a sealed block's content never changes.
    for (const [k, then] of images.entries()) {
      for (const b of then.sealed) {
        assert.ok(now.has(b), `block ${b}, sealed before round ${k}, stays sealed`);
        const was = then.image.subarray(b * BLOCK, (b + 1) * BLOCK);
        assert.ok(
          image.subarray(b * BLOCK, (b + 1) * BLOCK).equals(was),
          `sealed block ${b} changed after round ${k}`,
        );
      }
    }
    const unsealed = WORM_END / BLOCK - now.size;
    t.diagnostic(
      `${now.size} WORM blocks sealed, ${unsealed} never written; ${wormWrites.length} WORM writes, ${wormWrites.filter((r) => r.outcome === 'ok').length} acknowledged, ${wormWrites.filter((r) => r.outcome === 'EIO' || r.outcome === 'ENOSPC').length} failed below`,
    );
    const st = fx.manager.filterStatus('disk', 'access').status as {
      counters: { auditFailures: number };
      worm: { persistence: { lastError: string | null } };
    };
    assert.equal(st.counters.auditFailures, 0, 'the audit log never failed');
    assert.equal(st.worm.persistence.lastError, null, 'the WORM journal never failed');
  });

  test('with the faults gone: sealed blocks refuse, retries of failed writes too', async () => {
    await fx.manager.removeFilter('disk', 'faults');
    const c = await fx.connect('disk');
    const now = await sealed();
    for (const b of now) {
      const o = await run(`overwrite of sealed block ${b}`, () =>
        c.write(b * BLOCK, pattern(BLOCK, b)),
      );
      assert.equal(o, 'EPERM', `sealed block ${b} refuses a write`);
    }
    // By design a write that failed below leaves its blocks sealed: its retry is refused.
    for (const r of reqs) {
      if (
        r.region !== 'worm' ||
        r.op !== 'write' ||
        (r.outcome !== 'EIO' && r.outcome !== 'ENOSPC')
      )
        continue;
      const o = await run(`retry of a failed write`, () => c.write(r.offset, pattern(r.length, 1)));
      assert.equal(o, 'EPERM', `the retry of a write to [${r.offset}, +${r.length}) is refused`);
    }
    for (const op of ['trim', 'zero'] as const) {
      const o = await run(`${op} of the WORM range`, () =>
        op === 'trim' ? c.trim(WORM_END - BLOCK, BLOCK) : c.writeZeroes(WORM_END - BLOCK, BLOCK),
      );
      assert.equal(o, 'EPERM', `${op} of the WORM range is refused`);
    }
    // A block never claimed takes its first write, then is sealed.
    const free = [...Array(WORM_END / BLOCK).keys()].filter((b) => !now.has(b)).slice(0, 4);
    for (const b of free) {
      assert.equal(
        await run(`first write of block ${b}`, () => c.write(b * BLOCK, pattern(BLOCK, b))),
        'ok',
      );
      assert.equal(
        await run(`second write of block ${b}`, () => c.write(b * BLOCK, pattern(BLOCK, 0))),
        'EPERM',
      );
    }
    assert.ok((await sealed()).size === now.size + free.length);
    await c.close();
  });

  test('detach and attach: the same sealed blocks; the audit log verifies and matches', async () => {
    const before = await sealed();
    await fx.manager.removeFilter('disk', 'access', { policy: 'keep' });
    let report = await verifyAuditLog(auditLog);
    assert.equal(
      report.status,
      'ok',
      `audit verify: ${JSON.stringify(report.firstBad ?? report.truncatedTail)}`,
    );
    assert.ok(report.endsWithClose, 'a clean removal ends the log with a close line');

    await fx.manager.createFilter('disk', 'access', { name: 'access', args: args() });
    const st = fx.manager.filterStatus('disk', 'access').status as {
      worm: { persistence: { state: string; notes: string[] } };
      auditLog: { opened: string };
    };
    assert.equal(st.worm.persistence.state, 'clean');
    assert.deepEqual(st.worm.persistence.notes, []);
    assert.equal(st.auditLog.opened, 'continued');
    assert.deepEqual(
      [...(await sealed())].sort((a, b) => a - b),
      [...before].sort((a, b) => a - b),
    );
    const c = await fx.connect('disk');
    const b = [...before][0]!;
    assert.equal(
      await run('overwrite after re-attach', () => c.write(b * BLOCK, pattern(BLOCK, 3))),
      'EPERM',
    );
    await c.close();
    await fx.manager.removeFilter('disk', 'access', { policy: 'keep' });

    report = await verifyAuditLog(auditLog);
    assert.equal(
      report.status,
      'ok',
      `audit verify: ${JSON.stringify(report.firstBad ?? report.truncatedTail)}`,
    );
    assert.ok(report.endsWithClose);
    assert.equal(report.opens, 2, 'two runs of the filter');
    const lines = readFileSync(auditLog, 'utf8')
      .split('\n')
      .filter((l) => l !== '')
      .map((l) => JSON.parse(l) as AuditLine);
    const events = lines.filter((l) => l.type === 'event');
    const denied = events.filter((l) => l.result === 'denied');
    assert.equal(denied.length, eperms, 'one denied line per EPERM a client got');
    assert.equal(report.denied, eperms);
    // Every request of the audited range was recorded before it went down, whatever then
    // happened below; nothing else was audited.
    const key = (op: string, offset: number, length: number) => `${op}@${offset}+${length}`;
    const want = reqs
      .filter((r) => r.region === 'audit')
      .map((r) => key(r.op, r.offset, r.length))
      .sort();
    const got = events
      .filter((l) => l.action === 'audit')
      .map((l) => key(l.op!, l.offset!, l.length!))
      .sort();
    assert.deepEqual(got, want, 'one audit line per request of the audited range');
  });
});
