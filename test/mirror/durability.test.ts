/**
 * What the mirror promises about durability on the target: while writes are mirrored (sync
 * mode, or synced), a client write with FUA is FUA on the target too (or write + flush on a
 * target without FUA), and a client flush flushes the target before it completes; a target
 * flush that fails never fails the client, it re-dirties and pauses. In background mode a
 * client flush goes to the source only.
 */
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { RequestFlags } from '../../src/core/device.js';
import { KiB, MiB, pattern, sleep, startMirrorFixture } from './fixture.js';

const FUA = RequestFlags.FUA;

describe('mirror durability on the target', () => {
  it('sync mode: FUA writes and zeroing are FUA on the target; plain writes are not', async () => {
    const fx = await startMirrorFixture({ size: 2 * MiB });
    try {
      await fx.source.write(pattern(2 * MiB, 1), 0, 0);
      await fx.start({ chunkSize: '64K', mode: 'sync' });
      await fx.waitState('synced');
      const before = fx.target.fuaWrites;
      await fx.exp.stack.write(pattern(4 * KiB, 2), 8 * KiB, 0);
      assert.equal(fx.target.fuaWrites, before, 'no FUA asked, none sent');
      await fx.exp.stack.write(pattern(4 * KiB, 3), 64 * KiB, FUA);
      await fx.exp.stack.writeZeroes(128 * KiB, 8 * KiB, FUA);
      assert.equal(fx.target.fuaWrites, before + 2);
      assert.equal(fx.status().state, 'synced');
      assert.ok(await fx.equal());
    } finally {
      await fx.close();
    }
  });

  it('sync mode while still copying: a FUA write is FUA on the target', async () => {
    const fx = await startMirrorFixture({ size: 8 * MiB });
    try {
      await fx.source.write(pattern(8 * MiB, 4), 0, 0);
      await fx.start({ chunkSize: '64K', mode: 'sync', rate: '1M' });
      assert.equal(fx.status().state, 'copying');
      await fx.exp.stack.write(pattern(4 * KiB, 5), 7 * MiB, FUA);
      assert.equal(fx.target.fuaWrites, 1);
      assert.equal(fx.status().mirroringWrites, true);
    } finally {
      await fx.close();
    }
  });

  it('a target without FUA gets the write and then a flush before the client is answered', async () => {
    const fx = await startMirrorFixture({ size: 2 * MiB });
    try {
      fx.target.without = { fua: false };
      await fx.start({ chunkSize: '64K', mode: 'sync' });
      await fx.waitState('synced');
      const flushes = fx.target.flushes;
      await fx.exp.stack.write(pattern(4 * KiB, 6), 0, FUA);
      assert.equal(fx.target.fuaWrites, 0);
      assert.equal(fx.target.flushes, flushes + 1);
    } finally {
      await fx.close();
    }
  });

  it('while mirroring, a client flush flushes the target too', async () => {
    const fx = await startMirrorFixture({ size: 2 * MiB });
    try {
      await fx.source.write(pattern(2 * MiB, 7), 0, 0);
      await fx.start({ chunkSize: '64K', mode: 'sync' });
      await fx.waitState('synced');
      await fx.exp.stack.write(pattern(4 * KiB, 8), 0, 0);
      const flushes = fx.target.flushes;
      await fx.exp.stack.flush(0);
      assert.equal(fx.target.flushes, flushes + 1);
      assert.equal(fx.status().syncFlushes, 1);
    } finally {
      await fx.close();
    }
  });

  it('a failing target flush does not fail the client: the write is re-dirtied and the mirror pauses', async () => {
    const fx = await startMirrorFixture({ size: 2 * MiB });
    try {
      await fx.source.write(pattern(2 * MiB, 9), 0, 0);
      await fx.start({ chunkSize: '64K', mode: 'sync' });
      await fx.waitState('synced');
      await fx.exp.stack.write(pattern(4 * KiB, 10), 3 * 64 * KiB, 0);
      fx.target.broken = true;
      await fx.exp.stack.flush(0); // succeeds: the source is authoritative
      const s = fx.status();
      assert.equal(s.state, 'paused');
      // The chunk written since the last target flush may be lost there: it is copied again.
      assert.equal(s.dirtyBytes, 64 * KiB);
      fx.target.broken = false;
      await fx.control('resume');
      await fx.waitState('synced');
      assert.ok(await fx.equal());
    } finally {
      await fx.close();
    }
  });

  it('background mode, still copying: a client flush goes to the source only', async () => {
    const fx = await startMirrorFixture({ size: 8 * MiB });
    try {
      await fx.source.write(pattern(8 * MiB, 11), 0, 0);
      await fx.start({ chunkSize: '64K', rate: '256K' });
      // The copier flushes the target right after its first chunk, then once a second.
      const deadline = performance.now() + 5000;
      while (fx.target.flushes === 0 && performance.now() < deadline) await sleep(5);
      assert.ok(fx.target.flushes > 0, 'the copier flushed once');
      const flushes = fx.target.flushes;
      await fx.exp.stack.write(pattern(4 * KiB, 12), 4 * MiB, FUA);
      await fx.exp.stack.flush(0);
      assert.equal(fx.target.flushes, flushes, 'the client flush did not reach the target');
      assert.equal(fx.target.fuaWrites, 0, 'the write was not mirrored');
      assert.equal(fx.status().mirroringWrites, false);
      assert.equal(fx.status().state, 'copying');
    } finally {
      await fx.close();
    }
  });
});
