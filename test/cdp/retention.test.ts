/**
 * The cdp filter's limits: retention by bytes and by age lets the oldest history go (points
 * before the window are refused, every point inside it still equals the model), an open view
 * holds retention back until it closes, and client write latency while retention drops
 * segments is measured against latency without retention (reported, not asserted: timing
 * belongs to benchmarks). A journal that fails (its disk full: the segment's descriptor is
 * swapped for /dev/full) either drops the history and keeps serving writes, or keeps the
 * history and fails writes with ENOSPC until `resume`.
 */
import assert from 'node:assert/strict';
import { openSync, readdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, test } from 'node:test';
import type { Device } from '../../src/core/device.js';
import type { NbdClient } from '../../src/nbd/client.js';
import { tempDir } from '../helpers/server.js';
import { prng } from '../protocol/raw.js';
import { startFixture, pattern, type Fixture, MiB } from '../filters/fixture.js';

const SIZE = 4 * MiB;

interface Status {
  state: string;
  oldest: { point: number };
  newest: { point: number };
  journal: { bytes: number; segments: number };
  retention: { heldBy: string[]; droppedSegments: number };
  failure: { reason: string } | null;
}

describe('cdp retention and journal failures', () => {
  let fx: Fixture;
  let dir: { path: string; cleanup: () => void };
  let c: NbdClient;
  const rand = prng(99);
  const status = () => fx.status<Status>('cdp');

  beforeEach(async () => {
    fx = await startFixture({ size: SIZE });
    dir = tempDir('devfilter-cdp-retention-');
    c = await fx.connect();
  });
  afterEach(async () => {
    await fx.close();
    dir.cleanup();
  });

  const viewDevice = (name: string): Device =>
    fx.manager.publishedExports().find((e) => e.name === name)!.device;
  async function viewEquals(seq: number, want: Buffer): Promise<void> {
    const v = await fx.control<{ name: string }>('cdp', 'view', { seq });
    const buf = Buffer.alloc(SIZE);
    await viewDevice(v.name).read(buf, 0, 0);
    await fx.control('cdp', 'close-view', { name: v.name });
    assert.ok(buf.equals(want), `view of point ${seq} equals the model`);
  }

  async function writeTimed(n: number, model: Buffer, states: Map<number, Buffer>) {
    const lat: number[] = [];
    for (let i = 0; i < n; i++) {
      const off = 4096 * Math.floor(rand() * (SIZE / 4096 - 16));
      const data = pattern(4096 * (1 + Math.floor(rand() * 16)), Math.floor(rand() * 1e9));
      const t0 = process.hrtime.bigint();
      await c.write(off, data);
      lat.push(Number(process.hrtime.bigint() - t0) / 1000);
      data.copy(model, off);
      states.set(status().newest.point, Buffer.from(model));
    }
    return lat.sort((a, b) => a - b);
  }
  const pct = (a: number[], p: number) => a[Math.min(a.length - 1, Math.floor(a.length * p))]!;

  test('by bytes: old history goes, the window stays exact; a view holds it back', async () => {
    await fx.manager.createFilter('mem', 'cdp', {
      name: 'cdp',
      args: { dir: dir.path, keepBytes: '1M', segmentSize: '128K' },
    });
    const model = Buffer.alloc(SIZE);
    const states = new Map<number, Buffer>([[0, Buffer.alloc(SIZE)]]);
    const steady = await writeTimed(150, model, states);
    await fx.control('cdp', 'retain');
    let st = status();
    assert.ok(st.retention.droppedSegments > 0, 'segments were dropped');
    assert.ok(st.journal.bytes <= 1 * MiB, `journal ${st.journal.bytes} within keepBytes`);
    assert.ok(st.oldest.point > 0);
    await assert.rejects(
      fx.control('cdp', 'view', { seq: st.oldest.point - 1 }),
      /older than the oldest point kept/,
    );
    for (const [p, want] of states) if (p >= st.oldest.point) await viewEquals(p, want);

    // A view of the oldest point pins it: retention waits for it, then goes on.
    const pinned = st.oldest.point;
    const v = await fx.control<{ name: string }>('cdp', 'view', { seq: pinned });
    await writeTimed(60, model, states);
    await fx.control('cdp', 'retain');
    st = status();
    assert.equal(st.oldest.point, pinned, 'the view held retention back');
    assert.deepEqual(st.retention.heldBy, [v.name]);
    const buf = Buffer.alloc(SIZE);
    await viewDevice(v.name).read(buf, 0, 0);
    assert.ok(buf.equals(states.get(pinned)!), 'the pinned view is intact');
    await fx.control('cdp', 'close-view', { name: v.name });
    await fx.control('cdp', 'retain');
    assert.ok(status().oldest.point > pinned, 'closing the view let retention go on');

    // Latency of the same writes with retention dropping segments all along, against none.
    const dropping = await writeTimed(150, model, states);
    console.log(
      `# cdp write latency µs, p50/p99: before the limit ${pct(steady, 0.5).toFixed(0)}/${pct(steady, 0.99).toFixed(0)}, while retention drops segments ${pct(dropping, 0.5).toFixed(0)}/${pct(dropping, 0.99).toFixed(0)} (${status().retention.droppedSegments} segments dropped)`,
    );
  });

  test('by age: points older than the window are refused, marks inside it stay', async () => {
    await fx.manager.createFilter('mem', 'cdp', {
      name: 'cdp',
      args: { dir: dir.path, keepHours: 1.5 / 3600, segmentSize: '64K' },
    });
    const model = Buffer.alloc(SIZE);
    const states = new Map<number, Buffer>();
    await writeTimed(20, model, states);
    await fx.control('cdp', 'mark', { name: 'old' });
    await writeTimed(20, model, states);
    await new Promise((r) => setTimeout(r, 1700));
    await writeTimed(40, model, states);
    await fx.control('cdp', 'mark', { name: 'new' });
    await fx.control('cdp', 'retain');
    const st = status();
    assert.ok(
      st.oldest.point >= 40,
      `points of the first writes expired (oldest ${st.oldest.point})`,
    );
    await assert.rejects(fx.control('cdp', 'view', { seq: 10 }), /older than the oldest/);
    const marks = await fx.control<Array<{ name: string }>>('cdp', 'marks');
    // Point 40 was the device's state when the window began: it is still inside.
    assert.equal(st.oldest.point, 40);
    assert.deepEqual(
      marks.map((m) => m.name),
      ['new'],
      'the mark of point 20 expired',
    );
    for (const [p, want] of states) if (p >= st.oldest.point) await viewEquals(p, want);
  });

  test('a trim of a whole large device stays within the index limit', async () => {
    await fx.close();
    fx = await startFixture({ size: 64 * 1024 * MiB });
    c = await fx.connect();
    await fx.manager.createFilter('mem', 'cdp', {
      name: 'cdp',
      args: { dir: dir.path, indexLimit: 65536 },
    });
    await c.write(5 * MiB, pattern(8192, 7));
    await fx.control('cdp', 'mark', { name: 'before' });
    // What mkfs does first: 64 GiB of discards (the device reads as zeros: no payload).
    for (let off = 0; off < 64 * 1024 * MiB; off += 1024 * MiB) await c.trim(off, 1024 * MiB);
    await fx.control('cdp', 'retain');
    const st = fx.status<Status & { index: { entries: number } }>('cdp');
    assert.equal(st.state, 'active');
    assert.ok(st.index.entries <= 65536 + 65536 / 8, `index ${st.index.entries} entries`);
    assert.ok(st.journal.segments > 2, 'segments end by index weight too');
    const v = await fx.control<{ name: string }>('cdp', 'view', { seq: st.newest.point - 1 });
    const buf = Buffer.alloc(4096);
    await viewDevice(v.name).read(buf, 64 * 1024 * MiB - 4096, 0);
    assert.ok(buf.equals(Buffer.alloc(4096)));
    await fx.control('cdp', 'close-view', { name: v.name });
  });

  test('a history given up after a journal failure is not taken back at the next attach', async () => {
    await fx.manager.createFilter('mem', 'cdp', { name: 'cdp', args: { dir: dir.path } });
    await c.write(0, pattern(8192, 1));
    await fx.control('cdp', 'mark', { name: 'a' });
    breakJournal();
    await c.write(0, pattern(8192, 2)); // served unjournaled: mark a's view would be wrong
    await fx.manager.removeFilter('mem', 'cdp', { policy: 'keep' });
    await fx.manager.createFilter('mem', 'cdp', { name: 'cdp', args: { dir: dir.path } });
    const st = fx.status<Status & { recovery: { notes: string[] }; marks: number }>('cdp');
    assert.equal(st.state, 'active');
    assert.equal(st.marks, 0, 'the old marks are gone with their history');
    assert.match(st.recovery.notes.join('\n'), /history given up/);
    await assert.rejects(fx.control('cdp', 'view', { mark: 'a' }), /no mark named "a"/);
  });

  test('a segment lost in the middle: the history before it goes, the rest stays exact', async () => {
    const args = { dir: dir.path, segmentSize: '64K' };
    await fx.manager.createFilter('mem', 'cdp', { name: 'cdp', args });
    const model = Buffer.alloc(SIZE);
    const states = new Map<number, Buffer>();
    await writeTimed(40, model, states);
    await fx.manager.removeFilter('mem', 'cdp', { policy: 'keep' });
    const segs = readdirSync(dir.path)
      .filter((n) => n.endsWith('.seg'))
      .sort();
    assert.ok(segs.length > 4, `${segs.length} segments`);
    rmSync(join(dir.path, segs[2]!));
    await fx.manager.createFilter('mem', 'cdp', { name: 'cdp', args });
    const st = fx.status<Status & { recovery: { notes: string[] } }>('cdp');
    assert.match(st.recovery.notes.join('\n'), /the history before it dropped/);
    assert.ok(st.oldest.point > 0);
    await assert.rejects(fx.control('cdp', 'view', { seq: st.oldest.point - 1 }), /older than/);
    for (const [p, want] of states) if (p >= st.oldest.point) await viewEquals(p, want);
  });

  function breakJournal(): void {
    const filter = fx.manager
      .getExport('mem')
      .stack.filters()
      .find((e) => e.name === 'cdp')!.filter as unknown as {
      journal: { segments: Array<{ fd: number }> };
    };
    const segs = filter.journal.segments;
    segs[segs.length - 1]!.fd = openSync('/dev/full', 'r+');
  }

  test('journal full, keep-serving: writes go on, the history is dropped, reset starts anew', async () => {
    await fx.manager.createFilter('mem', 'cdp', { name: 'cdp', args: { dir: dir.path } });
    await c.write(0, pattern(8192, 1));
    await fx.control('cdp', 'mark', { name: 'a' });
    breakJournal();
    await c.write(0, pattern(8192, 2)); // served: availability first
    assert.ok((await c.read(0, 8192)).equals(pattern(8192, 2)));
    assert.match(status().state, /failed \(history lost, writes served\)/);
    assert.match(status().failure!.reason, /ENOSPC|no space/i);
    await assert.rejects(fx.control('cdp', 'view', { mark: 'a' }), /history was lost/);
    await fx.control('cdp', 'reset');
    assert.equal(status().state, 'active');
    await c.write(0, pattern(8192, 3));
    await viewEquals(0, Buffer.concat([pattern(8192, 2), Buffer.alloc(SIZE - 8192)]));
  });

  test('journal full, stop-writes: writes fail with ENOSPC, the history stays, resume', async () => {
    await fx.manager.createFilter('mem', 'cdp', {
      name: 'cdp',
      args: { dir: dir.path, onError: 'stop-writes' },
    });
    await c.write(0, pattern(8192, 1));
    await fx.control('cdp', 'mark', { name: 'a' });
    breakJournal();
    await assert.rejects(c.write(0, pattern(8192, 2)), /ENOSPC/);
    await assert.rejects(c.trim(0, 4096), /ENOSPC/);
    assert.ok((await c.read(0, 8192)).equals(pattern(8192, 1)), 'nothing was written');
    assert.match(status().state, /failed \(history kept, writes stopped\)/);
    await fx.control('cdp', 'resume');
    assert.equal(status().state, 'active');
    await c.write(0, pattern(8192, 4));
    await viewEquals(
      (await fx.control<{ point: number }>('cdp', 'resolve', { mark: 'a' })).point,
      Buffer.concat([pattern(8192, 1), Buffer.alloc(SIZE - 8192)]),
    );
    assert.ok((await c.read(0, 8192)).equals(pattern(8192, 4)));
  });
});
