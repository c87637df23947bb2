/** The `access` filter type: see access.ts, docs/filters.md and docs/access-format.md. */
import type { FilterType } from '../../core/filter.js';
import {
  AccessFilter,
  MAX_WORM_BLOCK_SIZE,
  MIN_WORM_BLOCK_SIZE,
  REMOVAL_POLICIES,
  type AccessArgs,
} from './access.js';
import { DEFAULT_AUDIT_QUEUE } from './audit-log.js';

export { AccessFilter, type AccessArgs } from './access.js';
export { RULES_DOCUMENT_SCHEMA, RULE_SCHEMA, parseRulesDocument } from './rules.js';
export { verifyAuditLog, type VerifyReport } from './audit-verify.js';

export const accessFilterType: FilterType<AccessArgs> = {
  name: 'access',
  apiVersion: 1,
  description:
    'Access checking: ordered rules by operation, byte range and client (uid, gid, address/CIDR, export name) → allow, deny (EPERM) or audit; write-once (WORM) ranges; a hash-chained audit log of every deny and audit event; rules swapped live.',
  argsSchema: {
    type: 'object',
    properties: {
      rules: {
        type: ['string', 'object'],
        description:
          'The rules: a file path (JSON, or YAML unless it ends in .json; `reload` re-reads it), a string of JSON, or the rules object. Default: allow everything.',
      },
      auditLog: {
        type: 'string',
        minLength: 1,
        description:
          'File of the audit log (JSON lines, hash-chained; continued if it exists). Without it, deny and audit events go to the daemon log only.',
      },
      dir: {
        type: 'string',
        minLength: 1,
        description:
          'Existing directory for the persistent write-once state (DIR/EXPORT/FILTER/). Without it the written-block map lives in memory only.',
      },
      wormBlockSize: {
        type: ['integer', 'string'],
        default: '4K',
        description: `Unit of write-once tracking: a power of two, ${MIN_WORM_BLOCK_SIZE}..${MAX_WORM_BLOCK_SIZE} bytes (1 bit of memory per block). The first write to a block seals all of it. An existing state keeps its own.`,
      },
      auditQueue: {
        type: 'integer',
        minimum: 1,
        maximum: 1048576,
        default: DEFAULT_AUDIT_QUEUE,
        description: 'Audit lines queued for writing at most; beyond it, requests wait for room.',
      },
    },
    additionalProperties: false,
  },
  removalPolicies: REMOVAL_POLICIES,
  create(args, env) {
    return AccessFilter.open(args, env);
  },
};
