/**
 * The qcow2 reader: images made by QEMU's tools read as QEMU reads them, unsupported features
 * are refused by name, and hostile headers and tables give clear errors instead of crashes or
 * reads out of range.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { openImage, openQcow2 } from '../../src/backup/index.js';
import { ExtentState } from '../../src/core/device.js';
import { describeResult, run } from '../helpers/run.js';
import { tempDir } from '../helpers/server.js';
import { requireTools } from '../helpers/tools.js';
import { KIB, MIB, qemuImg, randomBytes, readAll, rng, writeImage, writeRaw } from './fixtures.js';

let dir: { path: string; cleanup: () => void };
before(() => {
  dir = tempDir('devfilter-backup-reader-');
});
after(() => dir.cleanup());

const at = (name: string): string => join(dir.path, name);
const HOLE_ZERO = ExtentState.HOLE | ExtentState.ZERO;

async function qemuIo(image: string, commands: string[]): Promise<void> {
  const args = ['-f', 'qcow2', ...commands.flatMap((c) => ['-c', c]), image];
  const r = await run('qemu-io', args, { timeoutMs: 30_000 });
  assert.equal(r.code, 0, describeResult('qemu-io', args, r));
  assert.doesNotMatch(
    r.stdout + r.stderr,
    /failed|error|Error/,
    describeResult('qemu-io', args, r),
  );
}

/** What QEMU itself reads from an image: `qemu-img convert` to raw. */
async function qemuContent(image: string): Promise<Buffer> {
  const out = image + '.converted';
  await qemuImg(['convert', '-O', 'raw', image, out]);
  return fs.readFileSync(out);
}

async function assertReadsLikeQemu(image: string): Promise<void> {
  const expected = await qemuContent(image);
  const dev = await openQcow2(image);
  try {
    assert.equal(dev.info().size, expected.length);
    assert.ok((await readAll(dev)).equals(expected), `${image} reads as qemu-img convert`);
    assert.ok((await readAll(dev, 7 * KIB + 3)).equals(expected), 'also in small pieces');
  } finally {
    await dev.close();
  }
}

describe('qcow2 reader: images made by qemu-img', () => {
  it('reads data, zero clusters and holes of a qemu-img created image', async (t) => {
    if (!requireTools(t, 'qemu-img', 'qemu-io')) return;
    const image = at('qemu.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', image, '4M']);
    await qemuIo(image, [
      'write -P 0xab 0 64k',
      'write -P 0x01 1M 128k',
      'write -z 1M 64k',
      'write -P 0xcd 2M 4k',
      'write -P 0x5a 4190208 4096',
    ]);
    const dev = await openQcow2(image);
    try {
      const buf = Buffer.alloc(64 * KIB);
      await dev.read(buf, 0, 0);
      assert.ok(buf.equals(Buffer.alloc(64 * KIB, 0xab)));
      await dev.read(buf, MIB, 0);
      assert.ok(buf.equals(Buffer.alloc(64 * KIB)), 'a zeroed range reads zeros');
      await dev.read(buf, MIB + 64 * KIB, 0);
      assert.ok(buf.equals(Buffer.alloc(64 * KIB, 0x01)));
      const small = Buffer.alloc(4 * KIB);
      await dev.read(small, 2 * MIB, 0);
      assert.ok(small.equals(Buffer.alloc(4 * KIB, 0xcd)));
      const [first] = await dev.blockStatus(0, 4 * MIB, 0);
      assert.deepEqual(first, { length: 64 * KIB, state: 0 });
      const [hole] = await dev.blockStatus(128 * KIB, 64 * KIB, 0);
      assert.deepEqual(hole, { length: 64 * KIB, state: HOLE_ZERO });
      await assert.rejects(dev.write(buf, 0, 0), { name: 'DeviceError', errno: 'EPERM' });
      await assert.rejects(dev.writeZeroes(0, 4096, 0), { errno: 'EPERM' });
      await assert.rejects(dev.trim(0, 4096, 0), { errno: 'EPERM' });
    } finally {
      await dev.close();
    }
    await assertReadsLikeQemu(image);
  });

  it('follows a qemu-img backing chain (qcow2 over qcow2 over raw)', async (t) => {
    if (!requireTools(t, 'qemu-img', 'qemu-io')) return;
    writeRaw(at('chain0.raw'), randomBytes(rng(3), 3 * MIB)); // smaller than the overlays
    await qemuImg([
      'create',
      '-q',
      '-f',
      'qcow2',
      '-b',
      'chain0.raw',
      '-F',
      'raw',
      at('chain1.qcow2'),
      '4M',
    ]);
    await qemuIo(at('chain1.qcow2'), ['write -P 0xab 0 128k', 'write -P 0x77 3M 64k']);
    await qemuImg([
      'create',
      '-q',
      '-f',
      'qcow2',
      '-b',
      'chain1.qcow2',
      '-F',
      'qcow2',
      at('chain2.qcow2'),
    ]);
    await qemuIo(at('chain2.qcow2'), [
      'write -z 0 64k', // a zero cluster over data below
      'write -P 0x11 3M 4k', // a partial cluster: QEMU copies the rest up from below
      'write -P 0x22 100k 4k',
    ]);
    await assertReadsLikeQemu(at('chain2.qcow2'));
    const dev = await openQcow2(at('chain2.qcow2'));
    try {
      assert.ok(dev.backing && dev.backing.format === 'qcow2');
      const status = await dev.blockStatus(0, 4 * MIB, 0);
      assert.deepEqual(status[0], { length: 64 * KIB, state: HOLE_ZERO });
      assert.equal(
        status.reduce((n, e) => n + e.length, 0),
        4 * MIB,
      );
      // Past the raw base's end, unallocated clusters read zeros.
      const [tail] = await dev.blockStatus(3 * MIB + 64 * KIB, 64 * KIB, 0);
      assert.equal(tail!.state, HOLE_ZERO);
    } finally {
      await dev.close();
    }
  });

  it('reads version 2 images and small and large cluster sizes from qemu-img convert', async (t) => {
    if (!requireTools(t, 'qemu-img')) return;
    const content = randomBytes(rng(8), 2 * MIB);
    content.fill(0, 512 * KIB, MIB); // a run of zeros convert leaves unallocated
    writeRaw(at('src.raw'), content);
    for (const opts of ['compat=0.10,cluster_size=4096', 'cluster_size=512', 'cluster_size=2M']) {
      const image = at(`converted-${opts.replace(/[=,]/g, '_')}.qcow2`);
      await qemuImg(['convert', '-f', 'raw', '-O', 'qcow2', '-o', opts, at('src.raw'), image]);
      const dev = await openImage(image, undefined);
      try {
        assert.equal(dev.format, 'qcow2');
        assert.ok((await readAll(dev)).equals(content), opts);
      } finally {
        await dev.close();
      }
    }
  });
});

describe('qcow2 reader: unsupported features are refused by name', () => {
  it('compressed clusters', async (t) => {
    if (!requireTools(t, 'qemu-img')) return;
    writeRaw(at('compress.raw'), Buffer.alloc(MIB, 0x61));
    const image = at('compressed.qcow2');
    await qemuImg(['convert', '-c', '-f', 'raw', '-O', 'qcow2', at('compress.raw'), image]);
    const dev = await openQcow2(image);
    try {
      await assert.rejects(dev.read(Buffer.alloc(4096), 0, 0), {
        errno: 'EIO',
        message: /compressed clusters are not supported/,
      });
    } finally {
      await dev.close();
    }
  });

  const refusals: [string, string[], RegExp][] = [
    ['extended L2 entries', ['-o', 'extended_l2=on'], /extended L2 entries/],
    // An absolute name: qemu-img creates a relative one in its working directory.
    ['an external data file', ['-o', 'data_file=@/ext.data'], /external data file/],
  ];
  for (const [name, args, message] of refusals) {
    it(name, async (t) => {
      if (!requireTools(t, 'qemu-img')) return;
      const image = at(`refuse-${name.replace(/\W/g, '_')}.qcow2`);
      const options = args.map((a) => a.replace('@/', `${dir.path}/`));
      await qemuImg(['create', '-q', '-f', 'qcow2', ...options, image, '1M']);
      await assert.rejects(openQcow2(image), { name: 'Qcow2FormatError', message });
    });
  }
});

describe('qcow2 reader: hostile images', () => {
  /** A small valid image with data in guest cluster 0, returned with its L1 and L2 offsets. */
  async function victim(name: string): Promise<{ image: string; l1: number; l2: number }> {
    const image = at(name);
    await writeImage(image, { size: 2 * MIB }, [
      { kind: 'data', offset: 0, data: randomBytes(rng(1), 128 * KIB) },
    ]);
    const file = fs.readFileSync(image);
    const l1 = Number(file.readBigUInt64BE(40));
    const l2 = Number(file.readBigUInt64BE(l1) & 0x00fffffffffffe00n);
    return { image, l1, l2 };
  }

  function patch(image: string, offset: number, bytes: Buffer): void {
    const fd = fs.openSync(image, 'r+');
    try {
      fs.writeSync(fd, bytes, 0, bytes.length, offset);
    } finally {
      fs.closeSync(fd);
    }
  }

  const u32 = (n: number): Buffer => {
    const b = Buffer.alloc(4);
    b.writeUInt32BE(n);
    return b;
  };
  const u64 = (n: bigint): Buffer => {
    const b = Buffer.alloc(8);
    b.writeBigUInt64BE(n);
    return b;
  };

  const headerCases: [string, number, Buffer, RegExp][] = [
    ['bad magic', 0, Buffer.from('QFI\0'), /not a qcow2 image \(bad magic\)/],
    ['version 4', 4, u32(4), /unsupported qcow2 version 4/],
    // Encryption: creating a LUKS image takes qemu-img a timing-dependent key derivation, so the
    // header field is set instead: AES (1) and LUKS (2).
    ['AES encryption', 32, u32(1), /encryption is not supported \(crypt_method 1\)/],
    ['LUKS encryption', 32, u32(2), /encryption is not supported \(crypt_method 2\)/],
    ['cluster_bits 40', 20, u32(40), /cluster_bits 40 out of range \(9\.\.21\)/],
    ['huge L1 size', 36, u32(0x7fffffff), /L1 table too large \(2147483647 entries\)/],
    ['L1 size too small', 36, u32(0), /L1 table too small/],
    ['L1 table beyond EOF', 40, u64(1n << 40n), /L1 table .* extends beyond end of file/],
    ['huge virtual size', 24, u64(1n << 62n), /size is out of range/],
    ['unknown incompatible feature', 72, u64(1n << 20n), /unknown incompatible feature bits/],
    ['corrupt bit', 72, u64(2n), /marked corrupt/],
    ['header_length past the cluster', 100, u32(1 << 20), /invalid header_length/],
    [
      'backing name too long',
      8,
      Buffer.concat([u64(200n), u32(5000)]),
      /backing file name too long/,
    ],
    ['extension running past the header', 104 + 4, u32(0xffff0000), /runs past the header cluster/],
  ];
  for (const [name, offset, bytes, message] of headerCases) {
    it(`header: ${name}`, async () => {
      const { image } = await victim(`hostile-${name.replace(/\W/g, '_')}.qcow2`);
      patch(image, offset, bytes);
      await assert.rejects(openQcow2(image), { name: 'Qcow2FormatError', message });
    });
  }

  it('a file too short for a header', async () => {
    writeRaw(at('short.qcow2'), Buffer.from([0x51, 0x46, 0x49, 0xfb, 0, 0, 0, 3]));
    await assert.rejects(openQcow2(at('short.qcow2')), /too short for a qcow2 header/);
  });

  it('an L1 entry pointing beyond the end of the file', async () => {
    const { image, l1 } = await victim('hostile-l1-entry.qcow2');
    patch(image, l1, u64((1n << 63n) | (1n << 40n)));
    const dev = await openQcow2(image);
    try {
      await assert.rejects(dev.read(Buffer.alloc(4096), 0, 0), {
        name: 'DeviceError',
        errno: 'EIO',
        message: /L1 entry 0: L2 table at 1099511627776 lies beyond end of file/,
      });
      await assert.rejects(dev.blockStatus(0, 4096, 0), /beyond end of file/);
    } finally {
      await dev.close();
    }
  });

  it('an unaligned L1 entry and L2 entries with bad offsets', async () => {
    const { image, l1, l2 } = await victim('hostile-l2.qcow2');
    const cases: [number, bigint, RegExp][] = [
      [l2, (1n << 63n) | (1n << 40n), /data cluster at 1099511627776 lies beyond end of file/],
      [l2, (1n << 63n) | 0x10200n, /host offset 66048 is unaligned/],
      [l2, 1n << 63n, /host offset 0 marked as allocated/],
      [l2, 0x10002n, /L2 entry for guest offset 0 has reserved bits set/],
      [l1, 0x10200n, /L1 entry 0: L2 table offset 66048 unaligned/],
    ];
    for (const [offset, entry, message] of cases) {
      patch(image, offset, u64(entry));
      const dev = await openQcow2(image);
      try {
        await assert.rejects(dev.read(Buffer.alloc(4096), 0, 0), { errno: 'EIO', message });
      } finally {
        await dev.close();
      }
    }
  });

  it('a backing chain that loops, and a missing backing file', async () => {
    const image = at('loop.qcow2');
    await writeImage(image, { size: MIB }, []);
    // Give it a backing file name: itself. The name goes where encodeHeader puts it.
    const file = fs.readFileSync(image);
    const name = Buffer.from('loop.qcow2');
    const pos = 512;
    name.copy(file, pos);
    file.writeBigUInt64BE(BigInt(pos), 8);
    file.writeUInt32BE(name.length, 16);
    fs.writeFileSync(image, file);
    await assert.rejects(openQcow2(image), /loops back to itself/);
    name.write('gone.qcow2');
    name.copy(file, pos);
    fs.writeFileSync(image, file);
    await assert.rejects(
      openQcow2(image),
      /cannot open backing file: image not found: .*gone\.qcow2/,
    );
    const alone = await openQcow2(image, { followBacking: false });
    try {
      assert.equal(alone.backing, undefined);
      assert.equal(alone.header.backingFile, 'gone.qcow2');
    } finally {
      await alone.close();
    }
  });
});
