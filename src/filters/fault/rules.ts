/**
 * Fault rules: their schema (shared by the `rules` argument and the `set-rules`/`add-rule`
 * commands), validation with readable errors, and their run-time form.
 */
import { ERRNOS, type Errno } from '../../core/errors.js';
import { FilterCommandError } from '../../core/filter.js';
import { parseSize } from '../../core/size.js';
import { describeAjvErrors } from '../args.js';
import { Op, opBit, opsOf, parseOps } from '../ops.js';
import { Ajv } from 'ajv';

export const ACTIONS = ['error', 'delay', 'flakey', 'drop', 'torn'] as const;
export type Action = (typeof ACTIONS)[number];

/** Operations each action can apply to, and the default when a rule names none. */
const WRITE_LIKE = opBit(Op.WRITE) | opBit(Op.TRIM) | opBit(Op.ZERO);
const ACTION_OPS: Record<Action, { allowed: number; default: number }> = {
  error: { allowed: 0x7f, default: 0x7f },
  delay: { allowed: 0x7f, default: 0x7f },
  flakey: { allowed: 0x7f, default: 0x7f },
  drop: { allowed: WRITE_LIKE, default: WRITE_LIKE },
  torn: { allowed: opBit(Op.WRITE), default: opBit(Op.WRITE) },
};

export const MAX_RULES = 1024;
const MAX_DELAY_MS = 600_000;

const sizeOrInt = (description: string): Record<string, unknown> => ({
  type: ['integer', 'string'],
  minimum: 0,
  description,
});

/** JSON Schema of one rule (documentation, and the first line of validation). */
export const RULE_SCHEMA = {
  type: 'object',
  properties: {
    name: { type: 'string', maxLength: 64, description: 'A label shown in status and metrics.' },
    ops: {
      type: ['string', 'array'],
      items: { type: 'string' },
      description:
        'Operations the rule matches: read, write, flush, trim, zero, cache, block-status or all; an array or a comma-separated string. Default: all (drop: write,trim,zero; torn: write).',
    },
    start: sizeOrInt(
      'First byte of the range the rule matches (a number or a size such as "1M"). Default 0.',
    ),
    end: sizeOrInt(
      'End of the range (exclusive). Default: the end of the device. Requests overlapping [start, end) match; a flush (which has no range) matches only rules without start or end.',
    ),
    probability: {
      type: 'number',
      minimum: 0,
      maximum: 1,
      description:
        'Chance that a matching request is hit (0..1), drawn from the seeded generator. Default 1.',
    },
    count: {
      type: 'integer',
      minimum: 1,
      description: 'Fire at most this many times. Default: no limit.',
    },
    after: {
      type: 'integer',
      minimum: 0,
      description: 'Let the first N matching requests through untouched. Default 0.',
    },
    action: {
      type: 'string',
      enum: [...ACTIONS],
      description: 'What a hit does: error, delay, flakey, drop or torn.',
    },
    errno: {
      type: 'string',
      enum: [...ERRNOS],
      description:
        'error/flakey: the errno (default EIO). torn: fail with this errno after the partial write (default: report success).',
    },
    delayMs: {
      type: 'number',
      minimum: 0,
      maximum: MAX_DELAY_MS,
      description: 'delay: milliseconds to wait before passing the request on.',
    },
    upMs: {
      type: 'number',
      exclusiveMinimum: 0,
      description: 'flakey: milliseconds the device works in each cycle (the cycle starts up).',
    },
    downMs: {
      type: 'number',
      exclusiveMinimum: 0,
      description: 'flakey: milliseconds matching requests fail in each cycle.',
    },
    tornBytes: sizeOrInt(
      'torn: bytes of the write that reach the device. Default: half of the write.',
    ),
  },
  required: ['action'],
  additionalProperties: false,
} as const;

const ajv = new Ajv({ coerceTypes: true, useDefaults: true, allErrors: true, strict: false });
const validateRule = ajv.compile(RULE_SCHEMA);

/** A rule as validated and shown in status. */
export interface RuleSpec {
  name?: string;
  ops: string[];
  start: number;
  end: number | null;
  probability: number;
  count: number | null;
  after: number;
  action: Action;
  errno?: Errno;
  delayMs?: number;
  upMs?: number;
  downMs?: number;
  tornBytes?: number;
}

/** The run-time form: flat fields the hot path reads, and the counters. */
export class Rule {
  readonly opMask: number;
  readonly start: number;
  /** Exclusive; Infinity for "to the end of the device". */
  readonly end: number;
  readonly probability: number;
  readonly count: number;
  readonly after: number;
  readonly action: Action;
  readonly errno: Errno | undefined;
  readonly delayMs: number;
  readonly upMs: number;
  readonly period: number;
  /** -1: half of the write. */
  readonly tornBytes: number;
  /** performance.now() when the rule was installed: a flakey cycle starts there. */
  readonly since = performance.now();
  matches = 0;
  hits = 0;

  constructor(
    readonly id: number,
    readonly spec: RuleSpec,
  ) {
    this.opMask = parseOps(spec.ops);
    this.start = spec.start;
    this.end = spec.end ?? Infinity;
    this.probability = spec.probability;
    this.count = spec.count ?? Infinity;
    this.after = spec.after;
    this.action = spec.action;
    this.errno = spec.errno;
    this.delayMs = spec.delayMs ?? 0;
    this.upMs = spec.upMs ?? 0;
    this.period = (spec.upMs ?? 0) + (spec.downMs ?? 0);
    this.tornBytes = spec.tornBytes ?? -1;
  }

  /** For flakey rules: whether the device is in the "down" part of its cycle at `now`. */
  isDown(now: number): boolean {
    return (now - this.since) % this.period >= this.upMs;
  }

  describe(now: number): Record<string, unknown> {
    return {
      id: this.id,
      ...this.spec,
      matches: this.matches,
      hits: this.hits,
      exhausted: this.hits >= this.count,
      ...(this.action === 'flakey' ? { state: this.isDown(now) ? 'down' : 'up' } : {}),
    };
  }
}

/**
 * Validates one rule (coercing strings from the command line) and returns its spec; `where`
 * prefixes messages (e.g. "rules[2]").
 */
export function parseRule(raw: unknown, where: string): RuleSpec {
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) {
    throw new FilterCommandError(`${where}: a rule must be an object`);
  }
  const r = structuredClone(raw) as Record<string, unknown>;
  if (!validateRule(r))
    throw new FilterCommandError(`${where}: ${describeAjvErrors(validateRule.errors)}`);
  const problem = (msg: string): never => {
    throw new FilterCommandError(`${where}: ${msg}`);
  };
  const action = r.action as Action;
  const size = (key: string): number | undefined => {
    const v = r[key];
    if (v === undefined) return undefined;
    if (typeof v === 'number') return v;
    try {
      return parseSize(String(v));
    } catch (err) {
      return problem(`${key}: ${(err as Error).message}`);
    }
  };
  let opMask: number;
  if (r.ops === undefined) opMask = ACTION_OPS[action].default;
  else {
    try {
      opMask = parseOps(r.ops);
    } catch (err) {
      return problem(`ops ${(err as Error).message}`);
    }
  }
  const outside = opMask & ~ACTION_OPS[action].allowed;
  if (outside !== 0) {
    problem(
      `action "${action}" applies only to ${opsOf(ACTION_OPS[action].allowed).join(', ')} (not ${opsOf(outside).join(', ')})`,
    );
  }
  const start = size('start') ?? 0;
  const end = size('end') ?? null;
  if (end !== null && end <= start) problem(`end (${end}) must be greater than start (${start})`);
  const spec: RuleSpec = {
    ...(r.name !== undefined ? { name: r.name as string } : {}),
    ops: opsOf(opMask),
    start,
    end,
    probability: (r.probability as number | undefined) ?? 1,
    count: (r.count as number | undefined) ?? null,
    after: (r.after as number | undefined) ?? 0,
    action,
  };
  const only = (keys: string[], actions: Action[]): void => {
    for (const k of keys) {
      if (r[k] !== undefined && !actions.includes(action))
        problem(`${k} applies only to action ${actions.join(' or ')}`);
    }
  };
  only(['errno'], ['error', 'flakey', 'torn']);
  only(['delayMs'], ['delay']);
  only(['upMs', 'downMs'], ['flakey']);
  only(['tornBytes'], ['torn']);
  switch (action) {
    case 'error':
      spec.errno = (r.errno as Errno | undefined) ?? 'EIO';
      break;
    case 'delay':
      if (r.delayMs === undefined) problem('action "delay" needs delayMs');
      spec.delayMs = r.delayMs as number;
      break;
    case 'flakey':
      if (r.upMs === undefined || r.downMs === undefined)
        problem('action "flakey" needs upMs and downMs');
      spec.errno = (r.errno as Errno | undefined) ?? 'EIO';
      spec.upMs = r.upMs as number;
      spec.downMs = r.downMs as number;
      break;
    case 'drop':
      break;
    case 'torn': {
      if (r.errno !== undefined) spec.errno = r.errno as Errno;
      const torn = size('tornBytes');
      if (torn !== undefined) spec.tornBytes = torn;
      break;
    }
  }
  return spec;
}

/** Rules given as an array or as a string of JSON (as the command line passes them). */
export function parseRules(raw: unknown, where = 'rules'): RuleSpec[] {
  let list = raw;
  if (typeof raw === 'string') {
    try {
      list = JSON.parse(raw);
    } catch (err) {
      throw new FilterCommandError(`${where}: not valid JSON: ${(err as Error).message}`);
    }
    // A single rule object is accepted as a list of one.
    if (typeof list === 'object' && list !== null && !Array.isArray(list)) list = [list];
  }
  if (!Array.isArray(list))
    throw new FilterCommandError(`${where} must be an array of rules (or a string of JSON)`);
  if (list.length > MAX_RULES) throw new FilterCommandError(`${where}: at most ${MAX_RULES} rules`);
  return list.map((r, i) => parseRule(r, `${where}[${i}]`));
}
