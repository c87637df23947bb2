/**
 * The access filter's write-burst guard against a simulated encryption sweep. Text written,
 * then rewritten as text, a database-like load of 8 KiB page rewrites (low entropy), and a
 * sequential fill of empty space with random data: none trips it. Then the written blocks
 * overwritten with random data, fast: it trips — an access.burst event, an audit line, that
 * client's writes refused with EPERM (reads go on), and a snapshot taken by the export's
 * snapshot filter that still holds the text. burst-reset lets the client write again. */
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { entropyOf } from '../../src/filters/access/burst.js';
import { pattern, startFixture, type Fixture, KiB, MiB } from '../filters/fixture.js';
import { tempDir } from '../helpers/server.js';

const SIZE = 32 * MiB;
const TEXT = Buffer.from(
  'It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of foolishness. ',
);
function text(length: number, shift = 0): Buffer {
  const b = Buffer.alloc(length);
  for (let i = 0; i < length; i++) b[i] = TEXT[(i + shift) % TEXT.length]!;
  return b;
}

let fx: Fixture;
let dir: { path: string; cleanup: () => void };
const events: Array<{ event: string; data: Record<string, unknown> }> = [];

before(async () => {
  fx = await startFixture({ size: SIZE });
  dir = tempDir('devfilter-burst-');
  fx.manager.on('event', (e: { event: string; data?: Record<string, unknown> }) =>
    events.push({ event: e.event, data: e.data ?? {} }),
  );
  await fx.manager.createFilter('mem', 'snapshot', {
    name: 'snap',
    args: { store: join(dir.path, 'store') },
  });
  await fx.manager.createFilter('mem', 'access', {
    name: 'access',
    args: {
      auditLog: join(dir.path, 'audit.log'),
      rules: {
        default: 'allow',
        rules: [],
        burstGuard: {
          bytesPerSecond: 1 * MiB,
          windowSeconds: 2,
          minEntropy: 7,
          action: 'deny',
          snapshot: true,
        },
      },
    },
  });
});
after(async () => {
  await fx.close();
  dir.cleanup();
});

test('entropy: random data near 8 bits per byte, text far below', () => {
  assert.ok(entropyOf(pattern(64 * KiB, 1)) > 7.9);
  assert.ok(entropyOf(text(64 * KiB)) < 5);
  assert.equal(entropyOf(Buffer.alloc(4096)), 0);
});

test('a simulated encryption sweep trips the guard; ordinary writes do not', async () => {
  const victim = await fx.connect();
  // 8 MiB of text, rewritten as other text: overwrites, but low entropy.
  for (let off = 0; off < 8 * MiB; off += MiB) await victim.write(off, text(MiB));
  for (let off = 0; off < 8 * MiB; off += MiB) await victim.write(off, text(MiB, 7));
  // A database-like load: 8 KiB pages rewritten at random places, fast — rows of text with
  // counters in them, low entropy.
  for (let i = 0; i < 1024; i++) {
    const page = Math.floor(((i * 2654435761) >>> 0) % 1024);
    const rows = text(8 * KiB, i);
    rows.writeUInt32LE(i, 0);
    rows.writeUInt32LE(page, 4096);
    await victim.write(page * 8 * KiB, rows);
  }
  // A sequential fill of empty space with random data: high entropy, nothing overwritten.
  for (let off = 16 * MiB; off < 24 * MiB; off += MiB) await victim.write(off, pattern(MiB, off));
  type Status = { burstGuard: { trips: number; blockedClients: string[] } };
  assert.equal(fx.status<Status>('access').burstGuard.trips, 0, 'no trip yet');

  // The sweep: the text overwritten with random data, 64 KiB at a time, as fast as it goes.
  let refusedAt = -1;
  for (let off = 0; off < 8 * MiB; off += 64 * KiB) {
    try {
      await victim.write(off, pattern(64 * KiB, off + 1));
    } catch (err) {
      assert.match((err as Error).message, /EPERM/);
      refusedAt = off;
      break;
    }
  }
  assert.ok(refusedAt > 0, 'the sweep was stopped');
  assert.ok(refusedAt <= 2 * MiB + 64 * KiB, `stopped after ${refusedAt} bytes (limit 2 MiB)`);
  const st = fx.status<Status>('access');
  assert.equal(st.burstGuard.trips, 1);
  assert.equal(st.burstGuard.blockedClients.length, 1);
  // The client stays stopped (by identity: a new connection would be too); reads go on.
  await assert.rejects(victim.write(10 * MiB, text(4096)), /EPERM/);
  await assert.rejects(victim.trim(10 * MiB, 4096), /EPERM/);
  assert.equal((await victim.read(refusedAt, 4096)).length, 4096); // reads go on

  const burst = events.find((e) => e.event === 'access.burst');
  assert.ok(burst, 'an access.burst event');
  const audit = readFileSync(join(dir.path, 'audit.log'), 'utf8');
  assert.match(audit, /"action":"burst","result":"detected"/);
  assert.match(audit, /"reason":"stopped by the write-burst guard/);
  // The snapshot, taken by the snapshot filter, still holds the text where the sweep stopped.
  let snap: { name?: string } | undefined;
  for (let i = 0; i < 100 && snap === undefined; i++) {
    snap = events.find((e) => e.event === 'access.burst-snapshot')?.data as { name?: string };
    if (snap === undefined) await new Promise((r) => setTimeout(r, 20));
  }
  assert.ok(snap?.name, `a burst snapshot was taken: ${JSON.stringify(snap)}`);
  const image = fx.manager.publishedExports().find((e) => e.name === `mem@${snap.name}`);
  assert.ok(image, 'the snapshot image is published');
  const buf = Buffer.alloc(64 * KiB);
  await image.device.read(buf, 7 * MiB, 0);
  assert.ok(entropyOf(buf) < 5, 'the snapshot holds the text, not the random data');

  const lifted = await fx.control<{ lifted: string[] }>('access', 'burst-reset', {});
  assert.equal(lifted.lifted.length, 1);
  await victim.write(10 * MiB, text(4096));

  // A sweep with 64 writes in flight at once: the trip comes at the 33rd 64 KiB (2 MiB), and
  // no write that finishes its check after the trip goes down, however they interleave.
  const results = await Promise.allSettled(
    Array.from({ length: 64 }, (_, i) => victim.write(i * 64 * KiB, pattern(64 * KiB, 1000 + i))),
  );
  const passed = results.filter((r) => r.status === 'fulfilled').length;
  assert.ok(passed <= 32, `${passed} of 64 concurrent sweep writes went down (at most 32 may)`);
  assert.equal(fx.status<Status>('access').burstGuard.trips, 2, 'a reset guard trips again');
});
