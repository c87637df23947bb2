/**
 * The stats filter: per-operation request counts, bytes, errors by errno, in-flight gauges and
 * latency histograms, plus an optional ring buffer of the last N requests.
 *
 * Hot path: one performance.now() when a request starts and one when it ends, and a few
 * typed-array updates; nothing is allocated per request beyond the promise of the hook itself
 * (the trace, when enabled, writes into preallocated typed arrays too).
 */
import type { Device, Extent, IoContext } from '../../core/device.js';
import { ERRNOS, toDeviceError } from '../../core/errors.js';
import type { Filter } from '../../core/filter.js';
import type { MetricFamily, HistogramSample, ValueSample } from '../../metrics/types.js';
import { commandValidator, unknownCommand } from '../args.js';
import { OP_COUNT, OP_NAMES, Op } from '../ops.js';
import { BUCKETS, BUCKET_BOUNDS_MS, FINITE_BUCKETS, bucketOf, quantileMs } from './histogram.js';

export interface StatsArgs {
  /** Requests kept in the trace ring buffer; 0 (the default) turns tracing off. */
  trace?: number;
}

export const MAX_TRACE = 1 << 20;

const ERRNO_COUNT = ERRNOS.length;

export interface TraceEntry {
  /** Wall-clock start time (ISO 8601, millisecond precision). */
  time: string;
  op: string;
  offset: number;
  length: number;
  latencyMs: number;
  /** "ok", or the errno name the request failed with. */
  result: string;
}

const COMMANDS = ['reset', 'trace'] as const;

const traceArgs = commandValidator<{ limit?: number; clear?: boolean }>(
  {
    type: 'object',
    properties: {
      limit: { type: 'integer', minimum: 1, description: 'return only the newest LIMIT entries' },
      clear: { type: 'boolean', description: 'empty the ring buffer after reading it' },
    },
    additionalProperties: false,
  },
  'trace',
);

export class StatsFilter implements Filter {
  private readonly requests = new Float64Array(OP_COUNT);
  private readonly bytes = new Float64Array(OP_COUNT);
  private readonly errors = new Float64Array(OP_COUNT);
  private readonly errorsByErrno = new Float64Array(OP_COUNT * ERRNO_COUNT);
  private readonly inFlight = new Float64Array(OP_COUNT);
  private readonly hist = new Float64Array(OP_COUNT * BUCKETS);
  private readonly latencySumMs = new Float64Array(OP_COUNT);
  private readonly latencyMaxMs = new Float64Array(OP_COUNT);
  private since = Date.now();

  // The trace ring buffer, as parallel typed arrays (no object per request).
  private readonly traceCap: number;
  private readonly tOp: Uint8Array;
  /** 0 for success, 1 + index into ERRNOS for a failure. */
  private readonly tResult: Uint8Array;
  private readonly tOffset: Float64Array;
  private readonly tLength: Float64Array;
  /** performance.now() at the start. */
  private readonly tStart: Float64Array;
  private readonly tLatency: Float64Array;
  /** Entries recorded since the last reset; the next one goes to tNext % traceCap. */
  private tRecorded = 0;

  constructor(args: StatsArgs) {
    const cap = args.trace ?? 0;
    this.traceCap = cap;
    this.tOp = new Uint8Array(cap);
    this.tResult = new Uint8Array(cap);
    this.tOffset = new Float64Array(cap);
    this.tLength = new Float64Array(cap);
    this.tStart = new Float64Array(cap);
    this.tLatency = new Float64Array(cap);
  }

  // ---- hooks: start, pass down, record ------------------------------------------------------

  async read(
    next: Device,
    buf: Buffer,
    offset: number,
    flags: number,
    ctx?: IoContext,
  ): Promise<void> {
    const t0 = this.start(Op.READ);
    try {
      await next.read(buf, offset, flags, ctx);
    } catch (err) {
      throw this.failed(Op.READ, t0, offset, buf.length, err);
    }
    this.done(Op.READ, t0, offset, buf.length);
  }

  async write(
    next: Device,
    data: Buffer,
    offset: number,
    flags: number,
    ctx?: IoContext,
  ): Promise<void> {
    const t0 = this.start(Op.WRITE);
    try {
      await next.write(data, offset, flags, ctx);
    } catch (err) {
      throw this.failed(Op.WRITE, t0, offset, data.length, err);
    }
    this.done(Op.WRITE, t0, offset, data.length);
  }

  async flush(next: Device, flags: number, ctx?: IoContext): Promise<void> {
    const t0 = this.start(Op.FLUSH);
    try {
      await next.flush(flags, ctx);
    } catch (err) {
      throw this.failed(Op.FLUSH, t0, 0, 0, err);
    }
    this.done(Op.FLUSH, t0, 0, 0);
  }

  async trim(
    next: Device,
    offset: number,
    length: number,
    flags: number,
    ctx?: IoContext,
  ): Promise<void> {
    const t0 = this.start(Op.TRIM);
    try {
      await next.trim(offset, length, flags, ctx);
    } catch (err) {
      throw this.failed(Op.TRIM, t0, offset, length, err);
    }
    this.done(Op.TRIM, t0, offset, length);
  }

  async writeZeroes(
    next: Device,
    offset: number,
    length: number,
    flags: number,
    ctx?: IoContext,
  ): Promise<void> {
    const t0 = this.start(Op.ZERO);
    try {
      await next.writeZeroes(offset, length, flags, ctx);
    } catch (err) {
      throw this.failed(Op.ZERO, t0, offset, length, err);
    }
    this.done(Op.ZERO, t0, offset, length);
  }

  async cache(
    next: Device,
    offset: number,
    length: number,
    flags: number,
    ctx?: IoContext,
  ): Promise<void> {
    const t0 = this.start(Op.CACHE);
    try {
      await next.cache(offset, length, flags, ctx);
    } catch (err) {
      throw this.failed(Op.CACHE, t0, offset, length, err);
    }
    this.done(Op.CACHE, t0, offset, length);
  }

  async blockStatus(
    next: Device,
    offset: number,
    length: number,
    flags: number,
    ctx?: IoContext,
  ): Promise<Extent[]> {
    const t0 = this.start(Op.BLOCK_STATUS);
    let extents: Extent[];
    try {
      extents = await next.blockStatus(offset, length, flags, ctx);
    } catch (err) {
      throw this.failed(Op.BLOCK_STATUS, t0, offset, length, err);
    }
    this.done(Op.BLOCK_STATUS, t0, offset, length);
    return extents;
  }

  private start(op: number): number {
    this.inFlight[op]!++;
    return performance.now();
  }

  private done(op: number, t0: number, offset: number, length: number): void {
    const ms = performance.now() - t0;
    this.inFlight[op]!--;
    this.requests[op]!++;
    this.bytes[op]! += length;
    this.observe(op, ms);
    if (this.traceCap > 0) this.record(op, t0, ms, offset, length, 0);
  }

  /** Records a failure and returns the error to rethrow, unchanged. */
  private failed(op: number, t0: number, offset: number, length: number, err: unknown): unknown {
    const ms = performance.now() - t0;
    this.inFlight[op]!--;
    this.requests[op]!++;
    this.errors[op]!++;
    const e = ERRNOS.indexOf(toDeviceError(err).errno);
    this.errorsByErrno[op * ERRNO_COUNT + e]!++;
    this.observe(op, ms);
    if (this.traceCap > 0) this.record(op, t0, ms, offset, length, 1 + e);
    return err;
  }

  private observe(op: number, ms: number): void {
    this.hist[op * BUCKETS + bucketOf(ms)]!++;
    this.latencySumMs[op]! += ms;
    if (ms > this.latencyMaxMs[op]!) this.latencyMaxMs[op] = ms;
  }

  private record(
    op: number,
    t0: number,
    ms: number,
    offset: number,
    length: number,
    result: number,
  ): void {
    const i = this.tRecorded % this.traceCap;
    this.tRecorded++;
    this.tOp[i] = op;
    this.tResult[i] = result;
    this.tOffset[i] = offset;
    this.tLength[i] = length;
    this.tStart[i] = t0;
    this.tLatency[i] = ms;
  }

  // ---- control plane -------------------------------------------------------------------------

  status(): unknown {
    const ops: Record<string, unknown> = {};
    const totals = { requests: 0, bytes: 0, errors: 0, inFlight: 0 };
    for (let op = 0; op < OP_COUNT; op++) {
      const requests = this.requests[op]!;
      const maxMs = this.latencyMaxMs[op]!;
      const byErrno: Record<string, number> = {};
      for (let e = 0; e < ERRNO_COUNT; e++) {
        const n = this.errorsByErrno[op * ERRNO_COUNT + e]!;
        if (n > 0) byErrno[ERRNOS[e]!] = n;
      }
      const histogram: Array<[number | null, number]> = [];
      for (let b = 0; b < BUCKETS; b++) {
        const n = this.hist[op * BUCKETS + b]!;
        if (n > 0) histogram.push([b < FINITE_BUCKETS ? BUCKET_BOUNDS_MS[b]! : null, n]);
      }
      const base = op * BUCKETS;
      ops[OP_NAMES[op]!] = {
        requests,
        bytes: this.bytes[op]!,
        errors: this.errors[op]!,
        errorsByErrno: byErrno,
        inFlight: this.inFlight[op]!,
        latencyMs: {
          mean: requests > 0 ? round(this.latencySumMs[op]! / requests) : 0,
          p50: round(quantileMs(this.hist, base, requests, 0.5, maxMs)),
          p90: round(quantileMs(this.hist, base, requests, 0.9, maxMs)),
          p99: round(quantileMs(this.hist, base, requests, 0.99, maxMs)),
          max: round(maxMs),
        },
        histogram,
      };
      totals.requests += requests;
      totals.bytes += this.bytes[op]!;
      totals.errors += this.errors[op]!;
      totals.inFlight += this.inFlight[op]!;
    }
    return {
      since: new Date(this.since).toISOString(),
      seconds: round((Date.now() - this.since) / 1000),
      totals,
      ops,
      trace: { capacity: this.traceCap, recorded: this.tRecorded },
    };
  }

  control(command: string, args: Record<string, unknown>): unknown {
    switch (command) {
      case 'reset':
        this.reset();
        return { since: new Date(this.since).toISOString() };
      case 'trace': {
        const { limit, clear } = traceArgs(args);
        const entries = this.traceEntries(limit);
        const recorded = this.tRecorded;
        if (clear === true) this.tRecorded = 0;
        return { capacity: this.traceCap, recorded, entries };
      }
      default:
        throw unknownCommand('stats', command, COMMANDS);
    }
  }

  /** Zeroes every counter and the trace; in-flight gauges keep counting what is in flight. */
  reset(): void {
    this.requests.fill(0);
    this.bytes.fill(0);
    this.errors.fill(0);
    this.errorsByErrno.fill(0);
    this.hist.fill(0);
    this.latencySumMs.fill(0);
    this.latencyMaxMs.fill(0);
    this.tRecorded = 0;
    this.since = Date.now();
  }

  /** The newest `limit` trace entries (all kept by default), oldest first. */
  traceEntries(limit = this.traceCap): TraceEntry[] {
    const kept = Math.min(this.tRecorded, this.traceCap, limit);
    const out: TraceEntry[] = [];
    const origin = performance.timeOrigin;
    for (let k = this.tRecorded - kept; k < this.tRecorded; k++) {
      const i = k % this.traceCap;
      const result = this.tResult[i]!;
      out.push({
        time: new Date(origin + this.tStart[i]!).toISOString(),
        op: OP_NAMES[this.tOp[i]!]!,
        offset: this.tOffset[i]!,
        length: this.tLength[i]!,
        latencyMs: round(this.tLatency[i]!),
        result: result === 0 ? 'ok' : ERRNOS[result - 1]!,
      });
    }
    return out;
  }

  /** Prometheus metrics (see src/metrics/types.ts); latency in seconds, labelled by `op`. */
  metrics(): MetricFamily[] {
    const requests: ValueSample[] = [];
    const bytes: ValueSample[] = [];
    const errors: ValueSample[] = [];
    const inFlight: ValueSample[] = [];
    const latency: HistogramSample[] = [];
    for (let op = 0; op < OP_COUNT; op++) {
      const labels = { op: OP_NAMES[op]! };
      requests.push({ labels, value: this.requests[op]! });
      bytes.push({ labels, value: this.bytes[op]! });
      inFlight.push({ labels, value: this.inFlight[op]! });
      for (let e = 0; e < ERRNO_COUNT; e++) {
        const n = this.errorsByErrno[op * ERRNO_COUNT + e]!;
        if (n > 0) errors.push({ labels: { op: OP_NAMES[op]!, errno: ERRNOS[e]! }, value: n });
      }
      const buckets: Array<{ le: number; count: number }> = [];
      let cumulative = 0;
      for (let b = 0; b < FINITE_BUCKETS; b++) {
        cumulative += this.hist[op * BUCKETS + b]!;
        buckets.push({ le: BUCKET_BOUNDS_MS[b]! / 1000, count: cumulative });
      }
      latency.push({
        labels,
        buckets,
        sum: this.latencySumMs[op]! / 1000,
        count: this.requests[op]!,
      });
    }
    return [
      {
        name: 'devfilter_requests_total',
        help: 'Requests completed (successfully or not), by operation.',
        type: 'counter',
        samples: requests,
      },
      {
        name: 'devfilter_request_bytes_total',
        help: 'Bytes of successful requests (payload, or range length for trim/zero/cache/block-status).',
        type: 'counter',
        samples: bytes,
      },
      {
        name: 'devfilter_request_errors_total',
        help: 'Failed requests, by operation and errno.',
        type: 'counter',
        samples: errors,
      },
      {
        name: 'devfilter_requests_in_flight',
        help: 'Requests passed down and not yet completed.',
        type: 'gauge',
        samples: inFlight,
      },
      {
        name: 'devfilter_request_duration_seconds',
        help: 'Request latency measured at the filter, by operation.',
        type: 'histogram',
        samples: latency,
      },
    ];
  }
}

function round(ms: number): number {
  return Math.round(ms * 1000) / 1000;
}
