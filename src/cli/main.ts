#!/usr/bin/env node
/**
 * The `devfilter` command. Exit codes: 0 success, 1 runtime failure, 2 usage error.
 */
import { mkdirSync, statSync } from 'node:fs';
import { homedir } from 'node:os';
import { join, resolve } from 'node:path';
import { Command, CommanderError, InvalidArgumentError, Option } from 'commander';
import { parseSize, formatSize } from '../core/size.js';
import { loadConfig, ConfigError } from './config.js';
import { startDaemon, stopOnSignals, type DaemonOptions } from './daemon.js';
import { EXPORT_SPEC_HELP, parseExportSpec, type ExportSpec } from './export-spec.js';
import { parseListenAddress } from './listen-address.js';
import { createLogger, LOG_LEVELS } from './logger.js';

const EXIT_FAILURE = 1;
const EXIT_USAGE = 2;

class UsageError extends Error {}

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

const logLevelOption = (): Option =>
  new Option('--log-level <level>', 'log verbosity (JSON logs on stderr)').choices(LOG_LEVELS).default('info');

function program(): Command {
  const cmd = new Command('devfilter')
    .description('Block-device filters in user space, served over NBD')
    .version(process.env.npm_package_version ?? '0.1.0')
    .showHelpAfterError()
    .exitOverride();

  cmd
    .command('serve')
    .description(
      'Serve exports over NBD. Without exports or a config file it runs the demo (see "devfilter demo").',
    )
    .option('-e, --export <spec>', `an export: ${EXPORT_SPEC_HELP} (repeatable)`, collect(parseExportSpec))
    .option('-c, --config <file>', 'read listeners and exports from a YAML or JSON config file')
    .option('-s, --socket <path>', 'listen on a unix socket')
    .option('-l, --listen <host:port>', 'listen on TCP (repeatable; default 127.0.0.1:10809 when nothing else is given)', collect(parseListenAddress))
    .option('--default-export <name>', 'the export a client gets by asking for the empty name (default: the only export)')
    .option('-r, --read-only', 'serve every export read-only', false)
    .option('--stdio', 'serve one client on stdin/stdout (a connected socket), then exit', false)
    .option('--no-list', 'refuse to list exports to clients (NBD_OPT_LIST)')
    .addOption(logLevelOption())
    .addHelpText(
      'after',
      `
Socket activation: when started with LISTEN_PID/LISTEN_FDS set (systemd, or libnbd's
"nbdinfo -- [ devfilter serve ... ]"), the inherited sockets are served too.

Examples:
  devfilter serve --export disk=file:/var/lib/disk.img --socket /run/devfilter.sock
  devfilter serve --export scratch=memory:1G --listen 127.0.0.1:10809
  devfilter serve --config /etc/devfilter.yaml`,
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
      if (o.config !== undefined) {
        const config = await loadConfig(o.config);
        exports.push(...config.exports);
        socket ??= config.socket;
        if (listen.length === 0) listen = config.listen.map(parseListenAddress);
        defaultExport ??= config.defaultExport;
      }
      const names = new Set<string>();
      for (const e of exports) {
        if (names.has(e.name)) throw new UsageError(`export ${JSON.stringify(e.name)} is defined twice`);
        names.add(e.name);
      }
      if (defaultExport !== undefined && !names.has(defaultExport)) {
        throw new UsageError(`--default-export: no export named ${JSON.stringify(defaultExport)}`);
      }
      const activated = process.env.LISTEN_FDS !== undefined && Number(process.env.LISTEN_PID) === process.pid;
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
        logger: createLogger(o.logLevel),
      });
    });

  cmd
    .command('demo')
    .description('Create a sparse demo image, serve it, and print commands to try it with real clients')
    .option('--data-dir <dir>', 'where the image and socket live', defaultDataDir())
    .option('--size <size>', 'size of the demo image when it is created', sizeArg, 1024 ** 3)
    .option('-l, --listen <host:port>', 'also listen on TCP', '127.0.0.1:10809')
    .option('--no-tcp', 'listen on the unix socket only')
    .addOption(logLevelOption().default('warn'))
    .action(async (o) => {
      await runDemo({ dataDir: o.dataDir, size: o.size, listen: o.tcp ? o.listen : undefined, logLevel: o.logLevel });
    });
  return cmd;
}

function defaultDataDir(): string {
  const base = process.env.XDG_DATA_HOME ?? join(homedir(), '.local', 'share');
  return join(base, 'devfilter', 'demo');
}

async function runDaemon(opts: DaemonOptions): Promise<void> {
  const daemon = await startDaemon(opts);
  stopOnSignals(daemon, opts.logger);
  await daemon.stopped;
}

async function runDemo(o: { dataDir?: string; size?: number; listen?: string | undefined; logLevel: string }): Promise<void> {
  const dataDir = resolve(o.dataDir ?? defaultDataDir());
  mkdirSync(dataDir, { recursive: true });
  const image = join(dataDir, 'demo.img');
  const socket = join(dataDir, 'nbd.sock');
  const size = o.size ?? 1024 ** 3;
  const logger = createLogger(o.logLevel);
  const tcp = o.listen === undefined ? [] : [parseListenAddress(o.listen)];
  const opts: DaemonOptions = {
    exports: [{ name: 'demo', description: 'devfilter demo image', backend: { type: 'file', path: image, create: size } }],
    defaultExport: 'demo',
    socket,
    listen: tcp,
    stdio: false,
    readOnly: false,
    allowList: true,
    logger,
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
  const lines = [
    `devfilter demo: serving export "demo" (${realSize} sparse image ${image})`,
    `  unix socket: ${socket}`,
    ...daemon.tcp.map((t) => `  TCP:         nbd://${t.host}:${t.port}/demo`),
    '',
    'Try it from another terminal:',
    `  nbdinfo '${uri}'`,
    `  nbdinfo --map '${uri}'`,
    `  qemu-io -f raw -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M' '${uri}'`,
    `  qemu-img convert -p -O qcow2 '${uri}' /tmp/demo-copy.qcow2`,
    `  nbdcopy '${uri}' /tmp/demo-copy.raw`,
    ...(daemon.tcp.length > 0
      ? [`  nbd-client -N demo ${daemon.tcp[0]!.host} ${daemon.tcp[0]!.port} /dev/nbd0   # as root, after modprobe nbd`]
      : []),
    '',
    'Press Ctrl-C to stop (connections are drained and the image is flushed first).',
  ];
  process.stdout.write(lines.join('\n') + '\n');
  stopOnSignals(daemon, logger);
  await daemon.stopped;
}

async function main(argv: string[]): Promise<number> {
  try {
    await program().parseAsync(argv);
    return 0;
  } catch (err) {
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

process.exitCode = await main(process.argv);
