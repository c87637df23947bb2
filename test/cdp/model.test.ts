/**
 * Model-based test of the cdp filter. A seeded random history of writes (unaligned too),
 * trims and write-zeroes goes through real NBD connections, with bookmarks and wall-clock
 * times noted between changes; a model keeps the device's content after every change. Then a
 * view opened at each of many points — by sequence number, by mark and by time — must equal
 * the model at that point, byte for byte; so must the views after a rollback, after the undo
 * of that rollback, and after the filter is detached and attached again (the journal read
 * back from disk). Concurrent writers between marks check the range locking.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import type { Device } from '../../src/core/device.js';
import type { NbdClient } from '../../src/nbd/client.js';
import { tempDir } from '../helpers/server.js';
import { prng } from '../protocol/raw.js';
import { startFixture, pattern, type Fixture, KiB, MiB } from '../filters/fixture.js';

const SIZE = 2 * MiB;
const BLOCK = 4 * KiB;
const SEED = Number(process.env.CDP_MODEL_SEED ?? 20261127);

interface Status {
  newest: { point: number };
  oldest: { point: number };
  changes: number;
  journal: { segments: number; bytes: number };
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

describe('cdp model', () => {
  let fx: Fixture;
  let dir: { path: string; cleanup: () => void };
  let client: NbdClient;
  const rand = prng(SEED);
  const model = Buffer.alloc(SIZE);
  /** Content after point p, for the points kept. */
  const states = new Map<number, Buffer>();
  const marks = new Map<string, number>();
  const times: Array<{ at: number; point: number }> = [];
  const args = () => ({ dir: dir.path, blockSize: BLOCK, segmentSize: 64 * KiB, keepBytes: '64M' });

  const newest = () => fx.status<Status>('cdp').newest.point;
  const viewDevice = (name: string): Device => {
    const p = fx.manager.publishedExports().find((e) => e.name === name);
    assert.ok(p, `view ${name} is published`);
    return p.device;
  };
  async function readAll(dev: Device): Promise<Buffer> {
    const buf = Buffer.alloc(SIZE);
    for (let off = 0; off < SIZE; off += 256 * KiB) {
      await dev.read(buf.subarray(off, off + 256 * KiB), off, 0);
    }
    return buf;
  }
  async function checkView(point: { seq?: number; mark?: string; at?: string }, want: Buffer) {
    const v = await fx.control<{ name: string; point: number }>('cdp', 'view', point);
    try {
      const got = await readAll(viewDevice(v.name));
      if (!got.equals(want)) {
        let i = 0;
        while (got[i] === want[i]) i++;
        assert.fail(
          `view ${JSON.stringify(point)} (point ${v.point}) differs from the model at byte ${i} (block ${Math.floor(i / BLOCK)})`,
        );
      }
    } finally {
      await fx.control('cdp', 'close-view', { name: v.name });
    }
  }

  /** One random change through the client; the model follows (trims: what the device says). */
  async function randomChange(c: NbdClient, m: Buffer): Promise<void> {
    const kind = rand() * 10;
    const unaligned = rand() < 0.3;
    const len = unaligned
      ? 1 + Math.floor(rand() * 3 * BLOCK)
      : BLOCK * (1 + Math.floor(rand() * (rand() < 0.1 ? 64 : 8)));
    const off = unaligned
      ? Math.floor(rand() * (SIZE - len))
      : BLOCK * Math.floor(rand() * ((SIZE - len) / BLOCK + 1));
    if (kind < 7) {
      const data = pattern(len, Math.floor(rand() * 1e9));
      await c.write(off, data);
      data.copy(m, off);
    } else if (kind < 8.5) {
      await c.writeZeroes(off, len);
      m.fill(0, off, off + len);
    } else {
      await c.trim(off, len);
      (await c.read(off, len)).copy(m, off);
    }
  }

  before(async () => {
    fx = await startFixture({ size: SIZE });
    dir = tempDir('devfilter-cdp-model-');
    await fx.manager.createFilter('mem', 'cdp', { name: 'cdp', args: args() });
    client = await fx.connect();
  });
  after(async () => {
    await fx.close();
    dir.cleanup();
  });

  test('a random history: views at many points equal the model', async () => {
    states.set(0, Buffer.from(model));
    for (let i = 0; i < 240; i++) {
      await randomChange(client, model);
      const p = newest();
      if (rand() < 0.25) states.set(p, Buffer.from(model));
      if (rand() < 0.05) {
        const name = `m${i}`;
        await fx.control('cdp', 'mark', { name });
        marks.set(name, p);
        states.set(p, Buffer.from(model));
      }
      if (i % 40 === 20) {
        // A time between two changes: the view "as of then" shows the first, not the second.
        await sleep(3);
        times.push({ at: Date.now(), point: p });
        states.set(p, Buffer.from(model));
        await sleep(3);
      }
    }
    const st = fx.status<Status>('cdp');
    assert.ok(st.journal.segments > 3, `the journal rolled over segments (${st.journal.segments})`);
    assert.equal(st.oldest.point, 0, 'nothing has expired');
    for (const [point, want] of states) await checkView({ seq: point }, want);
    for (const [name, point] of marks) await checkView({ mark: name }, states.get(point)!);
    for (const t of times)
      await checkView({ at: new Date(t.at).toISOString() }, states.get(t.point)!);
    console.log(
      `# cdp model: ${st.changes} changes, ${states.size} points, ${marks.size} marks, ${times.length} times checked; journal ${st.journal.bytes} bytes in ${st.journal.segments} segments`,
    );
  });

  test('concurrent writers: marks taken between rounds see every acknowledged write', async () => {
    const clients = [client, await fx.connect(), await fx.connect()];
    for (let round = 0; round < 4; round++) {
      // Overlapping writes from three connections; the model is what the device then holds.
      await Promise.all(
        clients.map(async (c) => {
          for (let k = 0; k < 12; k++) {
            const len = BLOCK * (1 + Math.floor(rand() * 4));
            const off = BLOCK * Math.floor(rand() * 32); // a small area: many overlaps
            await c.write(off, pattern(len, Math.floor(rand() * 1e9)));
          }
        }),
      );
      const name = `round${round}`;
      const m = await fx.control<{ point: number }>('cdp', 'mark', { name });
      (await client.read(0, SIZE)).copy(model);
      states.set(m.point, Buffer.from(model));
      marks.set(name, m.point);
    }
    for (let round = 0; round < 4; round++)
      await checkView({ mark: `round${round}` }, states.get(marks.get(`round${round}`)!)!);
  });

  test('rollback brings the export back; undoing it brings the present back', async () => {
    const points = [...states.keys()].sort((a, b) => a - b);
    const target = points[Math.floor(points.length / 3)]!;
    const present = Buffer.from(model);
    const presentPoint = newest();
    const r = await fx.control<{ id: number; blocksRestored: number; undo: string }>(
      'cdp',
      'rollback',
      { seq: target },
    );
    assert.ok(r.blocksRestored > 0);
    assert.ok((await client.read(0, SIZE)).equals(states.get(target)!), 'rolled back to target');
    // History is intact across the rollback: old views still show their points.
    await checkView({ seq: presentPoint }, present);
    await checkView({ seq: target }, states.get(target)!);
    const undo = await fx.control<{ id: number }>('cdp', 'rollback', {
      mark: `before-rollback-${r.id}`,
    });
    assert.equal(undo.id, r.id + 1);
    assert.ok((await client.read(0, SIZE)).equals(present), 'the undo restored the present');
    states.set(newest(), Buffer.from(present));
  });

  test('the history survives a detach and attach (read back from disk)', async () => {
    await client.close();
    await fx.manager.removeFilter('mem', 'cdp', { policy: 'keep' });
    await fx.manager.createFilter('mem', 'cdp', { name: 'cdp', args: args() });
    client = await fx.connect();
    const points = [...states.keys()];
    for (let i = 0; i < points.length; i += 3)
      await checkView({ seq: points[i]! }, states.get(points[i]!)!);
    for (const [name, point] of marks) await checkView({ mark: name }, states.get(point)!);
    const listed = await fx.control<Array<{ name: string }>>('cdp', 'marks');
    assert.ok(listed.some((m) => m.name === 'before-rollback-1'));
  });

  test('bad points and names are refused with a clear message', async () => {
    await assert.rejects(fx.control('cdp', 'view', { seq: newest() + 5 }), /in the future/);
    await assert.rejects(fx.control('cdp', 'view', { mark: 'nope' }), /no mark named "nope"/);
    await assert.rejects(fx.control('cdp', 'view', {}), /exactly one of seq, at or mark/);
    await assert.rejects(
      fx.control('cdp', 'view', { at: '2001-01-01T00:00:00Z' }),
      /older than the history kept/,
    );
    await assert.rejects(fx.control('cdp', 'view', { at: 'yesterday' }), /is not a time/);
    await assert.rejects(fx.control('cdp', 'mark', { name: 'round0' }), /exists/);
    await assert.rejects(fx.control('cdp', 'mark', { name: 'bad name' }), /mark name/);
    await assert.rejects(fx.control('cdp', 'close-view', { name: 'x' }), /no view named/);
    await assert.rejects(fx.control('cdp', 'frobnicate'), /has no command "frobnicate"/);
    await assert.rejects(
      fx.manager.createFilter('mem', 'cdp', {
        name: 'cdp2',
        args: { dir: dir.path, blockSize: BLOCK },
      }),
      /in use|already attached/,
    );
  });
});
