/**
 * `devfilter audit verify FILE`: checks an access filter audit log (docs/access-format.md) —
 * every line's hash, the hash chain and the sequence — and reports the first bad line and why,
 * or a truncated tail. Exit 0 when the log verifies, 1 otherwise. Runs without a daemon.
 */
import type { Command } from 'commander';
import { ExitError, printJson, reportError } from './output.js';

export function addAuditCommands(program: Command): void {
  const audit = program
    .command('audit')
    .description('Audit logs of the access filter: verify their hash chain');

  audit
    .command('verify')
    .description(
      'verify an audit log: each line hash, the prev chain from the header, consecutive seq; reports the first bad line (edited, removed, reordered) or a truncated tail. Exit 0 if it verifies, 1 if not',
    )
    .argument('<file>', 'the audit log (the auditLog argument of an access filter)')
    .option('--json', 'the report as JSON', false)
    .action(async (file: string, o: { json: boolean }) => {
      let ok: boolean;
      try {
        const { verifyAuditLog } = await import('../filters/access/audit-verify.js');
        const r = await verifyAuditLog(file);
        ok = r.ok;
        if (o.json) printJson(r);
        else {
          const out: string[] = [];
          if (r.status === 'ok')
            out.push(
              `ok: ${file}: ${r.lines} line(s) verified (log ${r.logId}; ${r.events} event(s): ${r.denied} denied, ${r.audited} audited; ${r.opens} run(s))`,
            );
          else if (r.status === 'empty') out.push(`FAILED: ${file} is empty (no header)`);
          else if (r.status === 'tampered')
            out.push(
              `FAILED: ${file}: line ${r.firstBad!.line}: ${r.firstBad!.reason}`,
              `  ${r.lines} line(s) before it verified`,
            );
          else
            out.push(
              `TRUNCATED: ${file}: line ${r.truncatedTail!.line} (${r.truncatedTail!.bytes} bytes): ${r.truncatedTail!.reason}`,
              `  the ${r.lines} line(s) before it verified`,
            );
          if (r.lastSeq !== null)
            out.push(`  last verified line: seq ${r.lastSeq}, hash ${r.lastHash}`);
          if (r.status === 'ok' && !r.endsWithClose)
            out.push(
              '  note: the log does not end with a close line (the filter is still attached, the daemon stopped uncleanly, or whole lines were cut from the end: compare the last hash with one kept elsewhere)',
            );
          if (r.tornTailsRecorded > 0)
            out.push(
              `  note: ${r.tornTailsRecorded} torn tail(s) were cut and recorded by a restart (see the torn-tail lines)`,
            );
          process.stdout.write(out.join('\n') + '\n');
        }
      } catch (err) {
        throw new ExitError(reportError(err, o.json));
      }
      // (process.exitCode would be overwritten by main()'s return value.)
      if (!ok) throw new ExitError(1);
    });
}
