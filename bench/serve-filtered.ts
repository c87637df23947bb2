/**
 * The benchmark's launcher for "devfilter with a filter": the daemon exactly as
 * `devfilter serve` starts it (startDaemon), with filters created through its DeviceManager
 * before the line "devfilter-bench: ready" is printed. It is used when the control plane
 * (`devfilter filter create … --control SOCK`) is not there yet, or for filter arguments the
 * CLI cannot spell. The request path is the daemon's own; only the way filters arrive differs.
 *
 *   node dist/bench/serve-filtered.js --export NAME=file:PATH --socket SOCK \
 *     [--filter TYPE[=JSON-ARGS]]... [--filter-module PATH]... [--log-level warn]
 *
 * The daemon's modules are loaded at run time through narrow local types, so that a change of
 * their signatures breaks this launcher (loudly, at run time) and never the project's build.
 */
import { resolve } from 'node:path';
import { parseArgs } from 'node:util';

const READY = 'devfilter-bench: ready';

interface Manager {
  createFilter(
    exportName: string,
    type: string,
    opts: { args?: Record<string, unknown> },
  ): Promise<unknown>;
}
interface Daemon {
  manager: Manager;
  stop(): Promise<void>;
  stopped: Promise<void>;
}
interface DaemonModule {
  startDaemon(opts: Record<string, unknown>): Promise<Daemon>;
  stopOnSignals(daemon: Daemon, log: unknown): void;
}
interface ExportSpecModule {
  parseExportSpec(text: string): { name: string };
}
interface LoggerModule {
  createLogger(level: string): unknown;
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      export: { type: 'string', multiple: true },
      socket: { type: 'string' },
      filter: { type: 'string', multiple: true },
      'filter-module': { type: 'string', multiple: true },
      'log-level': { type: 'string', default: 'warn' },
    },
  });
  if (!values.export?.length || values.socket === undefined) {
    throw new Error(
      'usage: serve-filtered --export NAME=file:PATH --socket SOCK [--filter TYPE[=JSON]]...',
    );
  }
  const src = new URL('../src/cli/', import.meta.url);
  const daemonMod = (await import(new URL('daemon.js', src).href)) as DaemonModule;
  const specMod = (await import(new URL('export-spec.js', src).href)) as ExportSpecModule;
  const loggerMod = (await import(new URL('logger.js', src).href)) as LoggerModule;

  const exports = values.export.map((e) => specMod.parseExportSpec(e));
  const logger = loggerMod.createLogger(values['log-level']!);
  const daemon = await daemonMod.startDaemon({
    exports,
    socket: resolve(values.socket),
    listen: [],
    stdio: false,
    readOnly: false,
    allowList: true,
    logger,
    filterModules: (values['filter-module'] ?? []).map((m) => resolve(m)),
  });
  daemonMod.stopOnSignals(daemon, logger);
  if (typeof daemon.manager?.createFilter !== 'function') {
    await daemon.stop();
    throw new Error('this devfilter has no DeviceManager.createFilter: cannot attach filters');
  }
  for (const f of values.filter ?? []) {
    const eq = f.indexOf('=');
    const type = eq < 0 ? f : f.slice(0, eq);
    const args = eq < 0 ? {} : (JSON.parse(f.slice(eq + 1)) as Record<string, unknown>);
    try {
      await daemon.manager.createFilter(exports[0]!.name, type, { args });
    } catch (err) {
      await daemon.stop();
      throw err;
    }
  }
  process.stdout.write(`${READY}\n`);
  await daemon.stopped;
}

main().catch((err: unknown) => {
  process.stderr.write(`serve-filtered: ${(err as Error).message}\n`);
  process.exitCode = 1;
});
