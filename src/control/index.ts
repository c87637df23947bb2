/** The control plane: JSON-RPC 2.0 over a unix socket (docs/control.md). */
export { ControlClient, callOnce, DEFAULT_CALL_TIMEOUT_MS } from './client.js';
export { ControlServer, type ControlServerOptions } from './server.js';
export type { ControlContext } from './methods.js';
export {
  ControlUnreachableError,
  MAX_BATCH,
  MAX_REQUEST_LINE_BYTES,
  RPC_ERROR_CODES,
  RpcError,
  type RpcErrorName,
} from './protocol.js';
export { METHOD_NAMES, methodParamSchemas, type MethodName } from './schema.js';
export { CONTROL_ENV, builtinControlPath, resolveControlPath } from './socket-path.js';
