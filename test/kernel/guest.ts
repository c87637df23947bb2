/**
 * The QEMU guest of the kernel-client tests: a stock Debian kernel whose own NBD driver
 * (/dev/nbd0, attached by Debian's nbd-client) talks to devfilter. scripts/kernel/build-guest.sh
 * builds the kernel and initramfs into a cache; scripts/kernel/guest-init.sh is the guest's
 * /init and reports each step on the serial console as `DEVFILTER-TEST: ...` lines, which
 * runGuest() parses. See docs/testing-kernel.md.
 */
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import type { TestContext } from 'node:test';
import { CLI, REPO_ROOT } from '../helpers/server.js';
import { describeResult, run, type RunResult } from '../helpers/run.js';
import { requireTools } from '../helpers/tools.js';

export const BUILD_SCRIPT = join(REPO_ROOT, 'scripts', 'kernel', 'build-guest.sh');

/** The host programs the build and the run need (Debian packages in parentheses in the docs). */
export const KERNEL_TEST_TOOLS = [
  'qemu-system-x86_64', // qemu-system-x86
  'busybox', // busybox-static
  'cpio',
  'nbd-client',
  'mke2fs', // e2fsprogs, also e2fsck and debugfs on the host
  'e2fsck',
  'debugfs',
  'apt-get',
  'dpkg-deb',
  'xz', // xz-utils, for kernels whose modules are .ko.xz
];

/** Like requireTools: a loud skip locally, a failure under CI=true. Returns false to stop. */
function skipOrFail(t: TestContext, message: string): false {
  if (process.env.CI === 'true') throw new Error(`${message}; CI must not skip`);
  process.stderr.write(`\n*** SKIPPED ${t.name}: ${message} ***\n\n`);
  t.skip(message);
  return false;
}

/** Checks the host tools; busybox must be the static build (Debian's busybox-static). */
export function requireKernelTools(t: TestContext): boolean {
  if (!requireTools(t, ...KERNEL_TEST_TOOLS)) return false;
  const which = spawnSync('sh', ['-c', 'command -v busybox'], { encoding: 'utf8' }).stdout.trim();
  const ldd = spawnSync('ldd', [which], { encoding: 'utf8' });
  if (ldd.status === 0) {
    return skipOrFail(t, `${which} is dynamically linked: the guest needs busybox-static`);
  }
  return true;
}

export interface Guest {
  dir: string;
  vmlinuz: string;
  initramfs: string;
  /** What build-guest.sh printed (what it fetched or reused). */
  buildLog: string;
  buildMs: number;
}

let building: Promise<Guest> | undefined;

/** Builds the guest (or finds it in the cache) once per process. */
export function buildGuest(): Promise<Guest> {
  building ??= (async () => {
    // The first build downloads the kernel package (~70 MB) and unpacks it.
    const r = await run('bash', [BUILD_SCRIPT], { timeoutMs: 600_000 });
    if (r.code !== 0) throw new Error(describeResult('bash', [BUILD_SCRIPT], r));
    const dir = r.stdout.trim().split('\n').pop()!;
    const guest: Guest = {
      dir,
      vmlinuz: join(dir, 'vmlinuz'),
      initramfs: join(dir, 'initramfs.img'),
      buildLog: r.stderr,
      buildMs: r.ms,
    };
    for (const f of [guest.vmlinuz, guest.initramfs]) {
      if (!existsSync(f))
        throw new Error(`build-guest.sh printed ${dir}, but ${f} is missing:\n${r.stderr}`);
    }
    return guest;
  })();
  return building;
}

export interface GuestRunOptions {
  /** The devfilter unix socket the guest's connections are forwarded to. */
  socket: string;
  exportName: string;
  /** nbd-client's block size (512, 1024, 2048 or 4096). */
  blockSize?: number;
  /**
   * How the guest reaches the socket. 'bridge' (the default): one
   * `guestfwd=...-cmd:node unix-bridge.mjs PATH` rule on port 10809, which QEMU runs for each
   * connection the guest opens, when it opens it. 'chardev': one `guestfwd=...-unix:PATH` rule
   * per connection (ports 10809 and 10810), each connected by QEMU when it starts: the second
   * sits in negotiation until the guest uses it, and devfilter closes connections that have
   * not finished negotiating within 30 s, which a slow boot on a loaded machine exceeds.
   */
  forward?: 'chardev' | 'bridge';
  /** Connections per attach (nbd-client -C N); more than 1 needs forward 'bridge'. */
  connections?: number;
  /**
   * Guest CPUs (default 1). The kernel's nbd driver maps each CPU's blk-mq queue to one
   * connection: with one CPU, `-C 2` sends every request down the first connection.
   */
  cpus?: number;
  /** What the guest does (scripts/kernel/guest-init.sh, scenario_*); default 'ext4'. */
  scenario?: 'ext4' | 'snapshot' | 'interpose';
  /**
   * interpose: the host's root file system is shared read-only (9p, tag hostroot) and the
   * guest runs scripts/kernel/interpose-scenario.sh with these arguments in it; `disk` is the
   * scratch disk (/dev/vda, a raw file).
   */
  scenarioArgs?: string[];
  disk?: string;
  /** Guest memory in MiB (default 512). */
  memoryMiB?: number;
  /**
   * The daemon's control socket, for the guest to run `devfilter filter ...` commands on the
   * host through scripts/kernel/host-hook.mjs (guest port 10900). The snapshot scenario needs it.
   */
  control?: string;
  /** Kill QEMU after this long (default 150 s: normally it takes 8-20 s). */
  timeoutMs?: number;
}

export interface Step {
  name: string;
  passed: boolean;
  /** Seconds the step took in the guest; undefined for a failed step. */
  seconds?: number;
}

export interface GuestResult {
  run: RunResult;
  /** The serial console with terminal escapes removed. */
  console: string;
  steps: Step[];
  /** Guest path → md5 of the files it wrote, as the guest computed them. */
  md5: Map<string, string>;
  info: Map<string, string>;
  /** DONE pass was printed. */
  passed: boolean;
  /** Guest uptime when it finished (seconds since the kernel started). */
  uptime?: number;
  args: string[];
}

export const BRIDGE_SCRIPT = join(REPO_ROOT, 'scripts', 'kernel', 'unix-bridge.mjs');
export const HOOK_SCRIPT = join(REPO_ROOT, 'scripts', 'kernel', 'host-hook.mjs');
const HOOK_PORT = 10900;

export async function runGuest(guest: Guest, opts: GuestRunOptions): Promise<GuestResult> {
  const forward = opts.forward ?? 'bridge';
  const connections = opts.connections ?? 1;
  if (connections > 1 && forward !== 'bridge') {
    throw new Error('nbd-client -C N opens N connections to one port: that needs forward "bridge"');
  }
  const paths = [opts.socket, process.execPath, BRIDGE_SCRIPT, HOOK_SCRIPT, CLI];
  if (opts.control !== undefined) paths.push(opts.control);
  for (const p of paths) {
    // QEMU splits options at commas; the bridge command line is split like a shell's.
    if (/[,\s'"\\]/.test(p)) throw new Error(`cannot pass this path to QEMU's guestfwd: ${p}`);
  }
  // Guest ports: the first attach writes, the second (a fresh connection) verifies.
  const ports = forward === 'chardev' ? [10809, 10810] : [10809, 10809];
  const rules =
    forward === 'chardev'
      ? ports.map((p) => `guestfwd=tcp:10.0.2.100:${p}-unix:${opts.socket}`)
      : [`guestfwd=tcp:10.0.2.100:10809-cmd:${process.execPath} ${BRIDGE_SCRIPT} ${opts.socket}`];
  if (opts.control !== undefined) {
    rules.push(
      `guestfwd=tcp:10.0.2.100:${HOOK_PORT}-cmd:${process.execPath} ${HOOK_SCRIPT} ${CLI} ${opts.control}`,
    );
  }
  const append = [
    'console=ttyS0',
    'quiet',
    'panic=-1', // init dying panics the kernel, and with -no-reboot that ends QEMU
    `devfilter.export=${opts.exportName}`,
    `devfilter.ports=${ports.join(',')}`,
    `devfilter.bs=${opts.blockSize ?? 512}`,
    `devfilter.conns=${connections}`,
    `devfilter.scenario=${opts.scenario ?? 'ext4'}`,
    `devfilter.hook=${HOOK_PORT}`,
    ...(opts.scenario === 'interpose'
      ? [
          `devfilter.repo=${REPO_ROOT.replace(/\/$/, '')}`,
          `devfilter.args=${(opts.scenarioArgs ?? []).join(',')}`,
        ]
      : []),
  ].join(' ');
  // restrict=on: no way out of the guest except the forwarding rules.
  const netdev = ['user', 'id=n0', 'restrict=on', ...rules].join(',');
  // prettier-ignore
  const args = [
    '-M', 'pc',
    '-accel', 'tcg', // /dev/kvm may exist but cannot run a guest where the host is itself a VM
    '-cpu', 'max',
    '-m', String(opts.memoryMiB ?? 512),
    '-smp', String(opts.cpus ?? 1),
    '-nographic',
    '-no-reboot',
    '-kernel', guest.vmlinuz,
    '-initrd', guest.initramfs,
    '-append', append,
    '-netdev', netdev,
    '-device', 'virtio-net-pci,netdev=n0,romfile=', // no iPXE option ROM: saves seconds of boot
    ...(opts.scenario === 'interpose'
      ? [
          '-virtfs', 'local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap',
          ...(opts.disk !== undefined ? ['-drive', `file=${opts.disk},format=raw,if=virtio,cache=writethrough`] : []),
        ]
      : []),
  ];
  const r = await run('qemu-system-x86_64', args, { timeoutMs: opts.timeoutMs ?? 150_000 });
  // eslint-disable-next-line no-control-regex
  const text = r.stdout.replace(/\x1b\[[0-9;?]*[A-Za-z]|\x1bc|\r/g, '');
  const steps: Step[] = [];
  const md5 = new Map<string, string>();
  const info = new Map<string, string>();
  let passed = false;
  for (const line of text.split('\n')) {
    const m = /DEVFILTER-TEST: (\S+) ?(.*)$/.exec(line);
    if (!m) continue;
    const [, kind, rest] = m as unknown as [string, string, string];
    const words = rest.split(' ');
    if (kind === 'PASS') steps.push({ name: words[0]!, passed: true, seconds: Number(words[1]) });
    else if (kind === 'FAIL') steps.push({ name: words[0]!, passed: false });
    else if (kind === 'MD5') md5.set(words[1]!, words[0]!);
    else if (kind === 'INFO') info.set(words[0]!, words.slice(1).join(' '));
    else if (kind === 'DONE') passed = words[0] === 'pass';
  }
  const uptime = info.has('uptime') ? Number(info.get('uptime')) : undefined;
  return { run: r, console: text, steps, md5, info, passed, uptime, args };
}

/** For assertion messages: the QEMU command line, its status and the console. */
export function describeGuest(g: GuestResult): string {
  return describeResult('qemu-system-x86_64', g.args, { ...g.run, stdout: g.console });
}
