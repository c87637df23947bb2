/**
 * The fio jobs of the benchmark (issue 3): the same job against every server. Each workload
 * runs with 1 and with 4 connections; fio's nbd engine opens one connection per job, so
 * "4 connections" is `numjobs=4` with `group_reporting` (4 × the queue depth in flight).
 */

export interface Workload {
  /** Stable id used on the command line and in the JSON (e.g. "4k-randread-qd32"). */
  readonly id: string;
  readonly label: string;
  readonly rw: 'randread' | 'randwrite' | 'randrw' | 'read' | 'write';
  readonly bs: string;
  readonly iodepth: number;
  readonly rwmixread?: number;
}

export const WORKLOADS: readonly Workload[] = [
  { id: '4k-randread-qd1', label: '4k rand read QD1', rw: 'randread', bs: '4k', iodepth: 1 },
  { id: '4k-randread-qd32', label: '4k rand read QD32', rw: 'randread', bs: '4k', iodepth: 32 },
  { id: '4k-randwrite-qd32', label: '4k rand write QD32', rw: 'randwrite', bs: '4k', iodepth: 32 },
  {
    id: '64k-randrw-qd16',
    label: '64k 70/30 randrw QD16',
    rw: 'randrw',
    bs: '64k',
    iodepth: 16,
    rwmixread: 70,
  },
  { id: '1m-read-qd8', label: '1M seq read QD8', rw: 'read', bs: '1m', iodepth: 8 },
  { id: '1m-write-qd8', label: '1M seq write QD8', rw: 'write', bs: '1m', iodepth: 8 },
];

export const CONNECTIONS = [1, 4] as const;

/** One row of the table: a workload at a number of connections. */
export interface Row {
  readonly id: string;
  readonly workload: Workload;
  readonly conns: number;
}

export function rowId(workloadId: string, conns: number): string {
  return `${workloadId}@${conns}`;
}

export function allRows(
  workloads: readonly Workload[] = WORKLOADS,
  conns: readonly number[] = CONNECTIONS,
): Row[] {
  const rows: Row[] = [];
  for (const w of workloads)
    for (const c of conns) rows.push({ id: rowId(w.id, c), workload: w, conns: c });
  return rows;
}

/**
 * `--quick` runs these rows only, so that build + fill + three servers + filters fit in two
 * minutes: every workload with one connection but QD1, plus the 4-connection QD32 read (the
 * memory goal is measured under it).
 */
export const QUICK_ROWS = [
  '4k-randread-qd32@1',
  '4k-randread-qd32@4',
  '4k-randwrite-qd32@1',
  '64k-randrw-qd16@1',
  '1m-read-qd8@1',
  '1m-write-qd8@1',
];

/** Rows that filter variants run by default (ratios against devfilter with no filter). */
export const FILTER_ROWS_QUICK = ['4k-randread-qd32@1', '1m-write-qd8@1'];
export const FILTER_ROWS_FULL = [
  '4k-randread-qd32@1',
  '4k-randread-qd32@4',
  '4k-randwrite-qd32@1',
  '64k-randrw-qd16@1',
  '1m-read-qd8@1',
  '1m-write-qd8@1',
];

/** True for the rows under which the daemon's resident size is recorded (the memory goal). */
export function isMemoryRow(row: Row): boolean {
  return row.conns === 4 && row.workload.iodepth === 32;
}

/** fio arguments for a row (without engine, uri and output options). */
export function fioJobArgs(row: Row, runtimeS: number, rampS: number): string[] {
  const w = row.workload;
  const args = [
    `--name=${w.id}`,
    `--rw=${w.rw}`,
    `--bs=${w.bs}`,
    `--iodepth=${w.iodepth}`,
    `--numjobs=${row.conns}`,
    '--group_reporting',
    '--time_based',
    `--runtime=${Math.round(runtimeS * 1000)}ms`,
    `--ramp_time=${Math.round(rampS * 1000)}ms`,
    '--norandommap',
    '--randrepeat=0',
    '--lat_percentiles=1',
  ];
  if (w.rwmixread !== undefined) args.push(`--rwmixread=${w.rwmixread}`);
  if (row.conns > 1 && (w.rw === 'read' || w.rw === 'write')) {
    // Sequential jobs get a quarter of the device each instead of all streaming the same bytes.
    args.push('--size=25%', '--offset_increment=25%');
  }
  return args;
}
