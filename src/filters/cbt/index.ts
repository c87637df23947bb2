/** The `cbt` filter type: see cbt.ts, docs/filters.md and docs/cbt-format.md. */
import type { FilterType } from '../../core/filter.js';
import {
  CbtFilter,
  MAX_BLOCK_SIZE,
  MIN_BLOCK_SIZE,
  REMOVAL_POLICIES,
  type CbtArgs,
} from './cbt.js';

export { CbtFilter, type CbtArgs } from './cbt.js';
export { ChangeMap, ChangeView, type ChangedExtent, type ChangedList } from './map.js';

const size = { type: ['integer', 'string'] };

export const cbtFilterType: FilterType<CbtArgs> = {
  name: 'cbt',
  apiVersion: 1,
  description:
    'Changed block tracking: for each block, the generation in which it last changed. Lists what changed since a generation, and serves it as the block-status contexts qemu:dirty-bitmap:NAME and devfilter:cbt:NAME[:since:N]. With dir, survives restarts; after a crash it over-reports, never under-reports.',
  argsSchema: {
    type: 'object',
    properties: {
      blockSize: {
        ...size,
        default: '64K',
        description: `Tracking unit: a power of two, ${MIN_BLOCK_SIZE}..${MAX_BLOCK_SIZE} bytes (map memory: 4 bytes per block, 64 MiB per TiB at 64K). An existing state keeps its own.`,
      },
      dir: {
        type: 'string',
        minLength: 1,
        description:
          'Existing directory for the persistent state (DIR/EXPORT/FILTER/). Without it the map lives in memory only and is lost when the filter goes.',
      },
      journalLimit: {
        ...size,
        default: '4M',
        description:
          'The journal of changes is folded into the map file once it is this large (or half the map, if that is larger).',
      },
    },
    additionalProperties: false,
  },
  removalPolicies: REMOVAL_POLICIES,
  create(args, env) {
    return CbtFilter.open(args, env);
  },
};
