/**
 * TLS options for the NBD client from an `nbds://` or `nbds+unix://` URI, with the query
 * parameters libnbd takes (doc/uri.md and nbd_connect_uri(3)):
 *
 * - `tls-certificates=DIR`: `DIR/ca-cert.pem` to check the server against (else the system's
 *   CAs), and `DIR/client-cert.pem` + `DIR/client-key.pem` when present, for servers that ask;
 * - `tls-psk-file=FILE` (or `tls-type=psk`): a PSK keys file; the identity is the URI's user
 *   (`nbds://alice@host/disk`), else the login name, as with libnbd;
 * - `tls-verify-peer=false`: do not check the server's certificate (default: check);
 * - `tls-hostname=NAME`: the name the server certificate must carry (default: the URI's host;
 *   over a unix socket there is no host, so only the chain is checked unless this is given).
 */
import { existsSync, readFileSync } from 'node:fs';
import { userInfo } from 'node:os';
import { join } from 'node:path';
import { isIP } from 'node:net';
import tls from 'node:tls';
import type { NbdUri } from './client-uri.js';
import { PSK_CIPHERS, parsePskFile } from './tls.js';

function readOrThrow(path: string, what: string): Buffer {
  try {
    return readFileSync(path);
  } catch (err) {
    throw new Error(`cannot read the TLS ${what} ${path}: ${(err as Error).message}`);
  }
}

function flag(value: string | undefined, name: string, dflt: boolean): boolean {
  if (value === undefined) return dflt;
  if (/^(1|true|on|yes)$/i.test(value)) return true;
  if (/^(0|false|off|no)$/i.test(value)) return false;
  throw new Error(`${name}=${value}: expected true or false`);
}

/** The tls.connect options for `u` (a TLS URI); throws with a clear message for bad files. */
export function clientTlsOptions(u: NbdUri): tls.ConnectionOptions {
  const p = u.params;
  const type = p['tls-type'];
  if (type !== undefined && type !== 'x509' && type !== 'psk')
    throw new Error(`tls-type=${type}: only x509 and psk are supported`);
  const base: tls.ConnectionOptions = { minVersion: 'TLSv1.2' };
  if (type === 'psk' || (type === undefined && p['tls-psk-file'] !== undefined)) {
    const file = p['tls-psk-file'];
    if (file === undefined) throw new Error('tls-type=psk needs tls-psk-file=FILE');
    const keys = parsePskFile(readOrThrow(file, 'PSK file').toString('utf8'), file);
    const identity = u.user ?? userInfo().username;
    const key = keys.get(identity);
    if (key === undefined)
      throw new Error(`${file}: no key for the identity ${JSON.stringify(identity)}`);
    return {
      ...base,
      ciphers: PSK_CIPHERS,
      pskCallback: () => ({ identity, psk: key }),
      // There is no certificate to check: the key proves the server.
      checkServerIdentity: () => undefined,
    };
  }
  const opts: tls.ConnectionOptions = {
    ...base,
    rejectUnauthorized: flag(p['tls-verify-peer'], 'tls-verify-peer', true),
  };
  const dir = p['tls-certificates'];
  if (dir !== undefined) {
    const ca = join(dir, 'ca-cert.pem');
    if (existsSync(ca)) opts.ca = readOrThrow(ca, 'CA certificate');
    const cert = join(dir, 'client-cert.pem');
    const key = join(dir, 'client-key.pem');
    if (existsSync(cert) || existsSync(key)) {
      opts.cert = readOrThrow(cert, 'client certificate');
      opts.key = readOrThrow(key, 'client key');
    }
  }
  const hostname = p['tls-hostname'] ?? (u.transport === 'tcp' ? u.host : undefined);
  if (hostname !== undefined && isIP(hostname) !== 0)
    // SNI must not carry an address (RFC 6066); the certificate is still checked against it.
    opts.checkServerIdentity = (_name, cert) => tls.checkServerIdentity(hostname, cert);
  else if (hostname !== undefined) opts.servername = hostname;
  else {
    // Over a unix socket without tls-hostname there is no name to check, only the chain: that
    // proves something only against a CA of one's own, not the system's public ones (any
    // public certificate would do).
    if (opts.rejectUnauthorized !== false && opts.ca === undefined)
      throw new Error(
        'nbds+unix: TLS cannot verify the server: give tls-certificates=DIR with a ca-cert.pem, or tls-hostname=NAME',
      );
    opts.checkServerIdentity = () => undefined;
  }
  return opts;
}
