/**
 * The access filter in a real `devfilter serve`: write-once state survives a clean restart and
 * kill -9 in the middle of writes (every acknowledged first write stays sealed, even one that
 * wrote zeros, which the content alone would not reveal); the audit log of the crashed run is
 * continued and verifies; the CLI creates the filter from a rules file (`--arg rules=FILE`),
 * controls it, and `devfilter audit verify` exits 0 or 1 with the first bad line.
 */
import assert from 'node:assert/strict';
import { copyFileSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { callOnce } from '../../src/control/client.js';
import { NbdClient } from '../../src/nbd/client.js';
import { NbdRequestError } from '../../src/nbd/client-errors.js';
import { run } from '../helpers/run.js';
import { CLI, spawnDaemon, tempDir, type DaemonProcess } from '../helpers/server.js';
import { prng } from '../protocol/raw.js';

const KiB = 1024;
const MiB = 1024 * 1024;
const BLOCK = 4 * KiB;

interface Daemon extends DaemonProcess {
  control: string;
  status<T = Record<string, unknown>>(): Promise<T>;
}

interface WormStatus {
  worm: {
    sealedBlocks: number;
    persistence: { mode: string; state: string; replayedRecords: number };
  };
  auditLog: { opened: string; lastSeq: number };
}

function setup(dir: string, size: number): { config: string; log: string; rules: string } {
  const config = join(dir, 'devfilter.json');
  const rules = join(dir, 'rules.json');
  const log = join(dir, 'audit.log');
  mkdirSync(join(dir, 'state'), { recursive: true });
  writeFileSync(
    rules,
    JSON.stringify({
      default: 'allow',
      rules: [{ name: 'guard', action: 'deny', ops: ['trim', 'zero'], range: [0, '1M'] }],
      worm: [['1M', 'end']],
    }),
  );
  writeFileSync(
    config,
    JSON.stringify({
      control: join(dir, 'control.sock'),
      exports: {
        disk: {
          file: join(dir, 'disk.img'),
          create: size,
          filters: [
            {
              type: 'access',
              name: 'acl',
              args: { rules, dir: join(dir, 'state'), auditLog: log, wormBlockSize: BLOCK },
            },
          ],
        },
      },
    }),
  );
  return { config, log, rules };
}

async function startDaemon(dir: string, config: string): Promise<Daemon> {
  const control = join(dir, 'control.sock');
  const d = await spawnDaemon(['--config', config], { socket: join(dir, 'nbd.sock') });
  return {
    ...d,
    control,
    status: async <T>() =>
      (await callOnce<{ status: T }>(control, 'filter.status', { export: 'disk', name: 'acl' }))
        .status,
  };
}

async function outcome(p: Promise<unknown>): Promise<string> {
  try {
    await p;
    return 'ok';
  } catch (err) {
    if (err instanceof NbdRequestError) return err.errnoName ?? String(err.errno);
    return 'gone';
  }
}

test('write-once state survives a clean restart and kill -9 during writes', async () => {
  const dir = tempDir('devfilter-access-daemon-');
  const size = 32 * MiB;
  const { config, log } = setup(dir.path, size);
  let d: Daemon | undefined;
  try {
    d = await startDaemon(dir.path, config);
    let c = await NbdClient.fromUri(d.uri('disk'), { metaContexts: [] });
    assert.equal(await outcome(c.write(2 * MiB, Buffer.alloc(BLOCK, 1))), 'ok');
    assert.equal(await outcome(c.write(3 * MiB, Buffer.alloc(BLOCK, 0))), 'ok', 'zeros count');
    assert.equal(await outcome(c.write(2 * MiB, Buffer.alloc(BLOCK, 2))), 'EPERM');
    assert.equal(await outcome(c.trim(0, BLOCK)), 'EPERM', 'the rule outside WORM');
    await c.disconnect();
    assert.equal(await d.stop(), 0);

    d = await startDaemon(dir.path, config);
    let s = await d.status<WormStatus>();
    assert.equal(s.worm.persistence.state, 'clean');
    assert.equal(s.worm.sealedBlocks, 2);
    c = await NbdClient.fromUri(d.uri('disk'), { metaContexts: [] });
    assert.equal(await outcome(c.write(2 * MiB, Buffer.alloc(BLOCK, 3))), 'EPERM');
    assert.equal(
      await outcome(c.write(3 * MiB, Buffer.alloc(BLOCK, 3))),
      'EPERM',
      'a block written with zeros stays sealed (only the state knows it)',
    );

    // kill -9 while 8 connections write first writes (a third of them zeros) to fresh blocks.
    const fresh = (size - 4 * MiB) / BLOCK; // blocks from 4 MiB on
    const order = Array.from({ length: fresh }, (_, i) => 4 * MiB + i * BLOCK);
    const rand = prng(7);
    for (let i = order.length - 1; i > 0; i--) {
      const j = Math.floor(rand() * (i + 1));
      [order[i], order[j]] = [order[j]!, order[i]!];
    }
    let next = 0;
    const acked: number[] = [];
    const clients = await Promise.all(
      Array.from({ length: 8 }, () => NbdClient.fromUri(d!.uri('disk'), { metaContexts: [] })),
    );
    let stop = false;
    const loops = clients.map(async (cl, k) => {
      while (!stop && next < order.length) {
        const at = order[next++]!;
        const data = Buffer.alloc(BLOCK, (at / BLOCK) % 3 === 0 ? 0 : (k % 250) + 1);
        const r = await outcome(cl.write(at, data));
        if (r === 'ok') acked.push(at);
        else if (r === 'gone') return;
        else assert.fail(`first write at ${at} failed with ${r}`);
      }
    });
    await new Promise((res) => setTimeout(res, 300));
    await d.kill9();
    stop = true;
    await Promise.all(loops);
    for (const cl of clients) cl.close().catch(() => undefined);
    c.close().catch(() => undefined);
    assert.ok(
      acked.length > 20,
      `enough first writes acknowledged before the kill (${acked.length})`,
    );

    d = await startDaemon(dir.path, config);
    s = await d.status<WormStatus>();
    assert.equal(s.worm.persistence.state, 'recovered');
    assert.ok(s.worm.sealedBlocks >= acked.length + 2, 'every acknowledged block is sealed');
    assert.equal(s.auditLog.opened, 'continued');
    c = await NbdClient.fromUri(d.uri('disk'), { metaContexts: [] });
    const reopened: number[] = [];
    for (const at of acked)
      if ((await outcome(c.write(at, Buffer.alloc(BLOCK, 0xee)))) !== 'EPERM') reopened.push(at);
    assert.deepEqual(reopened, [], 'acknowledged first writes that could be overwritten');
    // A block never sent is still writable once.
    const untouched = order[order.length - 1]!;
    assert.ok(next < order.length - 1, 'the kill came before the end of the list');
    assert.equal(await outcome(c.write(untouched, Buffer.alloc(BLOCK, 9))), 'ok');
    assert.equal(await outcome(c.write(untouched, Buffer.alloc(BLOCK, 9))), 'EPERM');
    process.stdout.write(
      `# access crash: ${acked.length} first writes acknowledged, ${s.worm.sealedBlocks} blocks sealed after the restart, ${s.worm.persistence.replayedRecords} journal records replayed\n`,
    );
    await c.disconnect();
    assert.equal(await d.stop(), 0);
    d = undefined;

    const verify = await run(process.execPath, [CLI, 'audit', 'verify', log]);
    assert.equal(verify.code, 0, verify.stdout + verify.stderr);
    assert.match(verify.stdout, /^ok: .* line\(s\) verified/);
    const report = JSON.parse(
      (await run(process.execPath, [CLI, 'audit', 'verify', '--json', log])).stdout,
    ) as { opens: number; denied: number; endsWithClose: boolean };
    assert.equal(report.opens, 3);
    assert.ok(report.denied >= acked.length + 4);
    assert.ok(report.endsWithClose);
  } finally {
    await d?.stop();
    dir.cleanup();
  }
});

test('the CLI: create from a rules file, control, status; audit verify exit codes', async () => {
  const dir = tempDir('devfilter-access-cli-');
  let d: DaemonProcess | undefined;
  try {
    const control = join(dir.path, 'control.sock');
    d = await spawnDaemon(['--export', 'disk=memory:16M', '--control', control], {
      socket: join(dir.path, 'nbd.sock'),
    });
    const cli = (args: string[]) =>
      run(process.execPath, [CLI, ...args], {
        env: { ...process.env, DEVFILTER_CONTROL: control },
        timeoutMs: 30_000,
      });
    const rules = join(dir.path, 'rules.json');
    writeFileSync(
      rules,
      '{"default": "allow", "rules": [{"action": "deny", "ops": ["write", "trim", "zero"], "range": [0, 1048576]}]}',
    );
    const log = join(dir.path, 'audit.log');
    let r = await cli([
      'filter',
      'create',
      'disk',
      'access',
      '--arg',
      `rules=${rules}`,
      '--arg',
      `auditLog=${log}`,
    ]);
    assert.equal(r.code, 0, r.stderr);
    const c = await NbdClient.fromUri(d.uri('disk'), { metaContexts: [] });
    assert.equal(await outcome(c.write(0, Buffer.alloc(4096, 1))), 'EPERM');
    assert.equal(await outcome(c.write(MiB, Buffer.alloc(4096, 1))), 'ok');
    await c.disconnect();

    r = await cli([
      'filter',
      'control',
      'disk',
      'access',
      'set-rules',
      'rules={"rules": [{"action": "bad"}]}',
    ]);
    assert.notEqual(r.code, 0);
    assert.match(r.stderr, /rules\[0\]\.action must be one of/);
    r = await cli(['filter', 'control', 'disk', 'access', 'reload', '--json']);
    assert.equal(r.code, 0, r.stderr);
    r = await cli(['filter', 'status', 'disk', 'access', '--json']);
    assert.equal(r.code, 0, r.stderr);
    const st = JSON.parse(r.stdout) as {
      status: {
        rules: { file: string; rules: Array<{ hits: number }> };
        counters: { denied: number };
      };
    };
    assert.equal(st.status.rules.file, rules);
    assert.equal(st.status.counters.denied, 1);
    r = await cli(['filter', 'remove', 'disk', 'access']);
    assert.equal(r.code, 0, r.stderr);

    r = await run(process.execPath, [CLI, 'audit', 'verify', log]);
    assert.equal(r.code, 0, r.stdout + r.stderr);
    // An edited copy: exit 1 and the line named.
    const bad = join(dir.path, 'edited.log');
    copyFileSync(log, bad);
    const lines = readFileSync(bad, 'utf8').split('\n');
    lines[2] = lines[2]!.replace('"offset":0', '"offset":4096');
    writeFileSync(bad, lines.join('\n'));
    r = await run(process.execPath, [CLI, 'audit', 'verify', bad]);
    assert.equal(r.code, 1);
    assert.match(r.stdout, /^FAILED: .*: line 3: its hash does not match its content/);
    writeFileSync(bad, readFileSync(log).subarray(0, -5));
    r = await run(process.execPath, [CLI, 'audit', 'verify', bad]);
    assert.equal(r.code, 1);
    assert.match(r.stdout, /^TRUNCATED: .*: line 4 \(\d+ bytes\): the last line is incomplete/);
  } finally {
    await d?.stop();
    dir.cleanup();
  }
});
