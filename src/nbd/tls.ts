/**
 * TLS for the NBD server (doc/proto.md, "TLS support"): loading credentials (X.509
 * certificates or pre-shared keys) once at start, and upgrading one connection's socket after
 * NBD_OPT_STARTTLS was acknowledged. What a connection proved about itself (a verified client
 * certificate's subject, a PSK identity) becomes part of its client identity.
 */
import { readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import type { Socket } from 'node:net';
import tls from 'node:tls';
import type { X509Certificate } from 'node:crypto';
import type { TlsSettings } from './tls-policy.js';

export { EXPORT_TLS_POLICIES, TLS_MODES } from './tls-policy.js';
export type { ExportTlsPolicy, TlsMode, TlsSettings } from './tls-policy.js';

/** Credentials loaded and checked at start; the server keeps one of these for its lifetime. */
export interface TlsCredentials {
  readonly kind: 'x509' | 'psk';
  /** Certificates, key, CA, versions and ciphers, checked to make a valid context at load. */
  readonly serverOptions: tls.TlsOptions;
  /** x509 with a CA: ask clients for a certificate (a verified one gives an identity). */
  readonly requestCert: boolean;
  /** x509: refuse clients whose certificate is missing or does not verify. */
  readonly verifyPeer: boolean;
  /** psk: identity → key. */
  readonly pskKeys?: ReadonlyMap<string, Buffer>;
}

/** The server's TLS configuration: a mode other than off, and credentials for it. */
export interface NbdTlsOptions {
  readonly mode: 'on' | 'require';
  readonly credentials: TlsCredentials;
  /** How long a client may take for the TLS handshake itself (default 10 s). */
  readonly handshakeTimeoutMs?: number;
}

/** A credentials problem found at start: a missing, unreadable or malformed file. */
export class TlsSetupError extends Error {}

/** What a client proved during the TLS handshake. */
export interface TlsPeerIdentity {
  /** The subject of a client certificate that verified against the CA (see certificateSubject). */
  tlsSubject?: string;
  /** The identity whose pre-shared key the client knew. */
  pskIdentity?: string;
}

/** TLS 1.2 is the protocol's minimum; older versions are never offered. */
const MIN_VERSION = 'TLSv1.2';

/**
 * TLS 1.2 PSK suites with forward secrecy first, then plain PSK (what gnutls clients such as
 * libnbd and qemu offer). TLS 1.3 needs no list: every 1.3 suite works with a PSK.
 */
export const PSK_CIPHERS = [
  'ECDHE-PSK-CHACHA20-POLY1305',
  'ECDHE-PSK-AES256-CBC-SHA384',
  'ECDHE-PSK-AES128-CBC-SHA256',
  'DHE-PSK-AES256-GCM-SHA384',
  'DHE-PSK-AES128-GCM-SHA256',
  'DHE-PSK-CHACHA20-POLY1305',
  'PSK-AES256-GCM-SHA384',
  'PSK-AES128-GCM-SHA256',
  'PSK-CHACHA20-POLY1305',
].join(':');

/**
 * RFC 4279: identities up to 128 bytes and keys up to 64 bytes must work; OpenSSL takes
 * identities up to 128 bytes and keys up to 256, so those are the limits here.
 */
const MAX_PSK_IDENTITY_BYTES = 128;
const MAX_PSK_KEY_BYTES = 256;

function readCredentialFile(path: string, what: string): Buffer {
  try {
    const st = statSync(path);
    if (!st.isFile()) throw new Error('not a regular file');
    return readFileSync(path);
  } catch (err) {
    const reason =
      (err as NodeJS.ErrnoException).code === 'ENOENT' ? 'no such file' : (err as Error).message;
    throw new TlsSetupError(`cannot read the TLS ${what} ${path}: ${reason}`);
  }
}

/**
 * Parses a PSK keys file: one `identity:hexkey` per line (what `psktool -p FILE -u NAME`
 * writes); blank lines and lines starting with `#` are skipped. The identity is everything
 * before the last colon, so it may contain colons itself.
 */
export function parsePskFile(text: string, source: string): Map<string, Buffer> {
  const keys = new Map<string, Buffer>();
  const lines = text.split(/\r?\n/);
  lines.forEach((raw, i) => {
    const line = raw.trim();
    if (line === '' || line.startsWith('#')) return;
    const bad = (msg: string): never => {
      throw new TlsSetupError(`${source}:${i + 1}: ${msg}`);
    };
    const colon = line.lastIndexOf(':');
    if (colon <= 0) bad('expected IDENTITY:HEXKEY');
    const identity = line.slice(0, colon);
    const hex = line.slice(colon + 1);
    if (Buffer.byteLength(identity, 'utf8') > MAX_PSK_IDENTITY_BYTES)
      bad(`the identity is longer than ${MAX_PSK_IDENTITY_BYTES} bytes`);
    if (!/^([0-9a-fA-F]{2})+$/.test(hex)) bad('the key must be an even number of hex digits');
    const key = Buffer.from(hex, 'hex');
    if (key.length > MAX_PSK_KEY_BYTES) bad(`the key is longer than ${MAX_PSK_KEY_BYTES} bytes`);
    if (keys.has(identity)) bad(`identity ${JSON.stringify(identity)} is listed twice`);
    keys.set(identity, key);
  });
  if (keys.size === 0)
    throw new TlsSetupError(`${source}: no keys (expected IDENTITY:HEXKEY lines)`);
  return keys;
}

/**
 * Loads and checks the credentials named by `settings` (mode other than off). Every problem
 * is a TlsSetupError with a message fit for the user: a file that is missing, a key that does
 * not match its certificate, a PSK file with a bad line.
 */
export function loadTlsCredentials(settings: TlsSettings): TlsCredentials {
  const hasX509 =
    settings.certificates !== undefined ||
    settings.cert !== undefined ||
    settings.key !== undefined ||
    settings.ca !== undefined;
  if (settings.psk !== undefined && hasX509)
    throw new TlsSetupError('TLS: give either certificates or a PSK file, not both');
  if (settings.psk !== undefined) {
    if (settings.verifyPeer === true)
      throw new TlsSetupError(
        'TLS: verify-peer applies to certificates; with PSK every client proves its key',
      );
    const keys = parsePskFile(
      readCredentialFile(settings.psk, 'PSK file').toString('utf8'),
      settings.psk,
    );
    const serverOptions: tls.TlsOptions = { minVersion: MIN_VERSION, ciphers: PSK_CIPHERS };
    try {
      tls.createSecureContext(serverOptions);
    } catch (err) {
      throw new TlsSetupError(`TLS: cannot set up PSK: ${(err as Error).message}`);
    }
    return { kind: 'psk', serverOptions, requestCert: false, verifyPeer: false, pskKeys: keys };
  }
  if (!hasX509)
    throw new TlsSetupError(
      'TLS: no credentials: give a certificate and key (or a certificates directory) or a PSK file',
    );
  let certPath = settings.cert;
  let keyPath = settings.key;
  let caPath = settings.ca;
  if (settings.certificates !== undefined) {
    const dir = settings.certificates;
    try {
      if (!statSync(dir).isDirectory()) throw new Error('not a directory');
    } catch (err) {
      const reason =
        (err as NodeJS.ErrnoException).code === 'ENOENT'
          ? 'no such directory'
          : (err as Error).message;
      throw new TlsSetupError(`cannot use the TLS certificates directory ${dir}: ${reason}`);
    }
    certPath ??= join(dir, 'server-cert.pem');
    keyPath ??= join(dir, 'server-key.pem');
    // The CA file is optional in the directory, as with nbdkit and qemu: without it, client
    // certificates are not asked for.
    if (caPath === undefined) {
      const candidate = join(dir, 'ca-cert.pem');
      try {
        if (statSync(candidate).isFile()) caPath = candidate;
      } catch {
        // no CA: fine
      }
    }
  }
  if (certPath === undefined)
    throw new TlsSetupError('TLS: a key needs its certificate (--tls-cert)');
  if (keyPath === undefined)
    throw new TlsSetupError('TLS: a certificate needs its key (--tls-key)');
  if (settings.verifyPeer === true && caPath === undefined)
    throw new TlsSetupError(
      'TLS: verify-peer needs a CA certificate to verify clients against (--tls-ca)',
    );
  const cert = readCredentialFile(certPath, 'certificate');
  const key = readCredentialFile(keyPath, 'key');
  const ca = caPath === undefined ? undefined : readCredentialFile(caPath, 'CA certificate');
  const serverOptions: tls.TlsOptions = {
    minVersion: MIN_VERSION,
    cert,
    key,
    ...(ca !== undefined ? { ca } : {}),
  };
  try {
    // Made once here only to find a bad file now rather than at the first client.
    tls.createSecureContext(serverOptions);
  } catch (err) {
    throw new TlsSetupError(
      `TLS: cannot use the certificate ${certPath} with the key ${keyPath}${caPath !== undefined ? ` and the CA ${caPath}` : ''}: ${(err as Error).message}`,
    );
  }
  return {
    kind: 'x509',
    serverOptions,
    requestCert: ca !== undefined,
    verifyPeer: settings.verifyPeer === true,
  };
}

/**
 * A certificate's subject as one string, most specific part first, as
 * `openssl x509 -noout -subject -nameopt RFC2253` prints it: `CN=alice,O=Example,C=GB`.
 * Special characters in values are escaped as RFC 4514 says (`\,`, `\+`, …); non-ASCII
 * characters stay as they are (UTF-8).
 */
export function certificateSubject(cert: X509Certificate): string {
  // Node gives one RDN per line, in certificate order (least specific first), values already
  // escaped; several values of one RDN are joined by " + ".
  return cert.subject
    .split('\n')
    .filter((l) => l !== '')
    .reverse()
    .map((rdn) => rdn.split(' + ').join('+'))
    .join(',');
}

/**
 * Runs the server side of a TLS handshake on `socket` (right after STARTTLS's ACK) and
 * resolves with the TLS socket and what the client proved. Rejects — leaving the socket
 * destroyed — when the handshake fails, the client's certificate is refused, or it takes
 * longer than the timeout.
 *
 * The socket is handed to a tls.Server of its own (never listening) rather than wrapped in a
 * bare TLSSocket: only the server path tells whether a client certificate verified
 * (`authorized`), and a server per connection ties the PSK identity and the outcome to this
 * socket without any bookkeeping. Making one costs about a millisecond, once per connection.
 */
export function upgradeToTls(
  socket: Socket,
  opts: NbdTlsOptions,
): Promise<{ socket: tls.TLSSocket; identity: TlsPeerIdentity }> {
  const creds = opts.credentials;
  let pskIdentity: string | undefined;
  const keys = creds.pskKeys;
  const server = tls.createServer({
    ...creds.serverOptions,
    requestCert: creds.requestCert,
    // Checked below, so that the log can say why a certificate was refused.
    rejectUnauthorized: false,
    handshakeTimeout: opts.handshakeTimeoutMs ?? 10_000,
    ...(keys !== undefined
      ? {
          pskCallback: (_sock: tls.TLSSocket, identity: string): Buffer | null => {
            const key = keys.get(identity);
            if (key === undefined) return null; // unknown identity: the handshake fails
            pskIdentity = identity;
            return key;
          },
        }
      : {}),
  });
  return new Promise((resolve, reject) => {
    let settled = false;
    const fail = (err: Error, secure?: tls.TLSSocket): void => {
      if (settled) return;
      settled = true;
      secure?.destroy();
      socket.destroy();
      reject(err);
    };
    const closed = (): void => fail(new Error('connection closed during the TLS handshake'));
    socket.once('close', closed);
    server.once('tlsClientError', (err, secure) => fail(err, secure));
    server.once('secureConnection', (secure: tls.TLSSocket) => {
      if (settled) {
        secure.destroy();
        return;
      }
      const identity: TlsPeerIdentity = {};
      if (pskIdentity !== undefined) identity.pskIdentity = pskIdentity;
      if (creds.kind === 'x509' && creds.requestCert) {
        const peer = secure.getPeerX509Certificate();
        if (secure.authorized && peer !== undefined) {
          identity.tlsSubject = certificateSubject(peer);
        } else if (creds.verifyPeer) {
          const why =
            peer === undefined ? 'no certificate sent' : String(secure.authorizationError);
          fail(new Error(`client certificate refused: ${why}`), secure);
          return;
        }
        // Not verifying: a certificate that does not verify is ignored, never an identity.
      }
      settled = true;
      socket.off('close', closed);
      // Later errors (a reset mid-transmission) are the connection's ordinary end; the
      // owner of the socket attaches its own handlers.
      secure.on('error', () => {});
      resolve({ socket: secure, identity });
    });
    server.emit('connection', socket);
  });
}
