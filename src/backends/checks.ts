/**
 * Argument checks shared by the backends. The front end checks ranges before calling, so a
 * failure here normally means a filter or caller bug; it still has to be a DeviceError with the
 * errno NBD expects (ENOSPC for writing past the end, EINVAL otherwise), never a crash.
 */
import { inRange } from '../core/device.js';
import { DeviceError } from '../core/errors.js';

/** For read, trim, cache and blockStatus: anything outside the device is EINVAL. */
export function checkRange(op: string, offset: number, length: number, size: number): void {
  if (!inRange(offset, length, size)) {
    throw new DeviceError('EINVAL', `${op}: range ${offset}+${length} outside device of ${size}`);
  }
}

/** For write and writeZeroes: a well-formed range that runs past the end is ENOSPC. */
export function checkWriteRange(op: string, offset: number, length: number, size: number): void {
  if (inRange(offset, length, size)) return;
  const wellFormed =
    Number.isSafeInteger(offset) && Number.isSafeInteger(length) && offset >= 0 && length >= 0;
  throw new DeviceError(
    wellFormed ? 'ENOSPC' : 'EINVAL',
    `${op}: range ${offset}+${length} outside device of ${size}`,
  );
}

/** blockStatus must return at least one non-empty extent, so it needs a non-empty range. */
export function checkStatusRange(offset: number, length: number, size: number): void {
  checkRange('blockStatus', offset, length, size);
  if (length === 0) throw new DeviceError('EINVAL', 'blockStatus: length must be non-zero');
}

export function readOnlyError(op: string): DeviceError {
  return new DeviceError('EPERM', `${op}: device is read-only`);
}

export function closedError(op: string): DeviceError {
  return new DeviceError('ESHUTDOWN', `${op}: device is closed`);
}
