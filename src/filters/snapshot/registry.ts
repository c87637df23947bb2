/**
 * The snapshots of one origin and their states, and the generation threshold the copy-before-
 * write path compares against.
 *
 * States: `pending` (being recorded by take), `active`, `failing` (failed in memory — its
 * image already answers EIO — while the failure is being made durable; until then writes
 * still treat it as live, because a crash before the failure is on disk would bring it back
 * as active), `failed`, `deleted`.
 */
import { assert } from '../../core/errors.js';
import { MAX_SNAPSHOTS, type SnapshotRecord, type SnapshotState } from './format.js';

export type LiveState = 'pending' | 'active' | 'failing' | 'failed';

export interface Snap {
  readonly id: string;
  readonly name: string;
  readonly generation: number;
  readonly takenAt: string;
  state: LiveState | 'deleted';
  reason: string | null;
  /** Set while `failing`: settles when the failure is on disk (or could not be put there). */
  durable: Promise<void> | null;
  /** Set while a delete is being recorded: left out of the meta. */
  deleting: boolean;
}

/** Snapshot names: what users type, and the part after '@' of the image's export name. */
export const SNAPSHOT_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;

export class SnapshotSet {
  private readonly byName = new Map<string, Snap>();
  /** Highest generation of an active or failing snapshot; 0 when none (nothing to copy). */
  newest = 0;

  static fromMeta(records: readonly SnapshotRecord[]): SnapshotSet {
    const set = new SnapshotSet();
    for (const r of records) {
      set.add({ ...r, durable: null, deleting: false });
    }
    set.recompute();
    return set;
  }

  get(name: string): Snap | undefined {
    return this.byName.get(name);
  }

  all(): Snap[] {
    return [...this.byName.values()].sort((a, b) => a.generation - b.generation);
  }

  get count(): number {
    return this.byName.size;
  }

  add(s: Snap): void {
    assert(!this.byName.has(s.name), 'two snapshots with one name');
    assert(this.byName.size < MAX_SNAPSHOTS, 'snapshot count above its bound');
    this.byName.set(s.name, s);
  }

  remove(s: Snap): void {
    assert(this.byName.get(s.name) === s, 'removed a snapshot that is not in the set');
    this.byName.delete(s.name);
    s.state = 'deleted';
    this.recompute();
  }

  /** Recomputes `newest` after a state change. */
  recompute(): void {
    let newest = 0;
    for (const s of this.byName.values()) {
      if ((s.state === 'active' || s.state === 'failing') && s.generation > newest)
        newest = s.generation;
    }
    this.newest = newest;
  }

  /** Snapshots in `states` with generation in (low, high]. */
  within(low: number, high: number, states: readonly Snap['state'][]): Snap[] {
    const out: Snap[] = [];
    for (const s of this.byName.values()) {
      if (s.generation > low && s.generation <= high && states.includes(s.state)) out.push(s);
    }
    return out;
  }

  /** Whether a copy serving (low, high] is still needed by an active (or failing) snapshot. */
  needed(low: number, high: number): boolean {
    for (const s of this.byName.values()) {
      if (
        s.generation > low &&
        s.generation <= high &&
        (s.state === 'active' || s.state === 'failing')
      )
        return true;
    }
    return false;
  }

  /** The list as the meta records it: pending ones as active, deleting ones left out. */
  toRecords(): SnapshotRecord[] {
    return this.all()
      .filter((s) => !s.deleting && s.state !== 'deleted')
      .map((s) => ({
        id: s.id,
        name: s.name,
        generation: s.generation,
        takenAt: s.takenAt,
        state: recordedState(s),
        reason: s.reason,
      }));
  }
}

function recordedState(s: Snap): SnapshotState {
  // A failing snapshot is recorded as failed: the meta never claims more than is true.
  return s.state === 'failing' || s.state === 'failed' ? 'failed' : 'active';
}
