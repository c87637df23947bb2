/**
 * A live filter stack: the device an export serves, whose filters change while clients do
 * I/O. A change is device-mapper's suspend/load/resume for one export: new requests are held,
 * requests in flight drain through the old stack (bounded by a timeout: on timeout nothing
 * changes and the caller gets an error), the chain is swapped in one step, and the held
 * requests resume in the order they came. Clients see a short pause, never an error.
 */
import type { Device, DeviceInfo, Extent, IoContext } from './device.js';
import { DeviceError, assert } from './errors.js';
import { passContextStatus, type Filter, type FilterType } from './filter.js';

export interface StackEntry {
  readonly name: string;
  readonly type: FilterType;
  readonly args: Record<string, unknown>;
  readonly filter: Filter;
}

/** Where a new filter goes: on top (default), or just above or below a named filter. */
export type Position = { at: 'top' } | { at: 'bottom' } | { above: string } | { below: string };

export class StackChangeError extends Error {
  override name = 'StackChangeError';
  constructor(
    message: string,
    readonly reason: 'timeout' | 'not-found' | 'exists' | 'closed' | 'invalid',
  ) {
    super(message);
  }
}

/** One filter bound to the device below it; unset hooks go straight to `next`. */
class FilterLayer implements Device {
  readonly read: Device['read'];
  readonly write: Device['write'];
  readonly flush: Device['flush'];
  readonly trim: Device['trim'];
  readonly writeZeroes: Device['writeZeroes'];
  readonly cache: Device['cache'];
  readonly blockStatus: Device['blockStatus'];
  readonly contextStatus: NonNullable<Device['contextStatus']>;
  private readonly facts: DeviceInfo;

  constructor(f: Filter, next: Device) {
    // Bound once here so that a request costs one call per layer, not a lookup.
    this.read = f.read
      ? (b, o, fl, c) => f.read!(next, b, o, fl, c)
      : (b, o, fl, c) => next.read(b, o, fl, c);
    this.write = f.write
      ? (d, o, fl, c) => f.write!(next, d, o, fl, c)
      : (d, o, fl, c) => next.write(d, o, fl, c);
    this.flush = f.flush ? (fl, c) => f.flush!(next, fl, c) : (fl, c) => next.flush(fl, c);
    this.trim = f.trim
      ? (o, l, fl, c) => f.trim!(next, o, l, fl, c)
      : (o, l, fl, c) => next.trim(o, l, fl, c);
    this.writeZeroes = f.writeZeroes
      ? (o, l, fl, c) => f.writeZeroes!(next, o, l, fl, c)
      : (o, l, fl, c) => next.writeZeroes(o, l, fl, c);
    this.cache = f.cache
      ? (o, l, fl, c) => f.cache!(next, o, l, fl, c)
      : (o, l, fl, c) => next.cache(o, l, fl, c);
    this.blockStatus = f.blockStatus
      ? (o, l, fl, c) => f.blockStatus!(next, o, l, fl, c)
      : (o, l, fl, c) => next.blockStatus(o, l, fl, c);
    this.contextStatus = f.contextStatus
      ? (n, o, l, fl, c) => f.contextStatus!(next, n, o, l, fl, c)
      : (n, o, l, fl, c) => passContextStatus(next, n, o, l, fl, c);
    this.facts = f.info ? f.info(next.info()) : next.info();
  }

  info(): DeviceInfo {
    return this.facts;
  }

  close(): Promise<void> {
    return Promise.resolve(); // layers own nothing; filters are destroyed by the stack
  }
}

/**
 * Builds the chain for `entries` (top → bottom) over `backend`; returns its top device and,
 * for each filter, the device just below it (what its hooks get as `next`).
 */
function buildChain(
  entries: readonly StackEntry[],
  backend: Device,
): { top: Device; lowers: Map<Filter, Device> } {
  let device = backend;
  const lowers = new Map<Filter, Device>();
  for (let i = entries.length - 1; i >= 0; i--) {
    const f = entries[i]!.filter;
    lowers.set(f, device);
    device = new FilterLayer(f, device);
  }
  return { top: device, lowers };
}

export interface StackStats {
  inFlight: number;
  held: number;
  changes: number;
  /** How long the last change held requests, in milliseconds. */
  lastPauseMs: number;
}

export class LiveStack implements Device {
  private entries: readonly StackEntry[] = [];
  private top: Device;
  /** For each filter in the stack, the device just below it (see belowDevice()). */
  private lowers = new Map<Filter, Device>();
  private inFlight = 0;
  /** Set while suspended: new requests wait on it. */
  private gate: Promise<void> | null = null;
  private held = 0;
  private onDrained: (() => void) | null = null;
  /** Stack changes run one at a time, in the order they were asked for. */
  private changeLock: Promise<unknown> = Promise.resolve();
  private changes = 0;
  private lastPauseMs = 0;
  private closed = false;
  private readonly release = (): void => {
    this.inFlight--;
    if (this.inFlight === 0 && this.onDrained !== null) this.onDrained();
  };

  constructor(private backend: Device) {
    this.top = backend;
  }

  info(): DeviceInfo {
    return this.top.info();
  }

  filters(): readonly StackEntry[] {
    return this.entries;
  }

  get below(): Device {
    return this.backend;
  }

  stats(): StackStats {
    return {
      inFlight: this.inFlight,
      held: this.held,
      changes: this.changes,
      lastPauseMs: this.lastPauseMs,
    };
  }

  read(buf: Buffer, offset: number, flags: number, ctx?: IoContext): Promise<void> {
    if (this.gate !== null) return this.hold(() => this.read(buf, offset, flags, ctx));
    this.inFlight++;
    return this.track(() => this.top.read(buf, offset, flags, ctx));
  }

  write(data: Buffer, offset: number, flags: number, ctx?: IoContext): Promise<void> {
    if (this.gate !== null) return this.hold(() => this.write(data, offset, flags, ctx));
    this.inFlight++;
    return this.track(() => this.top.write(data, offset, flags, ctx));
  }

  flush(flags: number, ctx?: IoContext): Promise<void> {
    if (this.gate !== null) return this.hold(() => this.flush(flags, ctx));
    this.inFlight++;
    return this.track(() => this.top.flush(flags, ctx));
  }

  trim(offset: number, length: number, flags: number, ctx?: IoContext): Promise<void> {
    if (this.gate !== null) return this.hold(() => this.trim(offset, length, flags, ctx));
    this.inFlight++;
    return this.track(() => this.top.trim(offset, length, flags, ctx));
  }

  writeZeroes(offset: number, length: number, flags: number, ctx?: IoContext): Promise<void> {
    if (this.gate !== null) return this.hold(() => this.writeZeroes(offset, length, flags, ctx));
    this.inFlight++;
    return this.track(() => this.top.writeZeroes(offset, length, flags, ctx));
  }

  cache(offset: number, length: number, flags: number, ctx?: IoContext): Promise<void> {
    if (this.gate !== null) return this.hold(() => this.cache(offset, length, flags, ctx));
    this.inFlight++;
    return this.track(() => this.top.cache(offset, length, flags, ctx));
  }

  blockStatus(offset: number, length: number, flags: number, ctx?: IoContext): Promise<Extent[]> {
    if (this.gate !== null) return this.hold(() => this.blockStatus(offset, length, flags, ctx));
    this.inFlight++;
    return this.track(() => this.top.blockStatus(offset, length, flags, ctx));
  }

  contextStatus(
    context: string,
    offset: number,
    length: number,
    flags: number,
    ctx?: IoContext,
  ): Promise<Extent[]> {
    if (this.gate !== null)
      return this.hold(() => this.contextStatus(context, offset, length, flags, ctx));
    this.inFlight++;
    return this.track(() => passContextStatus(this.top, context, offset, length, flags, ctx));
  }

  /**
   * A device that reaches whatever is below the filter `owner()` names, for I/O a filter issues
   * outside a client request (a snapshot image reading the origin). Its requests are held and
   * counted like client requests, so a stack change waits for them and never destroys a filter
   * under them; while the filter is not in the stack they fail with ESHUTDOWN.
   */
  belowDevice(owner: () => Filter | undefined): Device {
    const via = <T>(run: (d: Device) => Promise<T>): Promise<T> => this.viaBelow(owner, run);
    return {
      info: () => {
        const f = owner();
        return (f !== undefined ? this.lowers.get(f) : undefined)?.info() ?? this.backend.info();
      },
      read: (b, o, fl, c) => via((d) => d.read(b, o, fl, c)),
      write: (b, o, fl, c) => via((d) => d.write(b, o, fl, c)),
      flush: (fl, c) => via((d) => d.flush(fl, c)),
      trim: (o, l, fl, c) => via((d) => d.trim(o, l, fl, c)),
      writeZeroes: (o, l, fl, c) => via((d) => d.writeZeroes(o, l, fl, c)),
      cache: (o, l, fl, c) => via((d) => d.cache(o, l, fl, c)),
      blockStatus: (o, l, fl, c) => via((d) => d.blockStatus(o, l, fl, c)),
      contextStatus: (n, o, l, fl, c) => via((d) => passContextStatus(d, n, o, l, fl, c)),
      close: () => Promise.resolve(), // the stack owns what is below
    };
  }

  private viaBelow<T>(owner: () => Filter | undefined, run: (d: Device) => Promise<T>): Promise<T> {
    if (this.gate !== null) return this.hold(() => this.viaBelow(owner, run));
    if (this.closed) return Promise.reject(new DeviceError('ESHUTDOWN', 'export is closed'));
    this.inFlight++;
    return this.track(() => {
      const f = owner();
      const below = f !== undefined ? this.lowers.get(f) : undefined;
      if (below === undefined) throw new DeviceError('ESHUTDOWN', 'the filter is not in the stack');
      return run(below);
    });
  }

  /** Runs a request that was counted in flight; a hook that throws synchronously counts too. */
  private track<T>(run: () => Promise<T>): Promise<T> {
    let p: Promise<T>;
    try {
      p = run();
    } catch (err) {
      this.release();
      return Promise.reject(err);
    }
    return p.finally(this.release);
  }

  private async hold<T>(retry: () => Promise<T>): Promise<T> {
    // Requests already wait inside the NBD layer's per-connection bounds, so this is bounded
    // by connections × in-flight limit; the assertion catches a leak of that bound.
    assert(this.held < 1 << 20, 'held request count is unbounded');
    this.held++;
    try {
      while (this.gate !== null) await this.gate;
    } finally {
      this.held--;
    }
    if (this.closed) throw new DeviceError('ESHUTDOWN', 'export is closed');
    return retry();
  }

  /**
   * Swaps in the stack `plan` computes from the current one. `plan` runs inside the change
   * lock and may throw StackChangeError to refuse (nothing changes then). Returns the entries
   * that left the stack; their filters are no longer reachable by any request.
   */
  async change(
    plan: (current: readonly StackEntry[]) => readonly StackEntry[],
    timeoutMs: number,
  ): Promise<StackEntry[]> {
    const run = async (): Promise<StackEntry[]> => {
      if (this.closed) throw new StackChangeError('export is closed', 'closed');
      const next = plan(this.entries);
      let openGate!: () => void;
      this.gate = new Promise((resolve) => (openGate = resolve));
      const pausedAt = performance.now();
      const removed = this.entries.filter((e) => !next.includes(e));
      try {
        // Filters on their way out let go of requests they hold back (throttle queues), or
        // the drain would wait on them.
        for (const e of removed) e.filter.release?.();
        try {
          await this.drain(timeoutMs);
        } catch (err) {
          for (const e of removed) e.filter.activate?.(); // they stay: back to work
          throw err;
        }
        // The cheap part, with nothing in flight: bind the chain and switch to it.
        const chain = buildChain(next, this.backend);
        for (const e of next) if (!this.entries.includes(e)) e.filter.activate?.();
        this.entries = next;
        this.top = chain.top;
        this.lowers = chain.lowers;
        this.changes++;
        return removed;
      } finally {
        this.lastPauseMs = performance.now() - pausedAt;
        this.gate = null;
        openGate();
      }
    };
    const result = this.changeLock.then(run, run);
    this.changeLock = result.catch(() => undefined);
    return result;
  }

  /**
   * Makes `device` the bottom of the stack in place of the backend (a migration's cutover),
   * with the same hold/drain/swap as a filter change: new requests are held, requests in
   * flight drain (on timeout nothing changes), the new device is flushed (so what was durable
   * below stays durable), `commit()` runs with nothing in flight — it may throw to refuse, and
   * may take its time (record the switch durably): no request reaches `device` before it
   * resolves — then the chain is rebound over `device` and held requests resume. The filters stay in place
   * (no activate/release). Refuses a device of another size. Returns the old backend, which the
   * caller closes.
   */
  async replaceBackend(
    device: Device,
    timeoutMs: number,
    commit?: () => void | Promise<void>,
  ): Promise<Device> {
    const run = async (): Promise<Device> => {
      if (this.closed) throw new StackChangeError('export is closed', 'closed');
      const oldSize = this.backend.info().size;
      const newSize = device.info().size;
      if (newSize !== oldSize)
        throw new StackChangeError(
          `the new backend has ${newSize} bytes, the export ${oldSize}; the stack is unchanged`,
          'invalid',
        );
      let openGate!: () => void;
      this.gate = new Promise((resolve) => (openGate = resolve));
      const pausedAt = performance.now();
      try {
        await this.drain(timeoutMs);
        if (device.info().caps.flush) await device.flush(0);
        await commit?.();
        const old = this.backend;
        const chain = buildChain(this.entries, device);
        this.backend = device;
        this.top = chain.top;
        this.lowers = chain.lowers;
        this.changes++;
        return old;
      } finally {
        this.lastPauseMs = performance.now() - pausedAt;
        this.gate = null;
        openGate();
      }
    };
    const result = this.changeLock.then(run, run);
    this.changeLock = result.catch(() => undefined);
    return result;
  }

  private drain(timeoutMs: number): Promise<void> {
    if (this.inFlight === 0) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.onDrained = null;
        reject(
          new StackChangeError(
            `${this.inFlight} request(s) still in flight after ${timeoutMs} ms; the stack is unchanged`,
            'timeout',
          ),
        );
      }, timeoutMs);
      this.onDrained = () => {
        clearTimeout(timer);
        this.onDrained = null;
        resolve();
      };
    });
  }

  /** Stops the stack: held requests fail with ESHUTDOWN; the backend is closed. */
  async close(): Promise<void> {
    this.closed = true;
    await this.backend.close();
  }
}

/** Computes the entries with `entry` inserted at `position`. */
export function insertAt(
  current: readonly StackEntry[],
  entry: StackEntry,
  position: Position,
): StackEntry[] {
  if (current.some((e) => e.name === entry.name)) {
    throw new StackChangeError(
      `a filter named "${entry.name}" is already on this export`,
      'exists',
    );
  }
  const out = [...current];
  if ('at' in position) {
    if (position.at === 'top') out.unshift(entry);
    else out.push(entry);
    return out;
  }
  const anchor = 'above' in position ? position.above : position.below;
  const i = out.findIndex((e) => e.name === anchor);
  if (i < 0) throw new StackChangeError(`no filter named "${anchor}" on this export`, 'not-found');
  out.splice('above' in position ? i : i + 1, 0, entry);
  return out;
}
