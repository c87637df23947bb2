/**
 * The access filter: an ordered rule list (first match wins, then the default) by operation,
 * byte range and client identity → allow, deny (EPERM) or audit (allow and record);
 * write-once (WORM) ranges whose blocks can be written once and never overwritten, trimmed or
 * zeroed afterwards; and a hash-chained audit log of every deny and audit event.
 *
 * Hot path: the compiled rule set carries a mask of the operations whose outcome may be other
 * than "allowed, unrecorded"; a request of any other operation (every request, with an allow
 * default and no rules) goes straight down after one AND. The rule set (rules, default, WORM
 * ranges, mask) is replaced with one assignment.
 *
 * rules.ts: the document and its compiled form; worm.ts: sealed blocks and their journal;
 * audit-log.ts: the log writer.
 */
import { readFile } from 'node:fs/promises';
import { extname, resolve } from 'node:path';
import { parse as parseYaml } from 'yaml';
import type { Device, Extent, IoContext } from '../../core/device.js';
import { DeviceError } from '../../core/errors.js';
import { FilterCommandError, type Filter, type FilterEnv } from '../../core/filter.js';
import { parseSize } from '../../core/size.js';
import type { MetricFamily } from '../../metrics/types.js';
import { commandValidator, unknownCommand } from '../args.js';
import { OP_NAMES, Op, opBit } from '../ops.js';
import { AuditLog, DEFAULT_AUDIT_QUEUE } from './audit-log.js';
import { BurstGuard, type BurstConfig, type Trip } from './burst.js';
import { AUDIT, DENY, RuleSet, actionName, parseRulesDocument } from './rules.js';
import { WormMap, WormStore, type WormRecovery } from './worm.js';

export type AccessArgs = {
  /** A rules file path (JSON or YAML), a JSON string, or the rules object itself. */
  rules?: string | Record<string, unknown>;
  /** Audit log file (JSON lines, hash-chained). */
  auditLog?: string;
  /** Parent directory of the persistent WORM state (DIR/EXPORT/FILTER/). */
  dir?: string;
  /** Unit of write-once tracking. */
  wormBlockSize?: number | string;
  /** Lines the audit log may queue before requests wait for room. */
  auditQueue?: number;
};

export const REMOVAL_POLICIES = ['keep', 'drop'] as const;
export const DEFAULT_WORM_BLOCK_SIZE = 4096;
export const MIN_WORM_BLOCK_SIZE = 512;
export const MAX_WORM_BLOCK_SIZE = 64 * 1024 * 1024;
/** Sealed extents `worm-status` lists by default. */
const DEFAULT_EXTENT_LIMIT = 1000;

const READ = opBit(Op.READ);
const WRITE = opBit(Op.WRITE);
const FLUSH = opBit(Op.FLUSH);
const TRIM = opBit(Op.TRIM);
const ZERO = opBit(Op.ZERO);
const CACHE = opBit(Op.CACHE);
const BLOCK_STATUS = opBit(Op.BLOCK_STATUS);

const COMMANDS = ['set-rules', 'reload', 'status', 'worm-status', 'burst-reset'] as const;

const setRulesArgs = commandValidator<{ rules: string | Record<string, unknown> }>(
  {
    type: 'object',
    properties: {
      rules: {
        type: ['object', 'string'],
        description:
          'the new rules: a rules object, a string of JSON, or a file path (which becomes the file `reload` reads)',
      },
    },
    required: ['rules'],
    additionalProperties: false,
  },
  'set-rules',
);
const noArgs = commandValidator<Record<string, never>>(
  { type: 'object', properties: {}, additionalProperties: false },
  'access',
);
const burstResetArgs = commandValidator<{ client?: string }>(
  {
    type: 'object',
    properties: {
      client: {
        type: 'string',
        minLength: 1,
        description: 'one client, as burstGuard.blockedClients names it (default: all)',
      },
    },
    additionalProperties: false,
  },
  'burst-reset',
);
const wormStatusArgs = commandValidator<{ offset: number; length?: number; limit: number }>(
  {
    type: 'object',
    properties: {
      offset: { type: 'integer', minimum: 0, default: 0 },
      length: { type: 'integer', minimum: 0 },
      limit: { type: 'integer', minimum: 0, maximum: 1_000_000, default: DEFAULT_EXTENT_LIMIT },
    },
    additionalProperties: false,
  },
  'worm-status',
);

function isPowerOfTwo(n: number): boolean {
  return Number.isSafeInteger(n) && n > 0 && (n & (n - 1)) === 0;
}

/** Where rules come from, once read: the document, and the file (for `reload`). */
interface RulesSource {
  doc: unknown;
  file: string | null;
}

/** Reads a rules argument: an object, a string of JSON (starts with "{"), or a file path. */
async function readRules(raw: string | Record<string, unknown>): Promise<RulesSource> {
  if (typeof raw === 'object') return { doc: raw, file: null };
  const text = raw.trim();
  if (text.startsWith('{')) {
    try {
      return { doc: JSON.parse(text), file: null };
    } catch (err) {
      throw new FilterCommandError(`rules: not valid JSON: ${(err as Error).message}`);
    }
  }
  return { doc: await readRulesFile(resolve(text)), file: resolve(text) };
}

async function readRulesFile(file: string): Promise<unknown> {
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (err) {
    throw new FilterCommandError(`rules file ${file}: ${(err as Error).message}`);
  }
  try {
    return extname(file).toLowerCase() === '.json' ? JSON.parse(text) : parseYaml(text);
  } catch (err) {
    throw new FilterCommandError(`rules file ${file}: ${(err as Error).message}`);
  }
}

const EMPTY_DOC = { default: 'allow' as const, rules: [] };

export class AccessFilter implements Filter {
  /** The installed rules: replaced whole, in one assignment. */
  private rs: RuleSet;
  private rulesFile: string | null;
  private loadedAt = new Date().toISOString();
  private generation = 1;
  // Totals since creation.
  private denied = 0;
  private audited = 0;
  private wormDenied = 0;
  private zeroChecks = 0;
  private auditFailures = 0;
  private readonly deniedByOp = new Float64Array(OP_NAMES.length);
  /** The write-burst guard, while the rules configure one (kept across rule swaps). */
  private burst: BurstGuard | null = null;
  private burstSnapshots = 0;

  private constructor(
    private readonly env: FilterEnv,
    private readonly map: WormMap,
    private readonly store: WormStore | null,
    private readonly recovery: WormRecovery,
    private readonly audit: AuditLog | null,
    source: RulesSource,
  ) {
    this.rulesFile = source.file;
    this.rs = new RuleSet(
      parseRulesDocument(source.doc ?? EMPTY_DOC, env.below.size, map.blockSize),
      map.sealed > 0,
    );
    this.setBurstGuard(this.rs.doc.burstGuard);
  }

  private setBurstGuard(cfg: BurstConfig | undefined): void {
    if (cfg === undefined) this.burst = null;
    else if (this.burst !== null) this.burst.configure(cfg);
    else this.burst = new BurstGuard(cfg, this.env.below.size);
  }

  /** The prepare step: reads the rules, opens the WORM state and the audit log. */
  static async open(args: AccessArgs, env: FilterEnv): Promise<AccessFilter> {
    const size = env.below.size;
    let blockSize = DEFAULT_WORM_BLOCK_SIZE;
    if (args.wormBlockSize !== undefined) {
      blockSize =
        typeof args.wormBlockSize === 'number' ? args.wormBlockSize : parseSize(args.wormBlockSize);
      if (
        !isPowerOfTwo(blockSize) ||
        blockSize < MIN_WORM_BLOCK_SIZE ||
        blockSize > MAX_WORM_BLOCK_SIZE
      )
        throw new Error(
          `wormBlockSize must be a power of two from ${MIN_WORM_BLOCK_SIZE} to ${MAX_WORM_BLOCK_SIZE} bytes, got ${blockSize}`,
        );
    }
    const source: RulesSource =
      args.rules === undefined ? { doc: EMPTY_DOC, file: null } : await readRules(args.rules);
    let map: WormMap;
    let store: WormStore | null = null;
    let recovery: WormRecovery = {
      state: 'memory',
      replayedRecords: 0,
      ignoredBytes: 0,
      notes: [],
    };
    if (args.dir !== undefined) {
      const opened = await WormStore.open({
        dir: args.dir,
        exportName: env.exportName,
        filterName: env.filterName,
        blockSize,
        size,
        logger: env.logger,
      });
      ({ store, map, recovery } = opened);
    } else map = new WormMap(size, blockSize);
    let audit: AuditLog | null = null;
    try {
      // Validate before opening the log: a bad document leaves no trace anywhere.
      parseRulesDocument(source.doc, size, map.blockSize);
      if (args.auditLog !== undefined)
        audit = await AuditLog.open(args.auditLog, {
          exportName: env.exportName,
          filterName: env.filterName,
          maxQueue: args.auditQueue ?? DEFAULT_AUDIT_QUEUE,
          logger: env.logger,
        });
      const filter = new AccessFilter(env, map, store, recovery, audit, source);
      if (recovery.state === 'recovered')
        env.emit('access.worm-recovered', {
          dir: store?.dir,
          replayedRecords: recovery.replayedRecords,
          notes: recovery.notes,
        });
      return filter;
    } catch (err) {
      await audit?.close().catch(() => undefined);
      await store?.close().catch(() => undefined);
      throw err;
    }
  }

  // ---- hooks ---------------------------------------------------------------------------------

  read(next: Device, buf: Buffer, offset: number, flags: number, ctx?: IoContext): Promise<void> {
    const rs = this.rs;
    if ((rs.slowMask & READ) === 0) return next.read(buf, offset, flags, ctx);
    return this.slow(rs, Op.READ, offset, buf.length, ctx, null, () =>
      next.read(buf, offset, flags, ctx),
    );
  }

  write(next: Device, data: Buffer, offset: number, flags: number, ctx?: IoContext): Promise<void> {
    const rs = this.rs;
    if ((rs.slowMask & WRITE) === 0) return next.write(data, offset, flags, ctx);
    return this.slow(
      rs,
      Op.WRITE,
      offset,
      data.length,
      ctx,
      next,
      () => next.write(data, offset, flags, ctx),
      data,
    );
  }

  flush(next: Device, flags: number, ctx?: IoContext): Promise<void> {
    const rs = this.rs;
    if ((rs.slowMask & FLUSH) === 0) return next.flush(flags, ctx);
    return this.slow(rs, Op.FLUSH, 0, 0, ctx, null, () => next.flush(flags, ctx));
  }

  trim(
    next: Device,
    offset: number,
    length: number,
    flags: number,
    ctx?: IoContext,
  ): Promise<void> {
    const rs = this.rs;
    if ((rs.slowMask & TRIM) === 0) return next.trim(offset, length, flags, ctx);
    return this.slow(rs, Op.TRIM, offset, length, ctx, next, () =>
      next.trim(offset, length, flags, ctx),
    );
  }

  writeZeroes(
    next: Device,
    offset: number,
    length: number,
    flags: number,
    ctx?: IoContext,
  ): Promise<void> {
    const rs = this.rs;
    if ((rs.slowMask & ZERO) === 0) return next.writeZeroes(offset, length, flags, ctx);
    return this.slow(rs, Op.ZERO, offset, length, ctx, next, () =>
      next.writeZeroes(offset, length, flags, ctx),
    );
  }

  cache(
    next: Device,
    offset: number,
    length: number,
    flags: number,
    ctx?: IoContext,
  ): Promise<void> {
    const rs = this.rs;
    if ((rs.slowMask & CACHE) === 0) return next.cache(offset, length, flags, ctx);
    return this.slow(rs, Op.CACHE, offset, length, ctx, null, () =>
      next.cache(offset, length, flags, ctx),
    );
  }

  blockStatus(
    next: Device,
    offset: number,
    length: number,
    flags: number,
    ctx?: IoContext,
  ): Promise<Extent[]> {
    const rs = this.rs;
    if ((rs.slowMask & BLOCK_STATUS) === 0) return next.blockStatus(offset, length, flags, ctx);
    return this.slow(rs, Op.BLOCK_STATUS, offset, length, ctx, null, () =>
      next.blockStatus(offset, length, flags, ctx),
    );
  }

  /**
   * A request some rule or the WORM state may concern: the rules decide; a denial is recorded
   * and fails with EPERM; then a write, trim or zero is checked against the WORM state; an
   * audited request is recorded; then it goes down. `next` is given for write-like requests.
   */
  private async slow<T>(
    rs: RuleSet,
    op: number,
    offset: number,
    length: number,
    ctx: IoContext | undefined,
    next: Device | null,
    pass: () => Promise<T>,
    data: Buffer | null = null,
  ): Promise<T> {
    const i = rs.decide(opBit(op), op === Op.FLUSH, offset, length, ctx);
    const rule = i < 0 ? null : rs.rules[i]!;
    const action = rule === null ? rs.defaultAction : rule.action;
    const label = rule === null ? 'default' : `rules[${i}]`;
    const name = rule?.spec.name;
    if (action === DENY) {
      await this.deny(op, offset, length, ctx, label, name, 'denied by rule');
    }
    const guard = this.burst;
    if (guard !== null && next !== null) {
      const stopped = 'stopped by the write-burst guard (burst-reset lifts it)';
      if (guard.isBlocked(ctx))
        await this.deny(op, offset, length, ctx, 'burst-guard', undefined, stopped);
      if (data !== null) {
        const trip = await guard.observe(next, data, offset, ctx);
        if (trip !== null) this.burstTripped(trip, op, offset, length, ctx);
        // Again after the wait: a concurrent write of the same client may have tripped it.
        if (guard.isBlocked(ctx))
          await this.deny(op, offset, length, ctx, 'burst-guard', undefined, stopped);
      }
    }
    if (next !== null && (rs.worm.length > 0 || this.map.sealed > 0)) {
      const why = await this.wormCheck(rs, op, offset, length, next, ctx);
      if (why !== null) await this.deny(op, offset, length, ctx, 'worm', undefined, why);
    }
    if (action === AUDIT) {
      this.audited++;
      try {
        await this.record(op, offset, length, ctx, label, name, 'audit', 'allowed');
      } catch (err) {
        // Never let an audited request through unrecorded.
        this.auditFailures++;
        throw new DeviceError(
          'EIO',
          `access: the audit log could not record the request: ${(err as Error).message}`,
          { cause: err },
        );
      }
    }
    return pass();
  }

  /**
   * The guard tripped: an event, an audit line and, if configured, a snapshot asked of the
   * export's snapshot filter — not awaited: it freezes writes, and this write is one of them.
   */
  private burstTripped(
    trip: Trip,
    op: number,
    offset: number,
    length: number,
    ctx: IoContext | undefined,
  ): void {
    const cfg = this.burst!.config;
    this.env.emit('access.burst', { ...trip, action: cfg.action });
    this.env.logger.warn({ trip }, 'write-burst guard tripped');
    // The snapshot first (its instant as early as can be), then the audit line.
    if (cfg.snapshot) this.burstSnapshot();
    this.record(
      op,
      offset,
      length,
      ctx,
      'burst-guard',
      undefined,
      'burst',
      'detected',
      `${trip.bytes} bytes of high-entropy overwrites in ${trip.windowSeconds} s (entropy ${trip.entropy.toFixed(2)} bits/byte)`,
    ).catch(() => this.auditFailures++);
  }

  /** Asks the export's snapshot filter for a snapshot; never awaited (see burstTripped). */
  private burstSnapshot(): void {
    // Unique even when two clients trip in the same millisecond.
    const name = `burst-${new Date().toISOString().replace(/[:.]/g, '-')}-${++this.burstSnapshots}`;
    const take = this.env.controlFilter?.('snapshot', 'take', { name });
    if (take === undefined) {
      this.env.emit('access.burst-snapshot', { error: 'no snapshot filter on this export' });
      return;
    }
    take.then(
      () => this.env.emit('access.burst-snapshot', { name }),
      (err: unknown) => {
        this.env.logger.error({ err: (err as Error).message }, 'burst snapshot failed');
        this.env.emit('access.burst-snapshot', { name, error: (err as Error).message });
      },
    );
  }

  /** Records a denial (best effort: the client gets EPERM whatever the log does) and throws. */
  private async deny(
    op: number,
    offset: number,
    length: number,
    ctx: IoContext | undefined,
    label: string,
    name: string | undefined,
    reason: string,
  ): Promise<never> {
    this.denied++;
    this.deniedByOp[op]!++;
    if (label === 'worm') this.wormDenied++;
    try {
      await this.record(op, offset, length, ctx, label, name, 'deny', 'denied', reason);
    } catch {
      this.auditFailures++;
    }
    throw new DeviceError(
      'EPERM',
      `access: ${OP_NAMES[op]} of [${offset}, +${length}) ${reason} (${label}${name !== undefined ? ` "${name}"` : ''})`,
    );
  }

  private record(
    op: number,
    offset: number,
    length: number,
    ctx: IoContext | undefined,
    rule: string,
    ruleName: string | undefined,
    action: string,
    result: string,
    reason?: string,
  ): Promise<void> {
    const c = ctx?.client;
    const client: Record<string, unknown> = { transport: c?.transport ?? 'internal' };
    if (c?.address !== undefined) client.address = c.address;
    if (c?.port !== undefined) client.port = c.port;
    if (c?.uid !== undefined) client.uid = c.uid;
    if (c?.gid !== undefined) client.gid = c.gid;
    if (c?.tls === true) client.tls = true;
    if (c?.tlsSubject !== undefined) client.tlsSubject = c.tlsSubject;
    if (c?.pskIdentity !== undefined) client.pskIdentity = c.pskIdentity;
    const fields: Record<string, unknown> = {
      type: 'event',
      time: new Date().toISOString(),
      export: ctx?.exportName ?? this.env.exportName,
      filter: this.env.filterName,
      client,
      op: OP_NAMES[op],
      offset,
      length,
      rule,
      ...(ruleName !== undefined ? { ruleName } : {}),
      action,
      result,
      ...(result === 'denied' ? { errno: 'EPERM' } : {}),
      ...(reason !== undefined ? { reason } : {}),
    };
    if (this.audit === null) {
      this.env.logger.info({ access: fields }, 'access event (no auditLog configured)');
      return Promise.resolve();
    }
    return this.audit.append(fields);
  }

  /**
   * The WORM check of a write, trim or zero: null if it may go down, else why not. A write to
   * blocks never sealed claims them at once (so a concurrent write to the same block is
   * refused), checks that they still read as zeros — data there was written before the filter
   * knew it — and makes the seal durable before the write goes down.
   */
  private async wormCheck(
    rs: RuleSet,
    op: number,
    offset: number,
    length: number,
    next: Device,
    ctx: IoContext | undefined,
  ): Promise<string | null> {
    const map = this.map;
    const bs = map.blockSize;
    if (length === 0) return null;
    const first = Math.floor(offset / bs);
    const end = Math.ceil((offset + length) / bs);
    if (op !== Op.WRITE) {
      if (rs.touchesWorm(offset, length)) return 'touches a write-once range';
      return map.anySealed(first, end) ? 'touches a written write-once block' : null;
    }
    if (map.anySealed(first, end)) return 'would overwrite a written write-once block';
    if (!rs.touchesWorm(offset, length)) return null;
    // Claim the blocks of the write that lie in WORM ranges (none is sealed).
    const runs: number[] = [];
    for (let b = first; b < end; b++) {
      if (!rs.inWorm(b * bs)) continue;
      map.set(b);
      const n = runs.length;
      if (n > 0 && runs[n - 2]! + runs[n - 1]! === b) runs[n - 1]!++;
      else runs.push(b, 1);
    }
    const durable = this.store === null ? Promise.resolve() : this.store.seal(runs);
    const zero = this.readsAsZero(next, runs, ctx);
    const [, isZero] = await Promise.all([
      durable.catch((err: unknown) => {
        throw new DeviceError(
          'EIO',
          `access: recording the write-once seal failed: ${(err as Error).message}`,
          { cause: err },
        );
      }),
      zero,
    ]);
    return isZero ? null : 'would overwrite data written before the filter knew it';
  }

  /** Whether the blocks of `runs` read as zeros below the filter. */
  private async readsAsZero(next: Device, runs: number[], ctx?: IoContext): Promise<boolean> {
    const bs = this.map.blockSize;
    const size = this.map.size;
    for (let i = 0; i < runs.length; i += 2) {
      const start = runs[i]! * bs;
      const stop = Math.min(size, (runs[i]! + runs[i + 1]!) * bs);
      for (let at = start; at < stop;) {
        const n = Math.min(stop - at, 4 * 1024 * 1024);
        const buf = Buffer.allocUnsafe(n);
        this.zeroChecks++;
        await next.read(buf, at, 0, ctx);
        for (let k = 0; k < n; k++) if (buf[k] !== 0) return false;
        at += n;
      }
    }
    return true;
  }

  // ---- life cycle -----------------------------------------------------------------------------

  async destroy(policy: string): Promise<void> {
    try {
      if (this.store !== null) {
        if (policy === 'drop') await this.store.drop();
        else await this.store.close();
      }
    } finally {
      await this.audit?.close();
    }
  }

  // ---- commands -------------------------------------------------------------------------------

  async control(command: string, args: Record<string, unknown>): Promise<unknown> {
    switch (command) {
      case 'set-rules': {
        const a = setRulesArgs(args);
        const source = await readRules(a.rules);
        this.install(source);
        return this.rulesStatus();
      }
      case 'reload': {
        noArgs(args);
        if (this.rulesFile === null)
          throw new FilterCommandError(
            'reload: the rules were not given as a file (use set-rules rules=FILE)',
          );
        this.install({ doc: await readRulesFile(this.rulesFile), file: this.rulesFile });
        return this.rulesStatus();
      }
      case 'status':
        noArgs(args);
        return this.status();
      case 'worm-status': {
        const a = wormStatusArgs(args);
        return this.wormStatus(a.offset, a.length, a.limit);
      }
      case 'burst-reset': {
        const a = burstResetArgs(args);
        if (this.burst === null)
          throw new FilterCommandError('burst-reset: the rules configure no burstGuard');
        const lifted = this.burst.reset(a.client);
        this.env.emit('access.burst-reset', { clients: lifted });
        return { lifted };
      }
      default:
        throw unknownCommand('access', command, COMMANDS);
    }
  }

  /** Validates and compiles a document whole, then installs it in one assignment. */
  private install(source: RulesSource): void {
    const doc = parseRulesDocument(source.doc, this.env.below.size, this.map.blockSize);
    const next = new RuleSet(doc, this.map.sealed > 0);
    if (!next.coversWorm(this.rs))
      throw new FilterCommandError(
        `worm: the new rules drop or shrink write-once ranges (${JSON.stringify(this.rs.doc.worm)}); write-once ranges can only grow while the filter is attached`,
      );
    this.rs = next;
    this.setBurstGuard(doc.burstGuard);
    this.rulesFile = source.file;
    this.loadedAt = new Date().toISOString();
    this.generation++;
    this.env.emit('access.rules', {
      generation: this.generation,
      file: this.rulesFile,
      rules: doc.rules.length,
      worm: doc.worm,
    });
  }

  private rulesStatus(): Record<string, unknown> {
    const rs = this.rs;
    return {
      generation: this.generation,
      source: this.rulesFile === null ? 'inline' : 'file',
      file: this.rulesFile,
      loadedAt: this.loadedAt,
      default: actionName(rs.defaultAction),
      defaultHits: rs.defaultHits,
      rules: rs.rules.map((r) => r.describe()),
      worm: rs.doc.worm,
      free: rs.slowMask === 0,
    };
  }

  private persistence(): Record<string, unknown> {
    const s = this.store?.stats();
    if (s === undefined)
      return {
        mode: 'memory',
        note: 'no dir: the written-block map is lost when the filter goes (blocks holding data are still refused after a restart)',
      };
    return { mode: 'journal', ...this.recovery, ...s };
  }

  status(): unknown {
    const map = this.map;
    return {
      rules: this.rulesStatus(),
      counters: {
        denied: this.denied,
        deniedByOp: Object.fromEntries(
          OP_NAMES.map((n, i) => [n, this.deniedByOp[i]!]).filter(([, v]) => v !== 0),
        ),
        audited: this.audited,
        wormDenied: this.wormDenied,
        zeroCheckReads: this.zeroChecks,
        auditFailures: this.auditFailures,
      },
      worm: {
        blockSize: map.blockSize,
        ranges: this.rs.doc.worm,
        sealedBlocks: map.sealed,
        sealedBytes: Math.min(map.sealed * map.blockSize, map.size),
        memoryBytes: map.memoryBytes,
        persistence: this.persistence(),
      },
      auditLog: this.audit?.stats() ?? null,
      burstGuard: this.burst?.status() ?? null,
    };
  }

  /** The WORM ranges, sealed blocks, and the sealed extents in [offset, offset + length). */
  wormStatus(offset: number, length: number | undefined, limit: number): unknown {
    const map = this.map;
    const bs = map.blockSize;
    if (offset > map.size)
      throw new FilterCommandError(`offset ${offset} is past the end (${map.size} bytes)`);
    const stop = Math.min(map.size, length === undefined ? map.size : offset + length);
    const extents: Array<{ offset: number; length: number }> = [];
    let nextOffset: number | null = null;
    let b = Math.floor(offset / bs);
    const endBlock = Math.ceil(stop / bs);
    while (b < endBlock && map.sealed > 0) {
      if (!map.has(b)) {
        b++;
        continue;
      }
      if (extents.length >= limit) {
        nextOffset = b * bs;
        break;
      }
      let e = b + 1;
      while (e < endBlock && map.has(e)) e++;
      extents.push({ offset: b * bs, length: Math.min(e * bs, map.size) - b * bs });
      b = e;
    }
    return {
      blockSize: bs,
      ranges: this.rs.doc.worm,
      sealedBlocks: map.sealed,
      sealedBytes: Math.min(map.sealed * bs, map.size),
      extents,
      next: nextOffset,
      persistence: this.persistence(),
    };
  }

  metrics(): MetricFamily[] {
    return [
      {
        name: 'devfilter_access_rule_hits_total',
        help: 'Requests an access rule decided, by rule index ("default" for the default).',
        type: 'counter',
        samples: [
          ...this.rs.rules.map((r) => ({
            labels: { rule: String(r.index), action: r.spec.action, name: r.spec.name ?? '' },
            value: r.hits,
          })),
          {
            labels: { rule: 'default', action: actionName(this.rs.defaultAction), name: '' },
            value: this.rs.defaultHits,
          },
        ],
      },
      {
        name: 'devfilter_access_denied_total',
        help: 'Requests refused with EPERM, by operation.',
        type: 'counter',
        samples: OP_NAMES.map((op, i) => ({ labels: { op }, value: this.deniedByOp[i]! })),
      },
      {
        name: 'devfilter_access_audited_total',
        help: 'Requests allowed and recorded by audit rules.',
        type: 'counter',
        samples: [{ labels: {}, value: this.audited }],
      },
      {
        name: 'devfilter_access_worm_sealed_blocks',
        help: 'Write-once blocks written (sealed).',
        type: 'gauge',
        samples: [{ labels: {}, value: this.map.sealed }],
      },
    ];
  }
}
