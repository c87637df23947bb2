/**
 * Snapshot commands of the control plane (`devfilter snapshot ...`): what users of the
 * snapshot filter do, in one call each. A snapshot of several exports at once is one
 * consistency group: the same instant on all of them.
 */
import { FilterCommandError } from '../core/filter.js';
import { ManagerError, type DeviceManager } from '../core/manager.js';
import { snapshotFilterOf, takeGroupOnExports } from '../filters/snapshot/index.js';
import { RpcError } from './protocol.js';

type Params = Record<string, unknown>;

const SNAPSHOT_TYPE = 'snapshot';

function hasSnapshotFilter(manager: DeviceManager, exportName: string): boolean {
  return manager.listFilters(exportName).some((f) => f.type === SNAPSHOT_TYPE);
}

/** Filter errors about bad input become `invalid`; the rest keep their manager code. */
function asRpc(err: unknown): never {
  if (err instanceof FilterCommandError) throw RpcError.of('invalid', err.message);
  if (err instanceof ManagerError) throw RpcError.of(err.code, err.message);
  throw err;
}

export async function snapshotCreate(manager: DeviceManager, p: Params): Promise<unknown> {
  const exports = p.exports as string[];
  const name = p.name as string;
  const timeoutMs = p.timeoutMs as number | undefined;
  try {
    for (const e of exports) {
      if (hasSnapshotFilter(manager, e)) continue;
      if (p.store === undefined) {
        throw RpcError.of(
          'invalid',
          `export "${e}" has no snapshot filter yet: give store (--store DIR)`,
        );
      }
      // At the bottom, next to the backend: every write, whichever filter it came through,
      // is seen before it changes the origin.
      await manager.createFilter(e, SNAPSHOT_TYPE, {
        position: { at: 'bottom' },
        args: {
          store: p.store,
          ...(p.limit !== undefined ? { limit: p.limit } : {}),
          ...(p.chunkSize !== undefined ? { chunkSize: p.chunkSize } : {}),
        },
        ...(timeoutMs !== undefined ? { timeoutMs } : {}),
      });
    }
    return { snapshots: await takeGroupOnExports(manager, exports, name, timeoutMs) };
  } catch (err) {
    return asRpc(err);
  }
}

export async function snapshotDelete(manager: DeviceManager, p: Params): Promise<unknown> {
  try {
    return await snapshotFilterOf(manager, p.export as string).control('delete', { name: p.name });
  } catch (err) {
    return asRpc(err);
  }
}

export async function snapshotList(manager: DeviceManager, p: Params): Promise<unknown> {
  const exports =
    p.export !== undefined ? [p.export as string] : manager.exports().map((e) => e.name);
  const snapshots: unknown[] = [];
  try {
    for (const e of exports) {
      if (!hasSnapshotFilter(manager, e)) continue;
      const list = (await snapshotFilterOf(manager, e).control('list', {})) as Record<
        string,
        unknown
      >[];
      for (const s of list) snapshots.push({ export: e, ...s });
    }
  } catch (err) {
    return asRpc(err);
  }
  return { snapshots };
}

export async function snapshotStatus(manager: DeviceManager, p: Params): Promise<unknown> {
  try {
    return await snapshotFilterOf(manager, p.export as string).control('status', {});
  } catch (err) {
    return asRpc(err);
  }
}

/** Reads every copy back against its checksum; damaged copies fail their snapshots. */
export async function snapshotVerify(manager: DeviceManager, p: Params): Promise<unknown> {
  try {
    return await snapshotFilterOf(manager, p.export as string).control('verify', {});
  } catch (err) {
    return asRpc(err);
  }
}
