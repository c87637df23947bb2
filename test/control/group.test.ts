/**
 * Who may use the control socket: its owner (and root) for everything; with
 * `--control-group GROUP`, members of that group for lists and status only — a change is
 * refused with `forbidden`; without it, nobody else can connect at all. State-changing calls
 * are logged with the caller's uid. Runs a client as the unprivileged user `nobody`, so it
 * needs root (CI runs as root).
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { chmodSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { spawnDaemon, tempDir } from '../helpers/server.js';

const NOBODY = 65534;

interface Answer {
  result?: { exports: number };
  error?: { message: string; data: { code: string } };
}

/** Sends JSON-RPC requests as uid/gid 65534 from a child process; returns the answers. */
function asNobody(socket: string, requests: object[]): Promise<string> {
  const script = `
    const net = require('net');
    const c = net.connect(process.argv[1]);
    let out = '';
    c.on('error', (e) => { process.stdout.write('ERROR ' + e.code + '\\n'); process.exit(0); });
    c.on('data', (d) => { out += d; if (out.split('\\n').length > ${requests.length}) { process.stdout.write(out); c.destroy(); } });
    c.on('connect', () => c.write(process.argv[2]));
  `;
  const lines = requests.map((r) => JSON.stringify(r)).join('\n') + '\n';
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, ['-e', script, socket, lines], {
      uid: NOBODY,
      gid: NOBODY,
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    child.on('error', reject);
    child.on('exit', (code) =>
      code === 0
        ? resolve(stdout)
        : reject(new Error(`client as nobody exited ${code}: ${stderr}`)),
    );
  });
}

test('a read-only group may list and read status; changes stay with the owner', async (t) => {
  if (process.getuid?.() !== 0) {
    process.stderr.write(
      '\n*** SKIPPED control group test: needs root to run a client as nobody ***\n\n',
    );
    t.skip('needs root');
    return;
  }
  const dir = tempDir('devfilter-group-');
  chmodSync(dir.path, 0o755); // the socket's directory must be reachable by the group
  const withGroup = join(dir.path, 'group.sock');
  const ownerOnly = join(dir.path, 'owner.sock');
  const a = await spawnDaemon(
    ['--export', 'd=memory:1M', '--control', withGroup, '--control-group', 'nogroup'],
    { socket: join(dir.path, 'a.sock') },
  );
  const b = await spawnDaemon(['--export', 'd=memory:1M', '--control', ownerOnly], {
    socket: join(dir.path, 'b.sock'),
  });
  try {
    const out = await asNobody(withGroup, [
      { jsonrpc: '2.0', id: 1, method: 'daemon.status' },
      { jsonrpc: '2.0', id: 2, method: 'filter.create', params: { export: 'd', type: 'stats' } },
    ]);
    const [status, create] = out
      .trim()
      .split('\n')
      .map((l) => JSON.parse(l) as Answer);
    assert.equal(status!.result!.exports, 1, 'status works for the group');
    assert.equal(create!.error!.data.code, 'forbidden');
    assert.match(
      create!.error!.message,
      /only the daemon's owner may change state \(you are uid 65534/,
    );
    // The owner-only socket refuses the connection itself.
    assert.match(
      await asNobody(ownerOnly, [{ jsonrpc: '2.0', id: 1, method: 'daemon.status' }]),
      /ERROR EACCES/,
    );
    // A change by the owner is logged with its uid.
    const { callOnce } = await import('../../src/control/client.js');
    await callOnce(withGroup, 'filter.create', { export: 'd', type: 'stats' });
    await new Promise((r) => setTimeout(r, 200));
    assert.match(a.stderr(), /"method":"filter\.create".*"uid":0.*"msg":"control call"/);
  } finally {
    await a.stop();
    await b.stop();
    dir.cleanup();
  }
});
