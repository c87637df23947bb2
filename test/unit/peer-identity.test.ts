/**
 * Who a client is travels with its requests (IoContext.client): over a unix socket the uid and
 * gid the kernel recorded for the peer (SO_PEERCRED), over TCP its address and port — what
 * per-client rules (the access filter) and logs rely on.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import type { ClientInfo, IoContext } from '../../src/core/device.js';
import { MemoryBackend } from '../../src/backends/memory.js';
import { NbdClient } from '../../src/nbd/client.js';
import { startTestServer } from '../helpers/server.js';

class Recording extends MemoryBackend {
  seen: ClientInfo[] = [];
  override read(buf: Buffer, offset: number, flags: number, ctx?: IoContext): Promise<void> {
    if (ctx !== undefined) this.seen.push(ctx.client);
    return super.read(buf, offset, flags);
  }
}

test('unix clients carry their uid and gid; TCP clients their address', async () => {
  const device = new Recording({ size: 1024 * 1024 });
  const srv = await startTestServer([{ name: 'd', device }]);
  try {
    const c = await NbdClient.fromUri(srv.uri('d'));
    await c.read(0, 512);
    await c.close();
    assert.deepEqual(device.seen.at(-1), {
      transport: 'unix',
      uid: process.getuid!(),
      gid: process.getgid!(),
    });
    const tcp = await srv.server.listen({ host: '127.0.0.1', port: 0 });
    const port = (tcp.address() as { port: number }).port;
    const t = await NbdClient.fromUri(`nbd://127.0.0.1:${port}/d`);
    await t.read(0, 512);
    await t.close();
    const last = device.seen.at(-1)!;
    assert.equal(last.transport, 'tcp');
    assert.equal(last.address, '127.0.0.1');
    assert.equal(last.uid, undefined);
  } finally {
    await srv.close();
  }
});
