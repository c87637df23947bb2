/**
 * The cdp filter in a real `devfilter serve`, driven as a user would: `devfilter cdp` commands,
 * views read by qemu-img and nbdcopy, a rollback and its undo, the timeline, a clean restart;
 * and kill -9 in the middle of writes, after which every mark's view still equals what the
 * device held at the mark, and a rollback to the last mark restores it exactly (so every
 * change made after it, acknowledged or in flight, was journaled).
 */
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { callOnce } from '../../src/control/client.js';
import { NbdClient } from '../../src/nbd/client.js';
import { run, runOk } from '../helpers/run.js';
import { CLI, spawnDaemon, tempDir, type DaemonProcess } from '../helpers/server.js';
import { requireTools } from '../helpers/tools.js';
import { prng, randomBytes } from '../protocol/raw.js';

const KiB = 1024;
const MiB = 1024 * KiB;

interface CdpDaemon extends DaemonProcess {
  control: string;
  image: string;
  cli(...args: string[]): Promise<string>;
  cmd<T>(command: string, args?: Record<string, unknown>): Promise<T>;
}

async function startCdpDaemon(dir: string, size: number): Promise<CdpDaemon> {
  const config = join(dir, 'devfilter.json');
  const control = join(dir, 'control.sock');
  const image = join(dir, 'disk.img');
  writeFileSync(
    config,
    JSON.stringify({
      control,
      exports: {
        disk: {
          file: image,
          create: size,
          filters: [{ type: 'cdp', name: 'cdp', args: { dir: join(dir, 'journal') } }],
        },
      },
    }),
  );
  const d = await spawnDaemon(['--config', config], { socket: join(dir, 'nbd.sock') });
  return {
    ...d,
    control,
    image,
    cli: async (...args: string[]) =>
      (await runOk(process.execPath, [CLI, ...args, '--control', control])).stdout,
    cmd: <T>(command: string, args: Record<string, unknown> = {}) =>
      callOnce<T>(control, 'filter.control', { export: 'disk', name: 'cdp', command, args }),
  };
}

test('views, marks, rollback and timeline through the CLI and real clients', async (t) => {
  if (!requireTools(t, 'qemu-img', 'nbdcopy')) return;
  const dir = tempDir('devfilter-cdp-daemon-');
  const size = 16 * MiB;
  let d: CdpDaemon | undefined;
  try {
    d = await startCdpDaemon(dir.path, size);
    const rand = prng(7);
    const c = await NbdClient.fromUri(d.uri('disk'), { metaContexts: [] });
    await c.write(0, randomBytes(rand, 4 * MiB));
    await c.flush();
    const good = readFileSync(d.image);
    assert.match(
      await d.cli('cdp', 'mark', 'disk', 'checkpoint'),
      /^marked point \d+ as checkpoint/,
    );
    await new Promise((r) => setTimeout(r, 5));
    const beforeDamage = new Date().toISOString();
    await new Promise((r) => setTimeout(r, 5));
    // The damage: an overwrite, a trim, a zeroing.
    await c.write(512 * KiB, randomBytes(rand, 2 * MiB), 1 /* FUA */);
    await c.trim(3 * MiB, MiB);
    await c.writeZeroes(8 * MiB, 64 * KiB);
    await c.flush();
    const damaged = readFileSync(d.image);
    assert.ok(!damaged.equals(good));

    // A view by mark, copied out by qemu-img; one by time, by nbdcopy.
    assert.match(
      await d.cli('cdp', 'view', 'disk', '--mark', 'checkpoint', '--view-name', 'good'),
      /^view good open: disk as of point \d+/,
    );
    const out1 = join(dir.path, 'good.raw');
    await runOk('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', d.uri('good'), out1]);
    assert.ok(readFileSync(out1).equals(good), 'qemu-img read the view as of the mark');
    const byTime = await d.cli('cdp', 'view', 'disk', '--at', beforeDamage, '--json');
    const v2 = JSON.parse(byTime) as { name: string };
    const out2 = join(dir.path, 'time.raw');
    await runOk('nbdcopy', [d.uri(v2.name), out2]);
    assert.ok(readFileSync(out2).equals(good), 'nbdcopy read the view as of the time');
    const w = await run(process.execPath, [
      CLI,
      'cdp',
      'view',
      'disk',
      '--seq',
      '999999',
      '--control',
      d.control,
    ]);
    assert.notEqual(w.code, 0);
    assert.match(w.stderr, /is in the future/);

    const timeline = await d.cli('cdp', 'timeline', 'disk', '--minutes', '2', '--bucket', '30');
    assert.match(timeline, /◆ checkpoint/);
    assert.match(timeline, /changes?, /);
    const status = JSON.parse(await d.cli('cdp', 'status', 'disk', '--json')) as {
      views: Array<{ name: string }>;
      marks: number;
    };
    assert.deepEqual(status.views.map((v) => v.name).sort(), ['good', v2.name].sort());

    // Rollback: refused while a client is connected, unless forced.
    const refused = await run(process.execPath, [
      CLI,
      'cdp',
      'rollback',
      'disk',
      '--mark',
      'checkpoint',
      '--control',
      d.control,
    ]);
    assert.notEqual(refused.code, 0);
    assert.match(refused.stderr, /NBD connection\(s\) are open/);
    await c.disconnect();
    const rolled = await d.cli('cdp', 'rollback', 'disk', '--mark', 'checkpoint');
    assert.match(rolled, /undo: devfilter cdp rollback disk --mark before-rollback-1/);
    assert.ok(readFileSync(d.image).equals(good), 'the export is back at the mark');
    // The open view of the mark is unchanged by the rollback.
    await runOk('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', d.uri('good'), out1]);
    assert.ok(readFileSync(out1).equals(good));
    await d.cli('cdp', 'rollback', 'disk', '--mark', 'before-rollback-1');
    assert.ok(readFileSync(d.image).equals(damaged), 'the undo brought the damage back');

    await d.cli('cdp', 'close', 'disk', 'good');
    await d.cli('cdp', 'close', 'disk', v2.name);
    assert.equal(await d.stop(), 0);
    d = await startCdpDaemon(dir.path, size);
    const marks = await d.cli('cdp', 'marks', 'disk');
    assert.match(marks, /^checkpoint\tpoint \d+/m);
    assert.match(marks, /^before-rollback-1\t/m);
    await d.cli('cdp', 'view', 'disk', '--mark', 'checkpoint', '--view-name', 'again');
    await runOk('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', d.uri('again'), out1]);
    assert.ok(readFileSync(out1).equals(good), 'the view after a restart');
  } finally {
    await d?.stop();
    dir.cleanup();
  }
});

describe('kill -9 during writes', () => {
  for (const seed of [1, 2]) {
    test(`seed ${seed}: marks still show their content, the last is restored exactly`, async () => {
      const dir = tempDir('devfilter-cdp-crash-');
      const size = 32 * MiB;
      let d: CdpDaemon | undefined;
      try {
        d = await startCdpDaemon(dir.path, size);
        const rand = prng(seed);
        const c = await NbdClient.fromUri(d.uri('disk'), { metaContexts: [] });
        const states: Buffer[] = [];
        let stop = false;
        /** Writers over the whole device, FUA now and then, trims and zeroes too. */
        const writers = (n: number, r0: number) =>
          Array.from({ length: n }, async (_, j) => {
            const r = prng(r0 * 1000 + j);
            while (!stop) {
              const offset = Math.floor(r() * (size / 4096 - 64)) * 4096;
              const length = 4096 * (1 + Math.floor(r() * 32));
              const kind = r();
              try {
                if (kind < 0.8) await c.write(offset, randomBytes(r, length), r() < 0.2 ? 1 : 0);
                else if (kind < 0.9) await c.trim(offset, length);
                else await c.writeZeroes(offset, length);
                if (r() < 0.05) await c.flush();
              } catch {
                return; // the daemon is gone
              }
            }
          });
        for (let round = 0; round < 3; round++) {
          stop = false;
          const loops = writers(4, seed * 10 + round);
          await new Promise((r) => setTimeout(r, 100 + Math.floor(rand() * 100)));
          stop = true;
          await Promise.all(loops);
          await d.cmd('mark', { name: `r${round}` });
          states.push(readFileSync(d.image));
        }
        stop = false;
        const loops = writers(6, seed * 10 + 9);
        await new Promise((r) => setTimeout(r, 100 + Math.floor(rand() * 300)));
        await d.kill9();
        stop = true;
        await Promise.all(loops);
        c.close();

        d = await startCdpDaemon(dir.path, size);
        const st = await d.cmd<{ recovery: { tornBytes: number }; newest: { point: number } }>(
          'status',
        );
        for (let round = 0; round < 3; round++) {
          const v = await d.cmd<{ name: string }>('view', { mark: `r${round}` });
          const out = await NbdClient.fromUri(d.uri(v.name), { metaContexts: [] });
          const got = await out.read(0, size);
          await out.disconnect();
          assert.ok(
            got.equals(states[round]!),
            `the view of mark r${round} equals the device then`,
          );
          await d.cmd('close-view', { name: v.name });
        }
        await d.cmd('rollback', { mark: 'r2' });
        assert.ok(readFileSync(d.image).equals(states[2]!), 'rolled back to r2 exactly');
        console.log(
          `# cdp crash seed ${seed}: ${st.newest.point} changes journaled, torn tail ${st.recovery.tornBytes} bytes`,
        );
      } finally {
        await d?.stop();
        dir.cleanup();
      }
    });
  }
});
