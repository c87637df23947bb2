/**
 * Server side of fixed-newstyle negotiation (doc/proto.md, "Option haggling"). Options are
 * handled strictly one at a time; every option's payload is consumed exactly, whatever its
 * type, so the stream never desyncs. Returns what transmission needs, or null when the
 * client went away, aborted, or broke a MUST (in which case the connection is closed).
 */
import type { Socket } from 'node:net';
import type { Logger } from 'pino';
import { hasStatusContext, type DeviceInfo } from '../core/device.js';
import { ByteQueue } from './byte-queue.js';
import type { ExportSource, NbdExport } from './exports.js';
import { upgradeToTls, type NbdTlsOptions, type TlsPeerIdentity } from './tls.js';
import {
  BASE_ALLOCATION,
  FLAG_C_FIXED_NEWSTYLE,
  FLAG_C_NO_ZEROES,
  FLAG_FIXED_NEWSTYLE,
  FLAG_NO_ZEROES,
  IHAVEOPT,
  INIT_PASSWD,
  Info,
  MAX_ERROR_MESSAGE_BYTES,
  MAX_NAME_BYTES,
  MAX_OPTION_BYTES,
  OPTION_REPLY_MAGIC,
  Opt,
  Rep,
  TFlag,
} from './protocol.js';

export interface NegotiationOptions {
  exports: ExportSource;
  logger: Logger;
  /** Answer NBD_OPT_LIST with the export names (ERR_POLICY when false). */
  allowList: boolean;
  /** True once the server is shutting down: options get ERR_SHUTDOWN. */
  isShuttingDown: () => boolean;
  /** TLS offered or required; absent: NOTLS (STARTTLS gets ERR_POLICY). */
  tls?: NbdTlsOptions;
  /** Called with the TLS socket once STARTTLS succeeded (it replaces the plain one). */
  onTlsUpgrade?: (socket: Socket) => void;
}

/** What the transmission phase needs to know about a negotiated connection. */
export interface Negotiated {
  readonly export: NbdExport;
  readonly structuredReplies: boolean;
  /** Selected metadata contexts by id (valid for this export only). */
  readonly metaContexts: ReadonlyMap<number, string>;
  /** Device facts sampled when the export was opened. */
  readonly info: DeviceInfo;
  readonly transmissionFlags: number;
  /** Bytes that arrived after the final option, already belonging to transmission. */
  readonly leftover: Buffer[];
  /** The socket transmission runs on: the TLS socket after STARTTLS, else the plain one. */
  readonly socket: Socket;
  /** Present when the connection runs over TLS: what the client proved in the handshake. */
  readonly tls?: TlsPeerIdentity;
}

/** Context ids remembered per negotiation before the table starts over (see metaContext). */
const MAX_REMEMBERED_CONTEXT_IDS = 1024;

const KNOWN_CLIENT_FLAGS = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;

/** How long a client may keep its side open after ABORT was acknowledged. */
const ABORT_GRACE_MS = 5000;

class ProtocolViolation extends Error {}

/**
 * How one connection treats TLS, decided when it starts and kept for its life (the spec wants
 * one mode per connection): NOTLS, FORCEDTLS (nothing but STARTTLS and ABORT before TLS), or
 * SELECTIVETLS (TLS at the client's choice, needed only to open TLS-only exports).
 */
type ConnectionTlsMode = 'notls' | 'forced' | 'selective';

/** Marks the STARTTLS option that is to be acknowledged and followed by the TLS handshake. */
const STARTTLS = Symbol('starttls');

export function transmissionFlags(
  info: DeviceInfo,
  readOnly: boolean,
  structured: boolean,
): number {
  const caps = info.caps;
  const ro = readOnly || caps.readOnly;
  let flags = TFlag.HAS_FLAGS;
  if (ro) flags |= TFlag.READ_ONLY;
  if (caps.flush) flags |= TFlag.SEND_FLUSH;
  if (caps.fua && !ro) flags |= TFlag.SEND_FUA;
  if (caps.rotational) flags |= TFlag.ROTATIONAL;
  if (caps.trim && !ro) flags |= TFlag.SEND_TRIM;
  if (caps.zero && !ro) {
    flags |= TFlag.SEND_WRITE_ZEROES;
    if (caps.fastZero) flags |= TFlag.SEND_FAST_ZERO;
  }
  // DF needs structured replies: with simple replies there is nothing to fragment.
  if (structured) flags |= TFlag.SEND_DF;
  if (caps.multiConn) flags |= TFlag.CAN_MULTI_CONN;
  if (caps.cache) flags |= TFlag.SEND_CACHE;
  return flags;
}

/**
 * The contexts an export offers, sampled from its device now (filters that answer contexts of
 * their own may come and go later; a context bound at SET time whose filter has left gets
 * EINVAL from BLOCK_STATUS). base:allocation first, then the device's own, listed.
 */
function availableContexts(info: DeviceInfo): string[] {
  const out = [BASE_ALLOCATION];
  for (const c of info.statusContexts ?? []) if (!out.includes(c)) out.push(c);
  return out;
}

export class Negotiator {
  private queue: ByteQueue;
  private socket: Socket;
  private structured = false;
  private tlsMode: ConnectionTlsMode = 'notls';
  /** Set once the TLS handshake succeeded: what the client proved. */
  private tlsPeer: TlsPeerIdentity | undefined;
  /** Some export needs TLS: before TLS, unknown names are refused like TLS-only ones. */
  private anyTlsOnly = false;
  private noZeroes = false;
  /** Contexts chosen by the last SET_META_CONTEXT, and the export they were chosen for. */
  private selected: { exportName: string; contexts: Map<number, string> } | undefined;
  /** Context ids of this negotiation: nonzero, one per name, stable across repeated SETs. */
  private readonly contextIds = new Map<string, number>();

  constructor(
    socket: Socket,
    private readonly opts: NegotiationOptions,
  ) {
    this.socket = socket;
    // Room for the largest option we accept plus its header.
    this.queue = new ByteQueue(socket, MAX_OPTION_BYTES + 64);
  }

  async run(): Promise<Negotiated | null> {
    try {
      const session = await this.negotiate();
      return session === null
        ? null
        : {
            ...session,
            leftover: this.queue.detach(),
            socket: this.socket,
            ...(this.tlsPeer !== undefined ? { tls: this.tlsPeer } : {}),
          };
    } catch (err) {
      if (err instanceof ProtocolViolation) {
        this.opts.logger.warn({ reason: err.message }, 'negotiation: client violated the protocol');
        this.socket.destroy();
        return null;
      }
      throw err;
    }
  }

  private async negotiate(): Promise<Negotiated | null> {
    const greeting = Buffer.alloc(18);
    greeting.writeBigUInt64BE(INIT_PASSWD, 0);
    greeting.writeBigUInt64BE(IHAVEOPT, 8);
    greeting.writeUInt16BE(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES, 16);
    this.send(greeting);

    const cflagsBuf = await this.queue.read(4);
    if (cflagsBuf === null) return null;
    const cflags = cflagsBuf.readUInt32BE(0);
    if ((cflags & ~KNOWN_CLIENT_FLAGS) !== 0) {
      throw new ProtocolViolation(`unknown client flags 0x${cflags.toString(16)}`);
    }
    // Without C_FIXED_NEWSTYLE we still speak fixed newstyle: every client that omits it
    // only sends options that plain newstyle also has, and we never send TLS errors.
    this.noZeroes = (cflags & FLAG_C_NO_ZEROES) !== 0;
    this.chooseTlsMode((cflags & FLAG_C_FIXED_NEWSTYLE) !== 0);

    for (;;) {
      const header = await this.queue.read(16);
      if (header === null) return null;
      if (header.readBigUInt64BE(0) !== IHAVEOPT) {
        throw new ProtocolViolation('bad option magic');
      }
      const option = header.readUInt32BE(8);
      const length = header.readUInt32BE(12);
      if (length > MAX_OPTION_BYTES) {
        throw new ProtocolViolation(
          `option ${option} length ${length} exceeds ${MAX_OPTION_BYTES}`,
        );
      }
      const data = length === 0 ? Buffer.alloc(0) : await this.queue.read(length);
      if (data === null) return null;
      this.opts.logger.debug({ option, length }, 'negotiation: option');

      if (option === Opt.ABORT) {
        this.reply(option, Rep.ACK);
        this.socket.end();
        // The client MUST now drop the connection; one that keeps its side open is cut off
        // after a grace period instead of holding the connection forever.
        setTimeout(() => this.socket.destroy(), ABORT_GRACE_MS).unref();
        return null;
      }
      if (this.opts.isShuttingDown()) {
        this.replyError(option, Rep.ERR_SHUTDOWN, 'server is shutting down');
        continue;
      }
      const done = this.handleOption(option, data);
      if (done === STARTTLS) {
        if (!(await this.startTls())) return null;
        continue;
      }
      if (done !== undefined) return done;
    }
  }

  /** Returns a session when the option ends negotiation, STARTTLS when TLS is to begin. */
  private handleOption(option: number, data: Buffer): Negotiated | typeof STARTTLS | undefined {
    if (this.tlsMode === 'forced' && this.tlsPeer === undefined && option !== Opt.STARTTLS) {
      // FORCEDTLS: EXPORT_NAME cannot be refused with an error, so the connection ends.
      if (option === Opt.EXPORT_NAME) throw new ProtocolViolation('EXPORT_NAME before TLS');
      this.replyError(
        option,
        Rep.ERR_TLS_REQD,
        'this server requires TLS: send NBD_OPT_STARTTLS first',
      );
      return undefined;
    }
    switch (option) {
      case Opt.EXPORT_NAME:
        return this.exportName(data);
      case Opt.LIST:
        this.list(data);
        return undefined;
      case Opt.STARTTLS:
        if (data.length !== 0) this.replyError(option, Rep.ERR_INVALID, 'STARTTLS takes no data');
        else if (this.tlsPeer !== undefined)
          this.replyError(option, Rep.ERR_INVALID, 'TLS is already active');
        else if (this.opts.tls === undefined)
          this.replyError(option, Rep.ERR_POLICY, 'TLS is not configured on this server');
        else if (this.tlsMode === 'notls')
          this.replyError(option, Rep.ERR_POLICY, 'TLS needs fixed newstyle negotiation');
        else return STARTTLS;
        return undefined;
      case Opt.INFO:
      case Opt.GO:
        return this.infoOrGo(option, data);
      case Opt.STRUCTURED_REPLY:
        if (data.length !== 0) {
          this.replyError(option, Rep.ERR_INVALID, 'STRUCTURED_REPLY takes no data');
        } else {
          this.structured = true;
          this.reply(option, Rep.ACK);
        }
        return undefined;
      case Opt.LIST_META_CONTEXT:
      case Opt.SET_META_CONTEXT:
        this.metaContext(option, data);
        return undefined;
      default:
        this.replyError(option, Rep.ERR_UNSUP, `option ${option} is not supported`);
        return undefined;
    }
  }

  private exportName(data: Buffer): Negotiated {
    const name = decodeName(data);
    const exp = name === undefined ? undefined : this.opts.exports.lookup(name);
    // EXPORT_NAME cannot carry an error: the only answer to an unknown name is to hang up.
    if (name === undefined || exp === undefined || this.opts.isShuttingDown()) {
      throw new ProtocolViolation(`EXPORT_NAME for unknown export ${JSON.stringify(name ?? '')}`);
    }
    if (this.tlsRefusal(exp) !== undefined)
      throw new ProtocolViolation(
        `EXPORT_NAME for TLS-only export ${JSON.stringify(name)} without TLS`,
      );
    const session = this.open(exp, name);
    const reply = Buffer.alloc(this.noZeroes ? 10 : 134);
    reply.writeBigUInt64BE(BigInt(session.info.size), 0);
    reply.writeUInt16BE(session.transmissionFlags, 8);
    this.send(reply);
    return session;
  }

  private list(data: Buffer): void {
    if (data.length !== 0) {
      this.replyError(Opt.LIST, Rep.ERR_INVALID, 'LIST takes no data');
      return;
    }
    if (!this.opts.allowList) {
      this.replyError(Opt.LIST, Rep.ERR_POLICY, 'listing exports is disabled');
      return;
    }
    for (const exp of this.opts.exports.list()) {
      // TLS-only exports stay unnamed until the client is on TLS (the spec allows omitting them).
      if (this.tlsRefusal(exp) !== undefined) continue;
      const name = Buffer.from(exp.name, 'utf8');
      const desc = Buffer.from(exp.description ?? '', 'utf8');
      const payload = Buffer.allocUnsafe(4 + name.length + desc.length);
      payload.writeUInt32BE(name.length, 0);
      name.copy(payload, 4);
      desc.copy(payload, 4 + name.length);
      this.reply(Opt.LIST, Rep.SERVER, payload);
    }
    this.reply(Opt.LIST, Rep.ACK);
  }

  private infoOrGo(option: number, data: Buffer): Negotiated | undefined {
    // u32 name length, name, u16 count, count × u16 info type — and nothing more.
    if (data.length < 6) return this.invalid(option, 'request too short');
    const nameLength = data.readUInt32BE(0);
    if (nameLength > data.length - 6) return this.invalid(option, 'name runs past the option');
    const count = data.readUInt16BE(4 + nameLength);
    if (data.length !== 6 + nameLength + 2 * count) {
      return this.invalid(option, 'info request count does not match the option length');
    }
    const name = decodeName(data.subarray(4, 4 + nameLength));
    if (name === undefined) return this.invalid(option, 'export name is not valid UTF-8');
    const requested = new Set<number>();
    for (let i = 0; i < count; i++) requested.add(data.readUInt16BE(6 + nameLength + 2 * i));

    const exp = this.opts.exports.lookup(name);
    const refusal = this.tlsRefusal(exp);
    if (refusal !== undefined) {
      this.replyError(option, refusal.type, refusal.message);
      return undefined;
    }
    if (exp === undefined) {
      this.replyError(option, Rep.ERR_UNKNOWN, `unknown export ${JSON.stringify(name)}`);
      return undefined;
    }
    const session = this.open(exp, name);

    const exportInfo = Buffer.allocUnsafe(12);
    exportInfo.writeUInt16BE(Info.EXPORT, 0);
    exportInfo.writeBigUInt64BE(BigInt(session.info.size), 2);
    exportInfo.writeUInt16BE(session.transmissionFlags, 10);
    this.reply(option, Rep.INFO, exportInfo);
    if (requested.has(Info.NAME)) {
      this.reply(option, Rep.INFO, infoString(Info.NAME, exp.name));
    }
    if (requested.has(Info.DESCRIPTION) && exp.description) {
      this.reply(option, Rep.INFO, infoString(Info.DESCRIPTION, exp.description));
    }
    // Sent even when not asked for: it binds only clients that asked, and informs the rest.
    const bs = session.info.blockSize;
    const blockSize = Buffer.allocUnsafe(14);
    blockSize.writeUInt16BE(Info.BLOCK_SIZE, 0);
    blockSize.writeUInt32BE(bs.minimum, 2);
    blockSize.writeUInt32BE(bs.preferred, 6);
    blockSize.writeUInt32BE(bs.maximum, 10);
    this.reply(option, Rep.INFO, blockSize);
    this.reply(option, Rep.ACK);
    return option === Opt.GO ? session : undefined;
  }

  private metaContext(option: number, data: Buffer): void {
    const isSet = option === Opt.SET_META_CONTEXT;
    // SET replaces the previous selection even when it fails.
    if (isSet) this.selected = undefined;
    const parsed = parseMetaContextRequest(data);
    if (typeof parsed === 'string') {
      this.invalid(option, parsed);
      return;
    }
    if (isSet && !this.structured) {
      this.invalid(option, 'SET_META_CONTEXT needs structured replies first');
      return;
    }
    const exp = this.opts.exports.lookup(parsed.exportName);
    const refusal = this.tlsRefusal(exp);
    if (refusal !== undefined) {
      this.replyError(option, refusal.type, refusal.message);
      return;
    }
    if (exp === undefined) {
      this.replyError(
        option,
        Rep.ERR_UNKNOWN,
        `unknown export ${JSON.stringify(parsed.exportName)}`,
      );
      return;
    }
    const info = exp.device.info();
    const available = availableContexts(info);
    const matches = new Set<string>();
    if (parsed.queries.length === 0) {
      if (!isSet) for (const c of available) matches.add(c);
    }
    for (const query of parsed.queries) {
      for (const c of available) {
        if (c === query) matches.add(c);
        // Wildcards ("base:", "qemu:dirty-bitmap:") list; they never select.
        else if (!isSet && query.endsWith(':') && c.startsWith(query)) matches.add(c);
      }
      // A member of a numbered family ("devfilter:cbt:NAME:since:12"): asked for by name only.
      if (query !== BASE_ALLOCATION && !matches.has(query) && hasStatusContext(info, query))
        matches.add(query);
    }
    // Ids stay stable across SETs, but the table must not grow without bound: numbered
    // families make the names unlimited. Only the last SET counts, so starting over is safe.
    if (isSet && this.contextIds.size > MAX_REMEMBERED_CONTEXT_IDS) this.contextIds.clear();
    const chosen = new Map<number, string>();
    for (const c of matches) {
      const id = isSet ? this.contextId(c) : 0;
      const name = Buffer.from(c, 'utf8');
      const payload = Buffer.allocUnsafe(4 + name.length);
      payload.writeUInt32BE(id, 0);
      name.copy(payload, 4);
      this.reply(option, Rep.META_CONTEXT, payload);
      chosen.set(id, c);
    }
    if (isSet) this.selected = { exportName: parsed.exportName, contexts: chosen };
    this.reply(option, Rep.ACK);
  }

  private contextId(name: string): number {
    let id = this.contextIds.get(name);
    if (id === undefined) {
      id = this.contextIds.size + 1;
      this.contextIds.set(name, id);
    }
    return id;
  }

  private open(exp: NbdExport, requestedName: string): Negotiated {
    const info = exp.device.info();
    const flags = transmissionFlags(info, exp.readOnly === true, this.structured);
    // Contexts count only if they were chosen for the very export being opened.
    const contexts =
      this.selected !== undefined && this.selected.exportName === requestedName
        ? this.selected.contexts
        : new Map<number, string>();
    return {
      export: exp,
      structuredReplies: this.structured,
      metaContexts: contexts,
      info,
      transmissionFlags: flags,
      leftover: [],
      socket: this.socket,
    };
  }

  /** Decides the connection's TLS mode once, from the server's setting and its exports. */
  private chooseTlsMode(fixedNewstyle: boolean): void {
    const tls = this.opts.tls;
    if (tls === undefined) return;
    let anyOptional = false;
    for (const exp of this.opts.exports.list()) {
      if (this.requiresTls(exp)) this.anyTlsOnly = true;
      else anyOptional = true;
    }
    // A client without fixed newstyle must be served in NOTLS mode; TLS-only exports are
    // then refused with ERR_POLICY (never ERR_TLS_REQD, which NOTLS forbids).
    if (!fixedNewstyle) this.tlsMode = 'notls';
    else if (tls.mode === 'require' && !anyOptional) this.tlsMode = 'forced';
    else this.tlsMode = 'selective';
  }

  private requiresTls(exp: NbdExport): boolean {
    const tls = this.opts.tls;
    if (tls === undefined) return false;
    return (exp.tls ?? (tls.mode === 'require' ? 'required' : 'optional')) === 'required';
  }

  /**
   * Why `exp` (undefined: a name no export has) cannot be used on this connection yet, or
   * undefined when it can. Before TLS, unknown names get the same answer as TLS-only exports
   * when there are any, so that a plain client cannot probe which TLS-only exports exist.
   */
  private tlsRefusal(exp: NbdExport | undefined): { type: number; message: string } | undefined {
    if (this.opts.tls === undefined || this.tlsPeer !== undefined) return undefined;
    // An unknown name gets the same answer as a TLS-only export while there are any: a plain
    // client must not learn which names exist by the difference.
    if (exp === undefined ? !this.anyTlsOnly : !this.requiresTls(exp)) return undefined;
    if (this.tlsMode === 'notls')
      return { type: Rep.ERR_POLICY, message: 'this export requires TLS (and fixed newstyle)' };
    return {
      type: Rep.ERR_TLS_REQD,
      message: 'this export requires TLS: send NBD_OPT_STARTTLS first',
    };
  }

  /**
   * Acknowledges STARTTLS and runs the TLS handshake on the socket; on success, negotiation
   * starts over on the TLS socket with everything negotiated before forgotten (the spec's
   * rule: options before TLS may have been tampered with). False when the handshake failed
   * (the connection is closed then).
   */
  private async startTls(): Promise<boolean> {
    const plain = this.socket;
    // From here the bytes belong to TLS: stop reading them as options. Anything that came
    // after STARTTLS (a client that did not wait for the ACK) goes back to the socket, where
    // the TLS layer picks it up.
    const early = this.queue.detach();
    plain.pause();
    for (const b of early) plain.unshift(b);
    // The ACK must be on the wire before the TLS layer takes over the socket's writes.
    const ackSent = await new Promise<boolean>((resolve) => {
      if (plain.destroyed) return resolve(false);
      plain.write(replyHeader(Opt.STARTTLS, Rep.ACK, 0), (err) => resolve(!err));
    });
    if (!ackSent) return false;
    let upgraded;
    try {
      upgraded = await upgradeToTls(plain, this.opts.tls!);
    } catch (err) {
      this.opts.logger.warn({ reason: (err as Error).message }, 'TLS handshake failed');
      return false;
    }
    this.socket = upgraded.socket;
    this.opts.onTlsUpgrade?.(upgraded.socket);
    this.queue = new ByteQueue(upgraded.socket, MAX_OPTION_BYTES + 64);
    this.tlsPeer = upgraded.identity;
    this.structured = false;
    this.selected = undefined;
    this.contextIds.clear();
    this.opts.logger.info(
      {
        kind: this.opts.tls!.credentials.kind,
        ...upgraded.identity,
        protocol: upgraded.socket.getProtocol(),
        cipher: upgraded.socket.getCipher().name,
      },
      'TLS established',
    );
    return true;
  }

  private invalid(option: number, message: string): undefined {
    this.replyError(option, Rep.ERR_INVALID, message);
    return undefined;
  }

  private replyError(option: number, type: number, message: string): void {
    this.opts.logger.debug({ option, type, message }, 'negotiation: option refused');
    this.reply(option, type, truncateUtf8(message, MAX_ERROR_MESSAGE_BYTES));
  }

  private reply(option: number, type: number, payload?: Buffer): void {
    const header = replyHeader(option, type, payload?.length ?? 0);
    this.send(payload === undefined ? header : Buffer.concat([header, payload]));
  }

  private send(buf: Buffer): void {
    if (!this.socket.destroyed) this.socket.write(buf);
  }
}

function replyHeader(option: number, type: number, length: number): Buffer {
  const header = Buffer.allocUnsafe(20);
  header.writeBigUInt64BE(OPTION_REPLY_MAGIC, 0);
  header.writeUInt32BE(option, 8);
  header.writeUInt32BE(type, 12);
  header.writeUInt32BE(length, 16);
  return header;
}

function infoString(type: number, text: string): Buffer {
  const body = Buffer.from(text, 'utf8');
  const out = Buffer.allocUnsafe(2 + body.length);
  out.writeUInt16BE(type, 0);
  body.copy(out, 2);
  return out;
}

const utf8 = new TextDecoder('utf-8', { fatal: true });

/** Export and context names are UTF-8 without NUL, at most MAX_NAME_BYTES long. */
function decodeName(bytes: Buffer): string | undefined {
  if (bytes.length > MAX_NAME_BYTES || bytes.includes(0)) return undefined;
  try {
    return utf8.decode(bytes);
  } catch {
    return undefined;
  }
}

function truncateUtf8(text: string, maxBytes: number): Buffer {
  const buf = Buffer.from(text, 'utf8');
  if (buf.length <= maxBytes) return buf;
  let end = maxBytes;
  // Back off to a character boundary (continuation bytes are 10xxxxxx).
  while (end > 0 && (buf[end]! & 0xc0) === 0x80) end--;
  return buf.subarray(0, end);
}

/** Parses u32 name length, name, u32 query count, then count × (u32 length, query). */
function parseMetaContextRequest(data: Buffer): { exportName: string; queries: string[] } | string {
  if (data.length < 8) return 'request too short';
  const nameLength = data.readUInt32BE(0);
  if (nameLength > data.length - 8) return 'export name runs past the option';
  const exportName = decodeName(data.subarray(4, 4 + nameLength));
  if (exportName === undefined) return 'export name is not valid UTF-8 or too long';
  let pos = 4 + nameLength;
  const count = data.readUInt32BE(pos);
  pos += 4;
  const queries: string[] = [];
  for (let i = 0; i < count; i++) {
    if (data.length - pos < 4) return 'query count runs past the option';
    const qlen = data.readUInt32BE(pos);
    pos += 4;
    if (qlen > data.length - pos) return 'query runs past the option';
    const query = decodeName(data.subarray(pos, pos + qlen));
    if (query === undefined) return 'query is not valid UTF-8 or too long';
    pos += qlen;
    queries.push(query);
  }
  if (pos !== data.length) return 'trailing bytes after the queries';
  return { exportName, queries };
}
