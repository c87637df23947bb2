/**
 * The qcow2 backup writer against QEMU's own tools: full and incremental images written from
 * a random model must pass `qemu-img check`, compare identical to the model, show their chain
 * in `qemu-img info`, convert back to the model, and read back through our reader.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { createQcow2Writer, openQcow2, readManifest } from '../../src/backup/index.js';
import { ExtentState } from '../../src/core/device.js';
import { run } from '../helpers/run.js';
import { tempDir } from '../helpers/server.js';
import { requireTools } from '../helpers/tools.js';
import {
  KIB,
  MIB,
  padTo512,
  assertCheckPasses,
  assertIdentical,
  qemuImg,
  randomBytes,
  planWithEveryKind,
  readAll,
  rng,
  writeImage,
  writeRaw,
} from './fixtures.js';

let dir: { path: string; cleanup: () => void };
before(() => {
  dir = tempDir('devfilter-backup-writer-');
});
after(() => dir.cleanup());

const at = (name: string): string => join(dir.path, name);

describe('qcow2 writer: full backups', () => {
  for (const [clusterSize, size, seed] of [
    [64 * KIB, 8 * MIB + 5000, 1],
    [4 * KIB, 3 * MIB + 512, 2],
    [2 * MIB, 24 * MIB + 4096, 3],
  ] as const) {
    it(`writes an image qemu-img accepts and reads as the model (cluster ${clusterSize})`, async (t) => {
      if (!requireTools(t, 'qemu-img')) return;
      const { ops, model } = planWithEveryKind(seed, Buffer.alloc(size), clusterSize);
      const image = at(`full-${clusterSize}.qcow2`);
      const result = await writeImage(
        image,
        { size, clusterSize, metadata: { export: 'disk0', generation: 7 } },
        ops,
      );
      assert.equal(result.path, image);
      assert.equal(fs.statSync(image).size, result.fileSize);
      assert.equal(fs.existsSync(image + '.partial'), false);
      // Without a backing file, zero ranges and all-zero data are simply left unallocated.
      assert.equal(result.zeroClusters, 0);

      await assertCheckPasses(image);
      // QEMU sees the size rounded up to whole 512-byte sectors; the rest reads as zeros.
      const raw = at(`full-${clusterSize}.raw`);
      writeRaw(raw, padTo512(model));
      await assertIdentical(image, raw);
      const info = JSON.parse(await qemuImg(['info', '--output=json', image])) as {
        format: string;
        'virtual-size': number;
        'cluster-size': number;
        'format-specific': { data: { compat: string } };
      };
      assert.equal(info.format, 'qcow2');
      assert.equal(info['virtual-size'], padTo512(model).length);
      assert.equal(info['cluster-size'], clusterSize);
      assert.equal(info['format-specific'].data.compat, '1.1');

      const dev = await openQcow2(image);
      try {
        const padded = padTo512(model);
        assert.equal(dev.info().size, padded.length);
        assert.equal(dev.info().caps.readOnly, true);
        assert.ok((await readAll(dev)).equals(padded), 'our reader reads the model');
        const extents = await dev.blockStatus(0, padded.length, 0);
        assert.equal(
          extents.reduce((n, e) => n + e.length, 0),
          padded.length,
        );
      } finally {
        await dev.close();
      }
      const manifest = await readManifest(image + '.manifest');
      assert.ok(manifest);
      assert.equal(manifest.digest, result.manifestDigest);
      assert.equal(manifest.body.virtualSize, size);
      assert.equal(manifest.body.backing, null);
      assert.deepEqual(manifest.body.metadata, { export: 'disk0', generation: 7 });
      assert.equal(manifest.crcs.length, result.dataClusters);
    });
  }

  it('writes an empty image and one of size zero', async (t) => {
    if (!requireTools(t, 'qemu-img')) return;
    for (const size of [0, 5 * MIB]) {
      const image = at(`empty-${size}.qcow2`);
      const result = await writeImage(image, { size }, []);
      assert.equal(result.dataClusters, 0);
      await assertCheckPasses(image);
      const raw = at(`empty-${size}.raw`);
      writeRaw(raw, Buffer.alloc(size));
      await assertIdentical(image, raw);
    }
  });

  it('stores large writes spanning many L2 tables', async (t) => {
    if (!requireTools(t, 'qemu-img')) return;
    // 4 KiB clusters: one L2 table maps 2 MiB, so 10 MiB of data crosses five of them.
    const size = 12 * MIB;
    const model = Buffer.alloc(size);
    const data = randomBytes(rng(9), 10 * MIB);
    data.copy(model, MIB);
    const image = at('large.qcow2');
    await writeImage(image, { size, clusterSize: 4 * KIB }, [{ kind: 'data', offset: MIB, data }]);
    await assertCheckPasses(image);
    const raw = at('large.raw');
    writeRaw(raw, model);
    await assertIdentical(image, raw);
  });
});

describe('qcow2 writer: incremental backups', () => {
  it('chains on a full backup: qemu-img sees the chain and converts it to the model', async (t) => {
    if (!requireTools(t, 'qemu-img')) return;
    const size = 6 * MIB + 4096 + 512;
    const cs = 64 * KIB;
    const next = rng(42);
    const model = Buffer.alloc(size);
    // The base: data everywhere, so zero ranges on top must override it.
    const baseData = randomBytes(next, size);
    baseData.copy(model);
    const base = at('chain-full.qcow2');
    const full = await writeImage(base, { size, clusterSize: cs }, [
      { kind: 'data', offset: 0, data: baseData },
    ]);

    const { ops, model: after } = planWithEveryKind(43, model, cs);
    after.copy(model);
    const inc = at('chain-inc.qcow2');
    const result = await writeImage(
      inc,
      { size, clusterSize: cs, backingFile: 'chain-full.qcow2', metadata: { generation: 2 } },
      ops,
    );
    assert.ok(result.zeroClusters > 0, 'zeroed ranges are zero clusters over a backing file');

    await assertCheckPasses(inc);
    const chain = JSON.parse(await qemuImg(['info', '--backing-chain', '--output=json', inc])) as {
      filename: string;
      'backing-filename'?: string;
      'backing-filename-format'?: string;
    }[];
    assert.equal(chain.length, 2);
    assert.equal(chain[0]!['backing-filename'], 'chain-full.qcow2');
    assert.equal(chain[0]!['backing-filename-format'], 'qcow2');
    assert.equal(chain[1]!.filename, base);

    const raw = at('chain.raw');
    writeRaw(raw, model);
    await assertIdentical(inc, raw);
    const converted = at('chain-converted.raw');
    await qemuImg(['convert', '-f', 'qcow2', '-O', 'raw', inc, converted]);
    assert.ok(fs.readFileSync(converted).equals(model), 'qemu-img convert of the chain = model');

    const manifest = await readManifest(inc + '.manifest');
    assert.equal(manifest?.body.backing?.file, 'chain-full.qcow2');
    assert.equal(manifest?.body.backing?.manifestDigest, full.manifestDigest);

    const dev = await openQcow2(inc);
    try {
      assert.ok((await readAll(dev)).equals(model), 'our reader follows the chain');
      assert.ok((await readAll(dev, 12345)).equals(model), 'also in small unaligned pieces');
      // A zero op of the plan reads as a zero extent, not as the base's data.
      const zeroOp = ops.find((o) => o.kind === 'zero')!;
      const [first] = await dev.blockStatus(zeroOp.offset, cs, 0);
      assert.equal(first!.state, ExtentState.HOLE | ExtentState.ZERO);
      const extents = await dev.blockStatus(0, size, 0);
      assert.equal(
        extents.reduce((n, e) => n + e.length, 0),
        size,
      );
    } finally {
      await dev.close();
    }
  });

  it('chains on a raw base image', async (t) => {
    if (!requireTools(t, 'qemu-img')) return;
    const size = 2 * MIB;
    const model = randomBytes(rng(5), size);
    writeRaw(at('base.raw'), model);
    const top = Buffer.from(model);
    const data = randomBytes(rng(6), 128 * KIB);
    data.copy(top, 256 * KIB);
    top.fill(0, MIB, MIB + 64 * KIB);
    const image = at('on-raw.qcow2');
    await writeImage(image, { size, backingFile: 'base.raw', backingFormat: 'raw' }, [
      { kind: 'data', offset: 256 * KIB, data },
      { kind: 'zero', offset: MIB, length: 64 * KIB },
    ]);
    await assertCheckPasses(image);
    writeRaw(at('on-raw.expected'), top);
    await assertIdentical(image, at('on-raw.expected'));
    const manifest = await readManifest(image + '.manifest');
    assert.deepEqual(manifest?.body.backing, {
      file: 'base.raw',
      format: 'raw',
      manifestDigest: null,
    });
  });
});

describe('qcow2 writer: interruption and misuse', () => {
  it('abort leaves nothing behind', async () => {
    const image = at('aborted.qcow2');
    const w = await createQcow2Writer(image, { size: 4 * MIB });
    await w.writeData(0, randomBytes(rng(1), MIB));
    assert.ok(fs.existsSync(w.partialPath));
    await w.abort();
    for (const p of [image, image + '.partial', image + '.manifest', image + '.manifest.partial']) {
      assert.equal(fs.existsSync(p), false, p);
    }
    await assert.rejects(w.writeData(MIB, Buffer.alloc(64 * KIB)), /aborted/);
    await assert.rejects(w.finish(), /aborted/);
  });

  it('a writer that never finishes leaves no DEST, and its partial file is no qcow2 image', async (t) => {
    const image = at('unfinished.qcow2');
    const w = await createQcow2Writer(image, { size: 4 * MIB });
    await w.writeData(0, randomBytes(rng(2), 2 * MIB));
    // The process "dies" here: nothing more is called.
    assert.equal(fs.existsSync(image), false);
    assert.equal(fs.existsSync(image + '.manifest'), false);
    await assert.rejects(openQcow2(w.partialPath), /not a qcow2 image \(bad magic\)/);
    if (requireTools(t, 'qemu-img')) {
      const r = await run('qemu-img', ['info', '-f', 'qcow2', w.partialPath]);
      assert.notEqual(r.code, 0, 'qemu-img refuses the partial file as qcow2');
    }
    // A new attempt replaces the leftover.
    const again = await createQcow2Writer(image, { size: 4 * MIB });
    await again.finish();
    assert.equal(fs.existsSync(w.partialPath), false);
    assert.ok(fs.existsSync(image));
  });

  it('refuses out-of-order, unaligned and out-of-range writes, and an existing DEST', async () => {
    const image = at('misuse.qcow2');
    const cs = 64 * KIB;
    const w = await createQcow2Writer(image, { size: MIB + 100 });
    try {
      await assert.rejects(w.writeData(100, Buffer.alloc(cs)), /not aligned/);
      await assert.rejects(w.writeData(0, Buffer.alloc(100)), /not aligned/);
      await w.writeData(2 * cs, Buffer.alloc(cs, 1));
      await assert.rejects(w.writeData(cs, Buffer.alloc(cs, 1)), /increasing order/);
      await assert.rejects(w.writeZeroes(2 * cs, cs), /increasing order/);
      await assert.rejects(w.writeData(MIB, Buffer.alloc(cs)), /outside image/);
      await w.writeData(MIB, Buffer.alloc(100, 2)); // the unaligned end of the device
      await w.finish();
    } finally {
      await w.abort();
    }
    assert.ok(fs.existsSync(image));
    await assert.rejects(createQcow2Writer(image, { size: MIB }), /already exists/);
    // A manifest without its image (a run stopped between finish()'s two renames) is no
    // backup: the next run replaces it.
    const orphan = at('orphan.qcow2');
    fs.writeFileSync(orphan + '.manifest', 'left over');
    const again = await createQcow2Writer(orphan, { size: MIB });
    await again.finish();
    assert.ok(
      fs.existsSync(orphan) && fs.readFileSync(orphan + '.manifest', 'latin1') !== 'left over',
    );
    await assert.rejects(createQcow2Writer(at('x.qcow2'), { size: MIB, clusterSize: 3000 }), {
      name: 'RangeError',
    });
    await assert.rejects(
      createQcow2Writer(at('y.qcow2'), { size: MIB, backingFile: 'missing.qcow2' }),
      /backing file not found/,
    );
  });

  it('is writable by concurrent calls issued without waiting', async (t) => {
    if (!requireTools(t, 'qemu-img')) return;
    const size = 2 * MIB;
    const model = randomBytes(rng(11), size);
    const image = at('pipelined.qcow2');
    const w = await createQcow2Writer(image, { size });
    const pending: Promise<void>[] = [];
    for (let off = 0; off < size; off += 256 * KIB) {
      pending.push(w.writeData(off, model.subarray(off, off + 256 * KIB)));
    }
    await Promise.all(pending);
    await w.finish();
    writeRaw(at('pipelined.raw'), model);
    await assertIdentical(image, at('pipelined.raw'));
  });
});
