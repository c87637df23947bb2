/** The metrics endpoint and the interface through which filters expose metrics. */
export {
  startMetricsServer,
  renderMetrics,
  type MetricsServer,
  type MetricsServerOptions,
} from './server.js';
export { MetricsCollector } from './collector.js';
export * from './types.js';
