import assert from 'node:assert/strict';
import { test } from 'node:test';
import { BufferPool } from '../../src/nbd/buffer-pool.js';

test('buffers are reused by size class; slab-sized and huge ones are not pooled', () => {
  const pool = new BufferPool(8 * 1024 * 1024, 4 * 1024 * 1024);
  const a = pool.acquire(1024 * 1024 + 28);
  assert.equal(a.length, 1024 * 1024 + 28);
  assert.equal(a.buffer.byteLength, 1024 * 1024 + 64 * 1024);
  pool.release(a);
  const b = pool.acquire(1024 * 1024 + 20); // same class: the same memory comes back
  assert.equal(b.buffer, a.buffer);
  assert.equal(b.length, 1024 * 1024 + 20);
  const c = pool.acquire(1024 * 1024 + 20); // the class is empty now: fresh memory
  assert.notEqual(c.buffer, a.buffer);
  const reply = pool.acquire(4096 + 16); // a 4 KiB read reply: a 4.5 KiB class
  assert.equal(reply.buffer.byteLength, 4608);
  pool.release(reply);
  assert.equal(pool.acquire(4096 + 32).buffer, reply.buffer);
  const tiny = pool.acquire(1024);
  pool.release(tiny); // ignored: Node's slab allocator owns it
  assert.ok(pool.acquire(4096).buffer !== tiny.buffer, 'a slab slice was pooled');
  const huge = pool.acquire(16 * 1024 * 1024);
  pool.release(huge);
  assert.notEqual(pool.acquire(16 * 1024 * 1024).buffer, huge.buffer);
});

test('the pool keeps at most its byte budget idle, and refuses a double release', () => {
  const pool = new BufferPool(8 * 1024 * 1024, 2 * 1024 * 1024);
  const bufs = [pool.acquire(1024 * 1024), pool.acquire(1024 * 1024), pool.acquire(1024 * 1024)];
  for (const b of bufs) pool.release(b); // the third does not fit the 2 MiB budget
  const again = [pool.acquire(1024 * 1024), pool.acquire(1024 * 1024), pool.acquire(1024 * 1024)];
  const reused = again.filter((b) => bufs.some((x) => x.buffer === b.buffer));
  assert.equal(reused.length, 2);
  pool.release(again[0]!);
  assert.throws(() => pool.release(again[0]!), /released twice/);
});

test('slices of a shared slab are never taken into the pool', () => {
  const pool = new BufferPool(8 * 1024 * 1024, 64 * 1024 * 1024);
  // What Node's allocator hands out with a 128 KiB slab: the first slice of a shared region
  // whose size looks like a pooled class. Taking it in once corrupted replies.
  const slab = Buffer.allocUnsafeSlow(128 * 1024);
  const slice = slab.subarray(0, 4096 + 28);
  pool.release(slice);
  const big = pool.acquire(128 * 1024);
  assert.notEqual(big.buffer, slab.buffer, 'a pooled buffer reused memory the pool does not own');
});
