/**
 * Walks the exports and their filter stacks at scrape time and turns what it finds into
 * Prometheus metric families: export-level gauges from each LiveStack, and whatever each filter
 * with a `metrics()` method reports (labelled with `export` and `filter`). Nothing is kept
 * between scrapes, so filters that come and go never leave stale series behind.
 */
import type { Logger } from 'pino';
import { Registry, type Metric } from 'prom-client';
import type { DeviceManager } from '../core/manager.js';
import {
  hasMetrics,
  type HistogramSample,
  type MetricFamily,
  type MetricType,
  type ValueSample,
} from './types.js';

const METRIC_NAME = /^[a-zA-Z_:][a-zA-Z0-9_:]*$/;
const LABEL_NAME = /^[a-zA-Z_][a-zA-Z0-9_]*$/;

interface Value {
  metricName?: string;
  labels: Record<string, string>;
  value: number;
}

/** A metric as prom-client's Registry formats it: a fixed snapshot of values. */
class SnapshotMetric {
  readonly aggregator = 'sum';
  readonly values: Value[] = [];

  constructor(
    readonly name: string,
    readonly help: string,
    readonly type: MetricType,
  ) {}

  get(): Promise<{
    name: string;
    help: string;
    type: MetricType;
    aggregator: string;
    values: Value[];
  }> {
    return Promise.resolve({
      name: this.name,
      help: this.help,
      type: this.type,
      aggregator: this.aggregator,
      values: this.values,
    });
  }

  reset(): void {}
}

export class MetricsCollector {
  /** Names already complained about, so a broken filter does not flood the log. */
  private readonly warned = new Set<string>();

  constructor(
    private readonly manager: DeviceManager,
    private readonly logger: Logger,
  ) {}

  /** A registry holding this moment's values (a new one per scrape). */
  snapshot(): Registry {
    const families = new Map<string, SnapshotMetric>();
    const family = (name: string, help: string, type: MetricType): SnapshotMetric | null => {
      const existing = families.get(name);
      if (existing) {
        if (existing.type !== type) {
          this.warn(
            `type:${name}`,
            { metric: name },
            `metric ${name} reported as ${type} and as ${existing.type}; keeping ${existing.type}`,
          );
          return null;
        }
        return existing;
      }
      const m = new SnapshotMetric(name, help, type);
      families.set(name, m);
      return m;
    };
    const gauge = (
      name: string,
      help: string,
      labels: Record<string, string>,
      value: number,
      type: MetricType = 'gauge',
    ): void => {
      family(name, help, type)?.values.push({ labels, value });
    };

    for (const exp of this.manager.exports()) {
      const labels = { export: exp.name };
      const stats = exp.stack.stats();
      const filters = exp.stack.filters();
      gauge(
        'devfilter_export_size_bytes',
        'Size of the export in bytes.',
        labels,
        exp.stack.info().size,
      );
      gauge(
        'devfilter_export_in_flight_requests',
        "Requests inside the export's filter stack.",
        labels,
        stats.inFlight,
      );
      gauge(
        'devfilter_export_held_requests',
        'Requests held while the filter stack changes.',
        labels,
        stats.held,
      );
      gauge(
        'devfilter_export_stack_changes_total',
        'Filter stack changes (attach, detach) since start.',
        labels,
        stats.changes,
        'counter',
      );
      gauge(
        'devfilter_export_last_pause_seconds',
        'How long the last stack change held requests.',
        labels,
        stats.lastPauseMs / 1000,
      );
      gauge('devfilter_export_filters', 'Filters on the export.', labels, filters.length);
      filters.forEach((entry, index) => {
        const base = { export: exp.name, filter: entry.name };
        gauge(
          'devfilter_filter_info',
          'A filter on an export (always 1); index 0 is the top of the stack.',
          { ...base, type: entry.type.name, index: String(index) },
          1,
        );
        if (!hasMetrics(entry.filter)) return;
        let reported: MetricFamily[];
        try {
          reported = entry.filter.metrics();
        } catch (err) {
          this.warn(`throw:${exp.name}/${entry.name}`, { err, ...base }, 'filter metrics() failed');
          return;
        }
        if (!Array.isArray(reported)) return;
        for (const f of reported) this.add(family, f, base);
      });
    }
    const registry = new Registry();
    for (const m of families.values()) registry.registerMetric(m as unknown as Metric);
    return registry;
  }

  private add(
    family: (name: string, help: string, type: MetricType) => SnapshotMetric | null,
    f: MetricFamily,
    base: { export: string; filter: string },
  ): void {
    if (
      typeof f?.name !== 'string' ||
      !METRIC_NAME.test(f.name) ||
      !['counter', 'gauge', 'histogram'].includes(f.type)
    ) {
      this.warn(
        `bad:${base.export}/${base.filter}/${String(f?.name)}`,
        base,
        `filter reported an invalid metric family ${JSON.stringify(f?.name)}`,
      );
      return;
    }
    const m = family(f.name, String(f.help ?? ''), f.type);
    if (m === null) return;
    for (const s of f.samples ?? []) {
      // export and filter first; ours win over a filter's own labels of those names.
      const labels: Record<string, string> = { ...base };
      let ok = true;
      for (const [k, v] of Object.entries(s.labels ?? {})) {
        if (!LABEL_NAME.test(k) || k.startsWith('__') || k === 'le') ok = false;
        else if (k !== 'export' && k !== 'filter') labels[k] = String(v);
      }
      if (!ok) {
        this.warn(
          `label:${base.export}/${base.filter}/${f.name}`,
          base,
          `metric ${f.name} has an invalid label name`,
        );
        continue;
      }
      if (f.type === 'histogram') {
        const h = s as HistogramSample;
        if (!Array.isArray(h.buckets)) continue;
        let sawInf = false;
        for (const b of h.buckets) {
          const le = b.le === Infinity ? '+Inf' : String(b.le);
          if (le === '+Inf') sawInf = true;
          m.values.push({
            metricName: `${f.name}_bucket`,
            labels: { ...labels, le },
            value: b.count,
          });
        }
        if (!sawInf)
          m.values.push({
            metricName: `${f.name}_bucket`,
            labels: { ...labels, le: '+Inf' },
            value: h.count,
          });
        m.values.push({ metricName: `${f.name}_sum`, labels, value: h.sum });
        m.values.push({ metricName: `${f.name}_count`, labels, value: h.count });
      } else {
        m.values.push({ labels, value: Number((s as ValueSample).value) });
      }
    }
  }

  private warn(key: string, fields: Record<string, unknown>, msg: string): void {
    if (this.warned.has(key)) return;
    if (this.warned.size < 1000) this.warned.add(key);
    this.logger.warn(fields, msg);
  }
}
