/**
 * A control-plane client: connects to the daemon's control socket and calls methods. Used by
 * the CLI; usable by any TypeScript program.
 *
 *   const c = await ControlClient.connect('/run/devfilter/control.sock');
 *   await c.call('filter.create', { export: 'disk', type: 'stats' });
 *   c.close();
 *
 * A call rejects with RpcError when the daemon answers with an error, and with
 * ControlUnreachableError when the socket cannot be reached, the connection breaks or the
 * daemon does not answer in time.
 */
import { EventEmitter } from 'node:events';
import net from 'node:net';
import {
  ControlUnreachableError,
  JSONRPC_VERSION,
  RpcError,
  type RpcResponse,
} from './protocol.js';

export const DEFAULT_CALL_TIMEOUT_MS = 30_000;
/** Longest response line the client accepts. */
const MAX_RESPONSE_LINE_BYTES = 64 * 1024 * 1024;

interface Pending {
  method: string;
  resolve(value: unknown): void;
  reject(err: Error): void;
  timer: NodeJS.Timeout | undefined;
}

export interface ControlClientEvents {
  /** A notification from the daemon (e.g. "event" after events.subscribe). */
  notification: [method: string, params: unknown];
  /** The connection is gone. */
  close: [];
}

export class ControlClient extends EventEmitter<ControlClientEvents> {
  private readonly pending = new Map<number, Pending>();
  private nextId = 1;
  private partial: Buffer[] = [];
  private partialBytes = 0;
  private failure: Error | undefined;

  private constructor(
    private readonly socket: net.Socket,
    readonly path: string,
  ) {
    super();
    socket.on('data', (chunk: Buffer) => this.onData(chunk));
    socket.on('error', (err) =>
      this.fail(
        new ControlUnreachableError(`control connection to ${path} failed: ${err.message}`),
      ),
    );
    socket.on('close', () => {
      this.fail(new ControlUnreachableError(`the daemon closed the control connection (${path})`));
      this.emit('close');
    });
  }

  /** Connects to the control socket at `path`. */
  static connect(path: string, opts: { timeoutMs?: number } = {}): Promise<ControlClient> {
    return new Promise((resolve, reject) => {
      const socket = net.connect(path);
      const timer = setTimeout(() => {
        socket.destroy();
        reject(
          new ControlUnreachableError(
            `cannot reach the devfilter daemon at ${path}: connecting timed out`,
          ),
        );
      }, opts.timeoutMs ?? 5000);
      socket.once('connect', () => {
        clearTimeout(timer);
        socket.removeAllListeners('error');
        resolve(new ControlClient(socket, path));
      });
      socket.once('error', (err: NodeJS.ErrnoException) => {
        clearTimeout(timer);
        reject(
          new ControlUnreachableError(
            `cannot reach the devfilter daemon at ${path}: ${explain(err)}`,
          ),
        );
      });
    });
  }

  /** Calls `method`; resolves with its result. */
  call<T = unknown>(
    method: string,
    params: Record<string, unknown> = {},
    opts: { timeoutMs?: number } = {},
  ): Promise<T> {
    if (this.failure) return Promise.reject(this.failure);
    const id = this.nextId++;
    return new Promise<T>((resolve, reject) => {
      const timeoutMs = opts.timeoutMs ?? DEFAULT_CALL_TIMEOUT_MS;
      const timer =
        timeoutMs > 0
          ? setTimeout(() => {
              this.pending.delete(id);
              reject(
                new ControlUnreachableError(
                  `${method}: no answer from the daemon within ${timeoutMs} ms`,
                ),
              );
            }, timeoutMs)
          : undefined;
      this.pending.set(id, { method, resolve: resolve as (v: unknown) => void, reject, timer });
      this.socket.write(JSON.stringify({ jsonrpc: JSONRPC_VERSION, id, method, params }) + '\n');
    });
  }

  /** Sends a notification (no response). */
  notify(method: string, params: Record<string, unknown> = {}): void {
    if (!this.failure)
      this.socket.write(JSON.stringify({ jsonrpc: JSONRPC_VERSION, method, params }) + '\n');
  }

  close(): void {
    this.fail(new ControlUnreachableError('control connection closed'));
    this.socket.destroy();
  }

  /** Keeps the process alive only while calls are pending (for long-lived subscribers). */
  unref(): void {
    this.socket.unref();
  }

  private onData(chunk: Buffer): void {
    let start = 0;
    for (;;) {
      const nl = chunk.indexOf(10, start);
      if (nl < 0) break;
      const piece = chunk.subarray(start, nl);
      const line = this.partialBytes === 0 ? piece : Buffer.concat([...this.partial, piece]);
      this.partial = [];
      this.partialBytes = 0;
      start = nl + 1;
      this.onLine(line.toString('utf8'));
    }
    if (start < chunk.length) {
      this.partialBytes += chunk.length - start;
      this.partial.push(Buffer.from(chunk.subarray(start)));
      if (this.partialBytes > MAX_RESPONSE_LINE_BYTES) {
        this.fail(new ControlUnreachableError('response from the daemon is too large'));
        this.socket.destroy();
      }
    }
  }

  private onLine(line: string): void {
    if (line.trim() === '') return;
    let message: Record<string, unknown>;
    try {
      message = JSON.parse(line) as Record<string, unknown>;
    } catch {
      this.fail(new ControlUnreachableError('the daemon sent something that is not JSON'));
      this.socket.destroy();
      return;
    }
    if (Array.isArray(message)) {
      for (const m of message) this.onMessage(m as Record<string, unknown>);
    } else {
      this.onMessage(message);
    }
  }

  private onMessage(m: Record<string, unknown>): void {
    if (typeof m.method === 'string' && !Object.hasOwn(m, 'id')) {
      this.emit('notification', m.method, m.params);
      return;
    }
    const r = m as RpcResponse;
    if (typeof r.id !== 'number') {
      // An error about no request in particular (too large, busy): it ends the connection.
      if ('error' in r) this.fail(new RpcError(r.error.code, r.error.message, r.error.data));
      return;
    }
    const p = this.pending.get(r.id);
    if (!p) return;
    this.pending.delete(r.id);
    clearTimeout(p.timer);
    if ('error' in r)
      p.reject(new RpcError(r.error.code, r.error.message, r.error.data ?? { code: 'unknown' }));
    else p.resolve(r.result);
  }

  private fail(err: Error): void {
    this.failure ??= err;
    for (const [id, p] of this.pending) {
      clearTimeout(p.timer);
      this.pending.delete(id);
      p.reject(err);
    }
  }
}

function explain(err: NodeJS.ErrnoException): string {
  switch (err.code) {
    case 'ENOENT':
      return 'no such socket (is "devfilter serve" running? use --control PATH or DEVFILTER_CONTROL)';
    case 'ECONNREFUSED':
      return 'connection refused (a stale socket: the daemon is not running)';
    case 'EACCES':
    case 'EPERM':
      return 'permission denied (the control socket belongs to another user)';
    default:
      return err.message;
  }
}

/** Connects, calls one method and closes. */
export async function callOnce<T = unknown>(
  path: string,
  method: string,
  params: Record<string, unknown> = {},
  opts: { timeoutMs?: number } = {},
): Promise<T> {
  const client = await ControlClient.connect(path);
  try {
    return await client.call<T>(method, params, opts);
  } finally {
    client.close();
  }
}
