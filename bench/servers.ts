/**
 * The servers under test, all on the same file: devfilter (no filter), nbdkit's file plugin,
 * qemu-nbd (raw), and devfilter with one filter. Each is started fresh for a round of fio
 * jobs and stopped after it, so only one server runs at a time.
 */
import { spawn } from 'node:child_process';
import { cpSync, existsSync, mkdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { canConnect, run, sleep, track, which } from './proc.js';

export const REPO_ROOT = fileURLToPath(new URL('../..', import.meta.url)).replace(/\/$/, '');

/** Where the devfilter under test lives: the build in dist/, or a snapshot of it. */
export const paths = {
  root: REPO_ROOT,
  get cli(): string {
    return join(this.root, 'dist', 'src', 'cli', 'main.js');
  },
  get launcher(): string {
    return join(this.root, 'dist', 'bench', 'serve-filtered.js');
  },
  get benchFilterModule(): string {
    return join(this.root, 'dist', 'bench', 'noop-filters.js');
  },
  get builtinFilters(): string {
    return join(this.root, 'dist', 'src', 'filters', 'index.js');
  },
};

/**
 * Copies the build (dist/src, dist/bench, package.json) to `dir` and runs devfilter from
 * there, so that a rebuild of dist/ by someone else while the benchmark runs cannot change the
 * code under test halfway. `dir` must lie inside the repository, where Node still finds
 * node_modules by walking up: dist/bench-snapshot-PID/, which git and eslint ignore.
 */
export function useSnapshot(dir: string): void {
  mkdirSync(dir, { recursive: true });
  cpSync(join(REPO_ROOT, 'package.json'), join(dir, 'package.json'));
  cpSync(join(REPO_ROOT, 'dist', 'src'), join(dir, 'dist', 'src'), { recursive: true });
  cpSync(join(REPO_ROOT, 'dist', 'bench'), join(dir, 'dist', 'bench'), { recursive: true });
  paths.root = dir;
}
export const EXPORT_NAME = 'bench';
/** The launcher prints this line once its filters are attached. */
export const LAUNCHER_READY = 'devfilter-bench: ready';

export type ServerKind = 'devfilter' | 'peer' | 'filter';

export interface FilterSpec {
  type: string;
  args: Record<string, unknown>;
  /** Types defined by the benchmark itself (bench/noop-filters.ts), loaded as a filter module. */
  benchModule: boolean;
}

export interface ServerDef {
  id: string;
  kind: ServerKind;
  /** What a reader needs to know (defaults, threads, cache modes). */
  notes: string;
  filter?: FilterSpec;
  /** Why it cannot run here, or undefined. */
  unavailable?: string;
}

export interface StartContext {
  file: string;
  dir: string;
  /** Directory for `node --cpu-prof`, when profiling devfilter. */
  profileDir?: string;
  profileName?: string;
  attach: AttachMethod;
}

export interface RunningServer {
  pid: number;
  uri: string;
  /** The exact command lines that started (and configured) the server. */
  commands: string[][];
  stderr(): string;
  stop(): Promise<void>;
}

export type AttachMethod = 'control' | 'launcher';

export interface DevfilterCli {
  /** `devfilter filter create … --control SOCK` and `serve --control` exist. */
  control: boolean;
  /** `serve --filter-module` exists. */
  filterModule: boolean;
}

/** Looks at what the devfilter CLI offers today (filters are being added concurrently). */
export async function probeDevfilterCli(): Promise<DevfilterCli> {
  const top = await run(process.execPath, [paths.cli, '--help'], { timeoutMs: 10_000 });
  const serve = await run(process.execPath, [paths.cli, 'serve', '--help'], { timeoutMs: 10_000 });
  const hasFilterCmd = /^\s+filter\b/m.test(top.stdout);
  return {
    control: hasFilterCmd && serve.stdout.includes('--control'),
    filterModule: serve.stdout.includes('--filter-module'),
  };
}

export const NBDKIT_NOTE =
  'nbdkit file plugin, default threads (16 per connection; the file plugin is PARALLEL), default cache';
export const QEMU_NOTE =
  'qemu-nbd raw, --cache=writeback --aio=threads (qemu-nbd defaults; io_uring is no faster on tmpfs), -e 8 -t';

export function peerServers(): ServerDef[] {
  const nbdkit = which('nbdkit');
  const qemu = which('qemu-nbd');
  return [
    {
      id: 'nbdkit',
      kind: 'peer',
      notes: NBDKIT_NOTE,
      ...(nbdkit ? {} : { unavailable: 'nbdkit is not installed' }),
    },
    {
      id: 'nbdkit-t2',
      kind: 'peer',
      notes: 'nbdkit file plugin with --threads=2 (one per core); not run by default',
      ...(nbdkit ? {} : { unavailable: 'nbdkit is not installed' }),
    },
    {
      id: 'qemu-nbd',
      kind: 'peer',
      notes: QEMU_NOTE,
      ...(qemu ? {} : { unavailable: 'qemu-nbd is not installed' }),
    },
  ];
}

function peerCommand(id: string, file: string, socket: string): string[] {
  switch (id) {
    case 'nbdkit':
      return ['nbdkit', '--foreground', '--exit-with-parent', '--unix', socket, 'file', file];
    case 'nbdkit-t2':
      return [
        'nbdkit',
        '--foreground',
        '--exit-with-parent',
        '--threads=2',
        '--unix',
        socket,
        'file',
        file,
      ];
    case 'qemu-nbd':
      return [
        'qemu-nbd',
        '-f',
        'raw',
        `--socket=${socket}`,
        '-e',
        '8',
        '-t',
        '--cache=writeback',
        '--aio=threads',
        file,
      ];
    default:
      throw new Error(`unknown server ${id}`);
  }
}

function nodeArgs(ctx: StartContext): string[] {
  if (ctx.profileDir === undefined) return [];
  return [
    '--cpu-prof',
    `--cpu-prof-dir=${ctx.profileDir}`,
    ...(ctx.profileName ? [`--cpu-prof-name=${ctx.profileName}`] : []),
  ];
}

/** Spawns a server command and waits until its unix socket accepts connections. */
async function spawnServer(
  cmd: string[],
  socket: string,
  readyLine?: string,
): Promise<RunningServer> {
  rmSync(socket, { force: true });
  const child = track(
    spawn(cmd[0]!, cmd.slice(1), { stdio: ['ignore', 'pipe', 'pipe'], cwd: REPO_ROOT }),
  );
  let out = '';
  child.stdout!.on('data', (d: Buffer) => {
    if (out.length < 64_000) out += d.toString();
  });
  let err = '';
  child.stderr!.on('data', (d: Buffer) => {
    err += d.toString();
    if (err.length > 64_000) err = err.slice(-32_000);
  });
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  const spawnError = new Promise<Error>((resolve) => child.once('error', resolve));
  const stop = async (): Promise<void> => {
    if (child.exitCode !== null || child.signalCode !== null) return;
    child.kill('SIGTERM');
    const timer = setTimeout(() => child.kill('SIGKILL'), 20_000);
    await exited;
    clearTimeout(timer);
  };
  const deadline = Date.now() + 20_000;
  for (;;) {
    const failed = await Promise.race([spawnError, sleep(20).then(() => undefined)]);
    if (failed) throw new Error(`${cmd[0]} could not start: ${failed.message}`);
    if (child.exitCode !== null || child.signalCode !== null) {
      throw new Error(
        `${cmd.join(' ')} exited with ${child.exitCode ?? child.signalCode}: ${err.trim().slice(-800)}`,
      );
    }
    const ready =
      readyLine === undefined
        ? existsSync(socket) && (await canConnect(socket))
        : out.includes(readyLine);
    if (ready) break;
    if (Date.now() > deadline) {
      await stop();
      throw new Error(
        `${cmd.join(' ')} did not listen on ${socket} within 20 s: ${err.trim().slice(-800)}`,
      );
    }
  }
  return {
    pid: child.pid!,
    uri: `nbd+unix:///?socket=${socket}`,
    commands: [cmd],
    stderr: () => err,
    stop,
  };
}

export async function startServer(def: ServerDef, ctx: StartContext): Promise<RunningServer> {
  const socket = join(ctx.dir, `${def.id.replace(/[^A-Za-z0-9.-]/g, '_')}.sock`);
  if (def.kind === 'peer') return spawnServer(peerCommand(def.id, ctx.file, socket), socket);

  const exportSpec = `${EXPORT_NAME}=file:${ctx.file}`;
  const node = [process.execPath, ...nodeArgs(ctx)];
  if (def.kind === 'devfilter' || def.filter === undefined) {
    return spawnServer(
      [
        ...node,
        paths.cli,
        'serve',
        '--export',
        exportSpec,
        '--socket',
        socket,
        '--log-level',
        'warn',
      ],
      socket,
    );
  }
  const f = def.filter;
  if (ctx.attach === 'control') {
    // One control socket per server: with --interleave several daemons are up at once.
    const control = join(ctx.dir, `${def.id.replace(/[^A-Za-z0-9.-]/g, '_')}.control.sock`);
    const serve = [
      ...node,
      paths.cli,
      'serve',
      '--export',
      exportSpec,
      '--socket',
      socket,
      '--control',
      control,
      '--log-level',
      'warn',
    ];
    if (f.benchModule) serve.push('--filter-module', paths.benchFilterModule);
    const server = await spawnServer(serve, socket);
    const args = Object.keys(f.args).length > 0 ? ['--args-json', JSON.stringify(f.args)] : [];
    const create = [
      process.execPath,
      paths.cli,
      'filter',
      'create',
      EXPORT_NAME,
      f.type,
      ...args,
      '--control',
      control,
    ];
    const r = await run(create[0]!, create.slice(1), { timeoutMs: 20_000 });
    if (r.code !== 0) {
      await server.stop();
      throw new Error(
        `${create.slice(1).join(' ')} failed (${r.code}): ${(r.stderr || r.stdout).trim().slice(-800)}`,
      );
    }
    server.commands.push(create);
    return server;
  }
  // The launcher (older builds without a control plane): the same daemon (startDaemon) with
  // filters created through its DeviceManager.
  const launcher = [
    ...node,
    paths.launcher,
    '--export',
    exportSpec,
    '--socket',
    socket,
    '--filter',
    `${f.type}=${JSON.stringify(f.args)}`,
  ];
  if (f.benchModule) launcher.push('--filter-module', paths.benchFilterModule);
  return spawnServer(launcher, socket, LAUNCHER_READY);
}
