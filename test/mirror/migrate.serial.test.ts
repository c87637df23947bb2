/**
 * The acceptance tests with real `devfilter serve` daemons and the real CLI:
 *
 * 1. Migration under load: fio (NBD engine, crc32c verify) writes through the export the whole
 *    time while the mirror copies it to a file and cuts over; every fio run passes; afterwards
 *    the target file alone holds the data (fio --verify_only on it, and its hash equals what
 *    the export served).
 * 2. Cross-daemon: the export is mirrored to `nbd+unix://` of a second daemon; that daemon is
 *    killed in the middle (the mirror pauses, clients see no error), restarted, `mirror resume`
 *    copies only the dirty part, cutover; the second daemon then holds the data.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { NbdClient } from '../../src/nbd/client.js';
import { describeResult, run } from '../helpers/run.js';
import { spawnDaemon, tempDir } from '../helpers/server.js';
import { requireTools } from '../helpers/tools.js';
import { startCliDaemon, type CliDaemon } from '../cli/fixtures.js';
import { pattern } from './fixture.js';

const MiB = 1024 * 1024;

async function status(d: CliDaemon): Promise<Record<string, unknown>> {
  return d.json<Record<string, unknown>>(['mirror', 'status', 'disk']);
}

async function waitFor(
  d: CliDaemon,
  ok: (s: Record<string, unknown>) => boolean,
  what: string,
  timeoutMs = 60_000,
): Promise<Record<string, unknown>> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const s = await status(d);
    if (ok(s)) return s;
    if (Date.now() > deadline) throw new Error(`${what}: mirror status ${JSON.stringify(s)}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

function sha(data: Buffer): string {
  return createHash('sha256').update(data).digest('hex');
}

async function readAll(uri: string, size: number): Promise<Buffer> {
  const c = await NbdClient.fromUri(uri);
  try {
    const parts: Buffer[] = [];
    for (let o = 0; o < size; o += 4 * MiB)
      parts.push(await c.read(o, Math.min(4 * MiB, size - o)));
    return Buffer.concat(parts);
  } finally {
    await c.close();
  }
}

describe('mirror with real daemons', () => {
  it(
    'fio with crc32c verify runs throughout a migration to a file and its cutover; the target alone verifies',
    { timeout: 300_000 },
    async (t) => {
      if (!requireTools(t, 'fio')) return;
      const dir = tempDir('devfilter-mirror-fio-');
      const source = join(dir.path, 'source.img');
      const target = join(dir.path, 'target.img');
      const d = await startCliDaemon(['-e', `disk=file:${source},create=64M`], { dir: dir.path });
      const cli = async (args: string[]): Promise<string> => {
        const r = await d.cli(args, { timeoutMs: 120_000 });
        assert.equal(r.code, 0, describeResult('devfilter', args, r));
        return r.stdout;
      };
      const pre = [
        '--name=pre',
        '--rw=write',
        '--bs=64k',
        '--size=16M',
        '--offset=0',
        '--verify=crc32c',
        '--verify_state_save=0',
      ];
      try {
        // Data that must migrate: written (and verified) before the mirror starts.
        let r = await run('fio', ['--ioengine=nbd', `--uri=${d.uri('disk')}`, ...pre], {
          timeoutMs: 60_000,
        });
        assert.equal(r.code, 0, describeResult('fio', pre, r));

        let runs = 0;
        let runsAfterCutover = 0;
        let cutOver = false;
        let stop = false;
        const fioLoop = (async () => {
          do {
            const args = [
              '--ioengine=nbd',
              `--uri=${d.uri('disk')}`,
              '--name=load',
              '--rw=randrw',
              '--bs=4k',
              '--size=8M',
              '--offset=32M',
              '--offset_increment=8M',
              '--numjobs=2',
              '--iodepth=8',
              '--verify=crc32c',
              '--verify_fatal=1',
              '--verify_state_save=0',
            ];
            const f = await run('fio', args, { timeoutMs: 120_000 });
            assert.equal(f.code, 0, describeResult('fio', args, f));
            assert.doesNotMatch(f.stdout + f.stderr, /verify: |bad magic|bad header|err=\s*[1-9]/i);
            runs++;
            if (cutOver) runsAfterCutover++;
          } while (!stop || runsAfterCutover < 1);
        })();

        await cli([
          'mirror',
          'start',
          'disk',
          '--target',
          target,
          '--rate',
          '32M',
          '--chunk-size',
          '1M',
        ]);
        const s = await waitFor(d, (x) => (x.bytesCopied as number) > 0, 'copy started');
        assert.equal(s.state, 'copying');
        const out = await cli(['mirror', 'cutover', 'disk', '--wait', '120000', '--verify']);
        cutOver = true;
        assert.match(out, /now runs on file:/);
        const exp = await d.json<{ backend: string; filters: unknown[] }>([
          'export',
          'status',
          'disk',
        ]);
        assert.equal(exp.backend, `file:${target}`);
        assert.equal(exp.filters.length, 0, 'the mirror filter was removed after cutover');
        stop = true;
        await fioLoop;
        assert.ok(runs >= 2, `fio ran ${runs} times`);

        const served = sha(await readAll(d.uri('disk'), 64 * MiB));
        assert.equal(await d.close(), 0);
        // The target alone: the same bytes, and fio's pre-migration data verifies from it.
        assert.equal(sha(fs.readFileSync(target)), served);
        r = await run(
          'fio',
          ['--ioengine=psync', `--filename=${target}`, ...pre, '--verify_only'],
          { timeoutMs: 60_000 },
        );
        assert.equal(r.code, 0, describeResult('fio --verify_only', pre, r));
      } finally {
        if (d.child.exitCode === null) await d.close();
        dir.cleanup();
      }
    },
  );

  it(
    'cross-daemon: the target daemon dies mid-copy, the mirror pauses, resume copies only the dirty part, cutover',
    { timeout: 180_000 },
    async (t) => {
      const dir = tempDir('devfilter-mirror-xd-');
      const size = 16 * MiB;
      const bImage = join(dir.path, 'b.img');
      const bSocket = join(dir.path, 'b.sock');
      const startB = () =>
        spawnDaemon(['-e', `disk=file:${bImage},create=${size}`], { socket: bSocket });
      let b = await startB();
      fs.mkdirSync(join(dir.path, 'a'));
      const a = await startCliDaemon(
        ['-e', `disk=file:${join(dir.path, 'a.img')},create=${size}`],
        {
          dir: join(dir.path, 'a'),
        },
      );
      const cli = async (args: string[]): Promise<string> => {
        const r = await a.cli(args, { timeoutMs: 120_000 });
        assert.equal(r.code, 0, describeResult('devfilter', args, r));
        return r.stdout;
      };
      const client = await NbdClient.fromUri(a.uri('disk'));
      try {
        const expected = pattern(size, 77);
        for (let o = 0; o < size; o += MiB) await client.write(o, expected.subarray(o, o + MiB));

        await cli([
          'filter',
          'create',
          'disk',
          'mirror',
          '--bottom',
          '--arg',
          `target=${b.uri('disk')}`,
          '--arg',
          'rate=4M',
          '--arg',
          'chunkSize=256K',
          '--arg',
          'targetTimeoutMs=1000',
        ]);
        await waitFor(a, (s) => (s.bytesDone as number) >= 12 * MiB, '12 MiB copied');
        await b.kill9();
        // Clients keep writing without an error while the target is gone.
        for (let i = 0; i < 4; i++) {
          const data = pattern(64 * 1024, 500 + i);
          const off = i * 1 * MiB + 4096;
          await client.write(off, data);
          data.copy(expected, off);
        }
        const paused = await waitFor(a, (s) => s.state === 'paused', 'paused', 30_000);
        assert.match(String(paused.reason), /target/);
        fs.rmSync(bSocket, { force: true });
        b = await startB();

        const resumed = JSON.parse(await cli(['mirror', 'resume', 'disk', '--json'])) as {
          dirtyBytes: number;
        };
        // Dirty: what was never copied, the chunks written meanwhile, and what the target had not
        // flushed when it died (at most about a second of copying).
        assert.ok(
          resumed.dirtyBytes > 0 && resumed.dirtyBytes <= 0.75 * size,
          JSON.stringify(resumed),
        );
        const synced = await waitFor(a, (s) => s.state === 'synced', 'synced', 60_000);
        // All of the source is data (no zero chunks): exactly the dirty part is copied again.
        assert.equal(synced.bytesCopiedSinceResume, resumed.dirtyBytes);
        assert.ok((synced.bytesCopied as number) < 2 * size);
        t.diagnostic(
          `size ${size}, copied before the failure ${String(paused.bytesCopied)}, dirty at resume ${resumed.dirtyBytes}, copied again ${String(synced.bytesCopiedSinceResume)}`,
        );

        await cli(['mirror', 'cutover', 'disk']);
        const after = pattern(128 * 1024, 900);
        await client.write(3 * MiB, after);
        after.copy(expected, 3 * MiB);
        await client.flush();
        // The second daemon holds everything, read from it directly.
        const onB = await readAll(b.uri('disk'), size);
        assert.equal(sha(onB), sha(expected));
      } finally {
        await client.close().catch(() => undefined);
        await a.close();
        await b.stop();
        dir.cleanup();
      }
    },
  );
});
