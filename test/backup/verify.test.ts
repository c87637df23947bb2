/**
 * `backup verify` and the manifest: an intact chain verifies; a flipped byte in a data
 * cluster, a replaced or missing backing image, a damaged manifest and a manifest of another
 * image are each reported.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import {
  decodeManifest,
  openQcow2,
  readManifest,
  verifyChain,
  type VerifyReport,
} from '../../src/backup/index.js';
import { crc32, crc32Portable } from '../../src/core/crc32.js';
import { tempDir } from '../helpers/server.js';
import { KIB, MIB, planWithEveryKind, randomBytes, rng, writeImage } from './fixtures.js';

let dir: { path: string; cleanup: () => void };
before(() => {
  dir = tempDir('devfilter-backup-verify-');
});
after(() => dir.cleanup());

const SIZE = 4 * MIB + 1000;
const CS = 64 * KIB;

/** A fresh chain in its own directory: full backup, then an incremental on top. */
async function makeChain(name: string): Promise<{ full: string; inc: string; base: Buffer }> {
  const sub = join(dir.path, name);
  fs.mkdirSync(sub);
  const base = randomBytes(rng(1), SIZE);
  const full = join(sub, 'full.qcow2');
  await writeImage(full, { size: SIZE, clusterSize: CS, metadata: { generation: 1 } }, [
    { kind: 'data', offset: 0, data: base },
  ]);
  const { ops } = planWithEveryKind(2, base, CS);
  const inc = join(sub, 'inc.qcow2');
  await writeImage(
    inc,
    { size: SIZE, clusterSize: CS, backingFile: 'full.qcow2', metadata: { generation: 2 } },
    ops,
  );
  return { full, inc, base };
}

function messages(report: VerifyReport): string {
  return report.problems.map((p) => `${p.image}: ${p.message}`).join('\n');
}

function flipByte(file: string, offset: number): void {
  const fd = fs.openSync(file, 'r+');
  try {
    const b = Buffer.alloc(1);
    fs.readSync(fd, b, 0, 1, offset);
    b[0] = b[0]! ^ 0x40;
    fs.writeSync(fd, b, 0, 1, offset);
  } finally {
    fs.closeSync(fd);
  }
}

describe('backup verify', () => {
  it('passes an intact chain and reports what it checked', async () => {
    const { full, inc } = await makeChain('intact');
    const report = await verifyChain(inc);
    assert.equal(report.ok, true, messages(report));
    assert.deepEqual(
      report.images.map((i) => i.path),
      [inc, full],
    );
    assert.equal(report.images[1]!.checkedClusters, Math.ceil(SIZE / CS));
    assert.ok(report.images[0]!.checkedClusters > 0);
    assert.deepEqual(report.images[0]!.metadata, { generation: 2 });
  });

  it('detects a flipped byte in a data cluster', async () => {
    const { full, inc } = await makeChain('flipped');
    const dev = await openQcow2(full, { followBacking: false });
    const run = await dev.mapRun(3, 1);
    await dev.close();
    assert.equal(run.kind, 'data');
    flipByte(full, run.hostOffset + 1234);
    const report = await verifyChain(inc);
    assert.equal(report.ok, false);
    assert.equal(report.problems.length, 2, messages(report));
    assert.equal(report.problems[0]!.image, full);
    assert.match(
      report.problems[0]!.message,
      new RegExp(
        `cluster 3 \\(guest offset ${3 * CS}, host offset ${run.hostOffset}\\): checksum mismatch`,
      ),
    );
    assert.match(report.problems[1]!.message, /SHA-256 of the stored data differs/);
  });

  it('detects a broken chain link: the backing image replaced by another backup', async () => {
    const { full, inc } = await makeChain('replaced');
    fs.rmSync(full);
    fs.rmSync(full + '.manifest');
    await writeImage(full, { size: SIZE, clusterSize: CS }, [
      { kind: 'data', offset: 0, data: randomBytes(rng(99), SIZE) },
    ]);
    const report = await verifyChain(inc);
    assert.equal(report.ok, false);
    assert.equal(report.problems.length, 1, messages(report));
    assert.equal(report.problems[0]!.image, inc);
    assert.match(report.problems[0]!.message, /chain link broken: .*full\.qcow2 is not the backup/);
  });

  it('detects a broken chain link: the backing image missing', async () => {
    const { full, inc } = await makeChain('missing');
    fs.rmSync(full);
    const report = await verifyChain(inc);
    assert.equal(report.ok, false);
    assert.match(messages(report), /chain link broken: backing file missing: .*full\.qcow2/);
  });

  it('detects a damaged manifest and a manifest of another image', async () => {
    const { full, inc } = await makeChain('manifests');
    flipByte(inc + '.manifest', 100);
    let report = await verifyChain(inc);
    assert.equal(report.ok, false);
    assert.match(messages(report), /manifest unreadable: .*checksum mismatch/);

    // Swap in the manifest of a different image of the same shape.
    const other = join(dir.path, 'manifests', 'other.qcow2');
    await writeImage(other, { size: SIZE, clusterSize: CS }, [
      { kind: 'data', offset: 0, data: randomBytes(rng(5), SIZE) },
    ]);
    fs.copyFileSync(other + '.manifest', full + '.manifest');
    fs.rmSync(inc + '.manifest');
    report = await verifyChain(full);
    assert.equal(report.ok, false);
    assert.match(messages(report), /backup id [0-9a-f]+ in the image differs from the manifest's/);
    assert.match(messages(report), /checksum mismatch/);
    report = await verifyChain(inc);
    assert.match(messages(report), /manifest missing/);
  });

  it('detects a cluster map that disagrees with the manifest', async () => {
    const { full } = await makeChain('map');
    // Clear L2 entry 0 of the full image: cluster 0 becomes unallocated.
    const file = fs.readFileSync(full);
    const l1 = Number(file.readBigUInt64BE(40));
    const l2 = Number(file.readBigUInt64BE(l1) & 0x00fffffffffffe00n);
    file.writeBigUInt64BE(0n, l2);
    fs.writeFileSync(full, file);
    const report = await verifyChain(full);
    assert.equal(report.ok, false);
    assert.match(
      messages(report),
      /cluster 0 \(guest offset 0\) is unallocated in the image but data/,
    );
  });
});

describe('backup manifest', () => {
  it('round-trips and refuses any damage', async () => {
    const { inc } = await makeChain('roundtrip');
    const bytes = fs.readFileSync(inc + '.manifest');
    const manifest = decodeManifest(bytes, 'm');
    assert.equal(manifest.body.backing?.file, 'full.qcow2');
    assert.equal((await readManifest(inc + '.manifest'))?.digest, manifest.digest);
    assert.equal(await readManifest(join(dir.path, 'nothing.manifest')), undefined);
    for (const pos of [0, 8, 12, 20, 40, 64, bytes.length - 1]) {
      const bad = Buffer.from(bytes);
      bad[pos] = bad[pos]! ^ 1;
      assert.throws(() => decodeManifest(bad, 'm'), { name: 'ManifestError' }, `byte ${pos}`);
    }
    assert.throws(() => decodeManifest(bytes.subarray(0, bytes.length - 4), 'm'), /length/);
  });

  it('uses the CRC-32 of zlib and gzip', () => {
    const check = Buffer.from('123456789');
    assert.equal(crc32(check), 0xcbf43926);
    assert.equal(crc32Portable(check), 0xcbf43926);
    const data = randomBytes(rng(4), 100_000);
    assert.equal(crc32Portable(data), crc32(data));
  });
});
