/**
 * `devfilter snapshot ...` against a real daemon, with real clients reading the images:
 * a consistency group over two exports, `qemu-img compare` between an image and a copy taken
 * while writes were stopped, verify, delete, and clear errors and exit codes.
 */
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { requireTools } from '../helpers/tools.js';
import { run } from '../helpers/run.js';
import { startCliDaemon, type CliDaemon } from './fixtures.js';

let d: CliDaemon;
const uri = (name: string): string => `nbd+unix:///${encodeURIComponent(name)}?socket=${d.socket}`;

before(async () => {
  d = await startCliDaemon(['--export', 'db=memory:32M', '--export', 'logs=memory:16M']);
});

after(async () => {
  await d.close();
});

test('a group snapshot of two exports, read by qemu-img while the origins change', async (t) => {
  if (!requireTools(t, 'qemu-io', 'qemu-img')) return;
  const io = (
    u: string,
    cmd: string,
  ): Promise<{ code: number | null; stdout: string; stderr: string }> =>
    run('qemu-io', ['-f', 'raw', '-t', 'none', '-c', cmd, u], { timeoutMs: 30_000 });
  assert.equal((await io(uri('db'), 'write -P 0x11 0 8M')).code, 0);
  assert.equal((await io(uri('logs'), 'write -P 0x33 0 4M')).code, 0);
  // A copy of db taken while nothing writes: the image must equal it byte for byte.
  const copy = join(d.dir, 'db-copy.raw');
  assert.equal(
    (
      await run('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', uri('db'), copy], {
        timeoutMs: 60_000,
      })
    ).code,
    0,
  );

  const store = join(d.dir, 'store');
  const created = await d.cli([
    'snapshot',
    'create',
    'monday',
    '--export',
    'db',
    '--export',
    'logs',
    '--store',
    store,
    '--limit',
    '64M',
  ]);
  assert.equal(created.code, 0, created.stderr);
  assert.match(created.stdout, /^db\s+monday\s+1\s+\S+\s+active\s+db@monday$/m);
  assert.match(created.stdout, /^logs\s+monday\s+1\s+\S+\s+active\s+logs@monday$/m);

  assert.equal((await io(uri('db'), 'write -P 0x22 1M 2M')).code, 0); // the origin moves on
  const compare = await run(
    'qemu-img',
    ['compare', '-f', 'raw', '-F', 'raw', uri('db@monday'), copy],
    { timeoutMs: 60_000 },
  );
  assert.equal(compare.code, 0, `image differs from the copy: ${compare.stdout}${compare.stderr}`);
  const logs = await run(
    'qemu-io',
    ['-r', '-f', 'raw', '-c', 'read -P 0x33 0 4M', uri('logs@monday')],
    { timeoutMs: 30_000 },
  );
  assert.doesNotMatch(logs.stdout + logs.stderr, /fail|error/i);

  const list = await d.json<{ snapshots: Array<{ export: string; name: string; state: string }> }>([
    'snapshot',
    'list',
  ]);
  assert.deepEqual(list.snapshots.map((s) => `${s.export}@${s.name}:${s.state}`).sort(), [
    'db@monday:active',
    'logs@monday:active',
  ]);

  // The copies made by the 2M write above read back with their checksums.
  const verify = await d.cli(['snapshot', 'verify', 'db']);
  assert.equal(verify.code, 0, verify.stderr);
  assert.match(
    verify.stdout,
    /^32 copies checked \(2097152 bytes\), 0 freed meanwhile, 0 damaged$/m,
  );

  const del = await d.cli(['snapshot', 'delete', 'db', 'monday']);
  assert.equal(del.code, 0, del.stderr);
  const gone = await run('qemu-img', ['info', uri('db@monday')], { timeoutMs: 30_000 });
  assert.notEqual(gone.code, 0, 'the image export is withdrawn with its snapshot');
});

test('snapshot errors are clear and scripts can rely on the exit codes', async () => {
  const noStore = await d.cli(['snapshot', 'create', 'x', '--export', 'nostore-needed-here']);
  assert.equal(noStore.code, 3, noStore.stderr); // no such export
  const missing = await d.cli(['snapshot', 'delete', 'logs', 'nope']);
  assert.notEqual(missing.code, 0);
  assert.match(missing.stderr, /nope/);
  const usage = await d.cli(['snapshot', 'create', 'x']);
  assert.equal(usage.code, 2, 'missing --export is a usage error');
});
