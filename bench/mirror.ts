/**
 * `npm run bench:mirror`: what a live migration costs writers — client write throughput while
 * the `mirror` filter copies the export, in each mode, next to no mirror, in the same run.
 *
 * Every case starts `devfilter serve` fresh on the same file in /dev/shm (the mirror's target
 * is a new file in /dev/shm too) and runs two fio jobs through one NBD connection:
 *   - 4 KiB random writes, QD32 (IOPS);
 *   - 1 MiB sequential writes, QD8 (MB/s).
 * Cases:
 *   - none: no filter;
 *   - background: `mirror start --mode background --rate RATE` — the copy runs through both
 *     jobs (the rate keeps it from finishing, and a pass from ending), client writes mark
 *     chunks dirty;
 *   - sync: the same with `--mode sync` — client writes go to source and target;
 *   - synced: an unlimited mirror waited for until `synced`, then measured — no copy left, every
 *     write mirrored (both modes behave so once synced).
 * Each sample also records the mirror's state and mode at its end and the bytes it copied
 * during the job. devfilter runs from a copy of dist/ taken at the start. Results:
 * bench/results/mirror-STAMP-MODE.{json,md}.
 */
import { spawn } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { parseSize } from '../src/core/size.js';
import { createFile, loud } from './file.js';
import { runFioJob, type Metrics } from './fio.js';
import { describeMachine, loadAverage } from './machine.js';
import {
  canConnect,
  installCleanup,
  portablePaths,
  removeAtExit,
  run,
  sleep,
  track,
  which,
} from './proc.js';
import { fmtIops } from './report.js';
import { median, medianMetrics } from './results.js';
import { REPO_ROOT, paths, useSnapshot } from './servers.js';

const EXPORT = 'bench';

const HELP = `usage: npm run bench:mirror -- [options]

  --quick          one repeat, 3 s runs (about a minute)
  --repeats N      repeats of every case, alternating the order (default 3)
  --runtime S      seconds of each fio run (default 5)
  --size MIB       export size in MiB (default 1024)
  --rate R         copy rate limit of the background and sync cases (default 50M)
  --cases A,B      run only these cases (none, background, sync, synced)
  --no-save        do not write bench/results/mirror-*.{json,md}
  -h, --help       this text
`;

interface Options {
  repeats: number;
  runtimeS: number;
  sizeBytes: number;
  rate: number;
  save: boolean;
  mode: 'quick' | 'full' | 'custom';
  cases: Case[];
}

interface Case {
  id: string;
  notes: string;
  /** `mirror start` arguments; none: no mirror. */
  mirror?: (o: Options) => string[];
  /** Wait for `synced` before measuring. */
  waitSynced?: boolean;
}

const CASES: Case[] = [
  { id: 'none', notes: 'devfilter serve, file backend, no filter' },
  {
    id: 'background',
    notes: 'mirror --mode background, copy rate limited so that it runs through both jobs',
    mirror: (o) => ['--mode', 'background', '--rate', String(o.rate)],
  },
  {
    id: 'sync',
    notes: 'mirror --mode sync, copy rate limited so that it runs through both jobs',
    mirror: (o) => ['--mode', 'sync', '--rate', String(o.rate)],
  },
  {
    id: 'synced',
    notes: 'mirror without rate limit, measured once synced (every write mirrored, no copy)',
    mirror: () => ['--mode', 'background'],
    waitSynced: true,
  },
];

interface Job {
  id: '4k-randwrite-qd32' | '1m-write-qd8';
  label: string;
  args: (o: Options) => string[];
}

const JOBS: Job[] = [
  {
    id: '4k-randwrite-qd32',
    label: '4k random writes QD32',
    args: (o) => [
      '--name=randwrite',
      '--rw=randwrite',
      '--bs=4k',
      '--iodepth=32',
      '--norandommap',
      '--randrepeat=0',
      '--time_based',
      `--runtime=${Math.round(o.runtimeS * 1000)}ms`,
      '--lat_percentiles=1',
    ],
  },
  {
    id: '1m-write-qd8',
    label: '1M sequential writes QD8',
    args: (o) => [
      '--name=seqwrite',
      '--rw=write',
      '--bs=1m',
      '--iodepth=8',
      '--time_based',
      `--runtime=${Math.round(o.runtimeS * 1000)}ms`,
      '--lat_percentiles=1',
    ],
  },
];

function options(): Options {
  const { values } = parseArgs({
    options: {
      quick: { type: 'boolean', default: false },
      repeats: { type: 'string' },
      runtime: { type: 'string' },
      size: { type: 'string', default: '1024' },
      rate: { type: 'string', default: '50M' },
      cases: { type: 'string' },
      'no-save': { type: 'boolean', default: false },
      help: { type: 'boolean', short: 'h', default: false },
    },
  });
  if (values.help) {
    process.stdout.write(HELP);
    process.exit(0);
  }
  const fail = (message: string): never => {
    process.stderr.write(`bench:mirror: ${message}\n`);
    process.exit(2);
  };
  const num = (v: string | undefined, dflt: number, name: string): number => {
    const n = v === undefined ? dflt : Number(v);
    if (!(n > 0) || !Number.isFinite(n)) fail(`--${name} must be a positive number, got ${v}`);
    return n;
  };
  const quick = values.quick!;
  let rate = 0;
  try {
    rate = parseSize(values.rate!);
  } catch (err) {
    fail(`--rate: ${(err as Error).message}`);
  }
  const wanted = values.cases?.split(',');
  for (const id of wanted ?? [])
    if (!CASES.some((c) => c.id === id))
      fail(`unknown case ${id} (${CASES.map((c) => c.id).join(', ')})`);
  return {
    cases: wanted === undefined ? CASES : CASES.filter((c) => wanted.includes(c.id)),
    repeats: Math.round(num(values.repeats, quick ? 1 : 3, 'repeats')),
    runtimeS: num(values.runtime, quick ? 3 : 5, 'runtime'),
    sizeBytes: Math.round(num(values.size, 1024, 'size') * 2 ** 20),
    rate,
    save: !values['no-save'],
    mode: wanted !== undefined ? 'custom' : quick ? 'quick' : 'full',
  };
}

interface Server {
  uri: string;
  control: string;
  commands: string[][];
  stop(): Promise<void>;
}

async function startServer(file: string, work: string): Promise<Server> {
  const socket = join(work, 'nbd.sock');
  const control = join(work, 'control.sock');
  rmSync(socket, { force: true });
  const cmd = [
    process.execPath,
    paths.cli,
    'serve',
    '--export',
    `${EXPORT}=file:${file}`,
    '--socket',
    socket,
    '--control',
    control,
    '--log-level',
    'warn',
  ];
  const child = track(
    spawn(cmd[0]!, cmd.slice(1), { stdio: ['ignore', 'ignore', 'pipe'], cwd: REPO_ROOT }),
  );
  let err = '';
  child.stderr!.on('data', (d: Buffer) => (err = (err + d.toString()).slice(-8000)));
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  const deadline = Date.now() + 20_000;
  while (!(await canConnect(socket))) {
    if (child.exitCode !== null || child.signalCode !== null)
      throw new Error(`devfilter serve exited: ${err.trim().slice(-800)}`);
    if (Date.now() > deadline) {
      child.kill('SIGKILL');
      throw new Error(`devfilter serve did not listen within 20 s: ${err.trim().slice(-800)}`);
    }
    await sleep(20);
  }
  return {
    uri: `nbd+unix:///${EXPORT}?socket=${socket}`,
    control,
    commands: [cmd],
    stop: async () => {
      if (child.exitCode !== null || child.signalCode !== null) return;
      child.kill('SIGTERM');
      const timer = setTimeout(() => child.kill('SIGKILL'), 20_000);
      await exited;
      clearTimeout(timer);
    },
  };
}

async function cli(server: Server, args: string[]): Promise<string> {
  const r = await run(process.execPath, [paths.cli, ...args, '--control', server.control], {
    timeoutMs: 120_000,
  });
  if (r.code !== 0)
    throw new Error(`devfilter ${args.join(' ')} failed: ${(r.stderr || r.stdout).trim()}`);
  return r.stdout;
}

interface MirrorStatus {
  state: string;
  mode: string;
  bytesCopied: number;
  syncWrites: number;
}

async function mirrorStatus(server: Server): Promise<MirrorStatus> {
  return JSON.parse(await cli(server, ['mirror', 'status', EXPORT, '--json'])) as MirrorStatus;
}

interface Sample {
  repeat: number;
  metrics: Metrics;
  /** With a mirror: its state and mode when the job ended, what it copied during the job. */
  mirror?: { state: string; mode: string; copiedMBps: number; syncWrites: number };
}

async function main(): Promise<void> {
  const o = options();
  installCleanup();
  if (!which('fio')) {
    loud('fio is not installed: the mirror benchmark needs it');
    process.exitCode = 1;
    return;
  }
  // devfilter runs from a copy of the build: a rebuild of dist/ by someone else during the
  // run must not change (or break) the code under test halfway.
  const snap = join(REPO_ROOT, 'dist', `bench-snapshot-${process.pid}`);
  removeAtExit(snap);
  useSnapshot(snap);
  const startedAt = new Date();
  const loadStart = loadAverage();
  const work = mkdtempSync(
    join(existsSync('/dev/shm') ? '/dev/shm' : tmpdir(), 'devfilter-mirrorbench-'),
  );
  removeAtExit(work);
  const file = await createFile(o.sizeBytes, undefined, 'devfilter-mirrorbench');
  const samples = new Map<string, Sample[]>();
  const commands = new Map<string, string[][]>();
  const failures: string[] = [];
  process.stdout.write(
    `bench:mirror: ${o.cases.length} cases × ${o.repeats} repeat(s), ${o.runtimeS} s runs, copy rate ${o.rate} B/s; load average ${loadStart.join(' ')}\n`,
  );
  for (let repeat = 0; repeat < o.repeats; repeat++) {
    const order = repeat % 2 === 0 ? o.cases : [...o.cases].reverse();
    for (const c of order) {
      let server: Server | undefined;
      const target = join(work, 'target.img');
      rmSync(target, { force: true });
      try {
        server = await startServer(file.path, work);
        if (c.mirror !== undefined) {
          const args = ['mirror', 'start', EXPORT, '--target', target, ...c.mirror(o)];
          await cli(server, args);
          server.commands.push(['devfilter', ...args]);
          if (c.waitSynced === true) {
            const deadline = Date.now() + 300_000;
            while ((await mirrorStatus(server)).state !== 'synced') {
              if (Date.now() > deadline) throw new Error('the mirror did not sync in 300 s');
              await sleep(200);
            }
          }
        }
        commands.set(c.id, server.commands);
        for (const job of JOBS) {
          const before = c.mirror !== undefined ? await mirrorStatus(server) : undefined;
          const started = performance.now();
          const out = await runFioJob(server.uri, job.args(o), {
            tmpDir: work,
            timeoutMs: (o.runtimeS + 60) * 1000,
          });
          const seconds = (performance.now() - started) / 1000;
          const sample: Sample = { repeat, metrics: out.total };
          if (before !== undefined) {
            const after = await mirrorStatus(server);
            sample.mirror = {
              state: after.state,
              mode: after.mode,
              copiedMBps: (after.bytesCopied - before.bytesCopied) / seconds / 1e6,
              syncWrites: after.syncWrites - before.syncWrites,
            };
          }
          const key = `${c.id}\u0000${job.id}`;
          samples.set(key, [...(samples.get(key) ?? []), sample]);
          const t = out.total;
          const m = sample.mirror;
          process.stdout.write(
            `[${repeat + 1}/${o.repeats}] ${c.id.padEnd(10)} ${job.id.padEnd(17)} ${fmtIops(t.iops).padStart(7)} IOPS ${t.mbps.toFixed(0).padStart(5)} MB/s  p99 ${t.p99Us.toFixed(0).padStart(6)} µs` +
              `${m ? `  mirror ${m.state}/${m.mode}, copy ${m.copiedMBps.toFixed(1)} MB/s` : ''}\n`,
          );
        }
      } catch (err) {
        const msg = `${c.id}: ${(err as Error).message.split('\n')[0]}`;
        failures.push(msg);
        process.stdout.write(`[${repeat + 1}/${o.repeats}] FAILED ${msg}\n`);
      } finally {
        await server?.stop();
        rmSync(target, { force: true });
      }
    }
  }

  const rows = JOBS.map((job) => {
    const byCase: Record<string, { median: Metrics; copyMBps?: number; samples: Sample[] }> = {};
    for (const c of CASES) {
      const s = samples.get(`${c.id}\u0000${job.id}`);
      if (!s?.length) continue;
      const copy = s.flatMap((x) => (x.mirror ? [x.mirror.copiedMBps] : []));
      byCase[c.id] = {
        median: medianMetrics(s.map((x) => x.metrics)),
        ...(copy.length ? { copyMBps: median(copy) } : {}),
        samples: s,
      };
    }
    const base = byCase.none?.median;
    const ratios: Record<string, number> = {};
    for (const [id, r] of Object.entries(byCase))
      if (base !== undefined && id !== 'none')
        ratios[id] =
          job.id === '1m-write-qd8' ? r.median.mbps / base.mbps : r.median.iops / base.iops;
    return { job: job.id, label: job.label, cases: byCase, ratios };
  });

  const lines: string[] = [];
  lines.push(`# Client writes during a mirror (${o.mode}, ${startedAt.toISOString()})`, '');
  lines.push(
    `${o.sizeBytes / 2 ** 20} MiB export in /dev/shm, target in /dev/shm, copy rate limit ${(o.rate / 2 ** 20).toFixed(0)} MiB/s ` +
      `(background and sync), ${o.repeats} repeat(s) of ${o.runtimeS} s, medians.`,
    '',
  );
  lines.push(
    '| case | 4k randwrite QD32 IOPS | vs none | p99 µs | 1M write QD8 MB/s | vs none | copy MB/s during the jobs | mirror at the end |',
  );
  lines.push('|---|---:|---:|---:|---:|---:|---:|---|');
  const [small, big] = rows;
  for (const c of CASES) {
    const a = small?.cases[c.id];
    const b = big?.cases[c.id];
    if (!a && !b) continue;
    const ratio = (r: (typeof rows)[number] | undefined): string =>
      r?.ratios[c.id] !== undefined ? `${r.ratios[c.id]!.toFixed(2)}×` : '';
    const copy = [a?.copyMBps, b?.copyMBps].filter((x): x is number => x !== undefined);
    const ends = new Set(
      [...(a?.samples ?? []), ...(b?.samples ?? [])].flatMap((s) =>
        s.mirror ? [`${s.mirror.state}/${s.mirror.mode}`] : [],
      ),
    );
    lines.push(
      `| ${c.id} | ${a ? fmtIops(a.median.iops) : '-'} | ${ratio(small)} | ${a ? a.median.p99Us.toFixed(0) : '-'} | ` +
        `${b ? b.median.mbps.toFixed(0) : '-'} | ${ratio(big)} | ${copy.map((x) => x.toFixed(1)).join(' / ')} | ${[...ends].join(', ')} |`,
    );
  }
  lines.push('', 'Cases:', '');
  for (const c of CASES) lines.push(`- \`${c.id}\`: ${c.notes}`);
  if (failures.length) lines.push('', 'Failures:', '', ...failures.map((f) => `- ${f}`));
  const report = lines.join('\n');
  process.stdout.write(`\n${report}\n`);

  if (o.save) {
    const dir = join(REPO_ROOT, 'bench', 'results');
    mkdirSync(dir, { recursive: true });
    const base = `mirror-${startedAt.toISOString().replace(/[:]/g, '').replace(/\..*$/, 'Z')}-${o.mode}`;
    const result = {
      format: 'devfilter-bench-mirror/1',
      startedAt: startedAt.toISOString(),
      finishedAt: new Date().toISOString(),
      options: { repeats: o.repeats, runtimeS: o.runtimeS, sizeBytes: o.sizeBytes, rate: o.rate },
      machine: describeMachine(),
      loadAverage: { start: loadStart, end: loadAverage() },
      file: file.filledWith,
      cases: CASES.map((c) => ({
        id: c.id,
        notes: c.notes,
        commands: commands.get(c.id) ?? [],
      })),
      jobs: Object.fromEntries(JOBS.map((j) => [j.id, j.args(o)])),
      rows,
      failures,
    };
    writeFileSync(
      join(dir, `${base}.json`),
      portablePaths(`${JSON.stringify(result, null, 2)}\n`, REPO_ROOT),
    );
    writeFileSync(join(dir, `${base}.md`), portablePaths(`${report}\n`, REPO_ROOT));
    process.stdout.write(`\nsaved bench/results/${base}.{json,md}\n`);
  }
  if (failures.length) process.exitCode = 1;
}

main().catch((err: unknown) => {
  process.stderr.write(`bench:mirror: ${(err as Error).stack ?? String(err)}\n`);
  process.exitCode = 1;
});
