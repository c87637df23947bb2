/**
 * Recovery from what a crash (or a power loss) can leave in the store, and from damage it
 * cannot: a torn record at the log's end is dropped; a last batch whose copied data never
 * reached the disk is dropped (its origin writes were never issued, so the origin still holds
 * that content); a damaged record before the last batch fails every snapshot, says why, and
 * keeps the damaged log beside the new one.
 */
import assert from 'node:assert/strict';
import { appendFileSync, readFileSync, readdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { DeviceError } from '../../src/core/errors.js';
import {
  LOG_HEADER_SIZE,
  RECORD_SIZE,
  decodeMeta,
  encodeMeta,
} from '../../src/filters/snapshot/format.js';
import { pattern } from '../filters/fixture.js';
import { KiB, MiB, readAll, startSnapFixture, type SnapFixture } from './fixture.js';

const CHUNK = 16 * KiB;
const SIZE = MiB;

describe('snapshot store recovery', () => {
  let fx: SnapFixture;
  let store: string;
  before(async () => {
    fx = await startSnapFixture([{ name: 'disk', size: SIZE }]);
    store = join(fx.storeDir, 'disk');
  });
  after(async () => {
    await fx.close();
  });

  /** Marks the store as not cleanly detached, as a crash leaves it. */
  const crashed = (): void => {
    const meta = decodeMeta(readFileSync(join(store, 'snapshot.meta')));
    writeFileSync(join(store, 'snapshot.meta'), encodeMeta({ ...meta, attached: true }));
  };

  test('a torn record at the end of the log is dropped', async () => {
    await fx.attach('disk', { chunkSize: CHUNK });
    const c = await fx.connect('disk');
    await c.write(0, pattern(SIZE, 1));
    await fx.control('disk', 'take', { name: 's' });
    const at = await readAll(fx.backend('disk'));
    await c.write(0, pattern(3 * CHUNK, 2));
    await fx.detach('disk', 'keep');
    appendFileSync(join(store, 'diff.log'), Buffer.alloc(20, 0x5a));
    crashed();
    const snap = await fx.attach('disk', { chunkSize: CHUNK });
    const st = snap.status() as {
      recovery: { unclean: boolean; droppedRecords: number };
      store: { logBytes: number };
    };
    assert.deepEqual([st.recovery.unclean, st.recovery.droppedRecords], [true, 1]);
    assert.equal(
      st.store.logBytes,
      LOG_HEADER_SIZE + 4 * RECORD_SIZE,
      'rewritten: 3 copies and a checkpoint',
    );
    assert.ok((await readAll(snap.image('s')!)).equals(at));
    await fx.detach('disk', 'drop');
  });

  test('a last batch whose data never reached the disk is dropped; the origin still holds it', async () => {
    await fx.attach('disk', { chunkSize: CHUNK });
    const c = await fx.connect('disk');
    await c.write(0, pattern(SIZE, 3));
    await fx.control('disk', 'take', { name: 's' });
    const at = await readAll(fx.backend('disk'));
    await c.write(0, pattern(CHUNK, 4)); // chunk 0 → slot 0, batch 1
    await c.write(5 * CHUNK, pattern(CHUNK, 5)); // chunk 5 → slot 1, batch 2 (the last)
    await fx.detach('disk', 'keep');
    // A power loss: the last batch's log record is on disk, its data and origin write are not.
    const data = readFileSync(join(store, 'diff.data'));
    pattern(CHUNK, 99).copy(data, CHUNK);
    writeFileSync(join(store, 'diff.data'), data);
    await fx.backend('disk').write(at.subarray(5 * CHUNK, 6 * CHUNK), 5 * CHUNK, 0);
    crashed();
    const snap = await fx.attach('disk', { chunkSize: CHUNK });
    const st = snap.status() as {
      recovery: { droppedRecords: number };
      store: { usedSlots: number };
    };
    assert.equal(st.recovery.droppedRecords, 1);
    assert.equal(st.store.usedSlots, 1);
    assert.ok(
      (await readAll(snap.image('s')!)).equals(at),
      'the image reads chunk 5 from the origin',
    );
    await c.write(5 * CHUNK, pattern(CHUNK, 6)); // copied again, correctly this time
    assert.ok((await readAll(snap.image('s')!)).equals(at));
    await fx.detach('disk', 'drop');
  });

  test('a damaged record before the last batch fails every snapshot, with the reason', async () => {
    await fx.attach('disk', { chunkSize: CHUNK });
    const c = await fx.connect('disk');
    await c.write(0, pattern(SIZE, 7));
    await fx.control('disk', 'take', { name: 'a' });
    await fx.control('disk', 'take', { name: 'b' });
    for (let i = 0; i < 3; i++) await c.write(i * CHUNK, pattern(CHUNK, 10 + i)); // three batches
    await fx.detach('disk', 'keep');
    const log = readFileSync(join(store, 'diff.log'));
    log[LOG_HEADER_SIZE + 10]! ^= 0xff; // record 0, batch 1
    writeFileSync(join(store, 'diff.log'), log);
    const snap = await fx.attach('disk', { chunkSize: CHUNK });
    for (const s of snap.list()) {
      assert.equal(s.state, 'failed');
      assert.match(s.reason!, /difference store log is damaged: record 0 .*checksum mismatch/);
    }
    await assert.rejects(
      snap.image('a')!.read(Buffer.alloc(512), 0, 0),
      (e: DeviceError) => e.errno === 'EIO',
    );
    assert.ok(
      readdirSync(store).some((f) => f.startsWith('diff.log.damaged-')),
      'the damaged log is kept',
    );
    // The rewritten log is clean: new snapshots work.
    await fx.control('disk', 'delete', { name: 'a' });
    await fx.control('disk', 'delete', { name: 'b' });
    await fx.control('disk', 'take', { name: 'c' });
    const at = await readAll(fx.backend('disk'));
    await c.write(0, pattern(SIZE, 8));
    assert.ok((await readAll(snap.image('c')!)).equals(at));
    await fx.detach('disk', 'drop');
  });
});
