/**
 * Crash harness: runs `devfilter serve` as a child process, drives a seeded random workload
 * through a real NBD client (writes with and without FUA, flushes, trims, zeroes), records
 * what was acknowledged, kills the daemon with SIGKILL at a random moment — optionally while
 * another client churns the filter stack through the control plane — restarts it and checks
 * that every write that was durable (FUA, or acknowledged before a completed FLUSH) is there.
 *
 * Blocks are never written concurrently with themselves, so each block's possible contents
 * after the crash are exactly: its last durable version or any version written after it.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { NbdClient } from '../../src/nbd/client.js';
import { RequestFlags } from '../../src/core/device.js';
import { callOnce } from '../../src/control/client.js';
import { CLI, canConnect, tempDir } from '../helpers/server.js';

export const BLOCK = 4096;

export interface RoundOptions {
  seed: number;
  /** Export size in blocks. */
  blocks?: number;
  /** Filters declared in the config file, top → bottom. */
  filters?: Array<{ type: string; name?: string; args?: Record<string, unknown> }>;
  /** Create and remove filters through the control plane while the workload runs. */
  churn?: boolean;
  /** Requests in flight at once. */
  depth?: number;
  /** Kill after this many ms (default: seeded, 100–600). */
  killAfterMs?: number;
  /**
   * Keep taking (and deleting) snapshots while the workload runs, with a `snapshot` filter at
   * the bottom of the stack; after the restart every snapshot that exists must be intact or
   * failed, and every acknowledged take must still exist.
   */
  snapshots?: boolean;
  /**
   * Keep making cdp marks while the workload runs, with a `cdp` filter at the bottom of the
   * stack; after the restart every acknowledged mark must be listed, and its view must read a
   * content allowed at its instant, as a snapshot image must.
   */
  cdp?: boolean;
  /**
   * A sync-mode `mirror` filter to a second file, and a cutover at a random moment: the kill
   * may land before, during or after it. After the restart on the same config the daemon must
   * refuse the source if a cutover may have switched (its record says so) — then the target is
   * checked instead — and must refuse it whenever the cutover was acknowledged.
   */
  cutover?: boolean;
}

export interface RoundResult {
  /** The daemon refused the old source after the restart: the target was checked. */
  cutOver?: boolean;
  /** Cutovers refused (nothing changed) before one went through or the kill came. */
  cutoverRefusals?: number;
  seed: number;
  requests: number;
  acknowledged: number;
  durableBlocks: number;
  stackChanges: number;
  lost: string[];
  /** Snapshots checked after the restart: intact, and failed (with their reasons). */
  snapshotsIntact: number;
  snapshotsFailed: string[];
}

/** mulberry32: small, seedable, good enough to pick offsets and sizes. */
export function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** What a block may hold: a version's data, zeros, or anything (after a trim). */
type Content = { kind: 'data'; version: number } | { kind: 'zero' } | { kind: 'any' };

interface Version {
  content: Content;
  acked: boolean;
}

/** Block content of a version: a header naming block and version, then filler from both. */
function blockData(block: number, version: number): Buffer {
  const buf = Buffer.allocUnsafe(BLOCK);
  for (let i = 0; i < BLOCK; i += 8) {
    buf.writeUInt32LE(block, i);
    buf.writeUInt32LE(version, i + 4);
  }
  return buf;
}

function matches(actual: Buffer, block: number, c: Content): boolean {
  if (c.kind === 'any') return true;
  if (c.kind === 'zero') return actual.every((b) => b === 0);
  return actual.equals(blockData(block, c.version));
}

/**
 * A snapshot take seen by the workload. Per block, the image may hold any version from the
 * last one acknowledged when the take was called up to (not including) the first one issued
 * after it returned — or, for a take cut short by the kill, any version issued at all.
 */
interface Take {
  name: string;
  /** history index of each block's last acknowledged version when the take was called. */
  from: Int32Array;
  /** history length of each block when the take returned; undefined if it never did. */
  until?: Int32Array;
  /** A delete was sent: the snapshot may be gone. */
  deleting?: boolean;
}

interface Daemon {
  child: ChildProcess;
  exited: Promise<void>;
  stderr: () => string;
}

async function startDaemon(
  dir: string,
  image: string,
  blocks: number,
  opts: RoundOptions,
): Promise<Daemon> {
  const config = join(dir, 'devfilter.yaml');
  const socket = join(dir, 'nbd.sock');
  const filters = [...(opts.filters ?? [])];
  if (opts.cutover)
    filters.push({
      type: 'mirror',
      name: 'mirror',
      args: { target: join(dir, 'target.img'), mode: 'sync', stateDir: join(dir, 'mirror') },
    });
  // Declared in the config so that a restarted daemon re-attaches it before serving anyone.
  if (opts.snapshots) filters.push({ type: 'snapshot', args: { store: join(dir, 'store') } });
  if (opts.cdp) filters.push({ type: 'cdp', name: 'cdp', args: { dir: join(dir, 'journal') } });
  writeFileSync(
    config,
    JSON.stringify({
      socket,
      control: join(dir, 'control.sock'),
      exports: { disk: { file: image, create: blocks * BLOCK, filters } },
    }),
  );
  const child = spawn(process.execPath, [CLI, 'serve', '--config', config, '--log-level', 'warn'], {
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  let err = '';
  child.stderr!.on('data', (d: Buffer) => (err += d.toString()));
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  const deadline = Date.now() + 20_000;
  // After a kill -9 the old socket files are still there: wait until the new daemon answers.
  while (!(await canConnect(socket)) || !(await canConnect(join(dir, 'control.sock')))) {
    if (child.exitCode !== null) throw new Error(`daemon exited ${child.exitCode}: ${err}`);
    if (Date.now() > deadline) throw new Error(`daemon did not start: ${err}`);
    await sleep(20);
  }
  return { child, exited, stderr: () => err };
}

/**
 * After the restart: every acknowledged take is listed (unless deleted), and every listed
 * snapshot is failed with a reason or reads exactly a content allowed at its instant.
 */
async function checkSnapshots(
  dir: string,
  takes: Take[],
  history: Version[][],
): Promise<{ intact: number; failed: string[]; wrong: string[] }> {
  const control = join(dir, 'control.sock');
  const listed = (
    (await callOnce(control, 'snapshot.list', { export: 'disk' })) as {
      snapshots: Array<{ name: string; state: string; reason?: string | null; image: string }>;
    }
  ).snapshots;
  const wrong: string[] = [];
  const failed: string[] = [];
  let intact = 0;
  for (const take of takes) {
    const s = listed.find((x) => x.name === take.name);
    if (s === undefined) {
      // Only a take cut short by the kill, or one deleted on purpose, may be missing.
      if (take.until !== undefined && !take.deleting)
        wrong.push(`snapshot ${take.name}: acknowledged, missing after the restart`);
      continue;
    }
    if (s.state === 'failed') {
      if (!s.reason) wrong.push(`snapshot ${take.name}: failed without a reason`);
      failed.push(`${take.name}: ${s.reason}`);
      continue;
    }
    const bad = await checkImage(dir, s.image, take, history);
    if (bad !== null) wrong.push(`snapshot ${take.name} ${bad}`);
    intact++;
  }
  for (const s of listed) {
    if (!takes.some((t) => t.name === s.name)) wrong.push(`snapshot ${s.name}: never taken`);
  }
  return { intact, failed, wrong };
}

/**
 * Reads export `name` (an image of an instant) block by block; null if every block holds a
 * content allowed at the instant of `take`, else what is wrong with the first that does not.
 */
async function checkImage(
  dir: string,
  name: string,
  take: Take,
  history: Version[][],
): Promise<string | null> {
  const image = await NbdClient.fromUri(
    `nbd+unix:///${encodeURIComponent(name)}?socket=${join(dir, 'nbd.sock')}`,
  );
  try {
    for (let b = 0; b < history.length; b++) {
      const actual = await image.read(b * BLOCK, BLOCK);
      const from = take.from[b]!;
      const until = take.until?.[b] ?? history[b]!.length;
      const candidates: Content[] = from < 0 ? [{ kind: 'zero' }] : [];
      for (const v of history[b]!.slice(Math.max(from, 0), until)) candidates.push(v.content);
      if (!candidates.some((c) => matches(actual, b, c)))
        return (
          `block ${b}: found block ${actual.readUInt32LE(0)} ` +
          `version ${actual.readUInt32LE(4)}, not a content of its instant`
        );
    }
    return null;
  } finally {
    await image.disconnect();
  }
}

/** After the restart: every acknowledged cdp mark is listed, and its view reads its instant. */
async function checkMarks(
  dir: string,
  marks: Take[],
  history: Version[][],
): Promise<{ intact: number; failed: string[]; wrong: string[] }> {
  const control = join(dir, 'control.sock');
  const cmd = (command: string, args: Record<string, unknown> = {}) =>
    callOnce(control, 'filter.control', { export: 'disk', name: 'cdp', command, args });
  const listed = (await cmd('marks')) as Array<{ name: string }>;
  const wrong: string[] = [];
  let intact = 0;
  for (const mark of marks) {
    if (!listed.some((m) => m.name === mark.name)) {
      if (mark.until !== undefined)
        wrong.push(`mark ${mark.name}: acknowledged, missing after the restart`);
      continue;
    }
    const view = (await cmd('view', { mark: mark.name })) as { name: string };
    const bad = await checkImage(dir, view.name, mark, history);
    await cmd('close-view', { name: view.name });
    if (bad !== null) wrong.push(`mark ${mark.name} ${bad}`);
    else intact++;
  }
  for (const m of listed)
    if (!marks.some((t) => t.name === m.name)) wrong.push(`mark ${m.name}: never made`);
  return { intact, failed: [], wrong };
}

export async function crashRound(opts: RoundOptions): Promise<RoundResult> {
  const rand = prng(opts.seed);
  const blocks = opts.blocks ?? 256;
  const depth = opts.depth ?? 8;
  const dir = tempDir('devfilter-crash-');
  const image = join(dir.path, 'disk.img');
  const uri = `nbd+unix:///disk?socket=${join(dir.path, 'nbd.sock')}`;
  const history: Version[][] = Array.from({ length: blocks }, () => []);
  /** Index in history[b] of the newest version known durable (-1: the initial zeros). */
  const durable = new Int32Array(blocks).fill(-1);
  const busy = new Uint8Array(blocks);
  let nextVersion = 1;
  let requests = 0;
  let acknowledged = 0;
  let stackChanges = 0;
  let daemon: Daemon | undefined;
  try {
    if (opts.cutover) {
      writeFileSync(join(dir.path, 'target.img'), '');
      truncateSync(join(dir.path, 'target.img'), blocks * BLOCK);
    }
    daemon = await startDaemon(dir.path, image, blocks, opts);
    const client = await NbdClient.fromUri(uri);
    let killed = false;
    // A cutover takes a few hundred ms (drain, flush, swap): give some rounds time to finish.
    const killAfter =
      opts.killAfterMs ??
      (opts.cutover ? 200 + Math.floor(rand() * 1500) : 100 + Math.floor(rand() * 500));
    // With churn, the clock starts at the first stack change, so every round kills the daemon
    // with the stack changing, however slowly a loaded machine gets there.
    let firstChange!: () => void;
    const changing = new Promise<void>((resolve) => (firstChange = resolve));
    const killer = (opts.churn ? changing : Promise.resolve())
      .then(() => sleep(killAfter))
      .then(() => {
        killed = true;
        daemon!.child.kill('SIGKILL');
      });

    const churn = async (): Promise<void> => {
      const control = join(dir.path, 'control.sock');
      const types = ['stats', 'fault', 'throttle'];
      for (let i = 0; !killed; i++) {
        const type = types[i % types.length]!;
        const args = type === 'throttle' ? { iops: 1_000_000 } : {};
        try {
          await callOnce(control, 'filter.create', {
            export: 'disk',
            type,
            name: `churn-${i}`,
            args,
          });
          stackChanges++;
          firstChange();
          await callOnce(control, 'filter.remove', { export: 'disk', name: `churn-${i}` });
          stackChanges++;
        } catch (err) {
          if (!killed) {
            firstChange(); // do not hold the kill back on a failure we report below
            throw err;
          }
          return; // the daemon is gone
        }
      }
    };

    /** One request on a free run of blocks; returns once it settles (either way). */
    const oneRequest = async (): Promise<void> => {
      const count = 1 + Math.floor(rand() * 4);
      const first = Math.floor(rand() * (blocks - count));
      for (let b = first; b < first + count; b++) if (busy[b]) return;
      const roll = rand();
      if (roll < 0.08) {
        // FLUSH: everything acknowledged before it was sent is durable once it completes.
        const covered = history.map((h) => h.findLastIndex((v) => v.acked));
        requests++;
        await client.flush();
        acknowledged++;
        covered.forEach((i, b) => {
          if (i > durable[b]!) durable[b] = i;
        });
        return;
      }
      for (let b = first; b < first + count; b++) busy[b] = 1;
      try {
        const fua = rand() < 0.3;
        const flags = fua ? RequestFlags.FUA : 0;
        const added: Array<[number, Version]> = [];
        let send: () => Promise<void>;
        if (roll < 0.75) {
          const data = Buffer.allocUnsafe(count * BLOCK);
          for (let b = first; b < first + count; b++) {
            const version = nextVersion++;
            blockData(b, version).copy(data, (b - first) * BLOCK);
            added.push([b, { content: { kind: 'data', version }, acked: false }]);
          }
          send = () => client.write(first * BLOCK, data, flags);
        } else if (roll < 0.88) {
          for (let b = first; b < first + count; b++)
            added.push([b, { content: { kind: 'zero' }, acked: false }]);
          send = () => client.writeZeroes(first * BLOCK, count * BLOCK, flags);
        } else {
          for (let b = first; b < first + count; b++)
            added.push([b, { content: { kind: 'any' }, acked: false }]);
          send = () => client.trim(first * BLOCK, count * BLOCK, flags);
        }
        for (const [b, v] of added) history[b]!.push(v);
        requests++;
        await send();
        acknowledged++;
        for (const [b, v] of added) {
          v.acked = true;
          if (fua) durable[b] = history[b]!.indexOf(v);
        }
      } finally {
        for (let b = first; b < first + count; b++) busy[b] = 0;
      }
    };

    const takes: Take[] = [];
    const snapshotter = async (): Promise<void> => {
      const control = join(dir.path, 'control.sock');
      const live: Take[] = [];
      for (let i = 1; !killed; i++) {
        await sleep(Math.floor(rand() * 80));
        if (killed) return;
        const take: Take = {
          name: `s${i}`,
          from: Int32Array.from(history, (h) => h.findLastIndex((v) => v.acked)),
        };
        takes.push(take);
        try {
          await callOnce(control, 'snapshot.create', { exports: ['disk'], name: take.name });
          take.until = Int32Array.from(history, (h) => h.length);
          live.push(take);
          // Deleting frees copies for reuse: a deleted snapshot that came back after the
          // restart would read reused slots, which the image check below would catch.
          if (live.length > 3 && rand() < 0.5) {
            const victim = live.shift()!;
            victim.deleting = true;
            await callOnce(control, 'snapshot.delete', { export: 'disk', name: victim.name });
          }
        } catch (err) {
          if (!killed) throw err;
          return;
        }
      }
    };

    const marks: Take[] = [];
    const marker = async (): Promise<void> => {
      const control = join(dir.path, 'control.sock');
      for (let i = 1; !killed; i++) {
        await sleep(Math.floor(rand() * 80));
        if (killed) return;
        const mark: Take = {
          name: `m${i}`,
          from: Int32Array.from(history, (h) => h.findLastIndex((v) => v.acked)),
        };
        marks.push(mark);
        try {
          await callOnce(control, 'filter.control', {
            export: 'disk',
            name: 'cdp',
            command: 'mark',
            args: { name: mark.name },
          });
          mark.until = Int32Array.from(history, (h) => h.length);
        } catch (err) {
          if (!killed) throw err;
          return;
        }
      }
    };

    let cutoverAcked = false;
    let cutoverRefusals = 0;
    const cutter = async (): Promise<void> => {
      await sleep(50 + Math.floor(rand() * 300));
      // A cutover refused with nothing changed (writes took the mirror out of sync meanwhile)
      // is an answer an operator gets and retries.
      while (!killed && !cutoverAcked) {
        try {
          await callOnce(join(dir.path, 'control.sock'), 'filter.control', {
            export: 'disk',
            name: 'mirror',
            command: 'cutover',
            args: { wait: 10_000 },
          });
          cutoverAcked = true;
        } catch (err) {
          if (killed) return;
          if (!/nothing changed/.test((err as Error).message)) throw err;
          cutoverRefusals++;
          await sleep(10);
        }
      }
    };

    const worker = async (): Promise<void> => {
      while (!killed) {
        try {
          await oneRequest();
        } catch {
          return; // connection gone: the outcome of that request is unknown, as recorded
        }
      }
    };
    await Promise.all([
      ...Array.from({ length: depth }, worker),
      opts.churn ? churn() : Promise.resolve(),
      opts.snapshots ? snapshotter() : Promise.resolve(),
      opts.cdp ? marker() : Promise.resolve(),
      opts.cutover ? cutter() : Promise.resolve(),
      killer,
    ]);
    await client.close();
    await daemon.exited;

    // Restart on the same file and check every block — or, after a cutover, on the target.
    let cutOver = false;
    if (opts.cutover) {
      try {
        daemon = await startDaemon(dir.path, image, blocks, opts);
      } catch (err) {
        if (!/cut over|cutover/i.test((err as Error).message)) throw err;
        cutOver = true;
        daemon = await startDaemon(dir.path, join(dir.path, 'target.img'), blocks, {
          ...opts,
          cutover: false,
        });
      }
      if (cutoverAcked && !cutOver)
        throw new Error('the cutover was acknowledged, yet the daemon served the old source');
    } else daemon = await startDaemon(dir.path, image, blocks, opts);
    const reader = await NbdClient.fromUri(uri);
    const lost: string[] = [];
    let durableBlocks = 0;
    for (let b = 0; b < blocks; b++) {
      const actual = await reader.read(b * BLOCK, BLOCK);
      const from = durable[b]!;
      if (from >= 0) durableBlocks++;
      const candidates: Content[] = from < 0 ? [{ kind: 'zero' }] : [];
      for (const v of history[b]!.slice(Math.max(from, 0))) candidates.push(v.content);
      if (!candidates.some((c) => matches(actual, b, c))) {
        lost.push(
          `block ${b}: durable version ${JSON.stringify(history[b]![from]?.content ?? 'initial zeros')} ` +
            `missing (found block ${actual.readUInt32LE(0)} version ${actual.readUInt32LE(4)})`,
        );
      }
    }
    await reader.disconnect();
    const checked = opts.snapshots
      ? await checkSnapshots(dir.path, takes, history)
      : opts.cdp
        ? await checkMarks(dir.path, marks, history)
        : { intact: 0, failed: [], wrong: [] };
    lost.push(...checked.wrong);
    return {
      seed: opts.seed,
      cutOver,
      cutoverRefusals,
      requests,
      acknowledged,
      durableBlocks,
      stackChanges,
      lost,
      snapshotsIntact: checked.intact,
      snapshotsFailed: checked.failed,
    };
  } finally {
    if (daemon && daemon.child.exitCode === null) {
      daemon.child.kill('SIGKILL');
      await daemon.exited;
    }
    dir.cleanup();
  }
}
