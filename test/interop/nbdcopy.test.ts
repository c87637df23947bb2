/**
 * nbdcopy (libnbd) into and out of `devfilter serve`, with several connections (multi-conn)
 * and with the default, over a 64 MiB random image with holes and zero runs in it.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import type { DaemonProcess } from '../helpers/server.js';
import { tempDir } from '../helpers/server.js';
import { describeResult, requireNbdsh, run, runOk } from '../helpers/run.js';
import { requireTools } from '../helpers/tools.js';
import {
  MIB,
  allocatedBytes,
  assertCovers,
  makeSparseSource,
  overlapping,
  parseNbdinfoMap,
  sha256File,
  withDaemon,
  type SparseSource,
} from './fixtures.js';

const SIZE = 64 * MIB;

let dir: { path: string; cleanup: () => void };
let src: SparseSource;
before(() => {
  dir = tempDir('devfilter-interop-nbdcopy-');
  src = makeSparseSource(join(dir.path, 'source.img'), SIZE);
});
after(() => dir.cleanup());

/** Number of connections the daemon logged while `fn` ran. */
async function countConnections(d: DaemonProcess, fn: () => Promise<unknown>): Promise<number> {
  const before = d.stderr().length;
  await fn();
  // Log lines travel through a pipe: give the last ones a moment to arrive.
  await new Promise((r) => setTimeout(r, 200));
  return d
    .stderr()
    .slice(before)
    .split('\n')
    .filter((l) => l.includes('"msg":"client connected"')).length;
}

function nbdcopy(...args: string[]): Promise<unknown> {
  return runOk('nbdcopy', args, { timeoutMs: 60_000 });
}

describe('nbdcopy', () => {
  // nbdcopy uses one connection per thread, and defaults to one thread per core.
  it('copies in and out with --connections=4 (multi-conn), preserving holes', async (t) => {
    if (!requireTools(t, 'nbdcopy', 'nbdinfo')) return;
    const image = join(dir.path, 'multi.img');
    const out = join(dir.path, 'multi-out.img');
    await withDaemon(['--export', `disk=file:${image},create=64M`], async (d) => {
      const inConns = await countConnections(d, () =>
        nbdcopy('--connections=4', '--threads=4', src.path, d.uri('disk')),
      );
      assert.ok(
        inConns >= 4,
        `nbdcopy --connections=4 opened ${inConns} connections (CAN_MULTI_CONN should allow 4)`,
      );
      assert.equal(
        sha256File(image),
        src.sha256,
        "devfilter's file equals the source after nbdcopy in",
      );

      const outConns = await countConnections(d, () =>
        nbdcopy('--connections=4', '--threads=4', d.uri('disk'), out),
      );
      assert.ok(
        outConns >= 4,
        `nbdcopy --connections=4 (export → file) opened ${outConns} connections`,
      );
      assert.equal(fs.statSync(out).size, SIZE);
      assert.equal(sha256File(out), src.sha256, 'copied back out, equal to the source');

      // Holes and written zeros in the source became zero extents in the export (nbdcopy sends
      // zero requests for them), and the file stayed sparse.
      const map = parseNbdinfoMap(
        (await runOk('nbdinfo', ['--map', d.uri('disk')], { timeoutMs: 20_000 })).stdout,
      );
      assertCovers(map, SIZE, 'map after nbdcopy');
      for (const r of [...src.holes, ...src.zeroData]) {
        for (const e of overlapping(map, r)) {
          assert.ok(
            (e.type & 2) !== 0,
            `range ${r.offset}+${r.length} should read as zero: extent ${JSON.stringify(e)}`,
          );
        }
      }
      for (const r of src.data) {
        for (const e of overlapping(map, r)) {
          assert.equal(
            e.type & 2,
            0,
            `data at ${r.offset}+${r.length} reported as zero: ${JSON.stringify(e)}`,
          );
        }
      }
      const dataBytes = src.data.reduce((n, r) => n + r.length, 0);
      t.diagnostic(
        `allocated: source ${allocatedBytes(src.path)}, export file ${allocatedBytes(image)}, data ${dataBytes}`,
      );
      assert.ok(
        allocatedBytes(image) < SIZE - 8 * MIB,
        `export file should stay sparse: ${allocatedBytes(image)} bytes allocated`,
      );
    });
  });

  it('copies in and out with the default connections, over existing data, and with --flush', async (t) => {
    if (!requireTools(t, 'nbdcopy')) return;
    const full = join(dir.path, 'full.img');
    fs.writeFileSync(full, Buffer.alloc(SIZE, 0xff));
    const image = join(dir.path, 'flush.img');
    const out = join(dir.path, 'default-out.img');
    const out2 = join(dir.path, 'flush-out.img');
    await withDaemon(
      ['--export', 'mem=memory:64M', '--export', `disk=file:${image},create=64M`],
      async (d) => {
        // Fill the memory export with 0xff first, so that the holes in the source must be zeroed.
        await nbdcopy(full, d.uri('mem'));
        await nbdcopy(src.path, d.uri('mem'));
        await nbdcopy(d.uri('mem'), out);
        assert.equal(
          sha256File(out),
          src.sha256,
          'memory export copied out equals the source (holes zeroed over 0xff)',
        );

        // --flush, and export to export inside the same daemon.
        await nbdcopy('--flush', d.uri('mem'), d.uri('disk'));
        assert.equal(
          sha256File(image),
          src.sha256,
          "devfilter's file after nbdcopy --flush mem → disk",
        );
        await nbdcopy('--flush', '--connections=4', d.uri('disk'), out2);
        assert.equal(sha256File(out2), src.sha256);
        assert.ok(d.stderr().includes('"conn"'), 'daemon logged the connections');
      },
    );
  });
});

describe('multi-conn', () => {
  it('writes on four connections, a flush on one, reads on others all agree (nbdsh)', async (t) => {
    const env = requireNbdsh(t);
    if (env === undefined) return;
    const image = join(dir.path, 'multiconn.img');
    await withDaemon(['--export', `disk=file:${image},create=16M`], async (d) => {
      const script = `
import hashlib, os, nbd
uri = ${JSON.stringify(d.uri('disk'))}
hs = []
for i in range(4):
    h = nbd.NBD()
    h.connect_uri(uri)
    assert h.can_multi_conn(), "CAN_MULTI_CONN"
    hs.append(h)
size = hs[0].get_size()
expected = bytearray(size)
bs = 65536
keep = []
# Writes spread over the four connections, all in flight together.
for n in range(size // bs):
    if n % 7 == 3:
        continue  # leave some blocks unwritten (zeros)
    data = os.urandom(bs)
    expected[n * bs:(n + 1) * bs] = data
    buf = nbd.Buffer.from_bytearray(bytearray(data))
    keep.append(buf)
    hs[n % 4].aio_pwrite(buf, n * bs)
for h in hs:
    while h.aio_in_flight() > 0:
        h.poll(-1)
# A write completed on one connection is visible on another at once.
hs[1].pwrite(b"\\xee" * 4096, 12345)
expected[12345:12345 + 4096] = b"\\xee" * 4096
assert hs[2].pread(4096, 12345) == b"\\xee" * 4096, "write on conn 1 not visible on conn 2"
# One flush, on the connection that wrote least.
hs[3].flush()
got = bytearray()
for off in range(0, size, 4 * 1024 * 1024):
    got += hs[off // (4 * 1024 * 1024) % 4].pread(4 * 1024 * 1024, off)
assert got == expected, "read back through the four connections differs"
for h in hs:
    h.shutdown()
print("sha256", hashlib.sha256(expected).hexdigest())
`;
      const r = await run('nbdsh', ['-c', script], { env, timeoutMs: 60_000 });
      assert.equal(r.code, 0, describeResult('nbdsh', ['-c', '<script>'], r));
      const m = /^sha256 ([0-9a-f]{64})$/m.exec(r.stdout);
      assert.ok(m, r.stdout);
      assert.equal(
        sha256File(image),
        m[1],
        "devfilter's file equals what the four connections wrote",
      );
      const conns = d
        .stderr()
        .split('\n')
        .filter((l) => l.includes('"msg":"export opened"')).length;
      assert.equal(conns, 4);
    });
  });
});
