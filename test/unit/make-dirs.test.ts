/**
 * makeDirs: `mkdir -p` that always ends. Node's recursive mkdir never returns for a path under
 * /proc (the control fuzzer found a snapshot store path there hanging the daemon for good).
 */
import assert from 'node:assert/strict';
import { existsSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { makeDirs, makeDirsSync } from '../../src/core/make-dirs.js';
import { tempDir } from '../helpers/server.js';

test('creates missing parents with the mode, accepts what exists, refuses a file', async () => {
  const d = tempDir();
  try {
    const deep = join(d.path, 'a', 'b', 'c');
    await makeDirs(deep, 0o700);
    assert.ok(statSync(deep).isDirectory());
    assert.equal(statSync(join(d.path, 'a')).mode & 0o777, 0o700);
    await makeDirs(deep); // exists: fine
    makeDirsSync(join(deep, 'd'));
    assert.ok(existsSync(join(deep, 'd')));
    writeFileSync(join(d.path, 'file'), '');
    await assert.rejects(makeDirs(join(d.path, 'file', 'x')), { code: 'ENOTDIR' });
    assert.throws(() => makeDirsSync(join(d.path, 'file', 'x')), { code: 'ENOTDIR' });
  } finally {
    d.cleanup();
  }
});

test('a file system that refuses with ENOENT gets an error, not a hang', async (t) => {
  if (!existsSync('/proc/self')) {
    t.skip('no /proc here');
    return;
  }
  await assert.rejects(makeDirs('/proc/devfilter-test/store'), /refuses it/);
  assert.throws(() => makeDirsSync('/proc/devfilter-test'), /refuses it/);
});
