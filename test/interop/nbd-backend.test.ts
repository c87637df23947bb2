/**
 * The remote NBD backend (`NAME=nbd:URI`): devfilter serving an export of another NBD server.
 * Data and holes pass through both ways; the server's errors keep their meaning; a server that
 * goes away and comes back is reconnected with requests waiting meanwhile; writes that were
 * not flushed when the connection dropped make the next flush fail (EIO) instead of being
 * vouched for; bad specs and an unreachable server at start are clear errors.
 */
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { after, before, test } from 'node:test';
import { callOnce } from '../../src/control/client.js';
import { NbdClient } from '../../src/nbd/client.js';
import { pattern } from '../filters/fixture.js';
import { run } from '../helpers/run.js';
import { CLI, spawnDaemon, tempDir, type DaemonProcess } from '../helpers/server.js';
import { requireTools } from '../helpers/tools.js';

const MiB = 1024 * 1024;
const SIZE = 16 * MiB;
const tmp = tempDir('devfilter-nbd-backend-');
const aSocket = join(tmp.path, 'a.sock');
const aControl = join(tmp.path, 'a-control.sock');
let a: DaemonProcess;
let b: DaemonProcess;

function startA(): Promise<DaemonProcess> {
  return spawnDaemon(
    ['--export', `disk=file:${join(tmp.path, 'a.img')},create=${SIZE}`, '--control', aControl],
    { socket: aSocket },
  );
}

before(async () => {
  a = await startA();
  b = await spawnDaemon(
    ['--export', `front=nbd:nbd+unix:///disk?socket=${aSocket},connections=2`],
    { socket: join(tmp.path, 'b.sock') },
  );
});

after(async () => {
  for (const d of [b, a]) if (d.child.exitCode === null) await d.kill9();
  tmp.cleanup();
});

test('data, zeros and holes pass through; the remote server errors keep their meaning', async (t) => {
  const front = await NbdClient.fromUri(b.uri('front'));
  const back = await NbdClient.fromUri(a.uri('disk'));
  try {
    assert.equal(front.size, SIZE);
    const data = pattern(3 * MiB, 7);
    await front.write(MiB, data);
    await front.flush();
    assert.ok((await back.read(MiB, 3 * MiB)).equals(data), 'written through the front');
    await back.write(8 * MiB, pattern(64 * 1024, 8));
    assert.ok((await front.read(8 * MiB, 64 * 1024)).equals(pattern(64 * 1024, 8)));
    await front.writeZeroes(MiB, MiB);
    assert.ok((await back.read(MiB, MiB)).every((x) => x === 0));

    // The remote's own errors: a fault filter on the back end refuses writes to the first 4 KiB.
    await callOnce(aControl, 'filter.create', {
      export: 'disk',
      type: 'fault',
      name: 'f',
      args: { rules: [{ action: 'error', ops: 'write', end: 4096, errno: 'EPERM' }] },
    });
    await assert.rejects(front.write(0, pattern(4096, 9)), /EPERM/);
    await front.write(4096, pattern(4096, 9)); // next to it: fine
    await callOnce(aControl, 'filter.remove', { export: 'disk', name: 'f' });
  } finally {
    await front.close();
    await back.close();
  }
  if (!requireTools(t, 'nbdinfo')) return;
  // Block status passes through: the sparse file's tail is a hole seen through the front.
  const map = await run('nbdinfo', ['--map', b.uri('front')], { timeoutMs: 30_000 });
  assert.equal(map.code, 0, map.stderr);
  assert.match(map.stdout, /hole,zero/);
  assert.match(map.stdout, /\bdata\b/);
});

test('a server that goes away is reconnected; unflushed writes make the next flush fail', async () => {
  const front = await NbdClient.fromUri(b.uri('front'));
  try {
    await front.write(0, pattern(8192, 11)); // not flushed
    await a.kill9();
    // A read sent while the server is down waits for it to come back.
    const pending = front.read(MiB, 4096);
    await sleep(300);
    a = await startA();
    await pending;
    // The write before the drop was never flushed: the server may have lost it. Say so, once.
    await assert.rejects(front.flush(), /EIO/);
    await front.write(0, pattern(8192, 12));
    await front.flush();
    const back = await NbdClient.fromUri(a.uri('disk'));
    assert.ok((await back.read(0, 8192)).equals(pattern(8192, 12)));
    await back.close();
  } finally {
    await front.close();
  }
});

test('bad nbd specs and an unreachable server at start are clear errors', async () => {
  const serve = (spec: string) =>
    run(process.execPath, [CLI, 'serve', '--export', spec, '--socket', join(tmp.path, 'x.sock')], {
      timeoutMs: 30_000,
    });
  const unreachable = await serve(`x=nbd:nbd+unix:///disk?socket=${join(tmp.path, 'none.sock')}`);
  assert.notEqual(unreachable.code, 0);
  assert.match(unreachable.stderr, /cannot open remote NBD export/);
  const bad = await serve('x=nbd:disk');
  assert.equal(bad.code, 2, bad.stderr);
  assert.match(bad.stderr, /nbd needs a URI/);
  const conns = await serve(`x=nbd:nbd+unix:///disk?socket=${aSocket},connections=0`);
  assert.equal(conns.code, 2, conns.stderr);
  assert.match(conns.stderr, /connections must be 1 to 16/);
});
