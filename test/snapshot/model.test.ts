/**
 * Model-based test: several NBD connections do random writes, trims and zeroing while
 * snapshots are taken, read and deleted at random moments; every image read — through its
 * device and through NBD as EXPORT@SNAP, during the writes and at the end — must equal the
 * reference model's content at the snapshot's instant. Seeded: the seed is in the test name;
 * SNAP_SEED=<n> replays the same operations (timing differs from run to run).
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { ExtentState, type Device } from '../../src/core/device.js';
import type { NbdClient } from '../../src/nbd/client.js';
import { pattern } from '../filters/fixture.js';
import {
  KiB,
  MiB,
  Rng,
  firstDiff,
  readAll,
  readAllNbd,
  seedFromEnv,
  startSnapFixture,
  type SnapFixture,
} from './fixture.js';
import { Model, resolve, type OpKind } from './model.js';

const SEED = seedFromEnv();
const SIZE = 2 * MiB - 3000; // not a whole number of chunks: the last one is short
const CHUNK = 16 * KiB;
const CONNECTIONS = 4;
/** Connection k owns regions r with r % CONNECTIONS == k: neighbours share chunks. */
const REGION = 20 * KiB;
/** Controller actions (takes, deletes, image reads, large operations) per run. */
const ACTIONS = 60;
/** Workers stop after this many operations even if the controller is still busy. */
const MAX_OPS_PER_CONNECTION = 1500;
const MAX_LIVE = 6;

interface Live {
  name: string;
  expected: Buffer;
  nbd: NbdClient | null;
}

interface RunStats {
  taken: number;
  deleted: number;
  reads: number;
  bigOps: number;
  copies: number;
}

async function run(fx: SnapFixture, exportName: string, seed: number): Promise<RunStats> {
  const initial = pattern(SIZE, seed);
  const origin = await fx.connect(exportName);
  await origin.write(0, initial);
  await origin.trim(5 * CHUNK, 8 * CHUNK); // some holes to start with
  const model = new Model(SIZE, initial);
  model.content.fill(0, 5 * CHUNK, 13 * CHUNK);
  const snap = await fx.attach(exportName, { chunkSize: CHUNK });
  const clients = await Promise.all(
    Array.from({ length: CONNECTIONS }, () => fx.connect(exportName)),
  );
  const live = new Map<string, Live>();
  let taken = 0;
  const counts = { deleted: 0, reads: 0, bigOps: 0 };

  // Workers pause while the controller runs an operation that spans everyone's regions.
  let paused: Promise<void> | null = null;
  let busy = 0;
  let drained: (() => void) | null = null;
  const exclusive = async (fn: () => Promise<void>): Promise<void> => {
    let resume!: () => void;
    paused = new Promise((r) => (resume = r));
    if (busy > 0) await new Promise<void>((r) => (drained = r));
    drained = null;
    try {
      await fn();
    } finally {
      paused = null;
      resume();
    }
  };
  const perform = async (
    conn: number,
    c: NbdClient,
    kind: OpKind,
    offset: number,
    length: number,
    data: Buffer | null,
  ): Promise<void> => {
    const op = model.issue(conn, kind, offset, length, data);
    if (kind === 'write') await c.write(offset, data!);
    else if (kind === 'trim') await c.trim(offset, length);
    else await c.writeZeroes(offset, length);
    model.ack(op);
  };
  const randomKind = (r: Rng): OpKind => {
    const x = r.next();
    return x < 0.6 ? 'write' : x < 0.8 ? 'trim' : 'zero';
  };

  const regions = Math.ceil(SIZE / REGION);
  let stop = false;
  const worker = async (k: number): Promise<void> => {
    const r = new Rng(seed * 31 + k + 1);
    for (let i = 0; i < MAX_OPS_PER_CONNECTION && !stop; i++) {
      while (paused !== null) await paused;
      busy++;
      try {
        const mine = Math.floor(r.int(Math.ceil(regions / CONNECTIONS))) * CONNECTIONS + k;
        const start = mine * REGION;
        if (start >= SIZE) continue;
        const end = Math.min(SIZE, start + REGION);
        const offset = r.between(start, end - 1);
        const length = r.between(1, end - offset);
        const kind = randomKind(r);
        await perform(
          k,
          clients[k]!,
          kind,
          offset,
          length,
          kind === 'write' ? pattern(length, r.int(1 << 30)) : null,
        );
      } finally {
        busy--;
        if (busy === 0) drained?.();
      }
    }
  };

  const check = async (l: Live, offset: number, length: number, viaNbd: boolean): Promise<void> => {
    let got: Buffer;
    if (viaNbd) {
      l.nbd ??= await fx.connect(`${exportName}@${l.name}`);
      got = await l.nbd.read(offset, length);
    } else {
      got = Buffer.alloc(length);
      await snap.image(l.name)!.read(got, offset, 0);
    }
    const want = l.expected.subarray(offset, offset + length);
    if (!got.equals(want)) {
      assert.fail(
        `seed ${seed}: image ${l.name} (${viaNbd ? 'NBD' : 'device'}) at ${offset}+${length} differs at +${firstDiff(got, want)}`,
      );
    }
  };

  const controller = async (): Promise<void> => {
    const r = new Rng(seed * 31 + 1000);
    for (let action = 0; action < ACTIONS; action++) {
      await new Promise((res) => setTimeout(res, r.int(6)));
      const x = action === 0 ? 0 : r.next();
      if (x < 0.25 && live.size < MAX_LIVE) {
        const name = `s${++taken}`;
        const base = Buffer.from(model.content);
        const called = model.tick();
        await fx.control(exportName, 'take', { name });
        const returned = model.tick();
        const image = await readAll(snap.image(name)!);
        live.set(name, {
          name,
          expected: resolve(base, model.window(called, returned), image, `seed ${seed}: ${name}`),
          nbd: null,
        });
      } else if (x < 0.37 && live.size >= 2) {
        const victim = [...live.values()][r.int(live.size)]!;
        await fx.control(exportName, 'delete', { name: victim.name });
        live.delete(victim.name);
        counts.deleted++;
        if (victim.nbd !== null) {
          await assert.rejects(
            victim.nbd.read(0, 512),
            `seed ${seed}: a deleted image's open connection fails`,
          );
          await victim.nbd.close();
        }
      } else if (x < 0.8 && live.size > 0) {
        const l = [...live.values()][r.int(live.size)]!;
        const offset = r.int(SIZE);
        await check(l, offset, r.between(1, Math.min(SIZE - offset, 256 * KiB)), r.next() < 0.5);
        counts.reads++;
      } else if (x >= 0.8) {
        // A large operation across every connection's regions, with the workers paused.
        const kind = randomKind(r);
        const offset = r.int(SIZE);
        const length = r.between(1, Math.min(SIZE - offset, 300 * KiB));
        await exclusive(() =>
          perform(
            99,
            origin,
            kind,
            offset,
            length,
            kind === 'write' ? pattern(length, r.int(1 << 30)) : null,
          ),
        );
        counts.bigOps++;
      }
    }
  };

  const workers = Promise.all(Array.from({ length: CONNECTIONS }, (_, k) => worker(k)));
  await Promise.all([workers, controller().finally(() => (stop = true))]);

  // Everything at rest: every image, both ways, whole; block status agrees with the data.
  const st = snap.status() as {
    snapshots: { name: string; state: string }[];
    copies: { copiedSinceAttach: number; zeroChunksSinceAttach: number };
  };
  assert.ok(
    st.snapshots.every((s) => s.state === 'active'),
    `seed ${seed}: no snapshot fails without a limit`,
  );
  for (const l of live.values()) {
    const img = snap.image(l.name)!;
    const data = await readAll(img);
    assert.ok(
      data.equals(l.expected),
      `seed ${seed}: image ${l.name} at rest differs at ${firstDiff(data, l.expected)}`,
    );
    l.nbd ??= await fx.connect(`${exportName}@${l.name}`);
    const viaNbd = await readAllNbd(l.nbd);
    assert.ok(
      viaNbd.equals(l.expected),
      `seed ${seed}: image ${l.name} over NBD differs at ${firstDiff(viaNbd, l.expected)}`,
    );
    await checkZeroExtents(img, data, `seed ${seed}: ${l.name}`);
  }
  const originNow = await readAll(fx.backend(exportName));
  assert.ok(
    originNow.equals(model.content),
    `seed ${seed}: the origin differs from the model at ${firstDiff(originNow, model.content)}`,
  );
  assert.ok(taken >= 2, `seed ${seed}: the schedule took snapshots (${taken})`);
  for (const l of live.values()) await l.nbd?.close();
  await fx.detach(exportName, 'drop');
  return {
    taken,
    ...counts,
    copies: st.copies.copiedSinceAttach + st.copies.zeroChunksSinceAttach,
  };
}

/** Every extent block status calls ZERO must read as zeros. */
async function checkZeroExtents(img: Device, data: Buffer, what: string): Promise<void> {
  let at = 0;
  while (at < data.length) {
    const extents = await img.blockStatus(at, data.length - at, 0);
    for (const e of extents) {
      const len = Math.min(e.length, data.length - at);
      if (e.state & ExtentState.ZERO) {
        assert.ok(
          data.subarray(at, at + len).equals(Buffer.alloc(len)),
          `${what}: extent at ${at}+${len} says zero`,
        );
      }
      at += len;
    }
  }
}

describe(`snapshot model (seed ${SEED})`, () => {
  let fx: SnapFixture;
  before(async () => {
    fx = await startSnapFixture([
      { name: 'mem', size: SIZE },
      { name: 'file', size: SIZE, backend: 'file' },
    ]);
  });
  after(async () => {
    await fx.close();
  });

  test('memory origin: images equal the model at their instants', async (t) => {
    t.diagnostic(JSON.stringify(await run(fx, 'mem', SEED)));
  });

  test('file origin: images equal the model at their instants', async (t) => {
    t.diagnostic(JSON.stringify(await run(fx, 'file', (SEED + 1) >>> 0)));
  });
});
