/** The `mirror` filter type: see mirror.ts and docs/mirror.md. */
import type { FilterType } from '../../core/filter.js';
import { MAX_CHUNK, MIN_CHUNK, MirrorFilter, REMOVAL_POLICIES, type MirrorArgs } from './mirror.js';

export { MirrorFilter, type MirrorArgs, type MirrorDeps, type MirrorStateName } from './mirror.js';
export { ChunkBitmap } from './bitmap.js';

const size = { type: ['integer', 'string'] };

export const mirrorFilterType: FilterType<MirrorArgs> = {
  name: 'mirror',
  apiVersion: 1,
  description:
    'Live migration: copies the export to a target (file, block device or nbd:// URI) while clients write, mirrors writes so the copy converges, then cuts the export over to the target with clients connected. Pauses on target failure and resumes from its dirty map. Put it at the bottom (--bottom).',
  argsSchema: {
    type: 'object',
    properties: {
      target: {
        type: 'string',
        minLength: 1,
        description:
          'Where to copy: a path (file or block device; a missing file is created sparse with the export size) or an NBD URI (nbd://HOST:PORT/NAME, nbd+unix:///NAME?socket=PATH). Its size must equal the export size.',
      },
      mode: {
        enum: ['background', 'sync'],
        default: 'background',
        description:
          'background: writes during the copy mark chunks dirty to be copied again (switches to sync by itself when that does not converge); sync: writes go to both source and target.',
      },
      chunkSize: {
        ...size,
        default: '1M',
        description: `Copy unit and dirty-map granularity: a power of two, ${MIN_CHUNK}..${MAX_CHUNK} (map: 1 bit per chunk).`,
      },
      rate: {
        ...size,
        default: 0,
        description:
          'Copy rate limit in bytes per second (e.g. "50M"); 0 = unlimited. Changed live by set-rate.',
      },
      stateDir: {
        type: 'string',
        minLength: 1,
        description:
          'Existing directory for the resume state (EXPORT.FILTER.mirror-state). After a clean stop the next mirror with the same target resumes exactly; after a crash it copies everything again.',
      },
      autoCutover: {
        type: 'boolean',
        default: false,
        description: 'Cut over by itself as soon as the mirror is synced.',
      },
      convergePasses: {
        type: 'integer',
        minimum: 1,
        maximum: 100,
        default: 3,
        description:
          'In background mode, switch to sync after this many passes in a row that do not shrink the dirty map by a tenth of its smallest size so far.',
      },
      maxInFlight: {
        type: 'integer',
        minimum: 1,
        maximum: 16,
        default: 2,
        description: 'Chunk copies in flight at once.',
      },
      targetTimeoutMs: {
        type: 'integer',
        minimum: 100,
        maximum: 600000,
        default: 5000,
        description:
          'NBD target: how long a request waits for a lost connection before the mirror pauses.',
      },
    },
    required: ['target'],
    additionalProperties: false,
  },
  removalPolicies: REMOVAL_POLICIES,
  create(args, env) {
    return MirrorFilter.open(args, env);
  },
};
