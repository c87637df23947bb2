/**
 * The two core additions the snapshot filter needs, tested on their own:
 * - FilterEnv.deviceBelow reaches the layer below the filter; its requests are held during a
 *   stack change like client requests, and fail with ESHUTDOWN while the filter is not in
 *   the stack;
 * - FilterEnv.publishExport / unpublishExport: names are checked against every export, the
 *   manager emits 'export' changes, and a removed filter's exports are withdrawn.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { pino } from 'pino';
import { MemoryBackend } from '../../src/backends/memory.js';
import type { Device } from '../../src/core/device.js';
import type { DeviceError } from '../../src/core/errors.js';
import {
  FILTER_API_VERSION,
  type Filter,
  type FilterEnv,
  type FilterType,
} from '../../src/core/filter.js';
import { FilterTypeRegistry } from '../../src/core/filter-types.js';
import { DeviceManager, type ExportChange } from '../../src/core/manager.js';

function setup(): { manager: DeviceManager; envs: FilterEnv[] } {
  const types = new FilterTypeRegistry();
  const envs: FilterEnv[] = [];
  const probe: FilterType = {
    name: 'probe',
    apiVersion: FILTER_API_VERSION,
    description: 'test: remembers its env; adds 1 to every byte it reads',
    argsSchema: { type: 'object', properties: {}, additionalProperties: false },
    create: (_args, env): Filter => {
      envs.push(env);
      return {
        read: async (next, buf, offset, flags, ctx) => {
          await next.read(buf, offset, flags, ctx);
          for (let i = 0; i < buf.length; i++) buf[i] = (buf[i]! + 1) & 0xff;
        },
      };
    },
  };
  types.register(probe);
  const manager = new DeviceManager(types, pino({ level: 'silent' }));
  return { manager, envs };
}

test('deviceBelow reaches the layer below the filter, is held by stack changes, and ends with the filter', async () => {
  const { manager, envs } = setup();
  const exp = manager.addExport('d', new MemoryBackend({ size: 1 << 20 }), {
    backendLabel: 'memory:d',
  });
  await exp.stack.write(Buffer.from([10, 20]), 0, 0);
  await manager.createFilter('d', 'probe', { name: 'lower' });
  await manager.createFilter('d', 'probe', { name: 'upper' });
  const [lower, upper] = envs as [FilterEnv, FilterEnv];
  assert.equal(upper.backendLabel, 'memory:d');
  const read = async (d: Device): Promise<number[]> => {
    const b = Buffer.alloc(2);
    await d.read(b, 0, 0);
    return [...b];
  };
  assert.deepEqual(await read(exp.stack), [12, 22], 'clients see both filters');
  assert.deepEqual(await read(upper.deviceBelow!), [11, 21], 'below upper: lower and the backend');
  assert.deepEqual(await read(lower.deviceBelow!), [10, 20], 'below lower: the backend');

  // A stack change holds deviceBelow requests like client ones.
  let release!: () => void;
  const gate = new Promise<void>((r) => (release = r));
  const blocker: Filter = {
    read: (next, buf, o, f, c) => gate.then(() => next.read(buf, o, f, c)),
  };
  const blockEntry = {
    name: 'block',
    type: exp.stack.filters()[0]!.type,
    args: {},
    filter: blocker,
  };
  await exp.stack.change((cur) => [blockEntry, ...cur], 1000);
  const held = exp.stack.read(Buffer.alloc(1), 0, 0); // in flight, stuck in the blocker
  const changing = exp.stack.change((cur) => cur.filter((e) => e !== blockEntry), 5000);
  await new Promise((r) => setTimeout(r, 10));
  let belowDone = false;
  const viaBelow = read(lower.deviceBelow!).then((v) => ((belowDone = true), v));
  await new Promise((r) => setTimeout(r, 10));
  assert.equal(belowDone, false, 'held while the stack is suspended');
  release();
  await held;
  await changing;
  assert.deepEqual(await viaBelow, [10, 20]);

  await manager.removeFilter('d', 'lower');
  await assert.rejects(read(lower.deviceBelow!), (e: DeviceError) => e.errno === 'ESHUTDOWN');
  assert.deepEqual(
    await read(upper.deviceBelow!),
    [10, 20],
    'the chain below upper changed with the stack',
  );
  await manager.close();
});

test('published exports: checked names, events, withdrawn with their filter', async () => {
  const { manager, envs } = setup();
  manager.addExport('d', new MemoryBackend({ size: 1 << 20 }));
  const changes: ExportChange[] = [];
  manager.on('export', (c) => changes.push(c));
  await manager.createFilter('d', 'probe', { name: 'p' });
  const env = envs[0]!;
  const image = new MemoryBackend({ size: 4096 });
  env.publishExport!('d@one', image, { description: 'an image' });
  env.publishExport!('d@two', image);
  assert.throws(() => env.publishExport!('d', image), /already exists/, 'a managed export');
  assert.throws(() => env.publishExport!('d@one', image), /already exists/, 'a published export');
  assert.throws(() => env.publishExport!('bad name', image), /invalid export name/);
  assert.throws(() => manager.addExport('d@two', new MemoryBackend({ size: 1 })), /already exists/);
  assert.deepEqual(
    manager.publishedExports().map((p) => [p.name, p.readOnly, p.owner.filter]),
    [
      ['d@one', true, 'p'],
      ['d@two', true, 'p'],
    ],
  );
  assert.equal(manager.lookupPublished('d@one')?.description, 'an image');
  env.unpublishExport!('d@one');
  assert.equal(manager.lookupPublished('d@one'), undefined);
  await manager.removeFilter('d', 'p');
  assert.deepEqual(manager.publishedExports(), [], "a removed filter's exports are withdrawn");
  assert.deepEqual(
    changes.map((c) => [c.action, c.export.name]),
    [
      ['added', 'd@one'],
      ['added', 'd@two'],
      ['removed', 'd@one'],
      ['removed', 'd@two'],
    ],
  );
  await manager.close();
});
