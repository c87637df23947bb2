/**
 * Verification of an access filter audit log (`devfilter audit verify FILE`): every line's own
 * hash, the chain of `prev` hashes from the header's genesis value, and consecutive `seq`
 * numbers. The first line that fails is reported with its number and the reason; a last line
 * cut short (no newline) is reported as a truncated tail, distinct from tampering.
 *
 * Streams the file: memory stays bounded whatever its size.
 */
import fs from 'node:fs';
import { AUDIT_FORMAT_VERSION, HEADER_TYPE, genesisOf, parseLine } from './audit-format.js';

export type VerifyStatus = 'ok' | 'tampered' | 'truncated' | 'empty';

export interface VerifyReport {
  ok: boolean;
  status: VerifyStatus;
  file: string;
  logId: string | null;
  /** Complete lines that verified. */
  lines: number;
  lastSeq: number | null;
  /** The hash of the last line that verified: compare it with an anchor kept elsewhere. */
  lastHash: string | null;
  events: number;
  denied: number;
  audited: number;
  opens: number;
  /** torn-tail lines in the chain: tails a restart cut off and recorded. */
  tornTailsRecorded: number;
  /** Whether the last line is a `close` line (the writer ended cleanly). */
  endsWithClose: boolean;
  firstBad?: { line: number; reason: string };
  truncatedTail?: { line: number; bytes: number; reason: string };
}

export async function verifyAuditLog(file: string): Promise<VerifyReport> {
  const report: VerifyReport = {
    ok: false,
    status: 'ok',
    file,
    logId: null,
    lines: 0,
    lastSeq: null,
    lastHash: null,
    events: 0,
    denied: 0,
    audited: 0,
    opens: 0,
    tornTailsRecorded: 0,
    endsWithClose: false,
  };
  let prev: string | null = null;
  let lineNo = 0;
  let lastType: unknown = null;

  /** Checks one complete line; returns a reason when it fails. */
  const check = (text: string): string | null => {
    const parsed = parseLine(text);
    if (!parsed.ok) return parsed.reason;
    const f = parsed.fields;
    const expectedSeq = lineNo - 1;
    if (lineNo === 1) {
      if (f.type !== HEADER_TYPE || typeof f.logId !== 'string')
        return 'the first line is not a devfilter audit header';
      if (f.version !== AUDIT_FORMAT_VERSION)
        return `audit format version ${String(f.version)} is not supported`;
      prev = genesisOf(f.logId);
      report.logId = f.logId;
    } else if (f.type === HEADER_TYPE) return 'a second header (logs were concatenated?)';
    if (f.seq !== expectedSeq)
      return `seq is ${JSON.stringify(f.seq)}, expected ${expectedSeq} (a line before it was removed, or lines were reordered or inserted)`;
    if (f.prev !== prev)
      return lineNo === 1
        ? 'prev is not the genesis value of the header logId (the header was edited)'
        : `prev does not match the hash of line ${lineNo - 1} (a line was removed, reordered or rewritten)`;
    prev = parsed.hash;
    report.lines = lineNo;
    report.lastSeq = expectedSeq;
    report.lastHash = parsed.hash;
    lastType = f.type;
    if (f.type === 'event') {
      report.events++;
      if (f.result === 'denied') report.denied++;
      else report.audited++;
    } else if (f.type === 'open') report.opens++;
    else if (f.type === 'torn-tail') report.tornTailsRecorded++;
    return null;
  };

  const stream = fs.createReadStream(file);
  let rest: Buffer = Buffer.alloc(0);
  let failed = false;
  try {
    for await (const chunk of stream as AsyncIterable<Buffer>) {
      let buf = rest.length > 0 ? Buffer.concat([rest, chunk]) : chunk;
      let nl: number;
      while ((nl = buf.indexOf(0x0a)) >= 0) {
        lineNo++;
        const reason = check(buf.subarray(0, nl).toString('utf8'));
        buf = buf.subarray(nl + 1);
        if (reason !== null) {
          report.firstBad = { line: lineNo, reason };
          failed = true;
          break;
        }
      }
      if (failed) break;
      rest = Buffer.from(buf);
    }
  } finally {
    stream.destroy();
  }
  if (failed) {
    report.status = 'tampered';
  } else if (rest.length > 0) {
    lineNo++;
    const complete = check(rest.toString('utf8')) === null;
    report.status = 'truncated';
    report.truncatedTail = {
      line: lineNo,
      bytes: rest.length,
      reason: complete
        ? 'the last line verifies but lacks its newline'
        : 'the last line is incomplete (an append cut short, e.g. by a crash, or the file was truncated)',
    };
  } else if (lineNo === 0) {
    report.status = 'empty';
  }
  report.endsWithClose = lastType === 'close';
  report.ok = report.status === 'ok';
  return report;
}
