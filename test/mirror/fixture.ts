/**
 * In-process mirror fixtures: a DeviceManager with a memory-backed export "mem", the built-in
 * filter types, and a `mirror` type whose target is a memory device behind a switchable fault
 * (so a test can make the target fail and heal), plus helpers to wait for states and compare.
 */
import { pino } from 'pino';
import { MemoryBackend } from '../../src/backends/memory.js';
import { RequestFlags, type Device } from '../../src/core/device.js';
import { DeviceError } from '../../src/core/errors.js';
import type { FilterType } from '../../src/core/filter.js';
import { FilterTypeRegistry } from '../../src/core/filter-types.js';
import { DeviceManager, type FilterEvent, type ManagedExport } from '../../src/core/manager.js';
import { builtinFilterTypes } from '../../src/filters/index.js';
import { MirrorFilter, type MirrorArgs } from '../../src/filters/mirror/index.js';
import { mirrorFilterType } from '../../src/filters/mirror/index.js';

export const KiB = 1024;
export const MiB = 1024 * 1024;

/** A device that forwards to `inner`, failing writes (and zeroing) with EIO while `broken`. */
export class FaultyTarget implements Device {
  broken = false;
  writes = 0;
  bytesWritten = 0;
  /** Writes and zeroings that carried FUA, and flushes, as the target saw them. */
  fuaWrites = 0;
  flushes = 0;
  /** Capabilities to take away (e.g. { fua: false }) to see how the mirror copes. */
  without: Partial<Record<'fua' | 'flush', false>> = {};
  constructor(readonly inner: MemoryBackend) {}
  info(): ReturnType<Device['info']> {
    const i = this.inner.info();
    return { ...i, caps: { ...i.caps, ...this.without } };
  }
  private check(): void {
    if (this.broken) throw new DeviceError('EIO', 'target unreachable (test fault)');
  }
  read(buf: Buffer, offset: number, flags: number): Promise<void> {
    return this.inner.read(buf, offset, flags);
  }
  async write(data: Buffer, offset: number, flags: number): Promise<void> {
    this.check();
    this.writes++;
    this.bytesWritten += data.length;
    if (flags & RequestFlags.FUA) this.fuaWrites++;
    await this.inner.write(data, offset, flags);
  }
  async flush(flags: number): Promise<void> {
    this.check();
    this.flushes++;
    await this.inner.flush(flags);
  }
  trim(offset: number, length: number, flags: number): Promise<void> {
    return this.inner.trim(offset, length, flags);
  }
  async writeZeroes(offset: number, length: number, flags: number): Promise<void> {
    this.check();
    if (flags & RequestFlags.FUA) this.fuaWrites++;
    await this.inner.writeZeroes(offset, length, flags);
  }
  cache(offset: number, length: number, flags: number): Promise<void> {
    return this.inner.cache(offset, length, flags);
  }
  blockStatus(offset: number, length: number, flags: number): ReturnType<Device['blockStatus']> {
    return this.inner.blockStatus(offset, length, flags);
  }
  /** Closing keeps the data (like a file): a later mirror can open the same target again. */
  closes = 0;
  close(): Promise<void> {
    this.closes++;
    return Promise.resolve();
  }
}

export interface MirrorFixture {
  manager: DeviceManager;
  exp: ManagedExport;
  source: MemoryBackend;
  target: FaultyTarget;
  events: FilterEvent[];
  status(name?: string): Record<string, unknown>;
  control<T = Record<string, unknown>>(
    command: string,
    args?: Record<string, unknown>,
    name?: string,
  ): Promise<T>;
  start(args?: Partial<MirrorArgs>, name?: string): Promise<void>;
  waitState(state: string, timeoutMs?: number, name?: string): Promise<void>;
  waitEvent(event: string, timeoutMs?: number): Promise<FilterEvent>;
  /** Whether the whole target reads equal to the whole source. */
  equal(): Promise<boolean>;
  close(): Promise<void>;
}

export async function startMirrorFixture(
  opts: { size?: number; fresh?: boolean } = {},
): Promise<MirrorFixture> {
  const size = opts.size ?? 8 * MiB;
  const logger = pino({ level: process.env.DEVFILTER_TEST_LOG ?? 'silent' });
  const target = new FaultyTarget(new MemoryBackend({ size }));
  const types = new FilterTypeRegistry();
  const testMirror: FilterType<MirrorArgs> = {
    ...mirrorFilterType,
    create: (args, env) =>
      MirrorFilter.open(args, env, {
        target: { device: target, fresh: opts.fresh ?? true, label: 'memory:target' },
      }),
  };
  for (const t of builtinFilterTypes) if (t.name !== 'mirror') types.register(t);
  types.register(testMirror as FilterType);
  const manager = new DeviceManager(types, logger);
  const source = new MemoryBackend({ size });
  const exp = manager.addExport('mem', source, { backendLabel: 'memory:source' });
  const events: FilterEvent[] = [];
  manager.on('event', (e) => events.push(e));
  const status = (name = 'mirror'): Record<string, unknown> =>
    manager.filterStatus('mem', name).status as Record<string, unknown>;
  const fx: MirrorFixture = {
    manager,
    exp,
    source,
    target,
    events,
    status,
    control: async <T>(command: string, args: Record<string, unknown> = {}, name = 'mirror') =>
      (await manager.control('mem', name, command, args)) as T,
    start: async (args = {}, name = 'mirror') => {
      await manager.createFilter('mem', 'mirror', {
        name,
        args: { target: 'memory:target', ...args },
        position: { at: 'bottom' },
      });
    },
    waitState: async (state, timeoutMs = 20_000, name = 'mirror') => {
      const deadline = performance.now() + timeoutMs;
      while (status(name).state !== state) {
        if (performance.now() > deadline)
          throw new Error(`mirror still ${JSON.stringify(status(name))}, wanted ${state}`);
        await new Promise((r) => setTimeout(r, 10));
      }
    },
    waitEvent: async (event, timeoutMs = 20_000) => {
      const deadline = performance.now() + timeoutMs;
      for (;;) {
        const e = events.find((x) => x.event === event);
        if (e !== undefined) return e;
        if (performance.now() > deadline) throw new Error(`no ${event} event`);
        await new Promise((r) => setTimeout(r, 10));
      }
    },
    equal: async () => {
      const a = Buffer.alloc(size);
      const b = Buffer.alloc(size);
      await source.read(a, 0, 0).catch(() => exp.stack.read(a, 0, 0));
      await target.inner.read(b, 0, 0);
      return a.equals(b);
    },
    close: async () => {
      await manager.close();
    },
  };
  return fx;
}

/** Random bytes of `length` from a seed. */
export function pattern(length: number, seed: number): Buffer {
  const b = Buffer.allocUnsafe(length);
  let x = (seed * 2654435761) >>> 0 || 1;
  for (let i = 0; i < length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    b[i] = x & 0xff;
  }
  return b;
}

export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** Holds every write to `device` until release() is called: a write stuck on one side. */
export function holdWrites(device: Pick<Device, 'write'>): { release: () => void } {
  const write = device.write.bind(device);
  let release!: () => void;
  const gate = new Promise<void>((r) => (release = r));
  device.write = async (data, offset, flags, ctx) => {
    await gate;
    return write(data, offset, flags, ctx);
  };
  return { release };
}
