/**
 * An in-process devfilter for the filter tests: a memory backend under a DeviceManager's live
 * stack (with the built-in filter types registered), served by the NBD server on a temporary
 * unix socket, and real NBD client connections to it.
 */
import { join } from 'node:path';
import { pino } from 'pino';
import { MemoryBackend } from '../../src/backends/memory.js';
import { FilterTypeRegistry } from '../../src/core/filter-types.js';
import { DeviceManager, type ManagedExport } from '../../src/core/manager.js';
import { builtinFilterTypes } from '../../src/filters/index.js';
import { NbdClient } from '../../src/nbd/client.js';
import { ExportTable } from '../../src/nbd/exports.js';
import { NbdServer } from '../../src/nbd/server.js';
import { tempDir } from '../helpers/server.js';

export const KiB = 1024;
export const MiB = 1024 * 1024;

export interface Fixture {
  manager: DeviceManager;
  exp: ManagedExport;
  backend: MemoryBackend;
  uri: string;
  connect(): Promise<NbdClient>;
  /** Status of a filter on the export (its `status()`). */
  status<T = Record<string, unknown>>(filter: string): T;
  control<T = Record<string, unknown>>(
    filter: string,
    command: string,
    args?: Record<string, unknown>,
  ): Promise<T>;
  close(): Promise<void>;
}

export async function startFixture(opts: { size?: number } = {}): Promise<Fixture> {
  const logger = pino({ level: process.env.DEVFILTER_TEST_LOG ?? 'silent' });
  const types = new FilterTypeRegistry();
  builtinFilterTypes.forEach((t) => types.register(t));
  const manager = new DeviceManager(types, logger);
  const backend = new MemoryBackend({ size: opts.size ?? 16 * MiB });
  const exp = manager.addExport('mem', backend);
  const table = new ExportTable();
  table.add({ name: 'mem', device: exp.stack });
  const server = new NbdServer({ exports: table, logger });
  const dir = tempDir('devfilter-filters-');
  const socket = join(dir.path, 'nbd.sock');
  await server.listen({ path: socket });
  const uri = `nbd+unix:///mem?socket=${socket}`;
  const clients: NbdClient[] = [];
  return {
    manager,
    exp,
    backend,
    uri,
    connect: async () => {
      const c = await NbdClient.fromUri(uri);
      clients.push(c);
      return c;
    },
    status: <T>(filter: string) => manager.filterStatus('mem', filter).status as T,
    control: async <T>(filter: string, command: string, args: Record<string, unknown> = {}) =>
      (await manager.control('mem', filter, command, args)) as T,
    close: async () => {
      for (const c of clients) await c.close().catch(() => undefined);
      await server.close();
      await manager.close();
      dir.cleanup();
    },
  };
}

/** A buffer of `length` bytes derived from `seed` (different seeds, different bytes). */
export function pattern(length: number, seed: number): Buffer {
  const b = Buffer.allocUnsafe(length);
  let x = (seed * 2654435761) >>> 0 || 1;
  for (let i = 0; i < length; i += 4) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    if (i + 4 <= length) b.writeUInt32LE(x, i);
    else for (let j = i; j < length; j++) b[j] = (x >>> (8 * (j - i))) & 0xff;
  }
  return b;
}

/** Runs `worker` with `concurrency` copies until `ms` have passed; resolves with each copy's count. */
export async function runFor(
  ms: number,
  concurrency: number,
  worker: (i: number) => Promise<void>,
): Promise<number[]> {
  const end = performance.now() + ms;
  const counts = new Array<number>(concurrency).fill(0);
  await Promise.all(
    counts.map(async (_, k) => {
      while (performance.now() < end) {
        await worker(k);
        counts[k]!++;
      }
    }),
  );
  return counts;
}
