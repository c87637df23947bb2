/** devfilter as a library: everything the CLI uses is importable. */
export * from './core/device.js';
export * from './core/errors.js';
export * from './core/size.js';
export * from './core/filter.js';
export { FilterTypeRegistry, FilterArgsError } from './core/filter-types.js';
export { LiveStack, StackChangeError, type Position, type StackEntry } from './core/stack.js';
export {
  DeviceManager,
  ManagerError,
  type ManagedExport,
  type FilterEvent,
} from './core/manager.js';
export { MemoryBackend } from './backends/memory.js';
export { FileBackend } from './backends/file.js';
export { ExportTable, type NbdExport, type ExportSource } from './nbd/exports.js';
export { NbdServer, type NbdServerOptions } from './nbd/server.js';
export { builtinFilterTypes } from './filters/index.js';
export { CbtFilter, ChangeView } from './filters/cbt/index.js';
export { cbtFilterType } from './filters/index.js';
export * from './control/index.js';
export * from './metrics/index.js';
export { NbdClient, parseNbdUri } from './nbd/client.js';
