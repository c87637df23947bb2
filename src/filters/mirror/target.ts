/**
 * Opening a mirror's target from its `target` argument: an NBD URI (nbd://, nbd+unix://) is an
 * export of another server (NbdBackend); anything else is a path, a block device or a regular
 * file (FileBackend). A missing regular file is created sparse with the source's size, and is
 * then known to read as zeros everywhere, so holes of the source need not be written at all.
 */
import fs from 'node:fs';
import type { Logger } from 'pino';
import type { Device } from '../../core/device.js';

export interface OpenedTarget {
  device: Device;
  /** The target was created here: every byte reads as zero until written. */
  fresh: boolean;
  /** What the export's backendLabel becomes after cutover ("file:PATH", "nbd:URI"). */
  label: string;
}

export const isNbdUri = (target: string): boolean => /^nbds?(\+unix)?:\/\//.test(target);

export async function openTarget(
  target: string,
  size: number,
  opts: { logger?: Logger; retryTimeoutMs: number; createIfMissing: boolean },
): Promise<OpenedTarget> {
  let device: Device;
  let fresh = false;
  let label: string;
  if (isNbdUri(target)) {
    const { NbdBackend } = await import('../../backends/nbd.js');
    device = await NbdBackend.open(target, {
      retryTimeoutMs: opts.retryTimeoutMs,
      backoffMs: { initial: 100, max: 1000 },
      ...(opts.logger !== undefined ? { logger: opts.logger } : {}),
    });
    label = `nbd:${target}`;
  } else {
    const { FileBackend } = await import('../../backends/file.js');
    fresh = opts.createIfMissing && !fs.existsSync(target);
    device = await FileBackend.open(target, fresh ? { create: { size } } : {});
    label = `file:${target}`;
  }
  const info = device.info();
  const problem =
    info.size !== size
      ? `the target has ${info.size} bytes, the export ${size} (they must be equal)`
      : info.caps.readOnly
        ? 'the target is read-only'
        : undefined;
  if (problem !== undefined) {
    await device.close().catch(() => undefined);
    throw new Error(`${target}: ${problem}`);
  }
  return { device, fresh, label };
}
