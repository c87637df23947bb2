/**
 * Runs the daemon: opens the exports' backends, serves them over NBD, and on SIGTERM/SIGINT
 * drains every connection, flushes and closes every device before exiting.
 */
import { existsSync, unlinkSync } from 'node:fs';
import net from 'node:net';
import type { Logger } from 'pino';
import type { Device } from '../core/device.js';
import { ExportTable } from '../nbd/exports.js';
import { NbdServer } from '../nbd/server.js';
import { openBackend, type ExportSpec } from './export-spec.js';

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
}

export interface RunningDaemon {
  server: NbdServer;
  /** Where TCP listeners actually listen (port 0 picks a free one). */
  tcp: { host: string; port: number }[];
  stop(): Promise<void>;
  stopped: Promise<void>;
}

export async function startDaemon(opts: DaemonOptions): Promise<RunningDaemon> {
  const log = opts.logger;
  const table = new ExportTable();
  const devices: Device[] = [];
  try {
    for (const spec of opts.exports) {
      const readOnly = opts.readOnly || spec.readOnly === true;
      const device = await openBackend(spec.backend, readOnly);
      devices.push(device);
      table.add({
        name: spec.name,
        device,
        readOnly,
        ...(spec.description !== undefined ? { description: spec.description } : {}),
      });
      log.info({ export: spec.name, backend: spec.backend, size: device.info().size, readOnly }, 'export ready');
    }
    if (opts.defaultExport !== undefined) table.setDefault(opts.defaultExport);
    else if (opts.exports.length === 1) table.setDefault(opts.exports[0]!.name);
  } catch (err) {
    await Promise.allSettled(devices.map((d) => d.close()));
    throw err;
  }

  const server = new NbdServer({ exports: table, logger: log, allowList: opts.allowList });
  let resolveStopped!: () => void;
  const stopped = new Promise<void>((resolve) => (resolveStopped = resolve));
  let stopping: Promise<void> | undefined;
  const stop = (): Promise<void> => {
    stopping ??= (async () => {
      log.info('shutting down: draining connections');
      await server.close();
      for (const d of devices) {
        try {
          if (d.info().caps.flush && !d.info().caps.readOnly) await d.flush(0);
          await d.close();
        } catch (err) {
          log.error({ err }, 'closing a device failed');
        }
      }
      if (ownSocket !== undefined) removeSocketFile(ownSocket);
      log.info('stopped');
      resolveStopped();
    })();
    return stopping;
  };

  const tcp: { host: string; port: number }[] = [];
  let ownSocket: string | undefined; // removed at exit only if this daemon created it
  try {
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
  return { server, tcp, stop, stopped };
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

/** A socket file left by a daemon that died is removed; one that still answers is an error. */
async function clearStaleSocket(path: string): Promise<void> {
  if (!existsSync(path)) return;
  const alive = await new Promise<boolean>((resolve) => {
    const probe = net.connect(path);
    probe.once('connect', () => {
      probe.destroy();
      resolve(true);
    });
    probe.once('error', () => resolve(false));
  });
  if (alive) throw new Error(`socket ${path} is in use by another server`);
  unlinkSync(path);
}

function removeSocketFile(path: string): void {
  try {
    unlinkSync(path);
  } catch {
    // already gone
  }
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
