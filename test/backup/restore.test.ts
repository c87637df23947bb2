/**
 * restoreChain: a chain of a full backup and two incrementals, restored to a new file, over an
 * existing one, to an NBD export of a real `devfilter serve` and to a loop device, checked
 * against a model and against qemu-img; damaged and broken chains, unsuitable targets and
 * interrupted restores are refused or cleaned up.
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, it, type TestContext } from 'node:test';
import {
  openQcow2,
  restoreChain,
  RestoreError,
  type RestoreOptions,
  type RestoreResult,
} from '../../src/backup/index.js';
import { SEEK_DATA, lseek } from '../../src/backends/libc.js';
import { ExtentState } from '../../src/core/device.js';
import { NbdClient } from '../../src/nbd/client.js';
import { spawnDaemon, tempDir, type DaemonProcess } from '../helpers/server.js';
import { requireTools } from '../helpers/tools.js';
import {
  KIB,
  MIB,
  assertIdentical,
  planWithEveryKind,
  randomBytes,
  rng,
  writeImage,
} from './fixtures.js';

const CLUSTER = 64 * KIB;
/** Not a multiple of 512: the manifest's exact size matters. */
const SIZE = 6 * MIB + 12345;
/** Smaller than the default, so that restores take many chunks and overlap writes. */
const CHUNK = 256 * KIB;

let dir: { path: string; cleanup: () => void };
const at = (name: string): string => join(dir.path, name);

/** The chain's content, top image, and data/zero extents as the reader reports them. */
let model: Buffer;
let top: string;
let chainDataBytes: number;
let zeroRanges: Array<[number, number]>;
let chainBuilt = false;

/** Builds full ← inc1 ← inc2 in `into`, returning the model of what inc2 reads. */
async function buildChain(into: string): Promise<Buffer> {
  const options = { size: SIZE, clusterSize: CLUSTER };
  const full = planWithEveryKind(1, Buffer.alloc(SIZE), CLUSTER);
  await writeImage(join(into, 'full.qcow2'), options, full.ops);
  // Each incremental overwrites some clusters, zeroes others (zero clusters over the data
  // below) and leaves the rest to its backing file.
  const inc1 = planWithEveryKind(100, full.model, CLUSTER);
  await writeImage(join(into, 'inc1.qcow2'), { ...options, backingFile: 'full.qcow2' }, inc1.ops);
  const inc2 = planWithEveryKind(200, inc1.model, CLUSTER);
  await writeImage(join(into, 'inc2.qcow2'), { ...options, backingFile: 'inc1.qcow2' }, inc2.ops);
  return inc2.model;
}

function copyChain(into: string): void {
  fs.mkdirSync(into, { recursive: true });
  for (const name of ['full.qcow2', 'inc1.qcow2', 'inc2.qcow2']) {
    fs.copyFileSync(at(name), join(into, name));
    fs.copyFileSync(at(name + '.manifest'), join(into, name + '.manifest'));
  }
}

before(async () => {
  dir = tempDir('devfilter-backup-restore-');
  model = await buildChain(dir.path);
  top = at('inc2.qcow2');
  const image = await openQcow2(top);
  try {
    chainDataBytes = 0;
    zeroRanges = [];
    for (let offset = 0; offset < SIZE;) {
      for (const e of await image.blockStatus(offset, SIZE - offset, 0)) {
        const end = Math.min(SIZE, offset + e.length);
        if (e.state & ExtentState.ZERO) zeroRanges.push([offset, end]);
        else chainDataBytes += end - offset;
        offset = end;
        if (offset >= SIZE) break;
      }
    }
  } finally {
    await image.close();
  }
  chainBuilt = true;
});
after(() => dir.cleanup());

function checkResult(result: RestoreResult, kind: RestoreResult['kind']): void {
  assert.equal(result.kind, kind);
  assert.equal(result.virtualSize, SIZE);
  assert.equal(result.dataBytes, chainDataBytes);
  assert.equal(result.zeroBytes, SIZE - chainDataBytes);
  assert.ok(result.seconds >= 0);
}

/** Every zero range of the chain (whole 4 KiB blocks of it) is a hole in the restored file. */
function assertHoles(file: string): void {
  const fd = fs.openSync(file, 'r');
  try {
    for (const [start, end] of zeroRanges) {
      const from = Math.ceil(start / 4096) * 4096;
      const to = Math.floor(end / 4096) * 4096;
      if (to <= from) continue;
      let data: number;
      try {
        data = lseek(fd, from, SEEK_DATA);
      } catch (err) {
        if ((err as { code?: string }).code === 'ENXIO') continue; // no data after `from` at all
        throw err;
      }
      assert.ok(data >= to, `zero range ${from}..${to} is a hole (data found at ${data})`);
    }
  } finally {
    fs.closeSync(fd);
  }
  const allocated = fs.statSync(file).blocks * 512;
  assert.ok(
    allocated <= chainDataBytes + CLUSTER,
    `${allocated} bytes allocated for ${chainDataBytes} bytes of data`,
  );
}

function garbage(length: number, seed: number): Buffer {
  return randomBytes(rng(seed), length);
}

function progressRecorder(): {
  calls: Array<{ doneBytes: number; totalBytes: number; dataBytes: number }>;
  options: RestoreOptions;
} {
  const calls: Array<{ doneBytes: number; totalBytes: number; dataBytes: number }> = [];
  return { calls, options: { chunkBytes: CHUNK, onProgress: (p) => calls.push({ ...p }) } };
}

describe('restoreChain: to a regular file', () => {
  it('restores a chain to a new, sparse file with the exact size', async (t) => {
    if (!requireTools(t, 'qemu-img')) return;
    assert.ok(chainBuilt);
    assert.ok(chainDataBytes > 0 && zeroRanges.length > 0, 'the chain has data and zeros');
    const out = at('restored.raw');
    const { calls, options } = progressRecorder();
    const result = await restoreChain(top, out, options);
    checkResult(result, 'file');
    assert.equal(result.target, out);
    assert.equal(result.targetSize, SIZE);

    const stat = fs.statSync(out);
    assert.equal(stat.size, SIZE, 'the exact size from the manifest, not rounded to 512');
    assert.equal(stat.mode & 0o777, 0o600);
    assert.ok(fs.readFileSync(out).equals(model), 'content equals the model');
    assert.ok(!fs.existsSync(out + '.partial'), 'no partial file left');
    await assertIdentical(top, out);
    assertHoles(out);

    assert.ok(calls.length >= 1);
    const last = calls[calls.length - 1]!;
    assert.deepEqual(last, { doneBytes: SIZE, totalBytes: SIZE, dataBytes: chainDataBytes });
    for (let i = 1; i < calls.length; i++) {
      assert.ok(calls[i]!.doneBytes >= calls[i - 1]!.doneBytes, 'progress never goes back');
    }
  });

  it('refuses an existing file without force, and replaces it with force', async (t) => {
    if (!requireTools(t, 'qemu-img')) return;
    const out = at('existing.raw');
    const old = garbage(2 * MIB, 7);
    fs.writeFileSync(out, old, { mode: 0o640 });
    fs.chmodSync(out, 0o640);
    await assert.rejects(
      restoreChain(top, out, { chunkBytes: CHUNK }),
      (err: Error) =>
        err instanceof RestoreError &&
        /already exists/.test(err.message) &&
        /force/.test(err.message),
    );
    assert.ok(fs.readFileSync(out).equals(old), 'the existing file is untouched');
    assert.ok(!fs.existsSync(out + '.partial'));

    const result = await restoreChain(top, out, { force: true, chunkBytes: CHUNK });
    checkResult(result, 'file');
    assert.ok(fs.readFileSync(out).equals(model), 'replaced with the restored content');
    assert.equal(fs.statSync(out).mode & 0o777, 0o640, 'the replaced file keeps its mode');
    await assertIdentical(top, out);
    assertHoles(out);
  });

  it('refuses to overwrite an image of the chain, even with force', async () => {
    const base = at('full.qcow2');
    const original = fs.readFileSync(base);
    await assert.rejects(
      restoreChain(top, base, { force: true }),
      (err: Error) => err instanceof RestoreError && /part of the backup chain/.test(err.message),
    );
    assert.ok(fs.readFileSync(base).equals(original));
    assert.ok(!fs.existsSync(base + '.partial'));
  });

  it('replaces a leftover TARGET.partial of an earlier, interrupted restore', async () => {
    const out = at('leftover.raw');
    fs.writeFileSync(out + '.partial', garbage(SIZE + MIB, 8));
    await restoreChain(top, out, { chunkBytes: CHUNK });
    assert.ok(fs.readFileSync(out).equals(model));
    assert.ok(!fs.existsSync(out + '.partial'));
  });

  it('leaves no TARGET when the restore is interrupted midway', async () => {
    const out = at('interrupted.raw');
    let seenPartial = false;
    await assert.rejects(
      restoreChain(top, out, {
        chunkBytes: 64 * KIB,
        onProgress: (p) => {
          if (p.doneBytes > 0 && p.doneBytes < p.totalBytes) {
            seenPartial = fs.existsSync(out + '.partial') && !fs.existsSync(out);
            throw new Error('interrupted by the test');
          }
        },
      }),
      /interrupted by the test/,
    );
    assert.ok(seenPartial, 'the restore was writing TARGET.partial, not TARGET');
    assert.ok(!fs.existsSync(out), 'no TARGET');
    assert.ok(!fs.existsSync(out + '.partial'), 'the partial file is removed');
  });

  it('leaves no TARGET when the source fails during the copy', async () => {
    const chain = at('bad-l2');
    copyChain(chain);
    const image = join(chain, 'inc2.qcow2');
    // Set a reserved bit in the L2 entry of the last cluster: a damaged table the reader
    // refuses when it gets there (verification would refuse the chain up front).
    const fd = fs.openSync(image, 'r+');
    try {
      const header = Buffer.alloc(48);
      fs.readSync(fd, header, 0, 48, 0);
      const l1Offset = Number(header.readBigUInt64BE(40));
      const l1 = Buffer.alloc(8);
      fs.readSync(fd, l1, 0, 8, l1Offset);
      const l2Offset = Number(l1.readBigUInt64BE(0) & 0x00fffffffffffe00n);
      assert.ok(l2Offset > 0, 'inc2 has an L2 table');
      const lastCluster = Math.ceil(SIZE / CLUSTER) - 1;
      const entry = Buffer.alloc(8);
      fs.readSync(fd, entry, 0, 8, l2Offset + lastCluster * 8);
      entry[7] = entry[7]! | 0x02;
      fs.writeSync(fd, entry, 0, 8, l2Offset + lastCluster * 8);
    } finally {
      fs.closeSync(fd);
    }
    const out = at('bad-source.raw');
    await assert.rejects(
      restoreChain(image, out, { verify: false, chunkBytes: CHUNK }),
      (err: Error) => err instanceof RestoreError && err.message.includes('reserved bits'),
    );
    assert.ok(!fs.existsSync(out));
    assert.ok(!fs.existsSync(out + '.partial'));
    await assert.rejects(
      restoreChain(image, out, { chunkBytes: CHUNK }),
      (err: Error) => err instanceof RestoreError && /failed verification/.test(err.message),
    );
  });

  it('refuses a target in a directory that does not exist', async () => {
    await assert.rejects(
      restoreChain(top, at('no/such/dir/out.raw')),
      (err: Error) =>
        err instanceof RestoreError && /cannot create restore target/.test(err.message),
    );
  });
});

describe('restoreChain: damaged and broken chains', () => {
  it('refuses a chain with a damaged data cluster, listing the problem', async () => {
    const chain = at('damaged');
    copyChain(chain);
    const inc1 = join(chain, 'inc1.qcow2');
    // Data clusters start at host cluster 1, in guest order.
    const fd = fs.openSync(inc1, 'r+');
    try {
      const b = Buffer.alloc(1);
      fs.readSync(fd, b, 0, 1, CLUSTER + 100);
      b[0] = b[0]! ^ 0x40;
      fs.writeSync(fd, b, 0, 1, CLUSTER + 100);
    } finally {
      fs.closeSync(fd);
    }
    const out = at('damaged.raw');
    await assert.rejects(restoreChain(join(chain, 'inc2.qcow2'), out), (err: Error) => {
      assert.ok(err instanceof RestoreError);
      assert.match(err.message, /failed verification/);
      assert.match(err.message, /checksum mismatch/);
      assert.ok(err.message.includes(inc1), 'names the damaged image');
      assert.ok(err.problems.some((p) => p.image === inc1 && /checksum/.test(p.message)));
      return true;
    });
    assert.ok(!fs.existsSync(out) && !fs.existsSync(out + '.partial'));
  });

  it('names the missing backing file of a broken chain', async () => {
    const chain = at('broken');
    copyChain(chain);
    const missing = join(chain, 'inc1.qcow2');
    fs.rmSync(missing);
    for (const verify of [true, false]) {
      await assert.rejects(
        restoreChain(join(chain, 'inc2.qcow2'), at('broken.raw'), { verify }),
        (err: Error) => err instanceof RestoreError && err.message.includes(missing),
      );
    }
    assert.ok(!fs.existsSync(at('broken.raw')));
  });

  it('refuses a missing source', async () => {
    await assert.rejects(
      restoreChain(at('nothing.qcow2'), at('nothing.raw')),
      (err: Error) =>
        err instanceof RestoreError &&
        err.message === `backup image not found: ${at('nothing.qcow2')}`,
    );
  });

  it('restores an image without a manifest at its image size when verify is off', async () => {
    const chain = at('no-manifest');
    copyChain(chain);
    fs.rmSync(join(chain, 'inc2.qcow2.manifest'));
    const out = at('no-manifest.raw');
    await assert.rejects(restoreChain(join(chain, 'inc2.qcow2'), out), /manifest missing/);
    const result = await restoreChain(join(chain, 'inc2.qcow2'), out, { verify: false });
    const padded = Math.ceil(SIZE / 512) * 512;
    assert.equal(result.virtualSize, padded);
    const content = fs.readFileSync(out);
    assert.equal(content.length, padded);
    assert.ok(content.subarray(0, SIZE).equals(model));
    assert.ok(content.subarray(SIZE).equals(Buffer.alloc(padded - SIZE)));
  });
});

describe('restoreChain: to an NBD export', () => {
  let daemon: DaemonProcess | undefined;
  const sizes = { disk: SIZE, big: SIZE + MIB + 1, small: SIZE - 1, ro: SIZE };

  before(async () => {
    daemon = await spawnDaemon([
      '--no-control',
      '--export',
      `disk=memory:${sizes.disk}`,
      '--export',
      `big=memory:${sizes.big}`,
      '--export',
      `small=memory:${sizes.small}`,
      '--export',
      `ro=memory:${sizes.ro},readonly`,
    ]);
  });
  after(async () => {
    await daemon?.stop();
  });

  async function fill(name: string, content: Buffer): Promise<void> {
    const client = await NbdClient.fromUri(daemon!.uri(name));
    try {
      await client.write(0, content);
      await client.flush();
    } finally {
      await client.disconnect();
    }
  }

  async function readBack(name: string): Promise<Buffer> {
    const client = await NbdClient.fromUri(daemon!.uri(name));
    try {
      return await client.read(0, client.size);
    } finally {
      await client.disconnect();
    }
  }

  it('overwrites stale data: data ranges written, zero ranges zeroed', async () => {
    await fill('disk', garbage(sizes.disk, 11));
    const { calls, options } = progressRecorder();
    const result = await restoreChain(top, daemon!.uri('disk'), options);
    checkResult(result, 'nbd');
    assert.equal(result.targetSize, sizes.disk);
    assert.deepEqual(result.notes, []);
    assert.ok((await readBack('disk')).equals(model), 'the export reads as the model');
    assert.equal(calls[calls.length - 1]!.doneBytes, SIZE);
  });

  it('writes only the first virtualSize bytes of a larger export, and says so', async () => {
    const stale = garbage(sizes.big, 12);
    await fill('big', stale);
    const result = await restoreChain(top, daemon!.uri('big'), { chunkBytes: CHUNK });
    checkResult(result, 'nbd');
    assert.equal(result.targetSize, sizes.big);
    assert.ok(
      result.notes.some((n) => /larger than the backup/.test(n)),
      result.notes.join('\n'),
    );
    const back = await readBack('big');
    assert.ok(back.subarray(0, SIZE).equals(model));
    assert.ok(back.subarray(SIZE).equals(stale.subarray(SIZE)), 'the rest is left alone');
  });

  it('refuses an export smaller than the image', async () => {
    const content = garbage(sizes.small, 13);
    await fill('small', content);
    await assert.rejects(
      restoreChain(top, daemon!.uri('small')),
      (err: Error) => err instanceof RestoreError && /too small/.test(err.message),
    );
    assert.ok((await readBack('small')).equals(content), 'nothing was written');
  });

  it('refuses a read-only export', async () => {
    await assert.rejects(
      restoreChain(top, daemon!.uri('ro')),
      (err: Error) => err instanceof RestoreError && /read-only/.test(err.message),
    );
  });

  it('refuses TLS URIs and unreachable servers clearly', async () => {
    await assert.rejects(restoreChain(top, 'nbds://localhost/disk'), /TLS/);
    await assert.rejects(
      restoreChain(top, `nbd+unix:///disk?socket=${at('no-such.sock')}`),
      /cannot connect to NBD export/,
    );
  });
});

describe('restoreChain: to a block device', () => {
  /** A loop device over `image`; skipped without root or a working losetup. */
  function attachLoop(t: TestContext, image: string): string | undefined {
    if (process.getuid?.() !== 0) {
      t.skip('needs root for a loop device');
      return undefined;
    }
    const r = spawnSync('losetup', ['--find', '--show', image], { encoding: 'utf8' });
    if (r.status !== 0) {
      t.skip(`losetup unavailable: ${r.error?.message ?? r.stderr.trim()}`);
      return undefined;
    }
    return r.stdout.trim();
  }

  it('writes data and zeroes stale data on a loop device', async (t) => {
    const backing = at('loop.img');
    const deviceSize = Math.ceil((SIZE + MIB) / 4096) * 4096;
    const stale = garbage(deviceSize, 21);
    fs.writeFileSync(backing, stale);
    const loop = attachLoop(t, backing);
    if (loop === undefined) return;
    try {
      const result = await restoreChain(top, loop, { chunkBytes: CHUNK });
      checkResult(result, 'block-device');
      assert.equal(result.targetSize, deviceSize);
      assert.ok(result.notes.some((n) => /larger than the backup/.test(n)));
      const fd = fs.openSync(loop, 'r');
      const back = Buffer.alloc(deviceSize);
      try {
        fs.readSync(fd, back, 0, deviceSize, 0);
      } finally {
        fs.closeSync(fd);
      }
      assert.ok(back.subarray(0, SIZE).equals(model), 'the device reads as the model');
      assert.ok(back.subarray(SIZE).equals(stale.subarray(SIZE)), 'the rest is left alone');
    } finally {
      spawnSync('losetup', ['--detach', loop]);
    }
  });
});
