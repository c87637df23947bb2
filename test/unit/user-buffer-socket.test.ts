import assert from 'node:assert/strict';
import net from 'node:net';
import { once } from 'node:events';
import { join } from 'node:path';
import { test } from 'node:test';
import { moveToUserBuffers } from '../../src/nbd/user-buffer-socket.js';
import { tempDir } from '../helpers/server.js';

test('a moved socket reads into the buffers it is given, and the server still counts it', async () => {
  const dir = tempDir();
  const path = join(dir.path, 's');
  const accepted: net.Socket[] = [];
  const server = net.createServer({ pauseOnConnect: true, allowHalfOpen: true }, (s) => {
    accepted.push(s);
  });
  server.listen(path);
  await once(server, 'listening');
  const client = net.connect(path);
  try {
    await once(client, 'connect');
    while (accepted.length === 0) await new Promise((r) => setImmediate(r));
    const plain = accepted[0]!;
    const errors: Error[] = [];
    plain.on('error', (err) => errors.push(err));
    // Bytes sent before the move are read the ordinary way first.
    plain.resume();
    client.write('before');
    const [first] = (await once(plain, 'data')) as [Buffer];
    assert.equal(first.toString(), 'before');

    const got: Buffer[] = [];
    const sizes: number[] = [];
    const small = Buffer.alloc(7);
    const moved = moveToUserBuffers(plain, {
      nextBuffer: () => small,
      received: (n, buf) => {
        assert.equal(buf, small);
        sizes.push(n);
        got.push(Buffer.from(small.subarray(0, n)));
      },
    });
    assert.ok(moved !== undefined, 'a plain unix socket can be moved');
    assert.equal(moved.leftover.length, 0);
    assert.equal(moved.socket.listenerCount('error'), 1, 'error listeners move along');
    moved.socket.resume();
    const message = 'after the move, longer than one buffer';
    client.write(message);
    while (Buffer.concat(got).length < message.length) await new Promise((r) => setImmediate(r));
    assert.equal(Buffer.concat(got).toString(), message);
    assert.ok(Math.max(...sizes) <= 7, 'no read larger than the buffer given');

    // Writing works on the new socket, and the server counts one connection until it closes.
    moved.socket.write('reply');
    const [reply] = (await once(client, 'data')) as [Buffer];
    assert.equal(reply.toString(), 'reply');
    const count = await new Promise<number>((resolve, reject) =>
      server.getConnections((err, n) => (err ? reject(err) : resolve(n))),
    );
    assert.equal(count, 1);
    plain.destroy(); // the old socket no longer owns the connection
    moved.socket.write('still open');
    const [again] = (await once(client, 'data')) as [Buffer];
    assert.equal(again.toString(), 'still open');
    moved.socket.destroy();
    await once(client, 'close');
    const closed = new Promise<void>((resolve) => server.close(() => resolve()));
    await closed; // resolves only once the server counts no connection
    assert.deepEqual(errors, []);
  } finally {
    client.destroy();
    server.close();
    dir.cleanup();
  }
});

test('a destroyed socket is not moved', () => {
  const socket = new net.Socket();
  socket.destroy();
  const moved = moveToUserBuffers(socket, {
    nextBuffer: () => Buffer.alloc(1),
    received: () => undefined,
  });
  assert.equal(moved, undefined);
});
