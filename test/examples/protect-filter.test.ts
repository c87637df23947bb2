/** The example external filter (examples/protect-filter.js), loaded as a user would load it. */
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { pino } from 'pino';
import { MemoryBackend } from '../../src/backends/memory.js';
import { FilterTypeRegistry } from '../../src/core/filter-types.js';
import { DeviceManager } from '../../src/core/manager.js';
import { NbdClient, NbdRequestError } from '../../src/nbd/client.js';
import { REPO_ROOT, startTestServer, type TestServer } from '../helpers/server.js';

const MIB = 1024 * 1024;
let manager: DeviceManager;
let server: TestServer;
let client: NbdClient;

before(async () => {
  const types = new FilterTypeRegistry();
  const loaded = await types.load('./examples/protect-filter.js', REPO_ROOT);
  assert.deepEqual(
    loaded.map((t) => t.name),
    ['protect'],
  );
  manager = new DeviceManager(types, pino({ level: 'silent' }));
  const exp = manager.addExport('disk', new MemoryBackend({ size: 16 * MIB }));
  server = await startTestServer([{ name: 'disk', device: exp.stack }]);
  client = await NbdClient.fromUri(server.uri('disk'));
});

after(async () => {
  await client.disconnect();
  await server.close();
});

const isEperm = (e: unknown): boolean => e instanceof NbdRequestError && e.errnoName === 'EPERM';

test('writes into a protected range fail with EPERM, exactly there, live', async () => {
  await client.write(0, Buffer.alloc(4096, 1)); // before the filter: allowed
  await manager.createFilter('disk', 'protect', {
    args: { ranges: JSON.stringify([[MIB, 2 * MIB]]) },
  });
  await client.write(MIB - 4096, Buffer.alloc(4096, 2)); // ends right at the range
  await client.write(2 * MIB, Buffer.alloc(4096, 2)); // starts right after it
  await assert.rejects(client.write(MIB - 1, Buffer.alloc(2)), isEperm);
  await assert.rejects(client.write(2 * MIB - 1, Buffer.alloc(1)), isEperm);
  await assert.rejects(client.trim(MIB, 4096), isEperm);
  await assert.rejects(client.writeZeroes(MIB + 512, 512), isEperm);
  assert.deepEqual(
    [...(await client.read(MIB - 1, 2))],
    [2, 0],
    'nothing was written by the refused request',
  );

  await manager.control('disk', 'protect', 'add', { start: '8388608', end: '9437184' });
  await assert.rejects(client.write(8 * MIB, Buffer.alloc(1)), isEperm);
  assert.deepEqual(manager.filterStatus('disk', 'protect').status, {
    ranges: [
      [MIB, 2 * MIB],
      [8 * MIB, 9 * MIB],
    ],
    denied: 5,
  });
  await assert.rejects(
    manager.control('disk', 'protect', 'add', { start: 5, end: 1 }),
    /invalid range/,
  );

  await manager.removeFilter('disk', 'protect');
  await client.write(MIB, Buffer.alloc(1, 3)); // gone: allowed again
  assert.deepEqual([...(await client.read(MIB, 1))], [3]);
});

test('a module that is not a filter type is refused with a clear message', async () => {
  const types = new FilterTypeRegistry();
  await assert.rejects(types.load(join(REPO_ROOT, 'package.json')), /cannot load filter module/);
  await assert.rejects(types.load('./dist/src/core/size.js', REPO_ROOT), /exports no filter type/);
});
