/** What the numbers were measured on: saved with every result. */
import { spawnSync } from 'node:child_process';
import os from 'node:os';
import { version } from './proc.js';
import { REPO_ROOT } from './servers.js';

export interface MachineDescription {
  hostname: string;
  cpus: number;
  cpuModel: string;
  memoryGiB: number;
  kernel: string;
  os: string;
  node: string;
  fio?: string;
  nbdkit?: string;
  qemuNbd?: string;
  uvThreadpoolSize?: string;
  git?: { commit: string; dirty: boolean };
}

function git(): { commit: string; dirty: boolean } | undefined {
  const rev = spawnSync('git', ['rev-parse', '--short', 'HEAD'], {
    cwd: REPO_ROOT,
    encoding: 'utf8',
  });
  if (rev.status !== 0) return undefined;
  const status = spawnSync('git', ['status', '--porcelain', '--', 'src'], {
    cwd: REPO_ROOT,
    encoding: 'utf8',
  });
  return { commit: rev.stdout.trim(), dirty: status.stdout.trim() !== '' };
}

export function describeMachine(): MachineDescription {
  const cpus = os.cpus();
  const d: MachineDescription = {
    hostname: os.hostname(),
    cpus: cpus.length,
    cpuModel: cpus[0]?.model.trim() ?? 'unknown',
    memoryGiB: Math.round((os.totalmem() / 2 ** 30) * 10) / 10,
    kernel: os.release(),
    os: os.version(),
    node: process.version,
  };
  const fio = version('fio');
  const nbdkit = version('nbdkit');
  const qemu = version('qemu-nbd');
  if (fio) d.fio = fio;
  if (nbdkit) d.nbdkit = nbdkit;
  if (qemu) d.qemuNbd = qemu;
  if (process.env.UV_THREADPOOL_SIZE) d.uvThreadpoolSize = process.env.UV_THREADPOOL_SIZE;
  const g = git();
  if (g) d.git = g;
  return d;
}

/** Load averages (1, 5, 15 min): a busy machine shows here before the benchmark adds its own. */
export function loadAverage(): number[] {
  return os.loadavg().map((l) => Math.round(l * 100) / 100);
}
