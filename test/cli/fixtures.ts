/**
 * Helpers for CLI tests: a `devfilter serve` child with its own control socket in a temporary
 * directory, the real CLI run as a child process against it, and tiny filter modules.
 */
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { CLI, spawnDaemon, tempDir, type DaemonProcess } from '../helpers/server.js';
import { run, type RunResult } from '../helpers/run.js';

export interface CliDaemon extends DaemonProcess {
  control: string;
  dir: string;
  /** Runs `devfilter ARGS` with DEVFILTER_CONTROL pointing at this daemon. */
  cli(
    args: string[],
    opts?: { env?: NodeJS.ProcessEnv; cwd?: string; timeoutMs?: number },
  ): Promise<RunResult>;
  /** Like cli(), and parses stdout as JSON (adds --json). */
  json<T = unknown>(args: string[]): Promise<T>;
  close(): Promise<number | null>;
}

/** Starts `devfilter serve --control DIR/control.sock ARGS`. */
export async function startCliDaemon(
  args: string[],
  opts: { env?: NodeJS.ProcessEnv; dir?: string } = {},
): Promise<CliDaemon> {
  const own = opts.dir === undefined ? tempDir('devfilter-cli-') : undefined;
  const dir = opts.dir ?? own!.path;
  const control = join(dir, 'control.sock');
  const d = await spawnDaemon(['--control', control, ...args], {
    socket: join(dir, 'nbd.sock'),
    ...(opts.env ? { env: opts.env } : {}),
  });
  const cli = (
    cliArgs: string[],
    o: { env?: NodeJS.ProcessEnv; cwd?: string; timeoutMs?: number } = {},
  ): Promise<RunResult> =>
    runCli(cliArgs, {
      env: { DEVFILTER_CONTROL: control, ...o.env },
      ...(o.cwd ? { cwd: o.cwd } : {}),
      timeoutMs: o.timeoutMs ?? 30_000,
    });
  return {
    ...d,
    control,
    dir,
    cli,
    json: async <T>(cliArgs: string[]): Promise<T> => {
      const r = await cli([...cliArgs, '--json']);
      if (r.code !== 0)
        throw new Error(`devfilter ${cliArgs.join(' ')} --json: exit ${r.code}\n${r.stderr}`);
      return JSON.parse(r.stdout) as T;
    },
    close: async () => {
      const code = await d.stop();
      own?.cleanup();
      return code;
    },
  };
}

/** Runs the real CLI binary. */
export function runCli(
  args: string[],
  opts: { env?: NodeJS.ProcessEnv; cwd?: string; timeoutMs?: number } = {},
): Promise<RunResult> {
  return run(process.execPath, [CLI, ...args], {
    env: { ...process.env, ...opts.env },
    ...(opts.cwd ? { cwd: opts.cwd } : {}),
    timeoutMs: opts.timeoutMs ?? 30_000,
  });
}

/**
 * Test filter modules (plain ES modules, no imports): `echo` (control echoes, status shows its
 * args, one removal policy), `broken` (setup fails), `pass` (passes through).
 */
export function writeTestModules(dir: string): { echo: string; broken: string; pass: string } {
  const echo = join(dir, 'echo-filter.mjs');
  writeFileSync(
    echo,
    `export default {
  name: 'echo',
  apiVersion: 1,
  description: 'test: echoes control commands',
  argsSchema: {
    type: 'object',
    properties: {
      level: { type: 'integer', minimum: 0, maximum: 9, default: 1, description: 'a level' },
      tags: { type: 'array', items: { type: 'string' } },
      mode: { enum: ['a', 'b'] },
    },
    additionalProperties: false,
  },
  removalPolicies: ['keep', 'drop'],
  create(args, env) {
    return {
      status: () => ({ args, exportName: env.exportName, filterName: env.filterName }),
      control(command, cargs) {
        if (command === 'fail') throw new Error('echo failed on purpose');
        return { command, args: cargs };
      },
    };
  },
};
`,
  );
  const broken = join(dir, 'broken-filter.mjs');
  writeFileSync(
    broken,
    `export const filterType = {
  name: 'broken', apiVersion: 1, description: 'test: setup fails',
  argsSchema: { type: 'object', properties: {} },
  create() { throw new Error('no luck'); },
};
`,
  );
  const pass = join(dir, 'pass-filter.mjs');
  writeFileSync(
    pass,
    `export const filterTypes = [{
  name: 'pass', apiVersion: 1, description: 'test: passes every request through, counting them',
  argsSchema: { type: 'object', properties: {} },
  create() {
    let n = 0;
    return {
      read(next, buf, off, fl, ctx) { n++; return next.read(buf, off, fl, ctx); },
      write(next, data, off, fl, ctx) { n++; return next.write(data, off, fl, ctx); },
      status: () => ({ requests: n }),
    };
  },
}];
`,
  );
  return { echo, broken, pass };
}
