/**
 * Backups across a daemon crash: a `cbt` filter (journaled) and a `snapshot` filter declared
 * in the config, a full backup, then rounds of writes and incremental backups, and `kill -9`
 * of the daemon at a random moment — during writes or during a backup. After the restart one
 * more incremental on top of the last finished backup, restored, must equal the export
 * exactly: a change the map lost in the crash (a write that reached the disk, acknowledged or
 * not) would be missing from it. BACKUP_CRASH_SEED replays a round.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { test } from 'node:test';
import { NbdClient } from '../../src/nbd/client.js';
import { pattern } from '../filters/fixture.js';
import { runCli } from '../cli/fixtures.js';
import { CLI, spawnDaemon, tempDir, type DaemonProcess } from '../helpers/server.js';
import { Rng } from '../snapshot/fixture.js';

const MiB = 1024 * 1024;
const SIZE = 16 * MiB;
const BASE_SEED = Number(process.env.BACKUP_CRASH_SEED ?? Date.now() % 1_000_000);
const ROUNDS = 2;

function config(dir: string): string {
  const path = join(dir, 'devfilter.json');
  writeFileSync(
    path,
    JSON.stringify({
      control: join(dir, 'control.sock'),
      exports: {
        disk: {
          file: join(dir, 'disk.img'),
          create: SIZE,
          filters: [
            { type: 'cbt', name: 'cbt', args: { dir: join(dir, 'cbt') } },
            { type: 'snapshot', args: { store: join(dir, 'store') } },
          ],
        },
      },
    }),
  );
  return path;
}

async function start(dir: string): Promise<DaemonProcess> {
  return spawnDaemon(['--config', join(dir, 'devfilter.json'), '--log-level', 'warn'], {
    socket: join(dir, 'nbd.sock'),
  });
}

async function round(seed: number, t: { diagnostic: (m: string) => void }): Promise<void> {
  const tmp = tempDir('devfilter-backup-crash-');
  const dir = tmp.path;
  const rng = new Rng(seed);
  mkdirSync(join(dir, 'cbt'));
  mkdirSync(join(dir, 'backups'));
  config(dir);
  const env = { DEVFILTER_CONTROL: join(dir, 'control.sock') };
  const backup = (mode: string, name: string) =>
    runCli(['backup', mode, 'disk', join(dir, 'backups', name)], { env, timeoutMs: 120_000 });
  let daemon = await start(dir);
  try {
    let client = await NbdClient.fromUri(daemon.uri('disk'));
    await client.write(0, pattern(4 * MiB, seed));
    const full = await backup('full', 'b0.qcow2');
    assert.equal(full.code, 0, full.stderr);

    // Writes and backups until the kill: the writer keeps going while backups run.
    let killed = false;
    const killAfter = 200 + ((Math.imul(seed, 2654435761) >>> 0) % 1500);
    let n = 0;
    const writer = (async () => {
      for (let i = 0; !killed; i++) {
        const len = (1 + rng.int(16)) * 4096;
        const off = rng.int((SIZE - len) / 4096) * 4096;
        try {
          if (rng.next() < 0.85) await client.write(off, pattern(len, seed + i));
          else await client.writeZeroes(off, len);
        } catch {
          return; // the daemon is gone
        }
      }
    })();
    const backups = (async () => {
      for (let k = 1; !killed; k++) {
        const child = spawn(
          process.execPath,
          [CLI, 'backup', 'incremental', 'disk', join(dir, 'backups', `b${k}.qcow2`)],
          { env: { ...process.env, ...env }, stdio: 'ignore' },
        );
        const code = await new Promise<number | null>((r) => child.once('exit', r));
        if (code === 0) n++;
      }
    })();
    await sleep(killAfter);
    killed = true;
    await daemon.kill9();
    await Promise.all([writer, backups]);
    await client.close().catch(() => undefined);

    daemon = await start(dir);
    const last = await backup('incremental', 'after.qcow2');
    assert.equal(last.code, 0, `${last.stdout}${last.stderr}`);
    const restored = join(dir, 'restored.img');
    const r = await runCli(['restore', join(dir, 'backups', 'after.qcow2'), restored], {
      timeoutMs: 120_000,
    });
    assert.equal(r.code, 0, r.stderr);
    client = await NbdClient.fromUri(daemon.uri('disk'));
    const got = readFileSync(restored);
    for (let at = 0; at < SIZE; at += MiB) {
      const want = await client.read(at, MiB);
      const diff = want.findIndex((b, i) => b !== got[at + i]);
      assert.equal(diff, -1, `seed ${seed}: the restored chain differs at byte ${at + diff}`);
    }
    await client.close();
    t.diagnostic(
      `seed ${seed}: killed after ${killAfter} ms with ${n} incremental(s) finished; the chain after the restart equals the export`,
    );
  } finally {
    if (daemon.child.exitCode === null) await daemon.kill9();
    tmp.cleanup();
  }
}

test(`kill -9 under writes and backups: the next incremental still equals the export (BACKUP_CRASH_SEED=${BASE_SEED})`, async (t) => {
  for (let i = 0; i < ROUNDS; i++) await round(BASE_SEED + i, t);
});
