import assert from 'node:assert/strict';
import { test } from 'node:test';
import { ByteFifo } from '../../src/nbd/byte-fifo.js';

test('copyOut: queued bytes that lie in a reused buffer survive its overwrite, others stay views', () => {
  const fifo = new ByteFifo();
  const owned = Buffer.from('abc');
  // Its own memory, as a connection's receive buffer has (small Buffer.from()s share a slab).
  const reused = Buffer.allocUnsafeSlow(10);
  reused.write('0123456789');
  fifo.push(owned);
  fifo.push(reused.subarray(0, 6));
  fifo.skip(4); // "abc" and "0" consumed: the head sits inside the reused buffer
  fifo.copyOut(reused.buffer);
  reused.fill(0x78); // the next read overwrites it
  assert.equal(fifo.takeAll().toString(), '12345');

  fifo.push(owned);
  fifo.push(reused.subarray(0, 2));
  fifo.copyOut(reused.buffer);
  owned.write('XYZ');
  reused.fill(0x79);
  assert.equal(fifo.takeAll().toString(), 'XYZxx', 'only the reused buffer is copied');
});
