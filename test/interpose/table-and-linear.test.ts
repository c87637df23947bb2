/**
 * The pieces of `devfilter interpose` that need no kernel: parsing dm tables (linear targets
 * only; anything else refused with the table in the message) and the linear backend that
 * reproduces a table over files, checked against the files themselves.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { LinearBackend } from '../../src/backends/linear.js';
import { TableError, parseLinearTable, singleLinearTable } from '../../src/interpose/dm-table.js';
import { tempDir } from '../helpers/server.js';
import { pattern } from '../filters/fixture.js';

test('a multi-segment linear table parses; other tables are refused with the table shown', () => {
  const t = parseLinearTable('0 65536 linear 254:0 2048\n65536 131072 linear 8:16 100001\n');
  assert.deepEqual(t, [
    { start: 0, length: 65536, device: '254:0', offset: 2048 },
    { start: 65536, length: 131072, device: '8:16', offset: 100001 },
  ]);
  assert.equal(singleLinearTable(196608, '43:0'), '0 196608 linear 43:0 0');
  const refuse = (table: string, why: RegExp) =>
    assert.throws(
      () => parseLinearTable(table),
      (e: Error) =>
        e instanceof TableError && why.test(e.message) && e.message.includes(table.trim()),
    );
  refuse('0 2048 striped 2 128 8:0 0 8:16 0', /only "linear" targets.*"striped"/s);
  refuse('0 2048 linear 8:0 0\n0 2048 linear 8:0 0', /do not follow each other at sector 2048/);
  refuse('0 2048 linear 8:0 0\n4096 2048 linear 8:0 0', /do not follow each other/);
  refuse('0 2048 linear 8:0 x', /offset "x" is not a sector count/);
  refuse('0 2048 crypt aes-xts-plain64 0 0 8:0 0', /only "linear"/);
  assert.throws(() => parseLinearTable('\n'), /no table/);
});

test('the linear backend reads and writes each piece where the table puts it', async () => {
  const dir = tempDir('devfilter-linear-');
  try {
    const a = join(dir.path, 'a.img');
    const b = join(dir.path, 'b.img');
    fs.writeFileSync(a, pattern(1 << 20, 1));
    fs.writeFileSync(b, pattern(1 << 20, 2));
    // [0, 64K) at a+4K, [64K, 192K) at b+100K (not 4K-aligned), [192K, 256K) at a+512K.
    const segs = [
      { start: 0, length: 65536, path: a, offset: 4096 },
      { start: 65536, length: 131072, path: b, offset: 102400 + 512 },
      { start: 196608, length: 65536, path: a, offset: 524288 },
    ];
    const dev = await LinearBackend.open(segs);
    assert.equal(dev.info().size, 262144);
    const expect = Buffer.concat(
      segs.map((s) => fs.readFileSync(s.path).subarray(s.offset, s.offset + s.length)),
    );
    const all = Buffer.alloc(262144);
    await dev.read(all, 0, 0);
    assert.ok(all.equals(expect), 'reads follow the table');
    // A write across both boundaries lands in three places.
    const data = pattern(196608 - 60000 + 10000, 9);
    await dev.write(data, 60000, 1);
    data.copy(expect, 60000);
    await dev.read(all, 0, 0);
    assert.ok(all.equals(expect));
    await dev.close();
    const fa = fs.readFileSync(a);
    const fb = fs.readFileSync(b);
    assert.ok(fa.subarray(4096 + 60000, 4096 + 65536).equals(data.subarray(0, 5536)));
    assert.ok(fb.subarray(102912, 102912 + 131072).equals(data.subarray(5536, 5536 + 131072)));
    assert.ok(
      fa
        .subarray(524288, 524288 + data.length - 5536 - 131072)
        .equals(data.subarray(5536 + 131072)),
    );
    await assert.rejects(
      LinearBackend.open([{ start: 0, length: 4 << 20, path: a, offset: 0 }]),
      /a\.img has 1048576 bytes, the segment needs 4194304/,
    );
    await assert.rejects(
      LinearBackend.open([{ start: 512, length: 512, path: a, offset: 0 }]),
      /does not follow/,
    );
  } finally {
    dir.cleanup();
  }
});
