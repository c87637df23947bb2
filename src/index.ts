/** devfilter as a library: everything the CLI uses is importable. */
export * from './core/device.js';
export * from './core/errors.js';
export * from './core/size.js';
export { MemoryBackend } from './backends/memory.js';
export { FileBackend } from './backends/file.js';
export { ExportTable, type NbdExport, type ExportSource } from './nbd/exports.js';
export { NbdServer, type NbdServerOptions } from './nbd/server.js';
