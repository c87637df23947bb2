import { spawnSync } from 'node:child_process';
import type { TestContext } from 'node:test';

const found = new Map<string, boolean>();

export function hasTool(name: string): boolean {
  let ok = found.get(name);
  if (ok === undefined) {
    ok = spawnSync('sh', ['-c', `command -v ${name}`], { stdio: 'ignore' }).status === 0;
    found.set(name, ok);
  }
  return ok;
}

/**
 * Tests that need an external tool skip loudly where it is missing, and fail under CI=true:
 * CI must never pass by skipping. Returns false when the test should stop here.
 */
export function requireTools(t: TestContext, ...names: string[]): boolean {
  const missing = names.filter((n) => !hasTool(n));
  if (missing.length === 0) return true;
  const message = `missing tool(s): ${missing.join(', ')} (install them, see .ci/run)`;
  if (process.env.CI === 'true') throw new Error(`${message}; CI must not skip`);
  process.stderr.write(`\n*** SKIPPED ${t.name}: ${message} ***\n\n`);
  t.skip(message);
  return false;
}
