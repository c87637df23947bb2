/**
 * The stats filter through a real NBD connection: counts and bytes match the I/O done exactly,
 * errors from a fault filter below are counted by errno, latency percentiles come from the
 * histogram, reset and trace work, and the Prometheus endpoint exports it all.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { pino } from 'pino';
import { NbdRequestError } from '../../src/nbd/client.js';
import { startMetricsServer } from '../../src/metrics/server.js';
import { KiB, MiB, pattern, startFixture, type Fixture } from './fixture.js';

interface OpStatus {
  requests: number;
  bytes: number;
  errors: number;
  errorsByErrno: Record<string, number>;
  inFlight: number;
  latencyMs: { mean: number; p50: number; p90: number; p99: number; max: number };
  histogram: Array<[number | null, number]>;
}
interface StatsStatus {
  totals: { requests: number; bytes: number; errors: number; inFlight: number };
  ops: Record<string, OpStatus>;
  trace: { capacity: number; recorded: number };
}
interface TraceResult {
  capacity: number;
  recorded: number;
  entries: Array<{
    time: string;
    op: string;
    offset: number;
    length: number;
    latencyMs: number;
    result: string;
  }>;
}

describe('stats filter', () => {
  let fx: Fixture;
  before(async () => {
    fx = await startFixture();
  });
  after(async () => {
    await fx.close();
  });

  test('counts and bytes match the I/O done, per operation', async () => {
    await fx.manager.createFilter('mem', 'stats', { name: 'st' });
    const c = await fx.connect();
    const expect = {
      read: [0, 0],
      write: [0, 0],
      flush: [0, 0],
      trim: [0, 0],
      zero: [0, 0],
      cache: [0, 0],
      'block-status': [0, 0],
    };
    for (let i = 0; i < 50; i++) {
      const len = (1 + (i % 7)) * 4 * KiB;
      await c.write(i * 64 * KiB, pattern(len, i));
      expect.write[0]!++;
      expect.write[1]! += len;
    }
    for (let i = 0; i < 30; i++) {
      const len = 512 * (1 + (i % 5));
      const got = await c.read(i * 64 * KiB, len);
      assert.deepEqual(got, pattern((1 + (i % 7)) * 4 * KiB, i).subarray(0, len));
      expect.read[0]!++;
      expect.read[1]! += len;
    }
    await c.flush();
    expect.flush[0]!++;
    await c.trim(4 * MiB, 128 * KiB);
    expect.trim[0]!++;
    expect.trim[1]! += 128 * KiB;
    await c.writeZeroes(5 * MiB, 64 * KiB);
    await c.writeZeroes(6 * MiB, 1 * MiB);
    expect.zero[0]! += 2;
    expect.zero[1]! += 64 * KiB + MiB;
    await c.cache(0, 256 * KiB);
    expect.cache[0]!++;
    expect.cache[1]! += 256 * KiB;
    await c.blockStatus(0, 2 * MiB);
    expect['block-status'][0]!++;
    expect['block-status'][1]! += 2 * MiB;

    const s = fx.status<StatsStatus>('st');
    let totalRequests = 0;
    let totalBytes = 0;
    for (const [op, [requests, bytes]] of Object.entries(expect)) {
      const o = s.ops[op]!;
      assert.equal(o.requests, requests, `${op} requests`);
      assert.equal(o.bytes, bytes, `${op} bytes`);
      assert.equal(o.errors, 0, `${op} errors`);
      assert.equal(o.inFlight, 0, `${op} in flight`);
      // The histogram holds every completed request.
      assert.equal(
        o.histogram.reduce((n, [, k]) => n + k, 0),
        requests,
        `${op} histogram count`,
      );
      if (requests > 0) {
        assert.ok(
          o.latencyMs.p50 > 0 &&
            o.latencyMs.p50 <= o.latencyMs.p90 &&
            o.latencyMs.p90 <= o.latencyMs.p99,
          `${op} percentiles ordered`,
        );
        assert.ok(o.latencyMs.p99 <= o.latencyMs.max, `${op} p99 <= max`);
      }
      totalRequests += requests;
      totalBytes += bytes;
    }
    assert.equal(s.totals.requests, totalRequests);
    assert.equal(s.totals.bytes, totalBytes);
  });

  test('reset zeroes the counters', async () => {
    await fx.control('st', 'reset');
    const s = fx.status<StatsStatus>('st');
    assert.equal(s.totals.requests, 0);
    assert.equal(s.totals.bytes, 0);
    assert.equal(s.ops.read!.histogram.length, 0);
    assert.equal(s.ops.read!.latencyMs.p99, 0);
  });

  test('errors from a fault filter below are counted by errno', async () => {
    await fx.manager.createFilter('mem', 'fault', {
      name: 'f',
      position: { below: 'st' },
      args: {
        rules: [
          { action: 'error', ops: 'write', start: 1 * MiB, end: 2 * MiB, errno: 'ENOSPC' },
          { action: 'error', ops: 'read', start: 3 * MiB, end: 3 * MiB + 4096 },
        ],
      },
    });
    const c = await fx.connect();
    let failedWrites = 0;
    let failedReads = 0;
    for (let i = 0; i < 40; i++) {
      const off = i * 128 * KiB; // 0 .. 5 MiB: 8 of them in [1 MiB, 2 MiB)
      await c.write(off, pattern(4096, i)).catch((err: NbdRequestError) => {
        assert.equal(err.errnoName, 'ENOSPC');
        failedWrites++;
      });
      await c.read(3 * MiB + (i % 4) * 2048, 2048).catch((err: NbdRequestError) => {
        assert.equal(err.errnoName, 'EIO');
        failedReads++;
      });
    }
    assert.equal(failedWrites, 8);
    assert.equal(failedReads, 20);
    const s = fx.status<StatsStatus>('st');
    assert.equal(s.ops.write!.requests, 40);
    assert.equal(s.ops.write!.errors, 8);
    assert.deepEqual(s.ops.write!.errorsByErrno, { ENOSPC: 8 });
    assert.equal(s.ops.write!.bytes, 32 * 4096, 'bytes count successful requests only');
    assert.equal(s.ops.read!.errors, 20);
    assert.deepEqual(s.ops.read!.errorsByErrno, { EIO: 20 });
    assert.equal(s.totals.errors, 28);
    await fx.manager.removeFilter('mem', 'f');
  });

  test('trace keeps the last N requests', async () => {
    await fx.manager.createFilter('mem', 'stats', { name: 'tr', args: { trace: '8' } });
    const c = await fx.connect();
    for (let i = 0; i < 12; i++) await c.write(i * 4096, pattern(4096, i));
    await c.read(0, 512);
    await c.flush();
    const t = await fx.control<TraceResult>('tr', 'trace');
    assert.equal(t.capacity, 8);
    assert.equal(t.recorded, 14);
    assert.equal(t.entries.length, 8);
    assert.deepEqual(
      t.entries.map((e) => [e.op, e.offset, e.length, e.result]),
      [
        ['write', 6 * 4096, 4096, 'ok'],
        ['write', 7 * 4096, 4096, 'ok'],
        ['write', 8 * 4096, 4096, 'ok'],
        ['write', 9 * 4096, 4096, 'ok'],
        ['write', 10 * 4096, 4096, 'ok'],
        ['write', 11 * 4096, 4096, 'ok'],
        ['read', 0, 512, 'ok'],
        ['flush', 0, 0, 'ok'],
      ],
    );
    assert.ok(t.entries.every((e) => e.latencyMs >= 0 && !Number.isNaN(Date.parse(e.time))));
    const last2 = await fx.control<TraceResult>('tr', 'trace', { limit: '2', clear: 'true' });
    assert.deepEqual(
      last2.entries.map((e) => e.op),
      ['read', 'flush'],
    );
    assert.equal((await fx.control<TraceResult>('tr', 'trace')).entries.length, 0);
    await assert.rejects(fx.control('tr', 'trace', { limit: 'many' }), /limit must be integer/);
    await assert.rejects(fx.control('tr', 'bogus'), /no command "bogus"/);
    await fx.manager.removeFilter('mem', 'tr');
  });

  test('bad arguments are refused', async () => {
    await assert.rejects(
      fx.manager.createFilter('mem', 'stats', { args: { trace: -1 } }),
      /trace must be >= 0/,
    );
    await assert.rejects(
      fx.manager.createFilter('mem', 'stats', { args: { nope: 1 } }),
      /unknown argument "nope"/,
    );
  });

  test('the Prometheus endpoint exports the counters and histograms', async () => {
    await fx.control('st', 'reset');
    const c = await fx.connect();
    for (let i = 0; i < 10; i++) await c.write(8 * MiB + i * 4096, pattern(4096, i));
    for (let i = 0; i < 7; i++) await c.read(8 * MiB, 1024);
    const metrics = await startMetricsServer({
      manager: fx.manager,
      host: '127.0.0.1',
      port: 0,
      logger: pino({ level: 'silent' }),
    });
    try {
      const res = await fetch(`http://127.0.0.1:${metrics.port}/metrics`);
      assert.equal(res.status, 200);
      assert.match(res.headers.get('content-type') ?? '', /^text\/plain; version=0\.0\.4/);
      const samples = parsePrometheus(await res.text());
      const value = (name: string, labels: Record<string, string>): number | undefined =>
        samples.find(
          (s) => s.name === name && Object.entries(labels).every(([k, v]) => s.labels[k] === v),
        )?.value;
      const st = { export: 'mem', filter: 'st' };
      assert.equal(value('devfilter_requests_total', { ...st, op: 'write' }), 10);
      assert.equal(value('devfilter_requests_total', { ...st, op: 'read' }), 7);
      assert.equal(value('devfilter_request_bytes_total', { ...st, op: 'write' }), 40960);
      assert.equal(value('devfilter_request_bytes_total', { ...st, op: 'read' }), 7168);
      assert.equal(value('devfilter_requests_in_flight', { ...st, op: 'read' }), 0);
      assert.equal(value('devfilter_request_duration_seconds_count', { ...st, op: 'write' }), 10);
      assert.equal(
        value('devfilter_request_duration_seconds_bucket', { ...st, op: 'write', le: '+Inf' }),
        10,
      );
      // Buckets are cumulative.
      const buckets = samples
        .filter(
          (s) =>
            s.name === 'devfilter_request_duration_seconds_bucket' &&
            s.labels.op === 'write' &&
            s.labels.filter === 'st',
        )
        .map((s) => s.value);
      assert.equal(buckets.length, 22);
      for (let i = 1; i < buckets.length; i++) assert.ok(buckets[i]! >= buckets[i - 1]!);
      assert.ok(value('devfilter_request_duration_seconds_sum', { ...st, op: 'write' })! > 0);
      // Earlier errors survived in the counter until the reset; none since.
      assert.equal(
        samples.filter(
          (s) => s.name === 'devfilter_request_errors_total' && s.labels.filter === 'st',
        ).length,
        0,
      );
      assert.equal(value('devfilter_export_size_bytes', { export: 'mem' }), 16 * MiB);
      assert.equal(value('devfilter_export_in_flight_requests', { export: 'mem' }), 0);
      assert.equal(value('devfilter_export_held_requests', { export: 'mem' }), 0);
      assert.equal(value('devfilter_filter_info', { ...st, type: 'stats' }), 1);
      assert.ok(
        samples.some((s) => s.name === 'process_cpu_user_seconds_total'),
        'process metrics',
      );
      assert.equal((await fetch(`http://127.0.0.1:${metrics.port}/nope`)).status, 404);
      assert.equal(
        (await fetch(`http://127.0.0.1:${metrics.port}/metrics`, { method: 'POST' })).status,
        405,
      );
    } finally {
      await metrics.close();
    }
  });
});

interface Sample {
  name: string;
  labels: Record<string, string>;
  value: number;
}

/** A strict-enough parser of the Prometheus text format: every line must parse. */
function parsePrometheus(text: string): Sample[] {
  const samples: Sample[] = [];
  const typed = new Map<string, string>();
  for (const line of text.split('\n')) {
    if (line === '') continue;
    const meta = /^# (HELP|TYPE) ([a-zA-Z_:][a-zA-Z0-9_:]*) (.*)$/.exec(line);
    if (meta) {
      if (meta[1] === 'TYPE') {
        assert.match(meta[3]!, /^(counter|gauge|histogram|summary|untyped)$/);
        assert.ok(!typed.has(meta[2]!), `TYPE of ${meta[2]} given twice`);
        typed.set(meta[2]!, meta[3]!);
      }
      continue;
    }
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$/.exec(line);
    assert.ok(m, `unparseable line: ${line}`);
    const labels: Record<string, string> = {};
    if (m[2]) {
      const re = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|$)/gy;
      let lm: RegExpExecArray | null;
      let consumed = 0;
      while ((lm = re.exec(m[2])) !== null) {
        labels[lm[1]!] = lm[2]!;
        consumed = re.lastIndex;
      }
      assert.equal(consumed, m[2].length, `bad labels: ${line}`);
    }
    // Go's ParseFloat (Prometheus) takes NaN in any case; prom-client writes "Nan".
    const value =
      m[3] === '+Inf'
        ? Infinity
        : m[3] === '-Inf'
          ? -Infinity
          : /^nan$/i.test(m[3]!)
            ? NaN
            : Number(m[3]);
    assert.ok(!Number.isNaN(value) || /^nan$/i.test(m[3]!), `bad value: ${line}`);
    const family = m[1]!.replace(/_(bucket|sum|count)$/, '');
    assert.ok(typed.has(m[1]!) || typed.has(family), `sample without TYPE: ${line}`);
    samples.push({ name: m[1]!, labels, value });
  }
  return samples;
}
