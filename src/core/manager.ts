/**
 * The daemon's model of exports and their filter stacks, and the four commands of the device
 * filter proposal — create a filter, remove a filter, remove all filters, send a filter a
 * command — plus listing and status. Front ends (the control plane, the config file loader, a
 * library user) call this; it knows no front end and no filter by name.
 */
import { EventEmitter } from 'node:events';
import type { Logger } from 'pino';
import type { Device, DeviceInfo } from './device.js';
import {
  FilterCommandError,
  type Filter,
  type FilterEnv,
  type InstantView,
  type PublishOptions,
} from './filter.js';
import { FilterArgsError, FilterTypeRegistry } from './filter-types.js';
import { LiveStack, StackChangeError, insertAt, type Position, type StackEntry } from './stack.js';

export const DEFAULT_CHANGE_TIMEOUT_MS = 10_000;

export type ManagerErrorCode = 'not-found' | 'invalid' | 'exists' | 'timeout' | 'failed';

export class ManagerError extends Error {
  override name = 'ManagerError';
  constructor(
    readonly code: ManagerErrorCode,
    message: string,
  ) {
    super(message);
  }
}

export interface ManagedExport {
  readonly name: string;
  readonly description?: string;
  readonly readOnly: boolean;
  readonly stack: LiveStack;
  /**
   * How the backend was described (e.g. "file:/var/lib/disk.img"), for status output; changes
   * when replaceBackend() swaps the backend (a migration's cutover).
   */
  backendLabel: string;
}

export interface FilterEvent {
  time: string;
  export: string;
  filter?: string;
  event: string;
  data?: Record<string, unknown>;
}

export interface CreateFilterOptions {
  name?: string;
  args?: Record<string, unknown>;
  position?: Position;
  timeoutMs?: number;
}

export interface FilterSummary {
  export: string;
  name: string;
  type: string;
  args: Record<string, unknown>;
  /** 0 is the top of the stack. */
  index: number;
}

/** An export a filter published (a snapshot image); the front end serves it like any other. */
export interface PublishedExport {
  readonly name: string;
  readonly device: Device;
  readonly readOnly: boolean;
  readonly description?: string;
  /** The export and filter that published it. */
  readonly owner: { readonly export: string; readonly filter: string };
}

/** Emitted as 'export' when a filter publishes or withdraws an export. */
export interface ExportChange {
  action: 'added' | 'removed';
  export: PublishedExport;
}

/** Names of exports: what NBD clients type; '@' joins an export and a snapshot name. */
const EXPORT_NAME = /^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$/;

export class DeviceManager extends EventEmitter<{ event: [FilterEvent]; export: [ExportChange] }> {
  private readonly byName = new Map<string, ManagedExport>();
  /** Exports published by filters, with the filter instance (once created) that owns each. */
  private readonly published = new Map<
    string,
    { exp: PublishedExport; owner: { filter?: Filter } }
  >();

  constructor(
    readonly types: FilterTypeRegistry,
    private readonly logger: Logger,
  ) {
    super();
  }

  addExport(
    name: string,
    backend: Device,
    opts: { description?: string; readOnly?: boolean; backendLabel?: string } = {},
  ): ManagedExport {
    if (this.byName.has(name) || this.published.has(name))
      throw new ManagerError('exists', `export "${name}" already exists`);
    const exp: ManagedExport = {
      name,
      readOnly: opts.readOnly === true,
      stack: new LiveStack(backend),
      backendLabel: opts.backendLabel ?? 'device',
      ...(opts.description !== undefined ? { description: opts.description } : {}),
    };
    this.byName.set(name, exp);
    return exp;
  }

  exports(): ManagedExport[] {
    return [...this.byName.values()];
  }

  /** Exports published by filters (snapshot images), served read-only beside the managed ones. */
  publishedExports(): PublishedExport[] {
    return [...this.published.values()].map((p) => p.exp);
  }

  lookupPublished(name: string): PublishedExport | undefined {
    return this.published.get(name)?.exp;
  }

  getExport(name: string): ManagedExport {
    const exp = this.byName.get(name);
    if (!exp) throw new ManagerError('not-found', `no export named "${name}"`);
    return exp;
  }

  async createFilter(
    exportName: string,
    typeName: string,
    opts: CreateFilterOptions = {},
  ): Promise<FilterSummary> {
    const exp = this.getExport(exportName);
    let args: Record<string, unknown>;
    try {
      args = this.types.validateArgs(typeName, opts.args ?? {});
    } catch (err) {
      if (err instanceof FilterArgsError) throw new ManagerError('invalid', err.message);
      throw err;
    }
    const type = this.types.get(typeName);
    const name = opts.name ?? this.freeName(exp, typeName);
    if (!/^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/.test(name)) {
      throw new ManagerError(
        'invalid',
        `invalid filter name "${name}": 1-64 letters, digits, '.', '_' or '-'`,
      );
    }
    if (exp.stack.filters().some((e) => e.name === name)) {
      throw new ManagerError(
        'exists',
        `a filter named "${name}" is already on export "${exportName}"`,
      );
    }
    // Prepare: the heavy part, before anything about the export changes.
    const owner: { filter?: Filter } = {};
    const env = this.env(exp, name, owner);
    let filter: Filter;
    try {
      filter = await type.create(args, env);
    } catch (err) {
      this.unpublishAll(owner);
      throw new ManagerError('failed', `${typeName}: setup failed: ${(err as Error).message}`);
    }
    owner.filter = filter;
    const entry: StackEntry = { name, type, args, filter };
    try {
      await exp.stack.change(
        (cur) => insertAt(cur, entry, opts.position ?? { at: 'top' }),
        opts.timeoutMs ?? DEFAULT_CHANGE_TIMEOUT_MS,
      );
    } catch (err) {
      await this.destroy(exp, entry, type.removalPolicies?.[0] ?? 'default');
      throw this.fromStackError(err);
    }
    this.publish({
      export: exportName,
      filter: name,
      event: 'filter.created',
      data: { type: typeName },
    });
    return this.summary(exp, entry);
  }

  async removeFilter(
    exportName: string,
    name: string,
    opts: { policy?: string; timeoutMs?: number } = {},
  ): Promise<void> {
    const exp = this.getExport(exportName);
    const entry = exp.stack.filters().find((e) => e.name === name);
    if (!entry)
      throw new ManagerError('not-found', `no filter named "${name}" on export "${exportName}"`);
    const policy = this.policy(entry, opts.policy);
    try {
      await exp.stack.change((cur) => {
        if (!cur.includes(entry))
          throw new StackChangeError(
            `no filter named "${name}" on export "${exportName}"`,
            'not-found',
          );
        return cur.filter((e) => e !== entry);
      }, opts.timeoutMs ?? DEFAULT_CHANGE_TIMEOUT_MS);
    } catch (err) {
      throw this.fromStackError(err);
    }
    await this.destroy(exp, entry, policy);
    this.publish({ export: exportName, filter: name, event: 'filter.removed', data: { policy } });
  }

  /** Removes every filter of one export, or of all exports; returns how many were removed. */
  async removeAll(
    exportName?: string,
    opts: { policy?: string; timeoutMs?: number } = {},
  ): Promise<number> {
    const targets = exportName === undefined ? this.exports() : [this.getExport(exportName)];
    let count = 0;
    for (const exp of targets) {
      let removed: StackEntry[];
      try {
        removed = await exp.stack.change(() => [], opts.timeoutMs ?? DEFAULT_CHANGE_TIMEOUT_MS);
      } catch (err) {
        throw this.fromStackError(err);
      }
      for (const entry of removed) {
        const policy =
          opts.policy !== undefined && (entry.type.removalPolicies ?? []).includes(opts.policy)
            ? opts.policy
            : this.policy(entry, undefined);
        await this.destroy(exp, entry, policy);
        this.publish({
          export: exp.name,
          filter: entry.name,
          event: 'filter.removed',
          data: { policy },
        });
      }
      count += removed.length;
    }
    return count;
  }

  async control(
    exportName: string,
    name: string,
    command: string,
    args: Record<string, unknown> = {},
  ): Promise<unknown> {
    const entry = this.entry(exportName, name);
    if (!entry.filter.control) {
      throw new ManagerError('invalid', `filter "${name}" (${entry.type.name}) takes no commands`);
    }
    try {
      const result = await entry.filter.control(command, args);
      this.publish({
        export: exportName,
        filter: name,
        event: 'filter.control',
        data: { command },
      });
      return result ?? null;
    } catch (err) {
      if (err instanceof FilterCommandError)
        throw new ManagerError('invalid', `${name}: ${err.message}`);
      throw new ManagerError('failed', `${name}: ${(err as Error).message}`);
    }
  }

  /**
   * Makes `device` the backend of an export in place of the current one, with clients connected
   * and every filter staying in place (a migration's cutover): held, drained and swapped like a
   * filter change (see LiveStack.replaceBackend), then the old backend is closed. The device
   * must have the export's size and be writable if the export is; `commit` runs inside the
   * swap with nothing in flight (throw to refuse). On refusal or timeout nothing changes and
   * the caller still owns `device`.
   */
  async replaceBackend(
    exportName: string,
    device: Device,
    label: string,
    opts: { timeoutMs?: number; commit?: () => void | Promise<void> } = {},
  ): Promise<void> {
    const exp = this.getExport(exportName);
    const before = exp.stack.below.info();
    const after = device.info();
    if (after.size !== before.size)
      throw new ManagerError(
        'invalid',
        `the new backend has ${after.size} bytes, export "${exportName}" has ${before.size}`,
      );
    if (after.caps.readOnly && !before.caps.readOnly && !exp.readOnly)
      throw new ManagerError(
        'invalid',
        `the new backend is read-only, export "${exportName}" is not`,
      );
    const lost = (Object.keys(before.caps) as (keyof DeviceInfo['caps'])[]).filter(
      (k) => k !== 'readOnly' && k !== 'rotational' && before.caps[k] && !after.caps[k],
    );
    let old: Device;
    try {
      old = await exp.stack.replaceBackend(
        device,
        opts.timeoutMs ?? DEFAULT_CHANGE_TIMEOUT_MS,
        opts.commit,
      );
    } catch (err) {
      throw this.fromStackError(err);
    }
    const oldLabel = exp.backendLabel;
    exp.backendLabel = label;
    this.publish({
      export: exportName,
      event: 'export.backend-replaced',
      data: { from: oldLabel, to: label, pauseMs: exp.stack.stats().lastPauseMs, lostCaps: lost },
    });
    try {
      await old.close();
    } catch (err) {
      this.logger.error({ err, export: exportName }, 'closing the old backend failed');
    }
  }

  listFilters(exportName?: string): FilterSummary[] {
    const targets = exportName === undefined ? this.exports() : [this.getExport(exportName)];
    return targets.flatMap((exp) => exp.stack.filters().map((e) => this.summary(exp, e)));
  }

  filterStatus(exportName: string, name: string): FilterSummary & { status: unknown } {
    const exp = this.getExport(exportName);
    const entry = this.entry(exportName, name);
    return { ...this.summary(exp, entry), status: entry.filter.status?.() ?? null };
  }

  exportStatus(name: string): Record<string, unknown> {
    const exp = this.getExport(name);
    const info = exp.stack.info();
    return {
      name: exp.name,
      description: exp.description ?? null,
      backend: exp.backendLabel,
      size: info.size,
      readOnly: exp.readOnly || info.caps.readOnly,
      blockSize: info.blockSize,
      caps: info.caps,
      stack: exp.stack.stats(),
      filters: exp.stack
        .filters()
        .map((e) => ({ ...this.summary(exp, e), status: e.filter.status?.() ?? null })),
    };
  }

  /** Removes every filter (default policies) and closes every backend. */
  async close(): Promise<void> {
    for (const exp of this.exports()) {
      try {
        await this.removeAll(exp.name);
      } catch (err) {
        this.logger.error({ err, export: exp.name }, 'removing filters at shutdown failed');
      }
      await exp.stack.close();
    }
  }

  private entry(exportName: string, name: string): StackEntry {
    const exp = this.getExport(exportName);
    const entry = exp.stack.filters().find((e) => e.name === name);
    if (!entry)
      throw new ManagerError('not-found', `no filter named "${name}" on export "${exportName}"`);
    return entry;
  }

  private summary(exp: ManagedExport, e: StackEntry): FilterSummary {
    return {
      export: exp.name,
      name: e.name,
      type: e.type.name,
      args: e.args,
      index: exp.stack.filters().indexOf(e),
    };
  }

  private freeName(exp: ManagedExport, typeName: string): string {
    const taken = new Set(exp.stack.filters().map((e) => e.name));
    if (!taken.has(typeName)) return typeName;
    for (let i = 2; ; i++) if (!taken.has(`${typeName}-${i}`)) return `${typeName}-${i}`;
  }

  private policy(entry: StackEntry, asked: string | undefined): string {
    const policies = entry.type.removalPolicies ?? [];
    if (asked === undefined) return policies[0] ?? 'default';
    if (!policies.includes(asked)) {
      throw new ManagerError(
        'invalid',
        `${entry.type.name} has no removal policy "${asked}"` +
          (policies.length ? ` (one of: ${policies.join(', ')})` : ''),
      );
    }
    return asked;
  }

  private async destroy(exp: ManagedExport, entry: StackEntry, policy: string): Promise<void> {
    try {
      await entry.filter.destroy?.(policy);
    } catch (err) {
      this.logger.error({ err, export: exp.name, filter: entry.name }, 'filter teardown failed');
      this.publish({
        export: exp.name,
        filter: entry.name,
        event: 'filter.teardown-failed',
        data: { error: (err as Error).message },
      });
    }
    // Whatever the filter published goes with it, even if it forgot (or failed) to withdraw it.
    const owner = [...this.published.values()].find((p) => p.owner.filter === entry.filter)?.owner;
    if (owner !== undefined) this.unpublishAll(owner);
  }

  private env(exp: ManagedExport, filterName: string, owner: { filter?: Filter }): FilterEnv {
    const logger = this.logger.child({ export: exp.name, filter: filterName });
    const below: DeviceInfo = exp.stack.below.info();
    return {
      exportName: exp.name,
      filterName,
      logger,
      below,
      get backendLabel() {
        return exp.backendLabel;
      },
      deviceBelow: exp.stack.belowDevice(() => owner.filter),
      emit: (event, data) =>
        this.publish({ export: exp.name, filter: filterName, event, ...(data ? { data } : {}) }),
      publishExport: (name, device, opts) =>
        this.publishExport(exp, filterName, owner, name, device, opts ?? {}),
      unpublishExport: (name) => this.unpublishExport(owner, name),
      replaceBackend: (device, label, opts) =>
        this.replaceBackend(exp.name, device, label, opts ?? {}),
      controlFilter: (type, command, args) => {
        const other = exp.stack
          .filters()
          .find((e) => e.type.name === type && e.filter !== owner.filter);
        return other === undefined ? undefined : this.control(exp.name, other.name, command, args);
      },
      captureInstant: () => {
        const views: InstantView[] = [];
        for (const e of exp.stack.filters()) {
          if (e.filter === owner.filter || e.filter.instantView === undefined) continue;
          const v = e.filter.instantView();
          if (v !== undefined) views.push(v);
        }
        return views;
      },
    };
  }

  private publishExport(
    exp: ManagedExport,
    filterName: string,
    owner: { filter?: Filter },
    name: string,
    device: Device,
    opts: PublishOptions,
  ): void {
    if (!EXPORT_NAME.test(name)) {
      throw new ManagerError(
        'invalid',
        `invalid export name "${name}": 1-128 letters, digits, '.', '_', '@' or '-'`,
      );
    }
    if (this.byName.has(name) || this.published.has(name))
      throw new ManagerError('exists', `export "${name}" already exists`);
    const published: PublishedExport = {
      name,
      device,
      readOnly: opts.readOnly !== false,
      owner: { export: exp.name, filter: filterName },
      ...(opts.description !== undefined ? { description: opts.description } : {}),
    };
    this.published.set(name, { exp: published, owner });
    this.emit('export', { action: 'added', export: published });
    this.publish({
      export: exp.name,
      filter: filterName,
      event: 'export.added',
      data: { name, readOnly: published.readOnly },
    });
  }

  private unpublishExport(owner: { filter?: Filter }, name: string): void {
    const p = this.published.get(name);
    if (p === undefined || p.owner !== owner) return; // not ours: nothing to withdraw
    this.published.delete(name);
    this.emit('export', { action: 'removed', export: p.exp });
    this.publish({
      export: p.exp.owner.export,
      filter: p.exp.owner.filter,
      event: 'export.removed',
      data: { name },
    });
  }

  private unpublishAll(owner: { filter?: Filter }): void {
    for (const [name, p] of [...this.published])
      if (p.owner === owner) this.unpublishExport(owner, name);
  }

  private publish(e: Omit<FilterEvent, 'time'>): void {
    const event: FilterEvent = { time: new Date().toISOString(), ...e };
    this.logger.info(
      { event: event.event, export: event.export, filter: event.filter, data: event.data },
      'event',
    );
    this.emit('event', event);
  }

  private fromStackError(err: unknown): Error {
    if (err instanceof StackChangeError) {
      const code: ManagerErrorCode =
        err.reason === 'timeout'
          ? 'timeout'
          : err.reason === 'exists'
            ? 'exists'
            : err.reason === 'not-found'
              ? 'not-found'
              : err.reason === 'invalid'
                ? 'invalid'
                : 'failed';
      return new ManagerError(code, err.message);
    }
    return err as Error;
  }
}
