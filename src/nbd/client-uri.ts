/**
 * NBD URIs (doc/uri.md of the NBD project): `nbd://host[:port]/name` and
 * `nbd+unix:///name?socket=PATH`, plus the TLS variants `nbds://` and `nbds+unix://`
 * (STARTTLS, required; see client-tls.ts for the TLS parameters).
 *
 * Parsed by hand rather than with WHATWG `URL`: `URL` normalises `.`/`..` segments (even
 * percent-encoded ones) and its query parser turns `+` into a space, both of which would
 * change the export name or socket path that libnbd and qemu send for the same URI.
 */

import { NBD_DEFAULT_PORT } from './protocol.js';

export interface NbdUri {
  transport: 'tcp' | 'unix';
  /** The URI asked for TLS (`nbds` schemes): TLS is then required, never optional. */
  tls: boolean;
  /** TCP only; IPv6 literals without their brackets. */
  host?: string;
  /** TCP only; 10809 when the URI gives none. */
  port?: number;
  /** Unix only; may start with NUL for an abstract-namespace socket. */
  path?: string;
  /** The URI path minus one leading '/', percent-decoded ('' is the default export). */
  exportName: string;
  /** TLS username from `user@host`, if any. */
  user?: string;
  /** Query parameters other than `socket`, decoded (e.g. tls-type, x-...). */
  params: Record<string, string>;
}

const SCHEMES: Record<string, { transport: 'tcp' | 'unix'; tls: boolean }> = {
  nbd: { transport: 'tcp', tls: false },
  nbds: { transport: 'tcp', tls: true },
  'nbd+unix': { transport: 'unix', tls: false },
  'nbds+unix': { transport: 'unix', tls: true },
};

/** Parameters doc/uri.md defines; anything else must start with `x-`. */
const KNOWN_PARAMS = new Set([
  'socket',
  'tls-type',
  'tls-hostname',
  'tls-verify-peer',
  'tls-certificates',
  'tls-psk-file',
]);

function decode(uri: string, part: string, text: string): string {
  try {
    return decodeURIComponent(text);
  } catch {
    throw new Error(`invalid NBD URI ${JSON.stringify(uri)}: bad percent-encoding in ${part}`);
  }
}

export function parseNbdUri(uri: string): NbdUri {
  const bad = (why: string): Error => new Error(`invalid NBD URI ${JSON.stringify(uri)}: ${why}`);
  const m = /^([A-Za-z][A-Za-z0-9+.-]*):\/\/([^/?#]*)([^?#]*)(?:\?([^#]*))?(?:#.*)?$/.exec(uri);
  if (!m) throw bad('expected scheme://authority/export');
  const [, schemeRaw = '', authority = '', path = '', query] = m;
  const scheme = SCHEMES[schemeRaw.toLowerCase()];
  if (!scheme) throw bad(`unsupported scheme '${schemeRaw}' (nbd, nbds, nbd+unix, nbds+unix)`);

  const params: Record<string, string> = {};
  if (query) {
    for (const pair of query.split('&')) {
      if (pair === '') continue;
      const eq = pair.indexOf('=');
      const key = decode(uri, 'query', eq < 0 ? pair : pair.slice(0, eq));
      const value = decode(uri, 'query', eq < 0 ? '' : pair.slice(eq + 1));
      if (!KNOWN_PARAMS.has(key) && !key.startsWith('x-')) throw bad(`unknown parameter '${key}'`);
      params[key] = value;
    }
  }

  // The path is '' or starts with '/': strip exactly one slash, so '//disk' names '/disk'.
  const exportName = decode(uri, 'path', path.startsWith('/') ? path.slice(1) : path);

  const at = authority.lastIndexOf('@');
  const user = at >= 0 ? decode(uri, 'userinfo', authority.slice(0, at)) : undefined;
  const hostPort = at >= 0 ? authority.slice(at + 1) : authority;

  const result: NbdUri = { ...scheme, exportName, params };
  if (user !== undefined) result.user = user;

  if (scheme.transport === 'unix') {
    if (hostPort !== '') throw bad('nbd+unix URIs take no host (use ?socket=PATH)');
    const socketPath = params.socket;
    if (!socketPath) throw bad("nbd+unix URIs need a 'socket' parameter");
    delete params.socket;
    result.path = socketPath;
    return result;
  }

  const hp = /^(\[[^\]]*\]|[^:[\]]*)(?::(\d*))?$/.exec(hostPort);
  if (!hp) throw bad(`bad host '${hostPort}'`);
  const [, hostRaw = '', portText] = hp;
  const host = decode(uri, 'host', hostRaw.replace(/^\[(.*)\]$/, '$1'));
  if (host === '') throw bad('missing host');
  let port = NBD_DEFAULT_PORT;
  if (portText) {
    port = Number(portText);
    if (!Number.isInteger(port) || port < 1 || port > 65535) throw bad(`bad port '${portText}'`);
  }
  if (params.socket !== undefined) throw bad("'socket' is only for nbd+unix URIs");
  result.host = host;
  result.port = port;
  return result;
}
