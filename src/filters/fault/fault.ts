/**
 * The fault filter: seeded, reproducible fault injection by rules (see rules.ts).
 *
 * Each request of an operation that some rule names is checked against the rules in order.
 * A rule matches when the operation is one of its `ops` and the request overlaps its range;
 * the first `after` matches are let through, at most `count` hits happen, a flakey rule hits
 * only in the "down" part of its cycle, and `probability` < 1 draws from the seeded generator.
 * A `delay` hit adds its delay and the walk goes on; the first hit of any other action ends
 * the walk and decides the request's fate (after the delays).
 *
 * Fast path: a bit mask of the operations any rule names; a request of any other operation
 * (every request, when there are no rules) goes straight down: one AND and a call.
 */
import { randomInt } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import type { Device, Extent, IoContext } from '../../core/device.js';
import { DeviceError } from '../../core/errors.js';
import { FilterCommandError, type Filter } from '../../core/filter.js';
import type { MetricFamily, ValueSample } from '../../metrics/types.js';
import { commandValidator, unknownCommand } from '../args.js';
import { Op, opBit } from '../ops.js';
import { mulberry32 } from './rng.js';
import { MAX_RULES, Rule, parseRule, parseRules, type RuleSpec } from './rules.js';

const READ = opBit(Op.READ);
const WRITE = opBit(Op.WRITE);
const FLUSH = opBit(Op.FLUSH);
const TRIM = opBit(Op.TRIM);
const ZERO = opBit(Op.ZERO);
const CACHE = opBit(Op.CACHE);
const BLOCK_STATUS = opBit(Op.BLOCK_STATUS);
/** Never returned: block status cannot be dropped (rules.ts refuses such rules). */
const NO_EXTENTS: Extent[] = [];

export interface FaultArgs {
  seed?: number;
  rules?: unknown;
}

const COMMANDS = ['set-rules', 'add-rule', 'remove-rule', 'clear', 'reseed'] as const;

const setRulesArgs = commandValidator<{ rules: unknown; seed?: number }>(
  {
    type: 'object',
    properties: {
      rules: {
        type: ['array', 'string'],
        description: 'the new rules (array, or a string of JSON)',
      },
      seed: {
        type: 'integer',
        minimum: 0,
        maximum: 0xffffffff,
        description: 'restart the generator with this seed',
      },
    },
    required: ['rules'],
    additionalProperties: false,
  },
  'set-rules',
);
const removeRuleArgs = commandValidator<{ id: number }>(
  {
    type: 'object',
    properties: { id: { type: 'integer', minimum: 1, description: 'the id shown in status' } },
    required: ['id'],
    additionalProperties: false,
  },
  'remove-rule',
);
const reseedArgs = commandValidator<{ seed?: number }>(
  {
    type: 'object',
    properties: {
      seed: {
        type: 'integer',
        minimum: 0,
        maximum: 0xffffffff,
        description: 'default: a random seed',
      },
    },
    additionalProperties: false,
  },
  'reseed',
);

export function randomSeed(): number {
  return randomInt(0, 0x1_0000_0000);
}

export class FaultFilter implements Filter {
  private rules: readonly Rule[] = [];
  /** Operations some rule names: the rest take the fast path. */
  private mask = 0;
  private nextId = 1;
  private seed: number;
  private random: () => number;
  /** Set by decide(): total delay of the delay rules that hit. */
  private delayMs = 0;
  // Totals since creation.
  private injectedErrors = 0;
  private delayed = 0;
  private dropped = 0;
  private droppedBytes = 0;
  private torn = 0;

  constructor(args: FaultArgs) {
    this.seed = args.seed ?? randomSeed();
    this.random = mulberry32(this.seed);
    if (args.rules !== undefined) this.install(parseRules(args.rules));
  }

  // ---- hooks ---------------------------------------------------------------------------------

  read(next: Device, buf: Buffer, offset: number, flags: number, ctx?: IoContext): Promise<void> {
    if ((this.mask & READ) === 0) return next.read(buf, offset, flags, ctx);
    return this.slow(
      Op.READ,
      offset,
      buf.length,
      () => next.read(buf, offset, flags, ctx),
      undefined,
    );
  }

  write(next: Device, data: Buffer, offset: number, flags: number, ctx?: IoContext): Promise<void> {
    if ((this.mask & WRITE) === 0) return next.write(data, offset, flags, ctx);
    return this.slow(
      Op.WRITE,
      offset,
      data.length,
      () => next.write(data, offset, flags, ctx),
      undefined,
      (keep) => next.write(data.subarray(0, keep), offset, flags, ctx),
    );
  }

  flush(next: Device, flags: number, ctx?: IoContext): Promise<void> {
    if ((this.mask & FLUSH) === 0) return next.flush(flags, ctx);
    return this.slow(Op.FLUSH, 0, 0, () => next.flush(flags, ctx), undefined);
  }

  trim(
    next: Device,
    offset: number,
    length: number,
    flags: number,
    ctx?: IoContext,
  ): Promise<void> {
    if ((this.mask & TRIM) === 0) return next.trim(offset, length, flags, ctx);
    return this.slow(
      Op.TRIM,
      offset,
      length,
      () => next.trim(offset, length, flags, ctx),
      undefined,
    );
  }

  writeZeroes(
    next: Device,
    offset: number,
    length: number,
    flags: number,
    ctx?: IoContext,
  ): Promise<void> {
    if ((this.mask & ZERO) === 0) return next.writeZeroes(offset, length, flags, ctx);
    return this.slow(
      Op.ZERO,
      offset,
      length,
      () => next.writeZeroes(offset, length, flags, ctx),
      undefined,
    );
  }

  cache(
    next: Device,
    offset: number,
    length: number,
    flags: number,
    ctx?: IoContext,
  ): Promise<void> {
    if ((this.mask & CACHE) === 0) return next.cache(offset, length, flags, ctx);
    return this.slow(
      Op.CACHE,
      offset,
      length,
      () => next.cache(offset, length, flags, ctx),
      undefined,
    );
  }

  blockStatus(
    next: Device,
    offset: number,
    length: number,
    flags: number,
    ctx?: IoContext,
  ): Promise<Extent[]> {
    if ((this.mask & BLOCK_STATUS) === 0) return next.blockStatus(offset, length, flags, ctx);
    return this.slow(
      Op.BLOCK_STATUS,
      offset,
      length,
      () => next.blockStatus(offset, length, flags, ctx),
      NO_EXTENTS,
    );
  }

  /**
   * A request some rule may apply to: decide, wait the delays, then act. `dropped` is what a
   * dropped request reports (only write-like operations can be dropped); `tear` passes the
   * first bytes of a write down.
   */
  private async slow<T>(
    op: number,
    offset: number,
    length: number,
    pass: () => Promise<T>,
    dropped: T,
    tear?: (keep: number) => Promise<void>,
  ): Promise<T> {
    const rule = this.decide(op, offset, length);
    const delay = this.delayMs;
    if (delay > 0) {
      this.delayed++;
      await sleep(delay);
    }
    if (rule === null) return pass();
    switch (rule.action) {
      case 'error':
      case 'flakey':
        this.injectedErrors++;
        throw new DeviceError(
          rule.errno ?? 'EIO',
          `fault injected by rule ${rule.id}${rule.spec.name ? ` (${rule.spec.name})` : ''}`,
        );
      case 'drop':
        this.dropped++;
        this.droppedBytes += length;
        return dropped;
      case 'torn': {
        this.torn++;
        const keep = rule.tornBytes < 0 ? Math.floor(length / 2) : Math.min(rule.tornBytes, length);
        if (keep > 0) await tear!(keep);
        if (rule.errno !== undefined) {
          this.injectedErrors++;
          throw new DeviceError(
            rule.errno,
            `torn write: ${keep} of ${length} bytes written (rule ${rule.id})`,
          );
        }
        return dropped;
      }
      default:
        return pass();
    }
  }

  /** Walks the rules for one request; returns the deciding rule and sets this.delayMs. */
  private decide(op: number, offset: number, length: number): Rule | null {
    const bit = opBit(op);
    // A flush has no range: it matches only rules that cover the whole device.
    const isFlush = op === Op.FLUSH;
    const last = offset + (length > 0 ? length : 1);
    let delay = 0;
    let now = -1;
    const rules = this.rules;
    for (let i = 0; i < rules.length; i++) {
      const r = rules[i]!;
      if ((r.opMask & bit) === 0) continue;
      if (isFlush ? r.start > 0 || r.end !== Infinity : offset >= r.end || last <= r.start)
        continue;
      if (r.hits >= r.count) continue;
      r.matches++;
      if (r.matches <= r.after) continue;
      if (r.action === 'flakey') {
        if (now < 0) now = performance.now();
        if (!r.isDown(now)) continue;
      }
      if (r.probability < 1 && (r.probability <= 0 || this.random() >= r.probability)) continue;
      r.hits++;
      if (r.action === 'delay') {
        delay += r.delayMs;
        continue;
      }
      this.delayMs = delay;
      return r;
    }
    this.delayMs = delay;
    return null;
  }

  // ---- control plane -------------------------------------------------------------------------

  private install(specs: readonly RuleSpec[]): Rule[] {
    const rules = specs.map((s) => new Rule(this.nextId++, s));
    this.setRules(rules);
    return rules;
  }

  private setRules(rules: readonly Rule[]): void {
    // One assignment each: a request in decide() sees either the old rules or the new.
    this.rules = rules;
    this.mask = rules.reduce((m, r) => m | r.opMask, 0);
  }

  status(): unknown {
    const now = performance.now();
    return {
      seed: this.seed,
      rules: this.rules.map((r) => r.describe(now)),
      injected: {
        errors: this.injectedErrors,
        delayed: this.delayed,
        dropped: this.dropped,
        droppedBytes: this.droppedBytes,
        torn: this.torn,
      },
    };
  }

  control(command: string, args: Record<string, unknown>): unknown {
    switch (command) {
      case 'set-rules': {
        const a = setRulesArgs(args);
        const specs = parseRules(a.rules);
        if (a.seed !== undefined) this.reseed(a.seed);
        this.install(specs);
        return this.status();
      }
      case 'add-rule': {
        // The arguments are the rule itself (`add-rule action=error ops=write start=0 end=1M`).
        const spec = parseRule(args, 'add-rule');
        if (this.rules.length >= MAX_RULES)
          throw new FilterCommandError(`at most ${MAX_RULES} rules`);
        const rule = new Rule(this.nextId++, spec);
        this.setRules([...this.rules, rule]);
        return rule.describe(performance.now());
      }
      case 'remove-rule': {
        const { id } = removeRuleArgs(args);
        if (!this.rules.some((r) => r.id === id))
          throw new FilterCommandError(`no rule with id ${id}`);
        this.setRules(this.rules.filter((r) => r.id !== id));
        return { removed: id };
      }
      case 'clear': {
        const removed = this.rules.length;
        this.setRules([]);
        return { removed };
      }
      case 'reseed': {
        const { seed } = reseedArgs(args);
        this.reseed(seed ?? randomSeed());
        return { seed: this.seed };
      }
      default:
        throw unknownCommand('fault', command, COMMANDS);
    }
  }

  private reseed(seed: number): void {
    this.seed = seed;
    this.random = mulberry32(seed);
  }

  /** Prometheus metrics: hits per rule, and injected totals. */
  metrics(): MetricFamily[] {
    const hits: ValueSample[] = this.rules.map((r) => ({
      labels: { rule: String(r.id), action: r.action, name: r.spec.name ?? '' },
      value: r.hits,
    }));
    return [
      {
        name: 'devfilter_fault_rule_hits_total',
        help: 'Requests a fault rule acted on, by rule id.',
        type: 'counter',
        samples: hits,
      },
      {
        name: 'devfilter_fault_injected_total',
        help: 'Faults injected since the filter was created, by kind.',
        type: 'counter',
        samples: [
          { labels: { kind: 'error' }, value: this.injectedErrors },
          { labels: { kind: 'delay' }, value: this.delayed },
          { labels: { kind: 'drop' }, value: this.dropped },
          { labels: { kind: 'torn' }, value: this.torn },
        ],
      },
    ];
  }
}
