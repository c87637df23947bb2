/**
 * Ways of starting devfilter that clients drive themselves: systemd-style socket activation
 * (`nbdinfo -- [ CMD ]`), a command on stdin/stdout (libnbd's connect_command), and the demo.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { CLI, spawnDaemon, tempDir } from '../helpers/server.js';
import { background, describeResult, requireNbdsh, run, runOk, waitFor } from '../helpers/run.js';
import { requireTools } from '../helpers/tools.js';
import { MIB, readRange, sha256, sha256File } from './fixtures.js';

const NODE = process.execPath;

let dir: { path: string; cleanup: () => void };
before(() => {
  dir = tempDir('devfilter-interop-launch-');
});
after(() => dir.cleanup());

describe('socket activation', () => {
  it('nbdinfo -- [ devfilter serve ... ] passes a listening socket (LISTEN_FDS)', async (t) => {
    if (!requireTools(t, 'nbdinfo')) return;
    const args = [
      '--json',
      '--',
      '[',
      NODE,
      CLI,
      'serve',
      '--log-level',
      'warn',
      '--export',
      'm=memory:16M,description=activated',
      ']',
    ];
    const r = await runOk('nbdinfo', args, { timeoutMs: 30_000 });
    const info = JSON.parse(r.stdout) as {
      exports: Array<{ 'export-name': string; 'export-size': number; description?: string }>;
    };
    assert.equal(info.exports[0]!['export-size'], 16 * MIB, describeResult('nbdinfo', args, r));
    assert.equal(info.exports[0]!.description, 'activated');

    // A file export through socket activation, with a map, keeps its data between runs.
    const image = join(dir.path, 'activated.img');
    fs.writeFileSync(image, Buffer.alloc(0));
    fs.truncateSync(image, 8 * MIB);
    const fd = fs.openSync(image, 'r+');
    fs.writeSync(fd, Buffer.alloc(64 * 1024, 0x61), 0, 64 * 1024, 2 * MIB);
    fs.closeSync(fd);
    const map = await runOk(
      'nbdinfo',
      [
        '--map',
        '--',
        '[',
        NODE,
        CLI,
        'serve',
        '--log-level',
        'warn',
        '--export',
        `d=file:${image}`,
        ']',
      ],
      {
        timeoutMs: 30_000,
      },
    );
    assert.match(map.stdout, /^\s*2097152\s+65536\s+0\s+data$/m, map.stdout);
  });
});

describe('serve --stdio', () => {
  it('nbdsh connect_command: pwrite/pread round trip over stdin/stdout', async (t) => {
    const env = requireNbdsh(t);
    if (env === undefined) return;
    const image = join(dir.path, 'stdio.img');
    const data = randomBytes(MIB + 333);
    const dataFile = join(dir.path, 'stdio-data.bin');
    fs.writeFileSync(dataFile, data);
    const script = `
import hashlib
argv = ${JSON.stringify([NODE, CLI, 'serve', '--stdio', '--log-level', 'warn', '--export', `d=file:${image},create=16M`])}
h.connect_command(argv)
print("size", h.get_size())
print("multi_conn", h.can_multi_conn(), "flush", h.can_flush(), "trim", h.can_trim(), "zero", h.can_zero())
data = open(${JSON.stringify(dataFile)}, "rb").read()
h.pwrite(data, 3 * 1024 * 1024 + 5)
h.flush()
back = h.pread(len(data), 3 * 1024 * 1024 + 5)
assert back == data, "pread returned different bytes"
assert h.pread(4096, 0) == bytes(4096), "unwritten start must read as zeros"
h.zero(4096, 3 * 1024 * 1024 + 5)
assert h.pread(4096, 3 * 1024 * 1024 + 5) == bytes(4096)
print("sha256", hashlib.sha256(h.pread(len(data), 3 * 1024 * 1024 + 5)).hexdigest())
h.shutdown()
`;
    const r = await run('nbdsh', ['-c', script], { env, timeoutMs: 30_000 });
    assert.equal(r.code, 0, describeResult('nbdsh', ['-c', '<script>'], r));
    assert.match(r.stdout, /^size 16777216$/m);
    assert.match(r.stdout, /^multi_conn \w+ flush True trim True zero True$/m);
    const expected = Buffer.from(data);
    expected.fill(0, 0, 4096);
    assert.match(r.stdout, new RegExp(`^sha256 ${sha256(expected)}$`, 'm'), 'pread after zero');
    // The daemon wrote the file (it exits when the client disconnects, so the file is complete).
    await waitFor(
      'the stdio daemon to leave the data in its file',
      () => (readRange(image, 3 * MIB + 5, expected.length).equals(expected) ? true : undefined),
      5_000,
    );
  });

  it('exits 0 once its stdio client disconnects (libnbd connect_socket on a socketpair)', async (t) => {
    const env = requireNbdsh(t);
    if (env === undefined) return;
    const script = `
import socket, subprocess, sys, time, nbd
a, b = socket.socketpair()
p = subprocess.Popen(${JSON.stringify([NODE, CLI, 'serve', '--stdio', '--log-level', 'info', '--export', 'm=memory:4M'])},
                     stdin=b, stdout=b, stderr=subprocess.PIPE)
b.close()
h = nbd.NBD()
h.connect_socket(a.detach())
h.pwrite(b"q" * 4096, 4096)
assert h.pread(4096, 4096) == b"q" * 4096
h.shutdown()
del h
started = time.time()
rc = p.wait(timeout=10)
print("exit", rc, "ms", int((time.time() - started) * 1000))
sys.stderr.write(p.stderr.read().decode())
`;
    const r = await run('python3', ['-c', script], { env, timeoutMs: 30_000 });
    assert.equal(r.code, 0, describeResult('python3', ['-c', '<script>'], r));
    const m = /^exit (-?\d+) ms (\d+)$/m.exec(r.stdout);
    assert.ok(m, r.stdout + r.stderr);
    assert.equal(Number(m[1]), 0, `stdio daemon exit code:\n${r.stderr}`);
    assert.ok(Number(m[2]) < 5000, `stdio daemon took ${m[2]} ms to exit after the client left`);
    assert.match(r.stderr, /"transport":"stdio"/);
  });

  it('nbdsh connect_systemd_socket_activation works too', async (t) => {
    const env = requireNbdsh(t);
    if (env === undefined) return;
    const script = `
h.connect_systemd_socket_activation(${JSON.stringify([NODE, CLI, 'serve', '--log-level', 'warn', '--export', 'm=memory:4M'])})
h.pwrite(b"\\x5a" * 8192, 4096)
assert h.pread(8192, 4096) == b"\\x5a" * 8192
print("ok", h.get_size())
`;
    const r = await run('nbdsh', ['-c', script], { env, timeoutMs: 30_000 });
    assert.equal(r.code, 0, describeResult('nbdsh', ['-c', '<script>'], r));
    assert.match(r.stdout, /^ok 4194304$/m);
  });
});

describe('devfilter demo', () => {
  it('prints commands that work against it, and stops on SIGINT with exit 0', async (t) => {
    if (!requireTools(t, 'nbdinfo', 'qemu-io', 'qemu-img', 'nbdcopy')) return;
    const dataDir = join(dir.path, 'demo');
    const demo = background(NODE, [
      CLI,
      'demo',
      '--data-dir',
      dataDir,
      '--size',
      '64M',
      '--no-tcp',
    ]);
    try {
      const out = await waitFor('the demo to print its commands', () => {
        if (demo.child.exitCode !== null)
          throw new Error(`demo exited ${demo.child.exitCode}: ${demo.stderr()}`);
        return demo.stdout().includes('Press Ctrl-C') ? demo.stdout() : undefined;
      });
      const image = join(dataDir, 'demo.img');
      assert.equal(fs.statSync(image).size, 64 * MIB);
      const commands = out
        .split('\n')
        .map((l) => l.trim())
        .filter((l) => /^(nbdinfo|qemu-io|qemu-img|nbdcopy|nbd-client) /.test(l));
      const nbdinfoLine = commands.find((c) => /^nbdinfo '[^']+'$/.test(c));
      assert.ok(nbdinfoLine, `no plain nbdinfo command in:\n${out}`);
      assert.ok(
        commands.length >= 5,
        `expected the nbdinfo, --map, qemu-io, qemu-img and nbdcopy lines:\n${out}`,
      );
      assert.ok(!commands.some((c) => c.startsWith('nbd-client')), '--no-tcp: no nbd-client line');

      // The URI in the nbdinfo line, and the line itself, run as printed.
      const uri = /^nbdinfo '([^']+)'$/.exec(nbdinfoLine)![1]!;
      assert.equal(uri, `nbd+unix:///demo?socket=${join(dataDir, 'nbd.sock')}`);
      const info = await runOk('sh', ['-c', nbdinfoLine], { timeoutMs: 20_000 });
      assert.match(info.stdout, /export="demo":/);
      assert.match(info.stdout, /export-size: 67108864 \(64M\)/);
      assert.match(info.stdout, /description: devfilter demo image/);

      // Every other printed command works too (copies go to our temp dir, not /tmp).
      for (const line of commands) {
        if (line === nbdinfoLine) continue;
        const cmd: string = line.replaceAll('/tmp/demo-copy', join(dir.path, 'demo-copy'));
        const r = await run('sh', ['-c', cmd], { timeoutMs: 60_000 });
        assert.equal(r.code, 0, describeResult('sh', ['-c', cmd], r));
        assert.doesNotMatch(r.stdout + r.stderr, /Pattern verification failed|error/i, cmd);
      }
      // The qemu-io line wrote 0xab over the first MiB; the copies have it too.
      assert.ok(
        readRange(image, 0, MIB).every((b) => b === 0xab),
        'qemu-io line wrote the demo image',
      );
      const raw = join(dir.path, 'demo-copy.raw');
      if (fs.existsSync(raw))
        assert.equal(sha256File(raw), sha256File(image), 'nbdcopy line copied the image');
      const qcow2 = join(dir.path, 'demo-copy.qcow2');
      if (fs.existsSync(qcow2)) {
        await runOk('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', qcow2, image], {
          timeoutMs: 30_000,
        });
      }
    } finally {
      const exit = await demo.stop('SIGINT', 10_000);
      assert.deepEqual(
        exit,
        { code: 0, signal: null },
        `demo exit after SIGINT; stderr:\n${demo.stderr()}`,
      );
    }
    assert.equal(
      fs.existsSync(join(dataDir, 'nbd.sock')),
      false,
      'the socket file is removed at exit',
    );
    assert.equal(fs.statSync(join(dataDir, 'demo.img')).size, 64 * MIB, 'the image stays');
  });
});

describe('daemon shutdown', () => {
  it('SIGTERM with an idle client connected: exits 0 within 8 s, later requests fail', async (t) => {
    const env = requireNbdsh(t);
    if (env === undefined) return;
    const image = join(dir.path, 'idle.img');
    const d = await spawnDaemon(['--export', `disk=file:${image},create=4M`]);
    const exit = new Promise<number | null>((resolve) => {
      if (d.child.exitCode !== null) resolve(d.child.exitCode);
      else d.child.once('exit', (code) => resolve(code));
    });
    // The client writes, then idles for 9 s, then tries another write. An idle libnbd client does
    // not notice the server's half-close until it next reads, so the server may have to wait out
    // a close grace period (5 s today) before it can drop the connection: allow 8 s.
    const script = `
import sys, time
h.connect_uri(${JSON.stringify(d.uri('disk'))})
h.pwrite(b"\\x77" * 65536, 0)
print("ready", flush=True)
time.sleep(9)
try:
    h.pwrite(b"\\x78" * 4096, 65536)
    print("late write: ok", flush=True)
except nbd.Error as e:
    print("late write: failed:", e, flush=True)
`;
    const client = background('nbdsh', ['-c', script], { env });
    let exitMs = -1;
    let code: number | null = null;
    try {
      await waitFor('the client to connect and write', () => {
        if (client.child.exitCode !== null) throw new Error(`nbdsh exited: ${client.stderr()}`);
        return client.stdout().includes('ready') ? true : undefined;
      });
      const signalled = Date.now();
      d.child.kill('SIGTERM');
      code = await Promise.race([
        exit,
        new Promise<null>((r) => setTimeout(() => r(null), 15_000).unref()),
      ]);
      exitMs = Date.now() - signalled;
      // Let the client wake up and try its late write.
      await Promise.race([client.exited, new Promise((r) => setTimeout(r, 15_000).unref())]);
    } finally {
      await client.stop('SIGTERM', 10_000);
      if (d.child.exitCode === null && d.child.signalCode === null) await d.kill9();
      await d.stop(); // already exited: this only removes its temporary socket directory
    }
    t.diagnostic(
      `daemon exit ${code} after ${exitMs} ms; client: ${client.stdout().trim().replace(/\n/g, ' | ')}`,
    );
    assert.ok(
      readRange(image, 0, 65536).every((b) => b === 0x77),
      'the acknowledged write is in the file',
    );
    assert.ok(
      exitMs < 8_000,
      `daemon took ${exitMs} ms to exit after SIGTERM with an idle client (it waits for the client to leave)\n${d.stderr()}`,
    );
    assert.equal(code, 0);
    assert.match(
      client.stdout(),
      /late write: failed/,
      'a request after the shutdown must not succeed',
    );
  });
});
