/**
 * `devfilter serve`'s TLS settings: the command-line flags (nbdkit's and qemu-nbd's words:
 * `--tls`, `--tls-certificates`, `--tls-verify-peer`, `--tls-psk`), the config file's `tls:`
 * section, and how the two combine. Only settings are checked here; the files themselves are
 * read when the daemon starts (src/nbd/tls.ts).
 */
import { isAbsolute, resolve } from 'node:path';
import { InvalidArgumentError } from 'commander';
import { TLS_MODES, type TlsMode, type TlsSettings } from '../nbd/tls-policy.js';
import { UsageError } from './errors.js';

export const TLS_OPTION_HELP = {
  mode: 'TLS: off, on (offered; exports may require it) or require (default when credentials are given)',
  certificates:
    'directory with server-cert.pem, server-key.pem and optionally ca-cert.pem (as nbdkit and qemu use)',
  cert: 'the server certificate (PEM; may include intermediates)',
  key: 'the server private key (PEM)',
  ca: 'CA certificate(s) (PEM) that client certificates are checked against',
  verifyPeer: 'refuse TLS clients without a certificate signed by the CA',
  psk: 'pre-shared keys file, IDENTITY:HEXKEY lines (psktool format), instead of certificates',
} as const;

export function parseTlsMode(value: string): TlsMode {
  if (!(TLS_MODES as readonly string[]).includes(value))
    throw new InvalidArgumentError(`expected one of ${TLS_MODES.join(', ')}`);
  return value as TlsMode;
}

/** TLS settings as far as they were given (command line or config file). */
export type PartialTlsSettings = Partial<TlsSettings>;

/** The flags of the serve command that concern TLS, as commander parsed them. */
export interface TlsFlags {
  tls?: TlsMode;
  tlsCertificates?: string;
  tlsCert?: string;
  tlsKey?: string;
  tlsCa?: string;
  tlsVerifyPeer?: boolean;
  tlsPsk?: string;
}

/** Paths on the command line are relative to the working directory. */
export function tlsSettingsFromFlags(o: TlsFlags): PartialTlsSettings {
  const out: PartialTlsSettings = {};
  if (o.tls !== undefined) out.mode = o.tls;
  if (o.tlsCertificates !== undefined) out.certificates = resolve(o.tlsCertificates);
  if (o.tlsCert !== undefined) out.cert = resolve(o.tlsCert);
  if (o.tlsKey !== undefined) out.key = resolve(o.tlsKey);
  if (o.tlsCa !== undefined) out.ca = resolve(o.tlsCa);
  if (o.tlsVerifyPeer === true) out.verifyPeer = true;
  if (o.tlsPsk !== undefined) out.psk = resolve(o.tlsPsk);
  return out;
}

const CONFIG_KEYS = ['mode', 'certificates', 'cert', 'key', 'ca', 'verifyPeer', 'psk'] as const;

/**
 * The config file's `tls:` value: a mode (`tls: require`) or a mapping with `mode`,
 * `certificates`, `cert`, `key`, `ca`, `verifyPeer`, `psk`. Paths are relative to the config
 * file's directory. Returns the settings, or a [field, message] problem.
 */
export function tlsSettingsFromConfig(
  raw: unknown,
  baseDir: string,
): PartialTlsSettings | [string[], string] {
  if (typeof raw === 'string' || typeof raw === 'boolean') {
    // `tls: off` is the boolean false in YAML 1.1 readers; accept both spellings.
    const mode = raw === false ? 'off' : raw === true ? 'on' : raw;
    if (!(TLS_MODES as readonly string[]).includes(mode))
      return [[], `expected ${TLS_MODES.join(', ')} or a mapping`];
    return { mode: mode as TlsMode };
  }
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw))
    return [[], `expected ${TLS_MODES.join(', ')} or a mapping with ${CONFIG_KEYS.join(', ')}`];
  const d = raw as Record<string, unknown>;
  const out: PartialTlsSettings = {};
  for (const key of Object.keys(d))
    if (!(CONFIG_KEYS as readonly string[]).includes(key))
      return [[key], `unknown key (expected one of ${CONFIG_KEYS.join(', ')})`];
  if (d.mode !== undefined) {
    const mode = d.mode === false ? 'off' : d.mode === true ? 'on' : d.mode;
    if (typeof mode !== 'string' || !(TLS_MODES as readonly string[]).includes(mode))
      return [['mode'], `expected one of ${TLS_MODES.join(', ')}`];
    out.mode = mode as TlsMode;
  }
  for (const key of ['certificates', 'cert', 'key', 'ca', 'psk'] as const) {
    const v = d[key];
    if (v === undefined) continue;
    if (typeof v !== 'string' || v === '') return [[key], 'expected a path'];
    out[key] = isAbsolute(v) ? v : resolve(baseDir, v);
  }
  if (d.verifyPeer !== undefined) {
    if (typeof d.verifyPeer !== 'boolean') return [['verifyPeer'], 'expected true or false'];
    out.verifyPeer = d.verifyPeer;
  }
  return out;
}

/**
 * Combines the config file's settings with the command line's (each flag wins over the same
 * field of the file) and checks what can be checked without reading files. Returns undefined
 * for no TLS. `exportsRequiringTls` names exports that say `tls: required`: with TLS off they
 * could never be opened, which is a mistake worth stopping for.
 */
export function resolveTlsSettings(
  fromConfig: PartialTlsSettings | undefined,
  fromFlags: PartialTlsSettings,
  exportsRequiringTls: readonly string[],
): TlsSettings | undefined {
  const merged: PartialTlsSettings = { ...fromConfig, ...fromFlags };
  const hasCredentials =
    merged.certificates !== undefined ||
    merged.cert !== undefined ||
    merged.key !== undefined ||
    merged.ca !== undefined ||
    merged.psk !== undefined;
  // Credentials alone mean TLS is wanted: required, as qemu-nbd does with --tls-creds.
  const mode: TlsMode = merged.mode ?? (hasCredentials ? 'require' : 'off');
  if (mode === 'off') {
    if (exportsRequiringTls.length > 0)
      throw new UsageError(
        `export ${JSON.stringify(exportsRequiringTls[0])} requires TLS, but TLS is off (give --tls-certificates, --tls-cert/--tls-key or --tls-psk)`,
      );
    return undefined;
  }
  if (!hasCredentials)
    throw new UsageError(
      `--tls ${mode} needs credentials: --tls-certificates DIR, --tls-cert FILE --tls-key FILE, or --tls-psk FILE`,
    );
  if (merged.psk !== undefined && merged.psk !== '' && hasX509(merged))
    throw new UsageError(
      'TLS: give either certificates (--tls-certificates/--tls-cert) or --tls-psk, not both',
    );
  if (merged.verifyPeer === true && merged.psk !== undefined)
    throw new UsageError('--tls-verify-peer applies to certificates, not to --tls-psk');
  return { ...merged, mode };
}

function hasX509(s: PartialTlsSettings): boolean {
  return (
    s.certificates !== undefined ||
    s.cert !== undefined ||
    s.key !== undefined ||
    s.ca !== undefined
  );
}
