/**
 * Operation names shared by the built-in filters: the seven device operations, in the order
 * their counters and rules index them. The names are what users type (`ops=read,write`) and
 * what metrics carry in their `op` label.
 */

export const OP_NAMES = [
  'read',
  'write',
  'flush',
  'trim',
  'zero',
  'cache',
  'block-status',
] as const;

export type OpName = (typeof OP_NAMES)[number];

export const Op = {
  READ: 0,
  WRITE: 1,
  FLUSH: 2,
  TRIM: 3,
  ZERO: 4,
  CACHE: 5,
  BLOCK_STATUS: 6,
} as const;

export const OP_COUNT = OP_NAMES.length;

/** Bit of an operation in a mask of operations. */
export function opBit(op: number): number {
  return 1 << op;
}

export const ALL_OPS_MASK = (1 << OP_COUNT) - 1;

/** Accepted spellings besides the canonical names (e.g. the Device method names). */
const ALIASES: Record<string, number> = {
  writezeroes: Op.ZERO,
  'write-zeroes': Op.ZERO,
  write_zeroes: Op.ZERO,
  blockstatus: Op.BLOCK_STATUS,
  block_status: Op.BLOCK_STATUS,
  discard: Op.TRIM,
};

/** The index of an operation name (or alias), or -1. */
export function opIndex(name: string): number {
  const lower = name.trim().toLowerCase();
  const i = (OP_NAMES as readonly string[]).indexOf(lower);
  if (i >= 0) return i;
  return ALIASES[lower] ?? -1;
}

/**
 * Parses a set of operations: an array of names, or a string of names separated by commas
 * (`"read,write"`); `"all"` or `"*"` is every operation. Returns a bit mask, or throws with a
 * message naming the bad entry.
 */
export function parseOps(value: unknown): number {
  const list = typeof value === 'string' ? value.split(',') : Array.isArray(value) ? value : null;
  if (list === null)
    throw new Error('must be an operation name, a comma-separated list or an array of names');
  let mask = 0;
  for (const item of list) {
    if (typeof item !== 'string')
      throw new Error(`${JSON.stringify(item)} is not an operation name`);
    const name = item.trim().toLowerCase();
    if (name === 'all' || name === '*') {
      mask |= ALL_OPS_MASK;
      continue;
    }
    const i = opIndex(name);
    if (i < 0) throw new Error(`unknown operation "${item}" (one of: ${OP_NAMES.join(', ')}, all)`);
    mask |= opBit(i);
  }
  if (mask === 0) throw new Error('names no operation');
  return mask;
}

/** The names in a mask, in canonical order. */
export function opsOf(mask: number): OpName[] {
  return OP_NAMES.filter((_, i) => (mask & opBit(i)) !== 0);
}
