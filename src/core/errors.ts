/**
 * Errors that cross the device boundary. Every layer (backend, filter, front end) speaks in
 * these errno names; the NBD layer maps them to wire values, so a host errno never leaks onto
 * the wire and a filter's EPERM stays an EPERM all the way to the client.
 */

export const ERRNOS = [
  'EPERM',
  'EIO',
  'ENOMEM',
  'EINVAL',
  'ENOSPC',
  'EOVERFLOW',
  'ENOTSUP',
  'ESHUTDOWN',
] as const;

export type Errno = (typeof ERRNOS)[number];

export class DeviceError extends Error {
  readonly errno: Errno;

  constructor(errno: Errno, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'DeviceError';
    this.errno = errno;
  }
}

/** Host error codes (from fs, net, koffi calls) folded onto the errnos a device may report. */
const HOST_CODE_TO_ERRNO: Record<string, Errno> = {
  EPERM: 'EPERM',
  EACCES: 'EPERM',
  EROFS: 'EPERM',
  ENOSPC: 'ENOSPC',
  EDQUOT: 'ENOSPC',
  EFBIG: 'ENOSPC',
  EINVAL: 'EINVAL',
  ENOMEM: 'ENOMEM',
  EOVERFLOW: 'EOVERFLOW',
  ENOTSUP: 'ENOTSUP',
  EOPNOTSUPP: 'ENOTSUP',
  ESHUTDOWN: 'ESHUTDOWN',
};

export function isErrno(value: unknown): value is Errno {
  return typeof value === 'string' && (ERRNOS as readonly string[]).includes(value);
}

/** Anything thrown below a device becomes a DeviceError; unknown failures are EIO. */
export function toDeviceError(err: unknown): DeviceError {
  if (err instanceof DeviceError) return err;
  // An external filter may bring its own copy of DeviceError, or any Error with an errno name.
  const errno = (err as { errno?: unknown } | null)?.errno;
  if (isErrno(errno))
    return new DeviceError(errno, err instanceof Error ? err.message : String(err), { cause: err });
  const code = (err as { code?: unknown } | null)?.code;
  const mapped = typeof code === 'string' ? (HOST_CODE_TO_ERRNO[code] ?? 'EIO') : 'EIO';
  const message = err instanceof Error ? err.message : String(err);
  return new DeviceError(mapped, message, { cause: err });
}

/** Invariant check in the TIGER_STYLE sense: a failure here is a bug, never bad input. */
export function assert(condition: unknown, message: string): asserts condition {
  if (!condition) throw new Error(`assertion failed: ${message}`);
}
