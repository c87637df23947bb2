/**
 * A small SVG bar chart of a result's ratios, written by hand: one panel of devfilter ÷ peer
 * per row, one of filter ÷ no filter, with the goal drawn as a line.
 */
import { FILTER_GOAL, PEER_GOAL, type BenchResult } from './results.js';

const COLORS = [
  '#3b6fb6',
  '#e08a2c',
  '#5a9e4b',
  '#9b59b6',
  '#c0392b',
  '#16a085',
  '#7f8c8d',
  '#d4ac0d',
];

interface Series {
  key: string;
  label: string;
}

interface Panel {
  title: string;
  goal: number;
  series: Series[];
  rows: { label: string; values: (number | undefined)[] }[];
}

function esc(s: string): string {
  return s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');
}

function panels(result: BenchResult): Panel[] {
  const out: Panel[] = [];
  const make = (title: string, goal: number, series: Series[]): void => {
    const rows = result.rows
      .map((r) => ({ label: `${r.label} ×${r.conns}`, values: series.map((s) => r.ratios[s.key]) }))
      .filter((r) => r.values.some((v) => v !== undefined));
    if (rows.length > 0) out.push({ title, goal, series, rows });
  };
  const peers = result.servers.filter((s) => s.kind === 'peer' && !s.skipped);
  make(
    'devfilter (no filter) ÷ peer, IOPS',
    PEER_GOAL,
    peers.map((p) => ({ key: `devfilter/${p.id}`, label: `devfilter ÷ ${p.id}` })),
  );
  const filters = result.servers.filter((s) => s.kind === 'filter' && !s.skipped);
  make(
    'devfilter with filter ÷ devfilter with no filter, IOPS',
    FILTER_GOAL,
    filters.map((f) => ({ key: `${f.id}/devfilter`, label: f.id })),
  );
  return out;
}

export function renderChart(result: BenchResult): string {
  const ps = panels(result);
  const width = 900;
  const left = 110;
  const right = 20;
  const plotH = 220;
  const labelH = 110;
  const panelH = 70 + plotH + labelH;
  const height = 50 + ps.length * panelH + 10;
  const out: string[] = [];
  out.push(
    `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}" font-family="sans-serif" font-size="12">`,
    `<rect width="${width}" height="${height}" fill="#fff"/>`,
    `<text x="${left}" y="22" font-size="15" font-weight="bold">devfilter benchmark — ${esc(result.startedAt.slice(0, 16).replace('T', ' '))} UTC, ${esc(`${result.machine.cpus} CPUs`)}, ${result.options.runtimeS} s × ${result.options.repeats}${result.mode === 'quick' ? ' (quick)' : ''}</text>`,
    `<text x="${left}" y="40" fill="#555">ratios of medians from one run; higher is better; the dashed line is the goal, pale bars miss it</text>`,
  );
  ps.forEach((p, pi) => {
    const top = 50 + pi * panelH;
    const y0 =
      top +
      30 +
      14 *
        (1 +
          Math.floor(
            p.series.reduce((w, s) => w + 24 + s.label.length * 6.5, 0) / (width - left - right),
          ));
    const max =
      Math.max(
        1.2,
        ...p.rows.flatMap((r) => r.values.filter((v): v is number => v !== undefined)),
      ) * 1.05;
    const step = max > 3 ? 1 : max > 1.6 ? 0.5 : 0.25;
    const y = (v: number): number => y0 + plotH - (v / max) * plotH;
    out.push(
      `<text x="${left}" y="${top + 18}" font-size="13" font-weight="bold">${esc(p.title)}</text>`,
    );
    for (let t = 0; t <= max + 1e-9; t += step) {
      out.push(
        `<line x1="${left}" x2="${width - right}" y1="${y(t).toFixed(1)}" y2="${y(t).toFixed(1)}" stroke="#e5e5e5"/>`,
        `<text x="${left - 6}" y="${(y(t) + 4).toFixed(1)}" text-anchor="end" fill="#555">${t.toFixed(2)}×</text>`,
      );
    }
    const groupW = (width - left - right) / p.rows.length;
    const barW = Math.max(3, Math.min(28, (groupW * 0.8) / p.series.length));
    p.rows.forEach((r, ri) => {
      const gx = left + ri * groupW + (groupW - barW * p.series.length) / 2;
      r.values.forEach((v, si) => {
        if (v === undefined) return;
        const x = gx + si * barW;
        const fill = COLORS[si % COLORS.length]!;
        out.push(
          `<rect x="${x.toFixed(1)}" y="${y(v).toFixed(1)}" width="${(barW - 1).toFixed(1)}" height="${(y0 + plotH - y(v)).toFixed(1)}" fill="${fill}"${v < p.goal ? ' fill-opacity="0.55"' : ''}><title>${esc(`${p.series[si]!.label}, ${r.label}: ${v.toFixed(2)}×`)}</title></rect>`,
        );
      });
      r.values.forEach((v, si) => {
        if (v === undefined || barW < 18) return;
        const x = gx + si * barW + (barW - 1) / 2;
        out.push(
          `<text x="${x.toFixed(1)}" y="${(y(v) - 3).toFixed(1)}" text-anchor="middle" font-size="9" fill="#333">${v.toFixed(2)}</text>`,
        );
      });
      const lx = left + ri * groupW + groupW / 2 + 4;
      const ly = y0 + plotH + 14;
      out.push(
        `<text transform="translate(${lx.toFixed(1)},${ly}) rotate(-30)" text-anchor="end" fill="#333">${esc(r.label)}</text>`,
      );
    });
    out.push(
      `<line x1="${left}" x2="${width - right}" y1="${y(p.goal).toFixed(1)}" y2="${y(p.goal).toFixed(1)}" stroke="#c0392b" stroke-width="1.5" stroke-dasharray="6 3"/>`,
      `<line x1="${left}" x2="${left}" y1="${y0}" y2="${y0 + plotH}" stroke="#999"/>`,
    );
    let lx = left;
    let ly = top + 24;
    p.series.forEach((s, si) => {
      const w = 24 + s.label.length * 6.5;
      if (lx + w > width - right) {
        lx = left;
        ly += 14;
      }
      out.push(
        `<rect x="${lx}" y="${ly}" width="10" height="10" fill="${COLORS[si % COLORS.length]}"/>`,
        `<text x="${lx + 14}" y="${ly + 9}">${esc(s.label)}</text>`,
      );
      lx += w;
    });
  });
  out.push('</svg>', '');
  return out.join('\n');
}
