/**
 * `npm run bench:micro`: the cost of the filter stack itself, in process, with no sockets.
 * A MemoryBackend under a LiveStack with 0, 1, 4 and 16 filters — filters with no hooks
 * (the stack binds straight to the layer below), hooks that return next's promise, and
 * async hooks that await it — and with each built-in filter (one layer, arguments that never
 * limit or fail: see bench/filters.ts), doing 4 KiB reads and writes from many concurrent
 * callers.
 * Each configuration runs in its own Node process, so that the JIT's view of one (call sites
 * that went polymorphic) does not slow the next.
 *
 *   npm run bench:micro -- [--ops N] [--rounds N] [--passes N] [--concurrency N]
 *                          [--filters stats,fault] [--no-save]
 *
 * Reported: CPU time per request (not wall time), the best round of all; on a shared machine
 * noise only adds.
 */
import { spawnSync } from 'node:child_process';
import { mkdirSync, writeFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { MemoryBackend } from '../src/backends/memory.js';
import type { Device } from '../src/core/device.js';
import type { Filter, FilterType } from '../src/core/filter.js';
import { LiveStack, type StackEntry } from '../src/core/stack.js';
import { describeMachine, loadAverage } from './machine.js';
import { pino } from 'pino';
import { benchArgs, builtinTypes } from './filters.js';
import { emptyFilter, emptyType, noopFilter, noopType } from './noop-filters.js';
import { REPO_ROOT } from './servers.js';

/** Small enough to stay in the CPU caches: the backend's cost should be steady, not the point. */
const SIZE = 8 * 1024 * 1024;
const BLOCK = 4096;

function asyncFilter(): Filter {
  return {
    async read(next, buf, offset, flags, ctx) {
      await next.read(buf, offset, flags, ctx);
    },
    async write(next, data, offset, flags, ctx) {
      await next.write(data, offset, flags, ctx);
    },
  };
}
const asyncType: FilterType = {
  ...noopType,
  name: 'bench-async',
  description: 'async hooks that await next',
  create: asyncFilter,
};

interface Config {
  label: string;
  layers: number;
  kind: 'backend' | 'none' | 'empty' | 'noop' | 'async' | 'builtin';
  /** kind 'builtin': the filter type's name. */
  filterType?: string;
}

/** The registry validates arguments and fills in defaults, as the daemon does. */
interface Registry {
  register(t: FilterType): void;
  validateArgs(name: string, args: Record<string, unknown>): Record<string, unknown>;
}

async function builtinEntry(name: string, backend: Device): Promise<StackEntry> {
  // Loaded at run time (like the harness does), so a change in src/filters cannot break the build.
  const types = (await builtinTypes()) as unknown as FilterType[];
  const type = types.find((t) => t.name === name);
  if (!type) throw new Error(`no built-in filter type ${name}`);
  const { FilterTypeRegistry } = (await import(
    new URL('../src/core/filter-types.js', import.meta.url).href
  )) as {
    FilterTypeRegistry: new () => Registry;
  };
  const registry = new FilterTypeRegistry();
  registry.register(type);
  const args = registry.validateArgs(
    name,
    benchArgs(type as unknown as Parameters<typeof benchArgs>[0]) ?? {},
  );
  const filter = await type.create(args, {
    exportName: 'bench',
    filterName: name,
    logger: pino({ level: 'silent' }),
    below: backend.info(),
    emit: () => undefined,
  });
  return { name, type, args, filter };
}

const CONFIGS: Config[] = [
  { label: 'MemoryBackend alone (no stack)', layers: 0, kind: 'backend' },
  { label: 'LiveStack, no filters', layers: 0, kind: 'none' },
  ...[1, 4, 16].map((n): Config => ({
    label: `${n} × filter with no hooks`,
    layers: n,
    kind: 'empty',
  })),
  ...[1, 4, 16].map((n): Config => ({
    label: `${n} × hooks returning next()`,
    layers: n,
    kind: 'noop',
  })),
  ...[1, 4, 16].map((n): Config => ({
    label: `${n} × async hooks awaiting next()`,
    layers: n,
    kind: 'async',
  })),
];

async function build(c: Config): Promise<Device> {
  const backend = new MemoryBackend({ size: SIZE });
  // Every page allocated so that reads copy data, as on a filled export.
  const chunk = Buffer.alloc(1024 * 1024, 0xa5);
  for (let off = 0; off < SIZE; off += chunk.length) await backend.write(chunk, off, 0);
  if (c.kind === 'backend') return backend;
  const stack = new LiveStack(backend);
  if (c.kind === 'none') return stack;
  if (c.kind === 'builtin') {
    const entry = await builtinEntry(c.filterType!, backend);
    await stack.change(() => [entry], 1000);
    return stack;
  }
  const [type, make] =
    c.kind === 'empty'
      ? [emptyType, emptyFilter]
      : c.kind === 'noop'
        ? [noopType, noopFilter]
        : [asyncType, asyncFilter];
  const entries: StackEntry[] = Array.from({ length: c.layers }, (_, i) => ({
    name: `f${i}`,
    type,
    args: {},
    filter: make(),
  }));
  await stack.change(() => entries, 1000);
  return stack;
}

/**
 * CPU ns per operation with `concurrency` callers each awaiting one request at a time. CPU
 * time (user + system, GC threads included), not wall time: on a shared machine the wall
 * clock also counts the time other processes had the CPU.
 */
async function measure(
  dev: Device,
  op: 'read' | 'write',
  ops: number,
  concurrency: number,
): Promise<number> {
  const offsets = new Float64Array(4096);
  for (let i = 0; i < offsets.length; i++)
    offsets[i] = Math.floor(Math.random() * (SIZE / BLOCK)) * BLOCK;
  const mask = offsets.length - 1;
  const perWorker = Math.ceil(ops / concurrency);
  const worker = async (w: number): Promise<void> => {
    const buf = Buffer.alloc(BLOCK, w);
    if (op === 'read')
      for (let i = 0; i < perWorker; i++)
        await dev.read(buf, offsets[(i * concurrency + w) & mask]!, 0);
    else
      for (let i = 0; i < perWorker; i++)
        await dev.write(buf, offsets[(i * concurrency + w) & mask]!, 0);
  };
  const t0 = process.cpuUsage();
  await Promise.all(Array.from({ length: concurrency }, (_, w) => worker(w)));
  const used = process.cpuUsage(t0);
  return ((used.user + used.system) * 1000) / (perWorker * concurrency);
}

interface Line {
  label: string;
  layers: number;
  kind: Config['kind'];
  readNs: number;
  writeNs: number;
}

/** Child mode: measure one configuration and print its result as one JSON line. */
async function measureOne(
  c: Config,
  ops: number,
  rounds: number,
  concurrency: number,
): Promise<Line> {
  const dev = await build(c);
  await measure(dev, 'read', ops / 2, concurrency); // warm-up: JIT and inline caches
  await measure(dev, 'write', ops / 2, concurrency);
  const reads: number[] = [];
  const writes: number[] = [];
  for (let r = 0; r < rounds; r++) {
    reads.push(await measure(dev, 'read', ops, concurrency));
    writes.push(await measure(dev, 'write', ops, concurrency));
  }
  await dev.close();
  // The best round: on a shared machine other work only ever adds time.
  return {
    label: c.label,
    layers: c.layers,
    kind: c.kind,
    readNs: Math.min(...reads),
    writeNs: Math.min(...writes),
  };
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      ops: { type: 'string', default: '200000' },
      rounds: { type: 'string', default: '5' },
      passes: { type: 'string', default: '3' },
      concurrency: { type: 'string', default: '64' },
      config: { type: 'string' },
      filters: { type: 'string' },
      'no-save': { type: 'boolean', default: false },
    },
  });
  const ops = Number(values.ops);
  const rounds = Number(values.rounds);
  const concurrency = Number(values.concurrency);
  const passes = Math.max(1, Number(values.passes));
  if (values.config !== undefined) {
    const line = await measureOne(JSON.parse(values.config) as Config, ops, rounds, concurrency);
    process.stdout.write(`${JSON.stringify(line)}\n`);
    return;
  }
  const load = loadAverage();
  process.stdout.write(
    `stack micro-benchmark: 4 KiB requests on a ${SIZE >> 20} MiB MemoryBackend, ${concurrency} concurrent callers, ` +
      `${ops} ops × ${rounds} rounds in one process per row, ${passes} passes over all rows; best of all; load average ${load.join(' ')}\n\n`,
  );
  const self = fileURLToPath(import.meta.url);
  const wanted = values.filters === undefined ? undefined : values.filters.split(',');
  // Types whose arguments cannot be guessed (a snapshot store path…) are left out, and so are
  // those that journal to a directory: their cost is the disk's, measured by `npm run bench`.
  const builtins = (await builtinTypes())
    .filter((t) => benchArgs(t, () => '') !== undefined && !t.argsSchema.required?.includes('dir'))
    .map((t) => t.name)
    .filter((n) => wanted === undefined || wanted.includes(n));
  const configs: Config[] = [
    ...CONFIGS,
    ...builtins.map((n): Config => ({
      label: `1 × ${n} (built-in)`,
      layers: 1,
      kind: 'builtin',
      filterType: n,
    })),
  ];
  const runOne = (i: number): Line => {
    const r = spawnSync(
      process.execPath,
      [
        self,
        '--config',
        JSON.stringify(configs[i]),
        '--ops',
        String(ops),
        '--rounds',
        String(rounds),
        '--concurrency',
        String(concurrency),
      ],
      {
        encoding: 'utf8',
        timeout: 300_000,
      },
    );
    if (r.status !== 0) throw new Error(`configuration ${configs[i]!.label} failed: ${r.stderr}`);
    return JSON.parse(r.stdout.trim().split('\n').pop()!) as Line;
  };
  // Passes interleave the rows so that a burst of other work on the machine hits all alike.
  const lines: Line[] = configs.map((_, i) => runOne(i));
  for (let p = 1; p < passes; p++) {
    configs.forEach((_, i) => {
      const l = runOne(i);
      lines[i]!.readNs = Math.min(lines[i]!.readNs, l.readNs);
      lines[i]!.writeNs = Math.min(lines[i]!.writeNs, l.writeNs);
    });
  }
  const base = lines.find((l) => l.kind === 'none')!;
  const backendOnly = lines.find((l) => l.kind === 'backend')!;
  const head = [
    'configuration',
    'read CPU ns/op',
    'write CPU ns/op',
    'Δ read',
    'Δ write',
    'per layer (r/w)',
  ];
  const rows = lines.map((l) => {
    const ref = l.kind === 'none' ? backendOnly : base;
    const dr = l.readNs - ref.readNs;
    const dw = l.writeNs - ref.writeNs;
    const per =
      l.layers > 0
        ? `${(dr / l.layers).toFixed(0)} / ${(dw / l.layers).toFixed(0)}`
        : l.kind === 'none'
          ? '(stack itself)'
          : '';
    return [
      l.label,
      l.readNs.toFixed(0),
      l.writeNs.toFixed(0),
      l.kind === 'backend' ? '' : `${dr >= 0 ? '+' : ''}${dr.toFixed(0)}`,
      l.kind === 'backend' ? '' : `${dw >= 0 ? '+' : ''}${dw.toFixed(0)}`,
      per,
    ];
  });
  const widths = head.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
  const fmt = (cells: string[]): string =>
    cells.map((c, i) => (i === 0 ? c.padEnd(widths[i]!) : c.padStart(widths[i]!))).join('  ');
  process.stdout.write(
    `${[fmt(head), widths.map((w) => '-'.repeat(w)).join('  '), ...rows.map(fmt)].join('\n')}\n`,
  );
  process.stdout.write(
    '\nΔ: against "LiveStack, no filters" (the stack row: against the backend alone).\n',
  );
  if (!values['no-save']) {
    const dir = join(REPO_ROOT, 'bench', 'results');
    mkdirSync(dir, { recursive: true });
    const out = {
      format: 'devfilter-bench-micro/1',
      at: new Date().toISOString(),
      machine: describeMachine(),
      loadAverage: load,
      ops,
      rounds,
      passes,
      concurrency,
      lines,
    };
    writeFileSync(join(dir, 'micro-latest.json'), `${JSON.stringify(out, null, 2)}\n`);
    process.stdout.write('saved bench/results/micro-latest.json\n');
  }
}

main().catch((err: unknown) => {
  process.stderr.write(`bench:micro: ${(err as Error).stack ?? String(err)}\n`);
  process.exitCode = 1;
});
