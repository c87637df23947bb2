/**
 * Conformance: option haggling (NBD spec "Option types", "Option reply types"; checklist
 * §2.3–2.4, edge cases 1, 4, 19): unknown options, LIST, STARTTLS in NOTLS mode, withdrawn and
 * unimplemented options, STRUCTURED_REPLY, INFO and GO.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { startTestServer, type TestServer } from '../helpers/server.js';
import {
  assertValidBlockSize,
  CMD,
  encodeRequest,
  INFO,
  infoRequestData,
  KIB,
  MIB,
  negotiate,
  OPT,
  option,
  optionRequest,
  openGreeted,
  parseInfoReplies,
  parseServerReply,
  pattern,
  RawConn,
  readOptionReplies,
  readOptionReply,
  REP,
  repName,
  Session,
  TF,
  u16,
  u32,
} from './raw.js';

const EXPORTS = [
  { name: 'mem', size: 64 * MIB, description: 'main scratch disk' },
  { name: 'ro', size: 1 * MIB, readOnly: true, description: 'read only' },
  { name: 'é中', size: 3 * MIB, description: 'ünïcødé ✓' },
  { name: '/abs', size: 5 * MIB },
  { name: 'small', size: 1000 },
];
let srv: TestServer;

before(async () => {
  srv = await startTestServer(EXPORTS);
});

after(async () => {
  await srv.close();
});

async function withConn(fn: (conn: RawConn) => Promise<void>): Promise<void> {
  const conn = await openGreeted(srv.socket);
  try {
    await fn(conn);
  } finally {
    conn.destroy();
  }
}

/** The connection is still in sync: a LIST round trip returns every export. */
async function assertInSync(conn: RawConn): Promise<void> {
  const list = await option(conn, OPT.LIST);
  assert.equal(
    list.final.type,
    REP.ACK,
    `LIST after the previous option failed: ${repName(list.final.type)}`,
  );
  assert.equal(list.replies.length, EXPORTS.length);
}

function assertError(final: { type: number }, expected: number, what: string): void {
  assert.equal(repName(final.type), repName(expected), what);
}

for (const opt of [0, 12, 13, 0x100, 0x7fffffff, 0x80000000, 0xffffffff]) {
  test(`unknown option ${opt}: ERR_UNSUP echoing the option, and the next option works`, async () => {
    await withConn(async (conn) => {
      const r = await option(conn, opt, Buffer.from('abc'));
      assert.equal(r.replies.length, 0);
      assertError(r.final, REP.ERR_UNSUP, 'unknown options MUST get ERR_UNSUP');
      assert.equal(r.final.option, opt >>> 0);
      await assertInSync(conn);
    });
  });
}

for (const size of [64 * KIB, MIB]) {
  test(`unknown option with a ${size / KIB} KiB payload: payload skipped, ERR_UNSUP, in sync`, async () => {
    await withConn(async (conn) => {
      // The payload is itself made of valid option requests: a server that does not skip it
      // exactly would answer them.
      const fake = optionRequest(OPT.LIST);
      const payload = Buffer.alloc(size);
      for (let pos = 0; pos + fake.length <= size; pos += fake.length) fake.copy(payload, pos);
      const r = await option(conn, 0x4242, payload);
      assertError(r.final, REP.ERR_UNSUP, 'ERR_UNSUP');
      assert.equal(r.final.option, 0x4242);
      await assertInSync(conn);
    });
  });
}

test('LIST: one NBD_REP_SERVER per export with name and description, then ACK', async () => {
  await withConn(async (conn) => {
    const r = await option(conn, OPT.LIST);
    assert.equal(r.final.type, REP.ACK);
    const got = r.replies.map(parseServerReply).sort((a, b) => a.name.localeCompare(b.name));
    const want = EXPORTS.map((e) => ({ name: e.name, description: e.description ?? '' })).sort(
      (a, b) => a.name.localeCompare(b.name),
    );
    assert.deepEqual(got, want);
  });
});

test('LIST with data: ERR_INVALID, and the next option works', async () => {
  await withConn(async (conn) => {
    const r = await option(conn, OPT.LIST, Buffer.from([0, 0, 0, 0]));
    assert.equal(r.replies.length, 0, 'no NBD_REP_SERVER before the error');
    assertError(r.final, REP.ERR_INVALID, 'LIST with data SHOULD be ERR_INVALID');
    await assertInSync(conn);
  });
});

test('LIST when listing is disabled: ERR_POLICY, negotiation continues', async () => {
  const other = await startTestServer([{ name: 'mem', size: MIB }], { allowList: false });
  const conn = await openGreeted(other.socket);
  try {
    const r = await option(conn, OPT.LIST);
    assert.equal(r.replies.length, 0);
    assertError(r.final, REP.ERR_POLICY, 'disabled LIST');
    const go = await option(conn, OPT.GO, infoRequestData('mem'));
    assert.equal(go.final.type, REP.ACK);
  } finally {
    conn.destroy();
    await other.close();
  }
});

test('STARTTLS without TLS: ERR_POLICY (never ERR_TLS_REQD); with data: ERR_INVALID', async () => {
  await withConn(async (conn) => {
    const r = await option(conn, OPT.STARTTLS);
    assert.notEqual(r.final.type, REP.ERR_TLS_REQD, 'NOTLS servers MUST NOT send ERR_TLS_REQD');
    assertError(r.final, REP.ERR_POLICY, 'STARTTLS on a server without TLS');
    const r2 = await option(conn, OPT.STARTTLS, Buffer.from('x'));
    assertError(r2.final, REP.ERR_INVALID, 'STARTTLS with data');
    await assertInSync(conn);
    const go = await option(conn, OPT.GO, infoRequestData('mem'));
    assert.equal(go.final.type, REP.ACK, 'the session continues without TLS');
  });
});

for (const [name, opt] of [
  ['PEEK_EXPORT', OPT.PEEK_EXPORT],
  ['EXTENDED_HEADERS', OPT.EXTENDED_HEADERS],
] as const) {
  test(`${name}: ERR_UNSUP (with and without data), negotiation continues`, async () => {
    await withConn(async (conn) => {
      assertError((await option(conn, opt)).final, REP.ERR_UNSUP, name);
      assertError(
        (await option(conn, opt, Buffer.alloc(17, 9))).final,
        REP.ERR_UNSUP,
        `${name} with data`,
      );
      // EXTENDED_HEADERS was refused, so compact headers and simple replies stay in force.
      const go = await option(conn, OPT.GO, infoRequestData('mem'));
      assert.equal(go.final.type, REP.ACK);
      const s = new Session(conn, false, 64n * BigInt(MIB), 0, new Map());
      await s.read(0, 512);
    });
  });
}

test('STRUCTURED_REPLY: bare ACK; with data: ERR_INVALID and not enabled', async () => {
  await withConn(async (conn) => {
    const bad = await option(conn, OPT.STRUCTURED_REPLY, Buffer.from([1]));
    assertError(bad.final, REP.ERR_INVALID, 'STRUCTURED_REPLY with data');
    const go = await option(conn, OPT.GO, infoRequestData('mem'));
    const info = parseInfoReplies(go.replies);
    assert.equal(
      info.tflags & TF.SEND_DF,
      0,
      'structured replies were not negotiated: SEND_DF MUST be clear',
    );
    // READ must get a simple reply: readReplies rejects a structured one when not negotiated.
    const s = new Session(conn, false, info.size, info.tflags, new Map());
    await s.read(0, 4096);
  });
  await withConn(async (conn) => {
    const ok = await option(conn, OPT.STRUCTURED_REPLY);
    assert.equal(ok.final.type, REP.ACK);
    assert.equal(ok.replies.length, 0);
    // Repeating it MAY be refused with ERR_INVALID; structured replies stay on either way.
    const again = await option(conn, OPT.STRUCTURED_REPLY);
    assert.ok(
      again.final.type === REP.ACK || again.final.type === REP.ERR_INVALID,
      `repeated STRUCTURED_REPLY: ${repName(again.final.type)}`,
    );
    const go = await option(conn, OPT.GO, infoRequestData('mem'));
    const info = parseInfoReplies(go.replies);
    const s = new Session(conn, true, info.size, info.tflags, new Map());
    await s.read(0, 4096);
  });
});

test('INFO with no requests: NBD_INFO_EXPORT with the right size and flags, then ACK', async () => {
  await withConn(async (conn) => {
    const r = await option(conn, OPT.INFO, infoRequestData('mem'));
    assert.equal(r.final.type, REP.ACK);
    const info = parseInfoReplies(r.replies);
    assert.equal(info.size, 64n * BigInt(MIB));
    assert.ok(info.tflags & TF.HAS_FLAGS, 'HAS_FLAGS MUST be set');
    assert.equal(info.tflags & TF.READ_ONLY, 0);
    assert.equal(info.tflags & TF.SEND_DF, 0, 'no SEND_DF without structured replies');
    assert.equal(
      info.tflags & TF.BLOCK_STATUS_PAYLOAD,
      0,
      'BLOCK_STATUS_PAYLOAD needs extended headers',
    );
    assert.equal(info.tflags & TF.SEND_RESIZE, 0, 'RESIZE is not implemented');
    assert.equal(info.tflags & 0xe000, 0, 'undefined transmission flags must be clear');
    if (info.tflags & TF.SEND_FAST_ZERO) {
      assert.ok(
        info.tflags & TF.SEND_WRITE_ZEROES,
        'SEND_FAST_ZERO MUST be 0 without SEND_WRITE_ZEROES',
      );
    }
    if (info.blockSize) assertValidBlockSize(info.blockSize, info.size);
    // INFO does not end negotiation.
    await assertInSync(conn);
  });
});

test('INFO with NAME, DESCRIPTION, BLOCK_SIZE and unknown info types', async () => {
  await withConn(async (conn) => {
    const r = await option(
      conn,
      OPT.INFO,
      infoRequestData('é中', [INFO.NAME, 0x7777, INFO.DESCRIPTION, 4, INFO.BLOCK_SIZE, 0xffff]),
    );
    assert.equal(r.final.type, REP.ACK, 'unknown info requests MUST be ignored');
    const info = parseInfoReplies(r.replies);
    assert.equal(info.size, 3n * BigInt(MIB));
    assert.ok(
      !info.types.includes(0x7777) && !info.types.includes(0xffff),
      'no replies for unknown types',
    );
    if (info.name !== undefined) assert.equal(info.name, 'é中');
    assert.equal(info.description, 'ünïcødé ✓');
    assert.ok(info.blockSize, 'BLOCK_SIZE was requested');
    assertValidBlockSize(info.blockSize, info.size);
    assert.ok(info.blockSize.maximum >= 32 * MIB, 'the default max payload is at least 32 MiB');
  });
});

test('INFO for the read-only export: READ_ONLY set, still HAS_FLAGS', async () => {
  await withConn(async (conn) => {
    const r = await option(conn, OPT.INFO, infoRequestData('ro'));
    const info = parseInfoReplies(r.replies);
    assert.ok(info.tflags & TF.READ_ONLY);
    assert.ok(info.tflags & TF.HAS_FLAGS);
    assert.equal(info.size, BigInt(MIB));
  });
});

/** Malformed INFO/GO payloads, each of which must give ERR_INVALID with the stream in sync. */
const MALFORMED: Array<[string, Buffer]> = [
  ['empty data', Buffer.alloc(0)],
  ['5 bytes', Buffer.from([0, 0, 0, 0, 0])],
  ['name length one past the option', Buffer.concat([u32(4), Buffer.from('mem'), u16(0)])],
  ['name length = option length', Buffer.concat([u32(9), Buffer.from('mem'), u16(0)])],
  ['name length 0xffffffff', Buffer.concat([u32(0xffffffff), Buffer.from('mem'), u16(0)])],
  ['name length 0x80000000', Buffer.concat([u32(0x80000000), Buffer.from('mem'), u16(0)])],
  [
    'count 3, one request present',
    Buffer.concat([u32(3), Buffer.from('mem'), u16(3), u16(INFO.NAME)]),
  ],
  ['count 0, trailing bytes', Buffer.concat([u32(3), Buffer.from('mem'), u16(0), u16(INFO.NAME)])],
  [
    'count 1, odd trailing byte',
    Buffer.concat([u32(3), Buffer.from('mem'), u16(1), u16(INFO.NAME), Buffer.from([0])]),
  ],
  ['count 0xffff, none present', Buffer.concat([u32(3), Buffer.from('mem'), u16(0xffff)])],
];

for (const opt of [OPT.INFO, OPT.GO]) {
  for (const [what, data] of MALFORMED) {
    test(`${opt === OPT.INFO ? 'INFO' : 'GO'} with ${what}: ERR_INVALID, stream in sync`, async () => {
      await withConn(async (conn) => {
        const r = await option(conn, opt, data);
        assert.equal(r.replies.length, 0, 'no NBD_REP_INFO before the error');
        assertError(r.final, REP.ERR_INVALID, what);
        await assertInSync(conn);
        // GO failed, so negotiation goes on and a correct GO still works.
        const go = await option(conn, OPT.GO, infoRequestData('mem'));
        assert.equal(go.final.type, REP.ACK);
      });
    });
  }
}

test('INFO/GO whose name length runs past the option never reads beyond it', async () => {
  await withConn(async (conn) => {
    // The claimed name runs 100 bytes past the option; the next option follows immediately.
    // A server that read the name from the stream would swallow the LIST request.
    const bad = Buffer.concat([u32(100), Buffer.from('mem'), u16(0)]);
    conn.send(Buffer.concat([optionRequest(OPT.GO, bad)]));
    const r = await readOptionReplies(conn, OPT.GO);
    assertError(r.final, REP.ERR_INVALID, 'GO with overlong name');
    conn.send(optionRequest(OPT.LIST));
    const list = await readOptionReplies(conn, OPT.LIST);
    assert.equal(list.final.type, REP.ACK);
  });
});

for (const opt of [OPT.INFO, OPT.GO]) {
  test(`${opt === OPT.INFO ? 'INFO' : 'GO'} for an unknown export: ERR_UNKNOWN without INFO replies`, async () => {
    await withConn(async (conn) => {
      for (const name of ['nope', 'MEM', 'é', 'x'.repeat(300)]) {
        const r = await option(conn, opt, infoRequestData(name, [INFO.NAME, INFO.DESCRIPTION]));
        assert.equal(r.replies.length, 0, 'SHOULD NOT send NBD_REP_INFO for an unknown export');
        assertError(r.final, REP.ERR_UNKNOWN, `export ${name}`);
      }
      const go = await option(conn, OPT.GO, infoRequestData('mem'));
      assert.equal(go.final.type, REP.ACK, 'negotiation continues after ERR_UNKNOWN');
    });
  });
}

test('GO with an export name longer than 4096 bytes: an error reply, not a disconnect', async () => {
  await withConn(async (conn) => {
    const r = await option(conn, OPT.GO, infoRequestData('m'.repeat(5000)));
    assert.ok(
      r.final.type === REP.ERR_INVALID ||
        r.final.type === REP.ERR_UNKNOWN ||
        r.final.type === REP.ERR_TOO_BIG,
      `got ${repName(r.final.type)}`,
    );
    await assertInSync(conn);
  });
});

for (const structured of [false, true]) {
  for (const name of ['mem', 'ro']) {
    test(`INFO then GO with the same parameters give the same information (${name}, structured=${structured})`, async () => {
      await withConn(async (conn) => {
        if (structured)
          assert.equal((await option(conn, OPT.STRUCTURED_REPLY)).final.type, REP.ACK);
        const req = infoRequestData(name, [INFO.BLOCK_SIZE, INFO.NAME, INFO.DESCRIPTION]);
        const info = await option(conn, OPT.INFO, req);
        const go = await option(conn, OPT.GO, req);
        assert.equal(info.final.type, REP.ACK);
        assert.equal(go.final.type, REP.ACK);
        const key = (rs: typeof info.replies): string[] =>
          rs.map((r) => `${r.type}:${r.data.toString('hex')}`).sort();
        assert.deepEqual(key(go.replies), key(info.replies), 'GO MUST repeat what INFO said');
        const parsed = parseInfoReplies(go.replies);
        if (structured) assert.ok(parsed.tflags & TF.SEND_DF);
        else
          assert.equal(
            parsed.tflags & TF.SEND_DF,
            0,
            'SEND_DF MUST be clear without structured replies',
          );
      });
    });
  }
}

test('GO with the empty name opens the default export', async () => {
  const s = await negotiate(srv.socket, { exportName: '' });
  const m = await negotiate(srv.socket, { exportName: 'mem' });
  try {
    assert.equal(s.size, 64n * BigInt(MIB));
    const data = pattern(4096, 21);
    await s.write(123 * 4096, data);
    assert.ok(
      (await m.read(123 * 4096, 4096)).equals(data),
      'the empty name and "mem" are the same export',
    );
  } finally {
    s.close();
    m.close();
  }
});

for (const [name, size] of [
  ['é中', 3 * MIB],
  ['/abs', 5 * MIB],
] as const) {
  for (const structured of [false, true]) {
    test(`GO with export name ${JSON.stringify(name)} (structured=${structured}) opens it`, async () => {
      const s = await negotiate(srv.socket, { exportName: name, structured, infos: [INFO.NAME] });
      try {
        assert.equal(s.size, BigInt(size));
        const data = pattern(1000, size);
        await s.write(size - 1000, data);
        assert.ok((await s.read(size - 1000, 1000)).equals(data));
        assert.equal((await s.disconnect()).length, 0);
      } finally {
        s.close();
      }
    });
  }
}

test('every option reply echoes the option, including errors for malformed options', async () => {
  await withConn(async (conn) => {
    const sequence: Array<[number, Buffer]> = [
      [OPT.LIST, Buffer.alloc(0)],
      [OPT.INFO, Buffer.alloc(2)],
      [OPT.LIST_META_CONTEXT, Buffer.alloc(3)],
      [OPT.SET_META_CONTEXT, Buffer.alloc(3)],
      [OPT.STARTTLS, Buffer.alloc(0)],
      [0x1234, Buffer.alloc(0)],
    ];
    for (const [opt, data] of sequence) {
      conn.send(optionRequest(opt, data));
      for (;;) {
        const r = await readOptionReply(conn);
        assert.equal(r.option, opt, `reply ${repName(r.type)} to option ${opt} echoed ${r.option}`);
        if (r.type === REP.ACK || r.type >= 0x80000000) break;
      }
    }
  });
});

test('transmission after GO: a READ right after the ACK is answered (no stray bytes)', async () => {
  const conn = await openGreeted(srv.socket);
  try {
    // GO and the first request in the same write: the request must not be lost or misparsed.
    conn.send(
      Buffer.concat([
        optionRequest(OPT.GO, infoRequestData('small')),
        encodeRequest({ type: CMD.READ, cookie: 99n, offset: 0, length: 1000 }),
      ]),
    );
    const go = await readOptionReplies(conn, OPT.GO);
    assert.equal(go.final.type, REP.ACK);
    const info = parseInfoReplies(go.replies);
    assert.equal(info.size, 1000n);
    const s = new Session(conn, false, info.size, info.tflags, new Map());
    const r = await s.reply(99n, { type: CMD.READ, flags: 0, offset: 0n, length: 1000 });
    assert.equal(r.error, 0);
    assert.equal(r.data!.length, 1000);
  } finally {
    conn.destroy();
  }
});
