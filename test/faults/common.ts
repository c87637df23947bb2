/**
 * Shared pieces of the faults-below tests (torture issue, item 2): the seed (from an
 * environment variable, printed so that a failure can be replayed), the fault rules put
 * beneath the filter under test, and a request wrapper that tells an errno from a hang or a
 * broken connection.
 */
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { NbdClient } from '../../src/nbd/client.js';
import { pattern } from '../filters/fixture.js';
import type { Rng, SnapFixture } from '../snapshot/fixture.js';

/** The seed named by `env`, or a random one. */
export function seedFrom(env: string): number {
  const s = process.env[env];
  return s !== undefined ? Number(s) >>> 0 : (Math.random() * 0x100000000) >>> 0;
}

/**
 * What the `fault` filter does beneath the filter under test while a round runs: EIO and
 * ENOSPC on reads, writes, trims, zeroing and flushes, torn and dropped writes, failed block
 * status, delays.
 */
export const FAULT_RULES = [
  { action: 'delay', ops: 'read,write,trim,zero', probability: 0.05, delayMs: 2, name: 'slow' },
  { action: 'error', ops: 'read', probability: 0.08, name: 'read-eio' },
  { action: 'error', ops: 'write', probability: 0.06, errno: 'ENOSPC', name: 'write-enospc' },
  { action: 'error', ops: 'write', probability: 0.04, name: 'write-eio' },
  { action: 'torn', ops: 'write', probability: 0.04, errno: 'EIO', name: 'torn-eio' },
  { action: 'torn', ops: 'write', probability: 0.03, name: 'torn-silent' },
  { action: 'drop', ops: 'write,trim,zero', probability: 0.04, name: 'dropped' },
  { action: 'error', ops: 'trim,zero', probability: 0.1, errno: 'ENOSPC', name: 'trim-zero' },
  { action: 'error', ops: 'flush', probability: 0.2, name: 'flush-eio' },
  { action: 'error', ops: 'block-status', probability: 0.2, name: 'status-eio' },
];

/** Errnos a request may fail with here: injected below, or a filter's own refusal (EPERM). */
const EXPECTED = new Set(['EIO', 'ENOSPC', 'EPERM']);

/** A request's outcome: 'ok', or the errno the server answered with. */
export type Outcome = 'ok' | string;

/**
 * Runs one client request with a deadline. It must either succeed or fail with an errno the
 * server sent (an NBD error reply): a hang, or a broken connection, fails the test.
 */
export async function attempt(what: string, op: () => Promise<unknown>): Promise<Outcome> {
  let timer: NodeJS.Timeout | undefined;
  const deadline = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: no answer within 10 s (hung)`)), 10_000);
  });
  try {
    await Promise.race([op(), deadline]);
    return 'ok';
  } catch (err) {
    const name = (err as { errnoName?: string }).errnoName;
    assert.ok(
      name !== undefined && EXPECTED.has(name),
      `${what}: failed without an expected errno: ${(err as Error).message}`,
    );
    return name;
  } finally {
    clearTimeout(timer);
  }
}

/** Counts outcomes by errno, for the diagnostics. */
export class Tally {
  ok = 0;
  readonly errors = new Map<string, number>();
  add(o: Outcome): void {
    if (o === 'ok') this.ok++;
    else this.errors.set(o, (this.errors.get(o) ?? 0) + 1);
  }
  get failed(): number {
    let n = 0;
    for (const v of this.errors.values()) n += v;
    return n;
  }
  toString(): string {
    return `${this.ok} requests succeeded; failed: ${JSON.stringify(Object.fromEntries(this.errors))}`;
  }
}

/** Connects to an export of a fixture with negotiation options (e.g. meta contexts). */
export function connectWith(
  fx: SnapFixture,
  exportName: string,
  options: { metaContexts?: string[] } = {},
): Promise<NbdClient> {
  const socket = join(fx.dir, 'nbd.sock');
  return NbdClient.fromUri(
    `nbd+unix:///${encodeURIComponent(exportName)}?socket=${socket}`,
    options,
  );
}

/** The fault filter's counters, for the diagnostics. */
export function injected(fx: SnapFixture, exportName: string, filter = 'faults'): string {
  const s = fx.manager.filterStatus(exportName, filter).status as { injected: unknown };
  return JSON.stringify(s.injected);
}

/** The shape of one random request: how often each kind, how long. */
export interface RequestMix {
  size: number;
  block: number;
  /** Chance of an unaligned request, and its longest length in blocks. */
  unaligned: number;
  unalignedBlocks: number;
  /** Longest aligned request, in blocks. */
  alignedBlocks: number;
  /** Cumulative chances of write, trim, zero and read; the rest are flushes. */
  write: number;
  trim: number;
  zero: number;
  read: number;
}

/**
 * One random request anywhere on the device (FUA now and then), through `attempt`: writes
 * carry a pattern derived from `seed`, so that different requests write different bytes.
 */
export function randomRequest(
  c: NbdClient,
  rng: Rng,
  mix: RequestMix,
  what: string,
  seed: number,
): Promise<Outcome> {
  const { size, block } = mix;
  const unaligned = rng.next() < mix.unaligned;
  const len = unaligned
    ? 1 + rng.int(mix.unalignedBlocks * block)
    : block * (1 + rng.int(mix.alignedBlocks));
  const off = unaligned ? rng.int(size - len) : block * rng.int((size - len) / block + 1);
  const flags = rng.next() < 0.3 ? 1 : 0; // FUA
  const roll = rng.next();
  if (roll < mix.write)
    return attempt(`${what} write`, () => c.write(off, pattern(len, seed), flags));
  if (roll < mix.trim) return attempt(`${what} trim`, () => c.trim(off, len, flags));
  if (roll < mix.zero) return attempt(`${what} zero`, () => c.writeZeroes(off, len, flags));
  if (roll < mix.read) return attempt(`${what} read`, () => c.read(off, len));
  return attempt(`${what} flush`, () => c.flush());
}
