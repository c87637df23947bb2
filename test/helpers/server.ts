/**
 * Test fixtures: an in-process NBD server over memory or file backends on a temporary unix
 * socket, and a `devfilter serve` child process for end-to-end and crash tests.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pino } from 'pino';
import type { Device } from '../../src/core/device.js';
import { MemoryBackend } from '../../src/backends/memory.js';
import { ExportTable, type NbdExport } from '../../src/nbd/exports.js';
import { NbdServer, type NbdServerOptions } from '../../src/nbd/server.js';

export const REPO_ROOT = new URL('../../..', import.meta.url).pathname;
export const CLI = join(REPO_ROOT, 'dist', 'src', 'cli', 'main.js');

export function tempDir(prefix = 'devfilter-test-'): { path: string; cleanup: () => void } {
  const path = mkdtempSync(join(tmpdir(), prefix));
  return { path, cleanup: () => rmSync(path, { recursive: true, force: true }) };
}

export interface TestServer {
  server: NbdServer;
  socket: string;
  table: ExportTable;
  /** nbd+unix URI of an export. */
  uri(exportName?: string): string;
  close(): Promise<void>;
}

/** Starts an in-process server; by default one 64 MiB memory export named "mem" (also the default). */
export async function startTestServer(
  exports: Array<Omit<NbdExport, 'device'> & { device?: Device; size?: number }> = [
    { name: 'mem' },
  ],
  options: Partial<Omit<NbdServerOptions, 'exports' | 'logger'>> = {},
): Promise<TestServer> {
  const dir = tempDir();
  const table = new ExportTable();
  for (const e of exports) {
    const device = e.device ?? new MemoryBackend({ size: e.size ?? 64 * 1024 * 1024 });
    table.add({ ...e, device });
  }
  if (exports.length > 0) table.setDefault(exports[0]!.name);
  const logger = pino({ level: process.env.DEVFILTER_TEST_LOG ?? 'silent' });
  const server = new NbdServer({ exports: table, logger, ...options });
  const socket = join(dir.path, 'nbd.sock');
  await server.listen({ path: socket });
  return {
    server,
    socket,
    table,
    uri: (name = exports[0]?.name ?? '') =>
      `nbd+unix:///${encodeURIComponent(name)}?socket=${socket}`,
    close: async () => {
      await server.close();
      dir.cleanup();
    },
  };
}

/** Opens a raw socket to a unix path, for tests that speak the protocol byte by byte. */
export function connectRaw(path: string): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const s = net.connect(path);
    s.once('connect', () => resolve(s));
    s.once('error', reject);
  });
}

export interface DaemonProcess {
  child: ChildProcess;
  socket: string;
  uri(exportName?: string): string;
  stderr(): string;
  /** SIGTERM and wait for exit; resolves with the exit code. */
  stop(): Promise<number | null>;
  kill9(): Promise<void>;
}

/** Runs `devfilter serve ARGS --socket <tmp>` and waits until the socket accepts connections. */
export async function spawnDaemon(
  args: string[],
  opts: { socket?: string; env?: NodeJS.ProcessEnv; cwd?: string } = {},
): Promise<DaemonProcess> {
  const dir = tempDir();
  const socket = opts.socket ?? join(dir.path, 'nbd.sock');
  // A daemon of its own gets a control socket of its own: the default path is one per
  // machine, and test files run side by side.
  const chosen =
    ['--control', '--no-control', '--config', '-c'].some((o) => args.includes(o)) ||
    opts.env?.DEVFILTER_CONTROL !== undefined ||
    process.env.DEVFILTER_CONTROL !== undefined;
  const control = chosen ? [] : ['--control', join(dir.path, 'control.sock')];
  const child = spawn(
    process.execPath,
    [CLI, 'serve', '--socket', socket, '--log-level', 'info', ...control, ...args],
    {
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...process.env, ...opts.env },
      ...(opts.cwd !== undefined ? { cwd: opts.cwd } : {}),
    },
  );
  let err = '';
  child.stderr!.on('data', (d: Buffer) => (err += d.toString()));
  child.stdout!.resume();
  const exited = new Promise<number | null>((resolve) =>
    child.once('exit', (code) => resolve(code)),
  );
  const deadline = Date.now() + 60_000;
  for (;;) {
    if (child.exitCode !== null)
      throw new Error(`devfilter serve exited with ${child.exitCode}: ${err}`);
    if (existsSync(socket) && (await canConnect(socket))) break;
    if (Date.now() > deadline) {
      child.kill('SIGKILL');
      throw new Error(`devfilter serve did not start: ${err}`);
    }
    await new Promise((r) => setTimeout(r, 25));
  }
  return {
    child,
    socket,
    uri: (name = '') => `nbd+unix:///${encodeURIComponent(name)}?socket=${socket}`,
    stderr: () => err,
    stop: async () => {
      child.kill('SIGTERM');
      const code = await exited;
      dir.cleanup();
      return code;
    },
    kill9: async () => {
      child.kill('SIGKILL');
      await exited;
    },
  };
}

export function canConnect(path: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.connect(path);
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}
