/**
 * Conformance: LIST_META_CONTEXT and SET_META_CONTEXT (NBD spec "Metadata querying", "The
 * base: metadata namespace", option types 9 and 10; checklist §2.4, §2.13, edge cases 1, 13,
 * 14, 20), and how the selection reaches NBD_CMD_BLOCK_STATUS.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { startTestServer, type TestServer } from '../helpers/server.js';
import {
  CMD,
  ERR,
  infoRequestData,
  metaContextData,
  MIB,
  negotiate,
  OPT,
  option,
  openGreeted,
  parseInfoReplies,
  parseMetaContextReply,
  RawConn,
  REP,
  repName,
  Session,
  u32,
} from './raw.js';

const BASE = 'base:allocation';
let srv: TestServer;

before(async () => {
  srv = await startTestServer([
    { name: 'mem', size: 64 * MIB },
    { name: 'other', size: 2 * MIB },
  ]);
});

after(async () => {
  await srv.close();
});

async function withConn(structured: boolean, fn: (conn: RawConn) => Promise<void>): Promise<void> {
  const conn = await openGreeted(srv.socket);
  try {
    if (structured) assert.equal((await option(conn, OPT.STRUCTURED_REPLY)).final.type, REP.ACK);
    await fn(conn);
  } finally {
    conn.destroy();
  }
}

async function listContexts(
  conn: RawConn,
  name: string,
  queries: string[],
): Promise<{ final: number; names: string[] }> {
  const r = await option(conn, OPT.LIST_META_CONTEXT, metaContextData(name, queries));
  const entries = r.replies.map(parseMetaContextReply);
  for (const e of entries)
    assert.equal(e.id, 0, 'LIST_META_CONTEXT ids are reserved and SHOULD be 0');
  return { final: r.final.type, names: entries.map((e) => e.name) };
}

async function setContexts(
  conn: RawConn,
  name: string,
  queries: Array<string | Buffer>,
): Promise<{ final: number; ids: Map<string, number> }> {
  const r = await option(conn, OPT.SET_META_CONTEXT, metaContextData(name, queries));
  const ids = new Map<string, number>();
  for (const e of r.replies.map(parseMetaContextReply)) {
    assert.ok(!ids.has(e.name), `context ${e.name} returned twice`);
    assert.ok(![...ids.values()].includes(e.id), `context id ${e.id} is not unique`);
    ids.set(e.name, e.id);
  }
  return { final: r.final.type, ids };
}

/** GO, then returns the session; BLOCK_STATUS outcome is checked by the caller. */
async function go(
  conn: RawConn,
  name: string,
  structured: boolean,
  contexts = new Map<string, number>(),
): Promise<Session> {
  const r = await option(conn, OPT.GO, infoRequestData(name));
  assert.equal(r.final.type, REP.ACK, `GO ${name}: ${repName(r.final.type)}`);
  const info = parseInfoReplies(r.replies);
  return new Session(conn, structured, info.size, info.tflags, contexts);
}

async function assertBlockStatusRefused(s: Session): Promise<void> {
  await s.expectError(
    { type: CMD.BLOCK_STATUS, offset: 0, length: 65536 },
    ERR.EINVAL,
    'BLOCK_STATUS without a selected context',
  );
  // The connection remains usable.
  await s.read(0, 512);
}

test('LIST_META_CONTEXT with 0 queries lists base:allocation, ids 0', async () => {
  await withConn(true, async (conn) => {
    const r = await listContexts(conn, 'mem', []);
    assert.equal(r.final, REP.ACK);
    assert.ok(
      r.names.includes(BASE),
      `0 queries MUST list every context; got ${JSON.stringify(r.names)}`,
    );
  });
});

test('LIST_META_CONTEXT "base:" is a wildcard listing base:allocation', async () => {
  await withConn(true, async (conn) => {
    const r = await listContexts(conn, 'mem', ['base:']);
    assert.equal(r.final, REP.ACK);
    assert.deepEqual(r.names, [BASE]);
  });
});

test('LIST_META_CONTEXT "base:allocation" lists exactly it', async () => {
  await withConn(true, async (conn) => {
    const r = await listContexts(conn, 'mem', [BASE]);
    assert.equal(r.final, REP.ACK);
    assert.deepEqual(r.names, [BASE]);
  });
});

for (const queries of [
  ['x-unknown:thing'],
  ['qemu:dirty-bitmap:b0', 'qemu:allocation-depth'],
  ['base:nonexistent'],
  ['base:allocationX', 'base:Allocation', 'x-foo:'],
]) {
  test(`LIST/SET_META_CONTEXT ${JSON.stringify(queries)}: ignored, a bare ACK`, async () => {
    await withConn(true, async (conn) => {
      const l = await listContexts(conn, 'mem', queries);
      assert.equal(repName(l.final), 'ACK', 'unknown namespaces and base: leaves MUST be ignored');
      assert.deepEqual(l.names, [], 'nothing matched: a single ACK');
      const s = await setContexts(conn, 'mem', queries);
      assert.equal(repName(s.final), 'ACK');
      assert.equal(s.ids.size, 0);
      await assertBlockStatusRefused(await go(conn, 'mem', true));
    });
  });
}

test('LIST_META_CONTEXT mixing unknown and known queries lists only the known one', async () => {
  await withConn(true, async (conn) => {
    const r = await listContexts(conn, 'mem', ['x-a:b', BASE, 'base:nope', 'qemu:']);
    assert.equal(r.final, REP.ACK);
    assert.deepEqual(r.names, [BASE]);
  });
});

test('LIST_META_CONTEXT before STRUCTURED_REPLY: either ERR_INVALID or a correct list, in sync', async () => {
  await withConn(false, async (conn) => {
    const r = await option(conn, OPT.LIST_META_CONTEXT, metaContextData('mem', []));
    if (r.final.type === REP.ACK) {
      assert.ok(r.replies.map(parseMetaContextReply).some((c) => c.name === BASE));
    } else {
      assert.equal(repName(r.final.type), 'ERR_INVALID');
    }
    assert.equal((await option(conn, OPT.LIST)).final.type, REP.ACK);
  });
});

/** Syntactically broken meta-context requests: the spec says MUST fail with ERR_INVALID. */
const BROKEN: Array<[string, Buffer]> = [
  ['empty data', Buffer.alloc(0)],
  ['7 bytes', Buffer.alloc(7)],
  ['name length past the option', Buffer.concat([u32(50), Buffer.from('mem'), u32(0)])],
  ['name length 0xffffffff', Buffer.concat([u32(0xffffffff), Buffer.from('mem'), u32(0)])],
  ['query count 1, no query', Buffer.concat([u32(3), Buffer.from('mem'), u32(1)])],
  [
    'query count 2, one query',
    Buffer.concat([
      metaContextData('mem', [BASE]).subarray(0, 7),
      u32(2),
      u32(BASE.length),
      Buffer.from(BASE),
    ]),
  ],
  [
    'query length past the option',
    Buffer.concat([u32(3), Buffer.from('mem'), u32(1), u32(BASE.length + 1), Buffer.from(BASE)]),
  ],
  [
    'query length 0xffffffff',
    Buffer.concat([u32(3), Buffer.from('mem'), u32(1), u32(0xffffffff), Buffer.from(BASE)]),
  ],
  ['half a query length', Buffer.concat([u32(3), Buffer.from('mem'), u32(1), Buffer.from([0, 0])])],
  [
    'query count 0xffffffff',
    Buffer.concat([u32(3), Buffer.from('mem'), u32(0xffffffff), u32(4), Buffer.from('base')]),
  ],
];

for (const opt of [OPT.LIST_META_CONTEXT, OPT.SET_META_CONTEXT]) {
  for (const [what, data] of BROKEN) {
    test(`${opt === OPT.LIST_META_CONTEXT ? 'LIST' : 'SET'}_META_CONTEXT with ${what}: ERR_INVALID, stream in sync`, async () => {
      await withConn(true, async (conn) => {
        const r = await option(conn, opt, data);
        assert.equal(repName(r.final.type), 'ERR_INVALID', what);
        const l = await listContexts(conn, 'mem', [BASE]);
        assert.deepEqual(
          [l.final, l.names],
          [REP.ACK, [BASE]],
          'the next option is parsed correctly',
        );
      });
    });
  }
}

test('SET_META_CONTEXT before STRUCTURED_REPLY: ERR_INVALID, and nothing is selected', async () => {
  await withConn(false, async (conn) => {
    const r = await setContexts(conn, 'mem', [BASE]);
    assert.equal(repName(r.final), 'ERR_INVALID');
    assert.equal(r.ids.size, 0);
    assert.equal((await option(conn, OPT.STRUCTURED_REPLY)).final.type, REP.ACK);
    await assertBlockStatusRefused(await go(conn, 'mem', true));
  });
});

test('SET_META_CONTEXT base:allocation selects it: BLOCK_STATUS uses its id', async () => {
  await withConn(true, async (conn) => {
    const r = await setContexts(conn, 'mem', [BASE]);
    assert.equal(r.final, REP.ACK);
    assert.deepEqual([...r.ids.keys()], [BASE]);
    const s = await go(conn, 'mem', true, r.ids);
    const chunks = await s.blockStatus(0, 65536);
    assert.equal(chunks.length, 1, 'exactly one BLOCK_STATUS chunk per selected context');
    assert.equal(chunks[0]!.contextId, r.ids.get(BASE), 'the chunk carries the id SET returned');
  });
});

test('SET_META_CONTEXT with duplicate queries: one context, one unique id', async () => {
  await withConn(true, async (conn) => {
    const r = await setContexts(conn, 'mem', [BASE, 'x-nope:a', BASE, 'base:']);
    assert.equal(r.final, REP.ACK);
    assert.deepEqual([...r.ids.keys()], [BASE]);
    const s = await go(conn, 'mem', true, r.ids);
    const chunks = await s.blockStatus(0, 4096);
    assert.deepEqual(
      chunks.map((c) => c.contextId),
      [r.ids.get(BASE)],
    );
  });
});

test('the context id stays consistent: SET twice, INFO in between, BLOCK_STATUS uses the last id', async () => {
  await withConn(true, async (conn) => {
    const first = await setContexts(conn, 'mem', [BASE]);
    const second = await setContexts(conn, 'mem', [BASE]);
    assert.equal(second.final, REP.ACK);
    assert.equal((await option(conn, OPT.INFO, infoRequestData('mem'))).final.type, REP.ACK);
    const s = await go(conn, 'mem', true, second.ids);
    for (let i = 0; i < 3; i++) {
      const chunks = await s.blockStatus(i * MIB, MIB);
      assert.deepEqual(
        chunks.map((c) => c.contextId),
        [second.ids.get(BASE)],
      );
    }
    assert.ok(first.ids.has(BASE));
  });
});

test('a SET with 0 queries replaces an earlier selection: BLOCK_STATUS gets EINVAL', async () => {
  await withConn(true, async (conn) => {
    assert.equal((await setContexts(conn, 'mem', [BASE])).ids.size, 1);
    const none = await setContexts(conn, 'mem', []);
    assert.equal(none.final, REP.ACK);
    assert.equal(none.ids.size, 0, '0 queries MUST select no contexts');
    await assertBlockStatusRefused(await go(conn, 'mem', true));
  });
});

test('a SET with only "base:" selects nothing and replaces an earlier selection', async () => {
  await withConn(true, async (conn) => {
    assert.equal((await setContexts(conn, 'mem', [BASE])).ids.size, 1);
    const r = await setContexts(conn, 'mem', ['base:']);
    assert.equal(r.final, REP.ACK);
    assert.equal(r.ids.size, 0, '"base:" MUST be ignored by SET_META_CONTEXT');
    await assertBlockStatusRefused(await go(conn, 'mem', true));
  });
});

test('a failing SET still replaces an earlier selection', async () => {
  await withConn(true, async (conn) => {
    assert.equal((await setContexts(conn, 'mem', [BASE])).ids.size, 1);
    const bad = await option(
      conn,
      OPT.SET_META_CONTEXT,
      Buffer.concat([u32(3), Buffer.from('mem'), u32(1), u32(99)]),
    );
    assert.equal(repName(bad.final.type), 'ERR_INVALID');
    await assertBlockStatusRefused(await go(conn, 'mem', true));
  });
});

test('a SET for an unknown export fails and leaves nothing selected', async () => {
  await withConn(true, async (conn) => {
    assert.equal((await setContexts(conn, 'mem', [BASE])).ids.size, 1);
    const r = await setContexts(conn, 'nope', [BASE]);
    assert.ok(
      r.final >= 0x80000000,
      `SET for an unknown export must fail, got ${repName(r.final)}`,
    );
    await assertBlockStatusRefused(await go(conn, 'mem', true));
  });
});

test('SET for a different export than GO: BLOCK_STATUS gets EINVAL', async () => {
  await withConn(true, async (conn) => {
    const r = await setContexts(conn, 'other', [BASE]);
    assert.equal(r.ids.size, 1);
    await assertBlockStatusRefused(await go(conn, 'mem', true));
  });
});

test('SET for the GO export after one for another export: BLOCK_STATUS works', async () => {
  await withConn(true, async (conn) => {
    await setContexts(conn, 'other', [BASE]);
    const r = await setContexts(conn, 'mem', [BASE]);
    const s = await go(conn, 'mem', true, r.ids);
    assert.equal((await s.blockStatus(0, 512)).length, 1);
  });
});

test('BLOCK_STATUS without any SET: EINVAL (structured), and simple EINVAL without structured replies', async () => {
  const s1 = await negotiate(srv.socket, { structured: true });
  const s2 = await negotiate(srv.socket, { structured: false });
  try {
    await assertBlockStatusRefused(s1);
    const r = await s2.expectError({ type: CMD.BLOCK_STATUS, offset: 0, length: 4096 }, ERR.EINVAL);
    assert.ok(r.simple, 'without structured replies the error must be a simple reply');
    await s2.read(0, 512);
  } finally {
    s1.close();
    s2.close();
  }
});

test('contexts selected before a failed GO still apply to a later GO of the same export', async () => {
  await withConn(true, async (conn) => {
    const r = await setContexts(conn, 'mem', [BASE]);
    const bad = await option(conn, OPT.GO, infoRequestData('nope'));
    assert.equal(repName(bad.final.type), 'ERR_UNKNOWN');
    const s = await go(conn, 'mem', true, r.ids);
    const chunks = await s.blockStatus(0, 4096);
    assert.deepEqual(
      chunks.map((c) => c.contextId),
      [r.ids.get(BASE)],
    );
  });
});
