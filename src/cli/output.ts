/**
 * What client commands print and the exit codes scripts rely on.
 */
import { ControlUnreachableError, RpcError } from '../control/protocol.js';
import { UsageError } from './errors.js';

export { ExitError, UsageError } from './errors.js';

export const EXIT_OK = 0;
/** The daemon tried and failed: timeout, failed, internal, busy. */
export const EXIT_FAILURE = 1;
/** Usage error, invalid arguments, or a name that exists already. */
export const EXIT_USAGE = 2;
/** No such export, filter, or (on create with --above/--below) anchor filter. */
export const EXIT_NOT_FOUND = 3;
/** The daemon cannot be reached (no socket, refused, permission, no answer). */
export const EXIT_UNREACHABLE = 4;

export const EXIT_CODES_HELP = `
Exit codes:
  0  success
  1  the daemon failed the request (timeout draining requests, filter setup or command failed)
  2  usage error or invalid arguments (also: a filter of that name exists already)
  3  not found (no such export or filter)
  4  cannot reach the daemon (no control socket, refused, permission denied, no answer)`;

/** The exit code for an error a client command got. */
export function exitCodeFor(err: unknown): number {
  if (err instanceof UsageError) return EXIT_USAGE;
  if (err instanceof ControlUnreachableError) return EXIT_UNREACHABLE;
  if (err instanceof RpcError) {
    switch (err.kind) {
      case 'not-found':
        return EXIT_NOT_FOUND;
      case 'invalid':
      case 'invalid-params':
      case 'invalid-request':
      case 'parse-error':
      case 'method-not-found':
      case 'exists':
        return EXIT_USAGE;
      default:
        return EXIT_FAILURE;
    }
  }
  return EXIT_FAILURE;
}

/** Reports a client command's error on stderr (as JSON with --json) and returns the exit code. */
export function reportError(err: unknown, json: boolean): number {
  const code = exitCodeFor(err);
  if (json) {
    const error =
      err instanceof RpcError
        ? err.toJSON()
        : {
            code: null,
            message: (err as Error).message,
            data: {
              code:
                err instanceof ControlUnreachableError
                  ? 'unreachable'
                  : err instanceof UsageError
                    ? 'usage'
                    : 'error',
            },
          };
    process.stderr.write(JSON.stringify({ error }) + '\n');
  } else {
    process.stderr.write(`devfilter: ${(err as Error).message}\n`);
  }
  return code;
}

export function printJson(value: unknown): void {
  process.stdout.write(JSON.stringify(value, null, 2) + '\n');
}

/** Structured data for people: YAML without the document markers. */
export async function printYaml(value: unknown): Promise<void> {
  const { stringify } = await import('yaml'); // loaded only when needed: CLI start-up is cheaper
  process.stdout.write(stringify(value, { lineWidth: 0 }).replace(/\n$/, '') + '\n');
}

/** Simple aligned columns; the last column is not padded. */
export function table(headers: string[], rows: string[][]): string {
  const all = [headers, ...rows];
  const widths = headers.map((_, i) => Math.max(...all.map((r) => (r[i] ?? '').length)));
  return (
    all
      .map((r) =>
        r
          .map((cell, i) => (i === r.length - 1 ? cell : cell.padEnd(widths[i]!)))
          .join('  ')
          .trimEnd(),
      )
      .join('\n') + '\n'
  );
}

/** Filter arguments in one line: k=v,k=v (values that are not strings or numbers as JSON). */
export function formatArgs(args: Record<string, unknown>): string {
  const parts = Object.entries(args).map(
    ([k, v]) =>
      `${k}=${typeof v === 'string' || typeof v === 'number' || typeof v === 'boolean' ? String(v) : JSON.stringify(v)}`,
  );
  return parts.length > 0 ? parts.join(',') : '-';
}

export function formatDuration(seconds: number): string {
  const d = Math.floor(seconds / 86400);
  const h = Math.floor((seconds % 86400) / 3600);
  const m = Math.floor((seconds % 3600) / 60);
  const s = seconds % 60;
  if (d > 0) return `${d}d${h}h`;
  if (h > 0) return `${h}h${m}m`;
  if (m > 0) return `${m}m${s}s`;
  return `${s}s`;
}
