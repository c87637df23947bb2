/**
 * The pieces of TLS support that need no connection: the PSK file format, the subject string
 * (checked against what `openssl x509 -nameopt RFC2253` prints), how command-line and config
 * settings combine, and access rules on TLS identities.
 */
import assert from 'node:assert/strict';
import { X509Certificate } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import type { IoContext } from '../../src/core/device.js';
import { opBit, Op } from '../../src/filters/ops.js';
import { parseRulesDocument, RuleSet } from '../../src/filters/access/rules.js';
import { certificateSubject, parsePskFile, TlsSetupError } from '../../src/nbd/tls.js';
import {
  resolveTlsSettings,
  tlsSettingsFromConfig,
  tlsSettingsFromFlags,
} from '../../src/cli/tls-options.js';
import { UsageError } from '../../src/cli/errors.js';
import { parseConfig } from '../../src/cli/config.js';
import { parseExportSpec } from '../../src/cli/export-spec.js';
import { runOk } from '../helpers/run.js';
import { tempDir } from '../helpers/server.js';
import { requireOpenssl } from './fixtures.js';

let dir: { path: string; cleanup: () => void };
before(() => {
  dir = tempDir('devfilter-tls-unit-');
});
after(() => dir.cleanup());

describe('PSK keys file', () => {
  test('identity:hexkey lines; comments and blank lines skipped; colons in identities', () => {
    const keys = parsePskFile('# keys\nalice:00ff\n\nhost:one:0102030405\r\n', 'k.psk');
    assert.deepEqual([...keys.keys()], ['alice', 'host:one']);
    assert.equal(keys.get('alice')!.toString('hex'), '00ff');
    assert.equal(keys.get('host:one')!.length, 5);
  });

  test('malformed files name the line', () => {
    const bad = (text: string, message: RegExp): void =>
      assert.throws(
        () => parsePskFile(text, 'k.psk'),
        (err: Error) => {
          assert.ok(err instanceof TlsSetupError);
          assert.match(err.message, message);
          return true;
        },
      );
    bad('alice\n', /k\.psk:1: expected IDENTITY:HEXKEY/);
    bad('alice:00\nbob:xyz\n', /k\.psk:2: the key must be an even number of hex digits/);
    bad('alice:0\n', /even number/);
    bad('alice:00\nalice:11\n', /listed twice/);
    bad(`${'x'.repeat(129)}:00\n`, /longer than 128 bytes/);
    bad('\n# nothing\n', /no keys/);
  });
});

describe('certificate subject', () => {
  test('as openssl x509 -nameopt RFC2253 prints it, special characters escaped', async (t) => {
    if (!requireOpenssl(t)) return;
    for (const [i, subject] of [
      '/O=Example/CN=alice',
      '/C=GB/O=Acme, Inc./OU=R+D/CN=carol "the admin"',
    ].entries()) {
      const key = join(dir.path, `k${i}.pem`);
      const cert = join(dir.path, `c${i}.pem`);
      await runOk('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', key, '-out', cert, '-days', '1', '-subj', subject]); // prettier-ignore
      const printed = await runOk('openssl', ['x509', '-in', cert, '-noout', '-subject', '-nameopt', 'RFC2253']); // prettier-ignore
      const expected = printed.stdout.trim().replace(/^subject=/, '');
      assert.equal(certificateSubject(new X509Certificate(readFileSync(cert))), expected);
    }
  });
});

describe('settings', () => {
  test('credentials without a mode mean require; no credentials mean off', () => {
    assert.equal(resolveTlsSettings(undefined, { psk: '/k' }, [])?.mode, 'require');
    assert.equal(resolveTlsSettings(undefined, {}, []), undefined);
    assert.equal(
      resolveTlsSettings({ mode: 'on', cert: '/c', key: '/k' }, { mode: 'off' }, []),
      undefined,
    );
    assert.throws(() => resolveTlsSettings(undefined, { mode: 'on' }, []), UsageError);
    assert.throws(
      () => resolveTlsSettings(undefined, {}, ['disk']),
      /requires TLS, but TLS is off/,
    );
  });

  test('flags win over the config file field by field; config paths are relative to it', () => {
    const fromConfig = tlsSettingsFromConfig(
      { mode: 'on', cert: 'c.pem', key: '/abs/k.pem' },
      '/etc/df',
    );
    assert.deepEqual(fromConfig, { mode: 'on', cert: '/etc/df/c.pem', key: '/abs/k.pem' });
    assert.ok(!Array.isArray(fromConfig));
    const merged = resolveTlsSettings(fromConfig, tlsSettingsFromFlags({ tls: 'require' }), []);
    assert.deepEqual(merged, { mode: 'require', cert: '/etc/df/c.pem', key: '/abs/k.pem' });
    assert.deepEqual(tlsSettingsFromConfig('require', '/'), { mode: 'require' });
    assert.deepEqual(tlsSettingsFromConfig({ bogus: 1 }, '/'), [
      ['bogus'],
      'unknown key (expected one of mode, certificates, cert, key, ca, verifyPeer, psk)',
    ]);
  });
});

describe('config file and --export', () => {
  test('a tls section and per-export tls; errors name the line and the field', () => {
    const ok = parseConfig(
      'tls:\n  mode: on\n  psk: keys.psk\nexports:\n  a: { memory: 1M, tls: required }\n',
      '/etc/df/devfilter.yaml',
    );
    assert.deepEqual(ok.tls, { mode: 'on', psk: '/etc/df/keys.psk' });
    assert.equal(ok.exports[0]!.tls, 'required');
    assert.throws(
      () => parseConfig('tls:\n  bogus: 1\nexports: {}\n', 'd.yaml'),
      /d\.yaml:2:\d+: tls\.bogus: unknown key/,
    );
    assert.throws(
      () => parseConfig('exports:\n  a: { memory: 1M, tls: maybe }\n', 'd.yaml'),
      /exports\.a\.tls: expected required or optional/,
    );
    assert.equal(parseExportSpec('d=memory:1M,tls=optional').tls, 'optional');
    assert.throws(() => parseExportSpec('d=memory:1M,tls=yes'), /tls must be required or optional/);
  });
});

describe('access rules on TLS identities', () => {
  const ctx = (client: IoContext['client']): IoContext => ({ exportName: 'disk', client });
  const alice = ctx({
    transport: 'tcp',
    address: '10.0.0.1',
    tls: true,
    tlsSubject: 'CN=alice,O=Example',
  });
  const bob = ctx({ transport: 'unix', tls: true, pskIdentity: 'bob' });
  const plain = ctx({ transport: 'unix', uid: 0 });
  const rules = new RuleSet(
    parseRulesDocument(
      {
        default: 'allow',
        rules: [
          { action: 'deny', tlsSubject: ['CN=mallory,O=Example', 'CN=alice,O=Example'] },
          { action: 'audit', pskIdentity: 'bob' },
        ],
      },
      1 << 20,
      4096,
    ),
    false,
  );
  const decide = (c: IoContext): number => rules.decide(opBit(Op.WRITE), false, 0, 512, c);

  test('exact matches on the subject and the PSK identity; plain clients match neither', () => {
    assert.equal(decide(alice), 0);
    assert.equal(decide(bob), 1);
    assert.equal(decide(plain), -1);
    assert.equal(
      decide(ctx({ transport: 'tcp', tls: true, tlsSubject: 'CN=alice, O=Example' })),
      -1,
    );
  });
});
