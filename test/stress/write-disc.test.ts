/**
 * A write followed at once by NBD_CMD_DISC (or by a bare hang-up) must never be lost: the
 * server completes every request it received before it closes. 1,000 connections, each
 * writing its own block then disconnecting without waiting for the reply; afterwards every
 * block is read back, through the server and from the file after the daemon has stopped.
 */
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { NbdClient } from '../../src/nbd/client.js';
import { spawnDaemon, tempDir, type DaemonProcess } from '../helpers/server.js';

const BLOCK = 4096;
const WRITES = 1000;
const PARALLEL = 8;

function pattern(i: number, salt: number): Buffer {
  const buf = Buffer.alloc(BLOCK);
  for (let p = 0; p < BLOCK; p += 8) {
    buf.writeUInt32BE(i, p);
    buf.writeUInt32BE(salt, p + 4);
  }
  return buf;
}

let dir: ReturnType<typeof tempDir>;
let daemon: DaemonProcess;
let image: string;

before(async () => {
  dir = tempDir();
  image = join(dir.path, 'disk.img');
  daemon = await spawnDaemon(['--export', `disk=file:${image},create=16M`]);
});

after(async () => {
  if (daemon.child.exitCode === null) await daemon.stop();
  dir.cleanup();
});

/** Runs `count` jobs, `parallel` at a time. */
async function pool(
  count: number,
  parallel: number,
  job: (i: number) => Promise<void>,
): Promise<void> {
  let next = 0;
  await Promise.all(
    Array.from({ length: parallel }, async () => {
      while (next < count) await job(next++);
    }),
  );
}

async function writeThenLeave(i: number, salt: number, how: 'disc' | 'eof'): Promise<void> {
  const client = await NbdClient.fromUri(daemon.uri('disk'), { structuredReplies: i % 2 === 0 });
  // The reply may or may not arrive before the close; what matters is that the data lands.
  const write = client.write(i * BLOCK, pattern(i, salt)).catch(() => undefined);
  if (how === 'disc') await client.disconnect({ waitForReplies: false });
  else await client.close();
  await write;
}

async function verifyAll(salt: number): Promise<void> {
  const client = await NbdClient.fromUri(daemon.uri('disk'));
  try {
    let lost = 0;
    for (let i = 0; i < WRITES; i++) {
      const got = await client.read(i * BLOCK, BLOCK);
      if (!got.equals(pattern(i, salt))) lost++;
    }
    assert.equal(lost, 0, `${lost} of ${WRITES} writes followed by a disconnect were lost`);
  } finally {
    await client.disconnect();
  }
}

test('1,000 writes each followed at once by NBD_CMD_DISC: none lost', async () => {
  await pool(WRITES, PARALLEL, (i) => writeThenLeave(i, 1, 'disc'));
  await verifyAll(1);
});

test('1,000 writes each followed at once by a hang-up without DISC: none lost', async () => {
  await pool(WRITES, PARALLEL, (i) => writeThenLeave(i, 2, 'eof'));
  await verifyAll(2);
});

test('after SIGTERM the file holds every write and the daemon exits 0', async () => {
  assert.equal(await daemon.stop(), 0, daemon.stderr());
  const file = readFileSync(image);
  for (let i = 0; i < WRITES; i++) {
    assert.ok(file.subarray(i * BLOCK, (i + 1) * BLOCK).equals(pattern(i, 2)), `block ${i}`);
  }
});
