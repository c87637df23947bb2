/**
 * Running external programs from tests with a hard time limit: every child gets its own
 * process group, and on timeout the whole group is killed (so that a client that spawned a
 * server, like `nbdinfo -- [ CMD ]`, leaves nothing behind).
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { dirname } from 'node:path';
import type { TestContext } from 'node:test';
import type { DaemonProcess } from './server.js';
import { requireTools } from './tools.js';

export interface RunResult {
  /** Exit code, or null when the process was killed by a signal. */
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  timedOut: boolean;
  ms: number;
}

export interface RunOptions {
  /** Kill the process group after this long (default 60 s). */
  timeoutMs?: number;
  env?: NodeJS.ProcessEnv;
  cwd?: string;
  /** Written to stdin, which is then closed. Without it stdin is /dev/null. */
  input?: string | Buffer;
}

/** Runs `cmd args` (no shell) and resolves when it exits or is killed for taking too long. */
export function run(cmd: string, args: string[], opts: RunOptions = {}): Promise<RunResult> {
  const started = Date.now();
  const child = spawn(cmd, args, {
    stdio: [opts.input === undefined ? 'ignore' : 'pipe', 'pipe', 'pipe'],
    env: opts.env ?? process.env,
    cwd: opts.cwd,
    detached: true, // own process group, killed as a whole on timeout
  });
  let stdout = '';
  let stderr = '';
  child.stdout!.on('data', (d: Buffer) => (stdout += d.toString()));
  child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  if (opts.input !== undefined) {
    child.stdin!.on('error', () => {}); // the program may exit without reading its input
    child.stdin!.end(opts.input);
  }
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    killGroup(child, 'SIGKILL');
  }, opts.timeoutMs ?? 60_000);
  return new Promise((resolve) => {
    child.once('error', (err) => {
      clearTimeout(timer);
      resolve({
        code: null,
        signal: null,
        stdout,
        stderr: stderr + String(err),
        timedOut,
        ms: Date.now() - started,
      });
    });
    child.once('close', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stdout, stderr, timedOut, ms: Date.now() - started });
    });
  });
}

/** A one-line description of a result for assertion messages. */
export function describeResult(cmd: string, args: string[], r: RunResult): string {
  const status = r.timedOut
    ? `timed out after ${r.ms} ms`
    : r.signal
      ? `killed by ${r.signal}`
      : `exit ${r.code}`;
  return `${[cmd, ...args].map(shellQuote).join(' ')}: ${status}\n--- stdout:\n${r.stdout.slice(-4000)}\n--- stderr:\n${r.stderr.slice(-4000)}`;
}

/** Runs a command and throws (with its output) unless it exits 0 in time. */
export async function runOk(
  cmd: string,
  args: string[],
  opts: RunOptions = {},
): Promise<RunResult> {
  const r = await run(cmd, args, opts);
  if (r.code !== 0) throw new Error(describeResult(cmd, args, r));
  return r;
}

export function shellQuote(s: string): string {
  return /^[\w@%+=:,./-]+$/.test(s) ? s : `'${s.replace(/'/g, `'\\''`)}'`;
}

function killGroup(child: ChildProcess, signal: NodeJS.Signals): void {
  if (child.pid === undefined) return;
  try {
    process.kill(-child.pid, signal);
  } catch {
    try {
      child.kill(signal);
    } catch {
      // already gone
    }
  }
}

/** A long-running child (a second server, a load generator) that a test stops itself. */
export interface Background {
  child: ChildProcess;
  stdout(): string;
  stderr(): string;
  /** Resolves with the exit code (null after a signal) once it has exited. */
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  /** Sends `signal` (default SIGTERM); after `graceMs` kills the group. Resolves on exit. */
  stop(
    signal?: NodeJS.Signals,
    graceMs?: number,
  ): Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

export function background(
  cmd: string,
  args: string[],
  opts: { env?: NodeJS.ProcessEnv; cwd?: string } = {},
): Background {
  const child = spawn(cmd, args, {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: opts.env ?? process.env,
    cwd: opts.cwd,
    detached: true,
  });
  let out = '';
  let err = '';
  child.stdout!.on('data', (d: Buffer) => (out += d.toString()));
  child.stderr!.on('data', (d: Buffer) => (err += d.toString()));
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => {
    child.once('error', (e) => {
      err += String(e);
      resolve({ code: null, signal: null });
    });
    child.once('close', (code, signal) => resolve({ code, signal }));
  });
  return {
    child,
    stdout: () => out,
    stderr: () => err,
    exited,
    stop: async (signal = 'SIGTERM', graceMs = 5000) => {
      if (child.exitCode === null && child.signalCode === null) {
        try {
          child.kill(signal);
        } catch {
          // already gone
        }
      }
      const timer = setTimeout(() => killGroup(child, 'SIGKILL'), graceMs);
      const result = await exited;
      clearTimeout(timer);
      return result;
    },
  };
}

/** Polls `check` every 25 ms until it returns a value other than undefined, or throws after `timeoutMs`. */
export async function waitFor<T>(
  what: string,
  check: () => T | undefined | Promise<T | undefined>,
  timeoutMs = 15_000,
): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await check();
    if (value !== undefined) return value;
    if (Date.now() > deadline)
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

/** The TCP port a daemon started with `--listen HOST:0` bound, from its JSON "listening" log line. */
export function tcpPort(daemon: DaemonProcess, timeoutMs = 10_000): Promise<number> {
  return waitFor(
    'the daemon to log its TCP port',
    () => {
      for (const line of daemon.stderr().split('\n')) {
        if (!line.startsWith('{')) continue;
        try {
          const rec = JSON.parse(line) as { msg?: string; port?: number };
          if (rec.msg === 'listening' && typeof rec.port === 'number') return rec.port;
        } catch {
          // a partial line
        }
      }
      return undefined;
    },
    timeoutMs,
  );
}

let nbdPython: string | null | undefined;

/**
 * nbdsh runs `python3 -mnbd`, with whatever python3 comes first on PATH; a python from pyenv or a
 * venv usually lacks the libnbd bindings. Returns an environment whose PATH starts with the
 * directory of a python3 that can `import nbd`, or undefined if there is none.
 */
export function nbdshEnv(): NodeJS.ProcessEnv | undefined {
  if (nbdPython === undefined) {
    nbdPython = null;
    for (const py of ['python3', '/usr/bin/python3', '/usr/local/bin/python3']) {
      const r = spawnSync(py, ['-c', 'import nbd, sys; print(sys.executable)'], {
        encoding: 'utf8',
      });
      if (r.status === 0 && r.stdout.trim() !== '') {
        nbdPython = r.stdout.trim();
        break;
      }
    }
  }
  if (nbdPython === null) return undefined;
  return { ...process.env, PATH: `${dirname(nbdPython)}:${process.env.PATH ?? ''}` };
}

/** Like requireTools(t, 'nbdsh'), and also needs a python3 with libnbd's `nbd` module. */
export function requireNbdsh(t: TestContext, ...others: string[]): NodeJS.ProcessEnv | undefined {
  if (!requireTools(t, 'nbdsh', ...others)) return undefined;
  const env = nbdshEnv();
  if (env !== undefined) return env;
  const message = 'no python3 with the libnbd "nbd" module (python3-libnbd) for nbdsh';
  if (process.env.CI === 'true') throw new Error(`${message}; CI must not skip`);
  process.stderr.write(`\n*** SKIPPED ${t.name}: ${message} ***\n\n`);
  t.skip(message);
  return undefined;
}
