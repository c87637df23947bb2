/**
 * `npm run bench`: devfilter side by side with nbdkit and qemu-nbd, and devfilter with each
 * filter against devfilter with none — the same fio jobs on the same 1 GiB file in /dev/shm,
 * one server at a time, alternating the order across repeats; medians of the repeats.
 * See docs/performance.md. `npm run bench -- --help` lists the options.
 */
import { mkdirSync, mkdtempSync, writeFileSync, readdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { renderChart } from './chart.js';
import { createFile, loud } from './file.js';
import { runFio } from './fio.js';
import { planFilters } from './filters.js';
import { describeMachine, loadAverage } from './machine.js';
import { formatSummary, loadProfile, summarise } from './profile-summary.js';
import {
  installCleanup,
  procCpuSeconds,
  portablePaths,
  procStatusKiB,
  removeAtExit,
  resetPeakRss,
  which,
} from './proc.js';
import { renderMarkdownReport, renderReport, fmtIops } from './report.js';
import {
  evaluate,
  median,
  medianMetrics,
  type BenchResult,
  type RowRecord,
  type RunSample,
  type ServerRecord,
} from './results.js';
import {
  REPO_ROOT,
  peerServers,
  probeDevfilterCli,
  startServer,
  useSnapshot,
  type AttachMethod,
  type RunningServer,
  type ServerDef,
} from './servers.js';
import {
  FILTER_ROWS_FULL,
  FILTER_ROWS_QUICK,
  QUICK_ROWS,
  WORKLOADS,
  allRows,
  isMemoryRow,
  type Row,
} from './workloads.js';

const USAGE = `usage: npm run bench -- [options]

  --quick               2 s runs (+0.5 s ramp), 1 repeat, rows: ${QUICK_ROWS.join(', ')};
                        filters on ${FILTER_ROWS_QUICK.join(', ')} (under two minutes in all)
  --servers LIST        comma-separated: devfilter, nbdkit, nbdkit-t2, qemu-nbd, devfilter+TYPE
                        (default: devfilter,nbdkit,qemu-nbd and every filter)
  --filters LIST|none   filter types to run as devfilter+TYPE (default: every built-in type
                        found in dist/src/filters plus bench-noop; also bench-empty)
  --filter-args TYPE=JSON  arguments for a filter type (repeatable)
  --attach auto|control|launcher  how filters are attached (auto: the control CLI when the
                        daemon has one, else bench/serve-filtered.ts)
  --workloads LIST      ${WORKLOADS.map((w) => w.id).join(', ')}
  --conns LIST          connections per row (default 1,4)
  --runtime S           seconds per fio run (default 8; quick 2)
  --ramp S              fio ramp_time in seconds (default 1; quick 0.5)
  --repeats N           rounds over all servers (default 2; quick 1)
  --profile             run devfilter under node --cpu-prof (bench/results/profiles/) and print
                        the top functions; results are then saved as *-profile.json only
  --interleave          keep every server of a repeat up (idle) and run each row on each server
                        in turn, alternating the order by row: better ratios when the
                        machine's load drifts (default: one server process at a time)
  --no-snapshot         run devfilter from dist/ itself, not from a copy taken at the start
                        (the copy keeps a rebuild by someone else from changing the code
                        under test halfway through a run)
  --size SIZE_MIB       export size in MiB (default 1024)
  --dir DIR             where the export file goes (default /dev/shm; elsewhere the file
                        backend takes its page-cache path instead of its tmpfs path)
  --docs                also write the chart to docs/performance.svg (default in full mode)
  --no-save             print only (otherwise: bench/results/STAMP-MODE.{json,md}, and for
                        full and quick runs latest.{json,md,svg})
`;

interface Options {
  mode: BenchResult['mode'];
  quick: boolean;
  runtimeS: number;
  rampS: number;
  repeats: number;
  rows: Row[];
  filterRows: Set<string>;
  servers: string[] | undefined;
  filters: string[] | undefined;
  filterArgs: Map<string, Record<string, unknown>>;
  attach: 'auto' | AttachMethod;
  profile: boolean;
  interleave: boolean;
  snapshot: boolean;
  dir: string | undefined;
  save: boolean;
  docs: boolean;
  sizeBytes: number;
}

const list = (s: string | undefined): string[] | undefined =>
  s === undefined
    ? undefined
    : s
        .split(',')
        .map((x) => x.trim())
        .filter((x) => x !== '');

function options(): Options {
  const { values } = parseArgs({
    options: {
      quick: { type: 'boolean', default: false },
      servers: { type: 'string' },
      filters: { type: 'string' },
      'filter-args': { type: 'string', multiple: true },
      attach: { type: 'string', default: 'auto' },
      workloads: { type: 'string' },
      conns: { type: 'string' },
      runtime: { type: 'string' },
      ramp: { type: 'string' },
      repeats: { type: 'string' },
      profile: { type: 'boolean', default: false },
      interleave: { type: 'boolean', default: false },
      'no-snapshot': { type: 'boolean', default: false },
      dir: { type: 'string' },
      size: { type: 'string', default: '1024' },
      docs: { type: 'boolean', default: false },
      'no-save': { type: 'boolean', default: false },
      help: { type: 'boolean', short: 'h', default: false },
    },
  });
  if (values.help) {
    process.stdout.write(USAGE);
    process.exit(0);
  }
  const quick = values.quick!;
  const num = (v: string | undefined, dflt: number, what: string): number => {
    if (v === undefined) return dflt;
    const n = Number(v);
    if (!Number.isFinite(n) || n < 0) throw new Error(`--${what}: expected a number, got ${v}`);
    return n;
  };
  const workloadIds = list(values.workloads);
  const conns = list(values.conns)?.map((c) => num(c, 1, 'conns'));
  let workloads = WORKLOADS;
  if (workloadIds) {
    workloads = workloadIds.map((id) => {
      const w = WORKLOADS.find((x) => x.id === id);
      if (!w)
        throw new Error(`unknown workload ${id} (one of ${WORKLOADS.map((x) => x.id).join(', ')})`);
      return w;
    });
  }
  const explicitRows = workloadIds !== undefined || conns !== undefined;
  let rows = allRows(workloads, conns);
  if (quick && !explicitRows) rows = rows.filter((r) => QUICK_ROWS.includes(r.id));
  const filterRows = new Set(
    explicitRows ? rows.map((r) => r.id) : quick ? FILTER_ROWS_QUICK : FILTER_ROWS_FULL,
  );
  const filterArgs = new Map<string, Record<string, unknown>>();
  for (const fa of values['filter-args'] ?? []) {
    const eq = fa.indexOf('=');
    if (eq < 0) throw new Error(`--filter-args ${fa}: expected TYPE=JSON`);
    filterArgs.set(fa.slice(0, eq), JSON.parse(fa.slice(eq + 1)) as Record<string, unknown>);
  }
  const attach = values.attach!;
  if (!['auto', 'control', 'launcher'].includes(attach))
    throw new Error('--attach: auto, control or launcher');
  const custom = explicitRows || values.servers !== undefined || values.filters !== undefined;
  return {
    mode: custom ? 'custom' : quick ? 'quick' : 'full',
    quick,
    runtimeS: num(values.runtime, quick ? 2 : 8, 'runtime'),
    rampS: num(values.ramp, quick ? 0.5 : 1, 'ramp'),
    repeats: Math.max(1, Math.floor(num(values.repeats, quick ? 1 : 2, 'repeats'))),
    rows,
    filterRows,
    servers: list(values.servers),
    filters: values.filters === 'none' ? [] : list(values.filters),
    filterArgs,
    attach: attach as Options['attach'],
    profile: values.profile!,
    interleave: values.interleave!,
    snapshot: !values['no-snapshot'],
    dir: values.dir,
    save: !values['no-save'],
    docs: values.docs! || (!custom && !quick),
    sizeBytes: Math.round(num(values.size, 1024, 'size') * 2 ** 20),
  };
}

/** The server list: peers that are installed, devfilter, and the filter variants. */
async function plan(o: Options): Promise<{ defs: ServerDef[]; records: ServerRecord[] }> {
  const peers = peerServers();
  const wantedFilters =
    o.filters ??
    (o.servers
      ? o.servers.filter((s) => s.startsWith('devfilter+')).map((s) => s.slice(10))
      : undefined);
  const filterPlans = await planFilters(wantedFilters, o.filterArgs);
  const wanted = o.servers ?? ['devfilter', 'nbdkit', 'qemu-nbd'];
  const defs: ServerDef[] = [];
  for (const id of wanted) {
    if (id.startsWith('devfilter+')) continue;
    if (id === 'devfilter')
      defs.push({
        id,
        kind: 'devfilter',
        notes: 'devfilter serve, file backend, no filter (an empty live stack)',
      });
    else {
      const p = peers.find((x) => x.id === id);
      if (!p)
        throw new Error(
          `unknown server ${id} (devfilter, ${peers.map((x) => x.id).join(', ')}, devfilter+TYPE)`,
        );
      defs.push(p);
    }
  }
  for (const f of filterPlans) {
    defs.push({
      id: f.id,
      kind: 'filter',
      notes: f.filter
        ? `devfilter with one ${f.filter.type} filter, args ${JSON.stringify(f.filter.args)}`
        : '',
      ...(f.filter ? { filter: f.filter } : {}),
      ...(f.skipped ? { unavailable: f.skipped } : {}),
    });
  }
  const records: ServerRecord[] = [];
  for (const d of defs) {
    const rec: ServerRecord = {
      id: d.id,
      kind: d.kind,
      notes: d.notes,
      ...(d.filter ? { filter: d.filter } : {}),
    };
    if (d.unavailable) {
      rec.skipped = d.unavailable;
      loud(`SKIPPING ${d.id}: ${d.unavailable}`);
    }
    records.push(rec);
  }
  if (
    defs.some((d) => d.kind === 'filter' && !d.unavailable) &&
    !defs.some((d) => d.id === 'devfilter')
  ) {
    process.stderr.write(
      'bench: note: filter ratios need devfilter (no filter) in --servers too\n',
    );
  }
  return { defs: defs.filter((d) => !d.unavailable), records };
}

interface Live {
  def: ServerDef;
  server: RunningServer;
  /** Largest VmHWM read so far (it is reset before each memory row). */
  lifetimeKiB: number;
}

/** Reads the server's VmHWM (KiB), keeping the largest seen. */
function hwm(live: Live): number {
  const v = procStatusKiB(live.server.pid, 'VmHWM') ?? 0;
  live.lifetimeKiB = Math.max(live.lifetimeKiB, v);
  return v;
}

function stamp(d: Date): string {
  return d.toISOString().replace(/[:]/g, '').replace(/\..*$/, 'Z');
}

async function main(): Promise<void> {
  const o = options();
  installCleanup();
  if (!which('fio')) {
    loud('fio is not installed: nothing can be measured (apt-get install fio)');
    process.exitCode = 1;
    return;
  }
  const startedAt = new Date();
  const loadStart = loadAverage();
  const machine = describeMachine();
  if (o.snapshot) {
    const snap = join(REPO_ROOT, 'dist', `bench-snapshot-${process.pid}`);
    removeAtExit(snap);
    useSnapshot(snap);
  }
  const { defs, records } = await plan(o);
  const cli = await probeDevfilterCli();
  const attach: AttachMethod =
    o.attach === 'auto' ? (cli.control ? 'control' : 'launcher') : o.attach;
  if (attach === 'control' && !cli.control)
    throw new Error('--attach control: this devfilter has no `filter create … --control`');
  for (const r of records)
    if (r.kind === 'filter' && !r.skipped)
      r.attach =
        attach === 'control'
          ? 'devfilter filter create --control'
          : 'bench/serve-filtered.ts (startDaemon + DeviceManager.createFilter)';

  const work = mkdtempSync(join(tmpdir(), 'devfilter-bench-'));
  removeAtExit(work);
  const profileDir = join(REPO_ROOT, 'bench', 'results', 'profiles');
  if (o.profile) mkdirSync(profileDir, { recursive: true });
  const profilesBefore = new Set(o.profile ? readdirSync(profileDir) : []);

  process.stdout.write(
    `bench: ${o.mode} mode: ${o.rows.length} rows, ${defs.length} servers, ${o.runtimeS} s + ${o.rampS} s ramp, ${o.repeats} repeat(s); load average ${loadStart.join(' ')}\n`,
  );
  if (loadStart[0]! > 0.5)
    process.stdout.write(
      `bench: note: the machine is busy before the benchmark starts (load ${loadStart[0]}): expect noise\n`,
    );
  const file = await createFile(o.sizeBytes, o.dir);

  const rowRecords = new Map<string, RowRecord>();
  for (const row of o.rows) {
    rowRecords.set(row.id, {
      id: row.id,
      workload: row.workload.id,
      label: row.workload.label,
      conns: row.conns,
      servers: {},
      ratios: {},
    });
  }
  const samples = new Map<string, RunSample[]>();
  const errors = new Map<string, string[]>();
  const key = (server: string, row: string): string => `${server}\u0000${row}`;
  const recordOf = (id: string): ServerRecord => records.find((r) => r.id === id)!;

  const rowsOf = (def: ServerDef): Row[] =>
    def.kind === 'filter' ? o.rows.filter((r) => o.filterRows.has(r.id)) : o.rows;
  const fail = (def: ServerDef, row: Row, msg: string): void => {
    errors.set(key(def.id, row.id), [...(errors.get(key(def.id, row.id)) ?? []), msg]);
  };

  /** Starts a server for one repeat; undefined (and every row failed) when it cannot start. */
  const start = async (def: ServerDef, repeat: number): Promise<Live | undefined> => {
    const profileName = `${def.id.replace(/[^A-Za-z0-9.-]/g, '_')}-r${repeat + 1}-${stamp(startedAt)}.cpuprofile`;
    try {
      const server = await startServer(def, {
        file: file.path,
        dir: work,
        attach,
        ...(o.profile && def.kind !== 'peer' ? { profileDir, profileName } : {}),
      });
      recordOf(def.id).commands ??= server.commands;
      return { def, server, lifetimeKiB: 0 };
    } catch (err) {
      const msg = (err as Error).message;
      loud(`${def.id} did not start: ${msg}`);
      for (const row of rowsOf(def)) fail(def, row, msg);
      return undefined;
    }
  };

  const stop = async (live: Live): Promise<void> => {
    hwm(live);
    await live.server.stop();
    const rec = recordOf(live.def.id);
    rec.lifetimeHwmKiB = Math.max(rec.lifetimeHwmKiB ?? 0, live.lifetimeKiB);
  };

  /** One fio run of `row` against a running server, recorded with the server's CPU and memory. */
  const measure = async (live: Live, row: Row, repeat: number): Promise<void> => {
    const { def, server } = live;
    const rec = recordOf(def.id);
    const memoryRow = isMemoryRow(row);
    let reset = false;
    if (memoryRow) {
      hwm(live);
      reset = resetPeakRss(server.pid);
    }
    const label = `[${repeat + 1}/${o.repeats}] ${def.id.padEnd(22)} ${`${row.workload.label} ×${row.conns}`.padEnd(26)}`;
    try {
      const cpu0 = procCpuSeconds(server.pid);
      const t0 = performance.now();
      const out = await runFio(server.uri, row, {
        runtimeS: o.runtimeS,
        rampS: o.rampS,
        tmpDir: work,
      });
      const cpu1 = procCpuSeconds(server.pid);
      const wallS = (performance.now() - t0) / 1000;
      const sample: RunSample = {
        repeat,
        total: out.total,
        ...(out.read ? { read: out.read } : {}),
        ...(out.write ? { write: out.write } : {}),
      };
      if (cpu0 !== undefined && cpu1 !== undefined) {
        // Over the whole fio run, ramp included, against the requests of the measured part
        // scaled to the run's length: an estimate, good to about ±10%.
        sample.serverCpu = (cpu1 - cpu0) / wallS;
        sample.serverCpuUsPerIo = ((cpu1 - cpu0) * 1e6) / (out.total.iops * (o.runtimeS + o.rampS));
      }
      const list = samples.get(key(def.id, row.id)) ?? [];
      list.push(sample);
      samples.set(key(def.id, row.id), list);
      rowRecords.get(row.id)!.fioArgs ??= out.args;
      let mem = '';
      if (memoryRow) {
        const peak = hwm(live);
        rec.peakRssKiB = Math.max(rec.peakRssKiB ?? 0, peak);
        rec.peakRssMethod = reset ? 'reset' : 'lifetime';
        mem = `  RSS peak ${(peak / 1024).toFixed(0)} MiB`;
      }
      const t = out.total;
      process.stdout.write(
        `${label} ${fmtIops(t.iops).padStart(7)} IOPS ${t.mbps.toFixed(0).padStart(5)} MB/s  mean ${t.meanUs.toFixed(0).padStart(5)} µs  p99 ${t.p99Us.toFixed(0).padStart(6)} µs` +
          `${sample.serverCpu !== undefined ? `  server CPU ${(sample.serverCpu * 100).toFixed(0)}%` : ''}${mem}\n`,
      );
    } catch (err) {
      const msg = (err as Error).message;
      process.stdout.write(`${label} FAILED: ${msg.split('\n')[0]}\n`);
      fail(def, row, msg);
      if (server.stderr().trim())
        process.stderr.write(`${def.id} stderr: ${server.stderr().trim().slice(-800)}\n`);
    }
  };

  for (let repeat = 0; repeat < o.repeats; repeat++) {
    const order = repeat % 2 === 0 ? defs : [...defs].reverse();
    if (!o.interleave) {
      // One server process at a time: start it, run its rows, stop it.
      for (const def of order) {
        if (rowsOf(def).length === 0) continue;
        const live = await start(def, repeat);
        if (!live) continue;
        try {
          for (const row of rowsOf(def)) await measure(live, row, repeat);
        } finally {
          await stop(live);
        }
      }
      continue;
    }
    // Interleaved: every server of the repeat is up (idle but one), and each row goes to each
    // server in turn, so a change in the machine's load hits all servers of a row alike.
    const lives: Live[] = [];
    try {
      for (const def of order) {
        if (rowsOf(def).length === 0) continue;
        const live = await start(def, repeat);
        if (live) lives.push(live);
      }
      for (let i = 0; i < o.rows.length; i++) {
        const row = o.rows[i]!;
        const turn = i % 2 === 0 ? lives : [...lives].reverse();
        for (const live of turn)
          if (rowsOf(live.def).includes(row)) await measure(live, row, repeat);
      }
    } finally {
      for (const live of lives) await stop(live);
    }
  }

  for (const row of rowRecords.values()) {
    for (const def of defs) {
      const s = samples.get(key(def.id, row.id));
      const e = errors.get(key(def.id, row.id));
      if (!s?.length && !e?.length) continue;
      const reads = s?.flatMap((x) => (x.read ? [x.read] : [])) ?? [];
      const writes = s?.flatMap((x) => (x.write ? [x.write] : [])) ?? [];
      if (s?.length) {
        const cpu = s.flatMap((x) => (x.serverCpu !== undefined ? [x.serverCpu] : []));
        const cpuPerIo = s.flatMap((x) =>
          x.serverCpuUsPerIo !== undefined ? [x.serverCpuUsPerIo] : [],
        );
        row.servers[def.id] = {
          median: medianMetrics(s.map((x) => x.total)),
          ...(cpu.length ? { serverCpu: median(cpu), serverCpuUsPerIo: median(cpuPerIo) } : {}),
          ...(reads.length ? { read: medianMetrics(reads) } : {}),
          ...(writes.length ? { write: medianMetrics(writes) } : {}),
          samples: s,
          ...(e?.length ? { errors: e } : {}),
        };
      }
    }
  }

  const profiles = o.profile
    ? readdirSync(profileDir).filter((f) => f.endsWith('.cpuprofile') && !profilesBefore.has(f))
    : [];
  for (const p of profiles) {
    const rec = records.find((r) => p.startsWith(`${r.id.replace(/[^A-Za-z0-9.-]/g, '_')}-r`));
    if (rec) (rec.profiles ??= []).push(join('bench', 'results', 'profiles', p));
  }

  const notes: string[] = [];
  if (loadStart[0]! > 0.5) {
    notes.push(
      `the machine was busy before the run (load average ${loadStart.join(' ')}): other work shared the 2 CPUs, so numbers are noisy; compare ratios within this run only`,
    );
  }
  if (o.profile)
    notes.push('devfilter ran under node --cpu-prof: its numbers are lower than without profiling');
  // One note per server and message (a server that did not start fails all its rows alike).
  const failures = new Map<string, string[]>();
  for (const [k, v] of errors) {
    const [server, row] = k.split('\u0000') as [string, string];
    const msg = `${server}: ${v[0]!.split('\n')[0]!.slice(0, 300)}`;
    failures.set(msg, [...(failures.get(msg) ?? []), row]);
  }
  for (const [msg, rows] of failures) notes.push(`failed (${rows.join(', ')}): ${msg}`);

  const result: BenchResult = {
    format: 'devfilter-bench/1',
    startedAt: startedAt.toISOString(),
    finishedAt: new Date().toISOString(),
    mode: o.mode,
    profiled: o.profile,
    options: {
      runtimeS: o.runtimeS,
      rampS: o.rampS,
      repeats: o.repeats,
      interleave: o.interleave,
      rows: o.rows.map((r) => r.id),
      servers: defs.map((d) => d.id),
    },
    machine,
    loadAverage: { start: loadStart, end: loadAverage() },
    notes,
    file: { path: file.path, sizeBytes: o.sizeBytes, filledWith: file.filledWith },
    servers: records,
    rows: [...rowRecords.values()],
    goals: [],
  };
  result.goals = evaluate(result);

  process.stdout.write(`\n${renderReport(result)}\n`);

  if (o.profile) {
    for (const p of profiles) {
      process.stdout.write(
        `\n=== ${join('bench', 'results', 'profiles', p)}\n${formatSummary(summarise([loadProfile(join(profileDir, p))]))}\n`,
      );
    }
  }

  if (o.save) {
    const dir = join(REPO_ROOT, 'bench', 'results');
    mkdirSync(dir, { recursive: true });
    const base = `${stamp(startedAt)}-${o.mode}${o.profile ? '-profile' : ''}`;
    const json = portablePaths(`${JSON.stringify(result, null, 2)}\n`, REPO_ROOT);
    const md = portablePaths(renderMarkdownReport(result), REPO_ROOT);
    writeFileSync(join(dir, `${base}.json`), json);
    writeFileSync(join(dir, `${base}.md`), md);
    const saved = [`bench/results/${base}.{json,md}`];
    if (o.mode === 'custom' && !o.profile) {
      writeFileSync(join(dir, `${base}.svg`), renderChart(result));
      saved.push(`bench/results/${base}.svg`);
    }
    // latest.* is the last standard run (full or quick); a custom or profiled run keeps its
    // own files only, so that a quick look at one row does not replace the whole picture.
    if (!o.profile && o.mode !== 'custom') {
      writeFileSync(join(dir, 'latest.json'), json);
      writeFileSync(join(dir, 'latest.md'), md);
      writeFileSync(join(dir, 'latest.svg'), renderChart(result));
      saved.push('bench/results/latest.{json,md,svg}');
    }
    if (!o.profile && o.docs) {
      writeFileSync(join(REPO_ROOT, 'docs', 'performance.svg'), renderChart(result));
      saved.push('docs/performance.svg');
    }
    process.stdout.write(`\nsaved ${saved.join(', ')}\n`);
  }
}

main().catch((err: unknown) => {
  process.stderr.write(`bench: ${(err as Error).stack ?? String(err)}\n`);
  process.exitCode = 1;
});
