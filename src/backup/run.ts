/**
 * `devfilter backup full|incremental`: a consistent, small backup of a live export.
 *
 * 1. The export's `cbt` filter starts a new generation N; then a snapshot is taken. Every
 *    write after the snapshot's instant is in generation N or later, so "changed since N" at
 *    the next backup covers everything this one did not see (a write between the two steps is
 *    in both: copied twice, never missed).
 * 2. The snapshot image is read over NBD (`EXPORT@SNAP`, block status skipping holes and
 *    zeros) — everything for a full backup, the blocks changed since the base backup's
 *    generation for an incremental — and written as a qcow2 image (src/backup/qcow2-writer)
 *    whose manifest records the export, the change history id and N. An incremental's backing
 *    file is the base backup.
 * 3. The image appears at DEST only once complete and durable; the snapshot is deleted in
 *    every case. A run killed half-way leaves `DEST.partial` and a snapshot named
 *    `backup-PID-…`, which the next run on the export deletes (its process is gone); the next
 *    incremental is still right, since it starts from the last *finished* backup's generation.
 *
 * This runs in the CLI process: the daemon only takes and serves the snapshot.
 */
import { readdir } from 'node:fs/promises';
import { dirname, isAbsolute, join, relative, resolve } from 'node:path';
import { ControlClient } from '../control/client.js';
import type { NbdListener } from '../control/methods.js';
import { ExtentState } from '../core/device.js';
import { assert } from '../core/errors.js';
import { NbdClient } from '../nbd/client.js';
import { BASE_ALLOCATION } from '../nbd/protocol.js';
import { manifestPathOf, readManifest, type Manifest } from './manifest.js';
import { createQcow2Writer, DEFAULT_CLUSTER_SIZE, type Qcow2Writer } from './qcow2-writer.js';

export type BackupMode = 'full' | 'incremental';

export interface BackupRequest {
  mode: BackupMode;
  exportName: string;
  /** The new backup image. */
  dest: string;
  /** The daemon's control socket. */
  controlPath: string;
  /** Incremental: the backup to build on; default the newest backup of the export in DEST's directory. */
  base?: string;
  /** Difference store for an export that has no snapshot filter yet. */
  store?: string;
  /** Store size limit for a new snapshot filter. */
  limit?: string | number;
  /** The cbt filter's name; default the export's only cbt filter. */
  cbt?: string;
  clusterSize?: number;
  /** Largest read from the snapshot image (default 4 MiB). */
  chunkBytes?: number;
  onProgress?: (p: BackupProgress) => void;
}

export interface BackupProgress {
  /** Bytes of the ranges to back up examined so far, and in all. */
  doneBytes: number;
  totalBytes: number;
  /** Bytes read and written as data so far. */
  dataBytes: number;
}

export interface BackupResult {
  mode: BackupMode;
  export: string;
  path: string;
  manifestPath: string;
  base: string | null;
  snapshot: string;
  snapshotTime: string;
  /** Change tracking: the history id and the generation the next incremental starts from. */
  generationId: string | null;
  generation: number | null;
  virtualSize: number;
  /** Bytes the backup had to look at (the whole device, or the changed extents). */
  scannedBytes: number;
  dataBytes: number;
  zeroBytes: number;
  fileSize: number;
  seconds: number;
  notes: string[];
}

/** A refused backup: bad request or state (exit 2), as opposed to a failure on the way. */
export class BackupRefused extends Error {
  override name = 'BackupRefused';
}

const SNAPSHOT_PREFIX = 'backup-';
const DEFAULT_CHUNK = 4 * 1024 * 1024;
/** Extents asked of the cbt filter per call. */
const CHANGED_PAGE = 50_000;

interface FilterRow {
  name: string;
  type: string;
}

interface Generation {
  id: string;
  previous: number;
  current: number;
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

function imageUri(listeners: NbdListener[], exportName: string): string {
  const name = encodeURIComponent(exportName);
  const unix = listeners.find((l) => l.transport === 'unix');
  if (unix !== undefined) return `nbd+unix:///${name}?socket=${encodeURIComponent(unix.path)}`;
  const tcp = listeners.find((l) => l.transport === 'tcp');
  if (tcp !== undefined) {
    const host = tcp.host === '0.0.0.0' || tcp.host === '::' ? '127.0.0.1' : tcp.host;
    return `nbd://${host.includes(':') ? `[${host}]` : host}:${tcp.port}/${name}`;
  }
  throw new BackupRefused('the daemon serves NBD nowhere this tool can reach (no socket, no TCP)');
}

/** The newest finished backup of `exportName` among the manifests in `dir`. */
export async function latestBackup(dir: string, exportName: string): Promise<string | undefined> {
  let names: string[];
  try {
    names = await readdir(dir);
  } catch {
    return undefined;
  }
  let best: { path: string; at: string } | undefined;
  for (const name of names) {
    // A manifest is published before its image: only pairs count (a finished backup).
    if (!name.endsWith('.manifest') || !names.includes(name.slice(0, -'.manifest'.length)))
      continue;
    const image = join(dir, name.slice(0, -'.manifest'.length));
    let m: Manifest | undefined;
    try {
      m = await readManifest(join(dir, name));
    } catch {
      continue; // damaged or not ours: `backup verify` reports those
    }
    if (m === undefined) continue;
    const md = m.body.metadata;
    if (md.export !== exportName || typeof md.snapshotTime !== 'string') continue;
    if (best === undefined || md.snapshotTime > best.at)
      best = { path: image, at: md.snapshotTime };
  }
  return best?.path;
}

/** Merges sorted [start, end) ranges, rounded out to `unit` and clipped to `size`. */
export function roundRanges(
  ranges: Iterable<[number, number]>,
  unit: number,
  size: number,
): Array<[number, number]> {
  const out: Array<[number, number]> = [];
  for (const [s, e] of ranges) {
    const start = Math.floor(s / unit) * unit;
    const end = Math.min(size, Math.ceil(e / unit) * unit);
    const last = out[out.length - 1];
    assert(last === undefined || start >= last[0], 'ranges out of order');
    if (last !== undefined && start <= last[1]) last[1] = Math.max(last[1], end);
    else out.push([start, end]);
  }
  return out;
}

class Backup {
  private readonly notes: string[] = [];
  private doneBytes = 0;
  private totalBytes = 0;
  private dataBytes = 0;
  private zeroBytes = 0;
  private lastReport = 0;

  constructor(
    private readonly req: BackupRequest,
    private readonly control: ControlClient,
  ) {}

  private async filterOf(type: string, wanted?: string): Promise<string | undefined> {
    const { filters } = await this.control.call<{ filters: FilterRow[] }>('filter.list', {
      export: this.req.exportName,
    });
    if (wanted !== undefined) {
      const f = filters.find((x) => x.name === wanted);
      if (f === undefined || f.type !== type)
        throw new BackupRefused(
          `export "${this.req.exportName}" has no ${type} filter named "${wanted}"`,
        );
      return wanted;
    }
    const all = filters.filter((x) => x.type === type);
    if (all.length > 1)
      throw new BackupRefused(
        `export "${this.req.exportName}" has ${all.length} ${type} filters (${all.map((f) => f.name).join(', ')}): name one with --cbt`,
      );
    return all[0]?.name;
  }

  /** Deletes snapshots left by backups whose process is gone (killed half-way). */
  private async dropStaleSnapshots(): Promise<void> {
    let list: { snapshots: Array<{ name: string }> };
    try {
      list = await this.control.call('snapshot.list', { export: this.req.exportName });
    } catch {
      return; // no snapshot filter yet: nothing left over
    }
    for (const s of list.snapshots) {
      const m = /^backup-(\d+)-/.exec(s.name);
      if (m === null || alive(Number(m[1]))) continue;
      await this.control.call('snapshot.delete', { export: this.req.exportName, name: s.name });
      this.notes.push(`deleted snapshot ${s.name} left by an interrupted backup`);
    }
  }

  async run(): Promise<BackupResult> {
    const started = performance.now();
    const { req } = this;
    const dest = resolve(req.dest);
    const daemon = await this.control.call<{ listeners?: NbdListener[] }>('daemon.status');
    const cbt = await this.filterOf('cbt', req.cbt);
    await this.dropStaleSnapshots();

    let base: { path: string; manifest: Manifest } | undefined;
    if (req.mode === 'incremental') {
      if (cbt === undefined)
        throw new BackupRefused(
          `export "${req.exportName}" has no cbt filter: an incremental backup needs change tracking (devfilter filter create ${req.exportName} cbt --arg dir=DIR, then a full backup)`,
        );
      const path =
        req.base !== undefined
          ? resolve(req.base)
          : await latestBackup(dirname(dest), req.exportName);
      if (path === undefined)
        throw new BackupRefused(
          `no earlier backup of "${req.exportName}" in ${dirname(dest)}: take a full backup first, or give --base`,
        );
      const manifest = await readManifest(manifestPathOf(path)).catch((err: unknown) => {
        throw new BackupRefused(`base ${path}: ${(err as Error).message}`);
      });
      if (manifest === undefined)
        throw new BackupRefused(
          `base ${path} has no manifest (${manifestPathOf(path)}): not a devfilter backup`,
        );
      const md = manifest.body.metadata;
      if (md.export !== req.exportName)
        throw new BackupRefused(
          `base ${path} is a backup of "${String(md.export)}", not of "${req.exportName}"`,
        );
      if (typeof md.generation !== 'number' || typeof md.generationId !== 'string')
        throw new BackupRefused(
          `base ${path} was taken without change tracking: take a full backup`,
        );
      base = { path, manifest };
    } else if (cbt === undefined) {
      this.notes.push(
        `export "${req.exportName}" has no cbt filter: this full backup records no generation, so the next one must be full too`,
      );
    }

    // The generation first, then the snapshot: see the header comment.
    const gen =
      cbt !== undefined
        ? await this.control.call<Generation>('filter.control', {
            export: req.exportName,
            name: cbt,
            command: 'generation',
          })
        : undefined;
    if (base !== undefined && gen!.id !== base.manifest.body.metadata.generationId)
      throw new BackupRefused(
        `the change history of "${req.exportName}" was reset since ${base.path} (id ${String(base.manifest.body.metadata.generationId)} → ${gen!.id}): a full backup is needed`,
      );

    const snapshot = `${SNAPSHOT_PREFIX}${process.pid}-${Date.now().toString(36)}`;
    const taken = await this.control.call<{ snapshots: Array<{ takenAt: string; image: string }> }>(
      'snapshot.create',
      {
        name: snapshot,
        exports: [req.exportName],
        ...(req.store !== undefined ? { store: req.store } : {}),
        ...(req.limit !== undefined ? { limit: req.limit } : {}),
      },
    );
    const { takenAt, image } = taken.snapshots[0]!;
    let client: NbdClient | undefined;
    try {
      client = await NbdClient.fromUri(imageUri(daemon.listeners ?? [], image));
      const size = client.size;
      const clusterSize =
        base?.manifest.body.clusterSize ?? req.clusterSize ?? DEFAULT_CLUSTER_SIZE;
      if (base !== undefined && base.manifest.body.virtualSize !== size)
        throw new BackupRefused(
          `"${req.exportName}" is ${size} bytes now, its base backup ${base.manifest.body.virtualSize}: take a full backup`,
        );
      const ranges =
        base === undefined
          ? [[0, size] as [number, number]]
          : await this.changedRanges(cbt!, base.manifest, clusterSize, size);
      this.totalBytes = ranges.reduce((n, [s, e]) => n + e - s, 0);
      const writer = await createQcow2Writer(dest, {
        size,
        clusterSize,
        ...(base !== undefined
          ? { backingFile: backingName(dest, base.path), backingFormat: 'qcow2' as const }
          : {}),
        metadata: {
          export: req.exportName,
          kind: req.mode,
          snapshotTime: takenAt,
          ...(gen !== undefined
            ? { generationId: gen.id, generation: gen.current, cbt: cbt! }
            : {}),
        },
      });
      let written;
      try {
        for (const [start, end] of ranges)
          await this.copy(client, writer, start, end, base !== undefined);
        this.report(true);
        written = await writer.finish();
      } catch (err) {
        await writer.abort().catch(() => undefined);
        throw err;
      }
      return {
        mode: req.mode,
        export: req.exportName,
        path: written.path,
        manifestPath: written.manifestPath,
        base: base?.path ?? null,
        snapshot,
        snapshotTime: takenAt,
        generationId: gen?.id ?? null,
        generation: gen?.current ?? null,
        virtualSize: size,
        scannedBytes: this.totalBytes,
        dataBytes: this.dataBytes,
        zeroBytes: this.zeroBytes,
        fileSize: written.fileSize,
        seconds: (performance.now() - started) / 1000,
        notes: this.notes,
      };
    } finally {
      await client?.disconnect().catch(() => client?.close());
      await this.control
        .call('snapshot.delete', { export: req.exportName, name: snapshot })
        .catch((err: unknown) =>
          this.notes.push(`could not delete snapshot ${snapshot}: ${(err as Error).message}`),
        );
    }
  }

  /** "Changed since the base's generation", paged, rounded out to whole clusters. */
  private async changedRanges(
    cbt: string,
    base: Manifest,
    clusterSize: number,
    size: number,
  ): Promise<Array<[number, number]>> {
    const md = base.body.metadata;
    const raw: Array<[number, number]> = [];
    let offset = 0;
    for (;;) {
      const page = await this.control.call<{
        extents: Array<{ offset: number; length: number }>;
        next: number | null;
      }>('filter.control', {
        export: this.req.exportName,
        name: cbt,
        command: 'changed',
        args: { since: md.generation, id: md.generationId, offset, limit: CHANGED_PAGE },
      });
      for (const e of page.extents) raw.push([e.offset, e.offset + e.length]);
      if (page.next === null || page.next === undefined) break;
      assert(page.next > offset, 'changed extents paging went backwards');
      offset = page.next;
    }
    return roundRanges(raw, clusterSize, size);
  }

  /**
   * Copies [start, end) of the image: data extents as data, zero extents as zero clusters in
   * an incremental (they must hide the base) and not at all in a full backup.
   */
  private async copy(
    client: NbdClient,
    writer: Qcow2Writer,
    start: number,
    end: number,
    incremental: boolean,
  ): Promise<void> {
    const chunk = this.req.chunkBytes ?? DEFAULT_CHUNK;
    const cs = writer.clusterSize;
    assert(chunk % cs === 0 && start % cs === 0, 'backup ranges and reads are whole clusters');
    let at = start;
    while (at < end) {
      const extents = (await client.blockStatus(at, end - at)).get(BASE_ALLOCATION);
      const first = extents?.[0];
      // No answer for the context: all data (always correct, never smaller).
      const extentEnd = Math.min(end, at + (first?.length ?? end - at));
      if (first !== undefined && (first.flags & ExtentState.ZERO) !== 0) {
        // Whole clusters of zeros; a cluster only partly zero is copied as data below.
        const zeroEnd = extentEnd === end ? end : Math.floor(extentEnd / cs) * cs;
        if (zeroEnd > at) {
          if (incremental) await writer.writeZeroes(at, zeroEnd - at);
          this.zeroBytes += zeroEnd - at;
          this.doneBytes += zeroEnd - at;
          this.report(false);
          at = zeroEnd;
          continue;
        }
      }
      const stop = Math.min(end, Math.ceil(extentEnd / cs) * cs);
      for (let o = at; o < stop; o += chunk) {
        const n = Math.min(chunk, stop - o);
        await writer.writeData(o, await client.read(o, n));
        this.dataBytes += n;
        this.doneBytes += n;
        this.report(false);
      }
      at = stop;
    }
  }

  private report(final: boolean): void {
    const now = performance.now();
    if (!final && now - this.lastReport < 100) return;
    this.lastReport = now;
    this.req.onProgress?.({
      doneBytes: this.doneBytes,
      totalBytes: this.totalBytes,
      dataBytes: this.dataBytes,
    });
  }
}

/** The backing file name as stored: relative to DEST's directory when both share a tree. */
function backingName(dest: string, base: string): string {
  const rel = relative(dirname(dest), base);
  return isAbsolute(rel) || rel.startsWith('..') ? base : rel;
}

export async function runBackup(req: BackupRequest): Promise<BackupResult> {
  const control = await ControlClient.connect(req.controlPath);
  try {
    return await new Backup(req, control).run();
  } finally {
    control.close();
  }
}
