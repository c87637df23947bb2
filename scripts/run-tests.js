#!/usr/bin/env node
// Runs the compiled test suite with Node's own test runner. Arguments narrow the run to test
// files whose path contains one of them (e.g. `npm test -- protocol`).
import { readdirSync, statSync } from 'node:fs';
import { join, relative } from 'node:path';
import { spawnSync } from 'node:child_process';

const root = new URL('..', import.meta.url).pathname;
const testDir = join(root, 'dist', 'test');

function findTests(dir) {
  const out = [];
  for (const entry of readdirSync(dir)) {
    const path = join(dir, entry);
    if (statSync(path).isDirectory()) out.push(...findTests(path));
    else if (entry.endsWith('.test.js')) out.push(path);
  }
  return out.sort();
}

const filters = process.argv.slice(2);
const files = findTests(testDir).filter(
  (f) => filters.length === 0 || filters.some((p) => relative(testDir, f).includes(p)),
);
if (files.length === 0) {
  console.error(`no test files match ${JSON.stringify(filters)} under ${relative(root, testDir)}`);
  process.exit(1);
}
const result = spawnSync(process.execPath, ['--test', '--test-concurrency=2', ...files], {
  stdio: 'inherit',
  cwd: root,
});
process.exit(result.status ?? 1);
