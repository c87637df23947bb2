/**
 * The control methods: thin adapters from validated JSON-RPC params to the DeviceManager, with
 * manager errors turned into JSON-RPC errors of stable codes.
 */
import { ManagerError, type DeviceManager } from '../core/manager.js';
import type { Position } from '../core/stack.js';
import { RpcError } from './protocol.js';
import {
  snapshotCreate,
  snapshotDelete,
  snapshotList,
  snapshotStatus,
  snapshotVerify,
} from './snapshot-methods.js';
import type { MethodName } from './schema.js';

/** What the methods need from the daemon besides the manager. */
export type NbdListener =
  { transport: 'unix'; path: string } | { transport: 'tcp'; host: string; port: number };

export interface ControlContext {
  readonly manager: DeviceManager;
  readonly version: string;
  /** When the daemon started (ms since the epoch). */
  readonly startedAt: number;
  /** Open NBD connections. */
  nbdConnections(): number;
  /** The NBD server's TLS mode and how many open connections use TLS. */
  nbdTls?(): { mode: string; connections: number };
  /** Where clients reach the NBD server (unix socket paths, TCP addresses); for tools. */
  nbdListeners?(): NbdListener[];
  /** Loads filter types from an ES module path or package name; returns the type names. */
  loadModule(spec: string, cwd?: string): Promise<string[]>;
}

/** Per-connection state a method may touch. */
export interface MethodSession {
  subscribe(): void;
  unsubscribe(): void;
  readonly controlConnections: number;
  readonly controlPath: string | undefined;
}

type Params = Record<string, unknown>;
type Method = (
  ctx: ControlContext,
  p: Params,
  session: MethodSession,
) => Promise<unknown> | unknown;

const str = (v: unknown): string | undefined => (typeof v === 'string' ? v : undefined);
const num = (v: unknown): number | undefined => (typeof v === 'number' ? v : undefined);
const obj = (v: unknown): Record<string, unknown> | undefined =>
  typeof v === 'object' && v !== null && !Array.isArray(v)
    ? (v as Record<string, unknown>)
    : undefined;

function changeOptions(p: Params): { policy?: string; timeoutMs?: number } {
  const policy = str(p.policy);
  const timeoutMs = num(p.timeoutMs);
  return {
    ...(policy !== undefined ? { policy } : {}),
    ...(timeoutMs !== undefined ? { timeoutMs } : {}),
  };
}

function position(p: Params): Position {
  const given = (['at', 'above', 'below'] as const).filter((k) => p[k] !== undefined);
  if (given.length > 1)
    throw RpcError.of(
      'invalid-params',
      `filter.create: give only one of at, above, below (got ${given.join(', ')})`,
    );
  if (p.above !== undefined) return { above: p.above as string };
  if (p.below !== undefined) return { below: p.below as string };
  return { at: p.at === 'bottom' ? 'bottom' : 'top' };
}

export const methods: Record<MethodName, Method> = {
  'filter.create': (ctx, p) =>
    ctx.manager.createFilter(p.export as string, p.type as string, {
      position: position(p),
      ...(p.name !== undefined ? { name: p.name as string } : {}),
      ...(p.args !== undefined ? { args: obj(p.args)! } : {}),
      ...(p.timeoutMs !== undefined ? { timeoutMs: p.timeoutMs as number } : {}),
    }),

  'filter.remove': async (ctx, p) => {
    await ctx.manager.removeFilter(p.export as string, p.name as string, changeOptions(p));
    return { export: p.export, name: p.name, removed: true };
  },

  'filter.removeAll': async (ctx, p) => {
    const removed = await ctx.manager.removeAll(str(p.export), changeOptions(p));
    return { export: p.export ?? null, removed };
  },

  'filter.control': (ctx, p) =>
    ctx.manager.control(
      p.export as string,
      p.name as string,
      p.command as string,
      obj(p.args) ?? {},
    ),

  'filter.list': (ctx, p) => ({ filters: ctx.manager.listFilters(str(p.export)) }),

  'filter.status': (ctx, p) => ctx.manager.filterStatus(p.export as string, p.name as string),

  'filter.types': (ctx) => ({
    types: ctx.manager.types.list().sort((a, b) => a.name.localeCompare(b.name)),
  }),

  'filter.loadModule': async (ctx, p) => {
    const spec = p.spec as string;
    try {
      const types = await ctx.loadModule(spec, str(p.cwd));
      return { module: spec, types };
    } catch (err) {
      const message = (err as Error).message;
      throw RpcError.of(/already registered/.test(message) ? 'exists' : 'invalid', message);
    }
  },

  'export.list': (ctx) => ({
    exports: ctx.manager.exports().map((exp) => {
      const info = exp.stack.info();
      return {
        name: exp.name,
        description: exp.description ?? null,
        backend: exp.backendLabel,
        size: info.size,
        readOnly: exp.readOnly || info.caps.readOnly,
        filters: exp.stack.filters().map((e) => e.name),
      };
    }),
  }),

  'export.status': (ctx, p) => ctx.manager.exportStatus(p.export as string),

  'daemon.status': (ctx, _p, session) => {
    const exports = ctx.manager.exports();
    return {
      version: ctx.version,
      pid: process.pid,
      node: process.version,
      startedAt: new Date(ctx.startedAt).toISOString(),
      uptimeSeconds: Math.round((Date.now() - ctx.startedAt) / 1000),
      exports: exports.length,
      filters: exports.reduce((n, e) => n + e.stack.filters().length, 0),
      connections: ctx.nbdConnections(),
      ...(ctx.nbdTls !== undefined ? { tls: ctx.nbdTls() } : {}),
      listeners: ctx.nbdListeners?.() ?? [],
      controlConnections: session.controlConnections,
      controlSocket: session.controlPath ?? null,
      filterTypes: ctx.manager.types
        .list()
        .map((t) => t.name)
        .sort(),
    };
  },

  'events.subscribe': (_ctx, _p, session) => {
    session.subscribe();
    return { subscribed: true };
  },

  'snapshot.create': (ctx, p) => snapshotCreate(ctx.manager, p),
  'snapshot.delete': (ctx, p) => snapshotDelete(ctx.manager, p),
  'snapshot.list': (ctx, p) => snapshotList(ctx.manager, p),
  'snapshot.status': (ctx, p) => snapshotStatus(ctx.manager, p),
  'snapshot.verify': (ctx, p) => snapshotVerify(ctx.manager, p),

  'events.unsubscribe': (_ctx, _p, session) => {
    session.unsubscribe();
    return { subscribed: false };
  },
};

/** Turns anything a method threw into a JSON-RPC error; `internal` means a bug. */
export function toRpcError(err: unknown): RpcError {
  if (err instanceof RpcError) return err;
  if (err instanceof ManagerError) return RpcError.of(err.code, err.message);
  return RpcError.of('internal', `internal error: ${(err as Error)?.message ?? String(err)}`);
}
