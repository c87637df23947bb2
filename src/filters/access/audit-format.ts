/**
 * The audit log's line format (docs/access-format.md), shared by the writer (audit-log.ts) and
 * `devfilter audit verify` (audit-verify.ts).
 *
 * Every line is one JSON object ending in `"prev":"<hex>","hash":"<hex>"}` and a newline.
 * `hash` is the SHA-256 (hex) of the line's bytes up to `"hash"`, with the comma before it
 * replaced by the closing brace — that is, of the line as it would be without its hash field,
 * byte for byte, so that no canonical re-serialisation is needed to check it. `prev` is the
 * previous line's hash; the first line (the header, seq 0) has as prev the genesis value
 * sha256("devfilter-audit-v1:" + logId), logId being the random id the header carries.
 */
import { createHash } from 'node:crypto';

export const AUDIT_FORMAT_VERSION = 1;
export const HEADER_TYPE = 'devfilter-audit';
const LINE = /^(\{.*),"hash":"([0-9a-f]{64})"\}$/;

export function sha256Hex(text: string | Buffer): string {
  return createHash('sha256').update(text).digest('hex');
}

export function genesisOf(logId: string): string {
  return sha256Hex(`devfilter-audit-v1:${logId}`);
}

/** The line (without its newline) for `fields`, which must end with `prev`. */
export function sealLine(fields: Record<string, unknown>): { line: string; hash: string } {
  const body = JSON.stringify(fields);
  const hash = sha256Hex(body);
  return { line: `${body.slice(0, -1)},"hash":"${hash}"}`, hash };
}

export type ParsedLine =
  { ok: true; fields: Record<string, unknown>; hash: string } | { ok: false; reason: string };

/** Checks a line's own hash and parses it; says what is wrong otherwise. */
export function parseLine(line: string): ParsedLine {
  const m = LINE.exec(line);
  if (!m) return { ok: false, reason: 'not an audit line (no trailing "hash" field)' };
  const body = `${m[1]}}`;
  const hash = m[2]!;
  if (sha256Hex(body) !== hash)
    return { ok: false, reason: 'its hash does not match its content (the line was edited)' };
  let fields: unknown;
  try {
    fields = JSON.parse(body);
  } catch (err) {
    return { ok: false, reason: `not valid JSON (${(err as Error).message})` };
  }
  if (typeof fields !== 'object' || fields === null || Array.isArray(fields))
    return { ok: false, reason: 'not a JSON object' };
  return { ok: true, fields: fields as Record<string, unknown>, hash };
}
