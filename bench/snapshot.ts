/**
 * `npm run bench:snapshot`: what a live snapshot costs writers, next to QEMU's
 * copy-before-write filter on the same file in the same run.
 *
 * Each case starts its server fresh on the same 1 GiB file in /dev/shm (difference store and
 * CBW target in /dev/shm too) and runs three fio jobs through one NBD connection:
 *   1. fresh: 4 KiB writes, one per 64 KiB chunk (fio zonemode=strided), QD32 — on a fresh
 *      snapshot every write copies a chunk first;
 *   2. fill (not measured): 1 MiB sequential writes over the whole device — copies whatever
 *      was left, so that nothing remains to copy;
 *   3. warm: 4 KiB random writes QD32, time based — nothing left to copy.
 * Cases: devfilter with no filter; with the snapshot filter but no snapshot; with a snapshot
 * taken after start; qemu-storage-daemon exporting the raw file; and exporting it through a
 * copy-before-write node whose target is a raw file (the copy starts when the daemon starts).
 * Ratios are against the baseline of the same server family, and devfilter's snapshot against
 * QEMU's CBW. Results: bench/results/snapshot-STAMP.{json,md}.
 */
import { spawn } from 'node:child_process';
import {
  closeSync,
  existsSync,
  ftruncateSync,
  mkdirSync,
  mkdtempSync,
  openSync,
  rmSync,
  statSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
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
import { REPO_ROOT, paths } from './servers.js';

const CHUNK = 64 * 1024;
const EXPORT = 'bench';

const HELP = `usage: npm run bench:snapshot -- [options]

  --quick          one repeat, 3 s warm runs (about a minute)
  --repeats N      repeats of every case, alternating the order (default 3)
  --runtime S      seconds of each warm run (default 10)
  --size MIB       export size in MiB (default 1024)
  --cases A,B      run only these cases (devfilter, devfilter+snapshot-filter,
                   devfilter+snapshot, qsd, qsd+cbw)
  --no-save        do not write bench/results/snapshot-*.{json,md}
  -h, --help       this text
`;

interface Options {
  repeats: number;
  runtimeS: number;
  sizeBytes: number;
  save: boolean;
  mode: 'quick' | 'full' | 'custom';
  cases: Case[];
}

function options(): Options {
  const { values } = parseArgs({
    options: {
      quick: { type: 'boolean', default: false },
      repeats: { type: 'string' },
      runtime: { type: 'string' },
      size: { type: 'string', default: '1024' },
      cases: { type: 'string' },
      'no-save': { type: 'boolean', default: false },
      help: { type: 'boolean', short: 'h', default: false },
    },
  });
  if (values.help) {
    process.stdout.write(HELP);
    process.exit(0);
  }
  const num = (v: string | undefined, dflt: number, name: string): number => {
    const n = v === undefined ? dflt : Number(v);
    if (!(n > 0) || !Number.isFinite(n)) {
      process.stderr.write(`bench:snapshot: --${name} must be a positive number, got ${v}\n`);
      process.exit(2);
    }
    return n;
  };
  const quick = values.quick!;
  const sizeBytes = Math.round(num(values.size, 1024, 'size') * 2 ** 20);
  if (sizeBytes % CHUNK !== 0) {
    process.stderr.write('bench:snapshot: --size must be a multiple of 64 KiB\n');
    process.exit(2);
  }
  const cases =
    values.cases === undefined
      ? CASES
      : CASES.filter((c) => values.cases!.split(',').includes(c.id));
  for (const id of values.cases?.split(',') ?? []) {
    if (!CASES.some((c) => c.id === id)) {
      process.stderr.write(
        `bench:snapshot: unknown case ${id} (${CASES.map((c) => c.id).join(', ')})\n`,
      );
      process.exit(2);
    }
  }
  return {
    cases,
    repeats: Math.round(num(values.repeats, quick ? 1 : 3, 'repeats')),
    runtimeS: num(values.runtime, quick ? 3 : 10, 'runtime'),
    sizeBytes,
    save: !values['no-save'],
    mode: values.cases !== undefined ? 'custom' : quick ? 'quick' : 'full',
  };
}

type Family = 'devfilter' | 'qemu';

interface Case {
  id: string;
  family: Family;
  notes: string;
  /** Compared against this case of the same family (undefined: it is the baseline). */
  baseline?: string;
  /** Compared against this case of the other family. */
  peer?: string;
}

const CASES: Case[] = [
  { id: 'devfilter', family: 'devfilter', notes: 'devfilter serve, file backend, no filter' },
  {
    id: 'devfilter+snapshot-filter',
    family: 'devfilter',
    baseline: 'devfilter',
    notes: 'snapshot filter attached at the bottom, no snapshot taken',
  },
  {
    id: 'devfilter+snapshot',
    family: 'devfilter',
    baseline: 'devfilter',
    peer: 'qsd+cbw',
    notes: 'devfilter snapshot create after start; store in /dev/shm, 64 KiB chunks',
  },
  {
    id: 'qsd',
    family: 'qemu',
    notes: 'qemu-storage-daemon, file node (aio=threads), NBD export',
  },
  {
    id: 'qsd+cbw',
    family: 'qemu',
    baseline: 'qsd',
    notes: 'qemu-storage-daemon, copy-before-write node over the file, raw target in /dev/shm',
  },
];

interface Phase {
  id: 'fresh' | 'warm';
  label: string;
}
const PHASES: Phase[] = [
  { id: 'fresh', label: '4k writes, one per 64k chunk (fresh snapshot: every write copies), QD32' },
  { id: 'warm', label: '4k random writes QD32 (warm: nothing left to copy)' },
];

interface Server {
  uri: string;
  control?: string;
  stop(): Promise<void>;
  commands: string[][];
}

async function spawnUntilListening(cmd: string[], socket: string): Promise<Server> {
  rmSync(socket, { force: true });
  const child = track(
    spawn(cmd[0]!, cmd.slice(1), { stdio: ['ignore', 'ignore', 'pipe'], cwd: REPO_ROOT }),
  );
  let err = '';
  child.stderr!.on('data', (d: Buffer) => {
    err = (err + d.toString()).slice(-8000);
  });
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  const deadline = Date.now() + 20_000;
  while (!(await canConnect(socket))) {
    if (child.exitCode !== null || child.signalCode !== null)
      throw new Error(`${cmd.join(' ')} exited: ${err.trim().slice(-800)}`);
    if (Date.now() > deadline) {
      child.kill('SIGKILL');
      throw new Error(`${cmd[0]} did not listen within 20 s: ${err.trim().slice(-800)}`);
    }
    await sleep(20);
  }
  return {
    uri: `nbd+unix:///${EXPORT}?socket=${socket}`,
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

async function devfilterCli(args: string[]): Promise<string> {
  const r = await run(process.execPath, [paths.cli, ...args], { timeoutMs: 30_000 });
  if (r.code !== 0)
    throw new Error(`devfilter ${args.join(' ')} failed: ${(r.stderr || r.stdout).trim()}`);
  return r.stdout;
}

async function startCase(c: Case, file: string, work: string): Promise<Server> {
  const socket = join(work, `${c.id}.sock`);
  if (c.family === 'qemu') {
    const cmd = [
      'qemu-storage-daemon',
      '--blockdev',
      `driver=file,node-name=src,filename=${file},aio=threads`,
    ];
    let node = 'src';
    if (c.id === 'qsd+cbw') {
      const target = join(work, 'cbw-target.img');
      rmSync(target, { force: true });
      const fd = openSync(target, 'w');
      ftruncateSync(fd, statSync(file).size);
      closeSync(fd);
      cmd.push(
        '--blockdev',
        `driver=file,node-name=tgt,filename=${target}`,
        '--blockdev',
        'driver=copy-before-write,node-name=cbw,file=src,target=tgt',
      );
      node = 'cbw';
    }
    cmd.push(
      '--nbd-server',
      `addr.type=unix,addr.path=${socket}`,
      '--export',
      `type=nbd,id=e0,node-name=${node},name=${EXPORT},writable=on`,
    );
    return spawnUntilListening(cmd, socket);
  }
  const control = join(work, `${c.id}.control.sock`);
  const store = join(work, 'store');
  rmSync(store, { recursive: true, force: true });
  const server = await spawnUntilListening(
    [
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
    ],
    socket,
  );
  server.control = control;
  try {
    if (c.id === 'devfilter+snapshot-filter') {
      const args = ['filter', 'create', EXPORT, 'snapshot', '--bottom'];
      args.push('--arg', `store=${store}`, '--control', control);
      await devfilterCli(args);
      server.commands.push(['devfilter', ...args]);
    } else if (c.id === 'devfilter+snapshot') {
      const args = ['snapshot', 'create', 'bench-snap', '--export', EXPORT, '--store', store];
      args.push('--control', control);
      await devfilterCli(args);
      server.commands.push(['devfilter', ...args]);
    }
  } catch (err) {
    await server.stop();
    throw err;
  }
  return server;
}

/** Chunks the snapshot filter copied since it was attached (undefined without one). */
async function chunksCopied(server: Server): Promise<number | undefined> {
  if (server.control === undefined) return undefined;
  try {
    const out = await devfilterCli([
      'snapshot',
      'status',
      EXPORT,
      '--json',
      '--control',
      server.control,
    ]);
    const s = JSON.parse(out) as { copies?: { copiedSinceAttach?: number } };
    return s.copies?.copiedSinceAttach;
  } catch {
    return undefined; // no snapshot filter on this case
  }
}

interface Sample {
  repeat: number;
  metrics: Metrics;
  /** Chunks copied during the phase (devfilter with a snapshot filter only). */
  copies?: number;
}

function jobArgs(phase: Phase['id'] | 'fill', o: Options): string[] {
  const common = ['--randrepeat=0', '--lat_percentiles=1'];
  switch (phase) {
    case 'fresh':
      return [
        '--name=fresh',
        '--rw=randwrite',
        '--bs=4k',
        '--iodepth=32',
        '--zonemode=strided',
        '--zonerange=64k',
        '--zonesize=4k',
        `--number_ios=${o.sizeBytes / CHUNK}`,
        ...common,
      ];
    case 'fill':
      return ['--name=fill', '--rw=write', '--bs=1m', '--iodepth=8'];
    case 'warm':
      return [
        '--name=warm',
        '--rw=randwrite',
        '--bs=4k',
        '--iodepth=32',
        '--norandommap',
        '--time_based',
        `--runtime=${Math.round(o.runtimeS * 1000)}ms`,
        ...common,
      ];
  }
}

async function main(): Promise<void> {
  const o = options();
  installCleanup();
  for (const tool of ['fio', 'qemu-storage-daemon']) {
    if (!which(tool)) {
      loud(`${tool} is not installed: the snapshot benchmark needs it`);
      process.exitCode = 1;
      return;
    }
  }
  const startedAt = new Date();
  const loadStart = loadAverage();
  // The store and the CBW target live on the export file's medium.
  const work = mkdtempSync(
    join(existsSync('/dev/shm') ? '/dev/shm' : tmpdir(), 'devfilter-snapbench-'),
  );
  removeAtExit(work);
  const file = await createFile(o.sizeBytes, undefined, 'devfilter-snapbench');
  const samples = new Map<string, Sample[]>();
  const commands = new Map<string, string[][]>();
  const failures: string[] = [];
  process.stdout.write(
    `bench:snapshot: ${o.cases.length} cases × ${o.repeats} repeat(s), warm runs ${o.runtimeS} s; load average ${loadStart.join(' ')}\n`,
  );
  for (let repeat = 0; repeat < o.repeats; repeat++) {
    const order = repeat % 2 === 0 ? o.cases : [...o.cases].reverse();
    for (const c of order) {
      let server: Server | undefined;
      try {
        server = await startCase(c, file.path, work);
        commands.set(c.id, server.commands);
        for (const phase of ['fresh', 'fill', 'warm'] as const) {
          const before = await chunksCopied(server);
          const out = await runFioJob(server.uri, jobArgs(phase, o), {
            tmpDir: work,
            timeoutMs: (o.runtimeS + 120) * 1000,
          });
          if (phase === 'fill') continue;
          const after = await chunksCopied(server);
          const sample: Sample = { repeat, metrics: out.total };
          if (before !== undefined && after !== undefined) sample.copies = after - before;
          const key = `${c.id}\u0000${phase}`;
          samples.set(key, [...(samples.get(key) ?? []), sample]);
          const t = out.total;
          process.stdout.write(
            `[${repeat + 1}/${o.repeats}] ${c.id.padEnd(26)} ${phase.padEnd(6)} ${fmtIops(t.iops).padStart(7)} IOPS  mean ${t.meanUs.toFixed(0).padStart(5)} µs  p99 ${t.p99Us.toFixed(0).padStart(6)} µs` +
              `${sample.copies !== undefined ? `  copies ${sample.copies}/${t.ios}` : ''}\n`,
          );
        }
      } catch (err) {
        const msg = `${c.id}: ${(err as Error).message.split('\n')[0]}`;
        failures.push(msg);
        process.stdout.write(`[${repeat + 1}/${o.repeats}] FAILED ${msg}\n`);
      } finally {
        await server?.stop();
      }
    }
  }

  const rows = PHASES.map((phase) => {
    const byCase: Record<string, { median: Metrics; copiesPerWrite?: number; samples: Sample[] }> =
      {};
    for (const c of CASES) {
      const s = samples.get(`${c.id}\u0000${phase.id}`);
      if (!s?.length) continue;
      const copies = s.flatMap((x) => (x.copies !== undefined ? [x.copies / x.metrics.ios] : []));
      byCase[c.id] = {
        median: medianMetrics(s.map((x) => x.metrics)),
        ...(copies.length ? { copiesPerWrite: median(copies) } : {}),
        samples: s,
      };
    }
    const ratios: Record<string, number> = {};
    for (const c of CASES) {
      const mine = byCase[c.id]?.median.iops;
      for (const other of [c.baseline, c.peer]) {
        const theirs = other !== undefined ? byCase[other]?.median.iops : undefined;
        if (mine !== undefined && theirs) ratios[`${c.id}/${other}`] = mine / theirs;
      }
    }
    return { phase: phase.id, label: phase.label, cases: byCase, ratios };
  });

  const lines: string[] = [];
  lines.push(`# Snapshot write cost (${o.mode}, ${startedAt.toISOString()})`, '');
  for (const row of rows) {
    lines.push(`## ${row.label}`, '');
    lines.push('| case | IOPS | mean µs | p99 µs | copies per write | vs baseline | vs QEMU CBW |');
    lines.push('|---|---:|---:|---:|---:|---:|---:|');
    for (const c of CASES) {
      const r = row.cases[c.id];
      if (!r) continue;
      const vs = (other?: string): string =>
        other !== undefined && row.ratios[`${c.id}/${other}`] !== undefined
          ? `${row.ratios[`${c.id}/${other}`]!.toFixed(2)}×`
          : '';
      lines.push(
        `| ${c.id} | ${fmtIops(r.median.iops)} | ${r.median.meanUs.toFixed(0)} | ${r.median.p99Us.toFixed(0)} | ` +
          `${r.copiesPerWrite !== undefined ? r.copiesPerWrite.toFixed(2) : ''} | ${vs(c.baseline)} | ${vs(c.peer)} |`,
      );
    }
    lines.push('');
  }
  lines.push('Cases:', '');
  for (const c of CASES) lines.push(`- \`${c.id}\`: ${c.notes}`);
  if (failures.length) lines.push('', 'Failures:', '', ...failures.map((f) => `- ${f}`));
  const report = lines.join('\n');
  process.stdout.write(`\n${report}\n`);

  if (o.save) {
    const dir = join(REPO_ROOT, 'bench', 'results');
    mkdirSync(dir, { recursive: true });
    const base = `snapshot-${startedAt.toISOString().replace(/[:]/g, '').replace(/\..*$/, 'Z')}-${o.mode}`;
    const result = {
      format: 'devfilter-bench-snapshot/1',
      startedAt: startedAt.toISOString(),
      finishedAt: new Date().toISOString(),
      options: { repeats: o.repeats, runtimeS: o.runtimeS, sizeBytes: o.sizeBytes },
      machine: describeMachine(),
      loadAverage: { start: loadStart, end: loadAverage() },
      file: file.filledWith,
      cases: CASES.map((c) => ({ ...c, commands: commands.get(c.id) ?? [] })),
      jobs: { fresh: jobArgs('fresh', o), fill: jobArgs('fill', o), warm: jobArgs('warm', o) },
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
  process.stderr.write(`bench:snapshot: ${(err as Error).stack ?? String(err)}\n`);
  process.exitCode = 1;
});
