import type { Socket } from 'node:net';

/**
 * Exact-length reads over a socket for the negotiation phase, where messages are few and
 * small. Bounded: past `highWater` buffered bytes the socket is paused until a reader takes
 * them, so a client that floods the handshake cannot grow memory.
 */
export class ByteQueue {
  private chunks: Buffer[] = [];
  private buffered = 0;
  private ended = false;
  private waiter: { n: number; resolve: (b: Buffer | null) => void } | undefined;
  private readonly onData = (chunk: Buffer): void => this.push(chunk);
  private readonly onEnd = (): void => this.finish();

  constructor(
    private readonly socket: Socket,
    private readonly highWater: number,
  ) {
    socket.on('data', this.onData);
    socket.on('end', this.onEnd);
    socket.on('close', this.onEnd);
  }

  /** Resolves with exactly `n` bytes, or null once the peer has gone. */
  read(n: number): Promise<Buffer | null> {
    if (this.waiter) throw new Error('ByteQueue: concurrent reads');
    if (this.buffered >= n) return Promise.resolve(this.take(n));
    if (this.ended) return Promise.resolve(null);
    this.socket.resume();
    return new Promise((resolve) => {
      this.waiter = { n, resolve };
    });
  }

  /** Stops listening and hands back what was received but not read. */
  detach(): Buffer[] {
    this.socket.off('data', this.onData);
    this.socket.off('end', this.onEnd);
    this.socket.off('close', this.onEnd);
    const rest = this.chunks;
    this.chunks = [];
    this.buffered = 0;
    return rest;
  }

  private push(chunk: Buffer): void {
    this.chunks.push(chunk);
    this.buffered += chunk.length;
    const w = this.waiter;
    if (w && this.buffered >= w.n) {
      this.waiter = undefined;
      w.resolve(this.take(w.n));
    }
    if (this.buffered > this.highWater && !this.waiter) this.socket.pause();
  }

  private finish(): void {
    this.ended = true;
    const w = this.waiter;
    if (w) {
      this.waiter = undefined;
      w.resolve(null);
    }
  }

  private take(n: number): Buffer {
    const first = this.chunks[0];
    let out: Buffer;
    if (first !== undefined && first.length >= n) {
      out = first.subarray(0, n);
      if (first.length === n) this.chunks.shift();
      else this.chunks[0] = first.subarray(n);
    } else {
      out = Buffer.allocUnsafe(n);
      let filled = 0;
      while (filled < n) {
        const c = this.chunks[0]!;
        const used = Math.min(c.length, n - filled);
        c.copy(out, filled, 0, used);
        filled += used;
        if (used === c.length) this.chunks.shift();
        else this.chunks[0] = c.subarray(used);
      }
    }
    this.buffered -= n;
    return out;
  }
}
