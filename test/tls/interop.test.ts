/**
 * Real TLS clients against `devfilter serve`: nbdinfo (libnbd, gnutls), qemu-img and qemu-io
 * (QEMU's tls-creds-x509 and tls-creds-psk objects) and nbd-client, over X.509 certificates
 * (with and without client certificate verification) and PSK; plain clients refused on
 * TLS-only exports with the protocol's TLS-required error; the config file's tls section; and
 * clear start-up errors for bad credentials.
 */
import assert from 'node:assert/strict';
import { copyFileSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, it, type TestContext } from 'node:test';
import { CLI, tempDir } from '../helpers/server.js';
import { describeResult, run, runOk, tcpPort } from '../helpers/run.js';
import { requireTools } from '../helpers/tools.js';
import { withDaemon } from '../interop/fixtures.js';
import { makeCredentials, requireOpenssl, writePskFile, type Credentials } from './fixtures.js';

let dir: { path: string; cleanup: () => void };
let creds: Promise<Credentials> | undefined;

before(() => {
  dir = tempDir('devfilter-tls-interop-');
});
after(() => dir.cleanup());

async function credentials(t: TestContext, ...tools: string[]): Promise<Credentials | undefined> {
  if (!requireOpenssl(t) || !requireTools(t, ...tools)) return undefined;
  creds ??= makeCredentials(join(dir.path, 'pki'));
  return creds;
}

const SIZE = 16 * 1024 * 1024;

/** `nbds+unix` URI with libnbd's TLS parameters. */
function nbdsUnix(socket: string, exportName: string, params: Record<string, string>): string {
  const q = Object.entries(params)
    .map(([k, v]) => `&${k}=${encodeURIComponent(v)}`)
    .join('');
  return `nbds+unix:///${exportName}?socket=${encodeURIComponent(socket)}${q}`;
}

/** qemu --object and --image-opts arguments for an export over a unix socket with TLS. */
function qemuTls(
  socket: string,
  exportName: string,
  object: string,
): { object: string; image: string } {
  return {
    object,
    image: `driver=raw,file.driver=nbd,file.server.type=unix,file.server.path=${socket},file.export=${exportName},file.tls-creds=tls0`,
  };
}

function x509Object(clientDir: string): string {
  return `tls-creds-x509,id=tls0,dir=${clientDir},endpoint=client`;
}

async function qemuIo(
  tls: { object: string; image: string },
  commands: string[],
  extra: string[] = [],
): Promise<{ ok: boolean; out: string }> {
  // tls-hostname: the certificate names localhost; a unix socket has no host name of its own.
  const image = tls.object.startsWith('tls-creds-x509')
    ? `${tls.image},file.tls-hostname=localhost`
    : tls.image;
  const args = [
    '--object',
    tls.object,
    '--image-opts',
    '-t',
    'none',
    ...extra,
    ...commands.flatMap((c) => ['-c', c]),
    image,
  ];
  const r = await run('qemu-io', args, { timeoutMs: 30_000 });
  const out = r.stdout + r.stderr;
  return {
    ok: r.code === 0 && !/failed|error|Error|not permitted/.test(out),
    out: describeResult('qemu-io', args, r),
  };
}

describe('X.509 certificates', () => {
  it('nbdinfo, qemu-img, qemu-io and nbd-client over TLS; plain clients refused', async (t) => {
    const c = await credentials(t, 'nbdinfo', 'qemu-img', 'qemu-io', 'nbd-client');
    if (c === undefined) return;
    const args = [
      '-e',
      `disk=memory:${SIZE}`,
      '--tls-certificates',
      c.server,
      '--no-control',
      '--listen',
      '127.0.0.1:0',
    ];
    await withDaemon(args, async (d) => {
      // nbdinfo (libnbd, gnutls), unix socket and TCP.
      const info = await runOk(
        'nbdinfo',
        [nbdsUnix(d.socket, 'disk', { 'tls-certificates': c.alice })],
        { timeoutMs: 20_000 },
      );
      assert.match(info.stdout, /with TLS/);
      assert.match(info.stdout, new RegExp(`export-size: ${SIZE}`));
      const port = await tcpPort(d);
      const tcp = await runOk(
        'nbdinfo',
        ['--size', `nbds://localhost:${port}/disk?tls-certificates=${encodeURIComponent(c.alice)}`],
        { timeoutMs: 20_000 },
      );
      assert.equal(tcp.stdout.trim(), String(SIZE));

      // qemu-io writes and reads back over TLS; qemu-img info and convert read it.
      const tls = qemuTls(d.socket, 'disk', x509Object(c.alice));
      const w = await qemuIo(tls, ['write -P 0x5a 1M 64k', 'read -P 0x5a 1M 64k']);
      assert.ok(w.ok, w.out);
      const imageOpts = `${tls.image},file.tls-hostname=localhost`;
      const qinfo = await runOk(
        'qemu-img',
        ['info', '--output=json', '--object', tls.object, '--image-opts', imageOpts],
        { timeoutMs: 20_000 },
      );
      assert.equal((JSON.parse(qinfo.stdout) as { 'virtual-size': number })['virtual-size'], SIZE);
      const copy = join(dir.path, 'x509-copy.raw');
      await runOk(
        'qemu-img',
        ['convert', '--object', tls.object, '--image-opts', imageOpts, '-O', 'raw', copy],
        { timeoutMs: 30_000 },
      );
      const bytes = readFileSync(copy);
      assert.equal(bytes.length, SIZE);
      assert.ok(bytes.subarray(1024 * 1024, 1024 * 1024 + 65536).every((b) => b === 0x5a));
      assert.ok(bytes.subarray(0, 1024 * 1024).every((b) => b === 0));

      // nbd-client (its own TLS) lists the exports.
      const list = await runOk('nbd-client', [
        '-certfile', join(c.alice, 'client-cert.pem'), '-keyfile', join(c.alice, 'client-key.pem'),
        '-cacertfile', join(c.alice, 'ca-cert.pem'), '-tlshostname', 'localhost', '-l', '-u', d.socket,
      ], { timeoutMs: 20_000 }); // prettier-ignore
      assert.match(list.stdout, /^disk$/m);

      // Plain clients get the TLS-required error, never the data.
      const plainQemu = await run('qemu-img', ['info', d.uri('disk')], { timeoutMs: 20_000 });
      assert.notEqual(plainQemu.code, 0);
      assert.match(
        plainQemu.stderr,
        /TLS negotiation required/,
        describeResult('qemu-img', ['info'], plainQemu),
      );
      const plainInfo = await run('nbdinfo', [d.uri('disk')], { timeoutMs: 20_000 });
      assert.notEqual(plainInfo.code, 0, 'plain nbdinfo must be refused');
    });
  });

  it('verify-peer: clients without a certificate of our CA are refused', async (t) => {
    const c = await credentials(t, 'nbdinfo', 'qemu-img');
    if (c === undefined) return;
    const args = [
      '-e',
      `disk=memory:${SIZE}`,
      '--tls-certificates',
      c.server,
      '--tls-verify-peer',
      '--no-control',
    ];
    await withDaemon(args, async (d) => {
      for (const who of [c.alice, c.bob]) {
        const r = await runOk(
          'nbdinfo',
          ['--size', nbdsUnix(d.socket, 'disk', { 'tls-certificates': who })],
          { timeoutMs: 20_000 },
        );
        assert.equal(r.stdout.trim(), String(SIZE));
      }
      for (const who of [c.anonymous, c.mallory]) {
        const r = await run(
          'nbdinfo',
          ['--size', nbdsUnix(d.socket, 'disk', { 'tls-certificates': who })],
          { timeoutMs: 20_000 },
        );
        assert.notEqual(r.code, 0, `${who} must be refused: ${r.stdout}`);
      }
      const q = await run(
        'qemu-img',
        [
          'info',
          '--object',
          x509Object(c.mallory),
          '--image-opts',
          `${qemuTls(d.socket, 'disk', '').image},file.tls-hostname=localhost`,
        ],
        { timeoutMs: 20_000 },
      );
      assert.notEqual(q.code, 0, 'qemu with a certificate of another CA must be refused');
      assert.match(d.stderr(), /client certificate refused/);
    });
  });
});

describe('PSK', () => {
  it('nbdinfo and qemu with pre-shared keys; a wrong key is refused', async (t) => {
    const c = await credentials(t, 'nbdinfo', 'qemu-img', 'qemu-io');
    if (c === undefined) return;
    const pskDir = join(dir.path, 'psk');
    mkdirSync(pskDir, { recursive: true });
    // qemu reads DIR/keys.psk; the server reads the same file.
    const keysFile = join(pskDir, 'keys.psk');
    const keys = writePskFile(keysFile, ['alice', 'bob']);
    const wrongDir = join(dir.path, 'psk-wrong');
    mkdirSync(wrongDir, { recursive: true });
    writeFileSync(join(wrongDir, 'keys.psk'), `bob:${Buffer.alloc(32, 7).toString('hex')}\n`);
    assert.equal(keys.size, 2);
    await withDaemon(
      ['-e', `disk=memory:${SIZE}`, '--tls-psk', keysFile, '--no-control'],
      async (d) => {
        const info = await runOk('nbdinfo', [
        `nbds+unix://alice@/disk?socket=${encodeURIComponent(d.socket)}&tls-psk-file=${encodeURIComponent(keysFile)}`,
      ], { timeoutMs: 20_000 }); // prettier-ignore
        assert.match(info.stdout, /with TLS/);
        const tls = qemuTls(
          d.socket,
          'disk',
          `tls-creds-psk,id=tls0,dir=${pskDir},username=bob,endpoint=client`,
        );
        const w = await qemuIo(tls, ['write -P 0x33 0 64k', 'read -P 0x33 0 64k']);
        assert.ok(w.ok, w.out);
        const qinfo = await runOk(
          'qemu-img',
          ['info', '--object', tls.object, '--image-opts', tls.image],
          { timeoutMs: 20_000 },
        );
        assert.match(qinfo.stdout, /virtual size: 16 MiB/);
        const wrong = await run('nbdinfo', [
        `nbds+unix://bob@/disk?socket=${encodeURIComponent(d.socket)}&tls-psk-file=${encodeURIComponent(join(wrongDir, 'keys.psk'))}`,
      ], { timeoutMs: 20_000 }); // prettier-ignore
        assert.notEqual(wrong.code, 0, 'a wrong key must be refused');
        const plain = await run('qemu-img', ['info', d.uri('disk')], { timeoutMs: 20_000 });
        assert.match(plain.stderr, /TLS negotiation required/);
        assert.match(d.stderr(), /"pskIdentity":"bob"/);
      },
    );
  });
});

describe('config file and per-export policy', () => {
  it('tls: on with one export required: plain clients open only the other', async (t) => {
    const c = await credentials(t, 'nbdinfo', 'qemu-img');
    if (c === undefined) return;
    const confDir = join(dir.path, 'conf');
    mkdirSync(confDir, { recursive: true });
    // Paths in the config file are relative to it.
    for (const f of ['server-cert.pem', 'server-key.pem', 'ca-cert.pem'])
      copyFileSync(join(c.server, f), join(confDir, f));
    const config = join(confDir, 'devfilter.yaml');
    writeFileSync(
      config,
      [
        'tls:',
        '  mode: on',
        '  cert: server-cert.pem',
        '  key: server-key.pem',
        'exports:',
        '  secret: { memory: 1M, tls: required }',
        '  public: { memory: 2M }',
        '',
      ].join('\n'),
    );
    await withDaemon(['--config', config, '--no-control'], async (d) => {
      const pub = await runOk('nbdinfo', ['--size', d.uri('public')], { timeoutMs: 20_000 });
      assert.equal(pub.stdout.trim(), String(2 * 1024 * 1024));
      const secret = await run('qemu-img', ['info', d.uri('secret')], { timeoutMs: 20_000 });
      assert.match(secret.stderr, /TLS negotiation required/);
      const list = await runOk('nbdinfo', ['--list', '--json', d.uri('')], { timeoutMs: 20_000 });
      const names = (
        JSON.parse(list.stdout) as { exports: { 'export-name': string }[] }
      ).exports.map((e) => e['export-name']);
      assert.deepEqual(names, ['public'], 'TLS-only exports are not listed to plain clients');
      const tls = await runOk(
        'nbdinfo',
        ['--size', nbdsUnix(d.socket, 'secret', { 'tls-certificates': c.alice })],
        { timeoutMs: 20_000 },
      );
      assert.equal(tls.stdout.trim(), String(1024 * 1024));
    });
  });
});

describe('start-up errors', () => {
  it('missing or bad credentials stop the start with a message, never a stack trace', async (t) => {
    const c = await credentials(t);
    if (c === undefined) return;
    const socket = join(dir.path, 'never.sock');
    const serve = (...extra: string[]): Promise<{ code: number | null; stderr: string }> =>
      run(
        process.execPath,
        [CLI, 'serve', '-e', 'd=memory:1M', '--socket', socket, '--no-control', ...extra],
        { timeoutMs: 20_000 },
      );
    const bad = join(dir.path, 'bad.psk');
    writeFileSync(bad, 'alice:not-hex\n');
    const cases: Array<[string[], number, RegExp]> = [
      [['--tls-cert', join(dir.path, 'missing.pem'), '--tls-key', join(c.server, 'server-key.pem')], 1, /cannot read the TLS certificate .*missing\.pem: no such file/],
      [['--tls-cert', join(c.server, 'server-cert.pem'), '--tls-key', join(c.alice, 'client-key.pem')], 1, /key values mismatch/],
      [['--tls-certificates', join(dir.path, 'nowhere')], 1, /certificates directory .*nowhere: no such directory/],
      [['--tls-psk', bad], 1, /bad\.psk:1: the key must be an even number of hex digits/],
      [['--tls', 'require'], 2, /--tls require needs credentials/],
      [['--tls-psk', bad, '--tls-certificates', c.server], 2, /not both/],
      [['-e', 'x=memory:1M,tls=required'], 2, /requires TLS, but TLS is off/],
    ]; // prettier-ignore
    for (const [extra, code, message] of cases) {
      const r = await serve(...extra);
      assert.equal(r.code, code, `${extra.join(' ')}: ${r.stderr}`);
      assert.match(r.stderr, message);
      assert.doesNotMatch(r.stderr, /^\s+at /m, 'no stack trace');
    }
  });
});
