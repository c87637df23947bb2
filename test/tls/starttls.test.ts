/**
 * NBD_OPT_STARTTLS byte by byte (doc/proto.md, "TLS support"), against an in-process server:
 * FORCEDTLS (every option but STARTTLS and ABORT refused with ERR_TLS_REQD, EXPORT_NAME
 * disconnects), SELECTIVETLS (only TLS-only exports refused), STARTTLS twice, state discarded
 * by the upgrade, a failed or stalled TLS handshake ending only its own connection, client
 * certificate verification, PSK, and the identity the TLS handshake gives requests.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import type { ConnectionOptions } from 'node:tls';
import { after, before, describe, test, type TestContext } from 'node:test';
import type { ClientInfo, Device, IoContext } from '../../src/core/device.js';
import { MemoryBackend } from '../../src/backends/memory.js';
import { loadTlsCredentials, type NbdTlsOptions, type TlsSettings } from '../../src/nbd/tls.js';
import { startTestServer, tempDir, type TestServer } from '../helpers/server.js';
import {
  C_NO_ZEROES,
  CMD,
  ConnectionClosedError,
  infoRequestData,
  MIB,
  OPT,
  option,
  optionRequest,
  openGreeted,
  parseInfoReplies,
  parseServerReply,
  RawConn,
  REP,
  repName,
  Session,
  TF,
} from '../protocol/raw.js';
import {
  makeCredentials,
  requireOpenssl,
  startClientTls,
  writePskFile,
  type Credentials,
} from './fixtures.js';

let dir: { path: string; cleanup: () => void };
let creds: Promise<Credentials> | undefined;
const servers: TestServer[] = [];

before(() => {
  dir = tempDir('devfilter-tls-starttls-');
});
after(async () => {
  for (const s of servers) await s.close();
  dir.cleanup();
});

/** The credentials, made once (skips the test without openssl). */
async function credentials(t: TestContext): Promise<Credentials | undefined> {
  if (!requireOpenssl(t)) return undefined;
  creds ??= makeCredentials(dir.path);
  return creds;
}

/** Records the client identity of every read. */
class Recording extends MemoryBackend {
  readonly seen: ClientInfo[] = [];

  override read(buf: Buffer, offset: number, flags: number, ctx?: IoContext): Promise<void> {
    if (ctx !== undefined) this.seen.push(ctx.client);
    return super.read(buf, offset, flags);
  }
}

function recording(size: number): { device: Device; seen: ClientInfo[] } {
  const device = new Recording({ size });
  return { device, seen: device.seen };
}

async function server(
  settings: TlsSettings,
  exports: Parameters<typeof startTestServer>[0] = [{ name: 'mem', size: 4 * MIB }],
  extra: Partial<NbdTlsOptions> = {},
): Promise<TestServer> {
  if (settings.mode === 'off') throw new Error('use a TLS mode');
  const tls: NbdTlsOptions = {
    mode: settings.mode,
    credentials: loadTlsCredentials(settings),
    ...extra,
  };
  const s = await startTestServer(exports, { tls });
  servers.push(s);
  return s;
}

/** Client TLS options that trust the test CA, with `who`'s certificate if it has one. */
function clientTls(c: Credentials, who?: 'alice' | 'bob' | 'mallory'): ConnectionOptions {
  const opts: ConnectionOptions = {
    ca: readFileSync(join(c.server, 'ca-cert.pem')),
    servername: 'localhost',
  };
  if (who !== undefined) {
    opts.cert = readFileSync(join(c[who], 'client-cert.pem'));
    opts.key = readFileSync(join(c[who], 'client-key.pem'));
  }
  return opts;
}

/** STARTTLS, its ACK, and the client side of the handshake. */
async function upgrade(conn: RawConn, opts: ConnectionOptions): Promise<RawConn> {
  const r = await option(conn, OPT.STARTTLS);
  assert.equal(repName(r.final.type), 'ACK', 'STARTTLS must be acknowledged');
  return startClientTls(conn, opts);
}

function assertRep(
  final: { type: number; data: Buffer },
  expected: keyof typeof REP,
  what: string,
): void {
  assert.equal(repName(final.type), expected, `${what} (${final.data.toString()})`);
}

describe('FORCEDTLS (--tls require)', () => {
  test('before STARTTLS every option but STARTTLS and ABORT gets ERR_TLS_REQD', async (t) => {
    const c = await credentials(t);
    if (c === undefined) return;
    const s = await server({ mode: 'require', certificates: c.server });
    const conn = await openGreeted(s.socket);
    try {
      for (const [opt, data] of [
        [OPT.LIST, Buffer.alloc(0)],
        [OPT.INFO, infoRequestData('mem')],
        [OPT.GO, infoRequestData('mem')],
        [OPT.STRUCTURED_REPLY, Buffer.alloc(0)],
        [OPT.LIST_META_CONTEXT, Buffer.alloc(8)],
        [0x1234, Buffer.from('payload')],
      ] as const) {
        const r = await option(conn, opt, data);
        assertRep(r.final, 'ERR_TLS_REQD', `option ${opt} before TLS`);
      }
      // STARTTLS with data is malformed, whatever the mode.
      const bad = await option(conn, OPT.STARTTLS, Buffer.from('x'));
      assertRep(bad.final, 'ERR_INVALID', 'STARTTLS with data');
      const secure = await upgrade(conn, clientTls(c));
      const list = await option(secure, OPT.LIST);
      assertRep(list.final, 'ACK', 'LIST over TLS');
      assert.deepEqual(
        list.replies.map((r) => parseServerReply(r).name),
        ['mem'],
      );
      const again = await option(secure, OPT.STARTTLS);
      assertRep(again.final, 'ERR_INVALID', 'STARTTLS once TLS is up');
      const go = await option(secure, OPT.GO, infoRequestData('mem'));
      assertRep(go.final, 'ACK', 'GO over TLS');
      const session = new Session(
        secure,
        false,
        4n * BigInt(MIB),
        parseInfoReplies(go.replies).tflags,
        new Map(),
      );
      const read = await session.request({ type: CMD.READ, offset: 0, length: 4096 });
      assert.equal(read.error, 0);
      assert.equal(read.data?.length, 4096);
      secure.destroy();
    } finally {
      conn.destroy();
    }
  });

  test('EXPORT_NAME before TLS ends the connection (it cannot carry an error)', async (t) => {
    const c = await credentials(t);
    if (c === undefined) return;
    const s = await server({ mode: 'require', certificates: c.server });
    const conn = await openGreeted(s.socket);
    conn.send(optionRequest(OPT.EXPORT_NAME, Buffer.from('mem')));
    const rest = await conn.waitClosed();
    assert.equal(rest.length, 0, 'no export data before TLS');
  });

  test('a client without fixed newstyle stays NOTLS: ERR_POLICY, never ERR_TLS_REQD', async (t) => {
    const c = await credentials(t);
    if (c === undefined) return;
    const s = await server({ mode: 'require', certificates: c.server });
    const conn = await openGreeted(s.socket, C_NO_ZEROES);
    try {
      const st = await option(conn, OPT.STARTTLS);
      assertRep(st.final, 'ERR_POLICY', 'STARTTLS without fixed newstyle');
      const go = await option(conn, OPT.GO, infoRequestData('mem'));
      assertRep(go.final, 'ERR_POLICY', 'GO on a TLS-only export in NOTLS mode');
      const list = await option(conn, OPT.LIST);
      assertRep(list.final, 'ACK', 'LIST');
      assert.equal(list.replies.length, 0, 'TLS-only exports are not listed');
    } finally {
      conn.destroy();
    }
  });

  test('the upgrade forgets what was negotiated before it', async (t) => {
    const c = await credentials(t);
    if (c === undefined) return;
    // Selective, so that STRUCTURED_REPLY is allowed before TLS.
    const s = await server({ mode: 'on', certificates: c.server });
    const conn = await openGreeted(s.socket);
    try {
      const sr = await option(conn, OPT.STRUCTURED_REPLY);
      assertRep(sr.final, 'ACK', 'STRUCTURED_REPLY before TLS');
      const secure = await upgrade(conn, clientTls(c));
      const go = await option(secure, OPT.GO, infoRequestData('mem'));
      assertRep(go.final, 'ACK', 'GO over TLS');
      const tflags = parseInfoReplies(go.replies).tflags;
      assert.equal(tflags & TF.SEND_DF, 0, 'structured replies from before TLS must not count');
      secure.destroy();
    } finally {
      conn.destroy();
    }
  });
});

describe('SELECTIVETLS (--tls on, an export with tls: required)', () => {
  test('TLS-only exports are hidden and refused before TLS, open after it', async (t) => {
    const c = await credentials(t);
    if (c === undefined) return;
    const s = await server({ mode: 'on', certificates: c.server }, [
      { name: 'secret', size: MIB, tls: 'required' },
      { name: 'open', size: MIB },
    ]);
    const conn = await openGreeted(s.socket);
    try {
      const list = await option(conn, OPT.LIST);
      assertRep(list.final, 'ACK', 'LIST before TLS');
      assert.deepEqual(
        list.replies.map((r) => parseServerReply(r).name),
        ['open'],
      );
      assertRep(
        (await option(conn, OPT.INFO, infoRequestData('secret'))).final,
        'ERR_TLS_REQD',
        'INFO secret',
      );
      assertRep(
        (await option(conn, OPT.GO, infoRequestData('secret'))).final,
        'ERR_TLS_REQD',
        'GO secret',
      );
      // An unknown name looks like a TLS-only one: a plain client cannot probe for them.
      assertRep(
        (await option(conn, OPT.INFO, infoRequestData('nope'))).final,
        'ERR_TLS_REQD',
        'INFO nope',
      );
      assertRep((await option(conn, OPT.INFO, infoRequestData('open'))).final, 'ACK', 'INFO open');
      const secure = await upgrade(conn, clientTls(c));
      const list2 = await option(secure, OPT.LIST);
      assert.deepEqual(list2.replies.map((r) => parseServerReply(r).name).sort(), [
        'open',
        'secret',
      ]);
      assertRep(
        (await option(secure, OPT.INFO, infoRequestData('nope'))).final,
        'ERR_UNKNOWN',
        'INFO nope over TLS',
      );
      assertRep(
        (await option(secure, OPT.GO, infoRequestData('secret'))).final,
        'ACK',
        'GO secret over TLS',
      );
      secure.destroy();
    } finally {
      conn.destroy();
    }
  });

  test('a plain client opens an optional export; EXPORT_NAME of a TLS-only one disconnects', async (t) => {
    const c = await credentials(t);
    if (c === undefined) return;
    const s = await server({ mode: 'require', certificates: c.server }, [
      { name: 'secret', size: MIB },
      { name: 'open', size: MIB, tls: 'optional' },
    ]);
    const plain = await openGreeted(s.socket);
    try {
      const go = await option(plain, OPT.GO, infoRequestData('open'));
      assertRep(go.final, 'ACK', 'GO open without TLS');
    } finally {
      plain.destroy();
    }
    const conn = await openGreeted(s.socket);
    conn.send(optionRequest(OPT.EXPORT_NAME, Buffer.from('secret')));
    assert.equal((await conn.waitClosed()).length, 0);
  });
});

describe('the TLS handshake', () => {
  test('garbage instead of a handshake closes that connection; others carry on', async (t) => {
    const c = await credentials(t);
    if (c === undefined) return;
    const s = await server({ mode: 'require', certificates: c.server });
    const bystander = await openGreeted(s.socket);
    const secure = await upgrade(bystander, clientTls(c));
    const conn = await openGreeted(s.socket);
    const r = await option(conn, OPT.STARTTLS);
    assertRep(r.final, 'ACK', 'STARTTLS');
    conn.send(Buffer.concat([Buffer.from('GET / HTTP/1.0\r\n\r\n'), randomBytes(300)]));
    await conn.waitClosed();
    // The other client, mid-negotiation on TLS, still works, and so do new ones.
    assertRep((await option(secure, OPT.LIST)).final, 'ACK', 'LIST on the other connection');
    const fresh = await upgrade(await openGreeted(s.socket), clientTls(c));
    assertRep((await option(fresh, OPT.GO, infoRequestData('mem'))).final, 'ACK', 'a new client');
    fresh.destroy();
    secure.destroy();
  });

  test('a client that never starts the handshake is cut off after the timeout', async (t) => {
    const c = await credentials(t);
    if (c === undefined) return;
    const s = await server({ mode: 'require', certificates: c.server }, undefined, {
      handshakeTimeoutMs: 300,
    });
    const conn = await openGreeted(s.socket);
    assertRep((await option(conn, OPT.STARTTLS)).final, 'ACK', 'STARTTLS');
    const started = Date.now();
    await conn.waitClosed(10_000);
    assert.ok(Date.now() - started < 5000, 'closed by the TLS handshake timeout');
  });

  test('the client certificate subject becomes the connection identity', async (t) => {
    const c = await credentials(t);
    if (c === undefined) return;
    const rec = recording(MIB);
    const s = await server({ mode: 'require', certificates: c.server }, [
      { name: 'mem', device: rec.device },
    ]);
    for (const who of ['alice', undefined, 'mallory'] as const) {
      const secure = await upgrade(await openGreeted(s.socket), clientTls(c, who));
      const go = await option(secure, OPT.GO, infoRequestData('mem'));
      assertRep(go.final, 'ACK', `GO as ${who ?? 'nobody'}`);
      const session = new Session(
        secure,
        false,
        BigInt(MIB),
        parseInfoReplies(go.replies).tflags,
        new Map(),
      );
      assert.equal((await session.request({ type: CMD.READ, offset: 0, length: 512 })).error, 0);
      secure.destroy();
    }
    assert.equal(rec.seen.length, 3);
    assert.equal(rec.seen[0]!.tls, true);
    assert.equal(rec.seen[0]!.tlsSubject, c.subjects.alice);
    assert.equal(rec.seen[0]!.transport, 'unix', 'the transport identity stays');
    assert.equal(rec.seen[1]!.tls, true);
    assert.equal(rec.seen[1]!.tlsSubject, undefined, 'no certificate, no subject');
    // Without verify-peer a certificate from another CA is let in, but never believed.
    assert.equal(rec.seen[2]!.tlsSubject, undefined, 'an unverified certificate gives no identity');
  });
});

/** Upgrades and sends LIST; resolves true if the server served it, false if it hung up. */
async function servedOverTls(s: TestServer, opts: ConnectionOptions): Promise<boolean> {
  const conn = await openGreeted(s.socket);
  try {
    const secure = await upgrade(conn, opts);
    // With TLS 1.3 the client may finish its handshake before the server has checked its
    // certificate: the refusal shows as the connection closing.
    const r = await option(secure, OPT.LIST);
    secure.destroy();
    return r.final.type === REP.ACK;
  } catch (err) {
    if (err instanceof ConnectionClosedError || (err as { code?: string }).code !== undefined)
      return false;
    if (/closed|socket|alert|certificate/i.test((err as Error).message)) return false;
    throw err;
  } finally {
    conn.destroy();
  }
}

describe('client certificates with verify-peer', () => {
  test('a client without a certificate or with one of another CA is refused', async (t) => {
    const c = await credentials(t);
    if (c === undefined) return;
    const s = await server({ mode: 'require', certificates: c.server, verifyPeer: true });
    assert.equal(await servedOverTls(s, clientTls(c, 'alice')), true, 'alice (our CA)');
    assert.equal(await servedOverTls(s, clientTls(c)), false, 'no certificate');
    assert.equal(await servedOverTls(s, clientTls(c, 'mallory')), false, 'another CA');
    assert.equal(
      await servedOverTls(s, clientTls(c, 'bob')),
      true,
      'bob (our CA), after the refusals',
    );
  });
});

describe('PSK', () => {
  test('a known identity with its key is served and identified; a wrong key is refused', async (t) => {
    if (!requireOpenssl(t)) return;
    const file = join(dir.path, 'keys.psk');
    const keys = writePskFile(file, ['alice', 'bob']);
    const rec = recording(MIB);
    const s = await server({ mode: 'require', psk: file }, [{ name: 'mem', device: rec.device }]);
    const psk = (identity: string, key: Buffer): ConnectionOptions => ({
      pskCallback: () => ({ identity, psk: key }),
      ciphers: 'PSK-AES256-GCM-SHA384:ECDHE-PSK-CHACHA20-POLY1305',
      checkServerIdentity: () => undefined,
    });
    const secure = await upgrade(await openGreeted(s.socket), psk('bob', keys.get('bob')!));
    const go = await option(secure, OPT.GO, infoRequestData('mem'));
    assertRep(go.final, 'ACK', 'GO as bob');
    const session = new Session(
      secure,
      false,
      BigInt(MIB),
      parseInfoReplies(go.replies).tflags,
      new Map(),
    );
    assert.equal((await session.request({ type: CMD.READ, offset: 0, length: 512 })).error, 0);
    secure.destroy();
    assert.equal(rec.seen[0]?.pskIdentity, 'bob');
    assert.equal(rec.seen[0]?.tlsSubject, undefined);
    assert.equal(
      await servedOverTls(s, psk('bob', keys.get('alice')!)),
      false,
      "alice's key as bob",
    );
    assert.equal(
      await servedOverTls(s, psk('carol', randomBytes(32))),
      false,
      'an unknown identity',
    );
    assert.equal(await servedOverTls(s, psk('alice', keys.get('alice')!)), true, 'alice');
  });
});
