/**
 * device-mapper tables as `dmsetup table` prints them: one line per target,
 * `START LENGTH TARGET ARGS...` in 512-byte sectors. `devfilter interpose` understands the
 * `linear` target only (`linear DEVICE OFFSET`, the LVM case) and refuses anything else with
 * the table in the message: a table it cannot reproduce byte for byte must not be touched.
 */
export const SECTOR = 512;

export interface LinearTarget {
  /** First sector of the dm device this target covers, and how many. */
  start: number;
  length: number;
  /** The underlying device as the table names it: "MAJOR:MINOR" or a path. */
  device: string;
  /** Sector offset in the underlying device. */
  offset: number;
}

export class TableError extends Error {
  override name = 'TableError';
}

function sectors(word: string | undefined, what: string, table: string): number {
  const n = Number(word);
  if (word === undefined || !/^\d+$/.test(word) || !Number.isSafeInteger(n * SECTOR))
    throw new TableError(
      `${what} ${JSON.stringify(word)} is not a sector count in table:\n${table}`,
    );
  return n;
}

/** Parses a whole table of linear targets that cover the device from sector 0 without gaps. */
export function parseLinearTable(text: string): LinearTarget[] {
  const table = text.trim();
  const lines = table
    .split('\n')
    .map((l) => l.trim())
    .filter((l) => l !== '');
  if (lines.length === 0) throw new TableError('the device has no table (is it loaded?)');
  const out: LinearTarget[] = [];
  let next = 0;
  for (const line of lines) {
    const w = line.split(/\s+/);
    if (w[2] !== 'linear' || w.length !== 5)
      throw new TableError(
        `only "linear" targets can be interposed; this table has "${w[2] ?? line}":\n${table}`,
      );
    const t: LinearTarget = {
      start: sectors(w[0], 'start', table),
      length: sectors(w[1], 'length', table),
      device: w[3]!,
      offset: sectors(w[4], 'offset', table),
    };
    if (t.start !== next)
      throw new TableError(`targets do not follow each other at sector ${next}:\n${table}`);
    if (t.length === 0) throw new TableError(`empty target at sector ${t.start}:\n${table}`);
    next = t.start + t.length;
    out.push(t);
  }
  return out;
}

/** One linear target over `device` covering `sectors` sectors from 0. */
export function singleLinearTable(sectorsCount: number, device: string): string {
  return `0 ${sectorsCount} linear ${device} 0`;
}
