/**
 * The mirror filter in process, over memory devices: the background copy and its dirty map,
 * writes during the copy in both modes, pause on target failure and resume copying only the
 * dirty part, the automatic switch to sync, verify, cancel, and cutover through the core.
 */
import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { MemoryBackend } from '../../src/backends/memory.js';
import { ManagerError } from '../../src/core/manager.js';
import { ChunkBitmap } from '../../src/filters/mirror/bitmap.js';
import { decodeState, encodeState } from '../../src/filters/mirror/state-file.js';
import { KiB, MiB, holdWrites, pattern, sleep, startMirrorFixture } from './fixture.js';

describe('ChunkBitmap', () => {
  it('counts, finds and round-trips bits', () => {
    const b = new ChunkBitmap(21, true);
    assert.equal(b.count, 21);
    b.clear(0);
    b.clear(20);
    assert.equal(b.nextSet(0), 1);
    for (let i = 1; i < 20; i++) b.clear(i);
    assert.equal(b.nextSet(0), -1);
    b.set(17);
    assert.equal(b.nextSet(3), 17);
    const c = ChunkBitmap.fromBuffer(21, b.toBuffer());
    assert.equal(c.count, 1);
    assert.ok(c.get(17));
  });

  it('state files are checksummed', () => {
    const data = encodeState({
      header: { target: 't', size: 1, chunkSize: 4096, clean: true, savedAt: '', bytesCopied: 0 },
      bitmap: Buffer.from([1]),
    });
    assert.equal(decodeState(data, 'x').header.target, 't');
    data[20] ^= 1;
    assert.throws(() => decodeState(data, 'x'), /checksum/);
  });
});

describe('mirror copier', () => {
  it('copies the whole export, skipping holes on a fresh target, and reports synced', async () => {
    const fx = await startMirrorFixture({ size: 8 * MiB });
    try {
      await fx.source.write(pattern(3 * MiB, 1), 1 * MiB, 0);
      await fx.source.write(pattern(100 * KiB, 2), 7 * MiB, 0);
      await fx.start({ chunkSize: '256K' });
      await fx.waitState('synced');
      assert.ok(await fx.equal());
      const s = fx.status();
      // 1..4 MiB and 7..7.1 MiB hold data: 12 + 1 chunks of 256K.
      assert.equal(s.bytesCopied, 13 * 256 * KiB);
      assert.equal(s.dirtyBytes, 0);
      assert.equal(s.bytesDone, 8 * MiB);
      assert.ok((s.zeroBytes as number) > 0);
      await fx.waitEvent('mirror.synced');
    } finally {
      await fx.close();
    }
  });

  it('non-fresh target: zero chunks are zeroed there so the target reads back equal', async () => {
    const fx = await startMirrorFixture({ size: 2 * MiB, fresh: false });
    try {
      await fx.target.inner.write(pattern(2 * MiB, 9), 0, 0); // old junk on the target
      await fx.source.write(pattern(64 * KiB, 3), 0, 0);
      await fx.start({ chunkSize: '64K' });
      await fx.waitState('synced');
      assert.ok(await fx.equal());
    } finally {
      await fx.close();
    }
  });

  for (const mode of ['background', 'sync'] as const) {
    it(`${mode} mode: writes during a paced copy end up on the target`, async () => {
      const fx = await startMirrorFixture({ size: 8 * MiB });
      try {
        await fx.source.write(pattern(8 * MiB, 4), 0, 0);
        await fx.start({ chunkSize: '64K', rate: '16M', mode });
        let n = 0;
        const end = performance.now() + 300;
        while (performance.now() < end) {
          const off = ((n * 7919) % 2000) * 4 * KiB;
          await Promise.all([
            fx.exp.stack.write(pattern(4 * KiB, 100 + n), off, 0),
            fx.exp.stack.write(pattern(12 * KiB, 200 + n), (off + 1 * MiB) % (7 * MiB), 0),
          ]);
          n++;
        }
        await fx.control('set-rate', { rate: 0 });
        await fx.waitState('synced');
        // Synced in either mode: writes are mirrored now, the target stays equal.
        for (let i = 0; i < 20; i++)
          await fx.exp.stack.write(pattern(8 * KiB, 900 + i), i * 300 * KiB, 0);
        assert.equal(fx.status().state, 'synced');
        assert.ok(await fx.equal(), 'target equals source');
        if (mode === 'sync') assert.ok((fx.status().syncWrites as number) > 0);
      } finally {
        await fx.close();
      }
    });
  }

  it('a target failure pauses the mirror, clients see no error, resume copies only the dirty part', async () => {
    const fx = await startMirrorFixture({ size: 8 * MiB });
    try {
      await fx.source.write(pattern(8 * MiB, 5), 0, 0);
      await fx.start({ chunkSize: '64K', mode: 'sync' });
      await fx.waitState('synced');
      const copiedBefore = fx.status().bytesCopied as number;
      assert.equal(copiedBefore, 8 * MiB);
      fx.target.broken = true;
      // Writes to 10 distinct chunks: every one succeeds for the client.
      for (let i = 0; i < 10; i++)
        await fx.exp.stack.write(pattern(4 * KiB, 50 + i), i * 512 * KiB + 4 * KiB, 0);
      const s = fx.status();
      assert.equal(s.state, 'paused');
      assert.match(String(s.reason), /target: .*unreachable/);
      assert.equal(s.dirtyBytes, 10 * 64 * KiB);
      const paused = await fx.waitEvent('mirror.paused');
      assert.match(String(paused.data?.reason), /unreachable/);
      fx.target.broken = false;
      const r = await fx.control('resume');
      assert.equal(r.dirtyBytes, 10 * 64 * KiB);
      await fx.waitState('synced');
      const after = fx.status();
      assert.equal(after.bytesCopiedSinceResume, 10 * 64 * KiB, 'only the dirty part again');
      assert.equal(after.bytesCopied, copiedBefore + 10 * 64 * KiB);
      assert.ok(await fx.equal());
    } finally {
      await fx.close();
    }
  });

  it('background copying that cannot keep up switches itself to sync and converges', async () => {
    const fx = await startMirrorFixture({ size: 4 * MiB });
    try {
      await fx.source.write(pattern(4 * MiB, 6), 0, 0);
      // Copy at 4 MiB/s; random writes over the whole device far faster than that.
      await fx.start({ chunkSize: '64K', rate: '4M', convergePasses: 2 });
      let stop = false;
      let writes = 0;
      const load = (async () => {
        while (!stop) {
          const off = Math.floor(Math.random() * 1024) * 4 * KiB;
          await fx.exp.stack.write(pattern(4 * KiB, writes++), off, 0);
          await sleep(0);
        }
      })();
      const changed = await fx.waitEvent('mirror.mode-changed', 30_000);
      assert.equal(changed.data?.mode, 'sync');
      assert.match(String(changed.data?.reason), /does not converge/);
      await fx.waitState('synced', 30_000); // still under load
      stop = true;
      await load;
      assert.ok(writes > 100);
      assert.ok(await fx.equal());
    } finally {
      await fx.close();
    }
  });

  it('the copy rate limit holds under a client write load (writes do not cut pacing short)', async () => {
    const fx = await startMirrorFixture({ size: 8 * MiB });
    try {
      await fx.source.write(pattern(8 * MiB, 14), 0, 0);
      await fx.start({ chunkSize: '64K', rate: '2M' });
      let stop = false;
      let writes = 0;
      const load = (async () => {
        while (!stop) {
          await fx.exp.stack.write(pattern(4 * KiB, writes++), (writes % 2048) * 4 * KiB, 0);
          await sleep(0);
        }
      })();
      const started = performance.now();
      await sleep(500);
      stop = true;
      await load;
      const seconds = (performance.now() - started) / 1000;
      const copied = fx.status().bytesCopied as number;
      // 2 MiB/s, plus the chunks a pass may start without waiting (one per slot).
      assert.ok(writes > 100, `${writes} writes`);
      assert.ok(copied <= 2 * MiB * seconds + 3 * 64 * KiB, `copied ${copied} in ${seconds} s`);
    } finally {
      await fx.close();
    }
  });

  it('verify finds a chunk changed behind the mirror, and cutover with verify refuses', async () => {
    const fx = await startMirrorFixture({ size: 2 * MiB });
    try {
      await fx.source.write(pattern(2 * MiB, 7), 0, 0);
      await fx.start({ chunkSize: '64K' });
      await fx.waitState('synced');
      let v = await fx.control('verify');
      assert.equal(v.differing, 0);
      assert.equal(v.compared, 32);
      await fx.target.inner.write(Buffer.alloc(512, 1), 192 * KiB + 100, 0);
      v = await fx.control('verify');
      assert.equal(v.differing, 1);
      assert.deepEqual(v.differingOffsets, [192 * KiB]);
      await assert.rejects(fx.control('cutover', { verify: true }), /differing/);
      assert.equal(fx.exp.backendLabel, 'memory:source');
    } finally {
      await fx.close();
    }
  });

  it('verify does not count a chunk whose client write has reached one side only', async () => {
    const fx = await startMirrorFixture({ size: 2 * MiB });
    try {
      await fx.source.write(pattern(2 * MiB, 9), 0, 0);
      await fx.start({ chunkSize: '64K' });
      await fx.waitState('synced');
      // A mirrored write that reaches the source at once and the target only later.
      const { release } = holdWrites(fx.target);
      const held = fx.exp.stack.write(pattern(4 * KiB, 10), 320 * KiB, 0);
      await new Promise((r) => setTimeout(r, 10));
      let v = await fx.control('verify');
      assert.equal(v.differing, 0, 'a write in flight is no difference');
      assert.equal(v.pending, 1);
      assert.equal(v.compared, 31);
      release();
      await held;
      v = await fx.control('verify');
      assert.equal(v.differing, 0);
      assert.equal(v.compared, 32);
    } finally {
      await fx.close();
    }
  });

  it('cutover makes the target the backend under a live stack; other filters stay; old backend closed', async () => {
    const fx = await startMirrorFixture({ size: 4 * MiB });
    try {
      await fx.manager.createFilter('mem', 'stats', { name: 'top' });
      await fx.source.write(pattern(4 * MiB, 8), 0, 0);
      await fx.start({ chunkSize: '128K', rate: '32M' });
      await assert.rejects(fx.control('cutover'), /not synced yet/);
      // Writes keep coming through the cutover.
      let stop = false;
      let n = 0;
      const load = (async () => {
        while (!stop) {
          await fx.exp.stack.write(pattern(4 * KiB, 1000 + n), (n % 1000) * 4 * KiB, 0);
          n++;
          await sleep(1);
        }
      })();
      const r = await fx.control('cutover', { wait: 20_000 });
      assert.equal(r.state, 'cutover');
      assert.equal(fx.exp.backendLabel, 'memory:target');
      assert.equal(fx.exp.stack.below, fx.target);
      await sleep(50);
      stop = true;
      await load;
      assert.deepEqual(
        fx.exp.stack.filters().map((e) => e.name),
        ['top', 'mirror'],
      );
      // The old backend is closed; reads and writes go to the target alone.
      await assert.rejects(fx.source.read(Buffer.alloc(1), 0, 0));
      const last = pattern(4 * KiB, 1000 + n - 1);
      const got = Buffer.alloc(4 * KiB);
      await fx.target.inner.read(got, ((n - 1) % 1000) * 4 * KiB, 0);
      assert.ok(got.equals(last), 'the last write landed on the target');
      await fx.waitEvent('mirror.cutover');
      const replaced = await fx.waitEvent('export.backend-replaced');
      assert.equal(replaced.data?.to, 'memory:target');
      // Removing the mirror now leaves the target in place.
      await fx.manager.removeFilter('mem', 'mirror');
      await fx.exp.stack.write(pattern(4 * KiB, 5), 0, 0);
      await fx.target.inner.read(got, 0, 0);
      assert.ok(got.equals(pattern(4 * KiB, 5)));
    } finally {
      await fx.close();
    }
  });

  it('replaceBackend refuses a device of another size and changes nothing', async () => {
    const fx = await startMirrorFixture({ size: 1 * MiB });
    try {
      const other = new MemoryBackend({ size: 2 * MiB });
      await assert.rejects(
        fx.manager.replaceBackend('mem', other, 'memory:other'),
        (e: unknown) => e instanceof ManagerError && e.code === 'invalid',
      );
      assert.equal(fx.exp.stack.below, fx.source);
      assert.equal(fx.exp.backendLabel, 'memory:source');
    } finally {
      await fx.close();
    }
  });

  it('cancel when synced leaves a consistent copy; removal keeps going without it', async () => {
    const fx = await startMirrorFixture({ size: 2 * MiB });
    try {
      await fx.source.write(pattern(2 * MiB, 11), 0, 0);
      await fx.start({ chunkSize: '64K' });
      await fx.waitState('synced');
      const r = await fx.control('cancel');
      assert.equal(r.consistent, true);
      assert.ok(await fx.equal());
      await fx.exp.stack.write(pattern(4 * KiB, 12), 0, 0); // not mirrored any more
      assert.ok(!(await fx.equal()));
      const e = await fx.waitEvent('mirror.cancelled');
      assert.equal(e.data?.consistent, true);
    } finally {
      await fx.close();
    }
  });

  it('a clean stop saves the dirty map; the next mirror resumes copying only the dirty part', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'devfilter-mirror-state-'));
    const fx = await startMirrorFixture({ size: 4 * MiB, fresh: false });
    try {
      await fx.source.write(pattern(4 * MiB, 13), 0, 0);
      await fx.start({ chunkSize: '64K', stateDir: dir });
      await fx.waitState('synced');
      await fx.control('pause');
      for (let i = 0; i < 5; i++)
        await fx.exp.stack.write(pattern(8 * KiB, 60 + i), (i * MiB) / 2, 0);
      await fx.manager.removeFilter('mem', 'mirror'); // policy "stop"
      const file = join(dir, 'mem.mirror.mirror-state');
      assert.ok(existsSync(file));
      assert.equal(fx.target.closes, 1);
      const { readState } = await import('../../src/filters/mirror/state-file.js');
      const st = await readState(file);
      assert.equal(st?.header.clean, true);
      assert.equal(ChunkBitmap.fromBuffer(64, st!.bitmap).count, 5);
      // A new mirror with the same target and state directory resumes from the map.
      await fx.start({ chunkSize: '64K', stateDir: dir });
      await fx.waitState('synced');
      const s = fx.status();
      assert.equal(s.resumed, 'exact');
      assert.equal(s.bytesCopied, 5 * 64 * KiB);
      assert.ok(await fx.equal());
      // While in use the file says "not clean": a crash now means a full copy next time.
      assert.equal((await readState(file))?.header.clean, false);
    } finally {
      await fx.close();
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
