/**
 * `devfilter backup` end to end against a real daemon with a `cbt` filter: a full backup,
 * random writes, an incremental, more writes, another incremental. The chain read by
 * qemu-img equals the export's content at the last backup, every incremental holds only what
 * changed (sizes printed), `backup verify` passes; a backup killed half-way leaves no image
 * that looks complete and the next incremental is still right; a reset change history is
 * refused with "full backup needed".
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import {
  closeSync,
  existsSync,
  mkdirSync,
  openSync,
  readFileSync,
  readSync,
  statSync,
  writeSync,
} from 'node:fs';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { NbdClient } from '../../src/nbd/client.js';
import { pattern } from '../filters/fixture.js';
import { startCliDaemon, type CliDaemon } from '../cli/fixtures.js';
import { run } from '../helpers/run.js';
import { CLI, tempDir } from '../helpers/server.js';
import { requireTools } from '../helpers/tools.js';
import { Rng } from '../snapshot/fixture.js';

const MiB = 1024 * 1024;
const SIZE = 32 * MiB;
const CLUSTER = 64 * 1024;
const SEED = Number(process.env.BACKUP_SEED ?? Date.now() % 1_000_000);

let d: CliDaemon;
let client: NbdClient;
/** What the export holds: every write goes here too. */
const model = Buffer.alloc(SIZE);
const rng = new Rng(SEED);

const tmp = tempDir('devfilter-backup-');

before(async () => {
  d = await startCliDaemon(
    [
      '--export',
      `disk=file:${join(tmp.path, 'disk.img')},create=${SIZE}`,
      '--export',
      `copy=memory:${SIZE}`,
    ],
    {
      dir: tmp.path,
    },
  );
});

after(async () => {
  await client?.close().catch(() => undefined);
  await d?.close();
  tmp.cleanup();
});

interface Done {
  event: 'done';
  path: string;
  mode: string;
  base: string | null;
  generation: number;
  generationId: string;
  dataBytes: number;
  zeroBytes: number;
  scannedBytes: number;
  fileSize: number;
  notes: string[];
}

async function backup(mode: 'full' | 'incremental', dest: string, ...extra: string[]) {
  const r = await d.cli(['backup', mode, 'disk', dest, '--json', ...extra], { timeoutMs: 120_000 });
  const lines = r.stdout.trim().split('\n').filter(Boolean);
  return { r, done: r.code === 0 ? (JSON.parse(lines[lines.length - 1]!) as Done) : undefined };
}

/** Random writes and zeroings; returns the clusters they touched. */
async function churn(ops: number): Promise<Set<number>> {
  const touched = new Set<number>();
  for (let i = 0; i < ops; i++) {
    const len = (1 + rng.int(32)) * 4096;
    const off = rng.int((SIZE - len) / 4096) * 4096;
    if (rng.next() < 0.8) {
      const data = pattern(len, SEED + i + ops * 7);
      await client.write(off, data);
      data.copy(model, off);
    } else {
      await client.writeZeroes(off, len);
      model.fill(0, off, off + len);
    }
    for (let c = Math.floor(off / CLUSTER); c <= Math.floor((off + len - 1) / CLUSTER); c++)
      touched.add(c);
  }
  return touched;
}

async function chainEquals(t: { diagnostic: (m: string) => void }, image: string): Promise<void> {
  const raw = join(d.dir, `restored-${Date.now()}.raw`);
  const conv = await run('qemu-img', ['convert', '-O', 'raw', image, raw], { timeoutMs: 60_000 });
  assert.equal(conv.code, 0, conv.stderr);
  const got = readFileSync(raw);
  assert.equal(got.length, SIZE);
  const at = got.findIndex((b, i) => b !== model[i]);
  assert.equal(at, -1, `the chain differs from the export at byte ${at}`);
  t.diagnostic(`${image}: qemu-img convert of the chain equals the export`);
}

test(`full, incremental, incremental: the chain equals the export; incrementals hold only changes (BACKUP_SEED=${SEED})`, async (t) => {
  if (!requireTools(t, 'qemu-img')) return;
  const cbtDir = join(d.dir, 'cbt');
  const store = join(d.dir, 'store');
  mkdirSync(cbtDir);
  const created = await d.cli([
    'filter',
    'create',
    'disk',
    'cbt',
    '--bottom',
    '--arg',
    `dir=${cbtDir}`,
  ]);
  assert.equal(created.code, 0, created.stderr);
  client = await NbdClient.fromUri(d.uri('disk'));
  // Some data to start with, and a hole in the middle.
  for (const [off, len] of [
    [0, 4 * MiB],
    [20 * MiB, 3 * MiB],
  ] as const) {
    const data = pattern(len, off + 1);
    await client.write(off, data);
    data.copy(model, off);
  }

  const out = join(d.dir, 'backups');
  mkdirSync(out);
  const full = await backup('full', join(out, 'full.qcow2'), '--store', store);
  assert.equal(full.r.code, 0, full.r.stderr);
  const f = full.done!;
  assert.equal(f.dataBytes, 7 * MiB, 'a full backup copies the data, not the holes');
  await chainEquals(t, f.path);

  const touched1 = await churn(60);
  const inc1 = await backup('incremental', join(out, 'inc1.qcow2'));
  assert.equal(inc1.r.code, 0, inc1.r.stderr);
  const i1 = inc1.done!;
  assert.equal(i1.base, f.path);
  assert.ok(i1.generation > f.generation);
  assert.equal(i1.generationId, f.generationId);
  // Only what changed was looked at: the cbt blocks are the qcow2 clusters here (64 KiB).
  assert.equal(i1.scannedBytes, touched1.size * CLUSTER, 'scanned exactly the changed clusters');
  assert.ok(i1.fileSize < f.fileSize, 'an incremental is smaller than the full backup');
  await chainEquals(t, i1.path);

  const touched2 = await churn(30);
  const inc2 = await backup('incremental', join(out, 'inc2.qcow2'));
  assert.equal(inc2.r.code, 0, inc2.r.stderr);
  const i2 = inc2.done!;
  assert.equal(i2.base, i1.path, 'the default base is the newest backup of the export');
  assert.equal(i2.scannedBytes, touched2.size * CLUSTER);
  await chainEquals(t, i2.path);
  t.diagnostic(
    `sizes: full ${f.fileSize} B (${f.dataBytes} data); inc1 ${i1.fileSize} B for ${touched1.size} changed clusters; ` +
      `inc2 ${i2.fileSize} B for ${touched2.size}`,
  );

  const info = await run('qemu-img', ['info', '--backing-chain', i2.path], { timeoutMs: 30_000 });
  assert.equal(info.code, 0, info.stderr);
  assert.match(info.stdout, /backing file: inc1\.qcow2/);
  assert.match(info.stdout, /backing file: full\.qcow2/);
  const cmp = await run('qemu-img', ['compare', i2.path, '-F', 'raw', d.uri('disk')], {
    timeoutMs: 60_000,
  });
  assert.equal(cmp.code, 0, `qemu-img compare with the live export: ${cmp.stdout}${cmp.stderr}`);
  const verify = await d.cli(['backup', 'verify', i2.path]);
  assert.equal(verify.code, 0, verify.stdout + verify.stderr);
  assert.match(verify.stdout, /ok: 3 image\(s\) verified/);

  // devfilter restore: to a new file, and to another export of the daemon.
  const file = join(d.dir, 'restored.img');
  const toFile = await d.cli(['restore', i2.path, file], { timeoutMs: 120_000 });
  assert.equal(toFile.code, 0, toFile.stderr);
  assert.equal(Buffer.compare(readFileSync(file), model), 0, 'restored file equals the export');
  const toExport = await d.cli(['restore', i2.path, d.uri('copy')], { timeoutMs: 120_000 });
  assert.equal(toExport.code, 0, toExport.stderr);
  const copy = await NbdClient.fromUri(d.uri('copy'));
  try {
    for (let at = 0; at < SIZE; at += 4 * MiB)
      assert.ok(
        (await copy.read(at, 4 * MiB)).equals(model.subarray(at, at + 4 * MiB)),
        `restored export differs in [${at}, ${at + 4 * MiB})`,
      );
  } finally {
    await copy.close();
  }
  const again = await d.cli(['restore', i2.path, file]);
  assert.equal(again.code, 1, 'an existing file is not replaced without --force');
  assert.match(again.stderr, /exists|--force|force/);
});

test('a backup killed half-way leaves no image; the next incremental is still right', async (t) => {
  if (!requireTools(t, 'qemu-img')) return;
  const out = join(d.dir, 'backups');
  await churn(400); // plenty to copy, so the kill lands mid-copy
  const dest = join(out, 'killed.qcow2');
  const child = spawn(process.execPath, [CLI, 'backup', 'incremental', 'disk', dest, '--json'], {
    env: { ...process.env, DEVFILTER_CONTROL: d.control },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  // Killed at its first progress report: the snapshot is taken and the copy under way.
  await new Promise<void>((resolve, reject) => {
    let out = '';
    child.stdout!.on('data', (b: Buffer) => {
      out += b.toString();
      if (out.includes('"progress"')) {
        child.kill('SIGKILL');
        resolve();
      }
    });
    child.once('exit', (code) =>
      reject(new Error(`backup ended (${code}) before its first progress`)),
    );
  });
  await new Promise((r) => child.once('exit', r));
  assert.ok(!existsSync(dest), 'no image at DEST after the kill');
  const left = (await d.json<{ snapshots: Array<{ name: string }> }>(['snapshot', 'list', 'disk']))
    .snapshots;
  assert.ok(
    left.some((s) => s.name.startsWith(`backup-${child.pid}-`)),
    'its snapshot is left over',
  );

  await churn(20);
  const next = await backup('incremental', join(out, 'after-kill.qcow2'));
  assert.equal(next.r.code, 0, next.r.stderr);
  assert.equal(next.done!.base, join(out, 'inc2.qcow2'), 'built on the last finished backup');
  assert.ok(
    next.done!.notes.some((n) => /interrupted backup/.test(n)),
    'the leftover was dropped',
  );
  const after = (await d.json<{ snapshots: unknown[] }>(['snapshot', 'list', 'disk'])).snapshots;
  assert.deepEqual(after, [], 'no snapshot left behind');
  await chainEquals(t, next.done!.path);
  assert.ok(statSync(next.done!.path).size > 0);
});

test('a reset change history is refused: a full backup is needed', async (t) => {
  if (!requireTools(t, 'qemu-img')) return;
  const reset = await d.cli(['filter', 'control', 'disk', 'cbt', 'reset']);
  assert.equal(reset.code, 0, reset.stderr);
  const r = await backup('incremental', join(d.dir, 'backups', 'refused.qcow2'));
  assert.equal(r.r.code, 2, r.r.stdout + r.r.stderr);
  assert.match(r.r.stderr, /reset .*full backup is needed/);
  assert.ok(!existsSync(join(d.dir, 'backups', 'refused.qcow2')));
  const full = await backup('full', join(d.dir, 'backups', 'full2.qcow2'));
  assert.equal(full.r.code, 0, full.r.stderr);
  await chainEquals(t, full.done!.path);

  // A flipped byte in a data cluster (the writer puts data from cluster 1 on): verify says so.
  const fd = openSync(full.done!.path, 'r+');
  const b = Buffer.alloc(1);
  readSync(fd, b, 0, 1, CLUSTER + 100);
  b[0] = b[0]! ^ 0xff;
  writeSync(fd, b, 0, 1, CLUSTER + 100);
  closeSync(fd);
  const v = await d.cli(['backup', 'verify', full.done!.path]);
  assert.equal(v.code, 1, `verify of a damaged image exits 1: ${v.stdout}${v.stderr}`);
  assert.match(v.stdout, /PROBLEM/);
});
