/**
 * Runs the daemon: loads filter types, opens the exports' backends and puts their declared
 * filters on them, opens the control socket, serves the exports over NBD, and on
 * SIGTERM/SIGINT drains every connection, flushes and closes every device before exiting.
 */
import net from 'node:net';
import { resolve } from 'node:path';
import type { Logger } from 'pino';
import { DeviceManager, ManagerError } from '../core/manager.js';
import { FilterTypeRegistry } from '../core/filter-types.js';
import { builtinFilterTypes } from '../filters/index.js';
import { describeStale, findFence } from '../filters/mirror/cutover-record.js';
import { ExportTable } from '../nbd/exports.js';
import { exportSource } from './export-source.js';
import { NbdServer } from '../nbd/server.js';
import { loadTlsCredentials, type NbdTlsOptions, type TlsSettings } from '../nbd/tls.js';
import { ControlServer } from '../control/server.js';
import type { NbdListener } from '../control/methods.js';
import { startMetricsServer, type MetricsServer } from '../metrics/server.js';
import { clearStaleSocket, prepareSocketDir, removeSocketFile } from '../control/socket-path.js';
import { checkFilterSpecs, ConfigError } from './config.js';
import { openBackend, type ExportSpec } from './export-spec.js';
import { VERSION } from './version.js';

/** Buffer.allocUnsafe serves sizes below half of this from a shared slab. */
const DAEMON_BUFFER_SLAB = 128 * 1024;

export interface DaemonOptions {
  exports: ExportSpec[];
  defaultExport?: string;
  socket?: string;
  listen: { host: string; port: number }[];
  /** Serve a single client on stdin/stdout, then exit. */
  stdio: boolean;
  readOnly: boolean;
  allowList: boolean;
  logger: Logger;
  /** ES module paths or package names with external filter types. */
  filterModules?: string[];
  /** The control socket (JSON-RPC); none when undefined. */
  control?: string;
  /** A group whose members may use the control socket for lists and status (gid). */
  controlGroup?: number;
  /**
   * The control path is the built-in default rather than asked for: its directory is checked
   * for ownership, and when another daemon already answers there, this one runs without a
   * control socket (with a warning) instead of failing.
   */
  controlIsDefault?: boolean;
  /** Serve Prometheus metrics of the stats filters over HTTP here. */
  metrics?: { host: string; port: number };
  /** TLS for NBD clients (mode other than off); none when undefined. */
  tls?: TlsSettings;
}

export interface RunningDaemon {
  server: NbdServer;
  manager: DeviceManager;
  /** Where TCP listeners actually listen (port 0 picks a free one). */
  tcp: { host: string; port: number }[];
  /** The control socket this daemon listens on, if any. */
  control?: { path: string; server: ControlServer };
  /** The metrics endpoint, if any (port 0 picks a free port: this is the real one). */
  metrics?: { host: string; port: number };
  stop(): Promise<void>;
  stopped: Promise<void>;
}

export async function startDaemon(opts: DaemonOptions): Promise<RunningDaemon> {
  // A 4 KiB read reply (data + header) is just over half of Node's default 8 KiB slab, so
  // each one would get its own allocation; a larger slab serves them from shared memory.
  Buffer.poolSize = Math.max(Buffer.poolSize, DAEMON_BUFFER_SLAB);
  const log = opts.logger;
  const types = new FilterTypeRegistry();
  for (const t of builtinFilterTypes) types.register(t);
  for (const m of opts.filterModules ?? []) {
    let loaded;
    try {
      loaded = await types.load(m);
    } catch (err) {
      throw new ConfigError(`--filter-module: ${(err as Error).message}`);
    }
    log.info({ module: m, types: loaded.map((t) => t.name) }, 'filter module loaded');
  }
  // Declared filters are checked before anything is opened, so a typo costs nothing.
  checkFilterSpecs(opts.exports, types);
  // So are the TLS credentials: a missing or bad file stops the start with its name.
  let tls: NbdTlsOptions | undefined;
  if (opts.tls !== undefined && opts.tls.mode !== 'off') {
    tls = { mode: opts.tls.mode, credentials: loadTlsCredentials(opts.tls) };
    log.info({ mode: tls.mode, kind: tls.credentials.kind }, 'TLS ready');
  }
  // A backend a mirror cut over away from holds stale data: refuse it, whatever the config
  // says, before anything is opened (docs/mirror.md, "After the cutover: the config file").
  for (const spec of opts.exports) {
    const label = backendLabel(spec);
    const moved = await findFence(label);
    if (moved !== undefined)
      throw new ConfigError(`export ${spec.name}: ${describeStale(label, moved)}`);
  }
  const manager = new DeviceManager(types, log);
  const table = new ExportTable();
  try {
    for (const spec of opts.exports) {
      const readOnly = opts.readOnly || spec.readOnly === true;
      const device = await openBackend(
        spec.backend,
        readOnly,
        log.child({ export: spec.name, component: 'backend' }),
      );
      const description = spec.description !== undefined ? { description: spec.description } : {};
      const exp = manager.addExport(spec.name, device, {
        readOnly,
        backendLabel: backendLabel(spec),
        ...description,
      });
      // The NBD layer sees the live stack: filters come and go beneath it.
      table.add({
        name: spec.name,
        device: exp.stack,
        readOnly,
        ...description,
        ...(spec.tls !== undefined ? { tls: spec.tls } : {}),
      });
      log.info(
        { export: spec.name, backend: spec.backend, size: device.info().size, readOnly },
        'export ready',
      );
    }
    if (opts.defaultExport !== undefined) table.setDefault(opts.defaultExport);
    else if (opts.exports.length === 1) table.setDefault(opts.exports[0]!.name);
    // Declared filters go on before any client can connect, top → bottom.
    for (const spec of opts.exports) {
      for (const f of spec.filters ?? []) {
        try {
          const created = await manager.createFilter(spec.name, f.type, {
            args: f.args,
            position: { at: 'bottom' },
            ...(f.name !== undefined ? { name: f.name } : {}),
          });
          log.info({ export: spec.name, filter: created.name, type: f.type }, 'filter created');
        } catch (err) {
          const where = f.locate?.([]) ?? `export ${spec.name}: filter ${f.type}`;
          const message = `${where}: ${(err as Error).message}`;
          if (err instanceof ManagerError && (err.code === 'invalid' || err.code === 'exists'))
            throw new ConfigError(message);
          throw new Error(message, { cause: err });
        }
      }
    }
  } catch (err) {
    await manager.close();
    throw err;
  }

  const server = new NbdServer({
    exports: exportSource(table, manager),
    logger: log,
    allowList: opts.allowList,
    ...(tls !== undefined ? { tls } : {}),
  });
  let resolveStopped!: () => void;
  const stopped = new Promise<void>((resolve) => (resolveStopped = resolve));
  let stopping: Promise<void> | undefined;
  const stop = (): Promise<void> => {
    stopping ??= (async () => {
      log.info('shutting down: draining connections');
      if (control !== undefined) await control.server.close();
      if (metrics !== undefined)
        await metrics
          .close()
          .catch((err: unknown) => log.error({ err }, 'closing the metrics endpoint failed'));
      await server.close();
      for (const exp of manager.exports()) {
        try {
          const caps = exp.stack.info().caps;
          if (caps.flush && !caps.readOnly) await exp.stack.flush(0);
        } catch (err) {
          log.error({ err, export: exp.name }, 'final flush failed');
        }
      }
      await manager.close();
      if (ownSocket !== undefined) removeSocketFile(ownSocket);
      log.info('stopped');
      resolveStopped();
    })();
    return stopping;
  };

  const tcp: { host: string; port: number }[] = [];
  let ownSocket: string | undefined; // removed at exit only if this daemon created it
  let control: { path: string; server: ControlServer } | undefined;
  let metrics: MetricsServer | undefined;
  try {
    if (opts.metrics !== undefined) {
      metrics = await startMetricsServer({
        manager,
        host: opts.metrics.host,
        port: opts.metrics.port,
        logger: log.child({ component: 'metrics' }),
      });
    }
    // Control first: once clients can connect over NBD, commands work too.
    const listeners = (): NbdListener[] => [
      ...(ownSocket !== undefined
        ? [{ transport: 'unix' as const, path: resolve(ownSocket) }]
        : []),
      ...tcp.map((t) => ({ transport: 'tcp' as const, host: t.host, port: t.port })),
    ];
    if (opts.control !== undefined)
      control = await startControl(opts, manager, server, types, log, listeners);
    for (const fd of activationFds()) {
      await server.listen({ fd });
      log.info({ fd }, 'listening on an inherited socket (socket activation)');
    }
    if (opts.socket !== undefined) {
      await clearStaleSocket(opts.socket);
      await server.listen({ path: opts.socket });
      ownSocket = opts.socket;
      log.info({ socket: opts.socket }, 'listening');
    }
    for (const addr of opts.listen) {
      const l = await server.listen(addr);
      const bound = l.address() as net.AddressInfo;
      tcp.push({ host: addr.host, port: bound.port });
      log.info({ host: addr.host, port: bound.port }, 'listening');
    }
  } catch (err) {
    await stop();
    throw err;
  }
  if (opts.stdio) {
    const socket = new net.Socket({ fd: 0, readable: true, writable: true, allowHalfOpen: true });
    void server.adopt(socket, { transport: 'stdio' }).then(() => stop());
  }
  return {
    server,
    manager,
    tcp,
    ...(control !== undefined ? { control } : {}),
    ...(metrics !== undefined ? { metrics: { host: opts.metrics!.host, port: metrics.port } } : {}),
    stop,
    stopped,
  };
}

async function startControl(
  opts: DaemonOptions,
  manager: DeviceManager,
  server: NbdServer,
  types: FilterTypeRegistry,
  log: Logger,
  listeners: () => NbdListener[],
): Promise<{ path: string; server: ControlServer } | undefined> {
  const path = opts.control!;
  const isDefault = opts.controlIsDefault === true;
  const control = new ControlServer(
    {
      manager,
      version: VERSION,
      startedAt: Date.now(),
      nbdConnections: () => server.connectionCount,
      nbdTls: () => ({
        mode: opts.tls?.mode ?? 'off',
        connections: server.tlsConnectionCount,
      }),
      nbdListeners: listeners,
      loadModule: async (spec, cwd) => {
        const loaded = await types.load(spec, cwd);
        log.info({ module: spec, types: loaded.map((t) => t.name) }, 'filter module loaded');
        return loaded.map((t) => t.name);
      },
    },
    {
      logger: log.child({ component: 'control' }),
      ...(opts.controlGroup !== undefined ? { readOnlyGroup: opts.controlGroup } : {}),
    },
  );
  try {
    prepareSocketDir(path, { strict: isDefault });
    await control.listen(path);
  } catch (err) {
    await control.close().catch(() => undefined);
    if (isDefault && (err as NodeJS.ErrnoException).code === 'EADDRINUSE') {
      log.warn(
        { control: path },
        'another daemon answers on the default control socket; running without one (use --control PATH)',
      );
      return undefined;
    }
    throw new Error(`control socket ${path}: ${(err as Error).message}`, { cause: err });
  }
  log.info({ control: path }, 'control socket ready');
  return { path, server: control };
}

/** systemd-style socket activation: LISTEN_PID is us, LISTEN_FDS listening sockets from fd 3. */
function activationFds(): number[] {
  const pid = Number(process.env.LISTEN_PID);
  const count = Number(process.env.LISTEN_FDS);
  if (pid !== process.pid || !Number.isInteger(count) || count < 1) return [];
  delete process.env.LISTEN_PID;
  delete process.env.LISTEN_FDS;
  delete process.env.LISTEN_FDNAMES;
  return Array.from({ length: count }, (_, i) => 3 + i);
}

/** Stops the daemon on SIGTERM or SIGINT; a second signal exits at once. */
export function stopOnSignals(daemon: RunningDaemon, log: Logger): void {
  let signalled = false;
  const onSignal = (signal: NodeJS.Signals): void => {
    if (signalled) {
      log.warn({ signal }, 'second signal: exiting without draining');
      process.exit(1);
    }
    signalled = true;
    log.info({ signal }, 'signal received');
    void daemon.stop();
  };
  process.on('SIGTERM', onSignal);
  process.on('SIGINT', onSignal);
}

function backendLabel(spec: ExportSpec): string {
  const b = spec.backend;
  if (b.type === 'linear')
    return `linear:${b.segments.map((s) => `${s.path}@${s.offset}+${s.length}`).join(',')}`;
  return b.type === 'file'
    ? `file:${b.path}`
    : b.type === 'nbd'
      ? `nbd:${b.uri}`
      : `memory:${b.size}`;
}
