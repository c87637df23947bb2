/**
 * Prints the functions with the most self time in V8 CPU profiles (`node --cpu-prof`), and
 * the same grouped by script, to see where a server spends its time without a flame-graph
 * viewer. (For the flame graph itself, open the .cpuprofile in Chrome DevTools → Performance,
 * or https://www.speedscope.app.)
 *
 *   node dist/bench/profile-summary.js PROFILE.cpuprofile [MORE...] [--top 25]
 */
import { readFileSync } from 'node:fs';
import { basename } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';

interface CallFrame {
  functionName: string;
  url: string;
  lineNumber: number;
  columnNumber: number;
}
interface ProfileNode {
  id: number;
  callFrame: CallFrame;
  children?: number[];
}
interface CpuProfile {
  nodes: ProfileNode[];
  startTime: number;
  endTime: number;
  samples?: number[];
  timeDeltas?: number[];
}

export interface FunctionTime {
  name: string;
  where: string;
  selfMs: number;
  totalMs: number;
}

export interface ProfileSummary {
  durationMs: number;
  /** Time not idle (everything but "(idle)"). */
  busyMs: number;
  functions: FunctionTime[];
  scripts: { script: string; selfMs: number }[];
}

function where(f: CallFrame): string {
  if (f.url === '') return '';
  const url = f.url.replace(/^file:\/\//, '');
  const short = url.includes('/dist/')
    ? url.slice(url.indexOf('/dist/') + 1)
    : url.includes('node_modules/')
      ? url.slice(url.indexOf('node_modules/'))
      : url;
  return `${short}:${f.lineNumber + 1}`;
}

function scriptOf(f: CallFrame): string {
  if (f.url === '') return f.functionName.startsWith('(') ? f.functionName : '(native)';
  const w = where(f);
  return w.slice(0, w.lastIndexOf(':'));
}

/** Self and inclusive time per function, merged over several profiles. */
export function summarise(profiles: CpuProfile[]): ProfileSummary {
  const self = new Map<string, FunctionTime>();
  const scripts = new Map<string, number>();
  let durationMs = 0;
  let idleMs = 0;
  for (const p of profiles) {
    const byId = new Map(p.nodes.map((n) => [n.id, n]));
    const parent = new Map<number, number>();
    for (const n of p.nodes) for (const c of n.children ?? []) parent.set(c, n.id);
    const samples = p.samples ?? [];
    const deltas = p.timeDeltas ?? [];
    durationMs += (p.endTime - p.startTime) / 1000;
    for (let i = 0; i < samples.length; i++) {
      // A sample lasts until the next one; the last lasts until the profile ends.
      const ms = (i + 1 < deltas.length ? deltas[i + 1]! : 0) / 1000;
      if (!(ms > 0)) continue;
      const node = byId.get(samples[i]!);
      if (!node) continue;
      const f = node.callFrame;
      if (f.functionName === '(idle)') idleMs += ms;
      const key = `${f.functionName}@${f.url}:${f.lineNumber}:${f.columnNumber}`;
      const entry = self.get(key) ?? {
        name: f.functionName || '(anonymous)',
        where: where(f),
        selfMs: 0,
        totalMs: 0,
      };
      entry.selfMs += ms;
      self.set(key, entry);
      const script = scriptOf(f);
      scripts.set(script, (scripts.get(script) ?? 0) + ms);
      // Inclusive time: once per distinct function on the stack (recursion counted once).
      const seen = new Set<string>();
      for (let id: number | undefined = node.id; id !== undefined; id = parent.get(id)) {
        const cf = byId.get(id)!.callFrame;
        const k = `${cf.functionName}@${cf.url}:${cf.lineNumber}:${cf.columnNumber}`;
        if (seen.has(k)) continue;
        seen.add(k);
        const e = self.get(k) ?? {
          name: cf.functionName || '(anonymous)',
          where: where(cf),
          selfMs: 0,
          totalMs: 0,
        };
        e.totalMs += ms;
        self.set(k, e);
      }
    }
  }
  return {
    durationMs,
    busyMs: durationMs - idleMs,
    functions: [...self.values()].sort((a, b) => b.selfMs - a.selfMs),
    scripts: [...scripts.entries()]
      .map(([script, selfMs]) => ({ script, selfMs }))
      .sort((a, b) => b.selfMs - a.selfMs),
  };
}

export function loadProfile(path: string): CpuProfile {
  return JSON.parse(readFileSync(path, 'utf8')) as CpuProfile;
}

export function formatSummary(s: ProfileSummary, top = 25): string {
  const pct = (ms: number): string => `${((ms / s.busyMs) * 100).toFixed(1)}%`.padStart(6);
  const lines = [
    `profile: ${(s.durationMs / 1000).toFixed(1)} s, busy (not idle) ${(s.busyMs / 1000).toFixed(1)} s; % of busy time`,
    '',
    `top ${top} functions by self time:`,
    `${'self ms'.padStart(9)} ${'self'.padStart(6)} ${'total'.padStart(6)}  function (script:line)`,
  ];
  for (const f of s.functions.filter((x) => x.name !== '(idle)').slice(0, top)) {
    lines.push(
      `${f.selfMs.toFixed(0).padStart(9)} ${pct(f.selfMs)} ${pct(f.totalMs)}  ${f.name}${f.where ? `  ${f.where}` : ''}`,
    );
  }
  lines.push('', 'self time by script:');
  for (const sc of s.scripts.filter((x) => x.script !== '(idle)').slice(0, 15)) {
    lines.push(`${sc.selfMs.toFixed(0).padStart(9)} ${pct(sc.selfMs)}  ${sc.script}`);
  }
  return lines.join('\n');
}

function main(): void {
  const { values, positionals } = parseArgs({
    allowPositionals: true,
    options: { top: { type: 'string', default: '25' } },
  });
  if (positionals.length === 0) {
    process.stderr.write(
      'usage: node dist/bench/profile-summary.js PROFILE.cpuprofile [MORE...] [--top N]\n',
    );
    process.exitCode = 2;
    return;
  }
  process.stdout.write(`${positionals.map((p) => basename(p)).join(', ')}\n`);
  process.stdout.write(
    `${formatSummary(summarise(positionals.map(loadProfile)), Number(values.top))}\n`,
  );
}

if (process.argv[1] !== undefined && fileURLToPath(import.meta.url) === process.argv[1]) main();
