/**
 * The state of one interposed dm device, kept in STATE_ROOT/NAME/state.json (written
 * atomically) beside the dedicated daemon's sockets and log: enough for any later
 * `devfilter interpose detach` — from another shell, or after the CLI that attached died — to
 * put the original table back.
 */
import fs from 'node:fs';
import { join } from 'node:path';
import type { LinearSegment } from '../backends/linear.js';
import { readIfExists, writeFileAtomic } from '../core/durable-files.js';
import { makeDirs } from '../core/make-dirs.js';

export const STATE_VERSION = 1;
export const DEFAULT_STATE_ROOT = '/run/devfilter/interpose';

export interface InterposeFilter {
  type: string;
  name?: string;
  args: Record<string, unknown>;
}

export interface InterposeState {
  version: typeof STATE_VERSION;
  /** device-mapper name and kernel name (dm-N). */
  dmName: string;
  dmBlock: string;
  /** The table as it was, exactly as `dmsetup table` printed it. */
  originalTable: string;
  sectors: number;
  logicalBlockSize: number;
  /** The original table in bytes, over the devices it named. */
  segments: LinearSegment[];
  exportName: string;
  socket: string;
  control: string;
  log: string;
  filters: InterposeFilter[];
  /** The kernel NBD device (nbdN) and the daemon's pid, once known. */
  nbd?: string;
  pid?: number;
  /** How far attach got: a detach undoes what this says was done. */
  phase: 'starting' | 'connected' | 'swapping' | 'attached' | 'detaching';
  attachedAt?: string;
}

export function stateDir(root: string, dmName: string): string {
  return join(root, dmName);
}

export async function writeState(root: string, s: InterposeState): Promise<void> {
  const dir = stateDir(root, s.dmName);
  await makeDirs(dir, 0o700);
  await writeFileAtomic(dir, 'state.json', Buffer.from(JSON.stringify(s, null, 2) + '\n'));
}

export async function readState(root: string, dmName: string): Promise<InterposeState | null> {
  const raw = await readIfExists(join(stateDir(root, dmName), 'state.json'));
  if (raw === null) return null;
  const s = JSON.parse(raw.toString('utf8')) as InterposeState;
  if (s.version !== STATE_VERSION)
    throw new Error(`interpose state of ${dmName}: version ${String(s.version)} is not supported`);
  return s;
}

export async function removeState(root: string, dmName: string): Promise<void> {
  await fs.promises.rm(stateDir(root, dmName), { recursive: true, force: true });
}

export async function listStates(root: string): Promise<InterposeState[]> {
  let names: string[];
  try {
    names = await fs.promises.readdir(root);
  } catch {
    return [];
  }
  const out: InterposeState[] = [];
  for (const n of names) {
    const s = await readState(root, n).catch(() => null);
    if (s !== null) out.push(s);
  }
  return out;
}
