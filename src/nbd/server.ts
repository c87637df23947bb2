/**
 * The NBD server: listens on unix sockets and TCP, or adopts already-connected sockets
 * (stdin/stdout, systemd socket activation), negotiates each connection and runs its
 * transmission phase. It knows exports only as devices; filters are invisible to it.
 */
import net from 'node:net';
import type { Logger } from 'pino';
import type { ClientInfo, IoContext } from '../core/device.js';
import type { ExportSource } from './exports.js';
import { BufferPool } from './buffer-pool.js';
import { Negotiator } from './handshake.js';
import { peerCredentials, setSendBuffer } from '../backends/libc.js';
import type { NbdTlsOptions } from './tls.js';
import {
  DEFAULT_TRANSMISSION_LIMITS,
  TransmissionSession,
  type TransmissionLimits,
} from './transmission.js';

export interface NbdServerOptions {
  exports: ExportSource;
  logger: Logger;
  /** Answer NBD_OPT_LIST (default true). */
  allowList?: boolean;
  /** A client must finish negotiating within this time (default 30 s). */
  handshakeTimeoutMs?: number;
  /** Connections served at once; more are refused at accept (default 1024). */
  maxConnections?: number;
  limits?: Partial<TransmissionLimits>;
  /** Offer (mode on) or require TLS; absent: no TLS (STARTTLS gets ERR_POLICY). */
  tls?: NbdTlsOptions;
}

/**
 * The send buffer asked for on unix-socket connections. The default (208 KiB) holds three
 * 64 KiB replies; a larger one lets a turn's replies leave in one writev instead of waiting
 * for the client to drain the socket, which measured a third more 64 KiB and 1 MiB reads.
 * TCP sizes its buffers itself (autotuning), and setting one would turn that off.
 */
const UNIX_SEND_BUFFER = 1024 * 1024;

/** Payload buffers up to this size are reused; at most POOL_FREE_BYTES are kept idle. */
const MAX_POOLED_BUFFER = 8 * 1024 * 1024 + 64;
const POOL_FREE_BYTES = 64 * 1024 * 1024;

interface Connection {
  readonly id: number;
  readonly plain: net.Socket;
  /** The plain socket, then the TLS socket once STARTTLS succeeded. */
  socket: net.Socket;
  session?: TransmissionSession;
  done: Promise<void>;
}

export class NbdServer {
  private readonly listeners: net.Server[] = [];
  private readonly connections = new Map<number, Connection>();
  private nextId = 1;
  private shuttingDown = false;
  private readonly limits: TransmissionLimits;
  /** Large payload buffers, shared by every connection (one thread: no locking needed). */
  private readonly pool = new BufferPool(MAX_POOLED_BUFFER, POOL_FREE_BYTES);

  constructor(private readonly opts: NbdServerOptions) {
    this.limits = { ...DEFAULT_TRANSMISSION_LIMITS, ...opts.limits };
  }

  get connectionCount(): number {
    return this.connections.size;
  }

  /** Connections that have upgraded to TLS. */
  get tlsConnectionCount(): number {
    let n = 0;
    for (const c of this.connections.values()) if (c.socket !== c.plain) n++;
    return n;
  }

  /** Listens on a unix socket path, a TCP host:port, or an inherited listening fd. */
  async listen(
    where: { path: string } | { host: string; port: number } | { fd: number },
  ): Promise<net.Server> {
    const server = net.createServer({ allowHalfOpen: true, pauseOnConnect: true }, (socket) =>
      this.accept(socket, clientInfoOf(socket, where)),
    );
    server.maxConnections = this.opts.maxConnections ?? 1024;
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      const onListening = (): void => {
        server.off('error', reject);
        resolve();
      };
      if ('path' in where) server.listen(where.path, onListening);
      else if ('fd' in where) server.listen({ fd: where.fd }, onListening);
      else server.listen(where.port, where.host, onListening);
    });
    server.on('error', (err) => this.opts.logger.error({ err }, 'listener error'));
    this.listeners.push(server);
    return server;
  }

  /** Serves one already-connected socket (stdin/stdout, socketpair). */
  adopt(socket: net.Socket, client: ClientInfo): Promise<void> {
    return this.accept(socket, client);
  }

  private accept(socket: net.Socket, client: ClientInfo): Promise<void> {
    const id = this.nextId++;
    const log = this.opts.logger.child({ conn: id });
    if (this.shuttingDown) {
      socket.destroy();
      return Promise.resolve();
    }
    if (client.transport === 'tcp') socket.setNoDelay(true);
    if (client.transport === 'unix') {
      const fd = socketFd(socket);
      // Capped by net.core.wmem_max; a refusal leaves the default, which works, only slower.
      if (fd !== undefined) setSendBuffer(fd, UNIX_SEND_BUFFER);
    }
    // Peers vanish without warning; a reset is an ordinary end, never a crash.
    socket.on('error', (err) => log.debug({ err: err.message }, 'socket error'));
    log.info({ client }, 'client connected');
    const conn: Connection = { id, plain: socket, socket, done: Promise.resolve() };
    this.connections.set(id, conn);
    conn.done = this.serve(conn, client, log);
    void conn.done.finally(() => {
      this.connections.delete(id);
      log.info('client disconnected');
    });
    return conn.done;
  }

  private async serve(conn: Connection, client: ClientInfo, log: Logger): Promise<void> {
    const plain = conn.plain;
    const destroyAll = (): void => {
      conn.socket.destroy();
      plain.destroy();
    };
    const timeout = setTimeout(() => {
      log.warn('negotiation timed out');
      destroyAll();
    }, this.opts.handshakeTimeoutMs ?? 30_000);
    const closed = new Promise<void>((resolve) => plain.once('close', () => resolve()));
    let negotiated;
    try {
      negotiated = await new Negotiator(plain, {
        exports: this.opts.exports,
        logger: log,
        allowList: this.opts.allowList ?? true,
        isShuttingDown: () => this.shuttingDown,
        ...(this.opts.tls !== undefined ? { tls: this.opts.tls } : {}),
        onTlsUpgrade: (secure) => {
          conn.socket = secure;
          // The TLS socket owns the connection now; when it ends, so does the plain one.
          secure.once('close', () => plain.destroy());
        },
      }).run();
    } catch (err) {
      log.error({ err }, 'negotiation failed');
      destroyAll();
    } finally {
      clearTimeout(timeout);
    }
    if (!negotiated) {
      if (!conn.socket.destroyed) conn.socket.end();
      await closed;
      return;
    }
    log.info(
      {
        export: negotiated.export.name,
        structured: negotiated.structuredReplies,
        ...(negotiated.tls !== undefined ? { tls: true } : {}),
      },
      'export opened',
    );
    // The identity filters see: the transport's, plus what the client proved over TLS.
    const who: ClientInfo =
      negotiated.tls === undefined ? client : { ...client, tls: true, ...negotiated.tls };
    const ctx: IoContext = { exportName: negotiated.export.name, client: who };
    const session = new TransmissionSession(
      negotiated.socket,
      negotiated,
      ctx,
      this.limits,
      log,
      this.pool,
    );
    conn.session = session;
    session.start();
    if (this.shuttingDown) session.shutdown();
    await session.done;
  }

  /**
   * Stops accepting, lets every connection finish the requests it sent (later ones get
   * ESHUTDOWN), and resolves once all are closed.
   */
  async close(): Promise<void> {
    this.shuttingDown = true;
    // A listener's close callback waits for its connections to end, so stop accepting first,
    // end the connections, and only then wait for the listeners.
    const listenersClosed = this.listeners.map(
      (l) => new Promise<void>((resolve) => l.close(() => resolve())),
    );
    for (const conn of this.connections.values()) {
      if (conn.session) conn.session.shutdown();
      else {
        // still negotiating: nothing of it can be lost
        conn.socket.destroy();
        conn.plain.destroy();
      }
    }
    await Promise.all([...this.connections.values()].map((c) => c.done));
    await Promise.all(listenersClosed);
  }
}

function clientInfoOf(
  socket: net.Socket,
  where: { path: string } | { host: string; port: number } | { fd: number },
): ClientInfo {
  if ('path' in where || socket.remoteAddress === undefined) return unixPeer(socket);
  return { transport: 'tcp', address: socket.remoteAddress, port: socket.remotePort ?? 0 };
}

/** The socket's descriptor: Node keeps it on the socket's handle, with no public accessor. */
function socketFd(socket: net.Socket): number | undefined {
  const fd = (socket as unknown as { _handle?: { fd?: number } })._handle?.fd;
  return typeof fd === 'number' && fd >= 0 ? fd : undefined;
}

/** A unix-socket client with its uid and gid (SO_PEERCRED), when the kernel tells them. */
function unixPeer(socket: net.Socket): ClientInfo {
  const fd = socketFd(socket);
  if (fd === undefined) return { transport: 'unix' };
  try {
    const { uid, gid } = peerCredentials(fd);
    return { transport: 'unix', uid, gid };
  } catch {
    return { transport: 'unix' }; // not a unix socket after all (stdio, inherited): no identity
  }
}
