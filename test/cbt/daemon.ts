/**
 * Helpers for the cbt tests that run a real `devfilter serve`: a config file declaring one
 * file-backed export with a cbt filter (so a restarted daemon re-attaches it before serving),
 * the control socket, and reading the map through it.
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { callOnce } from '../../src/control/client.js';
import { spawnDaemon, type DaemonProcess } from '../helpers/server.js';

export const KiB = 1024;
export const MiB = 1024 * 1024;

export interface CbtDaemonSetup {
  dir: string;
  size: number;
  blockSize: number;
  /** The filter's name on the export "disk". */
  filter?: string;
}

export interface CbtDaemon extends DaemonProcess {
  control: string;
  image: string;
  uri: (exportName?: string) => string;
  cmd<T = Record<string, unknown>>(command: string, args?: Record<string, unknown>): Promise<T>;
  status<T = Record<string, unknown>>(): Promise<T>;
}

export interface ChangedReply {
  id: string;
  generation: number;
  since: number;
  extents: Array<{ offset: number; length: number }>;
  bytes: number;
  blocks: number;
  next: number | null;
}

export async function startCbtDaemon(s: CbtDaemonSetup): Promise<CbtDaemon> {
  const filter = s.filter ?? 'cbt0';
  const config = join(s.dir, 'devfilter.json');
  const control = join(s.dir, 'control.sock');
  const image = join(s.dir, 'disk.img');
  writeFileSync(
    config,
    JSON.stringify({
      control,
      exports: {
        disk: {
          file: image,
          create: s.size,
          filters: [
            {
              type: 'cbt',
              name: filter,
              args: { dir: join(s.dir, 'state'), blockSize: s.blockSize },
            },
          ],
        },
      },
    }),
  );
  mkdirSync(join(s.dir, 'state'), { recursive: true });
  const d = await spawnDaemon(['--config', config], { socket: join(s.dir, 'nbd.sock') });
  const cmd = <T>(command: string, args: Record<string, unknown> = {}): Promise<T> =>
    callOnce<T>(control, 'filter.control', { export: 'disk', name: filter, command, args });
  return {
    ...d,
    control,
    image,
    uri: (name = 'disk') => d.uri(name),
    cmd,
    status: async <T>() =>
      (await callOnce<{ status: T }>(control, 'filter.status', { export: 'disk', name: filter }))
        .status,
  };
}

/** The blocks that `changed` extents cover. */
export function changedBlocks(c: ChangedReply, blockSize: number): Set<number> {
  const out = new Set<number>();
  for (const e of c.extents)
    for (let b = e.offset / blockSize; b < Math.ceil((e.offset + e.length) / blockSize); b++)
      out.add(b);
  return out;
}
