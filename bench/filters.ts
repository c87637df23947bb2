/**
 * Which filters the benchmark runs: every built-in type that exists when it runs (filters are
 * added to src/filters/ over time), plus the benchmark's own pass-through `bench-noop`, each
 * with arguments that make it do its normal work but never limit or fail a request.
 */
import { existsSync, mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { removeAtExit } from './proc.js';
import { paths, type FilterSpec } from './servers.js';

interface TypeInfo {
  name: string;
  argsSchema: {
    properties?: Record<string, { type?: string | string[]; maximum?: number; default?: unknown }>;
    required?: string[];
  };
}

/** A limit that is set but never reached by this benchmark (≈ 1 TB/s, 1e12 IOPS). */
const HUGE = 1e12;

/** A new directory beside the export file (in /dev/shm), removed when the benchmark ends. */
function scratchDir(type: string): string {
  const base = existsSync('/dev/shm') ? '/dev/shm' : tmpdir();
  const dir = mkdtempSync(join(base, `devfilter-bench-${type}-`));
  removeAtExit(dir);
  return dir;
}

/**
 * Arguments for a type in the benchmark: "no limit reached, no rule". Numbers that are
 * required get a huge value; throttle gets every numeric limit set huge so that its
 * accounting runs; a required `dir` (a journal's) gets a scratch directory beside the export
 * file. A type whose other required arguments are not numbers (paths, URIs) cannot be
 * guessed: undefined, and the caller says so.
 */
export function benchArgs(
  t: TypeInfo,
  scratch: (type: string) => string = scratchDir,
): Record<string, unknown> | undefined {
  const props = t.argsSchema.properties ?? {};
  const isNumber = (p: { type?: string | string[] }): boolean =>
    [p.type].flat().some((x) => x === 'number' || x === 'integer');
  const huge = (p: { maximum?: number }): number => Math.min(HUGE, p.maximum ?? HUGE);
  const args: Record<string, unknown> = {};
  for (const name of t.argsSchema.required ?? []) {
    const p = props[name] ?? {};
    if (p.default !== undefined) continue;
    if (name === 'dir' && [p.type].flat().includes('string')) {
      args[name] = scratch(t.name);
      continue;
    }
    if (!isNumber(p)) return undefined;
    args[name] = huge(p);
  }
  if (t.name === 'throttle') {
    // Every rate limit set, none reached; bucket sizes stay at their defaults.
    for (const [name, p] of Object.entries(props)) {
      if (isNumber(p) && !/burst/i.test(name) && args[name] === undefined) args[name] = huge(p);
    }
  }
  return args;
}

export interface FilterPlan {
  id: string;
  filter?: FilterSpec;
  /** Why the type is not run. */
  skipped?: string;
}

/** Types built into devfilter at this moment (the compiled src/filters/index.js). */
export async function builtinTypes(): Promise<TypeInfo[]> {
  const url = pathToFileURL(paths.builtinFilters).href;
  try {
    const mod = (await import(url)) as { builtinFilterTypes?: TypeInfo[] };
    return mod.builtinFilterTypes ?? [];
  } catch (err) {
    process.stderr.write(`bench: cannot load built-in filter types: ${(err as Error).message}\n`);
    return [];
  }
}

export async function benchTypes(): Promise<TypeInfo[]> {
  const mod = (await import(pathToFileURL(paths.benchFilterModule).href)) as {
    filterTypes: TypeInfo[];
  };
  return mod.filterTypes;
}

/**
 * Plans the filter servers. `wanted`: type names, or undefined for the default (every built-in
 * plus bench-noop). `overrides`: arguments given with --filter-args TYPE=JSON.
 */
export async function planFilters(
  wanted: string[] | undefined,
  overrides: Map<string, Record<string, unknown>>,
): Promise<FilterPlan[]> {
  const builtin = await builtinTypes();
  const bench = await benchTypes();
  const known = new Map<string, { t: TypeInfo; benchModule: boolean }>();
  for (const t of builtin) known.set(t.name, { t, benchModule: false });
  for (const t of bench) if (!known.has(t.name)) known.set(t.name, { t, benchModule: true });
  const names = wanted ?? [...builtin.map((t) => t.name), 'bench-noop'];
  return names.map((name) => {
    const id = `devfilter+${name}`;
    const k = known.get(name);
    if (!k)
      return {
        id,
        skipped: `no filter type "${name}" in this build (known: ${[...known.keys()].join(', ') || 'none'})`,
      };
    const args = overrides.get(name) ?? benchArgs(k.t);
    if (args === undefined) {
      return {
        id,
        skipped: `"${name}" needs arguments the benchmark cannot guess; give them with --filter-args ${name}='{"…":…}'`,
      };
    }
    return { id, filter: { type: name, args, benchModule: k.benchModule } };
  });
}
