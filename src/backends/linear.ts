/**
 * A device made of consecutive pieces of other devices, as device-mapper's `linear` target
 * makes one: piece i covers bytes [start_i, start_i + length_i) and lives at `offset_i` of its
 * device. `devfilter interpose` serves a dm device's table this way, over the very devices the
 * table named, so that the bytes are where they always were.
 *
 * Requests that cross a boundary are split and their pieces run together; FUA goes to each
 * piece; flush flushes every underlying device once. The underlying devices are opened here
 * (buffered: their logical block size, often 512, is finer than O_DIRECT's 4 KiB here) and
 * their page cache is dropped when they are opened and after the last flush at close: the
 * device-mapper table this replaces or is replaced by bypasses that cache, so nothing in it
 * may be taken for the disk's content.
 */
import fs from 'node:fs';
import type { Device, DeviceInfo, Extent, IoContext } from '../core/device.js';
import { DEFAULT_BLOCK_SIZE } from '../core/device.js';
import { assert } from '../core/errors.js';
import { FileBackend } from './file.js';
import { dropPageCache } from './libc.js';

export interface LinearSegment {
  /** Byte range of the linear device this piece covers. */
  start: number;
  length: number;
  /** Path of the underlying device (or file) and the byte offset of the piece in it. */
  path: string;
  offset: number;
}

interface Piece {
  start: number;
  length: number;
  device: Device;
  offset: number;
}

export class LinearBackend implements Device {
  private readonly facts: DeviceInfo;

  private constructor(
    private readonly pieces: readonly Piece[],
    private readonly devices: ReadonlyMap<string, Device>,
  ) {
    const infos = [...devices.values()].map((d) => d.info());
    const all = (k: keyof DeviceInfo['caps']) => infos.every((i) => i.caps[k]);
    const last = pieces[pieces.length - 1]!;
    this.facts = Object.freeze({
      size: last.start + last.length,
      blockSize: Object.freeze({
        minimum: Math.max(1, ...infos.map((i) => i.blockSize.minimum)),
        preferred: Math.max(
          DEFAULT_BLOCK_SIZE.preferred,
          ...infos.map((i) => i.blockSize.preferred),
        ),
        maximum: Math.min(...infos.map((i) => i.blockSize.maximum)),
      }),
      caps: Object.freeze({
        readOnly: infos.some((i) => i.caps.readOnly),
        flush: all('flush'),
        fua: all('fua'),
        trim: all('trim'),
        zero: all('zero'),
        fastZero: all('fastZero'),
        cache: all('cache'),
        multiConn: all('multiConn'),
        rotational: infos.some((i) => i.caps.rotational),
      }),
    });
  }

  /** Opens the underlying devices; checks that the pieces follow each other and fit them. */
  static async open(
    segments: readonly LinearSegment[],
    opts: { readOnly?: boolean } = {},
  ): Promise<LinearBackend> {
    if (segments.length === 0) throw new Error('a linear device needs at least one segment');
    let at = 0;
    for (const s of segments) {
      if (s.start !== at)
        throw new Error(`linear segment at ${s.start} does not follow the previous one (${at})`);
      if (!(s.length > 0) || !Number.isSafeInteger(s.length) || !(s.offset >= 0))
        throw new Error(`linear segment at ${s.start}: bad length or offset`);
      at += s.length;
    }
    const devices = new Map<string, Device>();
    try {
      for (const s of segments) {
        if (devices.has(s.path)) continue;
        await dropCache(s.path);
        devices.set(s.path, await FileBackend.open(s.path, { readOnly: opts.readOnly === true }));
      }
      const pieces = segments.map((s) => {
        const device = devices.get(s.path)!;
        if (s.offset + s.length > device.info().size)
          throw new Error(
            `linear segment at ${s.start}: ${s.path} has ${device.info().size} bytes, the segment needs ${s.offset + s.length}`,
          );
        return { start: s.start, length: s.length, device, offset: s.offset };
      });
      return new LinearBackend(pieces, devices);
    } catch (err) {
      for (const d of devices.values()) await d.close().catch(() => undefined);
      throw err;
    }
  }

  info(): DeviceInfo {
    return this.facts;
  }

  /** Runs `fn` on each piece of [offset, offset + length), together. */
  private split(
    offset: number,
    length: number,
    fn: (p: Piece, at: number, len: number, within: number) => Promise<void>,
  ): Promise<void> {
    const jobs: Promise<void>[] = [];
    let i = this.find(offset);
    for (let pos = offset; pos < offset + length; i++) {
      const p = this.pieces[i]!;
      const len = Math.min(offset + length, p.start + p.length) - pos;
      jobs.push(fn(p, p.offset + (pos - p.start), len, pos - offset));
      pos += len;
    }
    return jobs.length === 1 ? jobs[0]! : Promise.all(jobs).then(() => undefined);
  }

  /** The piece holding byte `offset` (binary search). */
  private find(offset: number): number {
    let lo = 0;
    let hi = this.pieces.length - 1;
    while (lo < hi) {
      const mid = (lo + hi + 1) >> 1;
      if (this.pieces[mid]!.start <= offset) lo = mid;
      else hi = mid - 1;
    }
    return lo;
  }

  read(buf: Buffer, offset: number, flags: number, ctx?: IoContext): Promise<void> {
    return this.split(offset, buf.length, (p, at, len, within) =>
      p.device.read(buf.subarray(within, within + len), at, flags, ctx),
    );
  }

  write(data: Buffer, offset: number, flags: number, ctx?: IoContext): Promise<void> {
    return this.split(offset, data.length, (p, at, len, within) =>
      p.device.write(data.subarray(within, within + len), at, flags, ctx),
    );
  }

  trim(offset: number, length: number, flags: number, ctx?: IoContext): Promise<void> {
    return this.split(offset, length, (p, at, len) => p.device.trim(at, len, flags, ctx));
  }

  writeZeroes(offset: number, length: number, flags: number, ctx?: IoContext): Promise<void> {
    return this.split(offset, length, (p, at, len) => p.device.writeZeroes(at, len, flags, ctx));
  }

  cache(offset: number, length: number, flags: number, ctx?: IoContext): Promise<void> {
    return this.split(offset, length, (p, at, len) => p.device.cache(at, len, flags, ctx));
  }

  async flush(flags: number, ctx?: IoContext): Promise<void> {
    await Promise.all([...this.devices.values()].map((d) => d.flush(flags, ctx)));
  }

  /** Extents of the piece holding `offset` only: the caller asks again for the rest. */
  async blockStatus(
    offset: number,
    length: number,
    flags: number,
    ctx?: IoContext,
  ): Promise<Extent[]> {
    const p = this.pieces[this.find(offset)]!;
    const len = Math.min(length, p.start + p.length - offset);
    const extents = await p.device.blockStatus(p.offset + (offset - p.start), len, flags, ctx);
    // Clip to the piece: the next piece's bytes are elsewhere.
    const out: Extent[] = [];
    let left = p.start + p.length - offset;
    for (const e of extents) {
      if (left <= 0) break;
      const n = Math.min(e.length, left);
      out.push({ length: n, state: e.state });
      left -= n;
    }
    assert(out.length > 0, 'no extent from the device below');
    return out;
  }

  async close(): Promise<void> {
    const paths = [...this.devices.keys()];
    try {
      if (!this.facts.caps.readOnly) await this.flush(0);
    } finally {
      for (const d of this.devices.values()) await d.close();
    }
    for (const path of paths) await dropCache(path);
  }
}

/** Drops the clean cached pages of a block device (a no-op for what is not one). */
async function dropCache(path: string): Promise<void> {
  const st = await fs.promises.stat(path);
  if (!st.isBlockDevice()) return;
  const fd = fs.openSync(path, fs.constants.O_RDONLY);
  try {
    await dropPageCache(fd);
  } finally {
    fs.closeSync(fd);
  }
}
