/**
 * Moving a device to another host, end to end with two `devfilter serve` daemons (separate
 * processes; "hosts" A and B on loopback unix sockets), as docs/mirror.md describes it:
 *
 * 1. fio writes (crc32c verify) through A's export the whole time the export is mirrored to an
 *    export of B (`nbd+unix://`) and cut over; every run verifies.
 * 2. A client then connects to B directly: fio --verify_only checks what was written before
 *    the mirror started (copied by it) and what the last fio run wrote through A (after the
 *    cutover, so forwarded by A to B).
 * 3. A is stopped (SIGTERM) while a client of B keeps writing and reading back: no errors,
 *    and the data still verifies on B afterwards.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { NbdClient } from '../../src/nbd/client.js';
import { describeResult, run } from '../helpers/run.js';
import { spawnDaemon, tempDir } from '../helpers/server.js';
import { requireTools } from '../helpers/tools.js';
import { startCliDaemon } from '../cli/fixtures.js';
import { pattern } from './fixture.js';

const MiB = 1024 * 1024;
const SIZE = 32 * MiB;

/** Data written before the mirror starts (sequential, 0..8M). */
const PRE = [
  '--name=pre',
  '--rw=write',
  '--bs=64k',
  '--size=8M',
  '--offset=0',
  '--verify=crc32c',
  '--verify_state_save=0',
];
/** The load during the migration: two jobs of random writes over 16..32M, every block once. */
const LOAD = [
  '--name=load',
  '--rw=randwrite',
  '--bs=4k',
  '--size=8M',
  '--offset=16M',
  '--offset_increment=8M',
  '--numjobs=2',
  '--iodepth=8',
  '--verify=crc32c',
  '--verify_fatal=1',
  '--verify_state_save=0',
];

async function fio(uri: string, job: string[], extra: string[] = []): Promise<string> {
  const args = ['--ioengine=nbd', `--uri=${uri}`, ...job, ...extra];
  const r = await run('fio', args, { timeoutMs: 120_000 });
  assert.equal(r.code, 0, describeResult('fio', args, r));
  assert.doesNotMatch(r.stdout + r.stderr, /verify: |bad magic|bad header|err=\s*[1-9]/i);
  return r.stdout;
}

describe('moving a device to another host', () => {
  it(
    'fio through A during the mirror and cutover; then B alone serves it, and A stops under B client I/O',
    { timeout: 240_000 },
    async (t) => {
      if (!requireTools(t, 'fio')) return;
      const dir = tempDir('devfilter-mirror-host-');
      fs.mkdirSync(join(dir.path, 'a'));
      const b = await spawnDaemon(['-e', `disk=file:${join(dir.path, 'b.img')},create=${SIZE}`], {
        socket: join(dir.path, 'b.sock'),
      });
      const a = await startCliDaemon(
        ['-e', `disk=file:${join(dir.path, 'a.img')},create=${SIZE}`],
        { dir: join(dir.path, 'a') },
      );
      const cli = async (args: string[]): Promise<string> => {
        const r = await a.cli(args, { timeoutMs: 120_000 });
        assert.equal(r.code, 0, describeResult('devfilter', args, r));
        return r.stdout;
      };
      let aStopped = false;
      try {
        await fio(a.uri('disk'), PRE);

        let runs = 0;
        let runsAfterCutover = 0;
        let cutOver = false;
        const load = (async () => {
          do {
            await fio(a.uri('disk'), LOAD);
            runs++;
            if (cutOver) runsAfterCutover++;
          } while (!cutOver || runsAfterCutover < 1);
        })();
        // Fail fast if the load fails before the cutover is done.
        load.catch(() => undefined);

        await cli(['mirror', 'start', 'disk', '--target', b.uri('disk'), '--rate', '16M']);
        const out = await cli(['mirror', 'cutover', 'disk', '--wait', '120000', '--verify']);
        cutOver = true;
        assert.match(out, /now runs on nbd:nbd\+unix:/);
        await load;
        t.diagnostic(`fio runs through A: ${runs} (${runsAfterCutover} after the cutover)`);

        // Clients move to B: everything verifies there, read from B alone.
        await fio(b.uri('disk'), PRE, ['--verify_only']);
        await fio(b.uri('disk'), LOAD, ['--verify_only']);

        // A client of B keeps doing I/O (write, read back, compare) while A is stopped.
        const client = await NbdClient.fromUri(b.uri('disk'));
        let ops = 0;
        let errors = 0;
        let stop = false;
        const io = (async () => {
          for (let i = 0; !stop; i++) {
            const off = 8 * MiB + (i % 512) * 16 * 1024; // 8..16M: fio's data is elsewhere
            const data = pattern(16 * 1024, 7000 + i);
            try {
              await client.write(off, data);
              if (!(await client.read(off, data.length)).equals(data)) errors++;
              if (i % 32 === 31) await client.flush();
              ops++;
            } catch {
              errors++;
            }
          }
        })();
        await new Promise((r) => setTimeout(r, 300));
        const opsBeforeStop = ops;
        const code = await a.close(); // SIGTERM: drain, flush (to B), close
        aStopped = true;
        assert.equal(code, 0, a.stderr());
        const opsAtStop = ops;
        await new Promise((r) => setTimeout(r, 500));
        stop = true;
        await io;
        await client.flush();
        await client.close();
        assert.equal(errors, 0);
        assert.ok(ops > opsAtStop, `the client of B kept going after A stopped (${ops} ops)`);
        t.diagnostic(
          `client of B: ${ops} write+read pairs, ${opsBeforeStop} before A was stopped, ${ops - opsAtStop} after, 0 errors`,
        );
        await fio(b.uri('disk'), PRE, ['--verify_only']);
        await fio(b.uri('disk'), LOAD, ['--verify_only']);
      } finally {
        if (!aStopped) await a.close();
        await b.stop();
        dir.cleanup();
      }
    },
  );
});
