/**
 * How the server takes requests off the socket: headers and small payloads land in one
 * receive buffer per connection that the next read overwrites, large payloads are read
 * straight into their own buffer (src/nbd/user-buffer-socket.ts). Requests arrive here cut at
 * every possible place, and the device holds each payload across later reads, so a payload
 * left pointing into the receive buffer would be overwritten before it is written.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { MemoryBackend } from '../../src/backends/memory.js';
import { startTestServer, type TestServer } from '../helpers/server.js';
import {
  CMD,
  encodeRequest,
  errName,
  type Expectation,
  MIB,
  negotiate,
  pattern,
  readReplies,
} from './raw.js';

/** Writes only after the next turns of the event loop, while later bytes keep arriving. */
class LateWriter extends MemoryBackend {
  override async write(data: Buffer, offset: number, flags: number): Promise<void> {
    await sleep(2);
    return super.write(data, offset, flags);
  }
}

const SIZE = 32 * MIB;
let srv: TestServer;

before(async () => {
  srv = await startTestServer([{ name: 'late', device: new LateWriter({ size: SIZE }) }]);
});

after(async () => {
  await srv.close();
});

/** A small deterministic generator, so that a failure can be replayed. */
function randomFrom(seed: number): (n: number) => number {
  let x = seed >>> 0 || 1;
  return (n) => {
    x = (Math.imul(x, 1103515245) + 12345) >>> 0;
    return x % n;
  };
}

// Around the receive buffer (64 KiB) and the size from which payloads are read in place
// (16 KiB), plus tiny, odd and large ones.
const SIZES = [1, 7, 511, 4096, 16383, 16384, 16385, 65535, 65536, 65537, 200_001, MIB + 7];

for (const [label, seed, maxPiece] of [
  ['in pieces of up to 64 bytes', 1, 64],
  ['in pieces of up to 300 KiB', 2, 300 * 1024],
  ['in pieces of 1 to 9 bytes', 3, 9],
] as const) {
  test(`writes of every size, sent ${label}, held by the device across later reads: every byte lands`, async () => {
    const s = await negotiate(srv.socket, { structured: false, exportName: 'late' });
    try {
      const random = randomFrom(seed);
      const writes: Array<{ offset: number; data: Buffer }> = [];
      const wire: Buffer[] = [];
      const pending = new Map<bigint, Expectation>();
      let offset = 3;
      // One byte at a time moves slowly: then fewer, smaller writes.
      const sizes = maxPiece < 16 ? SIZES.filter((n) => n <= 65537) : SIZES;
      for (let round = 0; round < 3; round++) {
        for (const size of sizes) {
          const data = pattern(size, seed * 1000 + writes.length);
          const cookie = BigInt(writes.length + 1);
          writes.push({ offset, data });
          wire.push(encodeRequest({ type: CMD.WRITE, cookie, offset, data }));
          pending.set(cookie, { type: CMD.WRITE, flags: 0, offset: BigInt(offset), length: size });
          offset += size + random(4096);
        }
      }
      assert.ok(offset < SIZE, 'the writes fit the export');
      const all = Buffer.concat(wire);
      for (let at = 0; at < all.length;) {
        const piece = 1 + random(maxPiece);
        s.conn.send(all.subarray(at, at + piece));
        at += piece;
        // Let the server read what came so far: the next piece arrives in a later read.
        if (random(4) === 0) await sleep(0);
      }
      const replies = await readReplies(s.conn, false, pending, 60_000);
      for (const [cookie, r] of replies)
        assert.equal(r.error, 0, `write ${cookie}: ${errName(r.error)}`);
      for (const [i, w] of writes.entries()) {
        const back = await s.read(w.offset, w.data.length);
        assert.ok(
          back.equals(w.data),
          `write ${i} (${w.data.length} bytes at ${w.offset}) read back intact`,
        );
      }
    } finally {
      s.close();
    }
  });
}

test('a write whose payload is still arriving is finished after the client half-closes', async () => {
  const s = await negotiate(srv.socket, { structured: false, exportName: 'late' });
  const data = pattern(MIB, 77);
  const request = encodeRequest({ type: CMD.WRITE, cookie: 9n, offset: 5 * MIB, data });
  // Header and most of the payload, a pause, then the rest together with EOF.
  s.conn.send(request.subarray(0, 700_000));
  await sleep(20);
  s.conn.send(request.subarray(700_000));
  s.conn.end();
  const replies = await readReplies(
    s.conn,
    false,
    new Map([[9n, { type: CMD.WRITE, flags: 0, offset: BigInt(5 * MIB), length: MIB }]]),
  );
  assert.equal(replies.get(9n)!.error, 0);
  s.close();
  const check = await negotiate(srv.socket, { structured: false, exportName: 'late' });
  try {
    assert.ok((await check.read(5 * MIB, MIB)).equals(data));
  } finally {
    check.close();
  }
});

test('a request header cut across reads, the next read larger than what came before it', async () => {
  const s = await negotiate(srv.socket, { structured: false, exportName: 'late' });
  try {
    for (const cut of [1, 10, 27]) {
      const data = pattern(100_000, cut);
      const offset = cut * MIB;
      const a = encodeRequest({ type: CMD.WRITE, cookie: 1n, offset, data });
      // The start of a header arrives alone; what follows overwrites the start of the
      // receive buffer, where a copy of those first bytes must not be.
      s.conn.send(a.subarray(0, cut));
      await sleep(20);
      s.conn.send(a.subarray(cut));
      const replies = await readReplies(
        s.conn,
        false,
        new Map<bigint, Expectation>([
          [1n, { type: CMD.WRITE, flags: 0, offset: BigInt(offset), length: data.length }],
        ]),
      );
      assert.equal(replies.get(1n)!.error, 0);
      assert.ok((await s.read(offset, data.length)).equals(data), `cut after ${cut}: read back`);
    }
  } finally {
    s.close();
  }
});
