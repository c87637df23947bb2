/**
 * The reference model for the snapshot tests: the origin's content as acknowledged writes,
 * trims and zeroing made it, and, for each snapshot, the content at its instant.
 *
 * The instant of a take is some moment between the call and its return; an operation in flight
 * during that window may or may not be in the image. Connections own disjoint bytes and issue
 * one operation at a time, so what the image may hold is: the content when take was called,
 * plus, for each connection, a prefix of its operations that were in flight during the window.
 * `resolve` finds that prefix by reading the image once (the read is checked against the only
 * candidates there are); from then on the expected content is exact.
 */
import { firstDiff } from './fixture.js';

export type OpKind = 'write' | 'trim' | 'zero';

export interface Op {
  conn: number;
  kind: OpKind;
  offset: number;
  length: number;
  data: Buffer | null;
  issued: number;
  acked: number | null;
}

export function apply(target: Buffer, op: Op, base = 0): void {
  const from = op.offset - base;
  if (op.kind === 'write') op.data!.copy(target, from);
  else target.fill(0, from, from + op.length); // both backends read trimmed ranges as zeros
}

export class Model {
  readonly content: Buffer;
  private clock = 0;
  private readonly ops: Op[] = [];

  constructor(size: number, initial?: Buffer) {
    this.content = initial !== undefined ? Buffer.from(initial) : Buffer.alloc(size);
  }

  tick(): number {
    return ++this.clock;
  }

  issue(conn: number, kind: OpKind, offset: number, length: number, data: Buffer | null): Op {
    const op: Op = { conn, kind, offset, length, data, issued: this.tick(), acked: null };
    this.ops.push(op);
    // Keep only what a take window can still need (ops in flight or recent).
    if (this.ops.length > 4096) this.ops.splice(0, 2048);
    return op;
  }

  ack(op: Op): void {
    op.acked = this.tick();
    apply(this.content, op);
  }

  /** Operations that may or may not be in a snapshot taken between `called` and `returned`. */
  window(called: number, returned: number): Op[] {
    return this.ops.filter((o) => o.issued < returned && (o.acked === null || o.acked > called));
  }
}

/**
 * The exact content of a snapshot, given the content when take was called (`base`), the
 * operations in flight during the take, and the image as read once: per connection, the
 * prefix of its in-flight operations that the image shows. Throws if no prefix fits.
 */
export function resolve(
  base: Buffer,
  inFlight: readonly Op[],
  image: Buffer,
  what: string,
): Buffer {
  const expected = Buffer.from(base);
  const byConn = new Map<number, Op[]>();
  for (const o of inFlight) byConn.set(o.conn, [...(byConn.get(o.conn) ?? []), o]);
  const covered = new Uint8Array(base.length);
  for (const [conn, ops] of byConn) {
    ops.sort((a, b) => a.issued - b.issued);
    const lo = Math.min(...ops.map((o) => o.offset));
    const hi = Math.max(...ops.map((o) => o.offset + o.length));
    const mask = new Uint8Array(hi - lo);
    for (const o of ops) mask.fill(1, o.offset - lo, o.offset - lo + o.length);
    let chosen = -1;
    const cand = Buffer.from(base.subarray(lo, hi));
    for (let j = 0; j <= ops.length && chosen < 0; j++) {
      if (j > 0) apply(cand, ops[j - 1]!, lo);
      let same = true;
      for (let i = 0; i < mask.length && same; i++)
        if (mask[i] && cand[i] !== image[lo + i]) same = false;
      if (same) chosen = j;
    }
    if (chosen < 0) {
      throw new Error(
        `${what}: the image holds no prefix of connection ${conn}'s ${ops.length} operation(s) in flight during the take`,
      );
    }
    for (let j = 0; j < chosen; j++) apply(expected, ops[j]!);
    for (let i = 0; i < mask.length; i++) if (mask[i]) covered[lo + i] = 1;
  }
  for (let i = 0; i < base.length; i++) {
    if (!covered[i] && image[i] !== base[i]) {
      throw new Error(
        `${what}: byte ${i} differs from the content at the take (first difference at ${firstDiff(image, base)})`,
      );
    }
  }
  return expected;
}
