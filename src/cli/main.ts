#!/usr/bin/env node
/**
 * The `devfilter` command: `serve` and `demo` run a daemon; `filter …`, `status`, `export …`
 * and `events` talk to a running one over its control socket.
 *
 * Exit codes: 0 success, 1 runtime failure (or the daemon failed the request), 2 usage error
 * or invalid arguments, 3 not found, 4 cannot reach the daemon.
 */
import { existsSync, statSync } from 'node:fs';
import { homedir } from 'node:os';
import { join, relative, resolve } from 'node:path';
import { Command, CommanderError, InvalidArgumentError, Option } from 'commander';
import { parseSize, formatSize } from '../core/size.js';
import { builtinControlPath, CONTROL_ENV } from '../control/socket-path.js';
import { FILTER_OPTION_HELP, parseFilterOption } from './args.js';
import type { DaemonOptions } from './daemon.js';
import { ConfigError } from './errors.js';
import {
  EXPORT_SPEC_HELP,
  parseExportSpec,
  type ExportSpec,
  type FilterSpec,
} from './export-spec.js';
import { addClientCommands } from './filter-commands.js';
import { addSnapshotCommands } from './snapshot-commands.js';
import { addBackupCommands } from './backup-commands.js';
import { addMirrorCommands } from './mirror-commands.js';
import { addCdpCommands } from './cdp-commands.js';
import { addInterposeCommands } from './interpose-commands.js';
import { addAuditCommands } from './audit-commands.js';
import { parseListenAddress } from './listen-address.js';
import {
  parseTlsMode,
  resolveTlsSettings,
  tlsSettingsFromFlags,
  TLS_OPTION_HELP as TLS_HELP,
  type PartialTlsSettings,
} from './tls-options.js';
import type { Level } from 'pino';
import { EXIT_CODES_HELP, EXIT_FAILURE, EXIT_USAGE, ExitError, UsageError } from './output.js';
import { VERSION } from './version.js';
import { makeDirsSync } from '../core/make-dirs.js';

function collect<T>(parse: (v: string) => T) {
  return (value: string, previous: T[] = []): T[] => {
    try {
      return [...previous, parse(value)];
    } catch (err) {
      throw new InvalidArgumentError((err as Error).message);
    }
  };
}

function sizeArg(value: string): number {
  try {
    return parseSize(value);
  } catch (err) {
    throw new InvalidArgumentError((err as Error).message);
  }
}

// The daemon's modules (NBD server, backends, filters, pino, yaml) are loaded only by the
// commands that run a daemon, so that client commands start quickly.
const LOG_LEVELS: Level[] = ['fatal', 'error', 'warn', 'info', 'debug', 'trace'];
const createLogger = async (level: string): Promise<import('pino').Logger> =>
  (await import('./logger.js')).createLogger(level);

const logLevelOption = (): Option =>
  new Option('--log-level <level>', 'log verbosity (JSON logs on stderr)')
    .choices(LOG_LEVELS)
    .default('info');

function program(): Command {
  const cmd = new Command('devfilter')
    .description('Block-device filters in user space, served over NBD')
    .version(VERSION)
    .showHelpAfterError()
    .exitOverride()
    .addHelpText('after', EXIT_CODES_HELP);

  cmd
    .command('serve')
    .description(
      'Serve exports over NBD. Without exports or a config file it runs the demo (see "devfilter demo").',
    )
    .option(
      '-e, --export <spec>',
      `an export: ${EXPORT_SPEC_HELP} (repeatable)`,
      collect(parseExportSpec),
    )
    .option('-c, --config <file>', 'read listeners and exports from a YAML or JSON config file')
    .option('-s, --socket <path>', 'listen on a unix socket')
    .option(
      '-l, --listen <host:port>',
      'listen on TCP (repeatable; default 127.0.0.1:10809 when nothing else is given)',
      collect(parseListenAddress),
    )
    .option(
      '--default-export <name>',
      'the export a client gets by asking for the empty name (default: the only export)',
    )
    .option('-r, --read-only', 'serve every export read-only', false)
    .option('--stdio', 'serve one client on stdin/stdout (a connected socket), then exit', false)
    .option('--no-list', 'refuse to list exports to clients (NBD_OPT_LIST)')
    .option(
      '--control <path>',
      `the control socket, mode 0600 (default: $${CONTROL_ENV}, else ${builtinControlPath()})`,
    )
    .option('--no-control', 'no control socket: the filter stacks are fixed at start')
    .option(
      '--control-group <group>',
      'let members of GROUP (name or gid) connect to the control socket (mode 0660) for lists and status only; changes stay with the owner',
    )
    .option(
      '--filter-module <spec>',
      'load filter types from an ES module path or an installed package (repeatable)',
      collect(String),
    )
    .option(
      '-f, --filter <spec>',
      `put a filter on an export at start: ${FILTER_OPTION_HELP}; the key name names it (repeatable; top → bottom, below the config file's)`,
      collect(parseFilterOption),
    )
    .option(
      '--metrics <host:port>',
      'serve Prometheus metrics of the stats filters over HTTP',
      (v: string) => {
        try {
          return parseListenAddress(v);
        } catch (err) {
          throw new InvalidArgumentError((err as Error).message);
        }
      },
    )
    .option('--tls <mode>', TLS_HELP.mode, parseTlsMode)
    .option('--tls-certificates <dir>', TLS_HELP.certificates)
    .option('--tls-cert <file>', TLS_HELP.cert)
    .option('--tls-key <file>', TLS_HELP.key)
    .option('--tls-ca <file>', TLS_HELP.ca)
    .option('--tls-verify-peer', TLS_HELP.verifyPeer)
    .option('--tls-psk <file>', TLS_HELP.psk)
    .addOption(logLevelOption())
    .addHelpText(
      'after',
      `
Socket activation: when started with LISTEN_PID/LISTEN_FDS set (systemd, or libnbd's
"nbdinfo -- [ devfilter serve ... ]"), the inherited sockets are served too.

The control socket takes the commands of "devfilter filter …", "devfilter status" and
"devfilter events". With the default path, a second daemon whose default socket is taken runs
without one (and says so); give each daemon its own --control PATH to run several side by side.
--stdio runs without a control socket unless --control is given.

Examples:
  devfilter serve --export disk=file:/var/lib/disk.img --socket /run/devfilter.sock
  devfilter serve --export scratch=memory:1G --listen 127.0.0.1:10809 --filter scratch:stats
  devfilter serve --config /etc/devfilter.yaml --control /run/devfilter/disk.sock
  devfilter serve -e disk=memory:1G --filter-module ./my-filter.js --filter disk:my-filter:level=3`,
    )
    .action(async (o) => {
      if (o.export === undefined && o.config === undefined) {
        await runDemo({ logLevel: o.logLevel });
        return;
      }
      const exports: ExportSpec[] = [...(o.export ?? [])];
      let socket: string | undefined = o.socket;
      let listen: { host: string; port: number }[] = o.listen ?? [];
      let defaultExport: string | undefined = o.defaultExport;
      const filterModules: string[] = [...(o.filterModule ?? [])];
      // --control PATH, --no-control (false), or nothing (undefined).
      let control: string | false | undefined = o.control === true ? undefined : o.control;
      let tlsFromConfig: PartialTlsSettings | undefined;
      if (o.config !== undefined) {
        const { loadConfig } = await import('./config.js');
        const config = await loadConfig(o.config);
        exports.push(...config.exports);
        socket ??= config.socket;
        if (listen.length === 0) listen = config.listen.map(parseListenAddress);
        defaultExport ??= config.defaultExport;
        control ??= config.control;
        filterModules.unshift(...config.filterModules);
        tlsFromConfig = config.tls;
      }
      const tls = resolveTlsSettings(
        tlsFromConfig,
        tlsSettingsFromFlags(o),
        exports.filter((e) => e.tls === 'required').map((e) => e.name),
      );
      const names = new Set<string>();
      for (const e of exports) {
        if (names.has(e.name))
          throw new UsageError(`export ${JSON.stringify(e.name)} is defined twice`);
        names.add(e.name);
      }
      for (const { export: name, filter } of (o.filter ?? []) as {
        export: string;
        filter: FilterSpec;
      }[]) {
        const target = exports.find((e) => e.name === name);
        if (!target)
          throw new UsageError(
            `--filter ${name}:${filter.type}: no export named ${JSON.stringify(name)}`,
          );
        (target.filters ??= []).push(filter);
      }
      if (defaultExport !== undefined && !names.has(defaultExport)) {
        throw new UsageError(`--default-export: no export named ${JSON.stringify(defaultExport)}`);
      }
      const activated =
        process.env.LISTEN_FDS !== undefined && Number(process.env.LISTEN_PID) === process.pid;
      if (socket === undefined && listen.length === 0 && !o.stdio && !activated) {
        listen = [{ host: '127.0.0.1', port: 10809 }];
      }
      await runDaemon({
        exports,
        ...(defaultExport !== undefined ? { defaultExport } : {}),
        ...(socket !== undefined ? { socket: resolve(socket) } : {}),
        listen,
        stdio: o.stdio,
        readOnly: o.readOnly,
        allowList: o.list,
        logger: await createLogger(o.logLevel),
        filterModules: filterModules.map((m) => (m.startsWith('.') ? resolve(m) : m)),
        ...controlOptions(control, o.stdio === true),
        ...(o.controlGroup !== undefined
          ? { controlGroup: await groupId(o.controlGroup as string) }
          : {}),
        ...(o.metrics !== undefined
          ? { metrics: o.metrics as { host: string; port: number } }
          : {}),
        ...(tls !== undefined ? { tls } : {}),
      });
    });

  addClientCommands(cmd);
  addSnapshotCommands(cmd);
  addBackupCommands(cmd);
  addMirrorCommands(cmd);
  addCdpCommands(cmd);
  addInterposeCommands(cmd);
  addAuditCommands(cmd);

  cmd
    .command('demo')
    .description(
      'Create a sparse demo image, serve it, and print commands to try it with real clients',
    )
    .option('--data-dir <dir>', 'where the image and socket live', defaultDataDir())
    .option('--size <size>', 'size of the demo image when it is created', sizeArg, 1024 ** 3)
    .option('-l, --listen <host:port>', 'also listen on TCP', '127.0.0.1:10809')
    .option('--no-tcp', 'listen on the unix socket only')
    .addOption(logLevelOption().default('warn'))
    .action(async (o) => {
      await runDemo({
        dataDir: o.dataDir,
        size: o.size,
        listen: o.tcp ? o.listen : undefined,
        logLevel: o.logLevel,
      });
    });
  return cmd;
}

/** A group given by name (looked up in /etc/group) or number. */
async function groupId(group: string): Promise<number> {
  if (/^\d+$/.test(group)) return Number(group);
  const { readFile } = await import('node:fs/promises');
  const text = await readFile('/etc/group', 'utf8').catch(() => '');
  for (const line of text.split('\n')) {
    const [name, , gid] = line.split(':');
    if (name === group && gid !== undefined && /^\d+$/.test(gid)) return Number(gid);
  }
  throw new UsageError(`--control-group: no group named ${JSON.stringify(group)}`);
}

/** Where the daemon's control socket goes: asked for, $DEVFILTER_CONTROL, or the default. */
function controlOptions(
  control: string | false | undefined,
  stdio: boolean,
): Pick<DaemonOptions, 'control' | 'controlIsDefault'> {
  if (control === false) return {};
  if (control !== undefined) return { control: resolve(control) };
  const fromEnv = process.env[CONTROL_ENV];
  if (fromEnv !== undefined && fromEnv !== '') return { control: resolve(fromEnv) };
  if (stdio) return {}; // one short-lived daemon per client: no default socket to fight over
  return { control: builtinControlPath(), controlIsDefault: true };
}

function defaultDataDir(): string {
  const base = process.env.XDG_DATA_HOME ?? join(homedir(), '.local', 'share');
  return join(base, 'devfilter', 'demo');
}

async function runDaemon(opts: DaemonOptions): Promise<void> {
  const { startDaemon, stopOnSignals } = await import('./daemon.js');
  const daemon = await startDaemon(opts);
  stopOnSignals(daemon, opts.logger);
  await daemon.stopped;
}

async function runDemo(o: {
  dataDir?: string;
  size?: number;
  listen?: string | undefined;
  logLevel: string;
}): Promise<void> {
  const dataDir = resolve(o.dataDir ?? defaultDataDir());
  makeDirsSync(dataDir);
  const image = join(dataDir, 'demo.img');
  const socket = join(dataDir, 'nbd.sock');
  const size = o.size ?? 1024 ** 3;
  const logger = await createLogger(o.logLevel);
  const { startDaemon, stopOnSignals } = await import('./daemon.js');
  const tcp = o.listen === undefined ? [] : [parseListenAddress(o.listen)];
  const opts: DaemonOptions = {
    exports: [
      {
        name: 'demo',
        description: 'devfilter demo image',
        backend: { type: 'file', path: image, create: size },
      },
    ],
    defaultExport: 'demo',
    socket,
    listen: tcp,
    stdio: false,
    readOnly: false,
    allowList: true,
    logger,
    ...controlOptions(undefined, false),
  };
  let daemon;
  try {
    daemon = await startDaemon(opts);
  } catch (err) {
    if ((err as { code?: string }).code !== 'EADDRINUSE' || tcp.length === 0) throw err;
    process.stderr.write(`note: ${o.listen} is in use; serving on the unix socket only\n`);
    daemon = await startDaemon({ ...opts, listen: [] });
  }
  const uri = `nbd+unix:///demo?socket=${socket}`;
  const realSize = formatSize(statSync(image).size);
  const self = howToRunMe();
  const lines = [
    `devfilter demo: serving export "demo" (${realSize} sparse image ${image})`,
    `  unix socket: ${socket}`,
    ...daemon.tcp.map((t) => `  TCP:         nbd://${t.host}:${t.port}/demo`),
    ...(daemon.control !== undefined ? [`  control:     ${daemon.control.path}`] : []),
    '',
    'Try it from another terminal:',
    `  nbdinfo '${uri}'`,
    `  nbdinfo --map '${uri}'`,
    `  qemu-io -f raw -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M' '${uri}'`,
    `  qemu-img convert -p -O qcow2 '${uri}' /tmp/demo-copy.qcow2`,
    `  nbdcopy '${uri}' /tmp/demo-copy.raw`,
    ...(daemon.control !== undefined
      ? [
          `  ${self} filter types --control ${daemon.control.path}`,
          `  ${self} filter create demo stats --control ${daemon.control.path}`,
          `  ${self} snapshot create first --export demo --store ${join(dataDir, 'snapshots')} --control ${daemon.control.path}`,
          `  ${self} status --control ${daemon.control.path}`,
        ]
      : []),
    ...(daemon.tcp.length > 0
      ? [
          `  nbd-client -N demo ${daemon.tcp[0]!.host} ${daemon.tcp[0]!.port} /dev/nbd0   # as root, after modprobe nbd`,
        ]
      : []),
    '',
    'Press Ctrl-C to stop (connections are drained and the image is flushed first).',
  ];
  process.stdout.write(lines.join('\n') + '\n');
  stopOnSignals(daemon, logger);
  await daemon.stopped;
}

/** "devfilter" when it is on PATH (installed), else the exact command that runs this CLI. */
function howToRunMe(): string {
  const onPath = (process.env.PATH ?? '')
    .split(':')
    .some((dir) => dir !== '' && existsSync(join(dir, 'devfilter')));
  if (onPath) return 'devfilter';
  const script = process.argv[1] ?? 'dist/src/cli/main.js';
  const rel = relative(process.cwd(), script);
  return `node ${rel.startsWith('..') ? script : rel}`;
}

async function main(argv: string[]): Promise<number> {
  try {
    await program().parseAsync(argv);
    return 0;
  } catch (err) {
    if (err instanceof ExitError) return err.exitCode; // reported already
    if (err instanceof CommanderError) {
      // Help and version end here with exit code 0; argument errors were already printed.
      return err.exitCode === 0 ? 0 : EXIT_USAGE;
    }
    if (err instanceof UsageError || err instanceof ConfigError) {
      process.stderr.write(`devfilter: ${err.message}\n`);
      return EXIT_USAGE;
    }
    process.stderr.write(`devfilter: ${(err as Error).message}\n`);
    return EXIT_FAILURE;
  }
}

// `devfilter ... | head` closes the pipe early: that ends the output, it is not an error.
process.stdout.on('error', (err: NodeJS.ErrnoException) => {
  if (err.code === 'EPIPE') process.exit(0);
  throw err;
});
process.exitCode = await main(process.argv);
