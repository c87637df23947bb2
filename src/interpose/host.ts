/**
 * What `devfilter interpose` asks of the machine: dmsetup and nbd-client (run without a
 * shell, with a time limit, their stderr in the error), and facts from /sys about block
 * devices. Nothing here calls sync(2): a sync while a device is suspended waits for its resume.
 */
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import { basename } from 'node:path';

export const NBD_MAJOR = 43;

export class HostCommandError extends Error {
  override name = 'HostCommandError';
}

/** Runs `cmd args`; resolves with stdout, or rejects with the command and its stderr. */
export function runTool(cmd: string, args: string[], timeoutMs = 60_000): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile(
      cmd,
      args,
      { timeout: timeoutMs, maxBuffer: 4 * 1024 * 1024, killSignal: 'SIGKILL' },
      (err, stdout, stderr) => {
        if (err === null) return resolve(stdout);
        const code = (err as NodeJS.ErrnoException).code;
        const why =
          code === 'ENOENT'
            ? `${cmd} is not installed`
            : err.killed
              ? `timed out after ${timeoutMs} ms`
              : (stderr.trim() || err.message).split('\n').slice(-6).join('\n');
        reject(new HostCommandError(`${cmd} ${args.join(' ')}: ${why}`));
      },
    );
  });
}

export const dmsetup = (...args: string[]): Promise<string> => runTool('dmsetup', args);

const sysRead = (path: string): string => fs.readFileSync(path, 'utf8').trim();

/** "MAJOR:MINOR" of a block device by its kernel name (vda, dm-0, nbd0). */
export function majMin(blockName: string): string {
  return sysRead(`/sys/class/block/${blockName}/dev`);
}

/** The kernel name (vda) of the block device "MAJOR:MINOR", or of a /dev path. */
export function blockName(device: string): string {
  if (/^\d+:\d+$/.test(device)) {
    const uevent = sysRead(`/sys/dev/block/${device}/uevent`);
    const m = /^DEVNAME=(.+)$/m.exec(uevent);
    if (m === null) throw new Error(`no DEVNAME for block device ${device}`);
    return m[1]!;
  }
  // A device node's numbers, not its name: without udev, /dev/mapper/NAME is a node of its own
  // rather than a link to ../dm-N.
  const st = fs.statSync(device, { bigint: true });
  if (!st.isBlockDevice()) return basename(fs.realpathSync(device));
  const rdev = st.rdev;
  const major = ((rdev >> 8n) & 0xfffn) | ((rdev >> 32n) & ~0xfffn);
  const minor = (rdev & 0xffn) | ((rdev >> 12n) & ~0xffn);
  return blockName(`${major}:${minor}`);
}

/**
 * The device-mapper name and kernel name of DMDEV, given as a dm name, /dev/mapper/NAME,
 * /dev/dm-N or an LVM path (/dev/VG/LV, a link to ../dm-N).
 */
export function resolveDm(dev: string): { name: string; block: string } {
  if (!dev.includes('/')) {
    for (const b of fs.readdirSync('/sys/block')) {
      if (!b.startsWith('dm-')) continue;
      if (sysRead(`/sys/block/${b}/dm/name`) === dev) return { name: dev, block: b };
    }
    throw new Error(`no device-mapper device named ${JSON.stringify(dev)}`);
  }
  let block: string;
  try {
    block = blockName(dev);
  } catch {
    throw new Error(`${dev}: no such device`);
  }
  if (!fs.existsSync(`/sys/block/${block}/dm/name`))
    throw new Error(`${dev} (${block}) is not a device-mapper device`);
  return { name: sysRead(`/sys/block/${block}/dm/name`), block };
}

/** Size in 512-byte sectors and logical block size of a block device by kernel name. */
export function blockGeometry(block: string): { sectors: number; logicalBlockSize: number } {
  return {
    sectors: Number(sysRead(`/sys/class/block/${block}/size`)),
    logicalBlockSize: Number(sysRead(`/sys/class/block/${block}/queue/logical_block_size`)),
  };
}

/** Whether the dm device is suspended. */
export async function isSuspended(name: string): Promise<boolean> {
  const out = await dmsetup('info', '-c', '--noheadings', '-o', 'suspended', name);
  return out.trim() === 'Suspended';
}

/** The first /dev/nbdN with nothing attached. */
export function freeNbdDevice(): string {
  if (!fs.existsSync('/sys/block/nbd0'))
    throw new Error('no /dev/nbd* devices: load the nbd kernel module (modprobe nbd)');
  const names = fs
    .readdirSync('/sys/block')
    .filter((b) => /^nbd\d+$/.test(b))
    .sort((a, b) => Number(a.slice(3)) - Number(b.slice(3)));
  for (const b of names)
    if (!fs.existsSync(`/sys/block/${b}/pid`) && sysRead(`/sys/block/${b}/size`) === '0') return b;
  throw new Error(`every /dev/nbd* device is in use (${names.length})`);
}

/** Waits until `check()` holds, polling; throws `what` on timeout. */
export async function waitUntil(check: () => boolean, timeoutMs: number, what: string) {
  const deadline = Date.now() + timeoutMs;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`${what} (after ${timeoutMs} ms)`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** Whether /dev/NAME (nbdN) is attached with `sectors` sectors. */
export function nbdReady(nbd: string, sectors: number): boolean {
  try {
    return sysRead(`/sys/block/${nbd}/size`) === String(sectors);
  } catch {
    return false;
  }
}

export function nbdAttached(nbd: string): boolean {
  return fs.existsSync(`/sys/block/${nbd}/pid`);
}
