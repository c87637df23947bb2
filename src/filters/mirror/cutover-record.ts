/**
 * Cutover records: the durable note that an export's backend was cut over away from a source,
 * so that a daemon restarted from a config file that still names that source refuses to serve
 * it instead of silently serving stale data.
 *
 * A record is a small JSON file, replaced atomically. It is written in up to two places:
 *
 * - next to a source that is a regular file: `SOURCE.devfilter-cutover`. It travels with the
 *   data, so every daemon that is asked to serve that file sees it, whatever its config says
 *   and whichever export names the file (the daemon checks it before opening any backend);
 * - in the mirror's `stateDir`: `EXPORT.mirror-cutover`, seen by a mirror declared again on
 *   the export (which would otherwise copy the stale source over the newer target).
 *
 * A cutover writes its record once, `done`, inside the switch while every request is held, so
 * a record exists exactly when the target may hold data the source lacks. `pending` (written
 * before the switch by earlier versions) and unreadable records still refuse: which side is
 * current is then not known, and that is what they say.
 */
import fs from 'node:fs';
import { hostname } from 'node:os';
import { basename, dirname, join } from 'node:path';
import { fsyncDir, readIfExists, writeFileAtomic } from '../../core/durable-files.js';

export const FENCE_SUFFIX = '.devfilter-cutover';
const VERSION = 1;

export interface CutoverRecord {
  version: number;
  state: 'pending' | 'done';
  export: string;
  /** Backend label before the cutover ("file:/srv/a.img"). */
  from: string;
  /** Backend label after it. */
  to: string;
  /** When the cutover started (pending) or completed (done). */
  at: string;
  host: string;
}

/** A record found, and where. */
export interface FoundRecord {
  path: string;
  record: CutoverRecord;
}

/** The path of a `file:PATH` label, or undefined for any other kind of backend. */
export function fileOfLabel(label: string | undefined): string | undefined {
  return label?.startsWith('file:') === true ? label.slice('file:'.length) : undefined;
}

/**
 * Where a cutover away from `label` is recorded next to the data: only a regular file has a
 * directory that keeps a file beside it (a block device lives in /dev, which forgets).
 */
export function fenceOf(label: string | undefined): string | undefined {
  const path = fileOfLabel(label);
  if (path === undefined) return undefined;
  let real: string;
  try {
    if (!fs.statSync(path).isFile()) return undefined;
    // The file itself, however it is named (a symlink, another working directory): the
    // record must be found whichever name a config uses for it.
    real = fs.realpathSync(path);
  } catch {
    return undefined;
  }
  return `${real}${FENCE_SUFFIX}`;
}

export function stateDirRecord(stateDir: string, exportName: string): string {
  return join(stateDir, `${encodeURIComponent(exportName)}.mirror-cutover`);
}

export function newRecord(exportName: string, from: string, to: string): CutoverRecord {
  return {
    version: VERSION,
    state: 'pending',
    export: exportName,
    from,
    to,
    at: new Date().toISOString(),
    host: hostname(),
  };
}

export async function writeRecord(path: string, record: CutoverRecord): Promise<void> {
  await writeFileAtomic(
    dirname(path),
    basename(path),
    Buffer.from(`${JSON.stringify(record, null, 2)}\n`, 'utf8'),
  );
}

export async function removeRecord(path: string): Promise<void> {
  const existed = fs.existsSync(path);
  await fs.promises.rm(path, { force: true });
  await fs.promises.rm(`${path}.tmp`, { force: true });
  if (existed) await fsyncDir(dirname(path));
}

/**
 * The record at `path`, if any. A file there that cannot be parsed still means that someone
 * recorded a cutover: it is returned as a pending record of unknown sides (refuse, explain).
 */
export async function readRecord(path: string): Promise<CutoverRecord | undefined> {
  const data = await readIfExists(path);
  if (data === null) return undefined;
  try {
    const r = JSON.parse(data.toString('utf8')) as Partial<CutoverRecord>;
    if (typeof r.from === 'string' && typeof r.to === 'string' && typeof r.at === 'string')
      return {
        version: Number(r.version ?? VERSION),
        state: r.state === 'done' ? 'done' : 'pending',
        export: String(r.export ?? '?'),
        from: r.from,
        to: r.to,
        at: r.at,
        host: String(r.host ?? '?'),
      };
  } catch {
    // fall through: unreadable
  }
  return {
    version: VERSION,
    state: 'pending',
    export: '?',
    from: '?',
    to: '?',
    at: '?',
    host: '?',
  };
}

/**
 * If the backend `label` was cut over away from (a record next to it), the record; checked by
 * the daemon for every export before it opens any backend.
 */
export async function findFence(label: string): Promise<FoundRecord | undefined> {
  const path = fenceOf(label);
  if (path === undefined) return undefined;
  const record = await readRecord(path);
  return record === undefined ? undefined : { path, record };
}

/** What to tell the operator who asks to serve `label` again. */
export function describeStale(label: string, found: FoundRecord): string {
  const r = found.record;
  if (r.from === '?')
    return (
      `${found.path} records a cutover away from ${label}, but cannot be read, so the backend ` +
      `may hold stale data and is not served. Find where the data went (the mirror's target), ` +
      `point the export at the current copy, then delete ${found.path}.`
    );
  if (r.state === 'done')
    return (
      `the backend ${label} was cut over to ${r.to} by a mirror of export "${r.export}" ` +
      `(on ${r.host} at ${r.at}); it holds stale data and is not served. Point the export at ` +
      `${r.to} instead (and drop the mirror filter from the config, if it is declared there). ` +
      `To serve the old copy anyway, delete ${found.path}.`
    );
  return (
    `a cutover of export "${r.export}" from ${r.from} to ${r.to} was in progress (on ${r.host}, ` +
    `started ${r.at}) when the daemon stopped, so it is not known which of the two is current ` +
    `(if it stopped before the switch, the old one; after, the new one). Compare them ` +
    `(e.g. qemu-img compare), point the export at the current one, then delete ${found.path}.`
  );
}
