/**
 * The metrics collector with filters other than stats: fault and throttle families, and an
 * external filter type exposing its own metrics through `metrics()` (including broken ones,
 * which are skipped without failing the scrape). Plus the pieces the numbers rest on: latency
 * buckets and quantiles, the token bucket, the seeded generator.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { pino } from 'pino';
import type { FilterType } from '../../src/core/filter.js';
import { mulberry32 } from '../../src/filters/fault/rng.js';
import {
  BUCKET_BOUNDS_MS,
  FINITE_BUCKETS,
  BUCKETS,
  bucketOf,
  quantileMs,
} from '../../src/filters/stats/histogram.js';
import { TokenBucket } from '../../src/filters/throttle/bucket.js';
import { MetricsCollector } from '../../src/metrics/collector.js';
import { renderMetrics } from '../../src/metrics/server.js';
import type { MetricFamily } from '../../src/metrics/types.js';
import { pattern, startFixture, type Fixture } from './fixture.js';

const external: FilterType = {
  name: 'counting',
  apiVersion: 1,
  description: 'test: an external filter with its own metrics',
  argsSchema: { type: 'object', properties: {}, additionalProperties: false },
  create() {
    let writes = 0;
    return {
      write(next, data, offset, flags, ctx) {
        writes++;
        return next.write(data, offset, flags, ctx);
      },
      metrics(): MetricFamily[] {
        return [
          {
            name: 'counting_writes_total',
            help: 'Writes seen.',
            type: 'counter',
            samples: [{ labels: { filter: 'spoofed', kind: 'w' }, value: writes }],
          },
          {
            name: 'counting_sizes',
            help: 'A histogram without +Inf.',
            type: 'histogram',
            samples: [
              {
                buckets: [
                  { le: 1, count: 1 },
                  { le: 2, count: 3 },
                ],
                sum: 4.5,
                count: 4,
              },
            ],
          },
          { name: 'bad name!', help: 'skipped', type: 'gauge', samples: [{ value: 1 }] },
          {
            name: 'counting_bad_labels',
            help: 'skipped sample',
            type: 'gauge',
            samples: [{ labels: { 'no-dash': 'x' }, value: 1 }],
          },
        ];
      },
    };
  },
};

const broken: FilterType = {
  name: 'broken-metrics',
  apiVersion: 1,
  description: 'test: metrics() throws',
  argsSchema: { type: 'object', properties: {}, additionalProperties: false },
  create() {
    return {
      status: () => null,
      metrics(): MetricFamily[] {
        throw new Error('oops');
      },
    };
  },
};

describe('metrics collector', () => {
  let fx: Fixture;
  before(async () => {
    fx = await startFixture();
    fx.manager.types.register(external, 'test');
    fx.manager.types.register(broken, 'test');
  });
  after(async () => {
    await fx.close();
  });

  test('fault, throttle and external filters expose metrics; broken ones are skipped', async () => {
    await fx.manager.createFilter('mem', 'counting', { name: 'cnt' });
    await fx.manager.createFilter('mem', 'broken-metrics', { name: 'brk' });
    await fx.manager.createFilter('mem', 'fault', {
      name: 'f',
      args: { rules: [{ action: 'error', ops: 'read', start: 0, end: 4096, name: 'first page' }] },
    });
    await fx.manager.createFilter('mem', 'throttle', { name: 't', args: { writeIops: 10000 } });
    const c = await fx.connect();
    for (let i = 0; i < 5; i++) await c.write(i * 4096, pattern(4096, i));
    await c.read(0, 512).catch(() => undefined);
    const text = await renderMetrics(new MetricsCollector(fx.manager, pino({ level: 'silent' })));
    const has = (line: string): void =>
      assert.ok(text.split('\n').includes(line), `missing: ${line}\n${text}`);
    has('counting_writes_total{export="mem",filter="cnt",kind="w"} 5');
    has('counting_sizes_bucket{export="mem",filter="cnt",le="1"} 1');
    has('counting_sizes_bucket{export="mem",filter="cnt",le="+Inf"} 4');
    has('counting_sizes_sum{export="mem",filter="cnt"} 4.5');
    has('counting_sizes_count{export="mem",filter="cnt"} 4');
    assert.ok(!text.includes('bad name'));
    assert.ok(!/^counting_bad_labels\{/m.test(text));
    has(
      'devfilter_fault_rule_hits_total{export="mem",filter="f",rule="1",action="error",name="first page"} 1',
    );
    has('devfilter_fault_injected_total{export="mem",filter="f",kind="error"} 1');
    has('devfilter_throttle_requests_total{export="mem",filter="t",class="write"} 5');
    has('devfilter_export_filters{export="mem"} 4');
    has('devfilter_filter_info{export="mem",filter="brk",type="broken-metrics",index="2"} 1');
    assert.ok(!text.includes('spoofed'), 'a filter cannot set its own filter label');
    assert.equal(await fx.manager.removeAll('mem'), 4);
    const after = await renderMetrics(new MetricsCollector(fx.manager, pino({ level: 'silent' })));
    assert.ok(!after.includes('filter="cnt"'), 'removed filters leave no series');
  });
});

describe('building blocks', () => {
  test('latency buckets: upper bounds are inclusive, 16 µs to 16.8 s, then overflow', () => {
    assert.equal(BUCKETS, 22);
    assert.equal(bucketOf(0), 0);
    assert.equal(bucketOf(0.016), 0);
    assert.equal(bucketOf(0.0161), 1);
    assert.equal(bucketOf(0.032), 1);
    assert.equal(bucketOf(1), 6); // 1 ms <= 0.016 * 2^6 = 1.024 ms
    assert.equal(bucketOf(BUCKET_BOUNDS_MS[FINITE_BUCKETS - 1]!), FINITE_BUCKETS - 1);
    assert.equal(bucketOf(60_000), FINITE_BUCKETS);
    for (let i = 0; i < FINITE_BUCKETS; i++) {
      assert.equal(bucketOf(BUCKET_BOUNDS_MS[i]!), i);
      assert.equal(bucketOf(BUCKET_BOUNDS_MS[i]! * 1.01), i + 1);
    }
  });

  test('quantiles interpolate inside a bucket and never exceed the maximum', () => {
    const h = new Float64Array(BUCKETS);
    h[bucketOf(1)] = 100; // 100 requests in (0.512, 1.024] ms
    assert.equal(quantileMs(h, 0, 100, 0.5, 1), Math.min(0.512 + 0.512 * 0.5, 1));
    assert.equal(quantileMs(h, 0, 100, 0.99, 0.9), 0.9);
    h[FINITE_BUCKETS] = 1;
    assert.equal(quantileMs(h, 0, 101, 1, 30_000), 30_000);
    assert.equal(quantileMs(new Float64Array(BUCKETS), 0, 0, 0.5, 0), 0);
  });

  test('token bucket: debt, refill, reconfigure', () => {
    const b = new TokenBucket(100, 10, 0);
    b.tokens -= 30; // a large request, admitted while the bucket held tokens
    assert.equal(b.waitMs(), 200);
    b.refill(100);
    assert.equal(b.tokens, -10);
    b.refill(10_000);
    assert.equal(b.tokens, 10, 'never above the capacity');
    b.reconfigure(1000, 5, 10_000);
    assert.equal(b.tokens, 5);
  });

  test('the generator is deterministic per seed', () => {
    const a = mulberry32(42);
    const b = mulberry32(42);
    const c = mulberry32(43);
    const sa = Array.from({ length: 100 }, a);
    assert.deepEqual(Array.from({ length: 100 }, b), sa);
    assert.notDeepEqual(Array.from({ length: 100 }, c), sa);
    assert.ok(sa.every((x) => x >= 0 && x < 1));
    const mean = sa.reduce((s, x) => s + x, 0) / sa.length;
    assert.ok(mean > 0.35 && mean < 0.65);
  });
});
