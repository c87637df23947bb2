/** The `stats` filter type: see stats.ts and docs/filters.md. */
import type { FilterType } from '../../core/filter.js';
import { MAX_TRACE, StatsFilter, type StatsArgs } from './stats.js';

export { StatsFilter, type StatsArgs, type TraceEntry } from './stats.js';

export const statsFilterType: FilterType<StatsArgs> = {
  name: 'stats',
  apiVersion: 1,
  description:
    'Per-operation request counts, bytes, errors by errno, in-flight gauges and latency histograms (p50/p90/p99), exported to Prometheus; optional trace of the last N requests.',
  argsSchema: {
    type: 'object',
    properties: {
      trace: {
        type: 'integer',
        minimum: 0,
        maximum: MAX_TRACE,
        default: 0,
        description: `Keep the last N requests (op, offset, length, latency, result) for \`control trace\`; 0 turns tracing off. At most ${MAX_TRACE}; each entry costs 34 bytes.`,
      },
    },
    additionalProperties: false,
  },
  create(args) {
    return new StatsFilter(args);
  },
};
