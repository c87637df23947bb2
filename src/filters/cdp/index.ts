/** The `cdp` filter type: see cdp.ts, docs/cdp.md and docs/cdp-format.md. */
import type { FilterType } from '../../core/filter.js';
import { CdpFilter } from './cdp.js';
import {
  DEFAULT_BLOCK_SIZE,
  DEFAULT_INDEX_LIMIT,
  DEFAULT_KEEP_HOURS,
  MAX_BLOCK_SIZE,
  MIN_BLOCK_SIZE,
  REMOVAL_POLICIES,
  type CdpArgs,
} from './settings.js';

export { CdpFilter } from './cdp.js';
export type { CdpArgs } from './settings.js';
export { CdpView } from './view.js';

const size = { type: ['integer', 'string'] };

export const cdpFilterType: FilterType<CdpArgs> = {
  name: 'cdp',
  apiVersion: 1,
  description:
    'Continuous data protection: the old content of every block a write, trim or zeroing changes is journaled (durable before the change goes down), so the export as it was at any retained point — a time, a sequence number or a named mark — opens as a read-only export, or the export is rolled back to it (and the rollback undone). Retention by age, bytes and index size.',
  argsSchema: {
    type: 'object',
    properties: {
      dir: {
        type: 'string',
        minLength: 1,
        description:
          'Journal directory (created if missing; its parent must exist). One history per directory; reattaching continues it.',
      },
      blockSize: {
        ...size,
        default: DEFAULT_BLOCK_SIZE,
        description: `Journaling unit: a power of two, ${MIN_BLOCK_SIZE}..${MAX_BLOCK_SIZE} bytes. A write journals the old content of every block it touches. An existing journal keeps its own.`,
      },
      keepHours: {
        type: 'number',
        minimum: 0,
        default: DEFAULT_KEEP_HOURS,
        description: 'Points older than this are let go (0: no age limit).',
      },
      keepBytes: {
        ...size,
        description:
          'Journal size limit: the oldest segments go beyond it (default: the device size, at least 64M).',
      },
      segmentSize: {
        ...size,
        description:
          'Journal segment size, the unit retention drops (default: keepBytes / 8, at most 64M).',
      },
      indexLimit: {
        type: 'integer',
        minimum: 1024,
        default: DEFAULT_INDEX_LIMIT,
        description:
          'Most block entries the in-memory index holds (about 48 bytes each); the oldest segments go beyond it.',
      },
      onError: {
        enum: ['keep-serving', 'stop-writes'],
        default: 'keep-serving',
        description:
          'When the journal cannot be written (disk full, I/O error): keep serving writes and drop the history, or keep the history and fail writes.',
      },
    },
    required: ['dir'],
    additionalProperties: false,
  },
  removalPolicies: REMOVAL_POLICIES,
  create(args, env) {
    return CdpFilter.open(args, env);
  },
};
