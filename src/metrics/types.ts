/**
 * How a filter exposes Prometheus metrics: a filter instance with a `metrics()` method returning
 * `MetricFamily[]` is scraped by the metrics endpoint (src/metrics/server.ts), built-in or
 * external alike. The endpoint adds the labels `export` and `filter` to every sample, so a
 * filter reports only its own labels (such as `op`). Called at scrape time only: build the
 * answer from counters the filter keeps anyway, and never do I/O in it.
 *
 * Documented in docs/filters.md ("Metrics from any filter").
 */

export type MetricType = 'counter' | 'gauge' | 'histogram';

export type MetricLabels = Readonly<Record<string, string>>;

export interface ValueSample {
  labels?: MetricLabels;
  value: number;
}

export interface HistogramSample {
  labels?: MetricLabels;
  /**
   * Cumulative counts: `count` observations were <= `le` (in the metric's unit). Ascending
   * `le`; the endpoint adds the `+Inf` bucket (equal to `count`) if it is missing.
   */
  buckets: ReadonlyArray<{ le: number; count: number }>;
  sum: number;
  count: number;
}

export interface MetricFamily {
  /** A Prometheus metric name (`[a-zA-Z_:][a-zA-Z0-9_:]*`); counters should end in `_total`. */
  name: string;
  help: string;
  type: MetricType;
  samples: ReadonlyArray<ValueSample | HistogramSample>;
}

/** What the endpoint looks for on a filter instance. */
export interface MetricsSource {
  metrics(): MetricFamily[];
}

export function hasMetrics(value: unknown): value is MetricsSource {
  return typeof (value as { metrics?: unknown } | null)?.metrics === 'function';
}
