/**
 * Shared pieces of the interop tests: a daemon that is always stopped (and must exit 0),
 * sparse source images with known layouts, hashes, and parsers for client output.
 */
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import fs from 'node:fs';
import { spawnDaemon, type DaemonProcess } from '../helpers/server.js';

export const KIB = 1024;
export const MIB = 1024 * 1024;

/** Stops a daemon with SIGTERM; SIGKILLs it if it has not exited after `ms`. Resolves with its exit code. */
export async function stopWithin(
  d: DaemonProcess,
  ms = 10_000,
): Promise<{ code: number | null; ms: number; killed: boolean }> {
  const started = Date.now();
  let killed = false;
  const timer = setTimeout(() => {
    killed = true;
    void d.kill9();
  }, ms);
  const code = await d.stop();
  clearTimeout(timer);
  return { code, ms: Date.now() - started, killed };
}

/** Log lines of level error (50) or fatal (60) in the daemon's stderr. */
export function daemonErrors(d: DaemonProcess): string[] {
  return d
    .stderr()
    .split('\n')
    .filter((line) => {
      if (!line.startsWith('{')) return false;
      try {
        return (JSON.parse(line) as { level?: number }).level! >= 50;
      } catch {
        return false;
      }
    });
}

/**
 * Runs `fn` against a fresh `devfilter serve ARGS` and stops the daemon afterwards. When `fn`
 * succeeded, the daemon must exit 0 within 10 s of SIGTERM and must have logged no errors.
 */
export async function withDaemon<T>(
  args: string[],
  fn: (d: DaemonProcess) => Promise<T>,
): Promise<T> {
  const d = await spawnDaemon(args);
  let result: T;
  try {
    result = await fn(d);
  } catch (err) {
    await stopWithin(d);
    if (process.env.DEVFILTER_TEST_LOG !== undefined) process.stderr.write(d.stderr());
    throw err;
  }
  const stop = await stopWithin(d);
  assert.equal(
    stop.killed,
    false,
    `daemon did not exit within 10 s of SIGTERM:\n${tail(d.stderr())}`,
  );
  assert.equal(stop.code, 0, `daemon exit code after SIGTERM:\n${tail(d.stderr())}`);
  assert.deepEqual(daemonErrors(d), [], 'daemon logged errors');
  return result;
}

export function tail(text: string, chars = 3000): string {
  return text.length > chars ? '…' + text.slice(-chars) : text;
}

export function sha256(data: Buffer): string {
  return createHash('sha256').update(data).digest('hex');
}

export function sha256File(path: string): string {
  const h = createHash('sha256');
  const fd = fs.openSync(path, 'r');
  try {
    const buf = Buffer.alloc(4 * MIB);
    for (;;) {
      const n = fs.readSync(fd, buf, 0, buf.length, null);
      if (n === 0) break;
      h.update(buf.subarray(0, n));
    }
  } finally {
    fs.closeSync(fd);
  }
  return h.digest('hex');
}

export function readRange(path: string, offset: number, length: number): Buffer {
  const fd = fs.openSync(path, 'r');
  try {
    const buf = Buffer.alloc(length);
    const n = fs.readSync(fd, buf, 0, length, offset);
    return buf.subarray(0, n);
  } finally {
    fs.closeSync(fd);
  }
}

export interface Range {
  offset: number;
  length: number;
}

export interface SparseSource {
  path: string;
  size: number;
  sha256: string;
  /** 1 MiB chunks never written (holes in the file); the last chunk is always one. */
  holes: Range[];
  /** 1 MiB chunks written with explicit zeros (allocated, but reading as zeros). */
  zeroData: Range[];
  /** Random data (including a small unaligned piece inside one of the holes' chunks). */
  data: Range[];
}

/**
 * Writes a sparse file of `size` bytes (a multiple of 1 MiB, at least 8 MiB) out of 1 MiB chunks:
 * every fourth chunk (from chunk 1) and the last one are holes, every eighth (from chunk 3) is
 * written zeros, the others are random. Chunk 5 is a hole except for 4097 random bytes at an
 * unaligned offset, so that copies must handle data that does not start on a block boundary.
 */
export function makeSparseSource(path: string, size: number): SparseSource {
  assert.ok(size % MIB === 0 && size >= 8 * MIB);
  const chunks = size / MIB;
  const fd = fs.openSync(path, 'w');
  const holes: Range[] = [];
  const zeroData: Range[] = [];
  const data: Range[] = [];
  try {
    fs.ftruncateSync(fd, size);
    const zero = Buffer.alloc(MIB);
    for (let i = 0; i < chunks; i++) {
      const offset = i * MIB;
      if ((i % 4 === 1 && i !== 5) || i === chunks - 1) {
        holes.push({ offset, length: MIB });
      } else if (i === 5) {
        const piece = { offset: offset + 12345, length: 4097 };
        fs.writeSync(fd, randomBytes(piece.length), 0, piece.length, piece.offset);
        data.push(piece);
      } else if (i % 8 === 3) {
        fs.writeSync(fd, zero, 0, MIB, offset);
        zeroData.push({ offset, length: MIB });
      } else {
        fs.writeSync(fd, randomBytes(MIB), 0, MIB, offset);
        data.push({ offset, length: MIB });
      }
    }
  } finally {
    fs.closeSync(fd);
  }
  return { path, size, sha256: sha256File(path), holes, zeroData, data };
}

export interface MapExtent {
  offset: number;
  length: number;
  type: number;
  description: string;
}

/** Parses `nbdinfo --map` text output: "offset length type description" per line. */
export function parseNbdinfoMap(text: string): MapExtent[] {
  return text
    .split('\n')
    .filter((l) => l.trim() !== '')
    .map((line) => {
      const m = /^\s*(\d+)\s+(\d+)\s+(\d+)\s*(.*)$/.exec(line);
      assert.ok(m, `unexpected nbdinfo --map line ${JSON.stringify(line)}`);
      return {
        offset: Number(m[1]),
        length: Number(m[2]),
        type: Number(m[3]),
        description: m[4]!.trim(),
      };
    });
}

/** Asserts that extents are sorted, contiguous, and cover [0, size) exactly. */
export function assertCovers(extents: Range[], size: number, what: string): void {
  let pos = 0;
  for (const e of extents) {
    assert.equal(
      e.offset,
      pos,
      `${what}: extent at ${e.offset} should start at ${pos}: ${JSON.stringify(extents)}`,
    );
    assert.ok(e.length > 0, `${what}: empty extent at ${e.offset}`);
    pos += e.length;
  }
  assert.equal(pos, size, `${what}: extents end at ${pos}, export size is ${size}`);
}

/** The extents that overlap [r.offset, r.offset + r.length). */
export function overlapping<E extends Range>(extents: E[], r: Range): E[] {
  return extents.filter((e) => e.offset < r.offset + r.length && r.offset < e.offset + e.length);
}

/** Bytes allocated on disk for a file (st_blocks counts 512-byte units). */
export function allocatedBytes(path: string): number {
  return fs.statSync(path).blocks * 512;
}
