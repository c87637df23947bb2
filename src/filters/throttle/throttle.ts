/**
 * The throttle filter: IOPS and bytes/s limits with bursts (token buckets), for reads, for
 * writes and in total, changed live, fair across connections.
 *
 * Classes: `read` is READ; `write` is WRITE, TRIM and WRITE_ZEROES (trim and zero count one
 * operation each and no bytes, since no payload moves). FLUSH, CACHE and BLOCK_STATUS are never
 * throttled. A request charges the IOPS buckets of its class and the total IOPS bucket one
 * token each, and the bytes/s buckets its payload length.
 *
 * Fast path: a class with no limit passes straight through; otherwise, with nobody waiting and
 * tokens in every bucket it charges, a request takes its tokens and goes on (a clock read, a
 * few additions, no allocation). Otherwise it waits in a queue of its connection (one queue per
 * connection and class; the IoContext object is one per connection) and a dispatcher serves
 * the queues round-robin, one request per turn, so a greedy connection cannot starve another.
 * One timer, set for the earliest moment some head of queue can go, drives the dispatcher.
 */
import type { ClientInfo, Device, IoContext } from '../../core/device.js';
import { assert } from '../../core/errors.js';
import { FilterCommandError, type Filter } from '../../core/filter.js';
import { parseSize } from '../../core/size.js';
import type { MetricFamily } from '../../metrics/types.js';
import { commandValidator, unknownCommand } from '../args.js';
import { TokenBucket } from './bucket.js';

const READ = 0;
const WRITE = 1;
const CLASS_NAMES = ['read', 'write'] as const;

/** Queued requests the filter accepts at most (the NBD layer bounds them far lower). */
export const MAX_QUEUED = 1 << 20;

/** The limits as given (numbers, or size strings for byte values); 0 or absent = unlimited. */
export interface ThrottleArgs {
  iops?: number;
  readIops?: number;
  writeIops?: number;
  bps?: number | string;
  readBps?: number | string;
  writeBps?: number | string;
  burst?: number;
  iopsBurst?: number;
  readIopsBurst?: number;
  writeIopsBurst?: number;
  bpsBurst?: number | string;
  readBpsBurst?: number | string;
  writeBpsBurst?: number | string;
}

export interface Limits {
  iops: number;
  readIops: number;
  writeIops: number;
  bps: number;
  readBps: number;
  writeBps: number;
  burst: number;
  iopsBurst: number;
  readIopsBurst: number;
  writeIopsBurst: number;
  bpsBurst: number;
  readBpsBurst: number;
  writeBpsBurst: number;
}

export const DEFAULT_BURST_SECONDS = 1;

/** The six buckets a configuration may have: rate key, explicit size key, unit, classes. */
const BUCKETS = [
  { key: 'iops', size: 'iopsBurst', bytes: false, classes: [READ, WRITE] },
  { key: 'readIops', size: 'readIopsBurst', bytes: false, classes: [READ] },
  { key: 'writeIops', size: 'writeIopsBurst', bytes: false, classes: [WRITE] },
  { key: 'bps', size: 'bpsBurst', bytes: true, classes: [READ, WRITE] },
  { key: 'readBps', size: 'readBpsBurst', bytes: true, classes: [READ] },
  { key: 'writeBps', size: 'writeBpsBurst', bytes: true, classes: [WRITE] },
] as const;

const SIZE_KEYS = new Set([
  'bps',
  'readBps',
  'writeBps',
  'bpsBurst',
  'readBpsBurst',
  'writeBpsBurst',
]);

const rate = (description: string): Record<string, unknown> => ({
  type: 'number',
  minimum: 0,
  description,
});
const bytes = (description: string): Record<string, unknown> => ({
  type: ['number', 'string'],
  minimum: 0,
  description,
});

/** The schema of the limits, for creation (`withDefaults`) and for `set` (a partial update). */
export function limitsSchema(withDefaults: boolean): {
  type: 'object';
  properties: Record<string, unknown>;
  additionalProperties: false;
} {
  return {
    type: 'object',
    properties: {
      iops: rate('Operations per second, reads and writes together. 0 = unlimited.'),
      readIops: rate('Read operations per second. 0 = unlimited.'),
      writeIops: rate('Write operations (write, trim, zero) per second. 0 = unlimited.'),
      bps: bytes(
        'Bytes per second, reads and writes together; a number or a size such as "4M". 0 = unlimited.',
      ),
      readBps: bytes('Bytes read per second (number or size). 0 = unlimited.'),
      writeBps: bytes('Bytes written per second (number or size). 0 = unlimited.'),
      burst: {
        type: 'number',
        exclusiveMinimum: 0,
        maximum: 3600,
        ...(withDefaults ? { default: DEFAULT_BURST_SECONDS } : {}),
        description: `Bucket size in seconds of the rate: how much may go at once after a quiet period. Default ${DEFAULT_BURST_SECONDS}.`,
      },
      iopsBurst: rate(
        'Size of the total IOPS bucket in operations (overrides burst). 0 = from burst.',
      ),
      readIopsBurst: rate(
        'Size of the read IOPS bucket in operations (overrides burst). 0 = from burst.',
      ),
      writeIopsBurst: rate(
        'Size of the write IOPS bucket in operations (overrides burst). 0 = from burst.',
      ),
      bpsBurst: bytes(
        'Size of the total bytes/s bucket in bytes (overrides burst). 0 = from burst.',
      ),
      readBpsBurst: bytes(
        'Size of the read bytes/s bucket in bytes (overrides burst). 0 = from burst.',
      ),
      writeBpsBurst: bytes(
        'Size of the write bytes/s bucket in bytes (overrides burst). 0 = from burst.',
      ),
    },
    additionalProperties: false,
  };
}

const setArgs = commandValidator<ThrottleArgs>(limitsSchema(false), 'set');

const EMPTY_LIMITS: Limits = {
  iops: 0,
  readIops: 0,
  writeIops: 0,
  bps: 0,
  readBps: 0,
  writeBps: 0,
  burst: DEFAULT_BURST_SECONDS,
  iopsBurst: 0,
  readIopsBurst: 0,
  writeIopsBurst: 0,
  bpsBurst: 0,
  readBpsBurst: 0,
  writeBpsBurst: 0,
};

/** Applies `args` over `base`, parsing size strings; throws FilterCommandError on bad sizes. */
export function mergeLimits(base: Limits, args: ThrottleArgs): Limits {
  const out: Limits = { ...base };
  for (const [key, value] of Object.entries(args) as Array<[keyof Limits, unknown]>) {
    if (value === undefined) continue;
    let n: number;
    if (typeof value === 'number') n = value;
    else if (SIZE_KEYS.has(key)) {
      try {
        n = parseSize(String(value));
      } catch (err) {
        throw new FilterCommandError(`${key}: ${(err as Error).message}`);
      }
    } else n = Number(value);
    if (!Number.isFinite(n) || n < 0) throw new FilterCommandError(`${key} must be a number >= 0`);
    if (key === 'burst' && n <= 0) throw new FilterCommandError('burst must be greater than 0');
    out[key] = n;
  }
  return out;
}

interface Waiter {
  readonly bytes: number;
  readonly since: number;
  readonly resolve: () => void;
}

/** The waiting requests of one class from one connection. */
class Flow {
  private items: Waiter[] = [];
  private head = 0;

  constructor(
    readonly id: number,
    readonly key: IoContext | null,
    readonly cls: number,
  ) {}

  get length(): number {
    return this.items.length - this.head;
  }

  peek(): Waiter {
    return this.items[this.head]!;
  }

  push(w: Waiter): void {
    this.items.push(w);
  }

  shift(): Waiter {
    const w = this.items[this.head]!;
    this.head++;
    if (this.head === this.items.length) {
      this.items = [];
      this.head = 0;
    } else if (this.head >= 64 && this.head * 2 >= this.items.length) {
      this.items = this.items.slice(this.head);
      this.head = 0;
    }
    return w;
  }

  drain(): Waiter[] {
    const rest = this.items.slice(this.head);
    this.items = [];
    this.head = 0;
    return rest;
  }
}

interface ClassCounters {
  /** Requests passed down. */
  passed: number;
  bytes: number;
  /** Requests that had to wait. */
  throttled: number;
  waitMs: number;
  maxWaitMs: number;
}

function newCounters(): ClassCounters {
  return { passed: 0, bytes: 0, throttled: 0, waitMs: 0, maxWaitMs: 0 };
}

export class ThrottleFilter implements Filter {
  private limits: Limits;
  private readonly buckets = new Map<string, TokenBucket>();
  /** Per class: the IOPS buckets and bytes/s buckets a request of that class charges. */
  private readonly ioBuckets: TokenBucket[][] = [[], []];
  private readonly byteBuckets: TokenBucket[][] = [[], []];
  private readonly limited = [false, false];
  private sharesTotal = false;

  /** Flows with waiting requests, served round-robin from `cursor`. */
  private readonly ring: Flow[] = [];
  private cursor = 0;
  private readonly flows: Array<Map<IoContext | null, Flow>> = [new Map(), new Map()];
  private readonly queued = [0, 0];
  private nextFlowId = 1;
  private timer: NodeJS.Timeout | null = null;
  private timerAt = Infinity;

  private readonly counters: ClassCounters[] = [newCounters(), newCounters()];

  constructor(args: ThrottleArgs) {
    this.limits = mergeLimits(EMPTY_LIMITS, args);
    this.configure(performance.now());
  }

  // ---- hooks ---------------------------------------------------------------------------------

  read(next: Device, buf: Buffer, offset: number, flags: number, ctx?: IoContext): Promise<void> {
    if (this.admitNow(READ, buf.length)) return next.read(buf, offset, flags, ctx);
    return this.wait(READ, buf.length, ctx).then(() => next.read(buf, offset, flags, ctx));
  }

  write(next: Device, data: Buffer, offset: number, flags: number, ctx?: IoContext): Promise<void> {
    if (this.admitNow(WRITE, data.length)) return next.write(data, offset, flags, ctx);
    return this.wait(WRITE, data.length, ctx).then(() => next.write(data, offset, flags, ctx));
  }

  trim(
    next: Device,
    offset: number,
    length: number,
    flags: number,
    ctx?: IoContext,
  ): Promise<void> {
    if (this.admitNow(WRITE, 0)) return next.trim(offset, length, flags, ctx);
    return this.wait(WRITE, 0, ctx).then(() => next.trim(offset, length, flags, ctx));
  }

  writeZeroes(
    next: Device,
    offset: number,
    length: number,
    flags: number,
    ctx?: IoContext,
  ): Promise<void> {
    if (this.admitNow(WRITE, 0)) return next.writeZeroes(offset, length, flags, ctx);
    return this.wait(WRITE, 0, ctx).then(() => next.writeZeroes(offset, length, flags, ctx));
  }

  // flush, cache and blockStatus are not hooked: they pass straight through.

  /** Leaving the stack: every waiting request goes now, and nothing is limited any more. */
  release(): void {
    this.limited[READ] = false;
    this.limited[WRITE] = false;
    this.cancelTimer();
    this.dispatch();
  }

  /** Live again (or a removal was refused): limits apply as configured. */
  activate(): void {
    this.configure(performance.now());
  }

  /** The fast path: true if the request may go now (its tokens are then taken). */
  private admitNow(cls: number, bytes: number): boolean {
    if (!this.limited[cls]) return true;
    if (this.queued[cls]! > 0 || (this.sharesTotal && this.queued[1 - cls]! > 0)) return false;
    const now = performance.now();
    if (!this.ready(cls, bytes, now)) return false;
    this.charge(cls, bytes);
    const c = this.counters[cls]!;
    c.passed++;
    c.bytes += bytes;
    return true;
  }

  /** Whether every bucket the request charges holds tokens (refilling them to `now`). */
  private ready(cls: number, bytes: number, now: number): boolean {
    const io = this.ioBuckets[cls]!;
    for (let i = 0; i < io.length; i++) {
      const b = io[i]!;
      b.refill(now);
      if (b.tokens <= 0) return false;
    }
    if (bytes > 0) {
      const by = this.byteBuckets[cls]!;
      for (let i = 0; i < by.length; i++) {
        const b = by[i]!;
        b.refill(now);
        if (b.tokens <= 0) return false;
      }
    }
    return true;
  }

  private charge(cls: number, bytes: number): void {
    const io = this.ioBuckets[cls]!;
    for (let i = 0; i < io.length; i++) io[i]!.tokens -= 1;
    if (bytes > 0) {
      const by = this.byteBuckets[cls]!;
      for (let i = 0; i < by.length; i++) by[i]!.tokens -= bytes;
    }
  }

  /** Milliseconds until a request of this class and size may go. */
  private waitMs(cls: number, bytes: number): number {
    let ms = 0;
    for (const b of this.ioBuckets[cls]!) ms = Math.max(ms, b.waitMs());
    if (bytes > 0) for (const b of this.byteBuckets[cls]!) ms = Math.max(ms, b.waitMs());
    return ms;
  }

  private wait(cls: number, bytes: number, ctx: IoContext | undefined): Promise<void> {
    const key = ctx ?? null;
    assert(this.queued[0]! + this.queued[1]! < MAX_QUEUED, 'throttle queue is unbounded');
    let flow = this.flows[cls]!.get(key);
    if (flow === undefined) {
      flow = new Flow(this.nextFlowId++, key, cls);
      this.flows[cls]!.set(key, flow);
      // Newcomers join just before the cursor: they get their turn after everyone waiting.
      this.ring.splice(this.cursor, 0, flow);
      this.cursor++;
    }
    const f = flow;
    this.queued[cls]!++;
    const promise = new Promise<void>((resolve) =>
      f.push({ bytes, since: performance.now(), resolve }),
    );
    this.dispatch();
    return promise;
  }

  /** Serves the queues round-robin while tokens last, then sets the timer for the next turn. */
  private dispatch(): void {
    const now = performance.now();
    let idle = 0;
    while (this.ring.length > 0 && idle < this.ring.length) {
      if (this.cursor >= this.ring.length) this.cursor = 0;
      const flow = this.ring[this.cursor]!;
      const head = flow.peek();
      if (!this.limited[flow.cls] || this.ready(flow.cls, head.bytes, now)) {
        if (this.limited[flow.cls]) this.charge(flow.cls, head.bytes);
        flow.shift();
        this.queued[flow.cls]!--;
        const c = this.counters[flow.cls]!;
        const waited = now - head.since;
        c.passed++;
        c.bytes += head.bytes;
        c.throttled++;
        c.waitMs += waited;
        if (waited > c.maxWaitMs) c.maxWaitMs = waited;
        head.resolve();
        idle = 0;
        if (flow.length === 0) {
          this.ring.splice(this.cursor, 1);
          this.flows[flow.cls]!.delete(flow.key);
        } else {
          this.cursor++;
        }
      } else {
        this.cursor++;
        idle++;
      }
    }
    if (this.ring.length === 0) {
      this.cancelTimer();
      return;
    }
    let soonest = Infinity;
    for (const flow of this.ring)
      soonest = Math.min(soonest, this.waitMs(flow.cls, flow.peek().bytes));
    this.schedule(now + soonest);
  }

  private schedule(at: number): void {
    // Keep a timer that fires no later than needed; one timer for the whole filter.
    if (this.timer !== null && this.timerAt <= at + 0.5) return;
    this.cancelTimer();
    const delay = Math.max(1, Math.ceil(at - performance.now()));
    this.timerAt = performance.now() + delay;
    this.timer = setTimeout(this.onTimer, delay);
  }

  private readonly onTimer = (): void => {
    this.timer = null;
    this.timerAt = Infinity;
    this.dispatch();
  };

  private cancelTimer(): void {
    if (this.timer !== null) clearTimeout(this.timer);
    this.timer = null;
    this.timerAt = Infinity;
  }

  // ---- configuration -------------------------------------------------------------------------

  /** Builds the buckets for this.limits, keeping the tokens of buckets that stay. */
  private configure(now: number): void {
    const { limits } = this;
    for (const def of BUCKETS) {
      const r = limits[def.key];
      if (r <= 0) {
        this.buckets.delete(def.key);
        continue;
      }
      const explicit = limits[def.size];
      const capacity = explicit > 0 ? explicit : r * limits.burst;
      const existing = this.buckets.get(def.key);
      if (existing) existing.reconfigure(r, capacity, now);
      else this.buckets.set(def.key, new TokenBucket(r, capacity, now));
    }
    for (const cls of [READ, WRITE]) {
      this.ioBuckets[cls] = [];
      this.byteBuckets[cls] = [];
    }
    for (const def of BUCKETS) {
      const b = this.buckets.get(def.key);
      if (!b) continue;
      for (const cls of def.classes) (def.bytes ? this.byteBuckets : this.ioBuckets)[cls]!.push(b);
    }
    for (const cls of [READ, WRITE]) {
      this.limited[cls] = this.ioBuckets[cls]!.length + this.byteBuckets[cls]!.length > 0;
    }
    this.sharesTotal = this.buckets.has('iops') || this.buckets.has('bps');
  }

  status(): unknown {
    const now = performance.now();
    const buckets: Record<string, unknown> = {};
    for (const [key, b] of this.buckets) {
      b.refill(now);
      buckets[key] = { rate: b.rate, capacity: round(b.capacity), tokens: round(b.tokens) };
    }
    const connections = new Map<
      number,
      { id: number; client: string; read: number; write: number }
    >();
    for (const flow of this.ring) {
      const id = flow.key === null ? 0 : flow.id;
      const entry = connections.get(id) ?? {
        id,
        client: flow.key === null ? 'internal' : clientLabel(flow.key.client),
        read: 0,
        write: 0,
      };
      entry[CLASS_NAMES[flow.cls]!] += flow.length;
      connections.set(id, entry);
    }
    const counters = (cls: number): Record<string, number> => {
      const c = this.counters[cls]!;
      return { ...c, waitMs: round(c.waitMs), maxWaitMs: round(c.maxWaitMs) };
    };
    return {
      limits: { ...this.limits },
      buckets,
      queued: {
        read: this.queued[READ]!,
        write: this.queued[WRITE]!,
        connections: [...connections.values()],
      },
      read: counters(READ),
      write: counters(WRITE),
    };
  }

  control(command: string, args: Record<string, unknown>): unknown {
    switch (command) {
      case 'set': {
        const given = setArgs(args);
        this.limits = mergeLimits(this.limits, given);
        this.configure(performance.now());
        // Waiting requests now see the new limits (all go at once if a limit was lifted).
        this.cancelTimer();
        this.dispatch();
        return this.status();
      }
      case 'reset': {
        this.counters[READ] = newCounters();
        this.counters[WRITE] = newCounters();
        return this.status();
      }
      default:
        throw unknownCommand('throttle', command, ['set', 'reset']);
    }
  }

  /** Prometheus metrics: throttled requests, time spent waiting, queue lengths. */
  metrics(): MetricFamily[] {
    const per = (
      f: (c: ClassCounters, cls: number) => number,
    ): Array<{ labels: { class: string }; value: number }> =>
      [READ, WRITE].map((cls) => ({
        labels: { class: CLASS_NAMES[cls]! },
        value: f(this.counters[cls]!, cls),
      }));
    return [
      {
        name: 'devfilter_throttle_requests_total',
        help: 'Requests passed by the throttle, by class.',
        type: 'counter',
        samples: per((c) => c.passed),
      },
      {
        name: 'devfilter_throttle_delayed_requests_total',
        help: 'Requests that waited for tokens, by class.',
        type: 'counter',
        samples: per((c) => c.throttled),
      },
      {
        name: 'devfilter_throttle_wait_seconds_total',
        help: 'Time requests spent waiting for tokens, by class.',
        type: 'counter',
        samples: per((c) => c.waitMs / 1000),
      },
      {
        name: 'devfilter_throttle_queued_requests',
        help: 'Requests waiting for tokens now, by class.',
        type: 'gauge',
        samples: per((_, cls) => this.queued[cls]!),
      },
    ];
  }

  destroy(): void {
    this.cancelTimer();
    // Nothing waits once the filter has left the stack (the swap drained it); if anything
    // does, let it through rather than strand it.
    for (const flow of this.ring.splice(0)) for (const w of flow.drain()) w.resolve();
    this.flows[READ]!.clear();
    this.flows[WRITE]!.clear();
    this.queued[READ] = 0;
    this.queued[WRITE] = 0;
  }
}

function clientLabel(c: ClientInfo): string {
  let s = c.transport;
  if (c.address !== undefined) s += `:${c.address}`;
  if (c.port !== undefined) s += `:${c.port}`;
  if (c.uid !== undefined) s += ` uid=${c.uid}`;
  return s;
}

function round(n: number): number {
  return Math.round(n * 1000) / 1000;
}
