/** The `fault` filter type: see fault.ts, rules.ts and docs/filters.md. */
import type { FilterType } from '../../core/filter.js';
import { FaultFilter, type FaultArgs } from './fault.js';
import { RULE_SCHEMA } from './rules.js';

export { FaultFilter, type FaultArgs } from './fault.js';
export { RULE_SCHEMA, parseRules, type RuleSpec } from './rules.js';

export const faultFilterType: FilterType<FaultArgs> = {
  name: 'fault',
  apiVersion: 1,
  description:
    'Seeded, reproducible fault injection by rules (operation, byte range, probability, count, after): errors, delays, flakey up/down cycles, dropped writes and torn writes; rules changed live.',
  argsSchema: {
    type: 'object',
    properties: {
      seed: {
        type: 'integer',
        minimum: 0,
        maximum: 0xffffffff,
        description:
          'Seed of the generator that decides probabilistic rules (0..2^32-1). Default: random, shown in status.',
      },
      rules: {
        type: ['array', 'string'],
        items: RULE_SCHEMA,
        description:
          'The rules, in order: an array, or a string of JSON (as given on the command line). Default: none.',
      },
    },
    additionalProperties: false,
  },
  create(args) {
    return new FaultFilter(args);
  },
};
