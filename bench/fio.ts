/** Runs one fio job against an NBD server and reduces its JSON output to the table's numbers. */
import { readFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { run } from './proc.js';
import { fioJobArgs, type Row } from './workloads.js';

/** One direction of a fio result, or both combined. */
export interface Metrics {
  iops: number;
  /** Decimal megabytes per second (10^6 bytes). */
  mbps: number;
  /** Mean total latency (submission to completion), µs. */
  meanUs: number;
  /** 99th percentile total latency, µs (randrw: the larger of read and write). */
  p99Us: number;
  /** Requests completed in the measured window (after ramp). */
  ios: number;
}

export interface FioOutcome {
  total: Metrics;
  read?: Metrics;
  write?: Metrics;
  errors: number;
  args: string[];
}

interface FioDir {
  iops: number;
  bw_bytes: number;
  total_ios: number;
  lat_ns: { mean: number; percentile?: Record<string, number> };
  clat_ns?: { percentile?: Record<string, number> };
}

interface FioJson {
  jobs: { error: number; read: FioDir; write: FioDir }[];
}

function dir(d: FioDir): Metrics {
  const pct = d.lat_ns.percentile ?? d.clat_ns?.percentile ?? {};
  return {
    iops: d.iops,
    mbps: d.bw_bytes / 1e6,
    meanUs: d.lat_ns.mean / 1000,
    p99Us: (pct['99.000000'] ?? 0) / 1000,
    ios: d.total_ios,
  };
}

/** fio may print its own messages ahead of the JSON in --output; the document starts at "{". */
export function parseFioOutput(text: string): FioJson {
  const start = text.startsWith('{') ? 0 : text.search(/^\{$/m);
  if (start < 0) throw new Error(`no JSON in fio output: ${text.slice(0, 500)}`);
  return JSON.parse(text.slice(start)) as FioJson;
}

export function summarise(json: FioJson): Omit<FioOutcome, 'args'> {
  const job = json.jobs[0];
  if (!job) throw new Error('fio reported no job');
  const read = job.read.total_ios > 0 ? dir(job.read) : undefined;
  const write = job.write.total_ios > 0 ? dir(job.write) : undefined;
  const parts = [read, write].filter((m): m is Metrics => m !== undefined);
  const ios = parts.reduce((s, m) => s + m.ios, 0);
  const total: Metrics = {
    iops: parts.reduce((s, m) => s + m.iops, 0),
    mbps: parts.reduce((s, m) => s + m.mbps, 0),
    meanUs: ios > 0 ? parts.reduce((s, m) => s + m.meanUs * m.ios, 0) / ios : 0,
    p99Us: Math.max(0, ...parts.map((m) => m.p99Us)),
    ios,
  };
  return { total, ...(read ? { read } : {}), ...(write ? { write } : {}), errors: job.error };
}

export async function runFio(
  uri: string,
  row: Row,
  opts: { runtimeS: number; rampS: number; tmpDir: string },
): Promise<FioOutcome> {
  return runFioJob(uri, fioJobArgs(row, opts.runtimeS, opts.rampS), {
    tmpDir: opts.tmpDir,
    timeoutMs: (opts.runtimeS + opts.rampS + 30) * 1000,
  });
}

/** Runs one fio job given as arguments (without engine, uri and output options). */
export async function runFioJob(
  uri: string,
  jobArgs: string[],
  opts: { tmpDir: string; timeoutMs: number },
): Promise<FioOutcome> {
  const output = join(opts.tmpDir, `fio-${process.pid}-${Date.now()}.json`);
  const args = [
    '--ioengine=nbd',
    `--uri=${uri}`,
    ...jobArgs,
    '--output-format=json',
    `--output=${output}`,
  ];
  const { timeoutMs } = opts;
  const r = await run('fio', args, { timeoutMs });
  try {
    if (r.timedOut) throw new Error(`fio did not finish within ${timeoutMs / 1000} s`);
    let text = '';
    try {
      text = readFileSync(output, 'utf8');
    } catch {
      // reported below with fio's stderr
    }
    if (r.code !== 0 || text === '') {
      throw new Error(
        `fio exited with ${r.code ?? r.signal}: ${(r.stderr + text).trim().slice(-800)}`,
      );
    }
    const result = summarise(parseFioOutput(text));
    if (result.errors !== 0)
      throw new Error(`fio reported error ${result.errors}: ${r.stderr.trim().slice(-400)}`);
    return { ...result, args: ['fio', ...args.filter((a) => !a.startsWith('--output='))] };
  } finally {
    rmSync(output, { force: true });
  }
}
