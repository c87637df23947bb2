/**
 * The cbt filter in a real `devfilter serve`: the map survives a clean restart unchanged;
 * after kill -9 in the middle of writes no changed block is missing (every acknowledged change,
 * and every block whose content differs on disk); the real nbdinfo reads
 * qemu:dirty-bitmap:NAME from a live export (and qemu-img, a QEMU-style client, too); the
 * commands work through `devfilter filter control`, and bad arguments are refused clearly.
 */
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { NbdClient } from '../../src/nbd/client.js';
import { run } from '../helpers/run.js';
import { CLI, tempDir } from '../helpers/server.js';
import { requireTools } from '../helpers/tools.js';
import { prng, randomBytes } from '../protocol/raw.js';
import {
  KiB,
  MiB,
  changedBlocks,
  startCbtDaemon,
  type CbtDaemon,
  type ChangedReply,
} from './daemon.js';

const BLOCK = 64 * KiB;

interface CbtStatus {
  id: string;
  generation: number;
  dirtyBlocks: number;
  persistence: { state: string; recovered: boolean; replayedRecords: number };
}

function blocksIn(offset: number, length: number): number[] {
  const out: number[] = [];
  for (let b = Math.floor(offset / BLOCK); b < Math.ceil((offset + length) / BLOCK); b++)
    out.push(b);
  return out;
}

test('a clean restart keeps the map, the generation and the id', async () => {
  const dir = tempDir('devfilter-cbt-restart-');
  let d: CbtDaemon | undefined;
  try {
    d = await startCbtDaemon({ dir: dir.path, size: 32 * MiB, blockSize: BLOCK });
    const c = await NbdClient.fromUri(d.uri(), { metaContexts: [] });
    await c.write(3 * BLOCK, Buffer.alloc(4096, 1));
    const g = await d.cmd<{ previous: number; current: number }>('generation');
    assert.deepEqual([g.previous, g.current], [1, 2]);
    await c.write(10 * BLOCK + 100, Buffer.alloc(2 * BLOCK, 2));
    await c.trim(20 * BLOCK, BLOCK);
    await c.writeZeroes(30 * BLOCK, 3 * BLOCK);
    await c.disconnect();
    const before = await d.status<CbtStatus>();
    const since1 = await d.cmd<ChangedReply>('changed', { since: 1 });
    const since2 = await d.cmd<ChangedReply>('changed', { since: 2 });
    assert.deepEqual(
      [...changedBlocks(since2, BLOCK)].sort((a, b) => a - b),
      [10, 11, 12, 20, 30, 31, 32],
    );
    assert.equal(await d.stop(), 0);

    d = await startCbtDaemon({ dir: dir.path, size: 32 * MiB, blockSize: BLOCK });
    const after = await d.status<CbtStatus>();
    assert.equal(after.id, before.id);
    assert.equal(after.generation, 2);
    assert.equal(after.dirtyBlocks, before.dirtyBlocks);
    assert.equal(after.persistence.state, 'clean');
    assert.equal(after.persistence.recovered, false);
    assert.deepEqual(await d.cmd<ChangedReply>('changed', { since: 1 }), since1);
    assert.deepEqual(await d.cmd<ChangedReply>('changed', { since: 2 }), since2);
  } finally {
    await d?.stop();
    dir.cleanup();
  }
});

describe('kill -9 during writes', () => {
  for (const seed of [1, 2, 3]) {
    test(`seed ${seed}: after the restart no changed block is missing`, async () => {
      const dir = tempDir('devfilter-cbt-crash-');
      const size = 128 * MiB;
      const blocks = size / BLOCK;
      let d: CbtDaemon | undefined;
      try {
        d = await startCbtDaemon({ dir: dir.path, size, blockSize: BLOCK });
        const rand = prng(seed);
        const c = await NbdClient.fromUri(d.uri(), { metaContexts: [] });
        for (let i = 0; i < 8; i++)
          await c.write(Math.floor(rand() * blocks) * BLOCK, Buffer.alloc(BLOCK, 0x5a));
        await c.flush();
        const early = await d.cmd<ChangedReply>('changed', { since: 1 });
        const { current: g } = await d.cmd<{ current: number }>('generation');
        const id = (await d.status<CbtStatus>()).id;
        // Nothing is in flight: the image now is what generation g starts from.
        const base = readFileSync(d.image);

        const issued = new Set<number>();
        const acked = new Set<number>();
        let stop = false;
        const loops = Array.from({ length: 8 }, async (_, j) => {
          const r = prng(seed * 100 + j);
          while (!stop) {
            const offset = Math.floor(r() * (size / 4096)) * 4096;
            const length = Math.min(size - offset, 4096 * (1 + Math.floor(r() * 48)));
            const span = blocksIn(offset, length);
            for (const b of span) issued.add(b);
            const kind = r();
            try {
              if (kind < 0.8) await c.write(offset, randomBytes(r, length));
              else if (kind < 0.9) await c.trim(offset, length);
              else await c.writeZeroes(offset, length);
            } catch {
              return; // the daemon is gone
            }
            for (const b of span) acked.add(b);
          }
        });
        await new Promise((res) => setTimeout(res, 150 + Math.floor(rand() * 400)));
        await d.kill9();
        stop = true;
        await Promise.all(loops);
        c.close();
        assert.ok(acked.size > 0, 'some writes were acknowledged before the kill');

        d = await startCbtDaemon({ dir: dir.path, size, blockSize: BLOCK });
        const s = await d.status<CbtStatus>();
        assert.equal(s.id, id, 'the history goes on (same id)');
        assert.ok(s.persistence.recovered, 'the restart saw the crash');
        assert.ok(s.generation >= g);
        const reported = changedBlocks(await d.cmd<ChangedReply>('changed', { since: g }), BLOCK);
        const image = readFileSync(d.image);
        const missing: number[] = [];
        let differing = 0;
        for (let b = 0; b < blocks; b++) {
          const was = base.subarray(b * BLOCK, (b + 1) * BLOCK);
          const now = image.subarray(b * BLOCK, (b + 1) * BLOCK);
          const changed = !was.equals(now);
          if (changed) differing++;
          if ((changed || acked.has(b)) && !reported.has(b)) missing.push(b);
        }
        const beyondIssued = [...reported].filter((b) => !issued.has(b));
        process.stdout.write(
          `# cbt crash seed ${seed}: ${issued.size} blocks issued, ${acked.size} acknowledged, ${differing} differ on disk, ${reported.size} reported (${reported.size - acked.size} more than acknowledged), ${missing.length} missing, replayed ${s.persistence.replayedRecords} records\n`,
        );
        assert.deepEqual(missing, [], 'changed blocks missing from the map');
        assert.deepEqual(beyondIssued, [], 'only blocks of requests that were sent are reported');
        // What changed before generation g is still there too.
        const all = changedBlocks(await d.cmd<ChangedReply>('changed', { since: 1 }), BLOCK);
        for (const b of changedBlocks(early, BLOCK)) assert.ok(all.has(b), `early block ${b}`);
      } finally {
        await d?.stop();
        dir.cleanup();
      }
    });
  }
});

describe('over NBD and the CLI', () => {
  const dir = tempDir('devfilter-cbt-nbd-');
  let d: CbtDaemon;
  const cli = (args: string[]): ReturnType<typeof run> =>
    run(process.execPath, [CLI, ...args], {
      env: { ...process.env, DEVFILTER_CONTROL: d.control },
      timeoutMs: 30_000,
    });

  before(async () => {
    d = await startCbtDaemon({ dir: dir.path, size: 16 * MiB, blockSize: BLOCK });
    const c = await NbdClient.fromUri(d.uri(), { metaContexts: [] });
    await c.write(BLOCK, Buffer.alloc(512, 1)); // block 1
    await c.write(5 * BLOCK - 512, Buffer.alloc(1024, 1)); // blocks 4 and 5
    await d.cmd('generation');
    await c.writeZeroes(9 * BLOCK, 2 * BLOCK); // blocks 9, 10 in generation 2
    await c.disconnect();
  });
  after(async () => {
    await d.stop();
    dir.cleanup();
  });

  /** Parses `nbdinfo --map` lines: offset, length, state. */
  function parseMap(out: string): Array<[number, number, number]> {
    return out
      .trim()
      .split('\n')
      .map((line) => {
        const [o, l, s] = line.trim().split(/\s+/);
        return [Number(o), Number(l), Number(s)];
      });
  }

  test('nbdinfo --map=qemu:dirty-bitmap:NAME lists the changed extents', async (t) => {
    if (!requireTools(t, 'nbdinfo')) return;
    let r = await run('nbdinfo', ['--map=qemu:dirty-bitmap:cbt0', d.uri()]);
    assert.equal(r.code, 0, r.stderr);
    assert.deepEqual(parseMap(r.stdout), [
      [0, 9 * BLOCK, 0],
      [9 * BLOCK, 2 * BLOCK, 1],
      [11 * BLOCK, 16 * MiB - 11 * BLOCK, 0],
    ]);
    assert.match(r.stdout, /dirty/);
    r = await run('nbdinfo', ['--map=devfilter:cbt:cbt0:since:1', d.uri()]);
    assert.equal(r.code, 0, r.stderr);
    assert.deepEqual(parseMap(r.stdout), [
      [0, BLOCK, 0],
      [BLOCK, BLOCK, 1],
      [2 * BLOCK, 2 * BLOCK, 0],
      [4 * BLOCK, 2 * BLOCK, 1],
      [6 * BLOCK, 3 * BLOCK, 0],
      [9 * BLOCK, 2 * BLOCK, 1],
      [11 * BLOCK, 16 * MiB - 11 * BLOCK, 0],
    ]);
    // The contexts are listed to clients that ask.
    r = await run('nbdinfo', ['--json', d.uri()]);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /qemu:dirty-bitmap:cbt0/);
    assert.match(r.stdout, /devfilter:cbt:cbt0/);
  });

  test('the qemu bitmap can be pointed at an older generation (bitmap since=N)', async (t) => {
    if (!requireTools(t, 'nbdinfo')) return;
    await d.cmd('bitmap', { since: 1 });
    try {
      const r = await run('nbdinfo', ['--map=qemu:dirty-bitmap:cbt0', d.uri()]);
      assert.equal(r.code, 0, r.stderr);
      assert.equal(parseMap(r.stdout).filter(([, , s]) => s === 1).length, 3);
    } finally {
      await d.cmd('bitmap', { since: 'current' });
    }
  });

  test('qemu-img reads the dirty bitmap the way QEMU backup tools do (x-dirty-bitmap)', async (t) => {
    if (!requireTools(t, 'qemu-img')) return;
    const r = await run('qemu-img', [
      'map',
      '--output=json',
      '--image-opts',
      `driver=nbd,server.type=unix,server.path=${d.socket},export=disk,x-dirty-bitmap=qemu:dirty-bitmap:cbt0`,
    ]);
    assert.equal(r.code, 0, r.stderr);
    // With x-dirty-bitmap, QEMU shows dirty extents as "data": false (the inverted sense).
    const map = JSON.parse(r.stdout) as Array<{ start: number; length: number; data: boolean }>;
    const dirty = map.filter((e) => !e.data).map((e) => [e.start, e.length]);
    assert.deepEqual(dirty, [[9 * BLOCK, 2 * BLOCK]]);
  });

  test('commands through devfilter filter control', async () => {
    let r = await cli(['filter', 'control', 'disk', 'cbt0', 'changed', 'since=1', '--json']);
    assert.equal(r.code, 0, r.stderr);
    const changed = JSON.parse(r.stdout) as ChangedReply;
    assert.deepEqual(changed.extents, [
      { offset: BLOCK, length: BLOCK },
      { offset: 4 * BLOCK, length: 2 * BLOCK },
      { offset: 9 * BLOCK, length: 2 * BLOCK },
    ]);
    assert.equal(changed.bytes, 5 * BLOCK);

    r = await cli(['filter', 'control', 'disk', 'cbt0', 'changed', 'since=1', 'limit=2', '--json']);
    const limited = JSON.parse(r.stdout) as ChangedReply;
    assert.equal(limited.extents.length, 2);
    assert.equal(limited.next, 9 * BLOCK);

    r = await cli([
      'filter',
      'control',
      'disk',
      'cbt0',
      'mark-dirty',
      `offset=${14 * BLOCK}`,
      'length=1',
      '--json',
    ]);
    assert.equal(r.code, 0, r.stderr);
    assert.equal((JSON.parse(r.stdout) as { newlyMarkedBlocks: number }).newlyMarkedBlocks, 1);

    r = await cli(['filter', 'control', 'disk', 'cbt0', 'generation', '--json']);
    const g = JSON.parse(r.stdout) as { previous: number; current: number; id: string };
    assert.equal(g.current, g.previous + 1);

    r = await cli(['filter', 'status', 'disk', 'cbt0']);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, new RegExp(`id: ${g.id}`));
    assert.match(r.stdout, /generation: 3/);
    assert.match(r.stdout, /mode: journal/);

    r = await cli(['filter', 'control', 'disk', 'cbt0', 'changed', 'since=1', 'id=nope']);
    assert.equal(r.code, 2);
    assert.match(r.stderr, /history was reset.*full backup/);
    r = await cli(['filter', 'control', 'disk', 'cbt0', 'bogus']);
    assert.equal(r.code, 2);
    assert.match(r.stderr, /cbt has no command "bogus"/);
    r = await cli(['filter', 'control', 'disk', 'cbt0', 'mark-dirty', 'offset=0']);
    assert.equal(r.code, 2);
    assert.match(r.stderr, /length/);
  });

  test('bad arguments are refused with a clear message', async () => {
    const create = (...args: string[]): ReturnType<typeof run> =>
      cli(['filter', 'create', 'disk', 'cbt', '--name', 'bad', ...args]);
    let r = await create('--arg', 'blockSize=3000');
    assert.notEqual(r.code, 0);
    assert.match(r.stderr, /blockSize must be a power of two from 4096/);
    r = await create('--arg', 'blockSize=2K');
    assert.match(r.stderr, /blockSize must be a power of two from 4096 .* got 2048/);
    r = await create('--arg', `dir=${join(dir.path, 'no-such-dir')}`);
    assert.notEqual(r.code, 0);
    assert.match(r.stderr, /dir .*no-such-dir does not exist/);
    r = await create('--arg', 'blocksize=64K');
    assert.equal(r.code, 2);
    assert.match(r.stderr, /unknown argument "blocksize"/);
    // The same state directory cannot be attached twice.
    r = await cli([
      'filter',
      'create',
      'disk',
      'cbt',
      '--name',
      'cbt0-again',
      '--arg',
      `dir=${join(dir.path, 'state')}`,
    ]);
    assert.equal(r.code, 0, 'another name is another state directory');
    r = await cli(['filter', 'remove', 'disk', 'cbt0-again', '--policy', 'drop']);
    assert.equal(r.code, 0, r.stderr);
  });
});
