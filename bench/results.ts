/** The saved form of a benchmark run (bench/results/*.json) and the goals of issue 3. */
import type { Metrics } from './fio.js';
import type { MachineDescription } from './machine.js';
import type { FilterSpec, ServerKind } from './servers.js';

export interface ServerRecord {
  id: string;
  kind: ServerKind;
  notes: string;
  filter?: FilterSpec;
  /** How the filter was attached: the control CLI, or the bench launcher (bench/serve-filtered.ts). */
  attach?: string;
  /** Exact commands of the first start. */
  commands?: string[][];
  skipped?: string;
  /** Peak resident size (KiB) under the 4-connection QD32 rows: VmHWM reset before each. */
  peakRssKiB?: number;
  /** How the peak was taken: "reset" (clear_refs, per row) or "lifetime" (VmHWM since start). */
  peakRssMethod?: 'reset' | 'lifetime';
  /** Largest VmHWM seen over the server's whole life (start, all rows). */
  lifetimeHwmKiB?: number;
  /** CPU profiles written (with --profile). */
  profiles?: string[];
}

export interface RunSample {
  repeat: number;
  /** The server's CPU time over the fio run (ramp included) ÷ wall time: 2.0 = both cores. */
  serverCpu?: number;
  /** The server's CPU time per request, µs (over the run, ramp included). */
  serverCpuUsPerIo?: number;
  total: Metrics;
  read?: Metrics;
  write?: Metrics;
}

export interface ServerRowResult {
  /** Per-metric medians over the repeats. */
  median: Metrics;
  /** Median server CPU use (cores) and CPU µs per request. */
  serverCpu?: number;
  serverCpuUsPerIo?: number;
  read?: Metrics;
  write?: Metrics;
  samples: RunSample[];
  errors?: string[];
}

export interface RowRecord {
  id: string;
  workload: string;
  label: string;
  conns: number;
  fioArgs?: string[];
  servers: Record<string, ServerRowResult>;
  /** IOPS ratios, e.g. "devfilter/nbdkit" or "devfilter+stats/devfilter". */
  ratios: Record<string, number>;
}

export interface GoalCheck {
  goal: string;
  row?: string;
  server?: string;
  value: number;
  threshold: number;
  met: boolean;
}

export interface BenchResult {
  format: 'devfilter-bench/1';
  startedAt: string;
  finishedAt: string;
  mode: 'quick' | 'full' | 'custom';
  profiled: boolean;
  options: {
    runtimeS: number;
    rampS: number;
    repeats: number;
    interleave: boolean;
    rows: string[];
    servers: string[];
  };
  machine: MachineDescription;
  loadAverage: { start: number[]; end: number[] };
  notes: string[];
  file: { path: string; sizeBytes: number; filledWith: string };
  servers: ServerRecord[];
  rows: RowRecord[];
  goals: GoalCheck[];
}

/** The goals of issue 3 ("ratios from one run, medians of repeats"). */
export const PEER_GOAL = 1.0;
export const FILTER_GOAL = 0.97;
export const RSS_GOAL_MIB = 200;
/** Filters the issue sets the 0.97× goal for; other filters get a ratio, not a verdict. */
export const GOAL_FILTERS = new Set(['stats', 'throttle', 'fault', 'bench-empty']);
/** Peers devfilter must match; others (nbdkit-t2) are shown for information. */
export const GOAL_PEERS = ['nbdkit', 'qemu-nbd'];

export function median(values: number[]): number {
  if (values.length === 0) return NaN;
  const s = [...values].sort((a, b) => a - b);
  const mid = s.length >> 1;
  return s.length % 2 === 1 ? s[mid]! : (s[mid - 1]! + s[mid]!) / 2;
}

export function medianMetrics(samples: Metrics[]): Metrics {
  return {
    iops: median(samples.map((m) => m.iops)),
    mbps: median(samples.map((m) => m.mbps)),
    meanUs: median(samples.map((m) => m.meanUs)),
    p99Us: median(samples.map((m) => m.p99Us)),
    ios: median(samples.map((m) => m.ios)),
  };
}

export function ratioKey(server: string, baseline: string): string {
  return `${server}/${baseline}`;
}

/** Fills rows[].ratios and returns every goal verdict. */
export function evaluate(result: Pick<BenchResult, 'rows' | 'servers'>): GoalCheck[] {
  const goals: GoalCheck[] = [];
  const filters = result.servers.filter((s) => s.kind === 'filter' && !s.skipped);
  const peers = result.servers.filter((s) => s.kind === 'peer' && !s.skipped);
  for (const row of result.rows) {
    const df = row.servers.devfilter?.median.iops;
    if (df === undefined) continue;
    for (const p of peers) {
      const v = row.servers[p.id]?.median.iops;
      if (v === undefined || !(v > 0)) continue;
      const ratio = df / v;
      row.ratios[ratioKey('devfilter', p.id)] = ratio;
      if (GOAL_PEERS.includes(p.id)) {
        goals.push({
          goal: `devfilter >= ${PEER_GOAL}x ${p.id}`,
          row: row.id,
          server: p.id,
          value: ratio,
          threshold: PEER_GOAL,
          met: ratio >= PEER_GOAL,
        });
      }
    }
    for (const f of filters) {
      const v = row.servers[f.id]?.median.iops;
      if (v === undefined || !(df > 0)) continue;
      const ratio = v / df;
      row.ratios[ratioKey(f.id, 'devfilter')] = ratio;
      if (f.filter && GOAL_FILTERS.has(f.filter.type)) {
        goals.push({
          goal: `${f.id} >= ${FILTER_GOAL}x devfilter`,
          row: row.id,
          server: f.id,
          value: ratio,
          threshold: FILTER_GOAL,
          met: ratio >= FILTER_GOAL,
        });
      }
    }
  }
  for (const s of result.servers) {
    if ((s.kind === 'devfilter' || s.kind === 'filter') && s.peakRssKiB !== undefined) {
      const mib = s.peakRssKiB / 1024;
      goals.push({
        goal: `${s.id} RSS under 4-conn QD32 < ${RSS_GOAL_MIB} MiB`,
        server: s.id,
        value: mib,
        threshold: RSS_GOAL_MIB,
        met: mib < RSS_GOAL_MIB,
      });
    }
  }
  return goals;
}
