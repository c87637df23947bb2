/**
 * The filter API, version 1. A filter type is a module (like a device-mapper target type)
 * that creates filter instances from validated arguments; a filter instance sits on one export
 * and sees every request on its way down, with `next` — the device below it — handed in, as
 * in nbdkit's filters. Each hook may pass the request on, change it, complete it itself, fail
 * it, or issue its own I/O to `next`; an unset hook passes the request through unchanged.
 * A filter never sees the layers above it, and knows nothing of NBD.
 *
 * Documented for authors in docs/filter-api.md.
 */
import type { Logger } from 'pino';
import type { Device, DeviceInfo, Extent, IoContext } from './device.js';
import { DeviceError } from './errors.js';

export const FILTER_API_VERSION = 1;

/** A JSON Schema (draft 2020-12 subset understood by ajv) for an object of arguments. */
export interface ArgsSchema {
  type: 'object';
  properties: Record<string, unknown>;
  required?: string[];
  additionalProperties?: boolean;
  [keyword: string]: unknown;
}

/** What a filter instance is given besides its arguments. */
export interface FilterEnv {
  readonly exportName: string;
  readonly filterName: string;
  readonly logger: Logger;
  /** Facts about the device the filter will sit on (as seen from just below it). */
  readonly below: DeviceInfo;
  /** Publishes an event (shown in logs and to control-plane subscribers). */
  emit(event: string, data?: Record<string, unknown>): void;
  /** How the export's backend was described (e.g. "file:/var/lib/disk.img"), if known. */
  readonly backendLabel?: string;
  /**
   * The device below this filter, for I/O the filter issues outside a client request (a
   * snapshot image reading the origin). Requests through it are held and drained by stack
   * changes like client requests; they fail with ESHUTDOWN while the filter is not in the
   * stack (before it goes live, after it leaves). Inside a hook, use `next` instead.
   */
  readonly deviceBelow?: Device;
  /**
   * Makes `device` an export of its own (a snapshot image), named `name`, until
   * unpublishExport(name) or until the filter is removed. Throws if the name is taken.
   */
  publishExport?(name: string, device: Device, opts?: PublishOptions): void;
  unpublishExport?(name: string): void;
  /**
   * Asks every other filter of the export for its `instantView()`, in stack order: a point in
   * time frozen for a filter that makes one (a snapshot, while it holds writes still), so
   * that its image can also answer the others' block-status contexts as of that instant.
   */
  captureInstant?(): InstantView[];
  /**
   * Makes `device` the export's backend in place of the current one (a migration's cutover),
   * with clients connected and every filter staying in place: new requests are held, requests
   * in flight drain (on timeout nothing changes), `device` is flushed, `commit()` runs with
   * nothing in flight (throw to refuse; no request reaches `device` before its promise
   * resolves), the stack is rebound over `device`, and held requests resume. `label` becomes the export's backendLabel. The device must have the export's size;
   * once this resolves the export owns it, and the old backend has been closed.
   */
  replaceBackend?(
    device: Device,
    label: string,
    opts?: { timeoutMs?: number; commit?: () => void | Promise<void> },
  ): Promise<void>;
  /**
   * Runs `command` on the first other filter of type `type` on this export (as `filter
   * control` would): how a filter asks another for something, e.g. the access filter's
   * write-burst guard asking a snapshot filter for a snapshot. Undefined when the export has
   * no such filter. Never await it inside a hook: the other filter may wait for that request.
   */
  controlFilter?(
    type: string,
    command: string,
    args: Record<string, unknown>,
  ): Promise<unknown> | undefined;
}

/**
 * A filter's block-status contexts frozen at an instant (a change map as it was when a
 * snapshot was taken). Immutable: later requests to the export do not change it.
 */
export interface InstantView {
  /** Full context names this view answers. */
  readonly statusContexts: readonly string[];
  /** Status of one of `statusContexts`, with the extent rules of Device.blockStatus. */
  contextStatus(context: string, offset: number, length: number, flags: number): Extent[];
  /** Facts about the view, for status (e.g. the change history id and generation). */
  readonly facts?: Record<string, unknown>;
}

export interface PublishOptions {
  readOnly?: boolean;
  description?: string;
}

/** What becomes of a filter's state when it is removed; each type documents its policies. */
export type RemovalPolicy = string;

export interface FilterType<Args extends object = Record<string, unknown>> {
  readonly name: string;
  readonly apiVersion: typeof FILTER_API_VERSION;
  readonly description: string;
  readonly argsSchema: ArgsSchema;
  /** Removal policies this type understands; the first is the default. */
  readonly removalPolicies?: readonly RemovalPolicy[];
  /**
   * The prepare step: heavy setup (open files, allocate state) happens here, before the filter
   * goes live. Throwing leaves the export untouched.
   */
  create(args: Args, env: FilterEnv): Promise<Filter> | Filter;
}

export interface Filter {
  /** Capabilities and limits the layers above see; defaults to those of the layer below. */
  info?(below: DeviceInfo): DeviceInfo;
  read?(next: Device, buf: Buffer, offset: number, flags: number, ctx?: IoContext): Promise<void>;
  write?(next: Device, data: Buffer, offset: number, flags: number, ctx?: IoContext): Promise<void>;
  flush?(next: Device, flags: number, ctx?: IoContext): Promise<void>;
  trim?(
    next: Device,
    offset: number,
    length: number,
    flags: number,
    ctx?: IoContext,
  ): Promise<void>;
  writeZeroes?(
    next: Device,
    offset: number,
    length: number,
    flags: number,
    ctx?: IoContext,
  ): Promise<void>;
  cache?(
    next: Device,
    offset: number,
    length: number,
    flags: number,
    ctx?: IoContext,
  ): Promise<void>;
  blockStatus?(
    next: Device,
    offset: number,
    length: number,
    flags: number,
    ctx?: IoContext,
  ): Promise<Extent[]>;
  /**
   * Status of an extra block-status context (see DeviceInfo.statusContexts). A filter that
   * answers contexts of its own advertises them in `info()` and passes every other context
   * on with `passContextStatus(next, ...)`. Unset: every context passes through.
   */
  contextStatus?(
    next: Device,
    context: string,
    offset: number,
    length: number,
    flags: number,
    ctx?: IoContext,
  ): Promise<Extent[]>;
  /**
   * Its block-status contexts frozen as of now, for another filter that is freezing an
   * instant (see FilterEnv.captureInstant); called while that filter holds writes still.
   */
  instantView?(): InstantView | undefined;
  /** Structured, JSON-serialisable state for `filter status`. */
  status?(): unknown;
  /** A filter-specific command (`filter control`); throw FilterCommandError for bad input. */
  control?(command: string, args: Record<string, unknown>): Promise<unknown> | unknown;
  /**
   * Called inside the swap once the filter is live: keep it cheap. Called again if a removal
   * that `release()`d the filter was refused, so that it goes back to work.
   */
  activate?(): void;
  /**
   * The filter is about to leave the stack: requests it holds back on purpose (a throttle's
   * queue) must go now, or the drain before the swap would wait for them.
   */
  release?(): void;
  /**
   * Called after the filter has left the stack and no request can reach it any more, with the
   * removal policy asked for (or the type's default).
   */
  destroy?(policy: RemovalPolicy): Promise<void> | void;
}

/**
 * Asks `device` for the status of an extra context; a device without extra contexts (a
 * backend) refuses with EINVAL, as does every layer when no filter answers the context.
 */
export function passContextStatus(
  device: Device,
  context: string,
  offset: number,
  length: number,
  flags: number,
  ctx?: IoContext,
): Promise<Extent[]> {
  if (device.contextStatus === undefined)
    return Promise.reject(
      new DeviceError('EINVAL', `no block-status context ${JSON.stringify(context)} here`),
    );
  return device.contextStatus(context, offset, length, flags, ctx);
}

/** A filter command that was refused: unknown command, bad arguments, wrong state. */
export class FilterCommandError extends Error {
  override name = 'FilterCommandError';
}

/** Checks a value claimed to be a filter type (an external module's export) and explains why not. */
export function checkFilterType(value: unknown, source: string): FilterType {
  const t = value as Partial<FilterType> | null;
  const problem = (what: string): never => {
    throw new Error(`${source}: not a devfilter filter type: ${what}`);
  };
  if (typeof t !== 'object' || t === null) return problem('expected an object');
  if (typeof t.name !== 'string' || !/^[a-z][a-z0-9-]*$/.test(t.name)) {
    return problem('name must be lowercase letters, digits and dashes');
  }
  if (t.apiVersion !== FILTER_API_VERSION) {
    return problem(
      `apiVersion ${String(t.apiVersion)} is not supported (this devfilter speaks ${FILTER_API_VERSION})`,
    );
  }
  if (typeof t.create !== 'function') return problem('create() is missing');
  if (typeof t.argsSchema !== 'object' || t.argsSchema === null || t.argsSchema.type !== 'object') {
    return problem('argsSchema must be a JSON Schema of type "object"');
  }
  if (typeof t.description !== 'string') return problem('description is missing');
  return t as FilterType;
}
