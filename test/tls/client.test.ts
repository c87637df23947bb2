/**
 * The NBD client over TLS (`nbds://`, `nbds+unix://`): certificates and PSK against our own
 * server, no fallback to plain text when the server has no TLS, a server of an untrusted CA
 * refused, and the remote NBD backend (`NAME=nbd:nbds+unix://...`) serving a TLS export to
 * plain clients of another daemon.
 */
import assert from 'node:assert/strict';
import { dirname, join } from 'node:path';
import { after, before, describe, it, type TestContext } from 'node:test';
import { pino } from 'pino';
import { MemoryBackend } from '../../src/backends/memory.js';
import { NbdClient } from '../../src/nbd/client.js';
import { ExportTable } from '../../src/nbd/exports.js';
import { NbdServer } from '../../src/nbd/server.js';
import { loadTlsCredentials, type TlsSettings } from '../../src/nbd/tls.js';
import { runOk } from '../helpers/run.js';
import { startTestServer, tempDir } from '../helpers/server.js';
import { requireTools } from '../helpers/tools.js';
import { withDaemon } from '../interop/fixtures.js';
import { makeCredentials, requireOpenssl, writePskFile, type Credentials } from './fixtures.js';

const MIB = 1024 * 1024;
let dir: { path: string; cleanup: () => void };
let creds: Promise<Credentials> | undefined;
const closers: Array<() => Promise<void>> = [];

before(() => {
  dir = tempDir('devfilter-tls-client-');
});
after(async () => {
  for (const c of closers) await c();
  dir.cleanup();
});

async function credentials(t: TestContext): Promise<Credentials | undefined> {
  if (!requireOpenssl(t)) return undefined;
  creds ??= makeCredentials(join(dir.path, 'pki'));
  return creds;
}

/** A TLS server with one memory export "disk"; returns its socket and the backend. */
async function tlsServer(
  settings: TlsSettings & { mode: 'on' | 'require' },
): Promise<{ socket: string; backend: MemoryBackend }> {
  const backend = new MemoryBackend({ size: 4 * MIB });
  const table = new ExportTable();
  table.add({ name: 'disk', device: backend });
  const server = new NbdServer({
    exports: table,
    logger: pino({ level: process.env.DEVFILTER_TEST_LOG ?? 'silent' }),
    tls: { mode: settings.mode, credentials: loadTlsCredentials(settings) },
  });
  const d = tempDir('devfilter-tls-client-srv-');
  const socket = join(d.path, 'nbd.sock');
  await server.listen({ path: socket });
  closers.push(async () => {
    await server.close();
    d.cleanup();
  });
  return { socket, backend };
}

const q = encodeURIComponent;

describe('NbdClient over TLS', () => {
  it('certificates: writes and reads; verify-peer servers accept our client certificate', async (t) => {
    const c = await credentials(t);
    if (c === undefined) return;
    const { socket, backend } = await tlsServer({
      mode: 'require',
      certificates: c.server,
      verifyPeer: true,
    });
    const client = await NbdClient.fromUri(
      `nbds+unix:///disk?socket=${q(socket)}&tls-certificates=${q(c.alice)}`,
    );
    try {
      const data = Buffer.alloc(8192, 0x42);
      await client.write(4096, data);
      await client.flush();
      assert.deepEqual(await client.read(4096, 8192), data);
      const direct = Buffer.alloc(8192);
      await backend.read(direct, 4096, 0);
      assert.deepEqual(direct, data);
    } finally {
      await client.disconnect();
    }
    // The server checks the chain; without a client certificate verify-peer refuses us.
    await assert.rejects(
      NbdClient.fromUri(`nbds+unix:///disk?socket=${q(socket)}&tls-certificates=${q(c.anonymous)}`),
    );
  });

  it('a server certificate of an untrusted CA is refused; tls-verify-peer=false accepts it', async (t) => {
    const c = await credentials(t);
    if (c === undefined) return;
    const { socket } = await tlsServer({ mode: 'require', certificates: c.server });
    const otherCa = join(dirname(c.alice), 'other-ca');
    await assert.rejects(
      NbdClient.fromUri(`nbds+unix:///disk?socket=${q(socket)}&tls-certificates=${q(otherCa)}`),
      /TLS handshake failed|certificate/,
    );
    const unchecked = await NbdClient.fromUri(
      `nbds+unix:///disk?socket=${q(socket)}&tls-certificates=${q(otherCa)}&tls-verify-peer=false`,
    );
    await unchecked.disconnect();
    // Over a unix socket with neither a CA of one's own nor a name, nothing could be verified.
    await assert.rejects(
      NbdClient.fromUri(`nbds+unix:///disk?socket=${q(socket)}`),
      /TLS cannot verify the server: give tls-certificates=DIR with a ca-cert\.pem, or tls-hostname=NAME/,
    );
  });

  it('PSK: the user of the URI is the identity', async (t) => {
    if (!requireOpenssl(t)) return;
    const file = join(dir.path, 'client-keys.psk');
    writePskFile(file, ['alice', 'bob']);
    const { socket } = await tlsServer({ mode: 'require', psk: file });
    const client = await NbdClient.fromUri(
      `nbds+unix://bob@/disk?socket=${q(socket)}&tls-psk-file=${q(file)}`,
    );
    assert.equal(client.size, 4 * MIB);
    await client.disconnect();
    await assert.rejects(
      NbdClient.fromUri(`nbds+unix://carol@/disk?socket=${q(socket)}&tls-psk-file=${q(file)}`),
      /no key for the identity "carol"/,
    );
  });

  it('nbds to a server without TLS fails instead of falling back to plain text', async () => {
    const s = await startTestServer([{ name: 'disk', size: MIB }]);
    closers.push(() => s.close());
    await assert.rejects(
      NbdClient.fromUri(`nbds+unix:///disk?socket=${q(s.socket)}&tls-verify-peer=false`),
      /STARTTLS|POLICY|TLS/i,
    );
  });
});

describe('remote NBD backend over TLS', () => {
  it('serve -e front=nbd:nbds+unix://...: plain clients of this daemon reach the TLS export', async (t) => {
    const c = await credentials(t);
    if (c === undefined || !requireTools(t, 'nbdinfo', 'qemu-io')) return;
    const { socket, backend } = await tlsServer({
      mode: 'require',
      certificates: c.server,
      verifyPeer: true,
    });
    const uri = `nbds+unix:///disk?socket=${q(socket)}&tls-certificates=${q(c.alice)}`;
    await withDaemon(['-e', `front=nbd:${uri},connections=2`, '--no-control'], async (d) => {
      const size = await runOk('nbdinfo', ['--size', d.uri('front')], { timeoutMs: 20_000 });
      assert.equal(size.stdout.trim(), String(4 * MIB));
      await runOk(
        'qemu-io',
        ['-f', 'raw', '-t', 'none', '-c', 'write -P 0x77 0 64k', d.uri('front')],
        { timeoutMs: 30_000 },
      );
    });
    const direct = Buffer.alloc(65536);
    await backend.read(direct, 0, 0);
    assert.ok(
      direct.every((b) => b === 0x77),
      'the write went through TLS to the backend',
    );
  });
});
