/** The `throttle` filter type: see throttle.ts and docs/filters.md. */
import type { FilterType } from '../../core/filter.js';
import { ThrottleFilter, limitsSchema, type ThrottleArgs } from './throttle.js';

export { ThrottleFilter, type ThrottleArgs, type Limits } from './throttle.js';

export const throttleFilterType: FilterType<ThrottleArgs> = {
  name: 'throttle',
  apiVersion: 1,
  description:
    'IOPS and bytes/s limits with bursts (token buckets) for reads, writes and in total, changed live; waiting requests are served round-robin across connections. Flush, cache and block-status are not throttled.',
  argsSchema: limitsSchema(true),
  create(args) {
    return new ThrottleFilter(args);
  },
};
