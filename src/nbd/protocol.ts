/**
 * NBD wire constants (doc/proto.md of the NBD project). All integers on the wire are
 * big-endian. Shared by the server and the client.
 */

export const NBD_DEFAULT_PORT = 10809;

export const INIT_PASSWD = 0x4e42444d41474943n; // "NBDMAGIC"
export const IHAVEOPT = 0x49484156454f5054n; // "IHAVEOPT"
export const OPTION_REPLY_MAGIC = 0x0003e889045565a9n;

export const REQUEST_MAGIC = 0x25609513;
export const EXTENDED_REQUEST_MAGIC = 0x21e41c71;
export const SIMPLE_REPLY_MAGIC = 0x67446698;
export const STRUCTURED_REPLY_MAGIC = 0x668e33ef;

export const REQUEST_HEADER_SIZE = 28;
export const SIMPLE_REPLY_HEADER_SIZE = 16;
export const STRUCTURED_REPLY_HEADER_SIZE = 20;

/** Handshake flags (server → client, u16). */
export const FLAG_FIXED_NEWSTYLE = 1 << 0;
export const FLAG_NO_ZEROES = 1 << 1;

/** Client flags (client → server, u32). */
export const FLAG_C_FIXED_NEWSTYLE = 1 << 0;
export const FLAG_C_NO_ZEROES = 1 << 1;

export const Opt = {
  EXPORT_NAME: 1,
  ABORT: 2,
  LIST: 3,
  PEEK_EXPORT: 4,
  STARTTLS: 5,
  INFO: 6,
  GO: 7,
  STRUCTURED_REPLY: 8,
  LIST_META_CONTEXT: 9,
  SET_META_CONTEXT: 10,
  EXTENDED_HEADERS: 11,
} as const;

const REP_ERR = 0x80000000;

export const Rep = {
  ACK: 1,
  SERVER: 2,
  INFO: 3,
  META_CONTEXT: 4,
  ERR_UNSUP: REP_ERR + 1,
  ERR_POLICY: REP_ERR + 2,
  ERR_INVALID: REP_ERR + 3,
  ERR_PLATFORM: REP_ERR + 4,
  ERR_TLS_REQD: REP_ERR + 5,
  ERR_UNKNOWN: REP_ERR + 6,
  ERR_SHUTDOWN: REP_ERR + 7,
  ERR_BLOCK_SIZE_REQD: REP_ERR + 8,
  ERR_TOO_BIG: REP_ERR + 9,
  ERR_EXT_HEADER_REQD: REP_ERR + 10,
} as const;

export function isErrorReply(type: number): boolean {
  return type >= REP_ERR;
}

export const Info = {
  EXPORT: 0,
  NAME: 1,
  DESCRIPTION: 2,
  BLOCK_SIZE: 3,
} as const;

/** Transmission flags (u16). */
export const TFlag = {
  HAS_FLAGS: 1 << 0,
  READ_ONLY: 1 << 1,
  SEND_FLUSH: 1 << 2,
  SEND_FUA: 1 << 3,
  ROTATIONAL: 1 << 4,
  SEND_TRIM: 1 << 5,
  SEND_WRITE_ZEROES: 1 << 6,
  SEND_DF: 1 << 7,
  CAN_MULTI_CONN: 1 << 8,
  SEND_RESIZE: 1 << 9,
  SEND_CACHE: 1 << 10,
  SEND_FAST_ZERO: 1 << 11,
} as const;

export const Cmd = {
  READ: 0,
  WRITE: 1,
  DISC: 2,
  FLUSH: 3,
  TRIM: 4,
  CACHE: 5,
  WRITE_ZEROES: 6,
  BLOCK_STATUS: 7,
  RESIZE: 8,
} as const;

/** Command flags (u16). */
export const CmdFlag = {
  FUA: 1 << 0,
  NO_HOLE: 1 << 1,
  DF: 1 << 2,
  REQ_ONE: 1 << 3,
  FAST_ZERO: 1 << 4,
  PAYLOAD_LEN: 1 << 5,
} as const;

export const Chunk = {
  NONE: 0,
  OFFSET_DATA: 1,
  OFFSET_HOLE: 2,
  BLOCK_STATUS: 5,
  BLOCK_STATUS_EXT: 6,
  ERROR: (1 << 15) + 1,
  ERROR_OFFSET: (1 << 15) + 2,
} as const;

export const CHUNK_FLAG_DONE = 1 << 0;

/** Wire error values; part of the protocol, never the host's errno numbers. */
export const NbdErr = {
  EPERM: 1,
  EIO: 5,
  ENOMEM: 12,
  EINVAL: 22,
  ENOSPC: 28,
  EOVERFLOW: 75,
  ENOTSUP: 95,
  ESHUTDOWN: 108,
} as const;

export type NbdErrName = keyof typeof NbdErr;

export function nbdErrName(value: number): NbdErrName | undefined {
  for (const [name, v] of Object.entries(NbdErr)) if (v === value) return name as NbdErrName;
  return undefined;
}

export const BASE_ALLOCATION = 'base:allocation';

/** base:allocation state bits. */
export const STATE_HOLE = 1 << 0;
export const STATE_ZERO = 1 << 1;

/** Longest export name or meta context name accepted (spec: keep names ≤ 4096 bytes). */
export const MAX_NAME_BYTES = 4096;
/** Longest option payload accepted before the connection is treated as hostile. */
export const MAX_OPTION_BYTES = 1024 * 1024;
/** Longest error message sent in an option reply or error chunk. */
export const MAX_ERROR_MESSAGE_BYTES = 256;
