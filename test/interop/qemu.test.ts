/**
 * QEMU's NBD client (qemu-img, qemu-io, qemu-nbd 7.2) against `devfilter serve`.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { tempDir } from '../helpers/server.js';
import { background, describeResult, run, runOk, waitFor } from '../helpers/run.js';
import { requireTools } from '../helpers/tools.js';
import {
  KIB,
  MIB,
  assertCovers,
  makeSparseSource,
  overlapping,
  readRange,
  sha256File,
  withDaemon,
  type SparseSource,
} from './fixtures.js';

const SIZE = 16 * MIB;

let dir: { path: string; cleanup: () => void };
let src: SparseSource;
before(() => {
  dir = tempDir('devfilter-interop-qemu-');
  src = makeSparseSource(join(dir.path, 'source.img'), SIZE);
});
after(() => dir.cleanup());

interface QemuMapEntry {
  start: number;
  length: number;
  depth: number;
  present?: boolean;
  zero: boolean;
  data: boolean;
  offset?: number;
}

/** Things qemu-io prints when a command failed, even where its exit code would not tell. */
const QEMU_IO_FAILURE =
  /Pattern verification failed|failed|error|Error|Invalid|not supported|Operation not permitted/;

async function qemuIo(uri: string, commands: string[], extra: string[] = []): Promise<string> {
  // cache=none by default: qemu-io's own default (writethrough) puts FUA on every write.
  const cache = extra.includes('-t') ? [] : ['-t', 'none'];
  const args = ['-f', 'raw', ...cache, ...extra, ...commands.flatMap((c) => ['-c', c]), uri];
  const r = await run('qemu-io', args, { timeoutMs: 30_000 });
  const out = r.stdout + r.stderr;
  assert.equal(r.code, 0, describeResult('qemu-io', args, r));
  assert.doesNotMatch(out, QEMU_IO_FAILURE, describeResult('qemu-io', args, r));
  return out;
}

describe('qemu-img', () => {
  it('info, convert raw → export, compare, map, convert export → qcow2', async (t) => {
    if (!requireTools(t, 'qemu-img', 'qemu-io')) return;
    const image = join(dir.path, 'convert.img');
    const qcow2 = join(dir.path, 'copy.qcow2');
    const back = join(dir.path, 'back.raw');
    await withDaemon(['--export', `disk=file:${image},create=16M`], async (d) => {
      const uri = d.uri('disk');
      const info = JSON.parse(
        (await runOk('qemu-img', ['info', '--output=json', uri], { timeoutMs: 20_000 })).stdout,
      ) as {
        'virtual-size': number;
        format: string;
      };
      assert.equal(info['virtual-size'], SIZE);
      assert.equal(info.format, 'raw');
      const text = await runOk('qemu-img', ['info', uri], { timeoutMs: 20_000 });
      assert.match(text.stdout, /virtual size: 16 MiB \(16777216 bytes\)/);

      // Fill the export with data first, so that convert must zero the source's holes.
      await qemuIo(uri, ['write -P 0x77 0 16M']);
      await runOk('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', src.path, uri], {
        timeoutMs: 60_000,
      });
      assert.equal(
        sha256File(image),
        src.sha256,
        "devfilter's file equals the source after qemu-img convert -n",
      );

      const same = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', uri, src.path], {
        timeoutMs: 30_000,
      });
      assert.equal(same.code, 0, describeResult('qemu-img compare', [], same));
      assert.match(same.stdout, /Images are identical/);

      // qemu-img map: zero runs where the source had holes or zeros, data where it had data.
      const map = JSON.parse(
        (await runOk('qemu-img', ['map', '--output=json', '-f', 'raw', uri], { timeoutMs: 30_000 }))
          .stdout,
      ) as QemuMapEntry[];
      const extents = map.map((e) => ({
        offset: e.start,
        length: e.length,
        zero: e.zero,
        data: e.data,
      }));
      assertCovers(extents, SIZE, 'qemu-img map');
      for (const r of [...src.holes, ...src.zeroData]) {
        for (const e of overlapping(extents, r))
          assert.equal(
            e.zero,
            true,
            `${r.offset}+${r.length} should be zero: ${JSON.stringify(e)}`,
          );
      }
      for (const r of src.data) {
        for (const e of overlapping(extents, r)) {
          assert.equal(
            e.data,
            true,
            `${r.offset}+${r.length} should be data: ${JSON.stringify(e)}`,
          );
          assert.equal(e.zero, false, `${r.offset}+${r.length} is not zero: ${JSON.stringify(e)}`);
        }
      }
      assert.ok(
        extents.some((e) => e.zero && !e.data),
        'some zero runs are holes (not allocated)',
      );

      // export → qcow2 and back; both equal the source.
      await runOk('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', uri, qcow2], {
        timeoutMs: 60_000,
      });
      const q = await run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', qcow2, src.path], {
        timeoutMs: 30_000,
      });
      assert.equal(q.code, 0, describeResult('qemu-img compare qcow2', [], q));
      await runOk('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', qcow2, back], {
        timeoutMs: 60_000,
      });
      assert.equal(sha256File(back), src.sha256);

      // The comparison can fail: change one byte through the export and compare again.
      await qemuIo(uri, ['write -P 0x01 4097 1']);
      const differ = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', uri, src.path], {
        timeoutMs: 30_000,
      });
      assert.equal(differ.code, 1, describeResult('qemu-img compare after a change', [], differ));
      // qemu-img reports the start of the first differing 512-byte sector.
      assert.match(differ.stdout, /Content mismatch at offset 4096!/);
    });
  });
});

describe('qemu-io', () => {
  it('writes patterns, zeroes, discards and aio writes, then reads them back verified', async (t) => {
    if (!requireTools(t, 'qemu-io')) return;
    const image = join(dir.path, 'qemu-io.img');
    await withDaemon(
      ['--export', `disk=file:${image},create=8M`, '--export', 'mem=memory:8M'],
      async (d) => {
        for (const name of ['disk', 'mem']) {
          const uri = d.uri(name);
          await qemuIo(uri, [
            'write -P 0xab 0 1M',
            'write -P 0xcd 1M 7M',
            'write -z 2M 1M', // WRITE_ZEROES with NO_HOLE
            'write -z -u 4M 1M', // WRITE_ZEROES, may trim
            'discard 6M 1M', // TRIM: contents undefined afterwards
            'aio_write -P 0x11 7M 64k',
            'aio_write -P 0x22 7232k 64k',
            'aio_write -P 0x33 7296k 4k',
            'aio_write -P 0x44 7300k 508k', // unaligned end of the previous one, up to 7808k
            'aio_write -P 0x55 1234567 1000', // inside the 0xcd run, unaligned
            'aio_flush',
            'flush',
          ]);
          // A fresh connection reads everything back.
          const out = await qemuIo(uri, [
            'read -P 0xab 0 1M',
            'read -P 0xcd 1M 185991', // up to 1234567
            'read -P 0x55 1234567 1000',
            'read -P 0xcd 1235567 861585', // up to 2M
            'read -P 0 2M 1M',
            'read -P 0xcd 3M 1M',
            'read -P 0 4M 1M',
            'read -P 0xcd 5M 1M',
            'read -P 0x11 7M 64k',
            'read -P 0x22 7232k 64k',
            'read -P 0x33 7296k 4k',
            'read -P 0x44 7300k 508k',
            'read -P 0xcd 7808k 384k', // to the end
            'aio_read -P 0xab 512 4k',
            'aio_flush',
          ]);
          assert.equal((out.match(/^read \d+\/\d+ bytes/gm) ?? []).length, 14, out);
          // The discarded range must not have spilled over its edges (checked above: 5M..6M and 7M..).
          // Verification really verifies: a wrong pattern is reported.
          const wrong = await run(
            'qemu-io',
            ['-f', 'raw', '-t', 'none', '-c', 'read -P 0xab 2M 4k', uri],
            { timeoutMs: 20_000 },
          );
          assert.match(
            wrong.stdout + wrong.stderr,
            /Pattern verification failed/,
            'qemu-io detects a wrong pattern',
          );
        }
        // devfilter's own file has the same bytes.
        assert.ok(readRange(image, 0, MIB).every((b) => b === 0xab));
        assert.ok(readRange(image, 2 * MIB, MIB).every((b) => b === 0));
        assert.ok(readRange(image, 4 * MIB, MIB).every((b) => b === 0));
        assert.ok(readRange(image, 5 * MIB, MIB).every((b) => b === 0xcd));
        assert.ok(readRange(image, 1234567, 1000).every((b) => b === 0x55));
        assert.ok(readRange(image, 7300 * KIB, 508 * KIB).every((b) => b === 0x44));
      },
    );
  });

  it('is refused writes on a read-only export, and can still read it', async (t) => {
    if (!requireTools(t, 'qemu-io')) return;
    const image = join(dir.path, 'ro.img');
    fs.writeFileSync(image, Buffer.alloc(2 * MIB, 0x3c));
    const before = sha256File(image);
    await withDaemon(['--export', `ro=file:${image},readonly`], async (d) => {
      // qemu opens a read-only NBD export read-only, with -r it does not even try to write.
      await qemuIo(d.uri('ro'), ['read -P 0x3c 0 2M'], ['-r']);
      const w = await run(
        'qemu-io',
        ['-f', 'raw', '-t', 'none', '-c', 'write -P 0 0 4k', d.uri('ro')],
        { timeoutMs: 20_000 },
      );
      assert.notEqual(
        w.code,
        0,
        `writing a read-only export must fail:\n${describeResult('qemu-io', [], w)}`,
      );
      assert.match(w.stdout + w.stderr, /read-only|Operation not permitted|Permission denied/i);
    });
    assert.equal(sha256File(image), before, 'the read-only file is unchanged');
  });
});

describe('qemu-img bench and qemu-io writethrough', () => {
  it('64 requests in flight fill the export; FUA writes (default cache) read back', async (t) => {
    if (!requireTools(t, 'qemu-img', 'qemu-io')) return;
    const image = join(dir.path, 'bench.img');
    await withDaemon(['--export', `disk=file:${image},create=16M`], async (d) => {
      const uri = d.uri('disk');
      // 4096 × 4 KiB writes with pattern 0x3e, 64 at a time, cover the export exactly.
      const args = [
        'bench',
        '-w',
        '-c',
        '4096',
        '-d',
        '64',
        '-s',
        '4k',
        '--pattern=62',
        '-t',
        'none',
        '-f',
        'raw',
        uri,
      ];
      const b = await runOk('qemu-img', args, { timeoutMs: 60_000 });
      assert.match(b.stdout, /Run completed/);
      await qemuIo(uri, ['read -P 0x3e 0 16M']);
      assert.ok(
        readRange(image, 0, SIZE).every((x) => x === 0x3e),
        "devfilter's file holds the bench pattern",
      );
      // qemu-io's default cache mode (writethrough) sets FUA on every write.
      await qemuIo(
        uri,
        ['write -P 0x21 1M 64k', 'aio_write -P 0x22 2M 4k', 'aio_flush'],
        ['-t', 'writethrough'],
      );
      await qemuIo(uri, ['read -P 0x21 1M 64k', 'read -P 0x22 2M 4k', 'read -P 0x3e 2052k 4k']);
      // and the same bench reading, in parallel
      await runOk(
        'qemu-img',
        ['bench', '-c', '4096', '-d', '64', '-s', '4k', '-t', 'none', '-f', 'raw', uri],
        {
          timeoutMs: 60_000,
        },
      );
    });
  });
});

describe('qemu-nbd in front of devfilter', () => {
  it('re-serves a devfilter export; writes and compares go through both layers', async (t) => {
    if (!requireTools(t, 'qemu-nbd', 'qemu-io', 'qemu-img')) return;
    const image = join(dir.path, 'layered.img');
    const outer = join(dir.path, 'qemu-nbd.sock');
    await withDaemon(['--export', `disk=file:${image},create=16M`], async (d) => {
      const inner = d.uri('disk');
      // qemu-nbd as an NBD client of devfilter, and a server on its own socket (-t: many clients).
      const qnbd = background('qemu-nbd', [
        '-f',
        'raw',
        '-t',
        '--cache=none',
        `--socket=${outer}`,
        inner,
      ]);
      try {
        await waitFor('qemu-nbd to listen', async () => {
          if (qnbd.child.exitCode !== null)
            throw new Error(`qemu-nbd exited ${qnbd.child.exitCode}: ${qnbd.stderr()}`);
          return (await canConnect(outer)) ? true : undefined;
        });
        const outerUri = `nbd+unix:///?socket=${outer}`;

        // Converting the source in through qemu-nbd lands in devfilter's file.
        await runOk('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', src.path, outerUri], {
          timeoutMs: 60_000,
        });
        assert.equal(
          sha256File(image),
          src.sha256,
          "devfilter's file after convert through qemu-nbd",
        );
        const cmp = await run(
          'qemu-img',
          ['compare', '-f', 'raw', '-F', 'raw', outerUri, src.path],
          { timeoutMs: 30_000 },
        );
        assert.equal(cmp.code, 0, describeResult('qemu-img compare (through qemu-nbd)', [], cmp));

        // qemu-io through qemu-nbd; devfilter's file shows it, and devfilter serves it directly too.
        await qemuIo(outerUri, ['write -P 0xe7 3M 192k', 'write -z 5M 64k', 'flush']);
        assert.ok(
          readRange(image, 3 * MIB, 192 * KIB).every((b) => b === 0xe7),
          "qemu-nbd's write is in devfilter's file",
        );
        assert.ok(
          readRange(image, 5 * MIB, 64 * KIB).every((b) => b === 0),
          "qemu-nbd's write zeroes is in devfilter's file",
        );
        await qemuIo(inner, ['read -P 0xe7 3M 192k', 'read -P 0 5M 64k']);

        // Writes on devfilter directly are seen through qemu-nbd (no stale cache: --cache=none).
        await qemuIo(inner, ['write -P 0x9a 9M 1M']);
        await qemuIo(outerUri, ['read -P 0x9a 9M 1M']);
        const viaOuter = await runOk(
          'qemu-img',
          ['compare', '-f', 'raw', '-F', 'raw', outerUri, image],
          { timeoutMs: 30_000 },
        );
        assert.match(viaOuter.stdout, /Images are identical/);
      } finally {
        const r = await qnbd.stop('SIGTERM', 5000);
        assert.ok(
          r.code === 0 || r.signal === 'SIGTERM',
          `qemu-nbd exit: ${JSON.stringify(r)} ${qnbd.stderr()}`,
        );
      }
    });
  });
});

function canConnect(path: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.connect(path);
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}
