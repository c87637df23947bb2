import { NBD_DEFAULT_PORT } from '../nbd/protocol.js';

/** Parses "HOST:PORT", "[v6]:PORT", "HOST" (default port) or ":PORT" (all interfaces). */
export function parseListenAddress(text: string): { host: string; port: number } {
  let host = text;
  let portText: string | undefined;
  const v6 = /^\[([^\]]+)\](?::(.*))?$/.exec(text);
  if (v6) {
    host = v6[1]!;
    portText = v6[2];
  } else if (text.includes(':')) {
    const colon = text.lastIndexOf(':');
    host = text.slice(0, colon);
    portText = text.slice(colon + 1);
    if (host.includes(':'))
      throw new Error(
        `invalid address ${JSON.stringify(text)}: write IPv6 addresses as [ADDR]:PORT`,
      );
  }
  if (host === '') host = '0.0.0.0';
  let port = NBD_DEFAULT_PORT;
  if (portText !== undefined) {
    port = Number(portText);
    if (!/^\d+$/.test(portText) || !Number.isInteger(port) || port < 0 || port > 65535) {
      throw new Error(`invalid port ${JSON.stringify(portText)} in ${JSON.stringify(text)}`);
    }
  }
  return { host, port };
}
