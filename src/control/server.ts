/**
 * The control server: JSON-RPC 2.0 over a unix socket that only its owner can use.
 *
 * Framing: one JSON text per line, UTF-8. A line longer than MAX_REQUEST_LINE_BYTES gets a
 * -32600 (too-large) error and the connection is closed; nothing is ever buffered beyond that
 * limit. Requests of one connection run one at a time, in order (the connection stops reading
 * while one runs, and while the client is not reading its responses); other connections are
 * not affected. Batches (arrays) of up to MAX_BATCH requests are supported and run in order.
 * Notifications (no id) run but get no response.
 *
 * `events.subscribe` turns a connection into an event stream as well: every manager event is
 * sent as a notification {"method":"event","params":{...}}. A subscriber that does not read
 * loses events (counted, and reported with an "events.dropped" notification once it catches
 * up) rather than making the daemon buffer without bound.
 */
import { chmodSync, chownSync } from 'node:fs';
import net from 'node:net';
import type { Logger } from 'pino';
import { peerCredentials } from '../backends/libc.js';
import type { FilterEvent } from '../core/manager.js';
import { methods, toRpcError, type ControlContext, type MethodSession } from './methods.js';
import {
  JSONRPC_VERSION,
  MAX_BATCH,
  MAX_REQUEST_LINE_BYTES,
  RpcError,
  type RpcId,
  type RpcResponse,
} from './protocol.js';
import { isMethod, validateParams } from './schema.js';
import { clearStaleSocket, listenOwnerOnly, removeSocketFile } from './socket-path.js';

export interface ControlServerOptions {
  logger: Logger;
  /** Default MAX_REQUEST_LINE_BYTES. */
  maxLineBytes?: number;
  /** Connections beyond this are answered with a `busy` error and closed (default 64). */
  maxConnections?: number;
  /**
   * A group whose members may connect too (socket mode 0660, that group), for read-only
   * methods only: lists and status. Unset: owner only (0600).
   */
  readOnlyGroup?: number;
  /** Unsent output a subscriber may have before events are dropped (default 1 MiB). */
  maxEventBacklogBytes?: number;
}

export class ControlServer {
  private readonly server: net.Server;
  private readonly connections = new Set<ControlConnection>();
  private readonly log: Logger;
  private path: string | undefined;
  private readonly onEvent = (e: FilterEvent): void => {
    for (const c of this.connections) c.event(e);
  };
  readonly maxLineBytes: number;
  readonly maxEventBacklogBytes: number;
  private readonly maxConnections: number;

  constructor(
    readonly ctx: ControlContext,
    private readonly opts: ControlServerOptions,
  ) {
    this.log = opts.logger;
    this.maxLineBytes = opts.maxLineBytes ?? MAX_REQUEST_LINE_BYTES;
    this.maxConnections = opts.maxConnections ?? 64;
    this.maxEventBacklogBytes = opts.maxEventBacklogBytes ?? 1024 * 1024;
    this.server = net.createServer({ allowHalfOpen: true }, (socket) => this.accept(socket));
    this.server.on('error', (err) => this.log.error({ err }, 'control socket error'));
    ctx.manager.on('event', this.onEvent);
  }

  get connectionCount(): number {
    return this.connections.size;
  }

  get socketPath(): string | undefined {
    return this.path;
  }

  /**
   * Listens on `path` (mode 0600). A stale socket file is replaced; one that answers is an
   * error with code EADDRINUSE.
   */
  async listen(path: string): Promise<void> {
    await clearStaleSocket(path);
    await listenOwnerOnly(this.server, path);
    if (this.opts.readOnlyGroup !== undefined) {
      chownSync(path, -1, this.opts.readOnlyGroup);
      chmodSync(path, 0o660);
    }
    this.path = path;
  }

  /** Stops listening, closes every connection and removes the socket file. */
  async close(): Promise<void> {
    this.ctx.manager.off('event', this.onEvent);
    const closed = new Promise<void>((done) => this.server.close(() => done()));
    for (const c of this.connections) c.destroy();
    if (this.path !== undefined) removeSocketFile(this.path);
    if (this.server.listening) await closed;
  }

  private accept(socket: net.Socket): void {
    if (this.connections.size >= this.maxConnections) {
      socket.on('error', () => {});
      const err = RpcError.of(
        'busy',
        `too many control connections (limit ${this.maxConnections})`,
      );
      socket.end(
        JSON.stringify({ jsonrpc: JSONRPC_VERSION, id: null, error: err.toJSON() }) + '\n',
      );
      setTimeout(() => socket.destroy(), 1000).unref();
      return;
    }
    const conn = new ControlConnection(this, socket, this.log);
    this.connections.add(conn);
    socket.once('close', () => this.connections.delete(conn));
  }
}

const decoder = new TextDecoder('utf-8', { fatal: true });

class ControlConnection implements MethodSession {
  private partial: Buffer[] = [];
  private partialBytes = 0;
  private readonly lines: Buffer[] = [];
  private running = false;
  private ended = false;
  private dead = false;
  private subscribed = false;
  private confirmedEnd = false;
  /** The peer (SO_PEERCRED), for logs; undefined where the kernel does not say. */
  private readonly peer: { pid: number; uid: number; gid: number } | undefined;
  /** Not the daemon's owner nor root: a member of the read-only group. */
  private readonly readOnly: boolean;
  private dropped = 0;

  constructor(
    private readonly server: ControlServer,
    private readonly socket: net.Socket,
    private readonly log: Logger,
  ) {
    this.peer = peerOf(socket);
    const self = process.getuid?.();
    this.readOnly =
      this.peer !== undefined &&
      self !== undefined &&
      this.peer.uid !== 0 &&
      this.peer.uid !== self;
    socket.on('data', (chunk: Buffer) => this.onData(chunk));
    socket.on('end', () => {
      this.ended = true;
      // A last request without its newline still counts.
      if (this.partialBytes > 0) this.lines.push(Buffer.concat(this.partial));
      this.partial = [];
      this.partialBytes = 0;
      void this.pump();
    });
    socket.on('error', (err) => {
      this.log.debug({ err }, 'control connection error');
      this.dead = true;
    });
    socket.on('close', () => (this.dead = true));
    socket.on('drain', () => this.reportDropped());
  }

  get controlConnections(): number {
    return this.server.connectionCount;
  }

  get controlPath(): string | undefined {
    return this.server.socketPath;
  }

  subscribe(): void {
    this.subscribed = true;
  }

  unsubscribe(): void {
    this.subscribed = false;
  }

  destroy(): void {
    this.dead = true;
    this.socket.destroy();
  }

  event(e: FilterEvent): void {
    if (!this.subscribed || this.dead) return;
    if (this.socket.writableLength > this.server.maxEventBacklogBytes) {
      this.dropped++;
      return;
    }
    this.reportDropped();
    this.send({ jsonrpc: JSONRPC_VERSION, method: 'event', params: e });
  }

  private reportDropped(): void {
    if (
      this.dropped === 0 ||
      this.dead ||
      this.socket.writableLength > this.server.maxEventBacklogBytes
    )
      return;
    const count = this.dropped;
    this.dropped = 0;
    this.send({ jsonrpc: JSONRPC_VERSION, method: 'events.dropped', params: { count } });
  }

  private onData(chunk: Buffer): void {
    if (this.dead) return;
    const max = this.server.maxLineBytes;
    let start = 0;
    for (;;) {
      const nl = chunk.indexOf(10, start);
      if (nl < 0) break;
      if (this.partialBytes + (nl - start) > max) return this.tooLarge();
      const piece = chunk.subarray(start, nl);
      this.lines.push(this.partialBytes === 0 ? piece : Buffer.concat([...this.partial, piece]));
      this.partial = [];
      this.partialBytes = 0;
      start = nl + 1;
    }
    if (start < chunk.length) {
      if (this.partialBytes + (chunk.length - start) > max) return this.tooLarge();
      this.partial.push(Buffer.from(chunk.subarray(start))); // a copy: the chunk is released
      this.partialBytes += chunk.length - start;
    }
    if (this.lines.length > 0) void this.pump();
  }

  private tooLarge(): void {
    const err = RpcError.of(
      'too-large',
      `request line longer than ${this.server.maxLineBytes} bytes; closing the connection`,
      {
        limit: this.server.maxLineBytes,
      },
    );
    this.log.warn(
      { limit: this.server.maxLineBytes },
      'control request too large; connection closed',
    );
    this.partial = [];
    this.partialBytes = 0;
    this.lines.length = 0;
    this.dead = true; // from now on input is discarded and nothing runs
    if (!this.socket.destroyed)
      this.socket.end(
        JSON.stringify({ jsonrpc: JSONRPC_VERSION, id: null, error: err.toJSON() }) + '\n',
      );
    setTimeout(() => this.socket.destroy(), 2000).unref();
  }

  /** Runs the queued lines one at a time; the socket is paused while there is work. */
  private async pump(): Promise<void> {
    if (this.running) return;
    this.running = true;
    this.socket.pause();
    try {
      while (this.lines.length > 0 && !this.dead) {
        const line = this.lines.shift()!;
        const response = await this.handleLine(line);
        if (response !== undefined && !this.dead) {
          if (!this.send(response)) await this.drained();
        }
      }
    } finally {
      this.running = false;
    }
    if (this.dead) return;
    if (this.ended) {
      // The client has sent everything; keep the connection only for an event stream.
      if (!this.subscribed) this.socket.end();
      else if (!this.confirmedEnd) {
        // A half-closed subscriber still reads; one that has gone away entirely would hold
        // its slot until the next event. Writing now tells them apart: the write to a
        // vanished peer fails (EPIPE) and the connection is closed at once.
        this.confirmedEnd = true;
        this.send({ jsonrpc: JSONRPC_VERSION, method: 'events.input-closed', params: {} });
      }
    } else {
      this.socket.resume();
    }
  }

  private drained(): Promise<void> {
    return new Promise((done) => {
      const finish = (): void => {
        this.socket.off('drain', finish);
        this.socket.off('close', finish);
        done();
      };
      this.socket.on('drain', finish);
      this.socket.on('close', finish);
    });
  }

  /** Writes one message as one line; false when the client is not keeping up. */
  private send(message: unknown): boolean {
    if (this.dead || !this.socket.writable) return true;
    let text: string;
    try {
      text = JSON.stringify(message);
    } catch (err) {
      const id = (message as { id?: RpcId }).id ?? null;
      text = JSON.stringify(
        error(
          id,
          RpcError.of('internal', `result is not JSON-serialisable: ${(err as Error).message}`),
        ),
      );
    }
    return this.socket.write(text + '\n');
  }

  private async handleLine(raw: Buffer): Promise<RpcResponse | RpcResponse[] | undefined> {
    let text: string;
    try {
      text = decoder.decode(raw);
    } catch {
      return error(null, RpcError.of('parse-error', 'parse error: request is not valid UTF-8'));
    }
    if (text.endsWith('\r')) text = text.slice(0, -1);
    if (text.trim() === '') return undefined;
    let message: unknown;
    try {
      message = JSON.parse(text);
    } catch (err) {
      return error(null, RpcError.of('parse-error', `parse error: ${(err as Error).message}`));
    }
    if (Array.isArray(message)) {
      if (message.length === 0)
        return error(null, RpcError.of('invalid-request', 'invalid request: empty batch'));
      if (message.length > MAX_BATCH) {
        return error(
          null,
          RpcError.of(
            'invalid-request',
            `invalid request: batch of ${message.length} requests (at most ${MAX_BATCH})`,
          ),
        );
      }
      const out: RpcResponse[] = [];
      for (const m of message) {
        const r = await this.handleRequest(m);
        if (r !== undefined) out.push(r);
      }
      return out.length > 0 ? out : undefined;
    }
    return this.handleRequest(message);
  }

  private async handleRequest(message: unknown): Promise<RpcResponse | undefined> {
    if (typeof message !== 'object' || message === null || Array.isArray(message)) {
      return error(
        null,
        RpcError.of('invalid-request', 'invalid request: expected a JSON-RPC request object'),
      );
    }
    const m = message as Record<string, unknown>;
    const hasId = Object.hasOwn(m, 'id');
    const id = m.id;
    if (
      hasId &&
      !(id === null || typeof id === 'string' || (typeof id === 'number' && Number.isFinite(id)))
    ) {
      return error(
        null,
        RpcError.of('invalid-request', 'invalid request: id must be a string, a number or null'),
      );
    }
    const rid = (hasId ? id : null) as RpcId;
    if (m.jsonrpc !== JSONRPC_VERSION)
      return error(rid, RpcError.of('invalid-request', 'invalid request: "jsonrpc" must be "2.0"'));
    if (typeof m.method !== 'string')
      return error(
        rid,
        RpcError.of('invalid-request', 'invalid request: "method" must be a string'),
      );
    if (m.params !== undefined && (typeof m.params !== 'object' || m.params === null)) {
      return error(
        rid,
        RpcError.of('invalid-request', 'invalid request: "params" must be an object'),
      );
    }
    const method = m.method;
    const started = performance.now();
    let response: RpcResponse;
    try {
      if (!isMethod(method))
        throw RpcError.of(
          'method-not-found',
          `method not found: ${JSON.stringify(method.slice(0, 200))}`,
        );
      if (Array.isArray(m.params))
        throw RpcError.of(
          'invalid-params',
          `${method}: params must be an object (by name), not an array`,
        );
      if (this.readOnly && !READ_ONLY_METHODS.has(method))
        throw RpcError.of(
          'forbidden',
          `${method}: only the daemon's owner may change state (you are uid ${this.peer!.uid}; this connection may list and read status)`,
        );
      const params = validateParams(method, m.params ?? {});
      if (!READ_ONLY_METHODS.has(method))
        this.log.info(
          { method, params: summarise(params), uid: this.peer?.uid, pid: this.peer?.pid },
          'control call',
        );
      const result = await methods[method](this.server.ctx, params, this);
      response = { jsonrpc: JSONRPC_VERSION, id: rid, result: result ?? null };
      this.log.debug({ method, ms: Math.round(performance.now() - started) }, 'control request');
    } catch (err) {
      const e = toRpcError(err);
      if (e.kind === 'internal') this.log.error({ err, method }, 'control request failed');
      else this.log.debug({ method, code: e.kind, message: e.message }, 'control request refused');
      response = error(rid, e);
    }
    return hasId ? response : undefined;
  }
}

/** Methods that change nothing: a read-only group member may call them. */
const READ_ONLY_METHODS: ReadonlySet<string> = new Set([
  'filter.list',
  'filter.status',
  'filter.types',
  'export.list',
  'export.status',
  'snapshot.list',
  'snapshot.status',
  'daemon.status',
  'events.subscribe',
  'events.unsubscribe',
]);

/** The call's parameters for the log, cut short: an audit line, not a dump. */
function summarise(params: unknown): string {
  const text = JSON.stringify(params) ?? '';
  return text.length > 300 ? `${text.slice(0, 300)}…` : text;
}

function peerOf(socket: net.Socket): { pid: number; uid: number; gid: number } | undefined {
  // Node keeps the descriptor on the socket's handle; it has no public accessor for it.
  const fd = (socket as unknown as { _handle?: { fd?: number } })._handle?.fd;
  if (typeof fd !== 'number' || fd < 0) return undefined;
  try {
    return peerCredentials(fd);
  } catch {
    return undefined;
  }
}

function error(id: RpcId, err: RpcError): RpcResponse {
  return { jsonrpc: JSONRPC_VERSION, id, error: err.toJSON() };
}
