/**
 * `devfilter interpose attach|detach`: puts filters in front of a live device-mapper device
 * and takes them away again, with its file system mounted (docs/interpose.md).
 *
 * Attach: read the live table (linear targets only, 4 KiB-aligned); start a dedicated
 * `devfilter serve` whose one export reproduces that table over the same underlying devices;
 * connect a kernel NBD device to it; then suspend the dm device (in-flight I/O drains, the
 * file system is flushed and frozen), put the filters on the export (so that a change map or
 * a journal sees every write from here on, and none before is missed), drop the underlying
 * devices' page cache (the daemon's reads so far may be stale), load a table that maps the
 * same sectors onto the NBD device, check the NBD connection, and resume. Any failure before
 * the resume drops the new table and resumes the original one: the file system never
 * notices. Signals that would end the CLI are held while the device is suspended.
 *
 * Detach: suspend, flush through the NBD device (the daemon's writes reach its page cache of
 * the disks, then the disks), sync the underlying devices, drop their cache, load the original
 * table, resume; then disconnect the NBD device and stop the daemon. A device left suspended
 * by an attach or detach that died part way is resumed on its original table first.
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { LinearSegment } from '../backends/linear.js';
import { dropPageCache } from '../backends/libc.js';
import { callOnce } from '../control/client.js';
import { pidAlive, takeLock } from '../core/durable-files.js';
import { makeDirs } from '../core/make-dirs.js';
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

/** Bytes every segment's start, length and offset must be a multiple of. */
const ALIGNMENT = 4096;

/** One attach or detach of a device at a time (a lock file beside its state directory). */
async function lockDevice(root: string, name: string): Promise<() => Promise<void>> {
  await makeDirs(root, 0o700);
  return takeLock(join(root, `${name}.lock`), `interpose of ${name}`);
}

/**
 * Holds SIGINT, SIGTERM and SIGHUP while `fn` runs: a CLI that died with the device
 * suspended would leave the file system frozen (and a load half done). Released after.
 */
async function withSignalsHeld<T>(fn: () => Promise<T>): Promise<T> {
  const held: NodeJS.Signals[] = [];
  const note = (sig: NodeJS.Signals) => held.push(sig);
  const signals: NodeJS.Signals[] = ['SIGINT', 'SIGTERM', 'SIGHUP'];
  for (const sig of signals) process.on(sig, note);
  try {
    return await fn();
  } finally {
    for (const sig of signals) process.off(sig, note);
    if (held.length > 0) process.kill(process.pid, held[0]!);
  }
}

export async function attach(dev: string, o: AttachOptions): Promise<InterposeState> {
  if (process.getuid?.() !== 0) throw new Error('interpose needs root (device-mapper, nbd)');
  const { name } = resolveDm(dev);
  const unlock = await lockDevice(o.stateRoot, name);
  try {
    return await attachLocked(dev, o);
  } finally {
    await unlock();
  }
}

async function attachLocked(dev: string, o: AttachOptions): Promise<InterposeState> {
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
    const seg = {
      start: t.start * SECTOR,
      length: t.length * SECTOR,
      path: `/dev/${under}`,
      offset: t.offset * SECTOR,
    };
    // The daemon writes the disks through their page cache, a page at a time: an edge inside
    // a page would rewrite the neighbour's sectors (another volume) from a cached copy.
    if (seg.start % ALIGNMENT !== 0 || seg.length % ALIGNMENT !== 0 || seg.offset % ALIGNMENT !== 0)
      throw new Error(
        `${name}: target "${t.start} ${t.length} linear ${t.device} ${t.offset}" is not aligned to ${ALIGNMENT} bytes (8 sectors); not interposing:\n${originalTable}`,
      );
    return seg;
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
    const nbd = state.nbd;
    await withSignalsHeld(() =>
      swap(name, singleLinearTable(sectors, majMin(nbd)), segments, nbd, sectors, () =>
        createFilters(state),
      ),
    );
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
  whileSuspended: () => Promise<void>,
): Promise<void> {
  await settleUdev();
  await dmsetup('suspend', name);
  try {
    await injectedFailure('after-suspend', nbd);
    await whileSuspended();
    for (const path of new Set(segments.map((s) => s.path))) await dropCache(path);
    await dmsetup('load', name, '--table', table);
    // device-mapper takes a table over an NBD device that has lost its connection (the size
    // it checks may still be the old one): look at the connection itself before resuming.
    if (!nbdAttached(nbd) || !nbdReady(nbd, sectors))
      throw new Error(`/dev/${nbd} lost its connection to devfilter before the resume`);
    await dmsetup('resume', name);
  } catch (err) {
    // A resume that reported failure may still have swapped: look before undoing anything.
    const live = (await dmsetup('table', name).catch(() => '')).trim();
    if (live === table && !(await isSuspended(name).catch(() => true))) return;
    await dmsetup('clear', name).catch(() => undefined);
    if (await isSuspended(name).catch(() => true)) await dmsetup('resume', name);
    throw new Error(
      `${(err as Error).message}\nthe original table of ${name} is back in place and the device resumed`,
      { cause: err },
    );
  }
}

/** The filters asked for, put on the export while the device is suspended (top first). */
async function createFilters(state: InterposeState): Promise<void> {
  for (const f of state.filters)
    await callOnce(state.control, 'filter.create', {
      export: state.exportName,
      type: f.type,
      args: f.args,
      at: 'bottom',
      ...(f.name !== undefined ? { name: f.name } : {}),
    });
}

/** Lets udev finish probing the new NBD device (its reads could cache stale pages). */
async function settleUdev(): Promise<void> {
  await runTool('udevadm', ['settle', '--timeout=10']).catch(() => undefined);
}

/** fsync(2) of a block device: its dirty pages written, and a flush sent to the device. */
async function syncDevice(path: string): Promise<void> {
  const fd = await fs.promises.open(path, 'r');
  try {
    await fd.sync();
  } finally {
    await fd.close();
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
  if (state.pid !== undefined)
    await stopDaemon(
      state.pid,
      o.timeoutMs,
      join(stateDir(o.stateRoot, state.dmName), 'state.json'),
    );
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

/** Whether `pid` is still the daemon of this state (not a reused pid). */
function isOurDaemon(pid: number, statePath: string): boolean {
  try {
    return fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0').includes(statePath);
  } catch {
    return false;
  }
}

/** SIGTERM (the daemon drains, flushes and closes), then SIGKILL after the timeout. */
async function stopDaemon(pid: number, timeoutMs: number, statePath?: string): Promise<void> {
  if (!pidAlive(pid)) return;
  if (statePath !== undefined && !isOurDaemon(pid, statePath)) return;
  process.kill(pid, 'SIGTERM');
  try {
    await waitUntil(() => !pidAlive(pid), timeoutMs, `daemon ${pid} did not stop`);
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
  const unlock = await lockDevice(o.stateRoot, name);
  try {
    await detachLocked(name, o);
  } finally {
    await unlock();
  }
}

async function detachLocked(name: string, o: DetachOptions): Promise<void> {
  const state = await readState(o.stateRoot, name);
  if (state === null) throw new Error(`${name} is not interposed (no state in ${o.stateRoot})`);
  const statePath = join(stateDir(o.stateRoot, name), 'state.json');
  // An attach or detach that died with the device suspended: drop any half-loaded table and
  // resume what is live, before anything else.
  if (await isSuspended(name)) {
    await dmsetup('clear', name);
    await dmsetup('resume', name);
    o.say(`${name}: was left suspended; resumed on its live table`);
  }
  const live = (await dmsetup('table', name)).trim();
  if (live !== state.originalTable) {
    const nbdTable =
      state.nbd === undefined ? '' : singleLinearTable(state.sectors, majMin(state.nbd));
    if (live !== nbdTable)
      throw new Error(
        `${name}'s table is neither the original nor devfilter's; not touching it:\n${live}`,
      );
    await checkBackendUnchanged(state);
    state.phase = 'detaching';
    await writeState(o.stateRoot, state);
    await withSignalsHeld(async () => {
      await dmsetup('suspend', name);
      try {
        // What the daemon acknowledged reaches the disks before they are used directly
        // again: a flush through the NBD device makes the daemon fdatasync its side, and an
        // fsync of each disk writes whatever is still dirty in their page cache.
        if (state.nbd !== undefined && nbdAttached(state.nbd))
          await syncDevice(`/dev/${state.nbd}`);
        for (const path of new Set(state.segments.map((s) => s.path))) {
          await syncDevice(path);
          await dropCache(path);
        }
        await dmsetup('load', name, '--table', state.originalTable);
        await dmsetup('resume', name);
      } catch (err) {
        const now = (await dmsetup('table', name).catch(() => '')).trim();
        if (now !== state.originalTable || (await isSuspended(name).catch(() => true))) {
          await dmsetup('clear', name).catch(() => undefined);
          if (await isSuspended(name).catch(() => true)) await dmsetup('resume', name);
          throw new Error(
            `${(err as Error).message}\n${name} still runs through devfilter; nothing was lost`,
            { cause: err },
          );
        }
      }
    });
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
  if (state.pid !== undefined) await stopDaemon(state.pid, o.timeoutMs, statePath);
  await removeState(o.stateRoot, name);
  o.say(`${name}: devfilter detached`);
}

/**
 * Refuses to detach when the export no longer runs on the original devices (a mirror cut it
 * over elsewhere): putting the original table back would show the data as it was before.
 */
async function checkBackendUnchanged(state: InterposeState): Promise<void> {
  let backend: unknown;
  try {
    backend = (
      (await callOnce(state.control, 'export.status', { export: state.exportName })) as {
        backend?: unknown;
      }
    ).backend;
  } catch {
    return; // the daemon is gone: its backend cannot have moved since
  }
  if (typeof backend === 'string' && !backend.startsWith('linear:'))
    throw new Error(
      `${state.dmName}'s export now runs on ${backend} (a cutover?): the original table would show stale data; not detaching`,
    );
}
