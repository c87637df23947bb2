/**
 * The device interface: what a backend serves, what a filter sees below itself, and what the
 * front end calls. It knows nothing of NBD; the NBD layer translates wire requests into these
 * calls and their results back into replies.
 *
 * Offsets and lengths are JavaScript numbers, always safe integers (below 2^53). Callers check
 * ranges against `info().size` before calling; devices assert it.
 */

/** Request flags, carried faithfully from the client to the bottom of the stack. */
export const RequestFlags = {
  /** Data must be on stable storage before the request completes. */
  FUA: 1,
  /** writeZeroes: the range must stay allocated (no hole punching). */
  NO_HOLE: 2,
  /** writeZeroes: fail at once with ENOTSUP unless zeroing is faster than writing. */
  FAST_ZERO: 4,
  /** blockStatus: the caller wants only one extent. */
  REQ_ONE: 8,
} as const;

/** State bits of an extent, with the meaning of NBD's base:allocation. 0 means data. */
export const ExtentState = {
  /** Unallocated: writes may allocate (and may hit ENOSPC). */
  HOLE: 1,
  /** Reads as zeros. */
  ZERO: 2,
} as const;

export interface Extent {
  length: number;
  state: number;
}

export interface BlockSizeLimits {
  /** Smallest unit of I/O that needs no read-modify-write: a power of two, 1..65536. */
  minimum: number;
  /** Preferred unit, a power of two >= max(minimum, 512). */
  preferred: number;
  /** Largest read or write payload accepted in one request. */
  maximum: number;
}

export interface DeviceCapabilities {
  readOnly: boolean;
  flush: boolean;
  fua: boolean;
  trim: boolean;
  zero: boolean;
  fastZero: boolean;
  cache: boolean;
  /** A flush through any connection persists what every connection wrote. */
  multiConn: boolean;
  rotational: boolean;
}

/**
 * The capabilities of a read-only image (a snapshot image, a cdp view, a backup): reads,
 * flush (nothing to flush) and block status, safe for several connections at once.
 */
export function readOnlyImageCaps(rotational: boolean): Readonly<DeviceCapabilities> {
  return Object.freeze({
    readOnly: true,
    flush: true,
    fua: false,
    trim: false,
    zero: false,
    fastZero: false,
    cache: false,
    multiConn: true,
    rotational,
  });
}

export interface DeviceInfo {
  size: number;
  blockSize: BlockSizeLimits;
  caps: DeviceCapabilities;
  /**
   * Extra block-status contexts the device answers with `contextStatus()`, besides allocation
   * (which `blockStatus()` answers): full names such as "qemu:dirty-bitmap:cbt". Listed to
   * clients that ask. Absent or empty: none.
   */
  statusContexts?: readonly string[];
  /**
   * Numbered context families: a prefix such as "devfilter:cbt:cbt:since:" whose members are
   * the prefix followed by a decimal number ("devfilter:cbt:cbt:since:12"). Members are
   * answered by `contextStatus()` when a client asks for one by its full name; they are never
   * listed (there are too many).
   */
  statusContextFamilies?: readonly string[];
}

/** Who issued a request; one object per connection, passed by reference (no allocation). */
export interface ClientInfo {
  readonly transport: 'unix' | 'tcp' | 'stdio' | 'internal';
  readonly address?: string;
  readonly port?: number;
  readonly uid?: number;
  readonly gid?: number;
  /** The connection was upgraded to TLS (NBD_OPT_STARTTLS). */
  readonly tls?: boolean;
  /**
   * The subject of the client's certificate, verified against the server's CA, most specific
   * part first: "CN=alice,O=Example" (as `openssl x509 -subject -nameopt RFC2253` prints it).
   */
  readonly tlsSubject?: string;
  /** The PSK identity the client authenticated with. */
  readonly pskIdentity?: string;
}

export interface IoContext {
  readonly exportName: string;
  readonly client: ClientInfo;
}

export interface Device {
  /** Current size, limits and capabilities; the front end samples it when a client connects. */
  info(): DeviceInfo;
  /** Fills `buf` with `buf.length` bytes starting at `offset`. */
  read(buf: Buffer, offset: number, flags: number, ctx?: IoContext): Promise<void>;
  write(data: Buffer, offset: number, flags: number, ctx?: IoContext): Promise<void>;
  /** Makes every write completed before the call durable. */
  flush(flags: number, ctx?: IoContext): Promise<void>;
  /** Advisory discard: the range's content is undefined afterwards. */
  trim(offset: number, length: number, flags: number, ctx?: IoContext): Promise<void>;
  /** The range reads back as zeros afterwards (holes may be punched unless NO_HOLE). */
  writeZeroes(offset: number, length: number, flags: number, ctx?: IoContext): Promise<void>;
  /** Advisory prefetch; semantically a no-op. */
  cache(offset: number, length: number, flags: number, ctx?: IoContext): Promise<void>;
  /**
   * Allocation state from `offset` on: at least one extent, the first starting at `offset`,
   * none reaching past the end of the device. They may cover less or more than `length`.
   */
  blockStatus(offset: number, length: number, flags: number, ctx?: IoContext): Promise<Extent[]>;
  /**
   * Status of the extra context `context` (one of `info().statusContexts`, or a member of one
   * of `info().statusContextFamilies`) from `offset` on, with the same extent rules as
   * `blockStatus()`; state bits are the context's own. Rejects with EINVAL for a context the
   * device does not (or no longer) answer. Devices without extra contexts leave it out.
   */
  contextStatus?(
    context: string,
    offset: number,
    length: number,
    flags: number,
    ctx?: IoContext,
  ): Promise<Extent[]>;
  close(): Promise<void>;
}

export const MIB = 1024 * 1024;

/** Defaults the NBD spec asks a server to accept when it advertises nothing stricter. */
export const DEFAULT_BLOCK_SIZE: Readonly<BlockSizeLimits> = {
  minimum: 1,
  preferred: 4096,
  maximum: 32 * MIB,
};

/** Whether a device of these facts answers `context` through contextStatus(). */
export function hasStatusContext(info: DeviceInfo, context: string): boolean {
  if (info.statusContexts?.includes(context) === true) return true;
  for (const prefix of info.statusContextFamilies ?? []) {
    if (context.startsWith(prefix) && /^[0-9]{1,15}$/.test(context.slice(prefix.length)))
      return true;
  }
  return false;
}

/** Checks that [offset, offset + length) lies inside a device of `size` bytes. */
export function inRange(offset: number, length: number, size: number): boolean {
  return (
    Number.isSafeInteger(offset) &&
    Number.isSafeInteger(length) &&
    offset >= 0 &&
    length >= 0 &&
    offset <= size &&
    length <= size - offset
  );
}
