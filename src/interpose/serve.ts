/**
 * The daemon behind one interposed device (`devfilter interpose serve --state FILE`, started
 * by `interpose attach`): `devfilter serve` with one export that reproduces the dm table over
 * the underlying devices, a unix NBD socket for the kernel's NBD device and a control socket
 * for `devfilter filter ...` (attach puts the filters on through it).
 *
 * A daemon serving a mounted file system must not wait on that file system for memory: when
 * the kernel reclaims memory by writing dirty pages of the interposed device, the writes come
 * to this process. So it marks itself an I/O flusher (PR_SET_IO_FLUSHER: its own allocations
 * do not recurse into file system reclaim), where the kernel lets it. It does not mlockall:
 * V8 then fails to change the permissions of its code pages and aborts. docs/interpose.md
 * says what remains of the hazard.
 */
import { readFileSync } from 'node:fs';
import type { Logger } from 'pino';
import { setIoFlusher } from '../backends/libc.js';
import type { InterposeState } from './state.js';

function guardMemory(log: Logger): void {
  try {
    setIoFlusher();
    log.info('PR_SET_IO_FLUSHER: set');
  } catch (err) {
    log.warn(
      { err: (err as Error).message },
      'PR_SET_IO_FLUSHER not set: memory pressure may stall I/O',
    );
  }
}

export async function serveInterposed(statePath: string, log: Logger): Promise<void> {
  const state = JSON.parse(readFileSync(statePath, 'utf8')) as InterposeState;
  guardMemory(log);
  const { startDaemon, stopOnSignals } = await import('../cli/daemon.js');
  const daemon = await startDaemon({
    exports: [
      {
        name: state.exportName,
        description: `dm device ${state.dmName}, interposed`,
        backend: { type: 'linear', segments: state.segments },
        // No filters yet: attach puts them on while the dm device is suspended, so that none
        // misses a write made through the original table before the swap.
      },
    ],
    defaultExport: state.exportName,
    socket: state.socket,
    listen: [],
    stdio: false,
    readOnly: false,
    allowList: true,
    logger: log,
    control: state.control,
  });
  stopOnSignals(daemon, log);
  await daemon.stopped;
}
