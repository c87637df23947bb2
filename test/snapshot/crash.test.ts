/**
 * Crash: a child process runs writes, trims and zeroing with snapshots live (crash-child.ts)
 * and is killed with SIGKILL at a random moment. Reopening its store must give, for every
 * snapshot it lists, exactly the content at that snapshot's instant — a snapshot may be
 * missing (killed while taking it) but never wrong — and the origin must hold every
 * acknowledged operation. Copy-before-write then goes on correctly from the recovered maps.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { tempDir } from '../helpers/server.js';
import { pattern } from '../filters/fixture.js';
import {
  CHUNK,
  SIZE,
  WORKERS,
  applyOp,
  contentAt,
  initialContent,
  phaseOps,
} from './crash-plan.js';
import { Rng, firstDiff, readAll, readAllNbd, seedFromEnv, startSnapFixture } from './fixture.js';
import { resolve, type Op } from './model.js';

const SEED = seedFromEnv();
const ROUNDS = 3;
const CHILD = new URL('./crash-child.js', import.meta.url).pathname;

interface Acks {
  took: Set<number>;
  /** Highest acknowledged op index per "phase worker". */
  acked: Map<string, number>;
  done: Set<number>;
}

function readAcks(path: string): Acks {
  const acks: Acks = { took: new Set(), acked: new Map(), done: new Set() };
  if (!existsSync(path)) return acks;
  for (const line of readFileSync(path, 'utf8').split('\n')) {
    const [what, a, b, c] = line.split(' ');
    if (what === 'took') acks.took.add(Number(a));
    else if (what === 'done') acks.done.add(Number(a));
    else if (what === 'ack')
      acks.acked.set(`${a} ${b}`, Math.max(acks.acked.get(`${a} ${b}`) ?? -1, Number(c)));
  }
  return acks;
}

async function killAtRandom(dir: string, seed: number, delayMs: number): Promise<void> {
  const child = spawn(process.execPath, [CHILD, dir, String(seed)], {
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  let stderr = '';
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<void>((res) => child.on('exit', () => res()));
  const acks = join(dir, 'acks.log');
  const started = performance.now();
  // Wait until the first snapshot is taken, then let it run for a while and kill it.
  while (!readAcks(acks).took.has(0)) {
    if (child.exitCode !== null) throw new Error(`crash child exited early: ${stderr}`);
    if (performance.now() - started > 20_000)
      throw new Error(`crash child never took a snapshot: ${stderr}`);
    await new Promise((r) => setTimeout(r, 10));
  }
  await new Promise((r) => setTimeout(r, delayMs));
  child.kill('SIGKILL');
  await exited;
  assert.equal(child.signalCode, 'SIGKILL', `the child was killed, not finished: ${stderr}`);
}

/** The origin after the kill: every acknowledged op; of the ones in flight, any prefix. */
function originExpectation(seed: number, acks: Acks, origin: Buffer): Buffer {
  const last = Math.max(...acks.took);
  const base = contentAt(seed, last);
  const inFlight: Op[] = [];
  for (let w = 0; w < WORKERS; w++) {
    const ops = phaseOps(seed, last, w);
    const n = (acks.acked.get(`${last} ${w}`) ?? -1) + 1;
    for (let i = 0; i < n; i++) applyOp(base, ops[i]!);
    const next = ops[n];
    if (next !== undefined) inFlight.push({ conn: w, ...next, issued: 0, acked: null });
  }
  return resolve(base, inFlight, origin, `seed ${seed}: origin`);
}

test(`snapshots after kill -9 are intact, never wrong (seed ${SEED})`, async (t) => {
  const rng = new Rng(SEED);
  for (let round = 0; round < ROUNDS; round++) {
    const seed = (SEED + round) >>> 0;
    const dir = tempDir('devfilter-snap-crash-');
    try {
      writeFileSync(join(dir.path, 'origin.img'), initialContent(seed));
      await killAtRandom(dir.path, seed, rng.between(50, 900));
      const acks = readAcks(join(dir.path, 'acks.log'));

      const fx = await startSnapFixture(
        [{ name: 'disk', size: SIZE, backend: 'file', path: join(dir.path, 'origin.img') }],
        { dir: dir.path },
      );
      try {
        const snap = await fx.attach('disk', { chunkSize: CHUNK });
        const st = snap.status() as { recovery: { unclean: boolean; droppedRecords: number } };
        assert.equal(st.recovery.unclean, true, 'the kill is recognised');
        const listed = snap.list();
        assert.ok(listed.length > 0, `seed ${seed}: snapshots survive`);
        for (const s of listed) {
          assert.equal(
            s.state,
            'active',
            `seed ${seed}: ${s.name} is intact after the crash (${s.reason})`,
          );
          const want = contentAt(seed, Number(s.name.slice(1)));
          const got = await readAll(snap.image(s.name)!);
          assert.ok(
            got.equals(want),
            `seed ${seed}: image ${s.name} differs at ${firstDiff(got, want)}`,
          );
        }
        // Every snapshot the child saw taken and did not delete is there.
        const top = Math.max(...acks.took);
        for (const p of acks.took) {
          if (p > top - 6)
            assert.ok(
              listed.some((s) => s.name === `p${p}`),
              `seed ${seed}: p${p} was taken and acknowledged`,
            );
        }
        const origin = await readAll(fx.backend('disk'));
        originExpectation(seed, acks, origin);

        // Copy-before-write goes on from the recovered maps: overwrite everything.
        const c = await fx.connect('disk');
        await c.write(0, pattern(SIZE, seed + 1));
        const newest = listed[listed.length - 1]!;
        const want = contentAt(seed, Number(newest.name.slice(1)));
        const ic = await fx.connect(`disk@${newest.name}`);
        assert.ok(
          (await readAllNbd(ic)).equals(want),
          `seed ${seed}: ${newest.name} after more writes`,
        );
        t.diagnostic(
          `round ${round}: took ${acks.took.size} snapshot(s), ${listed.length} listed, dropped ${st.recovery.droppedRecords} record(s)`,
        );
      } finally {
        await fx.close();
      }
    } finally {
      dir.cleanup();
    }
  }
});
