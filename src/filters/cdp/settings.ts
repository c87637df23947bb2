/** The cdp filter's arguments, their defaults and limits (docs/cdp.md#arguments). */
import { sizeArg } from '../args.js';

// A type, not an interface: it must fit Record<string, unknown> (the registry's argument type).
export type CdpArgs = {
  dir: string;
  blockSize?: number | string;
  keepHours?: number;
  keepBytes?: number | string;
  segmentSize?: number | string;
  indexLimit?: number;
  onError?: 'keep-serving' | 'stop-writes';
};

export const REMOVAL_POLICIES = ['keep', 'discard'] as const;
export const DEFAULT_BLOCK_SIZE = 4096;
export const MIN_BLOCK_SIZE = 512;
export const MAX_BLOCK_SIZE = 1024 * 1024;
export const DEFAULT_KEEP_HOURS = 24;
export const DEFAULT_INDEX_LIMIT = 4 * 1024 * 1024;
const MIN_SEGMENT_BYTES = 64 * 1024;
const MAX_SEGMENT_BYTES = 1024 * 1024 * 1024;
const DEFAULT_SEGMENT_BYTES = 64 * 1024 * 1024;
/** How long a rollback waits for the requests in flight before it gives up. */
export const DEFAULT_PAUSE_TIMEOUT_MS = 30_000;

export interface Settings {
  blockSize: number;
  keepMs: number;
  keepBytes: number;
  segmentBytes: number;
  indexLimit: number;
  onError: 'keep-serving' | 'stop-writes';
}

/** Checks the arguments beyond the schema; throws with a message that says what is wrong. */
export function checkArgs(args: CdpArgs, size: number): Settings {
  const blockSize = sizeArg('blockSize', args.blockSize, DEFAULT_BLOCK_SIZE);
  if (
    (blockSize & (blockSize - 1)) !== 0 ||
    blockSize < MIN_BLOCK_SIZE ||
    blockSize > MAX_BLOCK_SIZE
  )
    throw new Error(
      `blockSize must be a power of two from ${MIN_BLOCK_SIZE} to ${MAX_BLOCK_SIZE} bytes, got ${blockSize}`,
    );
  const keepHours = args.keepHours ?? DEFAULT_KEEP_HOURS;
  if (!(keepHours >= 0)) throw new Error('keepHours must be 0 (no age limit) or more');
  const keepBytes = sizeArg('keepBytes', args.keepBytes, Math.max(size, 64 * 1024 * 1024));
  const segmentBytes = sizeArg(
    'segmentSize',
    args.segmentSize,
    Math.min(DEFAULT_SEGMENT_BYTES, Math.max(MIN_SEGMENT_BYTES, Math.floor(keepBytes / 8))),
  );
  if (segmentBytes < MIN_SEGMENT_BYTES || segmentBytes > MAX_SEGMENT_BYTES)
    throw new Error(
      `segmentSize must be from ${MIN_SEGMENT_BYTES} to ${MAX_SEGMENT_BYTES} bytes, got ${segmentBytes}`,
    );
  if (keepBytes < 2 * segmentBytes)
    throw new Error(
      `keepBytes (${keepBytes}) must be at least two segments (segmentSize ${segmentBytes})`,
    );
  const indexLimit = args.indexLimit ?? DEFAULT_INDEX_LIMIT;
  if (!Number.isSafeInteger(indexLimit) || indexLimit < 1024)
    throw new Error('indexLimit must be a whole number, at least 1024');
  return {
    blockSize,
    keepMs: keepHours * 3600_000,
    keepBytes,
    segmentBytes,
    indexLimit,
    onError: args.onError ?? 'keep-serving',
  };
}
