/**
 * Convergence through a real daemon: `devfilter serve` (a child process) mirrors a 16 MiB
 * export at a copy rate limit of 16 MiB/s while fio (NBD engine) writes 4 KiB blocks at random
 * over the whole device at 16 MiB/s or more — every chunk is dirtied again in every pass, so
 * background copying cannot converge. The mirror must switch itself to sync mode, reach
 * `synced` under the load, and stay synced while the load goes on. The measured numbers are
 * reported as test diagnostics.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { describeResult, run } from '../helpers/run.js';
import { tempDir } from '../helpers/server.js';
import { requireTools } from '../helpers/tools.js';
import { startCliDaemon } from '../cli/fixtures.js';
import { MiB, pattern } from './fixture.js';

const SIZE = 16 * MiB;
const COPY_RATE = 16 * MiB;
const LOAD_SECONDS = 10;

interface Sample {
  at: number;
  state: string;
  mode: string;
  dirtyBytes: number;
  passes: number;
}

describe('mirror convergence through a daemon', () => {
  it(
    'random writes faster than the copy rate: switch to sync, synced under load, stays synced',
    { timeout: 120_000 },
    async (t) => {
      if (!requireTools(t, 'fio')) return;
      const dir = tempDir('devfilter-mirror-conv-');
      const source = join(dir.path, 'source.img');
      const target = join(dir.path, 'target.img');
      fs.writeFileSync(source, pattern(SIZE, 1)); // all data: every chunk must be copied
      const d = await startCliDaemon(['-e', `disk=file:${source}`], { dir: dir.path });
      try {
        const loadArgs = [
          '--ioengine=nbd',
          `--uri=${d.uri('disk')}`,
          '--name=load',
          '--rw=randwrite',
          '--bs=4k',
          `--size=${SIZE}`,
          '--iodepth=8',
          '--rate=24m',
          '--time_based',
          `--runtime=${LOAD_SECONDS}`,
          '--norandommap',
          '--output-format=json',
        ];
        const started = Date.now();
        const load = run('fio', loadArgs, { timeoutMs: 60_000 });
        const startArgs = ['mirror', 'start', 'disk', '--target', target, '--rate', '16M'];
        const r = await d.cli([...startArgs, '--chunk-size', '256K'], { timeoutMs: 30_000 });
        assert.equal(r.code, 0, describeResult('devfilter', startArgs, r));
        const mirrorStarted = Date.now();

        const samples: Sample[] = [];
        let loadDone = false;
        void load.then(() => (loadDone = true));
        while (!loadDone) {
          const s = await d.json<Record<string, unknown>>(['mirror', 'status', 'disk']);
          samples.push({
            at: Date.now() - mirrorStarted,
            state: String(s.state),
            mode: String(s.mode),
            dirtyBytes: s.dirtyBytes as number,
            passes: s.passes as number,
          });
          await new Promise((res) => setTimeout(res, 100));
        }
        const f = await load;
        assert.equal(f.code, 0, describeResult('fio', loadArgs, f));
        const job = (
          JSON.parse(f.stdout.slice(f.stdout.indexOf('{'))) as {
            jobs: { write: { bw_bytes: number; total_ios: number }; error: number }[];
          }
        ).jobs[0]!;
        assert.equal(job.error, 0);
        const loadRate = job.write.bw_bytes;
        const final = await d.json<Record<string, unknown>>(['mirror', 'status', 'disk']);

        const switched = samples.find((s) => s.mode === 'sync');
        const synced = samples.find((s) => s.state === 'synced');
        assert.ok(switched !== undefined, `never switched to sync: ${JSON.stringify(samples)}`);
        assert.ok(synced !== undefined, `never synced under load: ${JSON.stringify(samples)}`);
        // Background copying did not converge by itself: it was still copying when it switched.
        const before = samples.filter((s) => s.at < switched.at);
        assert.ok(before.length > 0 && before.every((s) => s.state === 'copying'));
        // Synced under load, and stayed so while fio went on writing.
        const afterSync = samples.filter((s) => s.at >= synced.at);
        assert.ok(
          afterSync.every((s) => s.state === 'synced'),
          JSON.stringify(afterSync.map((s) => s.state)),
        );
        assert.ok(afterSync.length >= 5, 'the load went on for a while after synced');
        assert.equal(final.state, 'synced');
        // The copy rate limit held under the load (it started a moment before `mirrorStarted`).
        const copied = final.bytesCopied as number;
        assert.ok(copied <= COPY_RATE * (synced.at / 1000 + 1), `copied ${copied} bytes`);
        // The load was at least as fast as the copy rate limit.
        assert.ok(loadRate >= COPY_RATE, `load ${loadRate} B/s < copy rate ${COPY_RATE} B/s`);

        const v = await d.json<Record<string, unknown>>(['mirror', 'verify', 'disk']);
        assert.equal(v.differing, 0, JSON.stringify(v));
        const maxDirty = Math.max(...before.map((s) => s.dirtyBytes));
        const mb = (n: number): string => (n / MiB).toFixed(1);
        t.diagnostic(
          `device ${mb(SIZE)} MiB, chunk 256 KiB, copy rate limit ${mb(COPY_RATE)} MiB/s; ` +
            `load: fio randwrite 4k iodepth 8, ${mb(loadRate)} MiB/s average over ${LOAD_SECONDS} s ` +
            `(${job.write.total_ios} writes)`,
        );
        t.diagnostic(
          `switched to sync after ${(switched.at / 1000).toFixed(1)} s (pass ${switched.passes}, ` +
            `dirty up to ${mb(maxDirty)} MiB while background copying); synced after ` +
            `${(synced.at / 1000).toFixed(1)} s; stayed synced for the remaining ` +
            `${((Date.now() - mirrorStarted - synced.at) / 1000).toFixed(1)} s of load; ` +
            `copied ${mb(final.bytesCopied as number)} MiB for a ${mb(SIZE)} MiB device, ` +
            `${String(final.syncWrites)} mirrored writes; verify: ${String(v.compared)} chunks equal`,
        );
        t.diagnostic(`load started ${mirrorStarted - started} ms before the mirror`);
      } finally {
        await d.close();
        dir.cleanup();
      }
    },
  );
});
