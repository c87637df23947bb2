/**
 * Throwaway TLS credentials for the TLS tests, made with the openssl CLI at test time: a CA,
 * a server certificate, two client certificates of that CA (alice, bob) and one of another CA
 * (mallory), laid out the way nbdkit, qemu and libnbd look for them; and PSK files.
 */
import { mkdirSync, copyFileSync, writeFileSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import tls from 'node:tls';
import type { TestContext } from 'node:test';
import { runOk } from '../helpers/run.js';
import { requireTools } from '../helpers/tools.js';
import { RawConn } from '../protocol/raw.js';

export interface Credentials {
  /** Server side: ca-cert.pem, server-cert.pem, server-key.pem (--tls-certificates DIR). */
  server: string;
  /** Client dirs with ca-cert.pem, client-cert.pem, client-key.pem (qemu, libnbd). */
  alice: string;
  bob: string;
  /** A client certificate from another CA (with this CA's ca-cert.pem, to trust the server). */
  mallory: string;
  /** Trusts the server but has no client certificate. */
  anonymous: string;
  /** The subjects as the server reports them. */
  subjects: { alice: string; bob: string };
}

async function openssl(args: string[]): Promise<void> {
  await runOk('openssl', args, { timeoutMs: 30_000 });
}

async function newKey(path: string): Promise<void> {
  // EC keys: made in milliseconds, unlike RSA.
  await openssl([
    'genpkey',
    '-algorithm',
    'EC',
    '-pkeyopt',
    'ec_paramgen_curve:P-256',
    '-out',
    path,
  ]);
}

async function newCa(dir: string, subject: string): Promise<void> {
  mkdirSync(dir, { recursive: true });
  await newKey(join(dir, 'ca-key.pem'));
  await openssl([
    'req', '-x509', '-new', '-key', join(dir, 'ca-key.pem'), '-out', join(dir, 'ca-cert.pem'),
    '-days', '2', '-subj', subject,
    '-addext', 'basicConstraints=critical,CA:TRUE',
    '-addext', 'keyUsage=critical,keyCertSign,cRLSign',
  ]); // prettier-ignore
}

async function issue(
  caDir: string,
  outDir: string,
  name: 'server' | 'client',
  subject: string,
  extensions: string,
): Promise<void> {
  mkdirSync(outDir, { recursive: true });
  const key = join(outDir, `${name}-key.pem`);
  const csr = join(outDir, `${name}.csr`);
  const ext = join(outDir, `${name}.ext`);
  await newKey(key);
  await openssl(['req', '-new', '-key', key, '-out', csr, '-subj', subject]);
  writeFileSync(ext, extensions);
  await openssl([
    'x509', '-req', '-in', csr, '-CA', join(caDir, 'ca-cert.pem'), '-CAkey', join(caDir, 'ca-key.pem'),
    '-set_serial', `0x${randomBytes(8).toString('hex')}`, '-days', '2',
    '-out', join(outDir, `${name}-cert.pem`), '-extfile', ext,
  ]); // prettier-ignore
}

const CLIENT_EXT = 'keyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n';

/** Makes every certificate under `dir`. Needs the openssl CLI. */
export async function makeCredentials(dir: string): Promise<Credentials> {
  const ca = join(dir, 'ca');
  const otherCa = join(dir, 'other-ca');
  await newCa(ca, '/O=devfilter test/CN=devfilter test CA');
  await newCa(otherCa, '/O=devfilter test/CN=someone else');
  const server = join(dir, 'server');
  await issue(
    ca,
    server,
    'server',
    '/O=devfilter test/CN=localhost',
    'keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n',
  );
  copyFileSync(join(ca, 'ca-cert.pem'), join(server, 'ca-cert.pem'));
  const client = async (name: string, from: string, subject: string): Promise<string> => {
    const d = join(dir, name);
    await issue(from, d, 'client', subject, CLIENT_EXT);
    copyFileSync(join(ca, 'ca-cert.pem'), join(d, 'ca-cert.pem'));
    return d;
  };
  const alice = await client('alice', ca, '/O=Example/CN=alice');
  const bob = await client('bob', ca, '/O=Example/CN=bob');
  const mallory = await client('mallory', otherCa, '/O=Example/CN=alice');
  const anonymous = join(dir, 'anonymous');
  mkdirSync(anonymous);
  copyFileSync(join(ca, 'ca-cert.pem'), join(anonymous, 'ca-cert.pem'));
  return {
    server,
    alice,
    bob,
    mallory,
    anonymous,
    subjects: { alice: 'CN=alice,O=Example', bob: 'CN=bob,O=Example' },
  };
}

/** Writes a PSK keys file (psktool's format) with fresh random keys; returns the keys. */
export function writePskFile(path: string, identities: string[]): Map<string, Buffer> {
  const keys = new Map(identities.map((id) => [id, randomBytes(32)] as const));
  writeFileSync(path, [...keys].map(([id, k]) => `${id}:${k.toString('hex')}\n`).join(''), {
    mode: 0o600,
  });
  return keys;
}

/** Skips (locally) or fails (CI) without the openssl CLI. */
export function requireOpenssl(t: TestContext): boolean {
  return requireTools(t, 'openssl');
}

/**
 * The client side of the TLS upgrade on a raw connection whose STARTTLS was just
 * acknowledged: returns a RawConn over the TLS socket. Rejects if the handshake fails.
 */
export function startClientTls(conn: RawConn, opts: tls.ConnectionOptions): Promise<RawConn> {
  // The plain reader must stop reading: from here the bytes belong to TLS.
  conn.socket.removeAllListeners('data');
  conn.socket.removeAllListeners('end');
  return new Promise((resolve, reject) => {
    const secure = tls.connect({ socket: conn.socket, ...opts });
    const fail = (err: Error): void => reject(err);
    secure.once('error', fail);
    secure.once('close', () => fail(new Error('closed during the TLS handshake')));
    secure.once('secureConnect', () => {
      secure.off('error', fail);
      // The server may still refuse after the handshake (an unverified certificate); the
      // RawConn then sees the close.
      resolve(new RawConn(secure));
    });
  });
}
