/**
 * `devfilter interpose attach|detach`: puts filters in front of a live device-mapper device
 * and takes them away again, with its file system mounted (docs/interpose.md).
 *
 * Attach: read the live table (linear targets only); start a dedicated `devfilter serve`
 * whose one export reproduces that table over the same underlying devices, with the filters
 * already on it; connect a kernel NBD device to it; then suspend the dm device (in-flight I/O
 * drains, the file system is flushed and frozen), drop the underlying devices' page cache
 * (the daemon's reads so far may be stale), load a table that maps the same sectors onto the
 * NBD device, and resume. Any failure before the resume drops the new table and resumes the
 * original one: the file system never notices.
 *
 * Detach: suspend, flush the NBD device (the daemon's writes reach the disk), load the
 * original table, resume; then disconnect the NBD device and stop the daemon, which flushes
 * and closes the underlying devices.
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { LinearSegment } from '../backends/linear.js';
import { dropPageCache } from '../backends/libc.js';
import { SECTOR, parseLinearTable, singleLinearTable } from './dm-table.js';
import {
  NBD_MAJOR,
  blockGeometry,
  blockName,
  dmsetup,
  freeNbdDevice,
  isSuspended,
  majMin,
  nbdAttached,
  nbdReady,
  resolveDm,
  runTool,
  waitUntil,
} from './host.js';
import {
  readState,
  removeState,
  stateDir,
  writeState,
  type InterposeFilter,
  type InterposeState,
} from './state.js';

const CLI = fileURLToPath(new URL('../cli/main.js', import.meta.url));

export interface AttachOptions {
  stateRoot: string;
  filters: InterposeFilter[];
  /** How long the daemon may take to start, and the NBD device to appear. */
  timeoutMs: number;
  /** Progress lines for the user. */
  say: (line: string) => void;
}

/**
 * A test hook, documented in docs/interpose.md: DEVFILTER_INTERPOSE_FAIL=after-suspend
 * disconnects the NBD device right after the suspend, so that loading the new table fails for
 * real (the device it names has gone) and the rollback path runs.
 */
async function injectedFailure(where: string, nbd: string): Promise<void> {
  if (process.env.DEVFILTER_INTERPOSE_FAIL !== where) return;
  await runTool('nbd-client', ['-d', `/dev/${nbd}`]);
  await waitUntil(() => !nbdAttached(nbd), 10_000, `/dev/${nbd} stayed attached`);
}

export async function attach(dev: string, o: AttachOptions): Promise<InterposeState> {
  if (process.getuid?.() !== 0) throw new Error('interpose needs root (device-mapper, nbd)');
  const { name, block } = resolveDm(dev);
  if ((await readState(o.stateRoot, name)) !== null)
    throw new Error(
      `${name} is already interposed (state in ${stateDir(o.stateRoot, name)}): detach it first`,
    );
  const originalTable = (await dmsetup('table', name)).trim();
  const targets = parseLinearTable(originalTable);
  const segments: LinearSegment[] = targets.map((t) => {
    const under = blockName(t.device);
    if (t.device.split(':')[0] === String(NBD_MAJOR) || under.startsWith('nbd'))
      throw new Error(`${name} already maps onto an NBD device (${under}): interposed already?`);
    return {
      start: t.start * SECTOR,
      length: t.length * SECTOR,
      path: `/dev/${under}`,
      offset: t.offset * SECTOR,
    };
  });
  const { sectors, logicalBlockSize } = blockGeometry(block);
  const dir = stateDir(o.stateRoot, name);
  const state: InterposeState = {
    version: 1,
    dmName: name,
    dmBlock: block,
    originalTable,
    sectors,
    logicalBlockSize,
    segments,
    exportName: name,
    socket: join(dir, 'nbd.sock'),
    control: join(dir, 'control.sock'),
    log: join(dir, 'daemon.log'),
    filters: o.filters,
    phase: 'starting',
  };
  await writeState(o.stateRoot, state);
  o.say(`${name}: table of ${targets.length} linear target(s), ${sectors} sectors`);
  try {
    state.pid = await startDaemon(state, o.timeoutMs);
    await writeState(o.stateRoot, state);
    o.say(`${name}: devfilter serving it (pid ${state.pid}, control ${state.control})`);
    state.nbd = freeNbdDevice();
    await runTool('nbd-client', [
      '-u',
      '-N',
      state.exportName,
      state.socket,
      `/dev/${state.nbd}`,
      '-b',
      String(logicalBlockSize),
    ]);
    state.phase = 'connected';
    await writeState(o.stateRoot, state);
    await waitUntil(
      () => nbdReady(state.nbd!, sectors),
      o.timeoutMs,
      `/dev/${state.nbd} did not show ${sectors} sectors`,
    );
    o.say(`${name}: /dev/${state.nbd} connected`);
    state.phase = 'swapping';
    await writeState(o.stateRoot, state);
    await swap(name, singleLinearTable(sectors, majMin(state.nbd)), segments, state.nbd, sectors);
  } catch (err) {
    await undoAttach(state, o).catch((e: unknown) =>
      o.say(`${name}: cleaning up after the failure failed too: ${(e as Error).message}`),
    );
    throw err;
  }
  state.phase = 'attached';
  state.attachedAt = new Date().toISOString();
  await writeState(o.stateRoot, state);
  o.say(`${name}: interposed; its I/O now flows through devfilter`);
  return state;
}

/**
 * Suspends, loads `table`, resumes. Before the resume, a failure drops the new table and
 * resumes the old one, and is thrown. The underlying devices' page cache is dropped while the
 * device is suspended: what was cached before may be stale, and nothing writes there now.
 */
async function swap(
  name: string,
  table: string,
  segments: LinearSegment[],
  nbd: string,
  sectors: number,
): Promise<void> {
  await dmsetup('suspend', name);
  try {
    await injectedFailure('after-suspend', nbd);
    for (const path of new Set(segments.map((s) => s.path))) await dropCache(path);
    await dmsetup('load', name, '--table', table);
    // device-mapper takes a table over an NBD device that has lost its connection (the size
    // it checks may still be the old one): look at the connection itself before resuming.
    if (!nbdAttached(nbd) || !nbdReady(nbd, sectors))
      throw new Error(`/dev/${nbd} lost its connection to devfilter before the resume`);
    await dmsetup('resume', name);
  } catch (err) {
    await dmsetup('clear', name).catch(() => undefined);
    if (await isSuspended(name).catch(() => true)) await dmsetup('resume', name);
    throw new Error(
      `${(err as Error).message}\nthe original table of ${name} is back in place and the device resumed`,
      { cause: err },
    );
  }
}

async function dropCache(path: string): Promise<void> {
  const fd = fs.openSync(path, fs.constants.O_RDONLY);
  try {
    await dropPageCache(fd);
  } finally {
    fs.closeSync(fd);
  }
}

/** Undoes an attach that did not finish: NBD device, daemon, state. */
async function undoAttach(state: InterposeState, o: AttachOptions): Promise<void> {
  if (state.nbd !== undefined && nbdAttached(state.nbd))
    await runTool('nbd-client', ['-d', `/dev/${state.nbd}`]).catch(() => undefined);
  if (state.pid !== undefined) await stopDaemon(state.pid, o.timeoutMs);
  await removeState(o.stateRoot, state.dmName);
}

/** Starts `devfilter interpose serve` in the background; resolves once its socket answers. */
async function startDaemon(state: InterposeState, timeoutMs: number): Promise<number> {
  const log = fs.openSync(state.log, 'a', 0o600);
  const child = spawn(
    process.execPath,
    [CLI, 'interpose', 'serve', '--state', join(dirname(state.log), 'state.json')],
    { detached: true, stdio: ['ignore', log, log] },
  );
  fs.closeSync(log);
  child.unref();
  const pid = child.pid!;
  let exited: number | null = null;
  child.once('exit', (code) => (exited = code ?? -1));
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (exited !== null)
      throw new Error(`the devfilter daemon exited with ${String(exited)}:\n${tail(state.log)}`);
    if (await answers(state.socket)) return pid;
    if (Date.now() > deadline) {
      process.kill(pid, 'SIGKILL');
      throw new Error(`the devfilter daemon did not start in ${timeoutMs} ms:\n${tail(state.log)}`);
    }
    await new Promise((r) => setTimeout(r, 100));
  }
}

function tail(path: string): string {
  try {
    return fs.readFileSync(path, 'utf8').split('\n').slice(-40).join('\n');
  } catch {
    return '(no log)';
  }
}

function answers(path: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.connect(path);
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

/** SIGTERM (the daemon drains, flushes and closes), then SIGKILL after the timeout. */
async function stopDaemon(pid: number, timeoutMs: number): Promise<void> {
  if (!alive(pid)) return;
  process.kill(pid, 'SIGTERM');
  try {
    await waitUntil(() => !alive(pid), timeoutMs, `daemon ${pid} did not stop`);
  } catch {
    process.kill(pid, 'SIGKILL');
  }
}

export interface DetachOptions {
  stateRoot: string;
  timeoutMs: number;
  say: (line: string) => void;
}

export async function detach(dev: string, o: DetachOptions): Promise<void> {
  if (process.getuid?.() !== 0) throw new Error('interpose needs root (device-mapper, nbd)');
  const name = dev.includes('/') ? resolveDm(dev).name : dev;
  const state = await readState(o.stateRoot, name);
  if (state === null) throw new Error(`${name} is not interposed (no state in ${o.stateRoot})`);
  state.phase = 'detaching';
  await writeState(o.stateRoot, state);
  const live = (await dmsetup('table', name)).trim();
  if (live !== state.originalTable) {
    const nbdTable =
      state.nbd === undefined ? '' : singleLinearTable(state.sectors, majMin(state.nbd));
    if (live !== nbdTable)
      throw new Error(
        `${name}'s table is neither the original nor devfilter's; not touching it:\n${live}`,
      );
    await dmsetup('suspend', name);
    try {
      // Whatever the daemon wrote goes to the disk before the disk is used directly again.
      if (state.nbd !== undefined && nbdAttached(state.nbd))
        await runTool('blockdev', ['--flushbufs', `/dev/${state.nbd}`]);
      for (const path of new Set(state.segments.map((s) => s.path))) await dropCache(path);
      await dmsetup('load', name, '--table', state.originalTable);
      await dmsetup('resume', name);
    } catch (err) {
      await dmsetup('clear', name).catch(() => undefined);
      if (await isSuspended(name).catch(() => true)) await dmsetup('resume', name);
      throw new Error(
        `${(err as Error).message}\n${name} still runs through devfilter; nothing was lost`,
        { cause: err },
      );
    }
    o.say(`${name}: original table back in place`);
  }
  if (state.nbd !== undefined && nbdAttached(state.nbd)) {
    await runTool('nbd-client', ['-d', `/dev/${state.nbd}`]);
    await waitUntil(
      () => !nbdAttached(state.nbd!),
      o.timeoutMs,
      `/dev/${state.nbd} stayed attached`,
    );
  }
  if (state.pid !== undefined) await stopDaemon(state.pid, o.timeoutMs);
  await removeState(o.stateRoot, name);
  o.say(`${name}: devfilter detached`);
}
