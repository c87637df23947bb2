/**
 * A backend that is an export of another NBD server (`nbd://host:port/name`,
 * `nbd+unix:///name?socket=PATH`): the remote side of a migration, or a device served
 * elsewhere with filters put in front of it here.
 *
 * - Several connections when the server allows multi-conn (a flush on one then covers the
 *   writes of all); one otherwise. Requests go to the connection with the fewest in flight.
 * - A lost connection is reopened with exponential back-off; requests wait for it (up to
 *   `retryTimeoutMs`) and are sent again — reads, writes, trims and zeroing are idempotent.
 * - What a lost connection may have lost is never hidden: if writes completed since the last
 *   flush when a connection dropped, the server may have lost them (it crashed, or restarted
 *   without syncing), so the next flush fails with EIO — once — instead of vouching for them.
 * - The server's errors keep their meaning (EPERM, ENOSPC, EINVAL, … from the NBD error).
 */
import type { Logger } from 'pino';
import {
  ExtentState,
  RequestFlags,
  type Device,
  type DeviceCapabilities,
  type DeviceInfo,
  type Extent,
} from '../core/device.js';
import { DEFAULT_BLOCK_SIZE } from '../core/device.js';
import { DeviceError, assert, isErrno } from '../core/errors.js';
import { NbdClient, NbdConnectionError, NbdRequestError, parseNbdUri } from '../nbd/client.js';
import { BASE_ALLOCATION, CmdFlag, TFlag } from '../nbd/protocol.js';

export interface NbdBackendOptions {
  /** Connections to open when the server allows multi-conn (1..16, default 4). */
  connections?: number;
  /** How long a request waits for a lost connection to come back (default 30 s). */
  retryTimeoutMs?: number;
  /** Back-off between reconnection attempts: first and largest delay (100 ms, 5 s). */
  backoffMs?: { initial: number; max: number };
  readOnly?: boolean;
  logger?: Logger;
}

const MAX_CONNECTIONS = 16;

interface Slot {
  client: NbdClient | null;
  inFlight: number;
  reconnecting: boolean;
}

function capsOf(flags: number, readOnly: boolean): DeviceCapabilities {
  const has = (f: number): boolean => (flags & f) !== 0;
  return {
    readOnly: readOnly || has(TFlag.READ_ONLY),
    flush: has(TFlag.SEND_FLUSH),
    fua: has(TFlag.SEND_FUA),
    trim: has(TFlag.SEND_TRIM),
    zero: has(TFlag.SEND_WRITE_ZEROES),
    fastZero: has(TFlag.SEND_FAST_ZERO),
    cache: has(TFlag.SEND_CACHE),
    multiConn: has(TFlag.CAN_MULTI_CONN),
    rotational: has(TFlag.ROTATIONAL),
  };
}

/** Request flags as NBD puts them on the wire (FAST_ZERO differs: the wire's 4 is DF). */
function wireFlags(flags: number): number {
  let w = 0;
  if (flags & RequestFlags.FUA) w |= CmdFlag.FUA;
  if (flags & RequestFlags.NO_HOLE) w |= CmdFlag.NO_HOLE;
  if (flags & RequestFlags.FAST_ZERO) w |= CmdFlag.FAST_ZERO;
  if (flags & RequestFlags.REQ_ONE) w |= CmdFlag.REQ_ONE;
  return w;
}

/** The server's answer to one request, as a DeviceError with the same meaning. */
function mapError(err: unknown): unknown {
  if (err instanceof NbdRequestError) {
    const name = err.errnoName;
    return new DeviceError(name !== undefined && isErrno(name) ? name : 'EIO', err.message, {
      cause: err,
    });
  }
  return err;
}

export class NbdBackend implements Device {
  private readonly slots: Slot[];
  private readonly facts: DeviceInfo;
  private readonly waiters = new Set<() => void>();
  private closed = false;
  /** Writes, trims and zeroings completed and not yet covered by a successful flush. */
  private unflushed = 0;
  /**
   * Connections that dropped while `unflushed` > 0 (the server may have lost those writes),
   * and how many of those drops a flush has reported: a flush fails while they differ.
   */
  private losses = 0;
  private reportedLosses = 0;
  private lastLoss = '';
  private readonly timers = new Set<NodeJS.Timeout>();
  private readonly retryTimeoutMs: number;
  /** The transmission flags of the first connection: every later one must match. */
  private readonly flags: number;
  private readonly backoff: { initial: number; max: number };

  private constructor(
    readonly uri: string,
    first: NbdClient,
    count: number,
    private readonly opts: NbdBackendOptions,
  ) {
    this.flags = first.transmissionFlags;
    this.retryTimeoutMs = opts.retryTimeoutMs ?? 30_000;
    this.backoff = opts.backoffMs ?? { initial: 100, max: 5000 };
    this.facts = Object.freeze({
      size: first.size,
      blockSize: first.blockSize ?? DEFAULT_BLOCK_SIZE,
      caps: Object.freeze(capsOf(first.transmissionFlags, opts.readOnly === true)),
    });
    this.slots = Array.from({ length: count }, (_, i) => ({
      client: i === 0 ? first : null,
      inFlight: 0,
      reconnecting: false,
    }));
    this.watch(this.slots[0]!, first);
  }

  /** Connects (the first connection must succeed) and opens the others in the background. */
  static async open(uri: string, opts: NbdBackendOptions = {}): Promise<NbdBackend> {
    parseNbdUri(uri); // a malformed URI fails here, before the argument checks below
    const wanted = opts.connections ?? 4;
    if (!Number.isInteger(wanted) || wanted < 1 || wanted > MAX_CONNECTIONS)
      throw new Error(`connections must be 1 to ${MAX_CONNECTIONS}, got ${wanted}`);
    let first: NbdClient;
    try {
      first = await NbdClient.fromUri(uri, { metaContexts: [BASE_ALLOCATION] });
    } catch (err) {
      throw new Error(`cannot open remote NBD export ${uri}: ${(err as Error).message}`, {
        cause: err,
      });
    }
    // Without multi-conn a flush on one connection need not cover another's writes.
    const count = (first.transmissionFlags & TFlag.CAN_MULTI_CONN) !== 0 ? wanted : 1;
    const b = new NbdBackend(uri, first, count, opts);
    for (const s of b.slots) if (s.client === null) b.reconnect(s);
    return b;
  }

  info(): DeviceInfo {
    return this.facts;
  }

  get connections(): number {
    return this.slots.filter((s) => s.client !== null).length;
  }

  /** When a connection ends, note what it may have lost and open it again. */
  private watch(slot: Slot, client: NbdClient): void {
    void client.closed.then((reason) => this.lost(slot, client, reason));
  }

  /**
   * A connection is gone (its socket closed, or a request found it failed): take it out at
   * once — before its 'close' event, so that no retry picks it again — count what it may have
   * lost, and open it again.
   */
  private lost(slot: Slot, client: NbdClient, reason: Error | undefined): void {
    if (slot.client !== client) return;
    slot.client = null;
    if (this.closed) return;
    if (this.unflushed > 0) {
      this.losses++;
      this.lastLoss = `the connection to ${this.uri} dropped with ${this.unflushed} write(s) not yet flushed (${reason?.message ?? 'closed'}); the server may have lost them`;
    }
    this.opts.logger?.warn({ uri: this.uri, err: reason }, 'remote NBD connection lost');
    void client.close().catch(() => undefined);
    this.reconnect(slot);
  }

  /** A delay that close() cancels. */
  private sleep(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const t = setTimeout(() => {
        this.timers.delete(t);
        resolve();
      }, ms);
      t.unref();
      this.timers.add(t);
    });
  }

  private reconnect(slot: Slot): void {
    if (slot.reconnecting || this.closed) return;
    slot.reconnecting = true;
    void (async () => {
      let delay = this.backoff.initial;
      while (!this.closed) {
        try {
          const c = await NbdClient.fromUri(this.uri, { metaContexts: [BASE_ALLOCATION] });
          if (c.size !== this.facts.size || c.transmissionFlags !== this.flags) {
            await c.close();
            // Another device, or the same with other guarantees (multi-conn, flush, FUA,
            // read-only): carrying on would break promises already made to clients.
            throw new Error(
              `the export changed: ${c.size} bytes and flags 0x${c.transmissionFlags.toString(16)}, was ${this.facts.size} bytes and 0x${this.flags.toString(16)}`,
            );
          }
          if (this.closed) {
            await c.close();
            break;
          }
          slot.client = c;
          this.watch(slot, c);
          this.opts.logger?.info({ uri: this.uri }, 'remote NBD connection open');
          for (const w of [...this.waiters]) w();
          break;
        } catch (err) {
          this.opts.logger?.warn({ uri: this.uri, err }, 'remote NBD reconnect failed');
          await this.sleep(delay);
          delay = Math.min(this.backoff.max, delay * 2);
        }
      }
      slot.reconnecting = false;
    })();
  }

  /** The live connection with the fewest requests in flight, waiting for one if none is. */
  private async pick(deadline: number): Promise<Slot> {
    for (;;) {
      if (this.closed) throw new DeviceError('ESHUTDOWN', `remote NBD backend ${this.uri} closed`);
      let best: Slot | undefined;
      for (const s of this.slots)
        if (s.client !== null && (best === undefined || s.inFlight < best.inFlight)) best = s;
      if (best !== undefined) return best;
      const left = deadline - Date.now();
      if (left <= 0) throw new DeviceError('EIO', `remote NBD server ${this.uri} unreachable`);
      await new Promise<void>((resolve) => {
        const done = (): void => {
          clearTimeout(timer);
          this.waiters.delete(done);
          resolve();
        };
        const timer = setTimeout(done, left);
        timer.unref();
        this.waiters.add(done);
      });
    }
  }

  /** Runs `op` on a connection; a lost connection is retried on another (idempotent ops). */
  private async run<T>(op: (c: NbdClient) => Promise<T>): Promise<T> {
    const deadline = Date.now() + this.retryTimeoutMs;
    for (;;) {
      const slot = await this.pick(deadline);
      const client = slot.client!;
      slot.inFlight++;
      try {
        return await op(client);
      } catch (err) {
        if (err instanceof NbdConnectionError || !client.isOpen) {
          this.lost(slot, client, err as Error);
          if (Date.now() < deadline && !this.closed) continue; // pick() waits for a connection
          throw new DeviceError('EIO', `remote NBD server ${this.uri}: ${(err as Error).message}`);
        }
        throw mapError(err);
      } finally {
        slot.inFlight--;
      }
    }
  }

  async read(buf: Buffer, offset: number, flags: number): Promise<void> {
    const data = await this.run((c) => c.read(offset, buf.length, wireFlags(flags)));
    assert(data.length === buf.length, 'remote read returned a short buffer');
    data.copy(buf);
  }

  async write(data: Buffer, offset: number, flags: number): Promise<void> {
    await this.run((c) => c.write(offset, data, wireFlags(flags)));
    this.unflushed++;
  }

  async trim(offset: number, length: number, flags: number): Promise<void> {
    await this.run((c) => c.trim(offset, length, wireFlags(flags)));
    this.unflushed++;
  }

  async writeZeroes(offset: number, length: number, flags: number): Promise<void> {
    await this.run((c) => c.writeZeroes(offset, length, wireFlags(flags)));
    this.unflushed++;
  }

  /**
   * Fails with EIO if a connection dropped with unflushed writes since the last flush that
   * reported — also one dropping under this very flush, which is then sent again on a new
   * connection: that second flush says nothing of what the old one lost.
   */
  async flush(flags: number): Promise<void> {
    const covered = this.unflushed;
    await this.run((c) => c.flush(wireFlags(flags)));
    this.unflushed = Math.max(0, this.unflushed - covered);
    if (this.losses !== this.reportedLosses) {
      this.reportedLosses = this.losses;
      throw new DeviceError('EIO', this.lastLoss);
    }
  }

  async cache(offset: number, length: number, flags: number): Promise<void> {
    await this.run((c) => c.cache(offset, length, wireFlags(flags)));
  }

  async blockStatus(offset: number, length: number, flags: number): Promise<Extent[]> {
    const extents = await this.run(async (c) =>
      c.metaContexts.size > 0
        ? (await c.blockStatus(offset, Math.min(length, 0xffffffff), wireFlags(flags))).get(
            BASE_ALLOCATION,
          )
        : undefined,
    );
    // A server without block status: all data, which is always true.
    if (extents === undefined || extents.length === 0)
      return [{ length: this.facts.size - offset, state: 0 }];
    const out: Extent[] = [];
    let at = offset;
    for (const e of extents) {
      const len = Math.min(e.length, this.facts.size - at);
      if (len <= 0) break;
      out.push({ length: len, state: e.flags & (ExtentState.HOLE | ExtentState.ZERO) });
      at += len;
    }
    return out;
  }

  async close(): Promise<void> {
    this.closed = true;
    for (const t of this.timers) clearTimeout(t);
    this.timers.clear();
    for (const w of [...this.waiters]) w();
    await Promise.all(
      this.slots.map(async (s) => {
        const c = s.client;
        s.client = null;
        await c?.disconnect().catch(() => c.close());
      }),
    );
  }
}
