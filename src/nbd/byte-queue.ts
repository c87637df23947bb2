import type { Socket } from 'node:net';
import { ByteFifo } from './byte-fifo.js';

/**
 * Exact-length reads over a socket for the negotiation phase, where messages are few and
 * small. Bounded: past `highWater` buffered bytes the socket is paused until a reader takes
 * them, so a client that floods the handshake cannot grow memory.
 */
export class ByteQueue {
  private readonly fifo = new ByteFifo();
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
    if (this.fifo.length >= n) return Promise.resolve(this.fifo.take(n));
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
    return this.fifo.length > 0 ? [this.fifo.takeAll()] : [];
  }

  private push(chunk: Buffer): void {
    this.fifo.push(chunk);
    const w = this.waiter;
    if (w && this.fifo.length >= w.n) {
      this.waiter = undefined;
      w.resolve(this.fifo.take(w.n));
    }
    if (this.fifo.length > this.highWater && !this.waiter) this.socket.pause();
  }

  private finish(): void {
    this.ended = true;
    const w = this.waiter;
    if (w) {
      this.waiter = undefined;
      w.resolve(null);
    }
  }
}
