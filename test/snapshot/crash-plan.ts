/**
 * The deterministic workload of the crash test, shared by the child that runs it (and is
 * killed) and the test that checks what survived: an initial content, then phases; before
 * phase p the child takes snapshot "p<p>", so that snapshot's image must show the initial
 * content with every operation of phases 0..p-1 applied. Within a phase, each worker owns
 * regions no other worker touches and runs its operations one after another.
 */
import { pattern } from '../filters/fixture.js';
import { KiB, MiB, Rng } from './fixture.js';
import type { OpKind } from './model.js';

export const SIZE = 4 * MiB - 5000;
export const CHUNK = 16 * KiB;
export const WORKERS = 3;
export const OPS_PER_PHASE = 12;
export const PHASES = 200;
const REGION = 24 * KiB;

export interface PlannedOp {
  kind: OpKind;
  offset: number;
  length: number;
  data: Buffer | null;
}

export function initialContent(seed: number): Buffer {
  return pattern(SIZE, seed);
}

/** Operations of one worker in one phase. */
export function phaseOps(seed: number, phase: number, worker: number): PlannedOp[] {
  const r = new Rng((seed ^ (phase * 7919 + worker * 104729 + 1)) >>> 0);
  const regions = Math.ceil(SIZE / REGION);
  const ops: PlannedOp[] = [];
  for (let i = 0; i < OPS_PER_PHASE; i++) {
    const region = r.int(Math.ceil(regions / WORKERS)) * WORKERS + worker;
    const start = Math.min(region * REGION, SIZE - 1);
    const end = Math.min(SIZE, start + REGION);
    // Some operations span two regions' worth (still this worker's alone: skip the neighbour's).
    const offset = r.between(start, end - 1);
    const length = r.between(1, end - offset);
    const x = r.next();
    const kind: OpKind = x < 0.6 ? 'write' : x < 0.8 ? 'trim' : 'zero';
    ops.push({
      kind,
      offset,
      length,
      data: kind === 'write' ? pattern(length, r.int(1 << 30)) : null,
    });
  }
  return ops;
}

export function applyOp(target: Buffer, op: PlannedOp): void {
  if (op.kind === 'write') op.data!.copy(target, op.offset);
  else target.fill(0, op.offset, op.offset + op.length);
}

/** The origin's content when snapshot "p<phase>" was taken. */
export function contentAt(seed: number, phase: number): Buffer {
  const b = initialContent(seed);
  for (let p = 0; p < phase; p++)
    for (let w = 0; w < WORKERS; w++) for (const op of phaseOps(seed, p, w)) applyOp(b, op);
  return b;
}
