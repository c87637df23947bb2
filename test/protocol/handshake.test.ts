/**
 * Conformance: greeting, client flags, EXPORT_NAME, ABORT, oversize options, clients that
 * vanish mid-negotiation (NBD spec "Newstyle negotiation", "Fixed newstyle negotiation",
 * "Termination of the session during option haggling"; checklist §2.2–2.4, edge cases 2, 3,
 * 5, 16).
 */
import assert from 'node:assert/strict';
import net from 'node:net';
import { after, before, test } from 'node:test';
import { startTestServer, type TestServer } from '../helpers/server.js';
import {
  C_FIXED_NEWSTYLE,
  C_NO_ZEROES,
  CMD,
  encodeRequest,
  greet,
  HS_FIXED_NEWSTYLE,
  HS_NO_ZEROES,
  IHAVEOPT,
  infoRequestData,
  MIB,
  negotiate,
  OPT,
  option,
  OPTION_REPLY_MAGIC,
  optionRequest,
  openGreeted,
  pattern,
  RawConn,
  readGreeting,
  readOptionReply,
  readReplies,
  REP,
  Session,
  TF,
  u32,
  Verifier,
} from './raw.js';

const MEM_SIZE = 64 * MIB;
const OTHER_SIZE = 1 * MIB;
let srv: TestServer;

before(async () => {
  srv = await startTestServer([
    { name: 'mem', size: MEM_SIZE, description: 'the default export' },
    { name: 'other', size: OTHER_SIZE },
  ]);
});

after(async () => {
  await srv.close();
});

/** A full GO + verified WRITE/READ + DISC on a fresh connection: the server still serves. */
async function assertServerServes(seed = 7): Promise<void> {
  const s = await negotiate(srv.socket, { structured: seed % 2 === 0 });
  try {
    const data = pattern(4096, seed);
    await s.write(MEM_SIZE - 8192, data);
    assert.ok((await s.read(MEM_SIZE - 8192, 4096)).equals(data));
    assert.equal((await s.disconnect()).length, 0, 'nothing may follow the last reply');
  } finally {
    s.close();
  }
}

async function waitForConnectionCount(n: number, timeoutMs = 5000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (srv.server.connectionCount !== n) {
    if (Date.now() > deadline) {
      assert.fail(`server still holds ${srv.server.connectionCount} connections, expected ${n}`);
    }
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** Sends EXPORT_NAME and reads the 10-byte reply (size, flags), without padding. */
async function exportName(conn: RawConn, name: string): Promise<{ size: bigint; tflags: number }> {
  conn.send(optionRequest(OPT.EXPORT_NAME, Buffer.from(name, 'utf8')));
  const r = await conn.read(10, undefined, 'EXPORT_NAME reply');
  return { size: r.readBigUInt64BE(0), tflags: r.readUInt16BE(8) };
}

/** One READ on a connection just switched to transmission, parsed strictly. */
async function readOnce(
  conn: RawConn,
  structured: boolean,
  offset: number,
  length: number,
): Promise<Buffer> {
  const s = new Session(conn, structured, BigInt(MEM_SIZE), 0, new Map());
  return s.read(offset, length);
}

test('greeting: NBDMAGIC, IHAVEOPT, handshake flags FIXED_NEWSTYLE (+ NO_ZEROES) and nothing else', async () => {
  const conn = await RawConn.open(srv.socket);
  try {
    const g = await conn.read(18);
    assert.equal(g.subarray(0, 8).toString('latin1'), 'NBDMAGIC');
    assert.equal(g.subarray(8, 16).toString('latin1'), 'IHAVEOPT');
    const flags = g.readUInt16BE(16);
    assert.ok(flags & HS_FIXED_NEWSTYLE, 'server MUST set NBD_FLAG_FIXED_NEWSTYLE');
    assert.equal(
      flags & ~(HS_FIXED_NEWSTYLE | HS_NO_ZEROES),
      0,
      `server MUST NOT set other handshake bits (0x${flags.toString(16)})`,
    );
    assert.ok(flags & HS_NO_ZEROES, 'NO_ZEROES is recommended (every reference server sets it)');
    const idle = await conn.idle(100);
    assert.deepEqual(idle, { pending: 0, closed: false }, 'the server waits for the client flags');
  } finally {
    conn.destroy();
  }
});

for (const bit of [2, 3, 8, 16, 30, 31]) {
  test(`unknown client flag bit ${bit}: the server closes the connection`, async () => {
    const conn = await RawConn.open(srv.socket);
    try {
      await readGreeting(conn);
      // Also send an option: it must not be answered.
      conn.send(
        Buffer.concat([u32(C_FIXED_NEWSTYLE | C_NO_ZEROES | (1 << bit)), optionRequest(OPT.LIST)]),
      );
      const rest = await conn.waitClosed();
      assert.equal(rest.length, 0, 'no option reply may follow unknown client flags');
    } finally {
      conn.destroy();
    }
  });
}

test('client flags 0xffffffff: the server closes the connection', async () => {
  const conn = await RawConn.open(srv.socket);
  try {
    await readGreeting(conn);
    conn.send(u32(0xffffffff));
    assert.equal((await conn.waitClosed()).length, 0);
  } finally {
    conn.destroy();
  }
  await assertServerServes();
});

test('EXPORT_NAME with C_NO_ZEROES: exactly size + flags, then transmission at once', async () => {
  const conn = await openGreeted(srv.socket, C_FIXED_NEWSTYLE | C_NO_ZEROES);
  try {
    const { size, tflags } = await exportName(conn, 'mem');
    assert.equal(size, BigInt(MEM_SIZE));
    assert.ok(tflags & TF.HAS_FLAGS, 'HAS_FLAGS MUST always be set');
    assert.equal(tflags & TF.SEND_DF, 0, 'SEND_DF MUST be clear without structured replies');
    assert.deepEqual(
      await conn.idle(150),
      { pending: 0, closed: false },
      'no padding with C_NO_ZEROES',
    );
    const data = pattern(512, 11);
    const s = new Session(conn, false, size, tflags, new Map());
    await s.write(0, data);
    assert.ok((await s.read(0, 512)).equals(data));
  } finally {
    conn.destroy();
  }
});

test('EXPORT_NAME without C_NO_ZEROES: size + flags + 124 zero bytes', async () => {
  const conn = await openGreeted(srv.socket, C_FIXED_NEWSTYLE);
  try {
    conn.send(optionRequest(OPT.EXPORT_NAME, Buffer.from('other')));
    const r = await conn.read(134);
    assert.equal(r.readBigUInt64BE(0), BigInt(OTHER_SIZE));
    assert.ok(r.readUInt16BE(8) & TF.HAS_FLAGS);
    assert.ok(r.subarray(10).equals(Buffer.alloc(124)), '124 reserved bytes MUST be zero');
    assert.deepEqual(
      await conn.idle(100),
      { pending: 0, closed: false },
      'exactly 124 bytes of padding',
    );
    assert.ok((await readOnce(conn, false, 0, 4096)).equals(Buffer.alloc(4096)));
  } finally {
    conn.destroy();
  }
});

test('client flags 0 (no C_FIXED_NEWSTYLE): EXPORT_NAME still works, with padding', async () => {
  const conn = await openGreeted(srv.socket, 0);
  try {
    conn.send(optionRequest(OPT.EXPORT_NAME, Buffer.from('mem')));
    const r = await conn.read(134);
    assert.equal(r.readBigUInt64BE(0), BigInt(MEM_SIZE));
    assert.ok(r.subarray(10).equals(Buffer.alloc(124)));
    await readOnce(conn, false, 0, 512);
  } finally {
    conn.destroy();
  }
});

test('EXPORT_NAME after STRUCTURED_REPLY: structured READ replies and SEND_DF', async () => {
  const conn = await openGreeted(srv.socket);
  try {
    assert.equal((await option(conn, OPT.STRUCTURED_REPLY)).final.type, REP.ACK);
    const { tflags } = await exportName(conn, 'mem');
    assert.ok(tflags & TF.SEND_DF, 'this server supports DF once structured replies are on');
    await readOnce(conn, true, 4096, 8192); // readReplies rejects a simple reply to READ
  } finally {
    conn.destroy();
  }
});

test('EXPORT_NAME with the empty name opens the default export', async () => {
  const conn = await openGreeted(srv.socket);
  try {
    const { size } = await exportName(conn, '');
    assert.equal(size, BigInt(MEM_SIZE));
    await readOnce(conn, false, 0, 512);
  } finally {
    conn.destroy();
  }
});

for (const name of ['nope', 'MEM', 'mem ', 'mem\u0000']) {
  test(`EXPORT_NAME for unknown export ${JSON.stringify(name)}: the server terminates the session`, async () => {
    const conn = await openGreeted(srv.socket);
    try {
      conn.send(optionRequest(OPT.EXPORT_NAME, Buffer.from(name, 'utf8')));
      const rest = await conn.waitClosed();
      assert.equal(
        rest.length,
        0,
        `EXPORT_NAME cannot be refused with a reply, got ${rest.toString('hex')}`,
      );
    } finally {
      conn.destroy();
    }
  });
}

test('bad option magic: the server closes the connection without replying', async () => {
  const conn = await openGreeted(srv.socket);
  try {
    const req = optionRequest(OPT.LIST);
    req.writeUInt32BE(0xdeadbeef, 0);
    conn.send(req);
    assert.equal((await conn.waitClosed()).length, 0);
  } finally {
    conn.destroy();
  }
});

for (const cflags of [C_FIXED_NEWSTYLE, C_FIXED_NEWSTYLE | C_NO_ZEROES]) {
  test(`GO (client flags ${cflags}): no padding after the ACK, transmission starts at once`, async () => {
    const conn = await openGreeted(srv.socket, cflags);
    try {
      const go = await option(conn, OPT.GO, infoRequestData('mem'));
      assert.equal(go.final.type, REP.ACK);
      assert.deepEqual(
        await conn.idle(150),
        { pending: 0, closed: false },
        'server MUST NOT send padding after GO',
      );
      await readOnce(conn, false, 0, 512);
    } finally {
      conn.destroy();
    }
  });
}

test('ABORT: exactly one ACK, then the server closes', async () => {
  const conn = await openGreeted(srv.socket);
  try {
    conn.send(optionRequest(OPT.ABORT));
    const r = await conn.read(20);
    assert.equal(r.readBigUInt64BE(0), OPTION_REPLY_MAGIC);
    assert.equal(r.readUInt32BE(8), OPT.ABORT);
    assert.equal(r.readUInt32BE(12), REP.ACK);
    assert.equal(r.readUInt32BE(16), 0);
    assert.equal((await conn.waitClosed()).length, 0, 'nothing after the ACK');
  } finally {
    conn.destroy();
  }
});

test('ABORT with data: the data is ignored, still ACK and close', async () => {
  const conn = await openGreeted(srv.socket);
  try {
    conn.send(optionRequest(OPT.ABORT, Buffer.from('some unexpected payload')));
    const r = await readOptionReply(conn);
    assert.deepEqual([r.option, r.type, r.data.length], [OPT.ABORT, REP.ACK, 0]);
    assert.equal((await conn.waitClosed()).length, 0);
  } finally {
    conn.destroy();
  }
});

test('options sent after ABORT are never processed', async () => {
  const conn = await openGreeted(srv.socket);
  try {
    conn.send(
      Buffer.concat([
        optionRequest(OPT.ABORT),
        optionRequest(OPT.LIST),
        optionRequest(OPT.GO, infoRequestData('mem')),
      ]),
    );
    const r = await readOptionReply(conn);
    assert.deepEqual([r.option, r.type], [OPT.ABORT, REP.ACK]);
    const rest = await conn.waitClosed();
    assert.equal(rest.length, 0, 'no replies to options after ABORT');
  } finally {
    conn.destroy();
  }
});

test('clients that send ABORT and close without reading the ACK do not hurt the server', async () => {
  const before = srv.server.connectionCount;
  for (let i = 0; i < 40; i++) {
    const conn = await RawConn.open(srv.socket);
    // Do not even read the greeting: flags + ABORT, then gone.
    conn.send(Buffer.concat([u32(C_FIXED_NEWSTYLE | C_NO_ZEROES), optionRequest(OPT.ABORT)]));
    if (i % 2 === 0) conn.destroy();
    else {
      conn.end();
      setTimeout(() => conn.destroy(), 5);
    }
  }
  await assertServerServes(3);
  await waitForConnectionCount(before);
});

for (const length of [MIB + 1, 16 * MIB, 0xffffffff]) {
  test(`option length ${length} (> 1 MiB): disconnect without reading the payload`, async () => {
    for (const opt of [0x1234, OPT.GO, OPT.LIST_META_CONTEXT]) {
      const conn = await openGreeted(srv.socket);
      try {
        // Header only: a server that tried to read the payload would wait and time out.
        conn.send(optionRequest(opt, Buffer.alloc(0), length));
        const rest = await conn.waitClosed(3000);
        assert.equal(rest.length, 0);
      } finally {
        conn.destroy();
      }
    }
  });
}

test('a client that closes mid-negotiation does not disturb other connections', async () => {
  const baseline = srv.server.connectionCount;
  const verifierSession = await negotiate(srv.socket);
  const v = new Verifier(verifierSession, 10 * MIB);
  const steps: Array<(c: RawConn) => Promise<void>> = [
    async () => {}, // before reading anything
    async (c) => void (await readGreeting(c)),
    async (c) => c.send(u32(3).subarray(0, 2)), // half the client flags
    async (c) => {
      await readGreeting(c);
      c.send(u32(3));
    },
    async (c) => {
      await readGreeting(c);
      const h = Buffer.alloc(8);
      h.writeBigUInt64BE(IHAVEOPT);
      c.send(Buffer.concat([u32(3), h])); // half an option header
    },
    async (c) => {
      await readGreeting(c);
      c.send(
        Buffer.concat([u32(3), optionRequest(OPT.GO, infoRequestData('mem').subarray(0, 5), 10)]),
      );
    },
    async (c) => {
      await readGreeting(c);
      c.send(u32(3));
      assert.equal((await option(c, OPT.INFO, infoRequestData('mem'))).final.type, REP.ACK);
    },
    async (c) => {
      await readGreeting(c);
      c.send(u32(3));
      // Send LIST and vanish before the replies were read.
      c.send(optionRequest(OPT.LIST));
    },
    async (c) => {
      await readGreeting(c);
      c.send(u32(3));
      c.send(optionRequest(0x4242, Buffer.alloc(100_000, 1)).subarray(0, 50_000));
    },
  ];
  try {
    for (let round = 0; round < 3; round++) {
      for (const [i, step] of steps.entries()) {
        const conn = await RawConn.open(srv.socket);
        await step(conn);
        if ((i + round) % 2 === 0) conn.destroy();
        else {
          conn.end();
          setTimeout(() => conn.destroy(), 20);
        }
      }
    }
    await new Promise((r) => setTimeout(r, 100));
    await waitForConnectionCount(baseline + 1);
  } finally {
    const ops = await v.stop().finally(() => verifierSession.close());
    assert.ok(ops > 0, 'the verifier made progress');
  }
  await assertServerServes(5);
});

test('a handshake sent one byte per write is understood', async () => {
  const conn = await RawConn.open(srv.socket);
  try {
    await readGreeting(conn);
    const bytes = Buffer.concat([
      u32(C_FIXED_NEWSTYLE | C_NO_ZEROES),
      optionRequest(OPT.GO, infoRequestData('mem')),
      encodeRequest({ type: CMD.READ, cookie: 0xabcdefn, offset: 0, length: 16 }),
    ]);
    for (const b of bytes) {
      conn.send(Buffer.from([b]));
      await new Promise((r) => setImmediate(r));
    }
    const replies: number[] = [];
    for (;;) {
      const r = await readOptionReply(conn);
      assert.equal(r.option, OPT.GO);
      replies.push(r.type);
      if (r.type === REP.ACK) break;
      assert.equal(r.type, REP.INFO);
    }
    const exp = { type: CMD.READ, flags: 0, offset: 0n, length: 16 };
    const got = await readReplies(conn, false, new Map([[0xabcdefn, exp]]));
    assert.equal(got.get(0xabcdefn)!.error, 0);
  } finally {
    conn.destroy();
  }
});

/** A client socket that does not close its side when the server closes (allowHalfOpen). */
async function openHalfOpen(): Promise<RawConn> {
  const sock = net.connect({ path: srv.socket, allowHalfOpen: true });
  await new Promise<void>((resolve, reject) => {
    sock.once('connect', resolve);
    sock.once('error', reject);
  });
  return new RawConn(sock);
}

test(
  'clients that keep their side open after ABORT or DISC are not waited for forever',
  { timeout: 30_000 },
  async () => {
    await waitForConnectionCount(0);
    const abort = await openHalfOpen();
    const disc = await openHalfOpen();
    try {
      await greet(abort);
      abort.send(optionRequest(OPT.ABORT));
      const r = await readOptionReply(abort);
      assert.deepEqual([r.option, r.type], [OPT.ABORT, REP.ACK]);
      await greet(disc);
      assert.equal((await option(disc, OPT.GO, infoRequestData('mem'))).final.type, REP.ACK);
      disc.send(encodeRequest({ type: CMD.DISC }));
      // Both sides got EOF from the server but keep their own side open (a MUST violation).
      assert.equal((await abort.waitClosed()).length, 0);
      assert.equal((await disc.waitClosed()).length, 0);
      assert.equal(srv.server.connectionCount, 2, 'half-open: the server still holds both');
      await waitForConnectionCount(0, 12_000);
    } finally {
      abort.destroy();
      disc.destroy();
    }
  },
);
