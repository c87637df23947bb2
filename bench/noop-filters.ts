/**
 * Filter types defined by the benchmark to measure the cost of a layer itself:
 *   bench-empty  a filter with no hooks (the stack binds straight through to `next`);
 *   bench-noop   a filter whose every data hook just calls `next` (the cheapest real filter).
 * Loaded with `--filter-module dist/bench/noop-filters.js`; the micro-benchmark uses them too.
 */
import type { Filter, FilterType } from '../src/core/filter.js';

export function emptyFilter(): Filter {
  return {};
}

export function noopFilter(): Filter {
  return {
    read: (next, buf, offset, flags, ctx) => next.read(buf, offset, flags, ctx),
    write: (next, data, offset, flags, ctx) => next.write(data, offset, flags, ctx),
    flush: (next, flags, ctx) => next.flush(flags, ctx),
    trim: (next, offset, length, flags, ctx) => next.trim(offset, length, flags, ctx),
    writeZeroes: (next, offset, length, flags, ctx) => next.writeZeroes(offset, length, flags, ctx),
    cache: (next, offset, length, flags, ctx) => next.cache(offset, length, flags, ctx),
    blockStatus: (next, offset, length, flags, ctx) => next.blockStatus(offset, length, flags, ctx),
  };
}

const schema = { type: 'object', properties: {}, additionalProperties: false } as const;

export const emptyType: FilterType = {
  name: 'bench-empty',
  apiVersion: 1,
  description: 'benchmark: a filter with no hooks',
  argsSchema: { ...schema, properties: {} },
  create: emptyFilter,
};

export const noopType: FilterType = {
  name: 'bench-noop',
  apiVersion: 1,
  description: 'benchmark: every hook passes the request to next',
  argsSchema: { ...schema, properties: {} },
  create: noopFilter,
};

export const filterTypes: FilterType[] = [emptyType, noopType];
