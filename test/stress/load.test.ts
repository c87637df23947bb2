/**
 * Load and limits: 256 connections doing verified I/O at once, while one client floods
 * requests and never reads a reply. Every well-behaved client finishes with correct data,
 * and the daemon's memory stays bounded (per-connection in-flight limits and backpressure).
 */
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { NbdClient } from '../../src/nbd/client.js';
import { connectRaw, spawnDaemon, tempDir, type DaemonProcess } from '../helpers/server.js';

const CONNECTIONS = 256;
const BLOCK = 4096;

let dir: ReturnType<typeof tempDir>;
let daemon: DaemonProcess;

before(async () => {
  dir = tempDir();
  daemon = await spawnDaemon([
    '--export',
    `disk=file:${join(dir.path, 'disk.img')},create=64M`,
    '--no-control',
  ]);
});

after(async () => {
  await daemon.stop();
  dir.cleanup();
});

function rssMiB(pid: number): number {
  const status = readFileSync(`/proc/${pid}/status`, 'utf8');
  return Number(/VmRSS:\s+(\d+) kB/.exec(status)![1]) / 1024;
}

/** A client that negotiates, then sends `count` 1 MiB READs and never reads anything back. */
async function flooder(count: number): Promise<() => void> {
  const probe = await NbdClient.fromUri(daemon.uri('disk'));
  await probe.disconnect(); // the export works; now the rude one
  const s = await connectRaw(daemon.socket);
  s.on('error', () => undefined);
  // Handshake by hand: client flags, then GO for "disk" with no info requests.
  const name = Buffer.from('disk');
  const go = Buffer.alloc(4 + 16 + 4 + name.length + 2);
  go.writeUInt32BE(3, 0); // C_FIXED_NEWSTYLE | C_NO_ZEROES
  go.writeBigUInt64BE(0x49484156454f5054n, 4);
  go.writeUInt32BE(7, 12); // NBD_OPT_GO
  go.writeUInt32BE(4 + name.length + 2, 16);
  go.writeUInt32BE(name.length, 20);
  name.copy(go, 24);
  s.write(go);
  const requests = Buffer.alloc(28 * count);
  for (let i = 0; i < count; i++) {
    const r = requests.subarray(i * 28);
    r.writeUInt32BE(0x25609513, 0);
    r.writeUInt16BE(0, 6); // READ
    r.writeBigUInt64BE(BigInt(i + 1), 8);
    r.writeBigUInt64BE(BigInt((i % 32) * 1024 * 1024), 16);
    r.writeUInt32BE(1024 * 1024, 24);
  }
  s.write(requests);
  s.pause(); // and never read: replies pile up until the server stops taking requests
  return () => s.destroy();
}

test(`${CONNECTIONS} connections with verified I/O while a client never reads its replies`, async () => {
  const pid = daemon.child.pid!;
  const base = rssMiB(pid);
  const stopFlood = await flooder(2000); // 2 GiB of replies asked for
  const clients = await Promise.all(
    Array.from({ length: CONNECTIONS }, () => NbdClient.fromUri(daemon.uri('disk'))),
  );
  let peak = 0;
  const sampler = setInterval(() => (peak = Math.max(peak, rssMiB(pid))), 50);
  try {
    await Promise.all(
      clients.map(async (c, i) => {
        for (let round = 0; round < 8; round++) {
          const offset = (i * 8 + round) * BLOCK; // each client owns its blocks
          const data = Buffer.alloc(BLOCK, (i + round) & 0xff);
          data.writeUInt32BE(i, 0);
          await c.write(offset, data);
          assert.ok((await c.read(offset, BLOCK)).equals(data), `client ${i} round ${round}`);
        }
      }),
    );
  } finally {
    clearInterval(sampler);
    stopFlood();
    await Promise.all(clients.map((c) => c.disconnect()));
  }
  peak = Math.max(peak, rssMiB(pid));
  // 257 connections; only the flooder holds buffered replies, bounded by its in-flight limits.
  process.stderr.write(
    `daemon RSS: ${base.toFixed(0)} MiB at start, ${peak.toFixed(0)} MiB peak\n`,
  );
  assert.ok(peak - base < 400, `daemon grew by ${(peak - base).toFixed(0)} MiB under load`);
});
