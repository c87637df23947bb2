/**
 * Robustness: seeded random garbage thrown at the handshake and at the transmission phase,
 * and clients vanishing in the middle of large replies, while another connection keeps doing
 * verified I/O. The server (in this process) must never crash, must keep serving, and must
 * release every abandoned connection (checklist §2.3 "Termination", edge cases 16 and 17).
 *
 * The seed is printed as a test diagnostic; rerun a failure with NBD_FUZZ_SEED=<seed>.
 */
import assert from 'node:assert/strict';
import { after, before, test, type TestContext } from 'node:test';
import { startTestServer, type TestServer } from '../helpers/server.js';
import {
  C_FIXED_NEWSTYLE,
  C_NO_ZEROES,
  CMD,
  encodeRequest,
  type Expectation,
  IHAVEOPT,
  infoRequestData,
  metaContextData,
  MIB,
  negotiate,
  OPT,
  optionRequest,
  pattern,
  prng,
  RawConn,
  randomBytes,
  readReplies,
  REQUEST_MAGIC,
  u32,
  Verifier,
} from './raw.js';

const MEM = 64 * MIB;
/** Cases per phase: 50 in CI; NBD_FUZZ_CASES=N for a longer run on demand. */
const CASES = Number(process.env.NBD_FUZZ_CASES ?? 50);
const BASE_SEED =
  process.env.NBD_FUZZ_SEED !== undefined
    ? Number(process.env.NBD_FUZZ_SEED)
    : Date.now() % 2 ** 31;

let srv: TestServer;

before(async () => {
  srv = await startTestServer([
    { name: 'mem', size: MEM },
    { name: 'small', size: 1000 },
  ]);
});

after(async () => {
  await srv.close();
});

async function waitForConnectionCount(n: number, timeoutMs = 8000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (srv.server.connectionCount !== n) {
    if (Date.now() > deadline) {
      assert.fail(`server still holds ${srv.server.connectionCount} connections, expected ${n}`);
    }
    await new Promise((r) => setTimeout(r, 20));
  }
}

async function assertServerServes(): Promise<void> {
  for (const structured of [false, true]) {
    const s = await negotiate(srv.socket, { structured });
    try {
      const data = pattern(65536, structured ? 2 : 1);
      await s.write(MEM - 65536, data);
      assert.ok((await s.read(MEM - 65536, 65536)).equals(data));
      assert.equal((await s.disconnect()).length, 0);
    } finally {
      s.close();
    }
  }
}

/**
 * Runs `fn` with the seed in every failure message. Cases run concurrently, so each case gets
 * its own generator (derived from the seed and the case number) to stay reproducible.
 */
async function seeded(
  t: TestContext,
  seed: number,
  fn: (caseRand: (i: number) => () => number) => Promise<void>,
): Promise<void> {
  t.diagnostic(`seed ${seed} (rerun with NBD_FUZZ_SEED=${seed})`);
  try {
    await fn((i) => prng((seed + Math.imul(i + 1, 0x9e3779b9)) >>> 0));
  } catch (err) {
    const msg = err instanceof Error ? err.message : String(err);
    throw new Error(`[NBD_FUZZ_SEED=${seed}] ${msg}`, { cause: err });
  }
}

const pick = <T>(rand: () => number, items: readonly T[]): T =>
  items[Math.floor(rand() * items.length)]!;
const int = (rand: () => number, max: number): number => Math.floor(rand() * max);

/** Lets the server react for a moment (reading whatever it says), then hangs up abruptly. */
async function linger(conn: RawConn, rand: () => number): Promise<void> {
  await conn.idle(int(rand, 40));
  if (rand() < 0.5) conn.destroy();
  else {
    conn.end();
    await conn.idle(10);
    conn.destroy();
  }
}

/** A random but plausibly framed option request (IHAVEOPT magic, consistent length). */
function randomOption(rand: () => number): Buffer {
  const opt = rand() < 0.8 ? 1 + int(rand, 11) : Math.floor(rand() * 2 ** 32);
  let data: Buffer;
  switch (opt) {
    case OPT.INFO:
    case OPT.GO:
      data =
        rand() < 0.5
          ? infoRequestData(
              pick(rand, ['mem', 'small', '', 'nope', 'é中']),
              Array.from({ length: int(rand, 5) }, () => int(rand, 8)),
            )
          : Buffer.concat([u32(Math.floor(rand() * 2 ** 32)), randomBytes(rand, int(rand, 64))]);
      break;
    case OPT.LIST_META_CONTEXT:
    case OPT.SET_META_CONTEXT:
      data =
        rand() < 0.5
          ? metaContextData(
              pick(rand, ['mem', 'small', 'nope']),
              Array.from({ length: int(rand, 4) }, () =>
                pick(rand, ['base:', 'base:allocation', 'x:', 'qemu:x', '']),
              ),
            )
          : Buffer.concat([u32(int(rand, 16)), randomBytes(rand, int(rand, 64))]);
      break;
    case OPT.EXPORT_NAME:
      data = Buffer.from(pick(rand, ['mem', 'nope', '']));
      break;
    default:
      data = randomBytes(rand, rand() < 0.9 ? int(rand, 64) : int(rand, 70_000));
  }
  return optionRequest(opt, data);
}

test(
  `${CASES} random garbage inputs at the handshake: no crash, other clients unaffected`,
  { timeout: 120_000 },
  async (t) => {
    await seeded(t, BASE_SEED, async (caseRand) => {
      await waitForConnectionCount(0);
      const verifierSession = await negotiate(srv.socket, { structured: true });
      const v = new Verifier(verifierSession, 32 * MIB);
      const baseline = 1;
      try {
        for (let batch = 0; batch < CASES; batch += 10) {
          await Promise.all(
            Array.from({ length: Math.min(10, CASES - batch) }, async (_, k) => {
              const rand = caseRand(batch + k);
              const kind = int(rand, 5);
              const conn = await RawConn.open(srv.socket);
              try {
                let bytes: Buffer;
                const cflags = u32(rand() < 0.8 ? C_FIXED_NEWSTYLE | C_NO_ZEROES : int(rand, 4));
                if (kind === 0) bytes = randomBytes(rand, 1 + int(rand, 2048));
                else if (kind === 1)
                  bytes = Buffer.concat([cflags, randomBytes(rand, 1 + int(rand, 2048))]);
                else if (kind === 2) {
                  const magic = Buffer.alloc(8);
                  magic.writeBigUInt64BE(IHAVEOPT);
                  bytes = Buffer.concat([cflags, magic, randomBytes(rand, 8 + int(rand, 512))]);
                } else {
                  const opts = Array.from({ length: 1 + int(rand, 6) }, () => randomOption(rand));
                  bytes = Buffer.concat([cflags, ...opts]);
                  if (kind === 4) bytes = bytes.subarray(0, 4 + int(rand, bytes.length - 4));
                }
                // Sometimes in pieces, sometimes all at once.
                if (rand() < 0.3) {
                  for (let pos = 0; pos < bytes.length;) {
                    const n = 1 + int(rand, 64);
                    conn.send(bytes.subarray(pos, pos + n));
                    pos += n;
                    await new Promise((r) => setImmediate(r));
                  }
                } else conn.send(bytes);
                await linger(conn, rand);
              } finally {
                conn.destroy();
              }
            }),
          );
        }
        await waitForConnectionCount(baseline);
      } finally {
        const ops = await v.stop().finally(() => verifierSession.close());
        assert.ok(ops > 0, 'the verifier made progress');
      }
      await assertServerServes();
    });
  },
);

/** A request with random fields but a valid magic; WRITE carries `length` payload bytes. */
function randomRequest(
  rand: () => number,
  wellFramed: boolean,
): { bytes: Buffer; type: number; offset: bigint; length: number; flags: number } {
  let type = rand() < 0.85 ? int(rand, 9) : int(rand, 0x10000);
  if (wellFramed && type === CMD.DISC) type = CMD.READ;
  const flags = rand() < 0.6 ? 0 : rand() < 0.5 ? 1 << int(rand, 16) : int(rand, 0x10000);
  const offset = pick(rand, [
    0n,
    BigInt(int(rand, MEM)),
    BigInt(MEM - int(rand, 8192)),
    BigInt(MEM),
    BigInt.asUintN(
      64,
      (BigInt(Math.floor(rand() * 2 ** 32)) << 32n) | BigInt(Math.floor(rand() * 2 ** 32)),
    ),
    (1n << 64n) - 1n,
  ]);
  const length = wellFramed
    ? pick(rand, [0, 1, 512, int(rand, 65536), int(rand, 4096)])
    : pick(rand, [0, 1, 512, int(rand, 65536), Math.floor(rand() * 2 ** 32)]);
  const data =
    type === CMD.WRITE
      ? randomBytes(rand, wellFramed ? length : Math.min(length, int(rand, 70_000)))
      : undefined;
  const bytes = encodeRequest({
    type,
    flags,
    offset,
    length,
    data,
    cookie: BigInt(int(rand, 2 ** 30)),
  });
  return { bytes, type, offset, length, flags };
}

test(
  `${CASES} random garbage inputs in transmission: no crash, other clients unaffected`,
  { timeout: 120_000 },
  async (t) => {
    await seeded(t, BASE_SEED + 1, async (caseRand) => {
      await waitForConnectionCount(0);
      const verifierSession = await negotiate(srv.socket, { structured: false });
      const v = new Verifier(verifierSession, 33 * MIB);
      const baseline = 1;
      try {
        for (let batch = 0; batch < CASES; batch += 10) {
          await Promise.all(
            Array.from({ length: Math.min(10, CASES - batch) }, async (_, k) => {
              const rand = caseRand(batch + k);
              const structured = rand() < 0.5;
              const s = await negotiate(srv.socket, {
                structured,
                exportName: pick(rand, ['mem', 'small']),
                meta: structured && rand() < 0.7 ? ['base:allocation'] : undefined,
              });
              try {
                const kind = int(rand, 4);
                if (kind === 3) {
                  // Well-framed requests with random fields: each one MUST get a well-formed
                  // reply (error or not), matched by cookie, and the connection stays usable.
                  const pending = new Map<bigint, Expectation>();
                  const parts: Buffer[] = [];
                  for (let i = 0; i < 1 + int(rand, 30); i++) {
                    const r = randomRequest(rand, true);
                    const cookie = BigInt(i) | 0xf000000000000000n;
                    const framed = encodeRequest({
                      type: r.type,
                      flags: r.flags,
                      offset: r.offset,
                      length: r.length,
                      cookie,
                    });
                    parts.push(
                      r.type === CMD.WRITE ? Buffer.concat([framed, r.bytes.subarray(28)]) : framed,
                    );
                    pending.set(cookie, {
                      type: r.type,
                      flags: r.flags,
                      offset: r.offset,
                      length: r.length,
                    });
                  }
                  s.conn.send(Buffer.concat(parts));
                  await readReplies(s.conn, structured, pending, 10_000);
                  await s.read(0, 512);
                } else {
                  let bytes: Buffer;
                  if (kind === 0) bytes = randomBytes(rand, 1 + int(rand, 4096));
                  else if (kind === 1) {
                    bytes = Buffer.concat(
                      Array.from(
                        { length: 1 + int(rand, 8) },
                        () => randomRequest(rand, false).bytes,
                      ),
                    );
                  } else {
                    const good = Array.from({ length: int(rand, 8) }, (_, i) =>
                      encodeRequest({
                        type: CMD.READ,
                        offset: i * 512,
                        length: 512,
                        cookie: BigInt(i),
                      }),
                    );
                    const bad = randomBytes(rand, 28);
                    if (rand() < 0.5)
                      bad.writeUInt32BE((REQUEST_MAGIC ^ (1 << int(rand, 32))) >>> 0, 0);
                    bytes = Buffer.concat([...good, bad, randomBytes(rand, int(rand, 256))]);
                  }
                  s.conn.send(bytes);
                  await linger(s.conn, rand);
                }
              } finally {
                s.close();
              }
            }),
          );
        }
        await waitForConnectionCount(baseline);
      } finally {
        const ops = await v.stop().finally(() => verifierSession.close());
        assert.ok(ops > 0, 'the verifier made progress');
      }
      await assertServerServes();
    });
  },
);

test(
  'clients vanishing in the middle of 32 MiB replies do not hurt the server',
  { timeout: 60_000 },
  async () => {
    await waitForConnectionCount(0);
    const verifierSession = await negotiate(srv.socket, { structured: true });
    const v = new Verifier(verifierSession, 34 * MIB);
    const baseline = 1;
    try {
      await Promise.all(
        Array.from({ length: 12 }, async (_, i) => {
          const s = await negotiate(srv.socket, { structured: i % 2 === 0 });
          const parts = Array.from({ length: 4 }, (_, k) =>
            encodeRequest({ type: CMD.READ, cookie: BigInt(k), offset: 0, length: 32 * MIB }),
          );
          if (i % 3 === 0)
            parts.push(
              encodeRequest({ type: CMD.WRITE, cookie: 9n, offset: 0, length: 1 << 20 }).subarray(
                0,
                20,
              ),
            );
          s.conn.send(Buffer.concat(parts));
          if (i % 4 === 0) s.conn.end(); // half-close: the server still tries to answer
          await s.conn.read(1 + i * 100_000).catch(() => undefined);
          s.close();
        }),
      );
      await waitForConnectionCount(baseline);
    } finally {
      const ops = await v.stop().finally(() => verifierSession.close());
      assert.ok(ops > 0, 'the verifier made progress');
    }
    await assertServerServes();
  },
);

test(
  '200 connections opened and abandoned at random points of the handshake',
  { timeout: 60_000 },
  async (t) => {
    await seeded(t, BASE_SEED + 2, async (caseRand) => {
      await waitForConnectionCount(0);
      const baseline = 0;
      await Promise.all(
        Array.from({ length: 200 }, async (_, i) => {
          const rand = caseRand(i);
          const conn = await RawConn.open(srv.socket);
          const full = Buffer.concat([
            u32(C_FIXED_NEWSTYLE | C_NO_ZEROES),
            optionRequest(OPT.STRUCTURED_REPLY),
            optionRequest(OPT.SET_META_CONTEXT, metaContextData('mem', ['base:allocation'])),
            optionRequest(OPT.GO, infoRequestData('mem')),
            encodeRequest({ type: CMD.READ, offset: 0, length: 65536, cookie: 1n }),
          ]);
          conn.send(full.subarray(0, int(rand, full.length + 1)));
          await linger(conn, rand);
        }),
      );
      await waitForConnectionCount(baseline);
      await assertServerServes();
    });
  },
);
