/**
 * The NBD client against real nbdkit (the reference it must interoperate with) and against a
 * scripted in-process server (for what nbdkit never does: out-of-order fragmented replies,
 * protocol violations, negotiation errors with messages, silence).
 */

import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { setImmediate as tick, setTimeout as sleep } from 'node:timers/promises';
import { hasTool, requireTools } from '../helpers/tools.js';
import { ByteFifo } from '../../src/nbd/byte-fifo.js';
import {
  NbdClient,
  NbdConnectionError,
  NbdHandshake,
  NbdOptionError,
  NbdProtocolError,
  NbdRequestError,
  info,
  listExports,
  listMetaContexts,
  parseNbdUri,
} from '../../src/nbd/client.js';
import {
  BASE_ALLOCATION,
  CHUNK_FLAG_DONE,
  Chunk,
  Cmd,
  CmdFlag,
  FLAG_C_FIXED_NEWSTYLE,
  FLAG_FIXED_NEWSTYLE,
  FLAG_NO_ZEROES,
  IHAVEOPT,
  INIT_PASSWD,
  Info,
  NbdErr,
  OPTION_REPLY_MAGIC,
  Opt,
  Rep,
  SIMPLE_REPLY_MAGIC,
  STATE_HOLE,
  STATE_ZERO,
  STRUCTURED_REPLY_MAGIC,
  TFlag,
} from '../../src/nbd/protocol.js';

const MiB = 1024 * 1024;
const TIMEOUT = { timeout: 60_000 };

// ---------------------------------------------------------------------------------------------
// nbdkit fixtures

const dir = mkdtempSync(join(tmpdir(), 'nbd-client-test-'));
/** `nbdkit memory 64M`: the default export. */
const MEM_SOCK = join(dir, 'mem.sock');
/** Named exports 'a' and 'b' (strict), a description and block size constraints. */
const NAMED_SOCK = join(dir, 'named.sock');
const children: ChildProcess[] = [];

async function startNbdkit(name: string, sock: string, args: string[]): Promise<void> {
  const pidFile = join(dir, `${name}.pid`);
  const child = spawn(
    'nbdkit',
    ['-U', sock, '-P', pidFile, '--foreground', '--exit-with-parent', ...args],
    { stdio: ['ignore', 'ignore', 'pipe'] },
  );
  children.push(child);
  let stderr = '';
  // nbdkit logs every rejected request; keep the tail for a startup failure message.
  child.stderr!.on('data', (d: Buffer) => (stderr = (stderr + d.toString()).slice(-4096)));
  // nbdkit writes the pid file once it listens, so the socket is ready after it appears.
  const deadline = Date.now() + 10_000;
  while (!existsSync(pidFile)) {
    if (child.exitCode !== null || child.signalCode !== null) {
      throw new Error(`nbdkit ${name} exited early: ${stderr}`);
    }
    if (Date.now() > deadline) throw new Error(`nbdkit ${name} did not start: ${stderr}`);
    await sleep(20);
  }
}

before(async () => {
  if (!hasTool('nbdkit')) return;
  await startNbdkit('mem', MEM_SOCK, ['memory', '64M']);
  await startNbdkit('named', NAMED_SOCK, [
    '--filter=exportname',
    '--filter=blocksize-policy',
    'memory',
    '1M',
    'exportname=a',
    'exportname=b',
    'exportname-list=explicit',
    'exportname-strict=true',
    'exportdesc=fixed:scratch disk',
    'blocksize-minimum=512',
    'blocksize-preferred=4096',
    'blocksize-maximum=65536',
  ]);
});

after(async () => {
  await Promise.all(
    children.map(async (child) => {
      if (child.exitCode !== null || child.signalCode !== null) return;
      const exited = new Promise((resolve) => child.once('exit', resolve));
      child.kill('SIGTERM');
      await exited;
    }),
  );
  rmSync(dir, { recursive: true, force: true });
});

/** Distinct, position-dependent bytes, so misplaced data cannot pass verification. */
function pattern(length: number, seed: number): Buffer {
  const buf = Buffer.allocUnsafe(length);
  for (let i = 0; i < length; i++) buf[i] = (i * 31 + seed * 7 + (i >> 8)) & 0xff;
  return buf;
}

async function withClient<T>(
  opts: Parameters<typeof NbdClient.connect>[0],
  fn: (c: NbdClient) => Promise<T>,
): Promise<T> {
  const client = await NbdClient.connect(opts);
  try {
    return await fn(client);
  } finally {
    if (client.isOpen) await client.disconnect();
    else await client.close();
  }
}

describe('NbdClient against nbdkit', TIMEOUT, () => {
  test('handshake reports size, flags and the base:allocation context', async (t) => {
    if (!requireTools(t, 'nbdkit')) return;
    await withClient({ path: MEM_SOCK }, async (c) => {
      assert.equal(c.size, 64 * MiB);
      assert.equal(c.structuredReplies, true);
      assert.equal(c.usedExportName, false);
      assert.deepEqual([...c.metaContexts.values()], [BASE_ALLOCATION]);
      for (const flag of [
        TFlag.HAS_FLAGS,
        TFlag.SEND_FLUSH,
        TFlag.SEND_FUA,
        TFlag.SEND_TRIM,
        TFlag.SEND_WRITE_ZEROES,
        TFlag.SEND_DF,
        TFlag.CAN_MULTI_CONN,
        TFlag.SEND_CACHE,
        TFlag.SEND_FAST_ZERO,
      ]) {
        assert.ok(
          c.has(flag),
          `flag 0x${flag.toString(16)} in 0x${c.transmissionFlags.toString(16)}`,
        );
      }
      assert.equal(c.has(TFlag.READ_ONLY), false);
      assert.deepEqual(c.capabilities(), {
        readOnly: false,
        flush: true,
        fua: true,
        trim: true,
        zero: true,
        fastZero: true,
        cache: true,
        multiConn: true,
        rotational: false,
      });
      // nbdkit memory advertises no block size constraints.
      assert.equal(c.blockSize, undefined);
    });
  });

  test('GO reports block size and description', async (t) => {
    if (!requireTools(t, 'nbdkit')) return;
    await withClient({ path: NAMED_SOCK, exportName: 'a' }, async (c) => {
      assert.equal(c.size, MiB);
      assert.deepEqual(c.blockSize, { minimum: 512, preferred: 4096, maximum: 65536 });
      assert.equal(c.description, 'scratch disk');
      assert.equal(c.exportInfo.name, 'a');
    });
  });

  test('write/read round trip, with FUA, flush and cache', async (t) => {
    if (!requireTools(t, 'nbdkit')) return;
    await withClient({ path: MEM_SOCK }, async (c) => {
      const data = pattern(12345, 1);
      await c.write(1000, data, CmdFlag.FUA);
      await c.flush();
      await c.cache(0, 65536);
      assert.deepEqual(await c.read(1000, data.length), data);
      assert.deepEqual(await c.read(1000 + 100, 10), data.subarray(100, 110));
      // Zero-length I/O completes locally (nbdkit would refuse it with EINVAL).
      assert.deepEqual(await c.read(0, 0), Buffer.alloc(0));
      await c.write(0, Buffer.alloc(0));
      assert.equal((await c.request(Cmd.READ, 0, 0, 0)).error, NbdErr.EINVAL);
      // DF: one content chunk for the whole read.
      const raw = await c.request(Cmd.READ, CmdFlag.DF, 1000, 4096);
      assert.equal(raw.error, 0);
      assert.equal(raw.chunks.filter((ch) => ch.type === Chunk.OFFSET_DATA).length, 1);
      assert.deepEqual(raw.data, data.subarray(0, 4096));
    });
  });

  test('200 pipelined reads and writes complete and verify', async (t) => {
    if (!requireTools(t, 'nbdkit')) return;
    await withClient({ path: MEM_SOCK }, async (c) => {
      const base = 16 * MiB;
      const slot = 8192;
      const size = (i: number): number => 512 + ((i * 977) % (slot - 512));
      // 200 writes at once to distinct slots.
      const writes = Array.from({ length: 200 }, (_, i) =>
        c.write(base + i * slot, pattern(size(i), i)),
      );
      assert.equal(c.pending, 200);
      await Promise.all(writes);
      // 200 reads of those slots interleaved with 200 writes to other slots.
      const mixed: Array<Promise<unknown>> = [];
      for (let i = 0; i < 200; i++) {
        mixed.push(c.read(base + i * slot, size(i)));
        mixed.push(c.write(base + (200 + i) * slot, pattern(size(i), 1000 + i)));
      }
      assert.equal(c.pending, 400);
      const results = await Promise.all(mixed);
      for (let i = 0; i < 200; i++) {
        assert.deepEqual(results[2 * i], pattern(size(i), i), `slot ${i}`);
      }
      const second = await Promise.all(
        Array.from({ length: 200 }, (_, i) => c.read(base + (200 + i) * slot, size(i))),
      );
      second.forEach((buf, i) =>
        assert.deepEqual(buf, pattern(size(i), 1000 + i), `slot ${200 + i}`),
      );
    });
  });

  test('reads and writes above the maximum payload are split', async (t) => {
    if (!requireTools(t, 'nbdkit')) return;
    await withClient({ path: NAMED_SOCK, exportName: 'b' }, async (c) => {
      assert.equal(c.blockSize?.maximum, 65536);
      const data = pattern(300 * 1024, 3);
      await c.write(4096, data);
      assert.deepEqual(await c.read(4096, data.length), data);
    });
  });

  test('trim and write zeroes read back as zeros', async (t) => {
    if (!requireTools(t, 'nbdkit')) return;
    await withClient({ path: MEM_SOCK }, async (c) => {
      const base = 24 * MiB;
      await c.write(base, pattern(256 * 1024, 4));
      await c.writeZeroes(base + 4096, 65536);
      await c.writeZeroes(base + 131072, 4096, CmdFlag.NO_HOLE);
      await c.trim(base + 196608, 65536);
      const back = await c.read(base, 256 * 1024);
      const expected = pattern(256 * 1024, 4);
      expected.fill(0, 4096, 4096 + 65536);
      expected.fill(0, 131072, 131072 + 4096);
      expected.fill(0, 196608, 196608 + 65536);
      assert.deepEqual(back, expected);
    });
  });

  test('block status shows data, then hole|zero', async (t) => {
    if (!requireTools(t, 'nbdkit')) return;
    await withClient({ path: MEM_SOCK }, async (c) => {
      const base = 32 * MiB;
      await c.write(base, pattern(65536, 5));
      const status = await c.blockStatus(base, MiB);
      assert.deepEqual([...status.keys()], [BASE_ALLOCATION]);
      assert.deepEqual(status.get(BASE_ALLOCATION), [
        { length: 65536, flags: 0 },
        { length: MiB - 65536, flags: STATE_HOLE | STATE_ZERO },
      ]);
      const one = await c.blockStatus(base, MiB, CmdFlag.REQ_ONE);
      assert.deepEqual(one.get(BASE_ALLOCATION), [{ length: 65536, flags: 0 }]);
      await c.writeZeroes(base, 65536);
      const zeroed = (await c.blockStatus(base, 65536)).get(BASE_ALLOCATION)!;
      assert.equal(zeroed[0]!.flags & STATE_ZERO, STATE_ZERO);
    });
  });

  test('server errors reject with NbdRequestError and leave the connection usable', async (t) => {
    if (!requireTools(t, 'nbdkit')) return;
    await withClient({ path: MEM_SOCK }, async (c) => {
      await assert.rejects(c.read(c.size - 8, 16), (err: unknown) => {
        assert.ok(err instanceof NbdRequestError);
        assert.equal(err.errno, NbdErr.EINVAL);
        assert.equal(err.errnoName, 'EINVAL');
        assert.equal(err.command, Cmd.READ);
        return true;
      });
      // Raw outcome: an unknown command and an unknown flag are errors, not disconnects.
      const unknown = await c.request(99, 0, 0, 0);
      assert.equal(unknown.error, NbdErr.EINVAL);
      const badFlag = await c.request(Cmd.READ, 1 << 15, 0, 512);
      assert.equal(badFlag.error, NbdErr.EINVAL);
      assert.equal(badFlag.data, undefined);
      assert.ok(badFlag.chunks.length >= 1);
      // Offsets beyond 2^53 travel exactly (bigint) and are refused by the server.
      const huge = await c.request(Cmd.READ, 0, (1n << 63n) + 1n, 512);
      assert.equal(huge.error, NbdErr.EINVAL);
      assert.equal((await c.read(0, 4)).length, 4);
    });
  });

  test('listExports', async (t) => {
    if (!requireTools(t, 'nbdkit')) return;
    assert.deepEqual(await listExports({ path: MEM_SOCK }), [{ name: '', description: '' }]);
    assert.deepEqual(await listExports({ path: NAMED_SOCK }), [
      { name: 'a', description: 'scratch disk' },
      { name: 'b', description: 'scratch disk' },
    ]);
  });

  test('listMetaContexts', async (t) => {
    if (!requireTools(t, 'nbdkit')) return;
    assert.deepEqual(await listMetaContexts({ path: MEM_SOCK }, ''), [BASE_ALLOCATION]);
    assert.deepEqual(await listMetaContexts({ path: MEM_SOCK }, '', ['base:']), [BASE_ALLOCATION]);
    assert.deepEqual(await listMetaContexts({ path: MEM_SOCK }, '', ['qemu:bogus']), []);
  });

  test('info()', async (t) => {
    if (!requireTools(t, 'nbdkit')) return;
    const mem = await info({ path: MEM_SOCK }, '');
    assert.equal(mem.size, 64 * MiB);
    assert.ok(mem.transmissionFlags & TFlag.HAS_FLAGS);
    const named = await info({ path: NAMED_SOCK }, 'a');
    assert.deepEqual(named, {
      name: 'a',
      description: 'scratch disk',
      size: MiB,
      transmissionFlags: named.transmissionFlags,
      blockSize: { minimum: 512, preferred: 4096, maximum: 65536 },
    });
  });

  test('negotiation errors name the option and reply type', async (t) => {
    if (!requireTools(t, 'nbdkit')) return;
    await assert.rejects(
      NbdClient.connect({ path: NAMED_SOCK, exportName: 'nope' }),
      (err: unknown) => {
        assert.ok(err instanceof NbdOptionError);
        assert.match(err.message, /^NBD_OPT_GO: ERR_UNKNOWN/);
        assert.equal(err.replyType, Rep.ERR_UNKNOWN);
        return true;
      },
    );
    await assert.rejects(
      info({ path: NAMED_SOCK }, 'nope'),
      /^NbdOptionError: NBD_OPT_INFO: ERR_UNKNOWN/,
    );
    // EXPORT_NAME cannot fail politely: the server just hangs up.
    await assert.rejects(
      NbdClient.connect({ path: NAMED_SOCK, exportName: 'nope', useExportName: true }),
      NbdConnectionError,
    );
  });

  test('EXPORT_NAME mode', async (t) => {
    if (!requireTools(t, 'nbdkit')) return;
    await withClient({ path: MEM_SOCK, useExportName: true }, async (c) => {
      assert.equal(c.usedExportName, true);
      assert.equal(c.size, 64 * MiB);
      assert.equal(c.structuredReplies, true);
      await c.write(40 * MiB, pattern(4096, 6));
      assert.deepEqual(await c.read(40 * MiB, 4096), pattern(4096, 6));
    });
  });

  test('EXPORT_NAME without NO_ZEROES skips the 124-byte padding', async (t) => {
    if (!requireTools(t, 'nbdkit')) return;
    const hs = await NbdHandshake.open({ path: MEM_SOCK });
    hs.sendClientFlags(FLAG_C_FIXED_NEWSTYLE);
    const exp = await hs.exportName('');
    const c = NbdClient.fromNegotiation(hs, {
      exportName: '',
      info: exp,
      structuredReplies: false,
      metaContexts: new Map(),
      usedExportName: true,
    });
    try {
      assert.equal(c.size, 64 * MiB);
      assert.equal((await c.read(0, 512)).length, 512);
    } finally {
      await c.disconnect();
    }
  });

  test('simple-reply mode', async (t) => {
    if (!requireTools(t, 'nbdkit')) return;
    await withClient({ path: MEM_SOCK, structuredReplies: false }, async (c) => {
      assert.equal(c.structuredReplies, false);
      assert.equal(c.metaContexts.size, 0);
      // SEND_DF must be clear without structured replies.
      assert.equal(c.has(TFlag.SEND_DF), false);
      await c.write(41 * MiB, pattern(70000, 7));
      assert.deepEqual(await c.read(41 * MiB, 70000), pattern(70000, 7));
      const past = await c.request(Cmd.READ, 0, c.size, 512);
      assert.deepEqual(past, { error: NbdErr.EINVAL, simple: true, chunks: [] });
      // No context was selected, so block status is refused.
      await assert.rejects(c.blockStatus(0, 4096), NbdRequestError);
    });
  });

  test('fromUri', async (t) => {
    if (!requireTools(t, 'nbdkit')) return;
    const c = await NbdClient.fromUri(`nbd+unix:///a?socket=${encodeURIComponent(NAMED_SOCK)}`);
    assert.equal(c.exportName, 'a');
    assert.equal(c.size, MiB);
    await c.disconnect();
    await assert.rejects(
      NbdClient.fromUri(`nbds+unix:///?socket=${MEM_SOCK}&tls-verify-peer=false`),
      /TLS/,
    );
  });

  test('disconnect and close', async (t) => {
    if (!requireTools(t, 'nbdkit')) return;
    const c = await NbdClient.connect({ path: MEM_SOCK });
    const reads = [c.read(0, 4096), c.read(4096, 4096)];
    const done = c.disconnect();
    // Requested before the disconnect: answered. After: refused.
    await Promise.all(reads);
    await assert.rejects(c.read(0, 1), NbdConnectionError);
    await done;
    assert.equal(await c.closed, undefined);
    assert.equal(c.isOpen, false);

    const d = await NbdClient.connect({ path: MEM_SOCK });
    const outstanding = assert.rejects(d.read(0, 4096), /connection closed by the client/);
    await d.close();
    await outstanding;
    assert.equal(await d.closed, undefined);
  });
});

// ---------------------------------------------------------------------------------------------
// A scripted server: minimal negotiation, then hands each request to the test.

interface FakeRequest {
  type: number;
  flags: number;
  cookie: Buffer;
  offset: bigint;
  length: number;
}

interface FakeOptions {
  /** Never send the greeting. */
  silent?: boolean;
  /** Reply to STRUCTURED_REPLY (default ACK). */
  structuredReply?: number;
  /** Error reply to GO (default: success). */
  goError?: number;
  goMessage?: string;
  onRequest?: (req: FakeRequest, sock: net.Socket) => void | Promise<void>;
}

const FAKE_SIZE = MiB;
const FAKE_CONTEXT_ID = 7;

function optReply(option: number, type: number, data = Buffer.alloc(0)): Buffer {
  const h = Buffer.alloc(20);
  h.writeBigUInt64BE(OPTION_REPLY_MAGIC, 0);
  h.writeUInt32BE(option, 8);
  h.writeUInt32BE(type, 12);
  h.writeUInt32BE(data.length, 16);
  return Buffer.concat([h, data]);
}

function simpleReply(cookie: Buffer, error = 0): Buffer {
  const h = Buffer.alloc(16);
  h.writeUInt32BE(SIMPLE_REPLY_MAGIC, 0);
  h.writeUInt32BE(error, 4);
  cookie.copy(h, 8);
  return h;
}

function chunk(cookie: Buffer, flags: number, type: number, payload: Buffer): Buffer {
  const h = Buffer.alloc(20);
  h.writeUInt32BE(STRUCTURED_REPLY_MAGIC, 0);
  h.writeUInt16BE(flags, 4);
  h.writeUInt16BE(type, 6);
  cookie.copy(h, 8);
  h.writeUInt32BE(payload.length, 16);
  return Buffer.concat([h, payload]);
}

function offsetData(cookie: Buffer, offset: number, data: Buffer, flags = 0): Buffer {
  const off = Buffer.alloc(8);
  off.writeBigUInt64BE(BigInt(offset));
  return chunk(cookie, flags, Chunk.OFFSET_DATA, Buffer.concat([off, data]));
}

function offsetHole(cookie: Buffer, offset: number, size: number, flags = 0): Buffer {
  const p = Buffer.alloc(12);
  p.writeBigUInt64BE(BigInt(offset));
  p.writeUInt32BE(size, 8);
  return chunk(cookie, flags, Chunk.OFFSET_HOLE, p);
}

function errorChunk(cookie: Buffer, errno: number, message: string, offset?: number): Buffer {
  const msg = Buffer.from(message);
  const p = Buffer.alloc(6 + msg.length + (offset === undefined ? 0 : 8));
  p.writeUInt32BE(errno, 0);
  p.writeUInt16BE(msg.length, 4);
  msg.copy(p, 6);
  if (offset !== undefined) p.writeBigUInt64BE(BigInt(offset), 6 + msg.length);
  const type = offset === undefined ? Chunk.ERROR : Chunk.ERROR_OFFSET;
  return chunk(cookie, CHUNK_FLAG_DONE, type, p);
}

function none(cookie: Buffer): Buffer {
  return chunk(cookie, CHUNK_FLAG_DONE, Chunk.NONE, Buffer.alloc(0));
}

/** Exact-length reads on the server side; rejects at EOF. */
function exactReader(sock: net.Socket): (n: number) => Promise<Buffer> {
  const queue = new ByteFifo();
  let waiter: { n: number; resolve: (b: Buffer) => void; reject: (e: Error) => void } | undefined;
  let ended = false;
  const pump = (): void => {
    if (!waiter) return;
    const w = waiter;
    if (queue.length >= w.n) {
      waiter = undefined;
      w.resolve(queue.take(w.n));
    } else if (ended) {
      waiter = undefined;
      w.reject(new Error('EOF'));
    }
  };
  sock.on('data', (d: Buffer) => {
    queue.push(d);
    pump();
  });
  sock.on('close', () => {
    ended = true;
    pump();
  });
  return (n) =>
    new Promise((resolve, reject) => {
      waiter = { n, resolve, reject };
      pump();
    });
}

async function serveFake(sock: net.Socket, opts: FakeOptions): Promise<void> {
  const read = exactReader(sock);
  if (opts.silent) return;
  const greeting = Buffer.alloc(18);
  greeting.writeBigUInt64BE(INIT_PASSWD, 0);
  greeting.writeBigUInt64BE(IHAVEOPT, 8);
  greeting.writeUInt16BE(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES, 16);
  sock.write(greeting);
  await read(4);
  let structured = false;
  for (;;) {
    const h = await read(16);
    const option = h.readUInt32BE(8);
    const length = h.readUInt32BE(12);
    if (length > 0) await read(length);
    if (option === Opt.STRUCTURED_REPLY) {
      const type = opts.structuredReply ?? Rep.ACK;
      structured = type === Rep.ACK;
      sock.write(optReply(option, type));
    } else if (option === Opt.SET_META_CONTEXT) {
      const ctx = Buffer.concat([Buffer.alloc(4), Buffer.from(BASE_ALLOCATION)]);
      ctx.writeUInt32BE(FAKE_CONTEXT_ID);
      sock.write(optReply(option, Rep.META_CONTEXT, ctx));
      sock.write(optReply(option, Rep.ACK));
    } else if (option === Opt.GO && opts.goError !== undefined) {
      sock.write(optReply(option, opts.goError, Buffer.from(opts.goMessage ?? '')));
    } else if (option === Opt.GO || option === Opt.EXPORT_NAME) {
      const exp = Buffer.alloc(12);
      exp.writeUInt16BE(Info.EXPORT, 0);
      exp.writeBigUInt64BE(BigInt(FAKE_SIZE), 2);
      exp.writeUInt16BE(TFlag.HAS_FLAGS | TFlag.SEND_FLUSH | (structured ? TFlag.SEND_DF : 0), 10);
      // EXPORT_NAME: bare size + flags (the client asked for NO_ZEROES).
      if (option === Opt.EXPORT_NAME) sock.write(exp.subarray(2));
      else sock.write(Buffer.concat([optReply(option, Rep.INFO, exp), optReply(option, Rep.ACK)]));
      break;
    } else {
      sock.write(optReply(option, Rep.ERR_UNSUP));
    }
  }
  for (;;) {
    const h = await read(28);
    const req: FakeRequest = {
      flags: h.readUInt16BE(4),
      type: h.readUInt16BE(6),
      cookie: Buffer.from(h.subarray(8, 16)),
      offset: h.readBigUInt64BE(16),
      length: h.readUInt32BE(24),
    };
    if (req.type === Cmd.DISC) {
      sock.end();
      return;
    }
    if (req.type === Cmd.WRITE) await read(req.length);
    await opts.onRequest?.(req, sock);
  }
}

/** Starts a scripted server on a fresh unix socket; stops it when the test ends. */
async function fakeServer(
  t: { after: (fn: () => void) => void },
  opts: FakeOptions,
): Promise<string> {
  const path = join(dir, `fake-${process.hrtime.bigint()}.sock`);
  const sockets = new Set<net.Socket>();
  const server = net.createServer((sock) => {
    sockets.add(sock);
    sock.on('error', () => {});
    sock.on('close', () => sockets.delete(sock));
    serveFake(sock, opts).catch(() => sock.destroy());
  });
  await new Promise<void>((resolve) => server.listen(path, resolve));
  t.after(() => {
    for (const s of sockets) s.destroy();
    server.close();
  });
  return path;
}

/** Writes `buf` a few bytes at a time, yielding in between, so the client sees fragments. */
async function dribble(sock: net.Socket, buf: Buffer, step = 3): Promise<void> {
  for (let i = 0; i < buf.length; i += step) {
    sock.write(buf.subarray(i, i + step));
    await tick();
  }
}

describe('NbdClient against a scripted server', TIMEOUT, () => {
  test('reassembles out-of-order, interleaved, fragmented replies', async (t) => {
    const pending: FakeRequest[] = [];
    const path = await fakeServer(t, {
      onRequest: async (req, sock) => {
        pending.push(req);
        if (pending.length < 4) return;
        const [a, b, c, f] = pending as [FakeRequest, FakeRequest, FakeRequest, FakeRequest];
        // Cookies are distinct 8-byte values.
        assert.equal(new Set(pending.map((r) => r.cookie.toString('hex'))).size, 4);
        await dribble(
          sock,
          Buffer.concat([
            simpleReply(f.cookie), // FLUSH: a simple reply is fine for non-READ commands
            offsetData(a.cookie, 2048, Buffer.alloc(2048, 0x11)),
            offsetHole(b.cookie, 8192 + 512, 512),
            offsetData(c.cookie, 4096, Buffer.from('abcdefgh'), CHUNK_FLAG_DONE),
            offsetData(b.cookie, 8192, Buffer.alloc(512, 0x42)),
            offsetData(a.cookie, 0, Buffer.alloc(2048, 0x22), CHUNK_FLAG_DONE),
            none(b.cookie),
          ]),
        );
      },
    });
    await withClient({ path }, async (client) => {
      const [a, b, c] = await Promise.all([
        client.read(0, 4096),
        client.request(Cmd.READ, 0, 8192, 1024),
        client.read(4096, 8),
        client.flush(),
      ]);
      assert.deepEqual(a, Buffer.concat([Buffer.alloc(2048, 0x22), Buffer.alloc(2048, 0x11)]));
      assert.deepEqual(b.data, Buffer.concat([Buffer.alloc(512, 0x42), Buffer.alloc(512)]));
      assert.deepEqual(
        b.chunks.map((ch) => [ch.type, ch.flags]),
        [
          [Chunk.OFFSET_HOLE, 0],
          [Chunk.OFFSET_DATA, 0],
          [Chunk.NONE, CHUNK_FLAG_DONE],
        ],
      );
      assert.deepEqual(c, Buffer.from('abcdefgh'));
    });
  });

  test('simple READ payload split across data events', async (t) => {
    const path = await fakeServer(t, {
      structuredReply: Rep.ERR_UNSUP,
      onRequest: (req, sock) =>
        dribble(sock, Buffer.concat([simpleReply(req.cookie), pattern(req.length, 9)]), 1000),
    });
    await withClient({ path }, async (client) => {
      assert.equal(client.structuredReplies, false);
      assert.deepEqual(await client.read(0, 5000), pattern(5000, 9));
    });
  });

  test('structured errors carry errno, name, message and offset', async (t) => {
    const path = await fakeServer(t, {
      onRequest: (req, sock) => {
        if (req.type === Cmd.READ) sock.write(errorChunk(req.cookie, NbdErr.EIO, 'disk on fire'));
        else if (req.type === Cmd.TRIM)
          sock.write(errorChunk(req.cookie, NbdErr.EPERM, 'no', 4096 + 10));
        else sock.write(simpleReply(req.cookie));
      },
    });
    await withClient({ path }, async (client) => {
      await assert.rejects(client.read(0, 512), (err: unknown) => {
        assert.ok(err instanceof NbdRequestError);
        assert.equal(err.errno, NbdErr.EIO);
        assert.equal(err.errnoName, 'EIO');
        assert.equal(err.serverMessage, 'disk on fire');
        assert.match(err.message, /NBD_CMD_READ failed with EIO: disk on fire/);
        return true;
      });
      const trim = await client.request(Cmd.TRIM, 0, 4096, 512);
      assert.equal(trim.error, NbdErr.EPERM);
      assert.equal(trim.message, 'no');
      assert.equal(trim.errorOffset, 4106n);
      await client.flush(); // still usable
    });
  });

  const violations: Array<[string, (req: FakeRequest) => Buffer, RegExp]> = [
    ['unknown magic', () => Buffer.alloc(16, 0x58), /unknown reply magic 0x58585858/],
    [
      'an unknown cookie',
      () => simpleReply(Buffer.from('0000000000000999', 'hex')),
      /unknown cookie 0x999/,
    ],
    [
      'a chunk outside the request',
      (req) => offsetData(req.cookie, 1024, Buffer.alloc(512), CHUNK_FLAG_DONE),
      /outside the request/,
    ],
    [
      'success without all the data',
      (req) => offsetData(req.cookie, 0, Buffer.alloc(256), CHUNK_FLAG_DONE),
      /success after 256 of 512 bytes/,
    ],
    [
      'a simple reply to READ',
      (req) => simpleReply(req.cookie, NbdErr.EINVAL),
      /simple reply to READ/,
    ],
  ];
  for (const [what, reply, message] of violations) {
    test(`a protocol violation (${what}) fails everything and closes`, async (t) => {
      const path = await fakeServer(t, {
        // Answer only the second request, so the first one is outstanding when it happens.
        onRequest: (req, sock) => {
          if (req.offset === 0n) sock.write(reply(req));
        },
      });
      const client = await NbdClient.connect({ path });
      const first = client.read(4096, 512);
      const second = client.read(0, 512);
      await assert.rejects(
        second,
        (err: unknown) => err instanceof NbdProtocolError && message.test(err.message),
      );
      await assert.rejects(first, NbdProtocolError);
      const reason = await client.closed;
      assert.ok(reason instanceof NbdProtocolError);
      await assert.rejects(client.read(0, 1), NbdProtocolError);
      await assert.rejects(client.disconnect(), NbdProtocolError);
    });
  }

  test('server EOF with requests outstanding', async (t) => {
    const path = await fakeServer(t, { onRequest: (_req, sock) => void sock.end() });
    const client = await NbdClient.connect({ path });
    await assert.rejects(client.read(0, 512), (err: unknown) => {
      assert.ok(err instanceof NbdConnectionError);
      assert.match(err.message, /server closed the connection with 1 request outstanding/);
      return true;
    });
    assert.ok((await client.closed) instanceof NbdConnectionError);
  });

  test('GO error with a message', async (t) => {
    const path = await fakeServer(t, { goError: Rep.ERR_POLICY, goMessage: 'go away' });
    await assert.rejects(NbdClient.connect({ path }), (err: unknown) => {
      assert.ok(err instanceof NbdOptionError);
      assert.equal(err.message, 'NBD_OPT_GO: ERR_POLICY: go away');
      assert.equal(err.replyType, Rep.ERR_POLICY);
      assert.equal(err.serverMessage, 'go away');
      return true;
    });
  });

  test('falls back to simple replies and EXPORT_NAME on ERR_UNSUP', async (t) => {
    const path = await fakeServer(t, {
      structuredReply: Rep.ERR_UNSUP,
      goError: Rep.ERR_UNSUP,
      onRequest: (req, sock) => {
        sock.write(Buffer.concat([simpleReply(req.cookie), Buffer.alloc(req.length, 1)]));
      },
    });
    await withClient({ path }, async (client) => {
      assert.equal(client.structuredReplies, false);
      assert.equal(client.usedExportName, true);
      assert.equal(client.metaContexts.size, 0);
      assert.equal(client.size, FAKE_SIZE);
      assert.deepEqual(await client.read(0, 3), Buffer.alloc(3, 1));
    });
  });

  test('block status with a non-default context id', async (t) => {
    const path = await fakeServer(t, {
      onRequest: (req, sock) => {
        const p = Buffer.alloc(4 + 16);
        p.writeUInt32BE(FAKE_CONTEXT_ID, 0);
        p.writeUInt32BE(4096, 4);
        p.writeUInt32BE(0, 8);
        p.writeUInt32BE(8192, 12);
        p.writeUInt32BE(STATE_HOLE, 16);
        sock.write(chunk(req.cookie, CHUNK_FLAG_DONE, Chunk.BLOCK_STATUS, p));
      },
    });
    await withClient({ path }, async (client) => {
      assert.deepEqual(client.metaContexts, new Map([[FAKE_CONTEXT_ID, BASE_ALLOCATION]]));
      const status = await client.blockStatus(0, 12288);
      assert.deepEqual(status.get(BASE_ALLOCATION), [
        { length: 4096, flags: 0 },
        { length: 8192, flags: STATE_HOLE },
      ]);
    });
  });

  test('disconnect without waiting still collects in-flight replies', async (t) => {
    const path = await fakeServer(t, {
      structuredReply: Rep.ERR_UNSUP,
      onRequest: (req, sock) => {
        sock.write(Buffer.concat([simpleReply(req.cookie), Buffer.alloc(req.length, 5)]));
      },
    });
    const client = await NbdClient.connect({ path });
    const read = client.read(0, 4096);
    await client.disconnect({ waitForReplies: false });
    assert.deepEqual(await read, Buffer.alloc(4096, 5));
    assert.equal(await client.closed, undefined);
  });

  test('bad arguments reject; a missing socket is a connection error', async (t) => {
    const path = await fakeServer(t, {});
    await withClient({ path }, async (client) => {
      await assert.rejects(client.request(Cmd.READ, 0, -1, 1), RangeError);
      await assert.rejects(client.request(Cmd.READ, 0, 1n << 64n, 1), RangeError);
      await assert.rejects(client.request(Cmd.READ, 0, 0, 2 ** 32), RangeError);
      await assert.rejects(client.read(0.5, 1), RangeError);
    });
    await assert.rejects(
      NbdClient.connect({ path: join(dir, 'missing.sock') }),
      /NbdConnectionError: NBD connection failed: connect ENOENT/,
    );
  });

  test('connect timeout', async (t) => {
    const path = await fakeServer(t, { silent: true });
    await assert.rejects(
      NbdClient.connect({ path, connectTimeoutMs: 100 }),
      /NbdConnectionError: NBD connect\/negotiation timed out after 100 ms/,
    );
  });
});

// ---------------------------------------------------------------------------------------------

describe('parseNbdUri', () => {
  test('export names (doc/uri.md table)', () => {
    const cases: Array<[string, string]> = [
      ['nbd+unix:///?socket=/tmp/u.sock', ''],
      ['nbd+unix:///disk?socket=/tmp/u.sock', 'disk'],
      ['nbd+unix:///hello%20world?socket=/tmp/u.sock', 'hello world'],
      ['nbd+unix:////abs?socket=/tmp/u.sock', '/abs'],
      ['nbd://127.0.0.1:10814', ''],
      ['nbd://127.0.0.1:10814/', ''],
      ['nbd://127.0.0.1:10814//disk', '/disk'],
      ['nbd://localhost:10814/x%2Fy', 'x/y'],
      ['nbd://localhost/a/%2e%2e/b', 'a/../b'],
      ['nbd://localhost/%C3%A9%E4%B8%AD', 'é中'],
    ];
    for (const [uri, name] of cases) assert.equal(parseNbdUri(uri).exportName, name, uri);
  });

  test('transports, ports and parameters', () => {
    assert.deepEqual(parseNbdUri('nbd://example.com/x'), {
      transport: 'tcp',
      tls: false,
      host: 'example.com',
      port: 10809,
      exportName: 'x',
      params: {},
    });
    assert.deepEqual(parseNbdUri('nbd+unix:///d?socket=/run/a+b.sock&x-foo=1'), {
      transport: 'unix',
      tls: false,
      path: '/run/a+b.sock',
      exportName: 'd',
      params: { 'x-foo': '1' },
    });
    const v6 = parseNbdUri('nbd://[::1]:10814/x');
    assert.equal(v6.host, '::1');
    assert.equal(v6.port, 10814);
    assert.equal(parseNbdUri('nbd+unix:///?socket=%00/abstract').path, '\0/abstract');
    const tls = parseNbdUri('nbds://alice@h/x?tls-type=psk');
    assert.equal(tls.tls, true);
    assert.equal(tls.user, 'alice');
    assert.deepEqual(tls.params, { 'tls-type': 'psk' });
  });

  test('invalid URIs', () => {
    for (const uri of [
      'http://h/x',
      'nbd+unix:///x',
      'nbd+unix://host/x?socket=/s',
      'nbd://h/x?socket=/s',
      'nbd://h/x?bogus=1',
      'nbd://h:99999/x',
      'nbd://h/%zz',
      'nbd:///x',
      'nbd:h/x',
    ]) {
      assert.throws(() => parseNbdUri(uri), /invalid NBD URI/, uri);
    }
  });
});
