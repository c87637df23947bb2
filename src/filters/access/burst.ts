/**
 * The access filter's write-burst guard: the pattern of ransomware encrypting a disk in
 * place — overwrites of blocks that held data, with data that looks random (high entropy),
 * at a high rate — detected per client, with an alert and, if configured, writes from that
 * client refused from then on (and a snapshot asked of the export's snapshot filter).
 *
 * "Held data": written through the filter since it was attached, or reported allocated by
 * the device below (asked when a write first touches a block; one bit per 4 KiB block seen,
 * in pages allocated as blocks are first written: 32 MiB per TiB written at most). A device
 * without block status makes every block count as holding data. Entropy is the
 * Shannon entropy of the written bytes, in bits per byte (8 for random data, 4–5 for text),
 * sampled over at most SAMPLE_BYTES per request. The rate is the bytes of such overwrites in
 * a sliding window of whole seconds.
 */
import type { Device, IoContext } from '../../core/device.js';
import { ExtentState } from '../../core/device.js';

export interface BurstConfig {
  /** Suspicious overwrite bytes per second (averaged over the window) that trip the guard. */
  bytesPerSecond: number;
  windowSeconds: number;
  /** Writes below this entropy (bits per byte) are not suspicious. */
  minEntropy: number;
  /** alert: an event and an audit line; deny: also refuse that client's writes from then on. */
  action: 'alert' | 'deny';
  /** Ask the export's snapshot filter for a snapshot when the guard trips. */
  snapshot: boolean;
}

export const BURST_GUARD_SCHEMA = {
  type: 'object',
  properties: {
    bytesPerSecond: { type: 'integer', minimum: 1 },
    windowSeconds: { type: 'integer', minimum: 1, maximum: 3600 },
    minEntropy: { type: 'number', minimum: 0, maximum: 8 },
    action: { type: 'string', enum: ['alert', 'deny'] },
    snapshot: { type: 'boolean' },
  },
  required: ['bytesPerSecond'],
  additionalProperties: false,
} as const;

export function burstConfigOf(raw: Record<string, unknown>): BurstConfig {
  return {
    bytesPerSecond: raw.bytesPerSecond as number,
    windowSeconds: (raw.windowSeconds as number | undefined) ?? 10,
    minEntropy: (raw.minEntropy as number | undefined) ?? 7.5,
    action: (raw.action as 'alert' | 'deny' | undefined) ?? 'alert',
    snapshot: (raw.snapshot as boolean | undefined) ?? false,
  };
}

/** The unit the guard tracks blocks in. */
const BLOCK = 4096;
const PAGE_BLOCKS = 32768;
const SAMPLE_BYTES = 64 * 1024;
/** At most this many clients are tracked; the least recently seen goes first. */
const MAX_CLIENTS = 4096;

/** Bits for blocks, in pages allocated where blocks are set. */
class PagedBits {
  private readonly pages = new Map<number, Uint8Array>();

  get(b: number): boolean {
    const page = this.pages.get(Math.floor(b / PAGE_BLOCKS));
    const i = b % PAGE_BLOCKS;
    return page !== undefined && (page[i >> 3]! & (1 << (i & 7))) !== 0;
  }

  set(b: number): void {
    const key = Math.floor(b / PAGE_BLOCKS);
    let page = this.pages.get(key);
    if (page === undefined) this.pages.set(key, (page = new Uint8Array(PAGE_BLOCKS / 8)));
    const i = b % PAGE_BLOCKS;
    page[i >> 3]! |= 1 << (i & 7);
  }

  get bytes(): number {
    return this.pages.size * (PAGE_BLOCKS / 8);
  }
}

/** Shannon entropy in bits per byte of (a sample of) `data`. */
export function entropyOf(data: Buffer): number {
  const counts = new Uint32Array(256);
  const step = data.length > SAMPLE_BYTES ? Math.floor(data.length / SAMPLE_BYTES) : 1;
  let n = 0;
  for (let i = 0; i < data.length; i += step) {
    counts[data[i]!]!++;
    n++;
  }
  let h = 0;
  for (let v = 0; v < 256; v++) {
    const c = counts[v]!;
    if (c === 0) continue;
    const p = c / n;
    h -= p * Math.log2(p);
  }
  return h;
}

/** A client's identity for the guard: the strongest one the connection has. */
export function clientKey(ctx: IoContext | undefined): string {
  const c = ctx?.client;
  if (c === undefined) return 'internal';
  if (c.tlsSubject !== undefined) return `tls:${c.tlsSubject}`;
  if (c.pskIdentity !== undefined) return `psk:${c.pskIdentity}`;
  if (c.transport === 'unix') return `unix:uid=${c.uid ?? '?'}`;
  if (c.transport === 'tcp') return `tcp:${c.address ?? '?'}`;
  return c.transport;
}

interface ClientWindow {
  /** Bytes per second-slot of the window, and the second each slot holds. */
  bytes: Float64Array;
  seconds: Float64Array;
  tripped: boolean;
  trippedAt?: string;
}

export interface Trip {
  client: string;
  bytes: number;
  windowSeconds: number;
  entropy: number;
}

export class BurstGuard {
  /** Blocks the guard has looked at: written through the filter, or asked about below. */
  private readonly seen = new PagedBits();
  private readonly clients = new Map<string, ClientWindow>();
  private readonly blocked = new Set<string>();
  trips = 0;
  suspiciousBytes = 0;

  constructor(
    private cfg: BurstConfig,
    private readonly size: number,
  ) {}

  configure(cfg: BurstConfig): void {
    // Windows of another length would be compared with the new budget: start them over.
    if (cfg.windowSeconds !== this.cfg.windowSeconds) this.clients.clear();
    this.cfg = cfg;
  }

  get config(): BurstConfig {
    return this.cfg;
  }

  isBlocked(ctx: IoContext | undefined): boolean {
    return this.blocked.size > 0 && this.blocked.has(clientKey(ctx));
  }

  /** Unblocks one client (by key) or all, and re-arms their windows (all, without a key). */
  reset(key?: string): string[] {
    const keys = key === undefined ? [...this.blocked] : [key];
    for (const k of keys) this.blocked.delete(k);
    if (key === undefined) this.clients.clear();
    else this.clients.delete(key);
    return keys;
  }

  /**
   * Looks at a write before it goes down: how many of its bytes overwrite data, with what
   * entropy; returns the trip if this write takes its client over the limit (once per trip).
   */
  async observe(
    next: Device,
    data: Buffer,
    offset: number,
    ctx: IoContext | undefined,
  ): Promise<Trip | null> {
    const length = data.length;
    if (length === 0) return null;
    const b0 = Math.floor(offset / BLOCK);
    const b1 = Math.ceil((offset + length) / BLOCK);
    // Blocks never seen are asked about below: the device knows which hold data.
    let firstUnseen = -1;
    for (let b = b0; b < b1 && firstUnseen < 0; b++) if (!this.seen.get(b)) firstUnseen = b;
    const held = firstUnseen < 0 ? null : await this.heldData(next, b0, b1);
    let overwritten = 0;
    for (let b = b0; b < b1; b++) {
      if (held === null ? true : this.seen.get(b) || held.has(b)) {
        const from = Math.max(offset, b * BLOCK);
        const to = Math.min(offset + length, (b + 1) * BLOCK);
        overwritten += to - from;
      }
      this.seen.set(b);
    }
    if (overwritten === 0) return null;
    const entropy = entropyOf(data);
    if (entropy < this.cfg.minEntropy) return null;
    this.suspiciousBytes += overwritten;
    const key = clientKey(ctx);
    const w = this.window(key);
    // A monotonic clock: a wall-clock step back must not revive old slots.
    const now = Math.floor(performance.now() / 1000);
    const slot = now % w.bytes.length;
    if (w.seconds[slot] !== now) {
      w.seconds[slot] = now;
      w.bytes[slot] = 0;
    }
    w.bytes[slot]! += overwritten;
    let sum = 0;
    for (let i = 0; i < w.bytes.length; i++)
      if (now - w.seconds[i]! < w.bytes.length) sum += w.bytes[i]!;
    if (sum <= this.cfg.bytesPerSecond * this.cfg.windowSeconds) {
      // Back under the limit: the next burst alerts again (with deny, the client stays
      // stopped until burst-reset).
      w.tripped = false;
      return null;
    }
    if (w.tripped) return null;
    w.tripped = true;
    w.trippedAt = new Date().toISOString();
    this.trips++;
    if (this.cfg.action === 'deny') this.blocked.add(key);
    return { client: key, bytes: sum, windowSeconds: this.cfg.windowSeconds, entropy };
  }

  /** The blocks of [b0, b1) that the device below reports as holding data. */
  private async heldData(next: Device, b0: number, b1: number): Promise<Set<number> | null> {
    const held = new Set<number>();
    let pos = b0 * BLOCK;
    const end = Math.min(b1 * BLOCK, this.size);
    try {
      while (pos < end) {
        const extents = await next.blockStatus(pos, end - pos, 0);
        if (extents.length === 0) break;
        for (const e of extents) {
          if (pos >= end) break;
          const len = Math.min(e.length, end - pos);
          if ((e.state & (ExtentState.HOLE | ExtentState.ZERO)) === 0)
            for (let b = Math.floor(pos / BLOCK); b * BLOCK < pos + len; b++) held.add(b);
          pos += len;
        }
      }
      return held;
    } catch {
      return null; // no block status below: every block counts as holding data (cautious)
    }
  }

  private window(key: string): ClientWindow {
    let w = this.clients.get(key);
    if (w !== undefined) {
      // Most recently seen last: the map's order is the eviction order.
      this.clients.delete(key);
      this.clients.set(key, w);
      return w;
    }
    if (this.clients.size >= MAX_CLIENTS) {
      const oldest = this.clients.keys().next().value as string;
      this.clients.delete(oldest);
    }
    w = {
      bytes: new Float64Array(this.cfg.windowSeconds),
      seconds: new Float64Array(this.cfg.windowSeconds).fill(-1),
      tripped: false,
    };
    this.clients.set(key, w);
    return w;
  }

  status(): Record<string, unknown> {
    return {
      ...this.cfg,
      trips: this.trips,
      suspiciousBytes: this.suspiciousBytes,
      blockedClients: [...this.blocked],
      trackedClients: this.clients.size,
      bitmapBytes: this.seen.bytes,
    };
  }
}
