/**
 * A real kernel client: a QEMU guest (TCG) with a stock Debian kernel attaches /dev/nbd0 to
 * `devfilter serve` with Debian's nbd-client, makes an ext4 filesystem, writes files, reconnects,
 * verifies them and fscks the device clean; then the host fscks the image file and compares
 * every file (extracted with debugfs) with the md5 the guest computed. The second test does it
 * with two connections per attach (nbd-client -C 2: devfilter advertises multi-conn), 4 KiB
 * blocks and the stats filter, and checks that the filter counted the kernel's requests. The
 * third puts the snapshot filter in the stack: the guest takes one snapshot with ext4 frozen and
 * one in the middle of its writes, and both images (served as disk@NAME) must fsck clean, the
 * second after its journal is replayed, with every file written before them intact.
 *
 * Needs qemu-system-x86, busybox-static, cpio, nbd-client, e2fsprogs, apt-get (the kernel
 * package is downloaded once into a cache) and, for the snapshots, nbdcopy: skipped loudly where they are missing, failing
 * under CI=true. `npm run test:kernel` runs this file alone. See docs/testing-kernel.md.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, it, type TestContext } from 'node:test';
import { spawnDaemon, tempDir, type DaemonProcess } from '../helpers/server.js';
import { describeResult, run, waitFor } from '../helpers/run.js';
import { requireTools } from '../helpers/tools.js';
import { daemonErrors, stopWithin, tail } from '../interop/fixtures.js';
import {
  buildGuest,
  describeGuest,
  requireKernelTools,
  runGuest,
  type Guest,
  type GuestResult,
} from './guest.js';

const IMAGE_SIZE = '128M';
/** Steps every scenario must pass, in this order (see scripts/kernel/guest-init.sh). */
const STEPS = [
  'modules',
  'network',
  'connect',
  'raw-io',
  'mkfs',
  'mount',
  'write',
  'checksums',
  'fstrim',
  'umount',
  'disconnect',
  'drop-caches',
  'reconnect',
  'mount-again',
  'verify',
  'umount-again',
  'fsck',
  'disconnect-again',
  'kernel-log',
];

let dir: { path: string; cleanup: () => void };
before(() => {
  dir = tempDir('devfilter-kernel-');
});
after(() => dir.cleanup());

async function guestOrSkip(t: TestContext): Promise<Guest | undefined> {
  if (!requireKernelTools(t)) return undefined;
  const guest = await buildGuest();
  t.diagnostic(`guest: ${guest.dir} (build-guest.sh took ${guest.buildMs} ms)`);
  return guest;
}

/** Steps of the snapshot scenario. */
const SNAPSHOT_STEPS = [
  'modules',
  'network',
  'connect',
  'mkfs',
  'mount',
  'write',
  'checksums',
  'sync',
  'start-writer',
  'freeze',
  'snapshot-frozen',
  'thaw',
  'snapshot-live',
  'stop-writer',
  'umount',
  'fsck',
  'attach-frozen',
  'fsck-frozen',
  'mount-frozen',
  'verify-frozen',
  'umount-frozen',
  'detach-frozen',
  'disconnect',
  'kernel-log',
];

/** The guest ran every step, and printed DONE pass. */
function assertGuestPassed(g: GuestResult, steps = STEPS): void {
  const failed = g.steps.find((s) => !s.passed);
  assert.ok(!g.run.timedOut, `QEMU timed out:\n${describeGuest(g)}`);
  assert.equal(failed, undefined, `guest step ${failed?.name} failed:\n${describeGuest(g)}`);
  assert.deepEqual(
    g.steps.map((s) => s.name),
    steps,
    `guest steps:\n${describeGuest(g)}`,
  );
  assert.ok(g.passed, `the guest did not print DONE pass:\n${describeGuest(g)}`);
  assert.equal(g.run.code, 0, `QEMU exit status:\n${describeGuest(g)}`);
  assert.ok(g.md5.size >= 67, `the guest reported ${g.md5.size} checksums`);
}

/**
 * The host's view of the image: e2fsck clean, and every file as the guest wrote it. With
 * `replay` (the test, for diagnostics), the image may be crash-consistent: e2fsck -fy first
 * replays its journal (exit 0 or 1), after which e2fsck -fn must find it clean.
 */
async function checkImageOnHost(
  image: string,
  md5: Map<string, string>,
  replay?: TestContext,
): Promise<void> {
  if (replay) {
    const fix = await run('e2fsck', ['-fy', image], { timeoutMs: 60_000 });
    // 0: nothing to do, 1: fixed (the journal replay counts as a fix); anything else is damage.
    assert.ok(
      fix.code === 0 || fix.code === 1,
      `host e2fsck -fy of a crash-consistent image:\n${describeResult('e2fsck', ['-fy', image], fix)}`,
    );
    const said = fix.stdout
      .trim()
      .split('\n')
      .filter((l) => !/^Pass \d/.test(l))
      .join('; ');
    replay.diagnostic(`e2fsck -fy (exit ${fix.code}): ${said}`);
  }
  const fsck = await run('e2fsck', ['-fn', image], { timeoutMs: 60_000 });
  assert.equal(
    fsck.code,
    0,
    `host e2fsck of the image:\n${describeResult('e2fsck', ['-fn', image], fsck)}`,
  );

  const out = join(dir.path, `dump-${Date.now()}`);
  fs.mkdirSync(out);
  const paths = [...md5.keys()];
  const cmds = paths.map((p, i) => `dump ${p} ${join(out, String(i))}`).join('\n') + '\n';
  const cmdFile = join(out, 'cmds');
  fs.writeFileSync(cmdFile, cmds);
  const dbg = await run('debugfs', ['-f', cmdFile, image], { timeoutMs: 60_000 });
  assert.equal(dbg.code, 0, describeResult('debugfs', ['-f', cmdFile, image], dbg));
  const wrong: string[] = [];
  paths.forEach((p, i) => {
    const file = join(out, String(i));
    const got = fs.existsSync(file)
      ? createHash('md5').update(fs.readFileSync(file)).digest('hex')
      : 'missing';
    if (got !== md5.get(p)) wrong.push(`${p}: guest wrote ${md5.get(p)}, image has ${got}`);
  });
  assert.deepEqual(
    wrong,
    [],
    `files in the image differ from what the guest wrote:\n${tail(dbg.stderr)}`,
  );
}

async function stopClean(d: DaemonProcess): Promise<void> {
  const stop = await stopWithin(d);
  assert.equal(
    stop.killed,
    false,
    `daemon did not exit within 10 s of SIGTERM:\n${tail(d.stderr())}`,
  );
  assert.equal(stop.code, 0, `daemon exit code after SIGTERM:\n${tail(d.stderr())}`);
  assert.deepEqual(daemonErrors(d), [], 'daemon logged errors');
}

function timings(t: TestContext, g: GuestResult): void {
  const slowest = g.steps
    .filter((s) => s.seconds !== undefined)
    .sort((a, b) => b.seconds! - a.seconds!)
    .slice(0, 4)
    .map((s) => `${s.name} ${s.seconds}s`)
    .join(', ');
  t.diagnostic(
    `QEMU ran ${g.run.ms} ms; guest uptime at the end ${g.uptime}s; slowest steps: ${slowest}`,
  );
}

describe('a real kernel client: Linux nbd driver in a QEMU guest', { timeout: 600_000 }, () => {
  it('mkfs.ext4, writes, reconnects, verifies and fscks /dev/nbd0 clean (512-byte blocks)', async (t) => {
    const guest = await guestOrSkip(t);
    if (!guest) return;
    const image = join(dir.path, 'plain.img');
    const d = await spawnDaemon([
      '--export',
      `disk=file:${image},create=${IMAGE_SIZE}`,
      '--no-control',
    ]);
    let g: GuestResult;
    try {
      g = await runGuest(guest, { socket: d.socket, exportName: 'disk', blockSize: 512 });
      timings(t, g);
      assertGuestPassed(g);
    } catch (err) {
      await stopWithin(d);
      t.diagnostic(`daemon log:\n${tail(d.stderr())}`);
      throw err;
    }
    await stopClean(d);
    await checkImageOnHost(image, g.md5);
  });

  it('two connections (multi-conn), 4 KiB blocks, through the stats filter: the same, and the requests are counted', async (t) => {
    const guest = await guestOrSkip(t);
    if (!guest) return;
    const image = join(dir.path, 'stats.img');
    const config = join(dir.path, 'stats.yaml');
    fs.writeFileSync(
      config,
      [
        'exports:',
        '  disk:',
        `    file: ${JSON.stringify(image)}`,
        `    create: ${IMAGE_SIZE}`,
        '    filters:',
        '      - type: stats',
        '',
      ].join('\n'),
    );
    const d = await spawnDaemon(['--config', config, '--no-control', '--metrics', '127.0.0.1:0']);
    let g: GuestResult;
    let counts: Map<string, number>;
    let errors: number;
    try {
      const port = await metricsPort(d);
      g = await runGuest(guest, {
        socket: d.socket,
        exportName: 'disk',
        blockSize: 4096,
        connections: 2,
        cpus: 2, // one blk-mq queue, so one connection, per CPU
      });
      timings(t, g);
      assertGuestPassed(g);
      // nbd-client -C 2, twice: four connections reached the export.
      const opened = d
        .stderr()
        .split('\n')
        .filter((l) => l.includes('"msg":"export opened"'));
      assert.equal(opened.length, 4, `connections that opened the export:\n${opened.join('\n')}`);
      const text = await (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
      counts = sumByOp(text, 'devfilter_requests_total');
      errors = [...sumByOp(text, 'devfilter_request_errors_total').values()].reduce(
        (a, b) => a + b,
        0,
      );
    } catch (err) {
      await stopWithin(d);
      t.diagnostic(`daemon log:\n${tail(d.stderr())}`);
      throw err;
    }
    t.diagnostic(`stats filter counted: ${[...counts].map(([op, n]) => `${op}=${n}`).join(' ')}`);
    for (const op of ['read', 'write', 'flush', 'trim']) {
      assert.ok(
        (counts.get(op) ?? 0) > 0,
        `the stats filter counted no ${op} requests: ${[...counts]}`,
      );
    }
    assert.equal(errors, 0, 'the stats filter counted failed requests');
    await stopClean(d);
    await checkImageOnHost(image, g.md5);
  });

  it('snapshots taken while the kernel writes ext4: the origin and both images fsck clean', async (t) => {
    const guest = await guestOrSkip(t);
    if (!guest || !requireTools(t, 'nbdcopy')) return;
    const image = join(dir.path, 'snap-origin.img');
    const store = join(dir.path, 'snap-store');
    const control = join(dir.path, 'snap-control.sock');
    const config = join(dir.path, 'snap.yaml');
    fs.writeFileSync(
      config,
      [
        'exports:',
        '  disk:',
        `    file: ${JSON.stringify(image)}`,
        `    create: ${IMAGE_SIZE}`,
        '    filters:',
        `      - { type: snapshot, args: { store: ${JSON.stringify(store)} } }`,
        '',
      ].join('\n'),
    );
    const d = await spawnDaemon(['--config', config, '--control', control]);
    let g: GuestResult;
    const images: Record<string, string> = {};
    try {
      g = await runGuest(guest, {
        socket: d.socket,
        exportName: 'disk',
        scenario: 'snapshot',
        control,
      });
      timings(t, g);
      const failed = g.steps.find((s) => !s.passed);
      assert.ok(
        failed !== undefined || g.info.get('snapshot-images') === 'published',
        `the NBD server does not list disk@frozen: snapshot images are not served as EXPORT@NAME\n${describeGuest(g)}`,
      );
      assertGuestPassed(g, SNAPSHOT_STEPS);
      for (const name of ['frozen', 'live']) {
        images[name] = join(dir.path, `snap-${name}.img`);
        const args = [d.uri(`disk@${name}`), images[name]];
        const r = await run('nbdcopy', args, { timeoutMs: 60_000 });
        assert.equal(r.code, 0, describeResult('nbdcopy', args, r));
      }
    } catch (err) {
      await stopWithin(d);
      t.diagnostic(`daemon log:\n${tail(d.stderr())}`);
      throw err;
    }
    await stopClean(d);
    // The origin after the guest unmounted it: clean, and the files written before the snapshots.
    await checkImageOnHost(image, g.md5);
    // Taken with the filesystem frozen: clean as it is. Taken mid-write: clean after journal replay.
    await checkImageOnHost(images.frozen!, g.md5);
    await checkImageOnHost(images.live!, g.md5, t);
    // The live snapshot caught the writer midway: some of its files, fewer than the origin has.
    const inOrigin = await writerFiles(image);
    const inLive = await writerFiles(images.live!);
    t.diagnostic(`writer files: ${inLive} in the live snapshot, ${inOrigin} in the origin`);
    assert.ok(
      inLive > 0 && inLive < inOrigin,
      `writer files: ${inLive} in live, ${inOrigin} in the origin`,
    );
  });
});

/** How many files the snapshot scenario's writer had created (/live/f*) in an ext4 image. */
async function writerFiles(image: string): Promise<number> {
  const args = ['-R', 'ls -p /live', image];
  const r = await run('debugfs', args, { timeoutMs: 60_000 });
  assert.equal(r.code, 0, describeResult('debugfs', args, r));
  return r.stdout.split('\n').filter((l) => /^\/\d+\/100644\/.*\/f\d+\//.test(l)).length;
}

/** The port `--metrics 127.0.0.1:0` bound, from the daemon's "metrics endpoint listening" log. */
function metricsPort(d: DaemonProcess): Promise<number> {
  return waitFor('the metrics endpoint to log its port', () => {
    for (const line of d.stderr().split('\n')) {
      if (!line.startsWith('{')) continue;
      try {
        const rec = JSON.parse(line) as { msg?: string; port?: number };
        if (rec.msg === 'metrics endpoint listening' && typeof rec.port === 'number')
          return rec.port;
      } catch {
        // a partial line
      }
    }
    return undefined;
  });
}

/** Sums a Prometheus counter's samples by their `op` label. */
function sumByOp(text: string, name: string): Map<string, number> {
  const out = new Map<string, number>();
  for (const line of text.split('\n')) {
    if (!line.startsWith(`${name}{`)) continue;
    const op = /[{,]op="([^"]*)"/.exec(line)?.[1];
    const value = Number(line.slice(line.lastIndexOf(' ') + 1));
    if (op !== undefined && Number.isFinite(value)) out.set(op, (out.get(op) ?? 0) + value);
  }
  return out;
}
