/**
 * An in-process devfilter for the snapshot tests: exports on memory or file backends under a
 * DeviceManager, served by the NBD server together with the exports filters publish (snapshot
 * images) — the way the daemon must serve them — and real NBD client connections.
 */
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { pino } from 'pino';
import { FileBackend } from '../../src/backends/file.js';
import { MemoryBackend } from '../../src/backends/memory.js';
import type { Device } from '../../src/core/device.js';
import { FilterTypeRegistry } from '../../src/core/filter-types.js';
import { DeviceManager, type FilterEvent } from '../../src/core/manager.js';
import { builtinFilterTypes } from '../../src/filters/index.js';
import { SnapshotFilter } from '../../src/filters/snapshot/index.js';
import { NbdClient } from '../../src/nbd/client.js';
import { ExportTable } from '../../src/nbd/exports.js';
import { exportSource } from '../../src/cli/export-source.js';
import { NbdServer } from '../../src/nbd/server.js';
import { tempDir } from '../helpers/server.js';

export const KiB = 1024;
export const MiB = 1024 * 1024;

export interface SnapFixture {
  manager: DeviceManager;
  dir: string;
  /** Where stores go by default. */
  storeDir: string;
  events: FilterEvent[];
  /** The backend of an export (to read the origin underneath every filter). */
  backend(exportName: string): Device;
  connect(exportName: string): Promise<NbdClient>;
  /** Attaches a snapshot filter named "snap" at the bottom of the export's stack. */
  attach(exportName: string, args?: Record<string, unknown>): Promise<SnapshotFilter>;
  detach(exportName: string, policy?: 'keep' | 'drop'): Promise<void>;
  filter(exportName: string): SnapshotFilter;
  control<T = unknown>(
    exportName: string,
    command: string,
    args?: Record<string, unknown>,
  ): Promise<T>;
  close(): Promise<void>;
}

export interface ExportSpec {
  name: string;
  size: number;
  /** 'file' puts a sparse file in the fixture's directory (or uses `path`). */
  backend?: 'memory' | 'file';
  path?: string;
}

export async function startSnapFixture(
  exports: ExportSpec[],
  opts: { dir?: string } = {},
): Promise<SnapFixture> {
  const logger = pino({ level: process.env.DEVFILTER_TEST_LOG ?? 'silent' });
  const types = new FilterTypeRegistry();
  builtinFilterTypes.forEach((t) => types.register(t));
  const manager = new DeviceManager(types, logger);
  const events: FilterEvent[] = [];
  manager.on('event', (e) => events.push(e));
  const own = opts.dir === undefined ? tempDir('devfilter-snap-') : undefined;
  const dir = opts.dir ?? own!.path;
  const storeDir = join(dir, 'stores');
  mkdirSync(storeDir, { recursive: true });
  const table = new ExportTable();
  const backends = new Map<string, Device>();
  for (const spec of exports) {
    const device =
      spec.backend === 'file'
        ? await FileBackend.open(spec.path ?? join(dir, `${spec.name}.img`), {
            create: { size: spec.size },
          })
        : new MemoryBackend({ size: spec.size });
    backends.set(spec.name, device);
    const label =
      spec.backend === 'file'
        ? `file:${spec.path ?? join(dir, `${spec.name}.img`)}`
        : `memory:${spec.name}`;
    const exp = manager.addExport(spec.name, device, { backendLabel: label });
    table.add({ name: spec.name, device: exp.stack });
  }
  const server = new NbdServer({ exports: exportSource(table, manager), logger });
  const socket = join(dir, 'nbd.sock');
  await server.listen({ path: socket });
  const clients: NbdClient[] = [];
  const fx: SnapFixture = {
    manager,
    dir,
    storeDir,
    events,
    backend: (name) => backends.get(name)!,
    connect: async (name) => {
      const c = await NbdClient.fromUri(`nbd+unix:///${encodeURIComponent(name)}?socket=${socket}`);
      clients.push(c);
      return c;
    },
    attach: async (name, args = {}) => {
      await manager.createFilter(name, 'snapshot', {
        name: 'snap',
        args: { store: storeDir, ...args },
        position: { at: 'bottom' },
      });
      return fx.filter(name);
    },
    detach: (name, policy = 'keep') => manager.removeFilter(name, 'snap', { policy }),
    filter: (name) => {
      const f = manager
        .getExport(name)
        .stack.filters()
        .find((e) => e.name === 'snap')?.filter;
      if (!(f instanceof SnapshotFilter)) throw new Error(`no snapshot filter on ${name}`);
      return f;
    },
    control: async <T>(name: string, command: string, args: Record<string, unknown> = {}) =>
      (await manager.control(name, 'snap', command, args)) as T,
    close: async () => {
      for (const c of clients) await c.close().catch(() => undefined);
      await server.close();
      await manager.close();
      own?.cleanup();
    },
  };
  return fx;
}

/** Reads all of a device. */
export async function readAll(d: Device, size = d.info().size): Promise<Buffer> {
  const out = Buffer.alloc(size);
  for (let at = 0; at < size; at += 4 * MiB) {
    await d.read(out.subarray(at, Math.min(size, at + 4 * MiB)), at, 0);
  }
  return out;
}

/** Reads all of an NBD export. */
export async function readAllNbd(c: NbdClient): Promise<Buffer> {
  const parts: Buffer[] = [];
  for (let at = 0; at < c.size; at += 4 * MiB)
    parts.push(await c.read(at, Math.min(4 * MiB, c.size - at)));
  return Buffer.concat(parts);
}

/** A small seeded PRNG (xorshift32): the same seed gives the same sequence. */
export class Rng {
  private x: number;
  constructor(readonly seed: number) {
    this.x = seed >>> 0 || 0x9e3779b9;
  }
  next(): number {
    let x = this.x;
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    this.x = x >>> 0;
    return this.x / 0x100000000;
  }
  int(n: number): number {
    return Math.floor(this.next() * n);
  }
  between(lo: number, hi: number): number {
    return lo + this.int(hi - lo + 1);
  }
}

/** First differing offset of two buffers, for messages. */
export function firstDiff(a: Buffer, b: Buffer): number {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) if (a[i] !== b[i]) return i;
  return a.length === b.length ? -1 : n;
}

export function seedFromEnv(): number {
  const s = process.env.SNAP_SEED;
  return s !== undefined ? Number(s) >>> 0 : (Math.random() * 0x100000000) >>> 0;
}
