/**
 * The words of TLS policy, apart from src/nbd/tls.ts so that the CLI can parse them without
 * loading node:tls.
 */

/**
 * Server-wide TLS mode, in nbdkit's words: `off` never offers TLS (NOTLS), `on` offers it and
 * lets each export say whether it needs it (SELECTIVETLS), `require` needs it before any option
 * (FORCEDTLS) unless some export says `optional` (then SELECTIVETLS).
 */
export type TlsMode = 'off' | 'on' | 'require';
export const TLS_MODES: readonly TlsMode[] = ['off', 'on', 'require'];

/** Per export: whether a client must have upgraded to TLS before it may open it. */
export type ExportTlsPolicy = 'required' | 'optional';
export const EXPORT_TLS_POLICIES: readonly ExportTlsPolicy[] = ['required', 'optional'];

/** Where the credentials come from, as given on the command line or in the config file. */
export interface TlsSettings {
  mode: TlsMode;
  /** A directory with ca-cert.pem (optional), server-cert.pem and server-key.pem (nbdkit, qemu). */
  certificates?: string;
  cert?: string;
  key?: string;
  /** CA certificates that client certificates must chain to. */
  ca?: string;
  /** Refuse clients without a certificate signed by the CA. */
  verifyPeer?: boolean;
  /** A PSK keys file: `identity:hexkey` lines (psktool's format, as nbdkit and qemu read it). */
  psk?: string;
}
