/**
 * Shared pieces of the faults-below tests (torture issue, item 2): the seed (from an
 * environment variable, printed so that a failure can be replayed), the fault rules put
 * beneath the filter under test, and a request wrapper that tells an errno from a hang or a
 * broken connection.
 */
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { NbdClient } from '../../src/nbd/client.js';
import type { SnapFixture } from '../snapshot/fixture.js';

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
