#!/usr/bin/env node
// Runs the compiled test suite with Node's own test runner. Arguments narrow the run to test
// files whose path contains one of them (e.g. `npm test -- protocol`).
import { existsSync, readdirSync, statSync } from 'node:fs';
import { join, relative } from 'node:path';
import { spawnSync } from 'node:child_process';

const root = new URL('..', import.meta.url).pathname;
const testDir = join(root, 'dist', 'test');

function sourceOf(compiled) {
  return join(root, relative(join(root, 'dist'), compiled)).replace(/\.js$/, '.ts');
}

function findTests(dir) {
  const out = [];
  for (const entry of readdirSync(dir)) {
    const path = join(dir, entry);
    if (statSync(path).isDirectory()) out.push(...findTests(path));
    // Only tests whose source still exists: a renamed test leaves its old build behind.
    else if (entry.endsWith('.test.js') && existsSync(sourceOf(path))) out.push(path);
  }
  return out.sort();
}

// "test/crash" and "crash" name the same files: paths are matched below dist/test.
const filters = process.argv.slice(2).map((p) => p.replace(/^(\.\/)?test\//, ''));
const files = findTests(testDir).filter(
  (f) => filters.length === 0 || filters.some((p) => relative(testDir, f).includes(p)),
);
if (files.length === 0) {
  console.error(`no test files match ${JSON.stringify(filters)} under ${relative(root, testDir)}`);
  process.exit(1);
}
// Timing-sensitive tests (".serial.test.js") run after the rest, one file at a time, so that
// no other test competes with them for the two cores.
const parallel = files.filter((f) => !f.endsWith('.serial.test.js'));
const serial = files.filter((f) => f.endsWith('.serial.test.js'));
let status = 0;
for (const [group, concurrency] of [
  [parallel, 2],
  [serial, 1],
]) {
  if (group.length === 0) continue;
  const result = spawnSync(
    process.execPath,
    ['--test', `--test-concurrency=${concurrency}`, ...group],
    {
      stdio: 'inherit',
      cwd: root,
    },
  );
  if (result.status !== 0) status = result.status ?? 1;
}
process.exit(status);
