/**
 * The metrics endpoint: an HTTP server (node:http) answering `GET /metrics` in the Prometheus
 * text format, built at scrape time by MetricsCollector from the manager's exports and the
 * filters on them (any filter with a `metrics()` method, see types.ts), plus the Node process
 * metrics of prom-client. The daemon's `--metrics HOST:PORT` starts it; it binds exactly the
 * host it is given.
 */
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import type { Logger } from 'pino';
import { Registry, collectDefaultMetrics } from 'prom-client';
import type { DeviceManager } from '../core/manager.js';
import { MetricsCollector } from './collector.js';

export interface MetricsServerOptions {
  manager: DeviceManager;
  host: string;
  /** 0 picks a free port (reported in the result). */
  port: number;
  logger: Logger;
  /** Also export Node process metrics (CPU, memory, event loop lag, GC); default true. */
  processMetrics?: boolean;
}

export interface MetricsServer {
  port: number;
  close(): Promise<void>;
}

/** Renders the metrics text once (what `/metrics` answers). */
export async function renderMetrics(
  collector: MetricsCollector,
  processRegistry?: Registry,
): Promise<string> {
  const snapshot = collector.snapshot();
  const registry = processRegistry ? Registry.merge([processRegistry, snapshot]) : snapshot;
  return registry.metrics();
}

export async function startMetricsServer(opts: MetricsServerOptions): Promise<MetricsServer> {
  const { logger } = opts;
  const collector = new MetricsCollector(opts.manager, logger);
  let processRegistry: Registry | undefined;
  if (opts.processMetrics ?? true) {
    processRegistry = new Registry();
    collectDefaultMetrics({ register: processRegistry });
  }

  const server = http.createServer((req, res) => {
    const path = (req.url ?? '/').split('?', 1)[0];
    if (req.method !== 'GET' && req.method !== 'HEAD') {
      res
        .writeHead(405, { Allow: 'GET, HEAD', 'Content-Type': 'text/plain' })
        .end('method not allowed\n');
      return;
    }
    if (path === '/') {
      res
        .writeHead(200, { 'Content-Type': 'text/plain; charset=utf-8' })
        .end('devfilter metrics: see /metrics\n');
      return;
    }
    if (path !== '/metrics') {
      res.writeHead(404, { 'Content-Type': 'text/plain' }).end('not found\n');
      return;
    }
    renderMetrics(collector, processRegistry).then(
      (text) => {
        res.writeHead(200, { 'Content-Type': Registry.PROMETHEUS_CONTENT_TYPE });
        res.end(req.method === 'HEAD' ? undefined : text);
      },
      (err: unknown) => {
        logger.error({ err }, 'collecting metrics failed');
        res.writeHead(500, { 'Content-Type': 'text/plain' }).end('collecting metrics failed\n');
      },
    );
  });
  server.on('clientError', (_err, socket) => socket.destroy());

  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(opts.port, opts.host, () => {
      server.off('error', reject);
      resolve();
    });
  });
  server.on('error', (err) => logger.error({ err }, 'metrics server error'));
  const address = server.address() as AddressInfo;
  logger.info({ host: address.address, port: address.port }, 'metrics endpoint listening');

  let closing: Promise<void> | undefined;
  return {
    port: address.port,
    close: () => {
      closing ??= new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
      });
      return closing;
    },
  };
}
