/** Renders a benchmark result as text tables (terminal) or Markdown (docs). */
import {
  FILTER_GOAL,
  GOAL_FILTERS,
  GOAL_PEERS,
  PEER_GOAL,
  RSS_GOAL_MIB,
  ratioKey,
  type BenchResult,
  type RowRecord,
} from './results.js';

interface Table {
  title: string;
  headers: string[];
  rows: string[][];
  /** Columns aligned left (the rest right). */
  left: number;
}

export const MISS = '✗';

export function fmtIops(v: number | undefined): string {
  if (v === undefined || !Number.isFinite(v)) return '-';
  if (v >= 10_000) return `${(v / 1000).toFixed(1)}k`;
  if (v >= 1000) return `${(v / 1000).toFixed(2)}k`;
  return v.toFixed(0);
}

function fmtNum(v: number | undefined, digits = 0): string {
  if (v === undefined || !Number.isFinite(v)) return '-';
  return v.toFixed(v < 100 && digits === 0 ? 1 : digits);
}

function fmtRatio(v: number | undefined, goal: number | undefined): string {
  if (v === undefined || !Number.isFinite(v)) return '-';
  const text = `${v.toFixed(2)}x`;
  return goal !== undefined && v < goal ? `${MISS} ${text}` : text;
}

function rowLabel(r: RowRecord): string {
  return `${r.label} ×${r.conns}`;
}

function peerTable(result: BenchResult): Table | undefined {
  const servers = result.servers
    .filter((s) => (s.kind === 'devfilter' || s.kind === 'peer') && !s.skipped)
    .map((s) => s.id);
  if (servers.length === 0) return undefined;
  const peers = servers.filter((s) => s !== 'devfilter');
  const headers = ['workload × conns'];
  for (const s of servers) headers.push(`${s} IOPS`, 'MB/s', 'mean µs', 'p99 µs');
  if (servers.includes('devfilter')) for (const p of peers) headers.push(`df/${p}`);
  const rows: string[][] = [];
  for (const r of result.rows) {
    if (!servers.some((s) => r.servers[s])) continue;
    const cells = [rowLabel(r)];
    for (const s of servers) {
      const m = r.servers[s]?.median;
      cells.push(fmtIops(m?.iops), fmtNum(m?.mbps), fmtNum(m?.meanUs), fmtNum(m?.p99Us));
    }
    if (servers.includes('devfilter')) {
      for (const p of peers)
        cells.push(
          fmtRatio(
            r.ratios[ratioKey('devfilter', p)],
            GOAL_PEERS.includes(p) ? PEER_GOAL : undefined,
          ),
        );
    }
    rows.push(cells);
  }
  return {
    title: 'Servers (medians; df/peer = devfilter IOPS ÷ peer IOPS)',
    headers,
    rows,
    left: 1,
  };
}

function filterTable(result: BenchResult): Table | undefined {
  const filters = result.servers.filter((s) => s.kind === 'filter' && !s.skipped);
  if (filters.length === 0) return undefined;
  const headers = ['workload × conns', 'devfilter IOPS'];
  for (const f of filters) headers.push(`${f.id} IOPS`, 'p99 µs', 'ratio');
  const rows: string[][] = [];
  for (const r of result.rows) {
    if (!filters.some((f) => r.servers[f.id])) continue;
    const cells = [rowLabel(r), fmtIops(r.servers.devfilter?.median.iops)];
    for (const f of filters) {
      const m = r.servers[f.id]?.median;
      const goal = f.filter && GOAL_FILTERS.has(f.filter.type) ? FILTER_GOAL : undefined;
      cells.push(
        fmtIops(m?.iops),
        fmtNum(m?.p99Us),
        fmtRatio(r.ratios[ratioKey(f.id, 'devfilter')], goal),
      );
    }
    rows.push(cells);
  }
  return {
    title: 'Filters (ratio = IOPS with the filter ÷ devfilter with no filter)',
    headers,
    rows,
    left: 1,
  };
}

function rssTable(result: BenchResult): Table | undefined {
  const servers = result.servers.filter(
    (s) => !s.skipped && (s.peakRssKiB !== undefined || s.lifetimeHwmKiB !== undefined),
  );
  if (servers.length === 0) return undefined;
  const rows = servers.map((s) => {
    const peak = s.peakRssKiB === undefined ? '-' : (s.peakRssKiB / 1024).toFixed(1);
    const goal =
      s.kind !== 'peer' && s.peakRssKiB !== undefined && s.peakRssKiB / 1024 >= RSS_GOAL_MIB
        ? `${MISS} `
        : '';
    return [
      s.id,
      `${goal}${peak}`,
      s.lifetimeHwmKiB === undefined ? '-' : (s.lifetimeHwmKiB / 1024).toFixed(1),
    ];
  });
  return {
    title: `Resident memory (MiB; goal for devfilter: < ${RSS_GOAL_MIB} MiB under the 4-connection QD32 load)`,
    headers: ['server', 'peak RSS, 4 conns QD32', 'peak RSS, whole run'],
    rows,
    left: 1,
  };
}

function cpuTable(result: BenchResult): Table | undefined {
  const servers = result.servers.filter(
    (s) => !s.skipped && result.rows.some((r) => r.servers[s.id]?.serverCpu !== undefined),
  );
  if (servers.length === 0) return undefined;
  const rows: string[][] = [];
  for (const r of result.rows) {
    if (!servers.some((s) => r.servers[s.id])) continue;
    rows.push([
      rowLabel(r),
      ...servers.map((s) => {
        const x = r.servers[s.id];
        return x?.serverCpu === undefined
          ? '-'
          : `${fmtNum(x.serverCpuUsPerIo)} (${(x.serverCpu * 100).toFixed(0)}%)`;
      }),
    ]);
  }
  return {
    title:
      'Server CPU: µs of CPU per request (CPU use, 200% = both cores), all threads, ramp included',
    headers: ['workload × conns', ...servers.map((s) => s.id)],
    rows,
    left: 1,
  };
}

export function tables(result: BenchResult): Table[] {
  return [peerTable(result), filterTable(result), cpuTable(result), rssTable(result)].filter(
    (t): t is Table => t !== undefined,
  );
}

function width(s: string): number {
  return [...s].length;
}

export function renderText(t: Table): string {
  const widths = t.headers.map((h, i) =>
    Math.max(width(h), ...t.rows.map((r) => width(r[i] ?? ''))),
  );
  const line = (cells: string[]): string =>
    cells
      .map((c, i) =>
        i < t.left ? c + ' '.repeat(widths[i]! - width(c)) : ' '.repeat(widths[i]! - width(c)) + c,
      )
      .join('  ');
  return [
    t.title,
    line(t.headers),
    widths.map((w) => '-'.repeat(w)).join('  '),
    ...t.rows.map(line),
  ].join('\n');
}

export function renderMarkdown(t: Table): string {
  const align = t.headers.map((_, i) => (i < t.left ? '---' : '---:'));
  return [
    `**${t.title}**`,
    '',
    `| ${t.headers.join(' | ')} |`,
    `| ${align.join(' | ')} |`,
    ...t.rows.map((r) => `| ${r.join(' | ')} |`),
  ].join('\n');
}

function goalSummary(result: BenchResult): string[] {
  const missed = result.goals.filter((g) => !g.met);
  const lines = [
    `Goals: ${result.goals.length - missed.length} of ${result.goals.length} met (${MISS} marks a miss).`,
  ];
  for (const g of missed) {
    const value = g.goal.includes('RSS') ? `${g.value.toFixed(1)} MiB` : `${g.value.toFixed(2)}x`;
    lines.push(`  ${MISS} ${g.goal}${g.row ? ` on ${g.row}` : ''}: ${value}`);
  }
  return lines;
}

function header(result: BenchResult): string[] {
  const m = result.machine;
  return [
    `devfilter benchmark ${result.startedAt} (${result.mode}${result.profiled ? ', PROFILED: devfilter ran under --cpu-prof' : ''})`,
    `${m.cpus} × ${m.cpuModel}, ${m.memoryGiB} GiB, Linux ${m.kernel}, Node ${m.node}, ${m.fio ?? 'fio ?'}, ${m.nbdkit ?? 'no nbdkit'}, ${m.qemuNbd ?? 'no qemu-nbd'}`,
    `runtime ${result.options.runtimeS} s + ramp ${result.options.rampS} s, ${result.options.repeats} repeat(s), ${result.options.interleave ? 'interleaved (all servers up, each row on each in turn)' : 'one server process at a time'}, load average at start ${result.loadAverage.start.join(' ')}, at end ${result.loadAverage.end.join(' ')}`,
    ...result.notes.map((n) => `note: ${n}`),
  ];
}

export function renderReport(result: BenchResult): string {
  const skipped = result.servers
    .filter((s) => s.skipped)
    .map((s) => `skipped ${s.id}: ${s.skipped}`);
  return [
    ...header(result),
    ...skipped,
    '',
    ...tables(result).flatMap((t) => [renderText(t), '']),
    ...goalSummary(result),
  ].join('\n');
}

export function renderMarkdownReport(result: BenchResult): string {
  const skipped = result.servers
    .filter((s) => s.skipped)
    .map((s) => `- skipped ${s.id}: ${s.skipped}`);
  return [
    ...header(result).map((l) => `${l}  `),
    ...skipped,
    '',
    ...tables(result).flatMap((t) => [renderMarkdown(t), '']),
    ...goalSummary(result).map((l) => (l.startsWith('  ') ? `- ${l.trim()}` : l)),
    '',
  ].join('\n');
}
