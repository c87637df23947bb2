/**
 * Conformance: the transmission phase (NBD spec "Transmission", "Request types", "Error
 * values", "Block size constraints"; checklist §2.5–2.11, edge cases 6–12, 14, 15, 17, 18).
 * Most tests run twice: with simple replies only, and with structured replies plus
 * base:allocation selected. Every reply is parsed strictly by raw.readReplies.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { MemoryBackend } from '../../src/backends/memory.js';
import type { Extent as DeviceExtent } from '../../src/core/device.js';
import { DeviceError } from '../../src/core/errors.js';
import { startTestServer, type TestServer } from '../helpers/server.js';
import {
  CHUNK,
  CMD,
  CMDF,
  encodeRequest,
  ERR,
  errName,
  type Expectation,
  FLAG_DONE,
  MIB,
  negotiate,
  pattern,
  readReplies,
  type Reply,
  type RequestSpec,
  Session,
  SIMPLE_REPLY_MAGIC,
  STATE_HOLE,
  STATE_ZERO,
  TF,
  EXTENDED_REQUEST_MAGIC,
  STRUCTURED_REPLY_MAGIC,
} from './raw.js';

const BASE = 'base:allocation';
const MEM = 64 * MIB;
const SIZE = BigInt(MEM);
const MAX_PAYLOAD = 32 * MIB;
const MODES = [false, true] as const;
const mode = (structured: boolean): string => (structured ? 'structured' : 'simple');

let srv: TestServer;

before(async () => {
  srv = await startTestServer([
    { name: 'mem', size: MEM },
    { name: 'ro', size: MIB, readOnly: true },
    { name: 'small', size: 1000 },
  ]);
});

after(async () => {
  await srv.close();
});

/** Opens an export; structured sessions also select base:allocation. */
async function open(structured: boolean, exportName = 'mem'): Promise<Session> {
  const s = await negotiate(srv.socket, {
    structured,
    exportName,
    meta: structured ? [BASE] : undefined,
  });
  if (structured) assert.ok(s.contexts.has(BASE), 'base:allocation selected');
  return s;
}

async function using(
  structured: boolean,
  fn: (s: Session) => Promise<void>,
  exportName = 'mem',
): Promise<void> {
  const s = await open(structured, exportName);
  try {
    await fn(s);
    // Nothing unexpected may be left on the wire, and the connection must still be open.
    assert.deepEqual(
      await s.conn.idle(30),
      { pending: 0, closed: false },
      'stray bytes or an unexpected close',
    );
  } finally {
    s.close();
  }
}

const TRAP_COOKIE = 0xbad0bad0bad0bad0n;

/**
 * A WRITE payload made of valid READ requests: if the server fails to consume it, it answers
 * them with TRAP_COOKIE, and the strict reply parser fails on the unknown cookie.
 */
function trap(length: number): Buffer {
  const h = encodeRequest({ type: CMD.READ, cookie: TRAP_COOKIE, offset: 0, length: 1 });
  const b = Buffer.alloc(length, 0x5a);
  for (let pos = 0; pos + h.length <= length; pos += h.length) h.copy(b, pos);
  return b;
}

/** Sends `spec` and, in the same write, a READ; both replies must come back correctly. */
async function expectErrorThenRead(
  s: Session,
  spec: RequestSpec,
  error: number | 'any',
  what: string,
): Promise<Reply> {
  const a = s.send(spec);
  const b = s.send({ type: CMD.READ, offset: 0, length: 512 });
  const replies = await readReplies(
    s.conn,
    s.structured,
    new Map([
      [a.cookie, a.exp],
      [b.cookie, b.exp],
    ]),
  );
  const r = replies.get(a.cookie)!;
  if (error === 'any') assert.notEqual(r.error, 0, `${what}: expected an error, got success`);
  else
    assert.equal(
      errName(r.error),
      errName(error),
      `${what}: expected ${errName(error)}, got ${r.error === 0 ? 'success' : errName(r.error)}`,
    );
  assert.equal(replies.get(b.cookie)!.error, 0, `${what}: the following READ failed`);
  return r;
}

// ---------------------------------------------------------------------------------------------

const COOKIES = [
  0n,
  1n,
  0xffffffffffffffffn,
  0x8000000000000001n,
  0x8000000000000000n,
  0x0123456789abcdefn,
  0xffffffff00000000n,
  0x00000000ffffffffn,
  0x7fffffffffffffffn,
];

for (const structured of MODES) {
  test(`cookies are echoed verbatim, successes and errors (${mode(structured)})`, async () => {
    await using(structured, async (s) => {
      for (const cookie of COOKIES) {
        const specs: RequestSpec[] = [
          { type: CMD.READ, offset: 4096, length: 512 },
          { type: CMD.WRITE, offset: 4096, data: pattern(512, 3) },
          { type: CMD.FLUSH },
          { type: 9, offset: 0, length: 0 },
          { type: CMD.READ, offset: SIZE, length: 512 },
          { type: CMD.WRITE, offset: SIZE, data: pattern(512, 3) },
        ];
        for (const spec of specs) {
          const r = await s.request({ ...spec, cookie });
          assert.equal(r.cookie, cookie); // readReplies already rejects any other cookie
        }
      }
    });
  });

  test(`WRITE then READ round trip, unaligned (${mode(structured)})`, async () => {
    await using(structured, async (s) => {
      const base = structured ? 512 * 1024 : 0;
      const data = pattern(10_000, structured ? 2 : 1);
      await s.write(base + 3 * 4096 + 7, data);
      const back = await s.read(base + 3 * 4096, 20_000);
      assert.ok(back.subarray(0, 7).equals(Buffer.alloc(7)), 'bytes before the write stay zero');
      assert.ok(back.subarray(7, 10_007).equals(data), 'written bytes read back');
      assert.ok(
        back.subarray(10_007).equals(Buffer.alloc(20_000 - 10_007)),
        'bytes after stay zero',
      );
      // Single bytes, the first and the last of the export.
      await s.write(0 + base, Buffer.from([0xa5]));
      assert.deepEqual([...(await s.read(base, 1))], [0xa5]);
      await s.write(SIZE - 1n, Buffer.from([0x5a]));
      assert.deepEqual([...(await s.read(SIZE - 1n, 1))], [0x5a]);
    });
  });

  test(`zero-length READ, WRITE, TRIM, WRITE_ZEROES, CACHE, FLUSH get replies (${mode(structured)})`, async () => {
    await using(structured, async (s) => {
      for (const offset of [0n, 4096n, SIZE]) {
        for (const type of [CMD.READ, CMD.WRITE, CMD.TRIM, CMD.WRITE_ZEROES, CMD.CACHE]) {
          const r = await s.request({
            type,
            offset,
            length: 0,
            data: type === CMD.WRITE ? Buffer.alloc(0) : undefined,
          });
          if (type === CMD.READ && r.error === 0) assert.equal(r.data!.length, 0);
        }
      }
      await s.request({ type: CMD.FLUSH });
      await s.read(0, 512);
    });
  });

  test(`READ past the end: EINVAL, no payload, connection usable (${mode(structured)})`, async () => {
    await using(structured, async (s) => {
      for (const [offset, length] of [
        [SIZE - 512n, 1024],
        [SIZE, 1],
        [SIZE - 1n, 2],
        [SIZE + 4096n, 4096],
        [0n, MEM + 1],
      ] as const) {
        await expectErrorThenRead(
          s,
          { type: CMD.READ, offset, length },
          ERR.EINVAL,
          `READ ${offset}+${length}`,
        );
      }
    });
  });

  test(`WRITE past the end: ENOSPC and its payload consumed (${mode(structured)})`, async () => {
    await using(structured, async (s) => {
      assert.equal(
        (await s.request({ type: CMD.WRITE_ZEROES, offset: SIZE - 8192n, length: 8192 })).error,
        0,
      );
      for (const [offset, length] of [
        [SIZE - 100n, 4096],
        [SIZE, 512],
        [SIZE + BigInt(MIB), 28 * 40],
      ] as const) {
        await expectErrorThenRead(
          s,
          { type: CMD.WRITE, offset, data: trap(length) },
          ERR.ENOSPC,
          `WRITE ${offset}+${length}`,
        );
      }
      // The part that lies inside the export was not written either.
      assert.ok(
        (await s.read(SIZE - 8192n, 8192)).equals(Buffer.alloc(8192)),
        'a refused WRITE changed data',
      );
    });
  });

  test(`TRIM past the end: EINVAL; WRITE_ZEROES past the end: ENOSPC (${mode(structured)})`, async () => {
    await using(structured, async (s) => {
      for (const [offset, length] of [
        [SIZE - 512n, 1024],
        [SIZE, 1],
        [SIZE + 1n, 512],
      ] as const) {
        await expectErrorThenRead(
          s,
          { type: CMD.TRIM, offset, length },
          ERR.EINVAL,
          `TRIM ${offset}+${length}`,
        );
        await expectErrorThenRead(
          s,
          { type: CMD.WRITE_ZEROES, offset, length },
          ERR.ENOSPC,
          `WRITE_ZEROES ${offset}+${length}`,
        );
        await expectErrorThenRead(
          s,
          { type: CMD.CACHE, offset, length },
          'any',
          `CACHE ${offset}+${length}`,
        );
        if (structured) {
          await expectErrorThenRead(
            s,
            { type: CMD.BLOCK_STATUS, offset, length },
            ERR.EINVAL,
            `BLOCK_STATUS ${offset}+${length}`,
          );
        }
      }
    });
  });

  test(`offsets past 2^53 and offset + length past 2^64: errors, not crashes (${mode(structured)})`, async () => {
    await using(structured, async (s) => {
      const offsets: Array<[bigint, number]> = [
        [(1n << 64n) - 512n, 1024],
        [(1n << 64n) - 1n, 1],
        [(1n << 64n) - 1n, 0xffffffff],
        [1n << 63n, 512],
        [(1n << 63n) + 1n, 512],
        [1n << 53n, 512],
        [(1n << 53n) + 1n, 512],
        [(1n << 53n) - 1n, 512],
        [(1n << 32n) * 0xffffffffn, 512],
        [SIZE + (1n << 32n), 512],
      ];
      for (const [offset, length] of offsets) {
        const what = (t: string): string => `${t} 0x${offset.toString(16)}+${length}`;
        await expectErrorThenRead(
          s,
          { type: CMD.READ, offset, length: Math.min(length, 4096) },
          ERR.EINVAL,
          what('READ'),
        );
        await expectErrorThenRead(
          s,
          { type: CMD.WRITE, offset, data: trap(Math.min(length, 4096)) },
          ERR.ENOSPC,
          what('WRITE'),
        );
        await expectErrorThenRead(s, { type: CMD.TRIM, offset, length }, ERR.EINVAL, what('TRIM'));
        await expectErrorThenRead(
          s,
          { type: CMD.WRITE_ZEROES, offset, length },
          ERR.ENOSPC,
          what('WRITE_ZEROES'),
        );
        await expectErrorThenRead(s, { type: CMD.CACHE, offset, length }, 'any', what('CACHE'));
        if (structured) {
          await expectErrorThenRead(
            s,
            { type: CMD.BLOCK_STATUS, offset, length },
            ERR.EINVAL,
            what('BLOCK_STATUS'),
          );
        }
      }
    });
  });

  test(`unknown commands: EINVAL, no payload assumed, connection usable (${mode(structured)})`, async () => {
    await using(structured, async (s) => {
      for (const type of [CMD.RESIZE, 9, 10, 100, 0x7fff, 0x8000, 0xffff]) {
        await expectErrorThenRead(
          s,
          { type, offset: 0, length: 4096 },
          ERR.EINVAL,
          `command ${type}`,
        );
      }
    });
  });

  test(`unknown command flag bits: EINVAL, WRITE payload consumed (${mode(structured)})`, async () => {
    await using(structured, async (s) => {
      for (const bit of [5, 6, 7, 8, 14, 15]) {
        const flags = 1 << bit;
        for (const spec of [
          { type: CMD.READ, offset: 0, length: 512 },
          { type: CMD.WRITE, offset: 0, data: trap(1024) },
          { type: CMD.FLUSH },
          { type: CMD.TRIM, offset: 0, length: 512 },
          { type: CMD.WRITE_ZEROES, offset: 0, length: 512 },
          { type: CMD.CACHE, offset: 0, length: 512 },
        ] as RequestSpec[]) {
          await expectErrorThenRead(
            s,
            { ...spec, flags },
            ERR.EINVAL,
            `command ${spec.type} with flag bit ${bit}`,
          );
        }
      }
    });
  });

  test(`known flags on commands they do not apply to: EINVAL (${mode(structured)})`, async () => {
    await using(structured, async (s) => {
      const cases: Array<[string, RequestSpec]> = [
        ['NO_HOLE on WRITE', { type: CMD.WRITE, flags: CMDF.NO_HOLE, offset: 0, data: trap(2048) }],
        ['DF on WRITE', { type: CMD.WRITE, flags: CMDF.DF, offset: 0, data: trap(2048) }],
        ['REQ_ONE on WRITE', { type: CMD.WRITE, flags: CMDF.REQ_ONE, offset: 0, data: trap(2048) }],
        [
          'FAST_ZERO on WRITE',
          { type: CMD.WRITE, flags: CMDF.FAST_ZERO, offset: 0, data: trap(2048) },
        ],
        ['REQ_ONE on READ', { type: CMD.READ, flags: CMDF.REQ_ONE, offset: 0, length: 512 }],
        ['NO_HOLE on READ', { type: CMD.READ, flags: CMDF.NO_HOLE, offset: 0, length: 512 }],
        ['FAST_ZERO on READ', { type: CMD.READ, flags: CMDF.FAST_ZERO, offset: 0, length: 512 }],
        ['NO_HOLE on TRIM', { type: CMD.TRIM, flags: CMDF.NO_HOLE, offset: 0, length: 512 }],
        ['DF on TRIM', { type: CMD.TRIM, flags: CMDF.DF, offset: 0, length: 512 }],
        [
          'REQ_ONE on WRITE_ZEROES',
          { type: CMD.WRITE_ZEROES, flags: CMDF.REQ_ONE, offset: 0, length: 512 },
        ],
        ['DF on FLUSH', { type: CMD.FLUSH, flags: CMDF.DF }],
      ];
      if (structured)
        cases.push([
          'NO_HOLE on BLOCK_STATUS',
          { type: CMD.BLOCK_STATUS, flags: CMDF.NO_HOLE, offset: 0, length: 512 },
        ]);
      for (const [what, spec] of cases) await expectErrorThenRead(s, spec, ERR.EINVAL, what);
    });
  });

  test(`FUA is accepted on every command (SEND_FUA advertised) (${mode(structured)})`, async () => {
    await using(structured, async (s) => {
      assert.ok(s.tflags & TF.SEND_FUA, 'the memory export advertises SEND_FUA');
      const base = 2 * MIB;
      await s.write(base, pattern(4096, 8), CMDF.FUA);
      assert.ok(
        (await s.read(base, 4096, CMDF.FUA)).equals(pattern(4096, 8)),
        'FUA on READ MUST be accepted',
      );
      for (const spec of [
        { type: CMD.FLUSH },
        { type: CMD.TRIM, offset: base + 8192, length: 4096 },
        { type: CMD.WRITE_ZEROES, offset: base + 8192, length: 4096 },
        { type: CMD.CACHE, offset: base, length: 4096 },
        ...(structured ? [{ type: CMD.BLOCK_STATUS, offset: base, length: 4096 }] : []),
      ] as RequestSpec[]) {
        const r = await s.request({ ...spec, flags: CMDF.FUA });
        assert.equal(r.error, 0, `FUA on command ${spec.type}: ${errName(r.error)}`);
      }
    });
  });

  test(`WRITE_ZEROES (plain, NO_HOLE, FAST_ZERO) reads back as zeros (${mode(structured)})`, async () => {
    await using(structured, async (s) => {
      assert.ok(s.tflags & TF.SEND_WRITE_ZEROES);
      assert.ok(s.tflags & TF.SEND_FAST_ZERO, 'the memory export advertises SEND_FAST_ZERO');
      const base = 56 * MIB + (structured ? 2 * MIB : 0);
      for (const [i, flags] of [
        0,
        CMDF.NO_HOLE,
        CMDF.FAST_ZERO,
        CMDF.FAST_ZERO | CMDF.NO_HOLE,
        CMDF.FUA,
      ].entries()) {
        const off = base + i * 200_000;
        await s.write(off, pattern(200_000, i + 40));
        const r = await s.request({
          type: CMD.WRITE_ZEROES,
          flags,
          offset: off + 1000,
          length: 150_000,
        });
        assert.equal(r.error, 0, `WRITE_ZEROES flags ${flags}: ${errName(r.error)}`);
        const back = await s.read(off, 200_000);
        assert.ok(back.subarray(0, 1000).equals(pattern(200_000, i + 40).subarray(0, 1000)));
        assert.ok(
          back.subarray(1000, 151_000).equals(Buffer.alloc(150_000)),
          'zeroed range MUST read back as zeros',
        );
        assert.ok(back.subarray(151_000).equals(pattern(200_000, i + 40).subarray(151_000)));
      }
    });
  });

  test(`READ of exactly 32 MiB works, WRITE of 33 MiB is refused with its payload consumed (${mode(structured)})`, async () => {
    await using(structured, async (s) => {
      const base = 16 * MIB;
      const data = pattern(MAX_PAYLOAD, structured ? 77 : 78);
      await s.write(base, data); // ≤ 32 MiB MUST work when nothing else was advertised
      assert.ok((await s.read(base, MAX_PAYLOAD, 0)).equals(data), '32 MiB READ');
      await expectErrorThenRead(
        s,
        { type: CMD.WRITE, offset: base, data: trap(33 * MIB) },
        ERR.EINVAL,
        '33 MiB WRITE',
      );
      await expectErrorThenRead(
        s,
        { type: CMD.READ, offset: base, length: MAX_PAYLOAD + 1 },
        ERR.EINVAL,
        'READ of 32 MiB + 1',
      );
      await expectErrorThenRead(
        s,
        { type: CMD.READ, offset: 0, length: 48 * MIB },
        ERR.EINVAL,
        'READ of 48 MiB',
      );
      assert.ok(
        (await s.read(base, MAX_PAYLOAD)).equals(data),
        'the refused WRITE changed nothing',
      );
    });
  });

  test(`payload-less commands longer than the max payload are not a disconnect (${mode(structured)})`, async () => {
    await using(structured, async (s) => {
      for (const type of [
        CMD.TRIM,
        CMD.WRITE_ZEROES,
        CMD.CACHE,
        ...(structured ? [CMD.BLOCK_STATUS] : []),
      ]) {
        const r = await s.request({ type, offset: 0, length: 48 * MIB }, 10_000);
        assert.ok(
          r.error === 0 || r.error === ERR.EINVAL || r.error === ERR.EOVERFLOW,
          `command ${type}: ${errName(r.error)}`,
        );
      }
      await s.read(0, 512);
    });
  });

  test(`read-only export: READ_ONLY flag, EPERM for WRITE/TRIM/WRITE_ZEROES, payload consumed (${mode(structured)})`, async () => {
    const s = await negotiate(srv.socket, { exportName: 'ro', structured });
    try {
      assert.ok(s.tflags & TF.READ_ONLY, 'READ_ONLY must be set');
      for (const spec of [
        { type: CMD.WRITE, offset: 0, data: trap(4096) },
        { type: CMD.WRITE, offset: 0, data: trap(4096), flags: CMDF.FUA },
        { type: CMD.TRIM, offset: 0, length: 4096 },
        { type: CMD.WRITE_ZEROES, offset: 0, length: 4096 },
      ] as RequestSpec[]) {
        await expectErrorThenRead(s, spec, ERR.EPERM, `command ${spec.type} on a read-only export`);
      }
      assert.ok((await s.read(0, MIB)).equals(Buffer.alloc(MIB)), 'nothing was written');
    } finally {
      s.close();
    }
  });

  test(`unaligned export size (1000 bytes): partial last block (${mode(structured)})`, async () => {
    await using(
      structured,
      async (s) => {
        assert.equal(s.size, 1000n);
        const data = pattern(1000, 5);
        await s.write(0, data);
        assert.ok(
          (await s.read(512, 488)).equals(data.subarray(512)),
          'read of the last partial block',
        );
        assert.ok((await s.read(0, 1000)).equals(data));
        assert.ok((await s.read(999, 1)).equals(data.subarray(999)));
        await s.write(999, Buffer.from([7]));
        await expectErrorThenRead(
          s,
          { type: CMD.READ, offset: 512, length: 512 },
          ERR.EINVAL,
          'READ 512+512 of 1000',
        );
        await expectErrorThenRead(
          s,
          { type: CMD.WRITE, offset: 999, data: trap(2) },
          ERR.ENOSPC,
          'WRITE 999+2 of 1000',
        );
        const z = await s.request({ type: CMD.WRITE_ZEROES, offset: 500, length: 500 });
        assert.equal(z.error, 0);
        assert.ok((await s.read(0, 1000)).subarray(500).equals(Buffer.alloc(500)));
        if (structured) {
          for (const [offset, length, flags] of [
            [0, 1000, 0],
            [0, 1000, CMDF.REQ_ONE],
            [500, 500, 0],
            [999, 1, 0],
            [0, 1, 0],
          ] as const) {
            const [chunk] = await s.blockStatus(offset, length, flags);
            const sum = chunk!.extents.reduce((a, e) => a + e.length, 0);
            assert.ok(
              sum >= 1 && offset + sum <= 1000,
              `extents of ${offset}+${length} sum to ${sum}: past the export end`,
            );
            if (flags & CMDF.REQ_ONE) assert.ok(chunk!.extents.length === 1 && sum <= length);
          }
          await expectErrorThenRead(
            s,
            { type: CMD.BLOCK_STATUS, offset: 0, length: 1001 },
            ERR.EINVAL,
            'BLOCK_STATUS 0+1001',
          );
          await expectErrorThenRead(
            s,
            { type: CMD.BLOCK_STATUS, offset: 1000, length: 1 },
            ERR.EINVAL,
            'BLOCK_STATUS 1000+1',
          );
        }
      },
      'small',
    );
  });

  test(`simple or structured error replies carry no payload (${mode(structured)})`, async () => {
    await using(structured, async (s) => {
      s.conn.send(
        encodeRequest({ type: CMD.READ, cookie: 0x1122334455667788n, offset: SIZE, length: 4096 }),
      );
      const idle = await s.conn.idle(100);
      if (!structured) {
        assert.equal(idle.pending, 16, 'a simple error reply is exactly 16 bytes');
        const r = await s.conn.read(16);
        assert.equal(r.readUInt32BE(0), SIMPLE_REPLY_MAGIC);
        assert.equal(r.readUInt32BE(4), ERR.EINVAL);
        assert.equal(r.readBigUInt64BE(8), 0x1122334455667788n);
      } else {
        const h = await s.conn.read(20);
        assert.equal(h.readUInt32BE(0), STRUCTURED_REPLY_MAGIC, 'READ errors MUST be structured');
        assert.equal(h.readUInt16BE(4), FLAG_DONE);
        assert.ok(h.readUInt16BE(6) === CHUNK.ERROR || h.readUInt16BE(6) === CHUNK.ERROR_OFFSET);
        assert.equal(h.readBigUInt64BE(8), 0x1122334455667788n);
        const payload = await s.conn.read(h.readUInt32BE(16));
        assert.equal(payload.readUInt32BE(0), ERR.EINVAL);
        assert.equal(idle.pending, 20 + payload.length, 'nothing but the error chunk');
      }
    });
  });

  test(`pipelining: 500 requests in one write, every reply whole and matched (${mode(structured)})`, async () => {
    await using(structured, async (s) => {
      const A = 8 * MIB + (structured ? MIB : 0); // written by the batch
      const B = A + 512 * 1024; // read by the batch
      await s.write(B, pattern(256 * 1024, 99));
      const pending = new Map<bigint, Expectation>();
      const reads = new Map<bigint, number>();
      const parts: Buffer[] = [];
      for (let i = 0; i < 500; i++) {
        const cookie = 0x8000000000000000n | (BigInt(i) << 20n) | 0xabcn;
        let spec: RequestSpec;
        switch (i % 6) {
          case 0:
            spec = { type: CMD.WRITE, offset: A + i * 512, data: pattern(512, 1000 + i) };
            break;
          case 1:
          case 2:
            spec = { type: CMD.READ, offset: B + (i % 200) * 1024, length: 1024 + (i % 7) };
            reads.set(cookie, (i % 200) * 1024);
            break;
          case 3:
            spec = { type: CMD.FLUSH };
            break;
          case 4:
            spec =
              i % 12 === 4
                ? { type: 42, offset: 0, length: 0 }
                : { type: CMD.READ, offset: SIZE, length: 512 };
            break;
          default:
            spec = structured
              ? { type: CMD.BLOCK_STATUS, offset: B, length: 1024 * 1024 }
              : { type: CMD.CACHE, offset: B, length: 4096 };
        }
        parts.push(encodeRequest({ ...spec, cookie }));
        pending.set(cookie, {
          type: spec.type,
          flags: 0,
          offset: BigInt(spec.offset ?? 0),
          length: spec.length ?? spec.data?.length ?? 0,
        });
      }
      s.conn.send(Buffer.concat(parts));
      const replies = await readReplies(s.conn, structured, pending, 20_000);
      assert.equal(replies.size, 500);
      const want = pattern(256 * 1024, 99);
      for (const [cookie, r] of replies) {
        const exp = pending.get(cookie)!;
        if (exp.type === CMD.READ && exp.offset < SIZE) {
          assert.equal(r.error, 0);
          const at = reads.get(cookie)!;
          assert.ok(
            r.data!.equals(want.subarray(at, at + exp.length)),
            `READ data for cookie ${cookie.toString(16)}`,
          );
        } else if (exp.type === CMD.READ || exp.type === 42) {
          assert.equal(r.error, ERR.EINVAL);
        } else {
          assert.equal(r.error, 0, `command ${exp.type}: ${errName(r.error)}`);
        }
      }
      for (let i = 0; i < 500; i += 6) {
        assert.ok(
          (await s.read(A + i * 512, 512)).equals(pattern(512, 1000 + i)),
          `write ${i} landed`,
        );
      }
    });
  });

  test(`a 32 MiB READ reply and 100 small replies do not interleave inside a message (${mode(structured)})`, async () => {
    await using(structured, async (s) => {
      const pending = new Map<bigint, Expectation>();
      const parts: Buffer[] = [];
      const add = (cookie: bigint, offset: number, length: number): void => {
        parts.push(encodeRequest({ type: CMD.READ, cookie, offset, length }));
        pending.set(cookie, { type: CMD.READ, flags: 0, offset: BigInt(offset), length });
      };
      add(1n, 0, MAX_PAYLOAD);
      for (let i = 0; i < 100; i++) add(BigInt(1000 + i), i * 4096, 4096);
      add(2n, MAX_PAYLOAD, MAX_PAYLOAD);
      s.conn.send(Buffer.concat(parts));
      const replies = await readReplies(s.conn, structured, pending, 20_000);
      for (const r of replies.values()) assert.equal(r.error, 0);
    });
  });

  test(`DISC: no reply, outstanding requests finished, then the server closes (${mode(structured)})`, async () => {
    const s = await open(structured);
    try {
      const base = 60 * MIB + (structured ? 512 * 1024 : 0);
      const pending = new Map<bigint, Expectation>();
      const parts: Buffer[] = [];
      for (let i = 0; i < 100; i++) {
        const data = pattern(4096, 500 + i);
        parts.push(
          encodeRequest({ type: CMD.WRITE, cookie: BigInt(i + 1), offset: base + i * 4096, data }),
        );
        pending.set(BigInt(i + 1), {
          type: CMD.WRITE,
          flags: 0,
          offset: BigInt(base + i * 4096),
          length: 4096,
        });
      }
      parts.push(encodeRequest({ type: CMD.DISC, cookie: 0xd15cn }));
      s.conn.send(Buffer.concat(parts));
      const replies = await readReplies(s.conn, structured, pending);
      for (const r of replies.values()) assert.equal(r.error, 0);
      assert.equal((await s.conn.waitClosed()).length, 0, 'DISC gets no reply');
    } finally {
      s.close();
    }
    await using(structured, async (v) => {
      const base = 60 * MIB + (structured ? 512 * 1024 : 0);
      for (let i = 0; i < 100; i++)
        assert.ok((await v.read(base + i * 4096, 4096)).equals(pattern(4096, 500 + i)));
    });
  });
}

// ---------------------------------------------------------------------------------------------
// Structured-only behaviour.

test('structured READ: only OFFSET_DATA/OFFSET_HOLE content, DONE only on the last chunk, within range', async () => {
  await using(true, async (s) => {
    const base = 1 * MIB;
    // Data, hole, data, hole... in 64 KiB steps, plus unaligned bits.
    for (let i = 0; i < 16; i += 2) await s.write(base + i * 65536 + 100, pattern(30_000, i));
    for (const [offset, length] of [
      [base, 16 * 65536],
      [base + 99, 65536 * 3 + 17],
      [base + 65536 + 5, 65536],
      [base - 4096, 8192],
    ]) {
      const r = await s.request({ type: CMD.READ, offset, length });
      assert.equal(r.error, 0);
      assert.ok(r.chunks.length >= 1);
      r.chunks.forEach((c, i) => {
        const allowed: number[] = [CHUNK.OFFSET_DATA, CHUNK.OFFSET_HOLE, CHUNK.NONE];
        assert.ok(allowed.includes(c.type), `chunk type ${c.type} in a READ reply`);
        assert.equal(
          (c.flags & FLAG_DONE) !== 0,
          i === r.chunks.length - 1,
          'DONE on the last chunk only',
        );
        if (c.type === CHUNK.NONE)
          assert.equal(i, r.chunks.length - 1, 'NONE only as the final chunk');
      });
      // Reassembled content must equal what was written.
      const expected = Buffer.alloc(length);
      for (let i = 0; i < 16; i += 2) {
        const wStart = base + i * 65536 + 100;
        const p = pattern(30_000, i);
        for (let k = 0; k < p.length; k++) {
          const at = wStart + k - offset;
          if (at >= 0 && at < length) expected[at] = p[k]!;
        }
      }
      assert.ok(r.data!.equals(expected), `content of ${offset}+${length}`);
    }
    // A second request after the reply: a stray chunk of the first would fail the parser.
    await s.read(0, 16);
  });
});

test('structured READ with DF: a single content chunk, holes as explicit zeros', async () => {
  await using(true, async (s) => {
    assert.ok(s.tflags & TF.SEND_DF);
    const base = 3 * MIB;
    await s.write(base + 100, pattern(1000, 3));
    const r = await s.request({ type: CMD.READ, flags: CMDF.DF, offset: base, length: 65536 });
    assert.equal(r.error, 0, 'DF reads of up to 64 KiB MUST be supported');
    const content = r.chunks.filter(
      (c) => c.type === CHUNK.OFFSET_DATA || c.type === CHUNK.OFFSET_HOLE,
    );
    assert.equal(content.length, 1);
    assert.equal(
      content[0]!.type,
      CHUNK.OFFSET_DATA,
      'mixed data and hole under DF MUST be OFFSET_DATA',
    );
    const want = Buffer.alloc(65536);
    pattern(1000, 3).copy(want, 100);
    assert.ok(r.data!.equals(want));
  });
});

test('DF without structured replies (SEND_DF not advertised) is rejected or ignored, never desyncs', async () => {
  await using(false, async (s) => {
    assert.equal(s.tflags & TF.SEND_DF, 0);
    const r = await s.request({ type: CMD.READ, flags: CMDF.DF, offset: 0, length: 512 });
    assert.ok(r.error === 0 || r.error === ERR.EINVAL, errName(r.error));
    await s.read(0, 512);
  });
});

test('BLOCK_STATUS with REQ_ONE: exactly one extent, no longer than the request', async () => {
  await using(true, async (s) => {
    const base = 48 * MIB;
    await s.write(base, pattern(65536, 1));
    for (const [offset, length] of [
      [base, 100],
      [base, 65536],
      [base, 4 * MIB],
      [base + 65536, 1],
      [base + 65536, 4 * MIB],
      [base + 1000, 200_000],
      [MEM - 4096, 4096],
      [MEM - 1, 1],
    ]) {
      const chunks = await s.blockStatus(offset, length, CMDF.REQ_ONE);
      assert.equal(chunks.length, 1, 'one chunk per selected context');
      assert.equal(chunks[0]!.contextId, s.contexts.get(BASE));
      assert.equal(chunks[0]!.extents.length, 1, `REQ_ONE ${offset}+${length}: exactly one extent`);
      const e = chunks[0]!.extents[0]!;
      assert.ok(e.length <= length, `REQ_ONE extent ${e.length} longer than the request ${length}`);
      assert.ok(offset + e.length <= MEM);
      if (offset >= base && offset < base + 65536) {
        assert.equal(e.flags & STATE_ZERO, 0, 'written data MUST NOT be reported as reading zero');
      }
    }
  });
});

test('BLOCK_STATUS without REQ_ONE: only the last extent may pass the request end, never the export end', async () => {
  await using(true, async (s) => {
    const base = 50 * MIB;
    for (let i = 0; i < 8; i += 3) await s.write(base + i * 65536 + 7, pattern(70_000, i + 9));
    for (const [offset, length] of [
      [base, 1],
      [base, 1 * MIB],
      [base + 100, 300_000],
      [base - MIB, 3 * MIB],
      [MEM - 8192, 8192],
      [MEM - 100, 100],
      [0, MEM],
    ]) {
      const chunks = await s.blockStatus(offset, length);
      assert.equal(chunks.length, 1);
      const ex = chunks[0]!.extents;
      assert.ok(ex.length >= 1, 'at least one extent');
      const sumButLast = ex.slice(0, -1).reduce((a, e) => a + e.length, 0);
      const sum = sumButLast + ex.at(-1)!.length;
      assert.ok(
        sumButLast < length,
        `the first N-1 extents (${sumButLast}) MUST end before the request end (${length})`,
      );
      assert.ok(
        offset + sum <= MEM,
        `extents of ${offset}+${length} run ${offset + sum - MEM} bytes past the export end`,
      );
      // Every extent claiming ZERO must read back as zeros; written data must not claim it.
      let at = offset;
      for (const e of ex) {
        const len = Math.min(e.length, 2 * MIB);
        const data = await s.read(at, len);
        if (e.flags & STATE_ZERO)
          assert.ok(
            data.every((b) => b === 0),
            `extent at ${at} claims ZERO but has data`,
          );
        if (e.flags & ~(STATE_HOLE | STATE_ZERO))
          assert.fail(`reserved base:allocation bits set: ${e.flags}`);
        at += e.length;
      }
    }
  });
});

test('BLOCK_STATUS of zero length gets a reply, not a disconnect', async () => {
  await using(true, async (s) => {
    for (const flags of [0, CMDF.REQ_ONE]) {
      const r = await s.request({ type: CMD.BLOCK_STATUS, offset: 4096, length: 0, flags });
      if (r.error === 0) assert.equal(r.blockStatus.length, 1);
    }
    await s.read(0, 512);
  });
});

test('BLOCK_STATUS after WRITE_ZEROES and TRIM stays consistent with the data', async () => {
  await using(true, async (s) => {
    const base = 54 * MIB;
    await s.write(base, pattern(MIB, 4));
    assert.equal(
      (await s.request({ type: CMD.WRITE_ZEROES, offset: base, length: 256 * 1024 })).error,
      0,
    );
    assert.equal(
      (await s.request({ type: CMD.TRIM, offset: base + 512 * 1024, length: 256 * 1024 })).error,
      0,
    );
    const [chunk] = await s.blockStatus(base, MIB);
    let at = base;
    for (const e of chunk!.extents) {
      if (at >= base + MIB) break;
      const len = Math.min(e.length, base + MIB - at);
      const data = await s.read(at, len);
      if (e.flags & STATE_ZERO)
        assert.ok(
          data.every((b) => b === 0),
          `extent at ${at} claims ZERO but has data`,
        );
      at += e.length;
    }
  });
});

test('multi-conn: with CAN_MULTI_CONN, a write acknowledged on one connection is seen by another', async () => {
  const a = await open(true);
  const b = await open(false);
  try {
    assert.ok(a.tflags & TF.CAN_MULTI_CONN);
    for (let i = 0; i < 20; i++) {
      const data = pattern(4096, 900 + i);
      await a.write(62 * MIB + i * 4096, data, CMDF.FUA);
      assert.equal((await a.request({ type: CMD.FLUSH })).error, 0);
      assert.ok((await b.read(62 * MIB + i * 4096, 4096)).equals(data));
    }
  } finally {
    a.close();
    b.close();
  }
});

test('CACHE: success on a valid range; unknown flags rejected since SEND_CACHE is advertised', async () => {
  await using(true, async (s) => {
    assert.ok(s.tflags & TF.SEND_CACHE);
    assert.equal((await s.request({ type: CMD.CACHE, offset: 0, length: MIB })).error, 0);
    await expectErrorThenRead(
      s,
      { type: CMD.CACHE, flags: 1 << 9, offset: 0, length: 4096 },
      ERR.EINVAL,
      'CACHE with unknown flag',
    );
  });
});

// ---------------------------------------------------------------------------------------------
// Framing violations and connection teardown.

for (const [what, magic] of [
  ['garbage', 0xdeadbeef],
  ['extended request magic without negotiation', EXTENDED_REQUEST_MAGIC],
  ['reply magic', SIMPLE_REPLY_MAGIC],
  ['off-by-one request magic', 0x25609514],
] as const) {
  test(`bad request magic (${what}): the server closes the connection`, async () => {
    for (const structured of MODES) {
      const s = await open(structured);
      try {
        s.conn.send(encodeRequest({ type: CMD.READ, offset: 0, length: 512, magic, cookie: 5n }));
        const rest = await s.conn.waitClosed();
        assert.equal(rest.length, 0, `no reply to a request with magic 0x${magic.toString(16)}`);
      } finally {
        s.close();
      }
    }
    await using(true, async (s) => void (await s.read(0, 512)));
  });
}

test('WRITE immediately followed by DISC in one write: the data is always there (200 rounds)', async () => {
  const verifier = await open(true);
  try {
    const base = 12 * MIB;
    for (let i = 0; i < 200; i++) {
      const structured = i % 2 === 1;
      const s = await negotiate(srv.socket, { structured, clientFlags: 3 });
      try {
        const data = pattern(4096, 10_000 + i);
        const cookie = 0xfeedface00000000n + BigInt(i);
        s.conn.send(
          Buffer.concat([
            encodeRequest({ type: CMD.WRITE, cookie, offset: base + i * 4096, data }),
            encodeRequest({ type: CMD.DISC, cookie: cookie + 1n }),
          ]),
        );
        const r = await s.reply(cookie, {
          type: CMD.WRITE,
          flags: 0,
          offset: BigInt(base + i * 4096),
          length: 4096,
        });
        assert.equal(r.error, 0, `round ${i}: the WRITE before DISC failed`);
        assert.equal(
          (await s.conn.waitClosed()).length,
          0,
          `round ${i}: bytes after the WRITE reply`,
        );
      } finally {
        s.close();
      }
      assert.ok(
        (await verifier.read(base + i * 4096, 4096)).equals(pattern(4096, 10_000 + i)),
        `round ${i}: data lost`,
      );
    }
  } finally {
    verifier.close();
  }
});

test('EOF right after a WRITE (no DISC): the write is still applied', async () => {
  const verifier = await open(false);
  try {
    const base = 13 * MIB;
    for (let i = 0; i < 40; i++) {
      const s = await open(i % 2 === 0);
      const data = pattern(8192, 20_000 + i);
      const off = base + i * 8192;
      try {
        s.conn.send(encodeRequest({ type: CMD.WRITE, cookie: 77n, offset: off, data }));
        if (i % 4 < 2) {
          // Half-close: the server should still answer, then close.
          s.conn.end();
          const r = await s.reply(77n, {
            type: CMD.WRITE,
            flags: 0,
            offset: BigInt(off),
            length: 8192,
          });
          assert.equal(r.error, 0);
          assert.equal((await s.conn.waitClosed()).length, 0);
        }
      } finally {
        // Hard close (without reading anything, every other round).
        s.close();
      }
      const deadline = Date.now() + 3000;
      for (;;) {
        const back = await verifier.read(off, 8192);
        if (back.equals(data)) break;
        assert.ok(Date.now() < deadline, `round ${i}: WRITE before EOF was never applied`);
        await new Promise((r) => setTimeout(r, 10));
      }
    }
  } finally {
    verifier.close();
  }
});

test('requests pipelined before a half-close (no DISC) are all answered and applied', async () => {
  for (const [round, structured] of [false, true, false, true].entries()) {
    const s = await open(structured);
    const base = 61 * MIB + round * 256 * 1024;
    try {
      // 64 KiB READs keep the server's send buffer full, so most requests are still queued
      // behind the in-flight limits when EOF arrives.
      const pending = new Map<bigint, Expectation>();
      const parts: Buffer[] = [];
      for (let i = 0; i < 300; i++) {
        const rc = BigInt(2 * i + 1);
        parts.push(encodeRequest({ type: CMD.READ, cookie: rc, offset: 0, length: 65536 }));
        pending.set(rc, { type: CMD.READ, flags: 0, offset: 0n, length: 65536 });
        const wc = BigInt(2 * i + 2);
        const data = pattern(512, 30_000 + round * 1000 + i);
        parts.push(encodeRequest({ type: CMD.WRITE, cookie: wc, offset: base + i * 512, data }));
        pending.set(wc, { type: CMD.WRITE, flags: 0, offset: BigInt(base + i * 512), length: 512 });
      }
      s.conn.send(Buffer.concat(parts));
      s.conn.end();
      const replies = await readReplies(s.conn, structured, pending, 10_000);
      assert.equal(replies.size, 600);
      for (const r of replies.values()) assert.equal(r.error, 0);
      assert.equal((await s.conn.waitClosed()).length, 0);
    } finally {
      s.close();
    }
    await using(false, async (v) => {
      for (let i = 0; i < 300; i++) {
        const want = pattern(512, 30_000 + round * 1000 + i);
        assert.ok(
          (await v.read(base + i * 512, 512)).equals(want),
          `round ${round}: WRITE ${i} sent before EOF was lost`,
        );
      }
    });
  }
});

test('a client that never reads its replies is throttled, then gets every reply intact', async () => {
  const s = await open(true);
  try {
    const pending = new Map<bigint, Expectation>();
    const parts: Buffer[] = [];
    const n = 3000;
    for (let i = 0; i < n; i++) {
      const cookie = BigInt(i + 1) << 8n;
      const offset = (i % 1000) * 32768;
      parts.push(encodeRequest({ type: CMD.READ, cookie, offset, length: 32768 }));
      pending.set(cookie, { type: CMD.READ, flags: 0, offset: BigInt(offset), length: 32768 });
    }
    s.conn.socket.pause();
    s.conn.send(Buffer.concat(parts)); // ~96 MiB of replies requested
    await new Promise((r) => setTimeout(r, 300));
    s.conn.socket.resume();
    const replies = await readReplies(s.conn, true, pending, 30_000);
    assert.equal(replies.size, n);
    for (const r of replies.values()) assert.equal(r.error, 0);
  } finally {
    s.close();
  }
});

// ---------------------------------------------------------------------------------------------
// The server, not the device, must enforce the BLOCK_STATUS rules: devices may report extents
// that run past the request (see src/core/device.ts).

/** A memory device whose blockStatus reports generously: past the request, up to the end. */
class GenerousDevice extends MemoryBackend {
  constructor(
    size: number,
    private readonly style: 'one-to-end' | 'fragmented',
  ) {
    super({ size });
  }

  override async blockStatus(offset: number, length: number): Promise<DeviceExtent[]> {
    const size = this.info().size;
    if (offset >= size || length === 0) return super.blockStatus(offset, length, 0);
    if (this.style === 'one-to-end') return [{ length: size - offset, state: 0 }];
    // 512-byte extents of alternating state covering twice the request (capped at the end).
    const out: DeviceExtent[] = [];
    const end = Math.min(size, offset + 2 * length + 512);
    for (let at = offset, i = 0; at < end && out.length < 5000; at += 512, i++) {
      out.push({ length: Math.min(512, end - at), state: i % 2 === 0 ? 0 : STATE_HOLE });
    }
    return out;
  }
}

test('BLOCK_STATUS rules hold even when the device reports past the request', async () => {
  const gsrv = await startTestServer([
    { name: 'wide', size: 8 * MIB + 100, device: new GenerousDevice(8 * MIB + 100, 'one-to-end') },
    { name: 'frag', size: 4 * MIB + 300, device: new GenerousDevice(4 * MIB + 300, 'fragmented') },
  ]);
  try {
    for (const name of ['wide', 'frag']) {
      const s = await negotiate(gsrv.socket, { structured: true, exportName: name, meta: [BASE] });
      try {
        const size = Number(s.size);
        for (const [offset, length] of [
          [0, 100],
          [0, 4096],
          [1000, 3000],
          [size - 1000, 600],
          [size - 600, 600],
          [size - 1, 1],
          [12345, 1 << 20],
        ]) {
          const [one] = await s.blockStatus(offset, length, CMDF.REQ_ONE);
          assert.equal(
            one!.extents.length,
            1,
            `${name} REQ_ONE ${offset}+${length}: exactly one extent`,
          );
          assert.ok(
            one!.extents[0]!.length <= length,
            `${name} REQ_ONE ${offset}+${length}: extent ${one!.extents[0]!.length} > request`,
          );
          const [all] = await s.blockStatus(offset, length);
          const ex = all!.extents;
          const sumButLast = ex.slice(0, -1).reduce((a, e) => a + e.length, 0);
          const sum = sumButLast + ex.at(-1)!.length;
          assert.ok(
            sumButLast < length,
            `${name} ${offset}+${length}: the first N-1 extents reach the request end`,
          );
          assert.ok(
            offset + sum <= size,
            `${name} ${offset}+${length}: extents run past the export end`,
          );
          assert.ok(sum >= 1);
        }
      } finally {
        s.close();
      }
    }
  } finally {
    await gsrv.close();
  }
});

// ---------------------------------------------------------------------------------------------
// Device failures: the wire carries protocol error values (never host errno numbers), READ
// errors never come with data, and the connection stays usable.

const hostError = (code: string): Error => Object.assign(new Error(`host says ${code}`), { code });

/** Fails every request that touches [1 MiB, 2 MiB), in a different way per command. */
class FaultyDevice extends MemoryBackend {
  constructor() {
    super({ size: 4 * MIB });
  }

  private bad(offset: number, length: number): boolean {
    return offset < 2 * MIB && offset + Math.max(length, 1) > MIB;
  }

  override async read(buf: Buffer, offset: number, flags: number): Promise<void> {
    if (this.bad(offset, buf.length)) {
      buf.fill(0xee); // garbage that must never reach the client
      throw new DeviceError('EIO', 'media error');
    }
    return super.read(buf, offset, flags);
  }

  override async write(data: Buffer, offset: number, flags: number): Promise<void> {
    if (this.bad(offset, data.length)) throw hostError('EDQUOT');
    return super.write(data, offset, flags);
  }

  override async trim(offset: number, length: number, flags: number): Promise<void> {
    if (this.bad(offset, length)) throw hostError('EROFS');
    return super.trim(offset, length, flags);
  }

  override async writeZeroes(offset: number, length: number, flags: number): Promise<void> {
    if (this.bad(offset, length)) throw hostError('ENOENT');
    return super.writeZeroes(offset, length, flags);
  }

  override async blockStatus(
    offset: number,
    length: number,
    flags: number,
  ): Promise<DeviceExtent[]> {
    if (this.bad(offset, length)) throw new TypeError('a bug in some filter');
    return super.blockStatus(offset, length, flags);
  }
}

test('device errors become protocol error values, never host errnos or data', async () => {
  const fsrv = await startTestServer([
    { name: 'faulty', size: 4 * MIB, device: new FaultyDevice() },
  ]);
  try {
    for (const structured of MODES) {
      const s = await negotiate(fsrv.socket, {
        structured,
        exportName: 'faulty',
        meta: structured ? [BASE] : undefined,
      });
      try {
        const at = MIB + 4096;
        // EIO from the device; with simple replies no payload may follow the error header.
        await expectErrorThenRead(
          s,
          { type: CMD.READ, offset: at, length: 65536 },
          ERR.EIO,
          'failing READ',
        );
        await expectErrorThenRead(
          s,
          { type: CMD.READ, offset: MIB - 512, length: 1024 },
          ERR.EIO,
          'READ straddling the bad range',
        );
        // Host codes are folded onto protocol values: EDQUOT → ENOSPC, EROFS → EPERM, others → EIO.
        await expectErrorThenRead(
          s,
          { type: CMD.WRITE, offset: at, data: trap(4096) },
          ERR.ENOSPC,
          'WRITE failing with EDQUOT',
        );
        await expectErrorThenRead(
          s,
          { type: CMD.TRIM, offset: at, length: 4096 },
          ERR.EPERM,
          'TRIM failing with EROFS',
        );
        await expectErrorThenRead(
          s,
          { type: CMD.WRITE_ZEROES, offset: at, length: 4096 },
          ERR.EIO,
          'WRITE_ZEROES failing with ENOENT',
        );
        if (structured) {
          await expectErrorThenRead(
            s,
            { type: CMD.BLOCK_STATUS, offset: at, length: 4096 },
            ERR.EIO,
            'BLOCK_STATUS throwing TypeError',
          );
        }
        // Outside the bad range everything works.
        await s.write(3 * MIB, pattern(4096, 1));
        assert.ok((await s.read(3 * MIB, 4096)).equals(pattern(4096, 1)));
      } finally {
        s.close();
      }
    }
  } finally {
    await fsrv.close();
  }
});

for (const structured of MODES) {
  test(`unaligned large READs and WRITEs (1 MiB + 8, 2 MiB + 16 at odd offsets) (${mode(structured)})`, async () => {
    await using(structured, async (s) => {
      const base = 40 * MIB + 3;
      const data = pattern(2 * MIB + 16, 61);
      await s.write(base, data);
      assert.ok((await s.read(base, 2 * MIB + 16)).equals(data));
      assert.ok((await s.read(base + 5, MIB + 8)).equals(data.subarray(5, 5 + MIB + 8)));
    });
  });
}

test('server shutdown: in-flight requests are answered, every reply well-formed, then the server closes', async () => {
  for (const structured of MODES) {
    const ssrv = await startTestServer([{ name: 'mem', size: 16 * MIB }]);
    const s = await negotiate(ssrv.socket, { structured });
    try {
      const pending = new Map<bigint, Expectation>();
      const parts: Buffer[] = [];
      for (let i = 0; i < 200; i++) {
        const cookie = BigInt(i + 1);
        const spec: RequestSpec =
          i % 2 === 0
            ? { type: CMD.WRITE, offset: i * 4096, data: pattern(4096, i) }
            : { type: CMD.READ, offset: i * 4096, length: 65536 };
        parts.push(encodeRequest({ ...spec, cookie }));
        pending.set(cookie, {
          type: spec.type,
          flags: 0,
          offset: BigInt(spec.offset!),
          length: spec.length ?? 4096,
        });
      }
      s.conn.send(Buffer.concat(parts));
      await s.conn.idle(5); // let the server start on them
      const closing = ssrv.close();
      const replies = await readReplies(s.conn, structured, pending, 10_000, true);
      for (const r of replies.values()) {
        assert.ok(
          r.error === 0 || r.error === ERR.ESHUTDOWN,
          `reply during shutdown: ${errName(r.error)}`,
        );
      }
      assert.ok(replies.size > 0, 'requests already being served are answered');
      assert.equal((await s.conn.waitClosed()).length, 0, 'the server closes after the last reply');
      await closing;
    } finally {
      s.close();
    }
  }
});
