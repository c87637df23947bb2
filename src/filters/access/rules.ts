/**
 * The rules document of the access filter (docs/filters.md, `access`): its JSON Schema, the
 * validation with messages naming `rules[i].field`, and the compiled form the hot path walks.
 *
 *   { "default": "allow",
 *     "rules": [{ "action": "deny", "ops": ["write", "trim", "zero"], "range": [0, 1048576] }],
 *     "worm": [["1G", "end"]] }
 *
 * A document is parsed and compiled whole before it is installed, and installed with one
 * assignment: a request sees the old rules or the new ones, never a mixture.
 */
import { BlockList, isIP } from 'node:net';
import { Ajv, type ErrorObject } from 'ajv';
import type { ClientInfo, IoContext } from '../../core/device.js';
import { FilterCommandError } from '../../core/filter.js';
import { parseSize } from '../../core/size.js';
import { ALL_OPS_MASK, Op, opBit, opsOf, parseOps } from '../ops.js';
import { BURST_GUARD_SCHEMA, burstConfigOf, type BurstConfig } from './burst.js';

export const ACTIONS = ['allow', 'deny', 'audit'] as const;
export type Action = (typeof ACTIONS)[number];

/** Action codes, as the hot path uses them. */
export const ALLOW = 0;
export const DENY = 1;
export const AUDIT = 2;
const ACTION_CODE: Record<Action, number> = { allow: ALLOW, deny: DENY, audit: AUDIT };

export const MAX_RULES = 1024;
export const MAX_RANGES = 1024;

const WRITE_LIKE = opBit(Op.WRITE) | opBit(Op.TRIM) | opBit(Op.ZERO);

const offsetSchema = {
  type: ['integer', 'string'],
  minimum: 0,
};
const rangeSchema = {
  type: 'array',
  minItems: 1,
  description:
    'A byte range [start, end) (end exclusive), or an array of such ranges; offsets are numbers or sizes such as "1M"; "end" is the end of the device.',
  items: { anyOf: [offsetSchema, { type: 'array', items: offsetSchema }] },
};
const oneOrMany = (item: Record<string, unknown>): Record<string, unknown> => ({
  anyOf: [item, { type: 'array', items: item, minItems: 1 }],
});

/** JSON Schema of one rule. */
export const RULE_SCHEMA = {
  type: 'object',
  properties: {
    name: { type: 'string', maxLength: 64, description: 'A label shown in status and the log.' },
    action: {
      type: 'string',
      enum: [...ACTIONS],
      description: 'allow, deny (EPERM) or audit (allow and record in the audit log).',
    },
    ops: {
      type: ['string', 'array'],
      items: { type: 'string' },
      description:
        'Operations: read, write, flush, trim, zero, cache, block-status or all; an array or a comma-separated string. Default: all.',
    },
    range: rangeSchema,
    uid: oneOrMany({ type: 'integer', minimum: 0, maximum: 0xffffffff }),
    gid: oneOrMany({ type: 'integer', minimum: 0, maximum: 0xffffffff }),
    address: oneOrMany({ type: 'string', minLength: 1 }),
    export: oneOrMany({ type: 'string' }),
    tlsSubject: {
      ...oneOrMany({ type: 'string', minLength: 1 }),
      description:
        'The subject of a verified TLS client certificate, exactly, most specific part first: "CN=alice,O=Example" (as openssl x509 -noout -subject -nameopt RFC2253 prints it).',
    },
    pskIdentity: {
      ...oneOrMany({ type: 'string', minLength: 1 }),
      description: 'The PSK identity a TLS client authenticated with, exactly.',
    },
  },
  required: ['action'],
  additionalProperties: false,
} as const;

/** JSON Schema of the whole document. */
export const RULES_DOCUMENT_SCHEMA = {
  type: 'object',
  properties: {
    default: {
      type: 'string',
      enum: [...ACTIONS],
      description: 'What happens to a request no rule matches. Default: allow.',
    },
    rules: { type: 'array', items: RULE_SCHEMA, maxItems: MAX_RULES },
    worm: rangeSchema,
    burstGuard: BURST_GUARD_SCHEMA,
  },
  additionalProperties: false,
} as const;

const ajv = new Ajv({ allErrors: true, strict: false });
const validateDocument = ajv.compile(RULES_DOCUMENT_SCHEMA);

/** `/rules/0/ops` → `rules[0].ops`. */
function fieldOf(path: string): string {
  let out = '';
  for (const part of path.split('/').slice(1)) {
    if (/^[0-9]+$/.test(part)) out += `[${part}]`;
    else out += out === '' ? part : `.${part}`;
  }
  return out;
}

function describeErrors(errors: readonly ErrorObject[] | null | undefined): string {
  // anyOf failures repeat themselves once per branch; the anyOf line says it best.
  const list = errors ?? [];
  const anyOfPaths = new Set(list.filter((e) => e.keyword === 'anyOf').map((e) => e.instancePath));
  const problems = list
    .filter(
      (e) =>
        e.keyword === 'anyOf' ||
        ![...anyOfPaths].some(
          (p) => e.instancePath.startsWith(p) && e.schemaPath.includes('anyOf'),
        ),
    )
    .map((e) => {
      const field = fieldOf(e.instancePath);
      if (e.keyword === 'additionalProperties') {
        const extra = (e.params as { additionalProperty: string }).additionalProperty;
        return `${field ? `${field}: ` : ''}unknown field "${extra}"`;
      }
      if (e.keyword === 'enum') {
        const allowed = (e.params as { allowedValues: unknown[] }).allowedValues;
        return `${field || 'document'} must be one of ${allowed.map((v) => JSON.stringify(v)).join(', ')}`;
      }
      if (e.keyword === 'anyOf') return `${field} has the wrong type or value`;
      return `${field || 'document'} ${e.message ?? 'is invalid'}`;
    });
  return [...new Set(problems)].join('; ');
}

/** A rule as validated, normalised and shown in status. */
export interface RuleSpec {
  name?: string;
  action: Action;
  ops: string[];
  /** Merged, sorted [start, end) pairs; absent = every byte (and flushes). */
  range?: Array<[number, number]>;
  uid?: number[];
  gid?: number[];
  address?: string[];
  export?: string[];
  tlsSubject?: string[];
  pskIdentity?: string[];
}

export interface RulesDocument {
  default: Action;
  rules: RuleSpec[];
  /** Write-once ranges, merged and sorted. */
  worm: Array<[number, number]>;
  /** The write-burst guard, if configured. */
  burstGuard?: BurstConfig;
}

/** Sorted, merged [start, end) pairs from `[s, e]` or `[[s, e], ...]`. */
export function parseRanges(
  raw: unknown,
  where: string,
  size: number,
  align = 1,
): Array<[number, number]> {
  const problem = (msg: string): never => {
    throw new FilterCommandError(`${where}: ${msg}`);
  };
  if (!Array.isArray(raw) || raw.length === 0)
    return problem('must be [start, end] or an array of [start, end] ranges');
  const pairs: unknown[][] = Array.isArray(raw[0]) ? (raw as unknown[][]) : [raw];
  if (pairs.length > MAX_RANGES) problem(`at most ${MAX_RANGES} ranges`);
  const offset = (v: unknown, what: string): number => {
    if (v === 'end') return size;
    if (typeof v === 'number') {
      if (!Number.isSafeInteger(v) || v < 0) problem(`${what} must be a whole number of bytes`);
      return v;
    }
    if (typeof v === 'string') {
      try {
        return parseSize(v);
      } catch (err) {
        return problem(`${what}: ${(err as Error).message}`);
      }
    }
    return problem(`${what} must be a number, a size such as "1M", or "end"`);
  };
  const out: Array<[number, number]> = [];
  pairs.forEach((p, i) => {
    const at = pairs.length === 1 && !Array.isArray(raw[0]) ? '' : `[${i}]`;
    if (!Array.isArray(p) || p.length !== 2)
      problem(`${at ? `${at} ` : ''}a range is [start, end] (two offsets, end exclusive)`);
    const start = offset(p[0], `${at}start`.replace(/^\[/, 'range ['));
    const end = offset(p[1], `${at}end`.replace(/^\[/, 'range ['));
    if (end <= start) problem(`${at}end (${end}) must be greater than start (${start})`);
    if (end > size) problem(`${at}end (${end}) is past the end of the device (${size} bytes)`);
    if (align > 1 && (start % align !== 0 || (end % align !== 0 && end !== size)))
      problem(`${at}[${start}, ${end}) must be aligned to the WORM block size (${align} bytes)`);
    out.push([start, end]);
  });
  out.sort((a, b) => a[0] - b[0]);
  const merged: Array<[number, number]> = [];
  for (const r of out) {
    const last = merged[merged.length - 1];
    if (last !== undefined && r[0] <= last[1]) last[1] = Math.max(last[1], r[1]);
    else merged.push([r[0], r[1]]);
  }
  return merged;
}

function list<T>(v: T | T[] | undefined): T[] | undefined {
  return v === undefined ? undefined : Array.isArray(v) ? v : [v];
}

/** An address or CIDR (v4 or v6); returns it normalised, or throws. */
export function checkAddress(text: string): string {
  const slash = text.indexOf('/');
  const addr = slash < 0 ? text : text.slice(0, slash);
  const family = isIP(addr);
  if (family === 0) throw new Error(`"${text}" is not an IP address or CIDR`);
  if (slash >= 0) {
    const bitsText = text.slice(slash + 1);
    const bits = Number(bitsText);
    if (!/^[0-9]{1,3}$/.test(bitsText) || bits > (family === 4 ? 32 : 128))
      throw new Error(`"${text}": the prefix length must be 0..${family === 4 ? 32 : 128}`);
  }
  return text;
}

/**
 * Parses and validates a rules document against a device of `size` bytes; WORM ranges must
 * be aligned to `wormBlockSize`. Throws FilterCommandError naming the field.
 */
export function parseRulesDocument(
  raw: unknown,
  size: number,
  wormBlockSize: number,
): RulesDocument {
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw))
    throw new FilterCommandError(
      'the rules must be an object: {"default": "allow", "rules": [...], "worm": [...]}',
    );
  if (!validateDocument(raw)) throw new FilterCommandError(describeErrors(validateDocument.errors));
  const doc = raw as {
    default?: Action;
    rules?: Array<Record<string, unknown>>;
    worm?: unknown;
    burstGuard?: Record<string, unknown>;
  };
  const rules = (doc.rules ?? []).map((r, i): RuleSpec => {
    const where = `rules[${i}]`;
    const problem = (field: string, msg: string): never => {
      throw new FilterCommandError(`${where}.${field}: ${msg}`);
    };
    const spec: RuleSpec = { action: r.action as Action, ops: [] };
    if (r.name !== undefined) spec.name = r.name as string;
    let mask = ALL_OPS_MASK;
    if (r.ops !== undefined) {
      try {
        mask = parseOps(r.ops);
      } catch (err) {
        problem('ops', (err as Error).message);
      }
    }
    spec.ops = opsOf(mask);
    if (r.range !== undefined) spec.range = parseRanges(r.range, `${where}.range`, size);
    const uid = list(r.uid as number | number[] | undefined);
    if (uid) spec.uid = uid;
    const gid = list(r.gid as number | number[] | undefined);
    if (gid) spec.gid = gid;
    const address = list(r.address as string | string[] | undefined);
    if (address) {
      spec.address = address.map((a) => {
        try {
          return checkAddress(a);
        } catch (err) {
          return problem('address', (err as Error).message);
        }
      });
    }
    const exp = list(r.export as string | string[] | undefined);
    if (exp) spec.export = exp;
    const subject = list(r.tlsSubject as string | string[] | undefined);
    if (subject) {
      // A subject as OpenSSL prints it by default ("C = GB, O = Example, CN = alice") is in the
      // other order and spacing, and would never match: say so rather than match nothing.
      for (const s of subject)
        if (/^\s*[A-Za-z0-9.]+\s+=\s/.test(s) || s.startsWith('/'))
          problem(
            'tlsSubject',
            `${JSON.stringify(s)} is not in RFC 2253 form; write it as openssl x509 -noout -subject -nameopt RFC2253 prints it, e.g. "CN=alice,O=Example"`,
          );
      spec.tlsSubject = subject;
    }
    const psk = list(r.pskIdentity as string | string[] | undefined);
    if (psk) spec.pskIdentity = psk;
    return spec;
  });
  const worm =
    doc.worm === undefined ? [] : parseRanges(doc.worm, 'worm', size, Math.max(1, wormBlockSize));
  return {
    default: doc.default ?? 'allow',
    rules,
    worm,
    ...(doc.burstGuard !== undefined ? { burstGuard: burstConfigOf(doc.burstGuard) } : {}),
  };
}

// ---- the compiled form ---------------------------------------------------------------------------

const V4_MAPPED = /^::ffff:([0-9]+\.[0-9]+\.[0-9]+\.[0-9]+)$/i;

/** Whether `address` (as the server saw it) falls in `list`; v4-mapped v6 counts as v4. */
function addressIn(list: BlockList, address: string | undefined): boolean {
  if (address === undefined) return false;
  const mapped = V4_MAPPED.exec(address);
  if (mapped) return list.check(mapped[1]!, 'ipv4') || list.check(address, 'ipv6');
  const family = isIP(address);
  if (family === 0) return false;
  return list.check(address, family === 4 ? 'ipv4' : 'ipv6');
}

function blockListOf(addresses: readonly string[]): BlockList {
  const bl = new BlockList();
  for (const a of addresses) {
    const slash = a.indexOf('/');
    const addr = slash < 0 ? a : a.slice(0, slash);
    const type = isIP(addr) === 4 ? 'ipv4' : 'ipv6';
    if (slash < 0) bl.addAddress(addr, type);
    else bl.addSubnet(addr, Number(a.slice(slash + 1)), type);
  }
  return bl;
}

export class CompiledRule {
  readonly opMask: number;
  readonly action: number;
  /** Flat sorted [start0, end0, start1, end1, ...]; null = everything. */
  readonly ranges: Float64Array | null;
  readonly hasIdentity: boolean;
  private readonly addresses: BlockList | null;
  hits = 0;

  constructor(
    readonly index: number,
    readonly spec: RuleSpec,
  ) {
    this.opMask = parseOps(spec.ops);
    this.action = ACTION_CODE[spec.action];
    this.ranges = spec.range ? Float64Array.from(spec.range.flat()) : null;
    this.addresses = spec.address ? blockListOf(spec.address) : null;
    this.hasIdentity =
      spec.uid !== undefined ||
      spec.gid !== undefined ||
      spec.address !== undefined ||
      spec.export !== undefined ||
      spec.tlsSubject !== undefined ||
      spec.pskIdentity !== undefined;
  }

  /** Whether [offset, last) overlaps one of the ranges (binary search). */
  overlaps(offset: number, last: number): boolean {
    const r = this.ranges!;
    let lo = 0;
    let hi = r.length / 2;
    // The first range whose end is past `offset`.
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (r[mid * 2 + 1]! <= offset) lo = mid + 1;
      else hi = mid;
    }
    return lo < r.length / 2 && r[lo * 2]! < last;
  }

  /** Whether a client (and the export name it used) is one this rule is about. */
  matchesClient(ctx: IoContext): boolean {
    const s = this.spec;
    const c: ClientInfo = ctx.client;
    if (s.export !== undefined && !s.export.includes(ctx.exportName)) return false;
    if (s.uid !== undefined && (c.uid === undefined || !s.uid.includes(c.uid))) return false;
    if (s.gid !== undefined && (c.gid === undefined || !s.gid.includes(c.gid))) return false;
    if (this.addresses !== null && !addressIn(this.addresses, c.address)) return false;
    if (
      s.tlsSubject !== undefined &&
      (c.tlsSubject === undefined || !s.tlsSubject.includes(c.tlsSubject))
    )
      return false;
    if (
      s.pskIdentity !== undefined &&
      (c.pskIdentity === undefined || !s.pskIdentity.includes(c.pskIdentity))
    )
      return false;
    return true;
  }

  describe(): Record<string, unknown> {
    return { index: this.index, ...this.spec, hits: this.hits };
  }
}

/** What a request not from a client (the filter's own I/O, internal callers) looks like. */
const INTERNAL: IoContext = { exportName: '', client: { transport: 'internal' } };

export class RuleSet {
  readonly rules: readonly CompiledRule[];
  readonly defaultAction: number;
  /** Operations whose outcome may be other than "allowed, not recorded". */
  readonly slowMask: number;
  /** Flat sorted [start, end, ...] of the WORM ranges. */
  readonly worm: Float64Array;
  defaultHits = 0;
  /** Per connection: which rules match its identity (one entry per rule; 1 = match). */
  private readonly identities = new WeakMap<IoContext, Uint8Array>();

  constructor(
    readonly doc: RulesDocument,
    /** Whether sealed blocks exist (outside the WORM ranges too): writes must be checked. */
    sealedBlocks: boolean,
  ) {
    this.rules = doc.rules.map((s, i) => new CompiledRule(i, s));
    this.defaultAction = ACTION_CODE[doc.default];
    this.worm = Float64Array.from(doc.worm.flat());
    let mask = this.defaultAction === ALLOW ? 0 : ALL_OPS_MASK;
    for (const r of this.rules) if (r.action !== ALLOW) mask |= r.opMask;
    if (this.worm.length > 0 || sealedBlocks || doc.burstGuard !== undefined) mask |= WRITE_LIKE;
    this.slowMask = mask;
  }

  /**
   * The deciding rule's index for a request, or -1 for the default. `flush` has no range: it
   * matches only rules without one.
   */
  decide(bit: number, isFlush: boolean, offset: number, length: number, ctx?: IoContext): number {
    const rules = this.rules;
    const last = offset + (length > 0 ? length : 1);
    let ident: Uint8Array | undefined;
    for (let i = 0; i < rules.length; i++) {
      const r = rules[i]!;
      if ((r.opMask & bit) === 0) continue;
      if (r.ranges !== null && (isFlush || !r.overlaps(offset, last))) continue;
      if (r.hasIdentity) {
        ident ??= this.identityOf(ctx ?? INTERNAL);
        if (ident[i] === 0) continue;
      }
      r.hits++;
      return i;
    }
    this.defaultHits++;
    return -1;
  }

  private identityOf(ctx: IoContext): Uint8Array {
    let m = this.identities.get(ctx);
    if (m === undefined) {
      m = new Uint8Array(this.rules.length);
      for (let i = 0; i < this.rules.length; i++)
        m[i] = this.rules[i]!.hasIdentity && this.rules[i]!.matchesClient(ctx) ? 1 : 0;
      this.identities.set(ctx, m);
    }
    return m;
  }

  /** Whether [offset, offset + length) touches a WORM range. */
  touchesWorm(offset: number, length: number): boolean {
    const r = this.worm;
    const last = offset + (length > 0 ? length : 1);
    for (let i = 0; i < r.length; i += 2) {
      if (r[i]! >= last) return false;
      if (r[i + 1]! > offset) return true;
    }
    return false;
  }

  /** Whether byte `offset` lies in a WORM range. */
  inWorm(offset: number): boolean {
    const r = this.worm;
    for (let i = 0; i < r.length; i += 2) {
      if (r[i]! > offset) return false;
      if (r[i + 1]! > offset) return true;
    }
    return false;
  }

  /** Whether every WORM range of `older` is covered by this set's ranges. */
  coversWorm(older: RuleSet): boolean {
    const o = older.worm;
    for (let i = 0; i < o.length; i += 2) {
      let covered = false;
      for (let j = 0; j < this.worm.length; j += 2)
        if (this.worm[j]! <= o[i]! && this.worm[j + 1]! >= o[i + 1]!) covered = true;
      if (!covered) return false;
    }
    return true;
  }
}

export function actionName(code: number): Action {
  return ACTIONS[code]!;
}
