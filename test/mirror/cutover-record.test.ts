/**
 * Cutover records in process: what the mirror writes at a cutover, when it refuses to cut
 * over, what a mirror declared again over a stale source does, and how records read back.
 * (The daemon's refusal at start-up is in cutover-config.test.ts, with real daemons.)
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import {
  describeStale,
  newRecord,
  readRecord,
  stateDirRecord,
} from '../../src/filters/mirror/cutover-record.js';
import { MiB, KiB, holdWrites, pattern, startMirrorFixture } from './fixture.js';

function tmp(): { path: string; cleanup: () => void } {
  const path = mkdtempSync(join(tmpdir(), 'devfilter-mirror-rec-'));
  return { path, cleanup: () => rmSync(path, { recursive: true, force: true }) };
}

describe('mirror cutover records', () => {
  it('a cutover records itself in stateDir (done); a mirror declared again over the old backend refuses', async () => {
    const dir = tmp();
    const fx = await startMirrorFixture({ size: 1 * MiB });
    let fx2: Awaited<ReturnType<typeof startMirrorFixture>> | undefined;
    try {
      await fx.source.write(pattern(1 * MiB, 1), 0, 0);
      await fx.start({ chunkSize: '64K', stateDir: dir.path });
      const r = await fx.control('cutover', { wait: 10_000 });
      const path = stateDirRecord(dir.path, 'mem');
      assert.deepEqual(r.recorded, [path]);
      // A memory source has no place beside it: the daemon would not know, so it warns.
      assert.match(String(r.warning), /not a regular file/);
      const rec = await readRecord(path);
      assert.equal(rec?.state, 'done');
      assert.equal(rec?.from, 'memory:source');
      assert.equal(rec?.to, 'memory:target');
      assert.equal(rec?.export, 'mem');

      // The same export, started again over the old backend (as a stale config would): the
      // mirror must not copy the old data over the target.
      fx2 = await startMirrorFixture({ size: 1 * MiB });
      await assert.rejects(
        fx2.start({ chunkSize: '64K', stateDir: dir.path }),
        /the backend memory:source was cut over to memory:target .* stale data/,
      );
      assert.equal(fx2.target.writes, 0);
    } finally {
      await fx.close();
      await fx2?.close();
      dir.cleanup();
    }
  });

  it('without a place to record it, the cutover warns that the config must be changed', async () => {
    const fx = await startMirrorFixture({ size: 1 * MiB });
    try {
      await fx.start({ chunkSize: '64K' });
      const r = await fx.control('cutover', { wait: 10_000 });
      assert.deepEqual(r.recorded, []);
      assert.match(String(r.warning), /not a regular file.*change the export's backend/);
      const e = await fx.waitEvent('mirror.cutover');
      assert.match(String(e.data?.warning), /not a regular file/);
    } finally {
      await fx.close();
    }
  });

  it('a record that cannot be written refuses the cutover; nothing changes', async () => {
    const dir = tmp();
    const fx = await startMirrorFixture({ size: 1 * MiB });
    try {
      await fx.start({ chunkSize: '64K', stateDir: dir.path });
      await fx.waitState('synced');
      dir.cleanup(); // the state directory is gone
      await assert.rejects(fx.control('cutover'), /cannot record the cutover .*no cutover/);
      assert.equal(fx.exp.backendLabel, 'memory:source');
      assert.equal(fx.status().state, 'synced');
    } finally {
      await fx.close();
      dir.cleanup();
    }
  });

  it('a switch that does not happen (drain timeout) leaves no record', async () => {
    const dir = tmp();
    const fx = await startMirrorFixture({ size: 1 * MiB });
    try {
      await fx.start({ chunkSize: '64K', stateDir: dir.path });
      await fx.waitState('synced');
      // A client write held in the source keeps the drain from finishing.
      const { release } = holdWrites(fx.source);
      const held = fx.exp.stack.write(pattern(4 * KiB, 2), 0, 0);
      await assert.rejects(fx.control('cutover', { timeoutMs: 50 }));
      assert.equal(fs.existsSync(stateDirRecord(dir.path, 'mem')), false);
      assert.equal(fx.exp.backendLabel, 'memory:source');
      release();
      await held;
    } finally {
      await fx.close();
      dir.cleanup();
    }
  });

  it('records read back; an unreadable one still refuses, as pending', async () => {
    const dir = tmp();
    try {
      const path = join(dir.path, 'x.devfilter-cutover');
      fs.writeFileSync(path, 'not json');
      const bad = await readRecord(path);
      assert.equal(bad?.state, 'pending');
      assert.match(
        describeStale('file:/a', { path, record: bad! }),
        /records a cutover away from file:\/a, but cannot be read.*delete/,
      );
      const rec = newRecord('disk', 'file:/a', 'file:/b');
      assert.equal(rec.state, 'pending');
      assert.match(
        describeStale('file:/a', { path, record: rec }),
        /not known which of the two is current.*qemu-img compare/,
      );
      assert.equal(await readRecord(join(dir.path, 'none')), undefined);
    } finally {
      dir.cleanup();
    }
  });
});
