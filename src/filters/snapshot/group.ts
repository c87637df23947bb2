/**
 * Consistency groups: one snapshot of several exports at the same instant — every write
 * acknowledged before the instant is in every image, none issued after it is in any.
 *
 * Each export's snapshot filter holds its writes still (gate.ts); the group holds all of them
 * at once before recording anything, so no export moves on while another is being recorded.
 * Filters are taken in a fixed order (by export name) so that two group takes over the same
 * exports cannot each hold half of them. If any export cannot be held (writes do not drain in
 * time) or recorded, the snapshots already recorded are deleted and nothing remains.
 */
import type { DeviceManager } from '../../core/manager.js';
import { FilterCommandError } from '../../core/filter.js';
import { DEFAULT_FREEZE_TIMEOUT_MS, SnapshotFilter, type SnapshotInfo } from './snapshot.js';

/** The snapshot filter on an export: exactly one, or a FilterCommandError saying why not. */
export function snapshotFilterOf(manager: DeviceManager, exportName: string): SnapshotFilter {
  const found = manager
    .getExport(exportName)
    .stack.filters()
    .map((e) => e.filter)
    .filter((f): f is SnapshotFilter => f instanceof SnapshotFilter);
  if (found.length !== 1) {
    throw new FilterCommandError(
      found.length === 0
        ? `export "${exportName}" has no snapshot filter`
        : `export "${exportName}" has ${found.length} snapshot filters; name one`,
    );
  }
  return found[0]!;
}

/** Takes snapshot `name` of every filter's export at one instant. */
export async function takeGroup(
  filters: readonly SnapshotFilter[],
  name: string,
  timeoutMs = DEFAULT_FREEZE_TIMEOUT_MS,
): Promise<SnapshotInfo[]> {
  const members = [...new Set(filters)].sort((a, b) =>
    a.exportName < b.exportName ? -1 : a.exportName > b.exportName ? 1 : 0,
  );
  if (members.length === 0)
    throw new FilterCommandError('a group snapshot needs at least one export');
  for (const f of members) await f.flushOrigin();
  // Nested exclusive sections, in export-name order: held together, released together.
  const within = (i: number): Promise<SnapshotInfo[]> =>
    i === members.length
      ? recordAll(members, name, timeoutMs)
      : members[i]!.exclusive(() => within(i + 1));
  return within(0);
}

/** Takes `name` on the exports of `exportNames` (their snapshot filters) at one instant. */
export async function takeGroupOnExports(
  manager: DeviceManager,
  exportNames: readonly string[],
  name: string,
  timeoutMs?: number,
): Promise<SnapshotInfo[]> {
  return takeGroup(
    exportNames.map((e) => snapshotFilterOf(manager, e)),
    name,
    timeoutMs,
  );
}

async function recordAll(
  members: readonly SnapshotFilter[],
  name: string,
  timeoutMs: number,
): Promise<SnapshotInfo[]> {
  const thaws: (() => void)[] = [];
  const taken: SnapshotFilter[] = [];
  try {
    // Hold every export still first: the instant is when the last of them has drained.
    const deadline = performance.now() + timeoutMs;
    for (const f of members) thaws.push(await f.freeze(Math.max(1, deadline - performance.now())));
    const infos: SnapshotInfo[] = [];
    for (const f of members) {
      infos.push(await f.takeFrozen(name));
      taken.push(f);
    }
    return infos;
  } catch (err) {
    for (const f of taken) await f.deleteFrozen(name).catch(() => undefined);
    throw err;
  } finally {
    for (const thaw of thaws) thaw();
  }
}
