/**
 * The remote NBD backend's own rules, against an in-process server: request flags are put on
 * the wire as NBD numbers them (FAST_ZERO is not DF), and a connection lost with unflushed
 * writes makes the next flush fail once, even when that flush itself succeeds on the new
 * connection — and only once.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { NbdBackend } from '../../src/backends/nbd.js';
import { RequestFlags } from '../../src/core/device.js';
import type { NbdClient } from '../../src/nbd/client.js';
import { startTestServer } from '../helpers/server.js';

test('FAST_ZERO reaches the server as FAST_ZERO', async () => {
  const srv = await startTestServer([{ name: 'd', size: 1024 * 1024 }]);
  const b = await NbdBackend.open(srv.uri('d'), { connections: 1 });
  try {
    assert.ok(b.info().caps.fastZero, 'the memory backend offers fast zeroing');
    await b.writeZeroes(0, 65536, RequestFlags.FAST_ZERO);
    await b.writeZeroes(65536, 65536, RequestFlags.FAST_ZERO | RequestFlags.FUA);
  } finally {
    await b.close();
    await srv.close();
  }
});

test('a drop with unflushed writes fails the next flush once; later flushes succeed', async () => {
  const srv = await startTestServer([{ name: 'd', size: 1024 * 1024 }]);
  const b = await NbdBackend.open(srv.uri('d'), {
    connections: 1,
    backoffMs: { initial: 10, max: 50 },
  });
  const slots = (b as unknown as { slots: Array<{ client: NbdClient | null }> }).slots;
  try {
    await b.write(Buffer.alloc(4096, 1), 0, 0);
    await slots[0]!.client!.close(); // the connection drops under us
    await b.write(Buffer.alloc(4096, 2), 4096, 0); // waits for the reconnection
    await assert.rejects(b.flush(0), /EIO|may have lost/);
    await b.flush(0); // reported once
    // A drop with nothing unflushed loses nothing: no error.
    await slots[0]!.client!.close();
    const buf = Buffer.alloc(4096);
    await b.read(buf, 4096, 0);
    assert.ok(buf.every((x) => x === 2));
    await b.flush(0);
  } finally {
    await b.close();
    await srv.close();
  }
});
