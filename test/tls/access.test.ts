/**
 * The access filter's TLS identities through real clients against `devfilter serve`: a rule on
 * `tlsSubject` denies writes to one certificate holder (bob) and leaves another (alice) alone;
 * a rule on `pskIdentity` does the same for PSK users. The audit log records who was refused.
 */
import assert from 'node:assert/strict';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, it, type TestContext } from 'node:test';
import { tempDir } from '../helpers/server.js';
import { describeResult, run } from '../helpers/run.js';
import { requireTools } from '../helpers/tools.js';
import { withDaemon } from '../interop/fixtures.js';
import { makeCredentials, requireOpenssl, writePskFile, type Credentials } from './fixtures.js';

let dir: { path: string; cleanup: () => void };
let creds: Promise<Credentials> | undefined;

before(() => {
  dir = tempDir('devfilter-tls-access-');
});
after(() => dir.cleanup());

async function credentials(t: TestContext): Promise<Credentials | undefined> {
  if (!requireOpenssl(t) || !requireTools(t, 'qemu-io')) return undefined;
  creds ??= makeCredentials(join(dir.path, 'pki'));
  return creds;
}

/** qemu-io over TLS; returns whether every command succeeded, and the output. */
async function qemuIo(
  socket: string,
  object: string,
  commands: string[],
): Promise<{ ok: boolean; out: string }> {
  const hostname = object.startsWith('tls-creds-x509') ? ',file.tls-hostname=localhost' : '';
  const image = `driver=raw,file.driver=nbd,file.server.type=unix,file.server.path=${socket},file.export=disk,file.tls-creds=tls0${hostname}`;
  const args = ['--object', object, '--image-opts', '-t', 'none'];
  args.push(...commands.flatMap((c) => ['-c', c]), image);
  const r = await run('qemu-io', args, { timeoutMs: 30_000 });
  const out = r.stdout + r.stderr;
  return {
    ok: r.code === 0 && !/failed|Error|not permitted/.test(out),
    out: describeResult('qemu-io', args, r),
  };
}

function auditEvents(path: string): Array<Record<string, unknown>> {
  return readFileSync(path, 'utf8')
    .split('\n')
    .filter((l) => l !== '')
    .map((l) => JSON.parse(l) as Record<string, unknown>)
    .filter((e) => e.type === 'event');
}

describe('access rules on TLS identities', () => {
  it('tlsSubject: bob may read but not write; alice may do both', async (t) => {
    const c = await credentials(t);
    if (c === undefined) return;
    const rules = join(dir.path, 'subject-rules.json');
    const audit = join(dir.path, 'subject-audit.log');
    writeFileSync(
      rules,
      JSON.stringify({
        default: 'allow',
        rules: [
          {
            name: 'bob-ro',
            action: 'deny',
            ops: ['write', 'trim', 'zero'],
            tlsSubject: c.subjects.bob,
          },
        ],
      }),
    );
    const args = [
      '-e', 'disk=memory:16M', '--tls-certificates', c.server, '--tls-verify-peer', '--no-control',
      '--filter', `disk:access:rules=${rules},auditLog=${audit}`,
    ]; // prettier-ignore
    await withDaemon(args, async (d) => {
      const as = (who: string): string => `tls-creds-x509,id=tls0,dir=${who},endpoint=client`;
      const alice = await qemuIo(d.socket, as(c.alice), [
        'write -P 0xa1 0 64k',
        'read -P 0xa1 0 64k',
      ]);
      assert.ok(alice.ok, alice.out);
      const bobWrite = await qemuIo(d.socket, as(c.bob), ['write -P 0xb0 0 64k']);
      assert.equal(bobWrite.ok, false, 'bob must not write');
      assert.match(bobWrite.out, /Operation not permitted/);
      const bobRead = await qemuIo(d.socket, as(c.bob), ['read -P 0xa1 0 64k']);
      assert.ok(bobRead.ok, `bob reads what alice wrote: ${bobRead.out}`);
    });
    const denied = auditEvents(audit).filter((e) => e.result === 'denied');
    assert.ok(denied.length >= 1, 'the denial is in the audit log');
    const client = denied[0]!.client as Record<string, unknown>;
    assert.equal(client.tlsSubject, c.subjects.bob);
    assert.equal(client.tls, true);
    assert.equal(denied[0]!.ruleName, 'bob-ro');
  });

  it('pskIdentity: a deny rule for one PSK user only', async (t) => {
    const c = await credentials(t);
    if (c === undefined) return;
    const pskDir = join(dir.path, 'psk');
    mkdirSync(pskDir, { recursive: true });
    const keysFile = join(pskDir, 'keys.psk');
    writePskFile(keysFile, ['alice', 'bob']);
    const rules = join(dir.path, 'psk-rules.json');
    writeFileSync(
      rules,
      JSON.stringify({ rules: [{ action: 'deny', ops: 'write', pskIdentity: ['bob', 'carol'] }] }),
    );
    const args = [
      '-e', 'disk=memory:16M', '--tls-psk', keysFile, '--no-control',
      '--filter', `disk:access:rules=${rules}`,
    ]; // prettier-ignore
    await withDaemon(args, async (d) => {
      const as = (who: string): string =>
        `tls-creds-psk,id=tls0,dir=${pskDir},username=${who},endpoint=client`;
      const alice = await qemuIo(d.socket, as('alice'), [
        'write -P 0x11 0 4k',
        'read -P 0x11 0 4k',
      ]);
      assert.ok(alice.ok, alice.out);
      const bob = await qemuIo(d.socket, as('bob'), ['write -P 0x22 0 4k']);
      assert.equal(bob.ok, false, 'bob must not write');
      assert.match(bob.out, /Operation not permitted/);
      const bobRead = await qemuIo(d.socket, as('bob'), ['read -P 0x11 0 4k']);
      assert.ok(bobRead.ok, bobRead.out);
    });
  });
});
