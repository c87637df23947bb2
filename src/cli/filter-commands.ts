/**
 * The client commands, dmsetup-like: `devfilter filter create|remove|remove-all|control|list|
 * status|types|load-module`, `devfilter status`, `devfilter export list|status`, and
 * `devfilter events`. Each speaks JSON-RPC to a running daemon's control socket, found through
 * `--control PATH`, else $DEVFILTER_CONTROL, else the default path. Each prints a table (or
 * YAML for nested data) by default and exactly the JSON result with `--json`.
 */
import { isAbsolute, resolve } from 'node:path';
import { Command, InvalidArgumentError, Option } from 'commander';
import { formatSize } from '../core/size.js';
import type { FilterSummary } from '../core/manager.js';
import { ControlClient } from '../control/client.js';
import { resolveControlPath, CONTROL_ENV } from '../control/socket-path.js';
import { keyValuesToArgs, parseJsonObject, parseKeyValue } from './args.js';
import {
  EXIT_CODES_HELP,
  ExitError,
  formatArgs,
  formatDuration,
  printJson,
  printYaml,
  reportError,
  table,
  UsageError,
} from './output.js';

export interface CommonOptions {
  control?: string;
  json: boolean;
}

/** How long a client waits for an answer beyond the change timeout it asked for. */
const CALL_SLACK_MS = 10_000;
const DEFAULT_CHANGE_TIMEOUT_MS = 10_000;

const CONTROL_HELP = `the daemon's control socket (default: $${CONTROL_ENV}, else /run/devfilter/control.sock as root, else $XDG_RUNTIME_DIR/devfilter/control.sock, else /tmp/devfilter-UID/control.sock)`;

export function common(cmd: Command): Command {
  return cmd
    .option('--control <path>', CONTROL_HELP)
    .option('--json', 'print the JSON result instead of a table (errors as JSON on stderr)', false)
    .addHelpText('after', EXIT_CODES_HELP);
}

export function timeoutOption(): Option {
  return new Option(
    '--timeout <ms>',
    'how long the stack change may wait for requests in flight to drain (default 10000)',
  ).argParser((v: string) => {
    const n = Number(v);
    if (!/^\d+$/.test(v) || !Number.isSafeInteger(n) || n < 1 || n > 3_600_000) {
      throw new InvalidArgumentError('expected milliseconds, 1 to 3600000');
    }
    return n;
  });
}

function collectPair(value: string, previous: string[] = []): string[] {
  try {
    parseKeyValue(value);
  } catch (err) {
    throw new InvalidArgumentError((err as Error).message);
  }
  return [...previous, value];
}

function jsonObjectArg(value: string): Record<string, unknown> {
  try {
    return parseJsonObject(value);
  } catch (err) {
    throw new InvalidArgumentError((err as Error).message);
  }
}

/** Connects, runs `fn`, reports errors; throws ExitError with the exit code on failure. */
export async function withClient(
  o: CommonOptions,
  fn: (c: ControlClient) => Promise<void>,
): Promise<void> {
  let client: ControlClient | undefined;
  try {
    client = await ControlClient.connect(resolveControlPath(o.control));
    await fn(client);
  } catch (err) {
    if (err instanceof ExitError) throw err;
    throw new ExitError(reportError(err, o.json));
  } finally {
    client?.close();
  }
}

export const callTimeout = (timeoutMs: number | undefined): number =>
  (timeoutMs ?? DEFAULT_CHANGE_TIMEOUT_MS) + CALL_SLACK_MS;

function filterTable(filters: FilterSummary[]): string {
  if (filters.length === 0) return 'no filters\n';
  return table(
    ['EXPORT', 'POS', 'NAME', 'TYPE', 'ARGS'],
    filters.map((f) => [f.export, String(f.index), f.name, f.type, formatArgs(f.args)]),
  );
}

export function addClientCommands(program: Command): void {
  const filter = program
    .command('filter')
    .description('Create, remove and command the filters of a running daemon')
    .addHelpText('after', EXIT_CODES_HELP);

  common(
    filter
      .command('create')
      .description(
        'put a filter of TYPE on EXPORT (on top of the stack unless --above/--below/--bottom)',
      )
      .argument('<export>', 'export name')
      .argument('<type>', 'filter type (see "devfilter filter types")')
      .option('-n, --name <name>', 'filter name (default: the type, or TYPE-2, …)')
      .addOption(
        new Option('--above <filter>', 'insert just above this filter').conflicts([
          'below',
          'bottom',
        ]),
      )
      .addOption(
        new Option('--below <filter>', 'insert just below this filter').conflicts([
          'above',
          'bottom',
        ]),
      )
      .addOption(
        new Option('--bottom', 'insert at the bottom, just above the device').conflicts([
          'above',
          'below',
        ]),
      )
      .option(
        '-a, --arg <key=value>',
        "a filter argument (repeatable; coerced to the type's schema; a key given twice makes a list)",
        collectPair,
      )
      .option(
        '--args-json <json>',
        'filter arguments as a JSON object (--arg values go on top)',
        jsonObjectArg,
      )
      .addOption(timeoutOption()),
  )
    .addHelpText(
      'after',
      `\nExample:\n  devfilter filter create disk throttle --name slow --arg readIops=100 --below stats`,
    )
    .action(
      async (exportName: string, type: string, o: CommonOptions & Record<string, unknown>) => {
        await withClient(o, async (c) => {
          const params: Record<string, unknown> = {
            export: exportName,
            type,
            args: keyValuesToArgs(
              (o.arg as string[] | undefined) ?? [],
              (o.argsJson as Record<string, unknown> | undefined) ?? {},
            ),
          };
          if (o.name !== undefined) params.name = o.name;
          if (o.above !== undefined) params.above = o.above;
          if (o.below !== undefined) params.below = o.below;
          if (o.bottom === true) params.at = 'bottom';
          if (o.timeout !== undefined) params.timeoutMs = o.timeout;
          const r = await c.call<FilterSummary>('filter.create', params, {
            timeoutMs: callTimeout(o.timeout as number | undefined),
          });
          if (o.json) printJson(r);
          else
            process.stdout.write(
              `created filter ${r.name} (${r.type}) on export ${r.export} at position ${r.index}\n`,
            );
        });
      },
    );

  common(
    filter
      .command('remove')
      .description('remove filter NAME from EXPORT')
      .argument('<export>', 'export name')
      .argument('<name>', 'filter name')
      .option(
        '--policy <policy>',
        "what becomes of the filter's state (one of its type's removal policies; default: the type's first)",
      )
      .addOption(timeoutOption()),
  ).action(
    async (
      exportName: string,
      name: string,
      o: CommonOptions & { policy?: string; timeout?: number },
    ) => {
      await withClient(o, async (c) => {
        const params: Record<string, unknown> = { export: exportName, name };
        if (o.policy !== undefined) params.policy = o.policy;
        if (o.timeout !== undefined) params.timeoutMs = o.timeout;
        const r = await c.call('filter.remove', params, { timeoutMs: callTimeout(o.timeout) });
        if (o.json) printJson(r);
        else process.stdout.write(`removed filter ${name} from export ${exportName}\n`);
      });
    },
  );

  common(
    filter
      .command('remove-all')
      .description('remove every filter of EXPORT, or of every export')
      .argument('[export]', 'export name (default: all exports)')
      .option(
        '--policy <policy>',
        'removal policy for the filters whose type has it (others get their default)',
      )
      .addOption(timeoutOption()),
  ).action(
    async (
      exportName: string | undefined,
      o: CommonOptions & { policy?: string; timeout?: number },
    ) => {
      await withClient(o, async (c) => {
        const params: Record<string, unknown> = {};
        if (exportName !== undefined) params.export = exportName;
        if (o.policy !== undefined) params.policy = o.policy;
        if (o.timeout !== undefined) params.timeoutMs = o.timeout;
        const r = await c.call<{ removed: number }>('filter.removeAll', params, {
          timeoutMs: callTimeout(o.timeout) * 4,
        });
        if (o.json) printJson(r);
        else
          process.stdout.write(
            `removed ${r.removed} filter(s) from ${exportName === undefined ? 'all exports' : `export ${exportName}`}\n`,
          );
      });
    },
  );

  common(
    filter
      .command('control')
      .description(
        'send filter NAME on EXPORT a command of its type, with KEY=VALUE arguments (strings)',
      )
      .argument('<export>', 'export name')
      .argument('<name>', 'filter name')
      .argument('<command>', 'a command the filter type documents')
      .argument(
        '[args...]',
        'KEY=VALUE arguments (values are strings; use --args-json for other types)',
      )
      .option(
        '--args-json <json>',
        'command arguments as a JSON object (KEY=VALUE arguments go on top)',
        jsonObjectArg,
      ),
  )
    .addHelpText(
      'after',
      `\nExample:\n  devfilter filter control disk slow set --args-json '{"readIops": 500}'`,
    )
    .action(
      async (
        exportName: string,
        name: string,
        command: string,
        pairs: string[],
        o: CommonOptions & { argsJson?: Record<string, unknown> },
      ) => {
        let args: Record<string, unknown>;
        try {
          args = keyValuesToArgs(pairs, o.argsJson ?? {});
        } catch (err) {
          throw new ExitError(reportError(new UsageError((err as Error).message), o.json));
        }
        await withClient(o, async (c) => {
          const r = await c.call('filter.control', { export: exportName, name, command, args });
          if (o.json) printJson(r);
          else if (r === null || r === undefined) process.stdout.write('ok\n');
          else if (typeof r === 'string') process.stdout.write(r.endsWith('\n') ? r : r + '\n');
          else await printYaml(r);
        });
      },
    );

  common(
    filter
      .command('list')
      .description('list the filters of EXPORT, or of every export (POS 0 is the top of the stack)')
      .argument('[export]', 'export name (default: all exports)'),
  ).action(async (exportName: string | undefined, o: CommonOptions) => {
    await withClient(o, async (c) => {
      const r = await c.call<{ filters: FilterSummary[] }>(
        'filter.list',
        exportName === undefined ? {} : { export: exportName },
      );
      if (o.json) printJson(r);
      else process.stdout.write(filterTable(r.filters));
    });
  });

  common(
    filter
      .command('status')
      .description("show filter NAME on EXPORT with its type's status")
      .argument('<export>', 'export name')
      .argument('<name>', 'filter name'),
  ).action(async (exportName: string, name: string, o: CommonOptions) => {
    await withClient(o, async (c) => {
      const r = await c.call<FilterSummary & { status: unknown }>('filter.status', {
        export: exportName,
        name,
      });
      if (o.json) printJson(r);
      else
        await printYaml({
          export: r.export,
          name: r.name,
          type: r.type,
          position: r.index,
          args: r.args,
          status: r.status,
        });
    });
  });

  common(
    filter
      .command('types')
      .description('list the filter types the daemon knows, or show the arguments of one')
      .argument('[type]', 'a filter type'),
  ).action(async (typeName: string | undefined, o: CommonOptions) => {
    await withClient(o, async (c) => {
      type TypeInfo = {
        name: string;
        description: string;
        source: string;
        removalPolicies: string[];
        argsSchema: Record<string, unknown>;
      };
      const r = await c.call<{ types: TypeInfo[] }>('filter.types');
      if (typeName === undefined) {
        if (o.json) printJson(r);
        else if (r.types.length === 0) process.stdout.write('no filter types\n');
        else
          process.stdout.write(
            table(
              ['TYPE', 'SOURCE', 'DESCRIPTION'],
              r.types.map((t) => [t.name, t.source, t.description]),
            ),
          );
        return;
      }
      const t = r.types.find((x) => x.name === typeName);
      if (!t) {
        const known = r.types.map((x) => x.name).join(', ') || 'none';
        if (o.json)
          process.stderr.write(
            JSON.stringify({
              error: {
                code: null,
                message: `unknown filter type "${typeName}"`,
                data: { code: 'not-found' },
              },
            }) + '\n',
          );
        else
          process.stderr.write(`devfilter: unknown filter type "${typeName}" (known: ${known})\n`);
        throw new ExitError(3);
      }
      if (o.json) {
        printJson(t);
        return;
      }
      process.stdout.write(`${t.name}: ${t.description}\nsource: ${t.source}\n`);
      if (t.removalPolicies.length > 0)
        process.stdout.write(
          `removal policies: ${t.removalPolicies.join(', ')} (default ${t.removalPolicies[0]})\n`,
        );
      const props = (t.argsSchema.properties ?? {}) as Record<string, Record<string, unknown>>;
      const required = new Set((t.argsSchema.required ?? []) as string[]);
      const rows = Object.entries(props).map(([k, s]) => [
        k,
        schemaType(s),
        required.has(k) ? 'yes' : 'no',
        s.default === undefined ? '-' : JSON.stringify(s.default),
        typeof s.description === 'string' ? s.description : '',
      ]);
      process.stdout.write(
        rows.length === 0
          ? 'no arguments\n'
          : '\n' + table(['ARG', 'TYPE', 'REQUIRED', 'DEFAULT', 'DESCRIPTION'], rows),
      );
    });
  });

  common(
    filter
      .command('load-module')
      .description(
        'load filter types into the running daemon from an ES module path or an installed package',
      )
      .argument('<spec>', 'module path (./x.js, /abs/x.js) or package name'),
  ).action(async (spec: string, o: CommonOptions) => {
    await withClient(o, async (c) => {
      const isPath = spec.startsWith('.') || isAbsolute(spec);
      const r = await c.call<{ module: string; types: string[] }>('filter.loadModule', {
        spec: isPath ? resolve(spec) : spec,
      });
      if (o.json) printJson(r);
      else process.stdout.write(`loaded filter type(s) ${r.types.join(', ')} from ${r.module}\n`);
    });
  });

  common(
    program
      .command('status')
      .description('Show the daemon and its exports, or one export in detail')
      .argument('[export]', 'export name'),
  ).action(async (exportName: string | undefined, o: CommonOptions) => {
    await withClient(o, async (c) => {
      if (exportName !== undefined) {
        const r = await c.call<ExportStatus>('export.status', { export: exportName });
        if (o.json) printJson(r);
        else printExportStatus(r);
        return;
      }
      const daemon = await c.call<DaemonStatus>('daemon.status');
      const list = await c.call<{ exports: { name: string }[] }>('export.list');
      const exports: ExportStatus[] = [];
      for (const e of list.exports) {
        try {
          exports.push(await c.call<ExportStatus>('export.status', { export: e.name }));
        } catch {
          // removed meanwhile
        }
      }
      if (o.json) {
        printJson({ daemon, exports });
        return;
      }
      process.stdout.write(
        `devfilter ${daemon.version}, pid ${daemon.pid}, up ${formatDuration(daemon.uptimeSeconds)}, ` +
          `${daemon.connections} NBD connection(s)` +
          (daemon.tls !== undefined && daemon.tls.mode !== 'off'
            ? ` (${daemon.tls.connections} over TLS, tls ${daemon.tls.mode})`
            : '') +
          `, control ${daemon.controlSocket ?? '-'}\n`,
      );
      process.stdout.write(`filter types: ${daemon.filterTypes.join(', ') || 'none'}\n\n`);
      process.stdout.write(
        exports.length === 0
          ? 'no exports\n'
          : table(
              [
                'EXPORT',
                'SIZE',
                'MODE',
                'IN-FLIGHT',
                'CHANGES',
                'FILTERS (top → bottom)',
                'BACKEND',
              ],
              exports.map((e) => [
                e.name,
                formatSize(e.size),
                e.readOnly ? 'ro' : 'rw',
                String(e.stack.inFlight),
                String(e.stack.changes),
                e.filters.map((f) => f.name).join(',') || '-',
                e.backend,
              ]),
            ),
      );
    });
  });

  const exp = program
    .command('export')
    .description('List the exports of a running daemon, or show one');
  common(exp.command('list').description('list the exports')).action(async (o: CommonOptions) => {
    await withClient(o, async (c) => {
      type Row = {
        name: string;
        size: number;
        readOnly: boolean;
        filters: string[];
        backend: string;
        description: string | null;
      };
      const r = await c.call<{ exports: Row[] }>('export.list');
      if (o.json) printJson(r);
      else if (r.exports.length === 0) process.stdout.write('no exports\n');
      else {
        process.stdout.write(
          table(
            ['EXPORT', 'SIZE', 'MODE', 'FILTERS', 'BACKEND'],
            r.exports.map((e) => [
              e.name,
              formatSize(e.size),
              e.readOnly ? 'ro' : 'rw',
              e.filters.join(',') || '-',
              e.backend,
            ]),
          ),
        );
      }
    });
  });
  common(
    exp
      .command('status')
      .description('show one export: device, stack state and filters')
      .argument('<export>', 'export name'),
  ).action(async (exportName: string, o: CommonOptions) => {
    await withClient(o, async (c) => {
      const r = await c.call<ExportStatus>('export.status', { export: exportName });
      if (o.json) printJson(r);
      else printExportStatus(r);
    });
  });

  common(
    program
      .command('events')
      .description(
        'Print filter events (created, removed, filter-specific) as they happen, until interrupted',
      ),
  ).action(async (o: CommonOptions) => {
    await withClient(o, async (c) => {
      c.on('notification', (method, params) => {
        if (o.json) {
          process.stdout.write(JSON.stringify({ method, params }) + '\n');
          return;
        }
        if (method === 'events.dropped') {
          process.stdout.write(
            `(${(params as { count: number }).count} event(s) dropped: not reading fast enough)\n`,
          );
          return;
        }
        const e = params as {
          time: string;
          export: string;
          filter?: string;
          event: string;
          data?: unknown;
        };
        const where = e.filter === undefined ? e.export : `${e.export}/${e.filter}`;
        process.stdout.write(
          `${e.time}  ${where}  ${e.event}${e.data === undefined ? '' : '  ' + JSON.stringify(e.data)}\n`,
        );
      });
      await c.call('events.subscribe');
      await new Promise<void>((done) => {
        c.once('close', done);
        process.once('SIGINT', done);
        process.once('SIGTERM', done);
      });
    });
  });
}

interface DaemonStatus {
  version: string;
  pid: number;
  uptimeSeconds: number;
  connections: number;
  /** The NBD server's TLS mode and connections over TLS (daemons that know TLS). */
  tls?: { mode: string; connections: number };
  controlSocket: string | null;
  filterTypes: string[];
}

interface ExportStatus {
  name: string;
  description: string | null;
  backend: string;
  size: number;
  readOnly: boolean;
  blockSize: { minimum: number; preferred: number; maximum: number };
  caps: Record<string, boolean>;
  stack: { inFlight: number; held: number; changes: number; lastPauseMs: number };
  filters: (FilterSummary & { status: unknown })[];
}

function printExportStatus(r: ExportStatus): void {
  const caps = Object.entries(r.caps)
    .filter(([, v]) => v)
    .map(([k]) => k)
    .join(',');
  process.stdout.write(
    [
      `export:     ${r.name}${r.description ? ` (${r.description})` : ''}`,
      `backend:    ${r.backend}`,
      `size:       ${formatSize(r.size)} (${r.size} bytes), ${r.readOnly ? 'read-only' : 'read-write'}`,
      `block size: min ${r.blockSize.minimum}, preferred ${r.blockSize.preferred}, max ${r.blockSize.maximum}`,
      `caps:       ${caps || '-'}`,
      `stack:      ${r.stack.inFlight} in flight, ${r.stack.held} held, ${r.stack.changes} change(s), last pause ${r.stack.lastPauseMs.toFixed(1)} ms`,
      '',
    ].join('\n'),
  );
  process.stdout.write(filterTable(r.filters));
}

function schemaType(s: Record<string, unknown>): string {
  if (Array.isArray(s.enum)) return s.enum.map((v) => JSON.stringify(v)).join('|');
  if (typeof s.type === 'string')
    return s.type === 'array' && typeof s.items === 'object' && s.items !== null
      ? `${schemaType(s.items as Record<string, unknown>)}[]`
      : s.type;
  if (Array.isArray(s.type)) return s.type.join('|');
  return 'any';
}
