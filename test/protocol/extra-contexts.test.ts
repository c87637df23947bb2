/**
 * Conformance: metadata contexts besides base:allocation, offered by the export's device
 * (DeviceInfo.statusContexts / statusContextFamilies, answered by Device.contextStatus) — as the
 * cbt filter offers qemu:dirty-bitmap:NAME. Listing with wildcards, numbered families asked for
 * by name, per-negotiation ids, one BLOCK_STATUS chunk per selected context, REQ_ONE, and a
 * context that goes away after SET.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { MemoryBackend } from '../../src/backends/memory.js';
import type { Device, DeviceInfo, Extent } from '../../src/core/device.js';
import { DeviceError } from '../../src/core/errors.js';
import { startTestServer, type TestServer } from '../helpers/server.js';
import {
  CMD,
  CMDF,
  ERR,
  infoRequestData,
  metaContextData,
  MIB,
  OPT,
  option,
  openGreeted,
  parseInfoReplies,
  parseMetaContextReply,
  REP,
  repName,
  Session,
  STATE_HOLE,
  STATE_ZERO,
  type RawConn,
} from './raw.js';

const BASE = 'base:allocation';
const BITMAP = 'qemu:dirty-bitmap:b0';
const OWN = 'x-test:changes';
const FAMILY = 'x-test:changes:since:';
const BLOCK = 64 * 1024;

/**
 * A memory device that answers two extra contexts: odd 64 KiB blocks are "dirty" (state 1) in
 * both; a family member "…since:N" marks only blocks ≥ N. `gone` makes it refuse them all, as
 * a stack does once the filter that answered them has been removed.
 */
class ContextDevice extends MemoryBackend {
  gone = false;
  calls = 0;

  override info(): DeviceInfo {
    return { ...super.info(), statusContexts: [BITMAP, OWN], statusContextFamilies: [FAMILY] };
  }

  contextStatus(context: string, offset: number, length: number, flags: number): Promise<Extent[]> {
    this.calls++;
    let from = 0;
    if (this.gone) return Promise.reject(new DeviceError('EINVAL', `no context ${context}`));
    if (context.startsWith(FAMILY)) from = Number(context.slice(FAMILY.length));
    else if (context !== BITMAP && context !== OWN)
      return Promise.reject(new DeviceError('EINVAL', `no context ${context}`));
    const size = this.info().size;
    const out: Extent[] = [];
    let pos = offset;
    while (pos < Math.min(size, offset + length)) {
      const b = Math.floor(pos / BLOCK);
      const end = Math.min((b + 1) * BLOCK, size);
      out.push({ length: end - pos, state: b % 2 === 1 && b >= from ? 1 : 0 });
      pos = end;
      if (flags & 8) break;
    }
    return Promise.resolve(out);
  }
}

let srv: TestServer;
let dev: ContextDevice;

before(async () => {
  dev = new ContextDevice({ size: 4 * MIB });
  srv = await startTestServer([
    { name: 'ctx', device: dev as Device },
    { name: 'plain', size: 4 * MIB },
  ]);
});

after(async () => {
  await srv.close();
});

async function withConn(fn: (conn: RawConn) => Promise<void>): Promise<void> {
  const conn = await openGreeted(srv.socket);
  try {
    assert.equal((await option(conn, OPT.STRUCTURED_REPLY)).final.type, REP.ACK);
    await fn(conn);
  } finally {
    conn.destroy();
  }
}

async function list(conn: RawConn, name: string, queries: string[]): Promise<string[]> {
  const r = await option(conn, OPT.LIST_META_CONTEXT, metaContextData(name, queries));
  assert.equal(repName(r.final.type), 'ACK');
  const entries = r.replies.map(parseMetaContextReply);
  for (const e of entries) assert.equal(e.id, 0, 'LIST ids are 0');
  return entries.map((e) => e.name);
}

async function set(conn: RawConn, name: string, queries: string[]): Promise<Map<string, number>> {
  const r = await option(conn, OPT.SET_META_CONTEXT, metaContextData(name, queries));
  assert.equal(repName(r.final.type), 'ACK');
  const ids = new Map<string, number>();
  for (const e of r.replies.map(parseMetaContextReply)) {
    assert.ok(e.id !== 0, 'SET ids are nonzero');
    assert.ok(![...ids.values()].includes(e.id), `id ${e.id} is not unique`);
    ids.set(e.name, e.id);
  }
  return ids;
}

async function go(conn: RawConn, name: string, ids: Map<string, number>): Promise<Session> {
  const r = await option(conn, OPT.GO, infoRequestData(name));
  assert.equal(r.final.type, REP.ACK, `GO ${name}: ${repName(r.final.type)}`);
  const info = parseInfoReplies(r.replies);
  return new Session(conn, true, info.size, info.tflags, ids);
}

test('LIST with no query lists base:allocation and the device contexts, not family members', async () => {
  await withConn(async (conn) => {
    assert.deepEqual(await list(conn, 'ctx', []), [BASE, BITMAP, OWN]);
    assert.deepEqual(
      await list(conn, 'plain', []),
      [BASE],
      'a plain export offers only allocation',
    );
  });
});

test('LIST with the wildcard "qemu:dirty-bitmap:" lists the bitmaps; "qemu:" too', async () => {
  await withConn(async (conn) => {
    assert.deepEqual(await list(conn, 'ctx', ['qemu:dirty-bitmap:']), [BITMAP]);
    assert.deepEqual(await list(conn, 'ctx', ['qemu:']), [BITMAP]);
    assert.deepEqual(await list(conn, 'ctx', ['x-test:']), [OWN]);
    assert.deepEqual(await list(conn, 'plain', ['qemu:dirty-bitmap:']), []);
  });
});

test('a family member is found by its full name only; malformed members are not', async () => {
  await withConn(async (conn) => {
    assert.deepEqual(await list(conn, 'ctx', [`${FAMILY}5`]), [`${FAMILY}5`]);
    assert.deepEqual(
      await list(conn, 'ctx', [`${FAMILY}`, `${FAMILY}x`, `${FAMILY}-1`, `${FAMILY}1 `]),
      [],
    );
  });
});

test('SET of an unknown context matches nothing: BLOCK_STATUS is refused', async () => {
  await withConn(async (conn) => {
    const ids = await set(conn, 'ctx', ['qemu:dirty-bitmap:nope', 'qemu:dirty-bitmap:']);
    assert.equal(ids.size, 0, 'unknown names and wildcards select nothing');
    const s = await go(conn, 'ctx', ids);
    await s.expectError({ type: CMD.BLOCK_STATUS, offset: 0, length: BLOCK }, ERR.EINVAL);
    await s.read(0, 512);
  });
});

test('SET of a device context for an export without it matches nothing', async () => {
  await withConn(async (conn) => {
    assert.equal((await set(conn, 'plain', [BITMAP])).size, 0);
  });
});

test('BLOCK_STATUS with two contexts: one chunk each, with the ids SET gave', async () => {
  await withConn(async (conn) => {
    const ids = await set(conn, 'ctx', [BASE, BITMAP]);
    assert.deepEqual([...ids.keys()], [BASE, BITMAP]);
    const s = await go(conn, 'ctx', ids);
    await s.write(BLOCK, Buffer.alloc(BLOCK, 7));
    const chunks = await s.blockStatus(0, 4 * BLOCK);
    assert.deepEqual(chunks.map((c) => c.contextId).sort(), [...ids.values()].sort());
    const base = chunks.find((c) => c.contextId === ids.get(BASE))!;
    const bitmap = chunks.find((c) => c.contextId === ids.get(BITMAP))!;
    assert.equal(base.extents[0]!.flags & (STATE_HOLE | STATE_ZERO), STATE_HOLE | STATE_ZERO);
    assert.deepEqual(bitmap.extents, [
      { length: BLOCK, flags: 0 },
      { length: BLOCK, flags: 1 },
      { length: BLOCK, flags: 0 },
      { length: BLOCK, flags: 1 },
    ]);
  });
});

test('BLOCK_STATUS with REQ_ONE: exactly one extent per context, within the request', async () => {
  await withConn(async (conn) => {
    const ids = await set(conn, 'ctx', [OWN, BASE, BITMAP]);
    const s = await go(conn, 'ctx', ids);
    const chunks = await s.blockStatus(BLOCK + 512, 4 * BLOCK, CMDF.REQ_ONE);
    assert.equal(chunks.length, 3);
    for (const c of chunks) {
      assert.equal(c.extents.length, 1);
      assert.ok(c.extents[0]!.length <= 4 * BLOCK);
    }
    const own = chunks.find((c) => c.contextId === ids.get(OWN))!;
    assert.deepEqual(own.extents, [{ length: BLOCK - 512, flags: 1 }]);
  });
});

test('a family member selected by name is answered with its own parameter', async () => {
  await withConn(async (conn) => {
    const ids = await set(conn, 'ctx', [`${FAMILY}3`]);
    assert.deepEqual([...ids.keys()], [`${FAMILY}3`]);
    const s = await go(conn, 'ctx', ids);
    const [c] = await s.blockStatus(0, 6 * BLOCK);
    assert.deepEqual(
      c!.extents,
      [
        { length: 3 * BLOCK, flags: 0 },
        { length: BLOCK, flags: 1 },
        { length: BLOCK, flags: 0 },
        { length: BLOCK, flags: 1 },
      ],
      'only odd blocks from 3 on (neighbours of equal state merged)',
    );
  });
});

test('ids are per negotiation and stable across repeated SETs', async () => {
  await withConn(async (conn) => {
    const a = await set(conn, 'ctx', [BITMAP]);
    const b = await set(conn, 'ctx', [BASE, BITMAP]);
    assert.equal(b.get(BITMAP), a.get(BITMAP));
    const s = await go(conn, 'ctx', b);
    assert.equal((await s.blockStatus(0, BLOCK)).length, 2);
  });
});

test('a context that goes away after SET: BLOCK_STATUS gets EINVAL, the connection lives on', async () => {
  await withConn(async (conn) => {
    const ids = await set(conn, 'ctx', [BASE, BITMAP]);
    const s = await go(conn, 'ctx', ids);
    assert.equal((await s.blockStatus(0, BLOCK)).length, 2);
    dev.gone = true;
    try {
      await s.expectError({ type: CMD.BLOCK_STATUS, offset: 0, length: BLOCK }, ERR.EINVAL);
      await s.read(0, 512);
    } finally {
      dev.gone = false;
    }
    assert.equal((await s.blockStatus(0, BLOCK)).length, 2);
  });
});

test('only base:allocation selected: the device contexts are not asked', async () => {
  await withConn(async (conn) => {
    const ids = await set(conn, 'ctx', [BASE]);
    const s = await go(conn, 'ctx', ids);
    const before = dev.calls;
    assert.equal((await s.blockStatus(0, BLOCK)).length, 1);
    assert.equal(dev.calls, before);
  });
});
