/** The `snapshot` filter type: see snapshot.ts, docs/snapshots.md and docs/snapshot-format.md. */
import type { FilterType } from '../../core/filter.js';
import { MAX_SNAPSHOTS } from './format.js';
import { REMOVAL_POLICIES, SnapshotFilter, type SnapshotArgs } from './snapshot.js';

export { SnapshotFilter, type SnapshotArgs, type SnapshotInfo } from './snapshot.js';
export { SnapshotImage } from './image.js';
export { snapshotFilterOf, takeGroup, takeGroupOnExports } from './group.js';

const size = { type: ['integer', 'string'] };

export const snapshotFilterType: FilterType<SnapshotArgs> = {
  name: 'snapshot',
  apiVersion: 1,
  description: `Point-in-time images of a live export by copy-before-write into a durable difference store; up to ${MAX_SNAPSHOTS} snapshots, each served read-only as EXPORT@NAME. Overflow fails the snapshot, never the origin. Survives restarts and crashes.`,
  argsSchema: {
    type: 'object',
    properties: {
      store: {
        type: 'string',
        minLength: 1,
        description: 'Directory for the difference stores (one subdirectory per export).',
      },
      chunkSize: {
        ...size,
        default: '64K',
        description: 'Copy unit: a power of two, 4K..4M. An existing store keeps its own.',
      },
      limit: {
        ...size,
        default: 0,
        description: 'Largest size of the store data file (e.g. "10G"); 0 = unlimited.',
      },
      growStep: {
        ...size,
        default: '64M',
        description: 'The data file grows (with allocated blocks) in steps of this size.',
      },
    },
    required: ['store'],
    additionalProperties: false,
  },
  removalPolicies: REMOVAL_POLICIES,
  create(args, env) {
    return SnapshotFilter.open(args, env);
  },
};
