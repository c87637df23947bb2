import assert from 'node:assert/strict';
import { test } from 'node:test';
import { pino } from 'pino';
import { MemoryBackend } from '../../src/backends/memory.js';
import type { Device } from '../../src/core/device.js';
import { DeviceError } from '../../src/core/errors.js';
import { FILTER_API_VERSION, type Filter, type FilterType } from '../../src/core/filter.js';
import { FilterTypeRegistry } from '../../src/core/filter-types.js';
import { DeviceManager, ManagerError } from '../../src/core/manager.js';
import { LiveStack, StackChangeError, insertAt, type StackEntry } from '../../src/core/stack.js';

const SIZE = 1 << 20;
const silent = pino({ level: 'silent' });

function entry(name: string, filter: Filter): StackEntry {
  return { name, filter, args: {}, type: passType };
}

const passType: FilterType = {
  name: 'pass',
  apiVersion: FILTER_API_VERSION,
  description: 'passes everything through',
  argsSchema: { type: 'object', properties: {}, additionalProperties: false },
  create: () => ({}),
};

/** A filter that inverts every byte on the way down and back up: visible only in the backend. */
const invert: Filter = {
  async read(next, buf, offset, flags, ctx) {
    await next.read(buf, offset, flags, ctx);
    for (let i = 0; i < buf.length; i++) buf[i] = ~buf[i]! & 0xff;
  },
  async write(next, data, offset, flags, ctx) {
    const copy = Buffer.from(data);
    for (let i = 0; i < copy.length; i++) copy[i] = ~copy[i]! & 0xff;
    await next.write(copy, offset, flags, ctx);
  },
};

/** Hooks on every path that only pass requests on (with a copied payload, as a filter might). */
const copying: Filter = {
  read: (next, buf, offset, flags, ctx) => next.read(buf, offset, flags, ctx),
  write: (next, data, offset, flags, ctx) => next.write(Buffer.from(data), offset, flags, ctx),
  flush: (next, flags, ctx) => next.flush(flags, ctx),
};

async function readAt(d: Device, offset: number, length: number): Promise<Buffer> {
  const buf = Buffer.alloc(length);
  await d.read(buf, offset, 0);
  return buf;
}

test('filters pass, change, complete and fail requests; unset hooks pass through', async () => {
  const backend = new MemoryBackend({ size: SIZE });
  const stack = new LiveStack(backend);
  const denyHigh: Filter = {
    write(next, data, offset, flags, ctx) {
      if (offset >= SIZE / 2)
        return Promise.reject(new DeviceError('EPERM', 'upper half is protected'));
      return next.write(data, offset, flags, ctx);
    },
  };
  const answerFlush: Filter = { flush: () => Promise.resolve() }; // completes it itself
  await stack.change(
    () => [
      entry('deny', denyHigh),
      entry('invert', invert),
      entry('flush', answerFlush),
      entry('pass', {}),
    ],
    1000,
  );

  await stack.write(Buffer.from([1, 2, 3]), 10, 0);
  assert.deepEqual([...(await readAt(stack, 10, 3))], [1, 2, 3]);
  assert.deepEqual([...(await readAt(backend, 10, 3))], [0xfe, 0xfd, 0xfc]);
  await assert.rejects(
    stack.write(Buffer.from([1]), SIZE / 2, 0),
    (e: DeviceError) => e.errno === 'EPERM',
  );
  await stack.flush(0);
  assert.deepEqual(
    stack.filters().map((e) => e.name),
    ['deny', 'invert', 'flush', 'pass'],
  );
});

test('a filter changes the capabilities seen above it', async () => {
  const stack = new LiveStack(new MemoryBackend({ size: SIZE }));
  const readOnly: Filter = {
    info: (below) => ({ ...below, caps: { ...below.caps, readOnly: true, trim: false } }),
  };
  assert.equal(stack.info().caps.readOnly, false);
  await stack.change(() => [entry('ro', readOnly)], 1000);
  assert.equal(stack.info().caps.readOnly, true);
  assert.equal(stack.info().caps.trim, false);
  await stack.change(() => [], 1000);
  assert.equal(stack.info().caps.readOnly, false);
});

test('live attach and detach under concurrent I/O: no error, no lost or reordered write', async () => {
  const backend = new MemoryBackend({ size: SIZE });
  const stack = new LiveStack(backend);
  const model = Buffer.alloc(SIZE);
  let seed = 12345;
  const rand = (n: number): number => {
    seed = (seed * 1103515245 + 12345) % 2 ** 31;
    return seed % n;
  };
  // Each worker owns its own region, so the model is exact without cross-worker ordering.
  const workers = 8;
  const region = SIZE / workers;
  let stop = false;
  let ops = 0;
  const work = async (w: number): Promise<void> => {
    while (!stop) {
      const off = w * region + rand(region - 4096);
      const len = 1 + rand(4096);
      if (rand(2) === 0) {
        const data = Buffer.alloc(len, rand(256));
        await stack.write(data, off, 0);
        data.copy(model, off);
      } else {
        const got = await readAt(stack, off, len);
        assert.ok(
          got.equals(model.subarray(off, off + len)),
          `worker ${w} read mismatch at ${off}+${len}`,
        );
      }
      ops++;
      // The memory backend completes in microtasks; yield so the stack changes get to run.
      if (ops % 16 === 0) await new Promise((r) => setImmediate(r));
    }
  };
  const running = Array.from({ length: workers }, (_, w) => work(w));
  for (let i = 0; i < 100; i++) {
    const e = entry(`f${i}`, i % 2 ? copying : {});
    await stack.change((cur) => insertAt(cur, e, { at: 'top' }), 1000);
    await new Promise((r) => setImmediate(r));
    await stack.change((cur) => cur.filter((x) => x !== e), 1000);
  }
  stop = true;
  await Promise.all(running);
  assert.ok(ops > 100, `only ${ops} operations ran`);
  assert.equal(stack.stats().changes, 200);
  assert.ok((await readAt(backend, 0, SIZE)).equals(model), 'backend differs from the model');
});

test('requests held during a change resume in arrival order after the swap', async () => {
  const order: number[] = [];
  const backend = new MemoryBackend({ size: SIZE });
  const recorder: Filter = {
    write(next, data, offset, flags, ctx) {
      order.push(offset);
      return next.write(data, offset, flags, ctx);
    },
  };
  const stack = new LiveStack(backend);
  await stack.change(() => [entry('rec', recorder)], 1000);
  let release!: () => void;
  const slow: Filter = {
    read: (next, b, o, f, c) =>
      new Promise<void>((r) => (release = r)).then(() => next.read(b, o, f, c)),
  };
  await stack.change((cur) => [entry('slow', slow), ...cur], 1000);
  const stuck = readAt(stack, 0, 1);
  const changing = stack.change((cur) => cur.filter((e) => e.name !== 'slow'), 5000);
  await new Promise((r) => setImmediate(r)); // the change takes its lock and suspends
  const writes = [1, 2, 3, 4, 5].map((i) => stack.write(Buffer.from([i]), i * 100, 0));
  await new Promise((r) => setTimeout(r, 20));
  assert.equal(stack.stats().held, 5, 'writes should be held while the change drains');
  assert.deepEqual(order, []);
  release();
  await changing;
  await Promise.all(writes);
  await stuck;
  assert.deepEqual(order, [100, 200, 300, 400, 500]);
});

test('a change with a stuck request times out and leaves the stack as it was', async () => {
  const stack = new LiveStack(new MemoryBackend({ size: SIZE }));
  let release!: () => void;
  // Reads at offset 0 hang until released; everything else passes.
  const stuckFilter: Filter = {
    read: (next, b, o, f, c) =>
      o === 0
        ? new Promise<void>((r) => (release = r)).then(() => next.read(b, o, f, c))
        : next.read(b, o, f, c),
  };
  await stack.change(() => [entry('stuck', stuckFilter)], 1000);
  const stuck = readAt(stack, 0, 1);
  const before = stack.filters();
  await assert.rejects(
    stack.change((cur) => [entry('new', {}), ...cur], 100),
    (e: StackChangeError) => e.reason === 'timeout' && /still in flight/.test(e.message),
  );
  assert.equal(stack.filters(), before, 'stack must be unchanged');
  // The gate is open again: writes go through while the stuck read is still stuck.
  await stack.write(Buffer.from([7]), 5, 0);
  release();
  await stuck;
  assert.deepEqual([...(await readAt(stack, 5, 1))], [7]);
});

test('insert positions and errors', () => {
  const a = entry('a', {});
  const b = entry('b', {});
  const c = entry('c', {});
  assert.deepEqual(
    insertAt([a, b], c, { above: 'b' }).map((e) => e.name),
    ['a', 'c', 'b'],
  );
  assert.deepEqual(
    insertAt([a, b], c, { below: 'a' }).map((e) => e.name),
    ['a', 'c', 'b'],
  );
  assert.deepEqual(
    insertAt([a, b], c, { at: 'bottom' }).map((e) => e.name),
    ['a', 'b', 'c'],
  );
  assert.deepEqual(
    insertAt([a, b], c, { at: 'top' }).map((e) => e.name),
    ['c', 'a', 'b'],
  );
  assert.throws(
    () => insertAt([a], c, { above: 'zz' }),
    (e: StackChangeError) => e.reason === 'not-found',
  );
  assert.throws(
    () => insertAt([a], a, { at: 'top' }),
    (e: StackChangeError) => e.reason === 'exists',
  );
});

function manager(...extra: FilterType[]): DeviceManager {
  const types = new FilterTypeRegistry();
  types.register(passType);
  for (const t of extra) types.register(t);
  const m = new DeviceManager(types, silent);
  m.addExport('disk', new MemoryBackend({ size: SIZE }));
  return m;
}

test('manager: create, list, status, control, remove, remove-all, with validation', async () => {
  const destroyed: string[] = [];
  const counter: FilterType<{ step: number }> = {
    name: 'counter',
    apiVersion: FILTER_API_VERSION,
    description: 'counts writes',
    argsSchema: {
      type: 'object',
      properties: { step: { type: 'integer', minimum: 1, default: 1 } },
      additionalProperties: false,
    },
    removalPolicies: ['keep', 'drop'],
    create(args) {
      let n = 0;
      return {
        write: (next, d, o, f, c) => ((n += args.step), next.write(d, o, f, c)),
        status: () => ({ writes: n }),
        control(command) {
          if (command !== 'reset') throw new (class extends Error {})(`unknown command ${command}`);
          n = 0;
          return { ok: true };
        },
        destroy: (policy) => void destroyed.push(policy),
      };
    },
  };
  const m = manager(counter as unknown as FilterType);
  const events: string[] = [];
  m.on('event', (e) => events.push(`${e.event}:${e.filter}`));
  // String arguments (as from the command line) are coerced by the schema.
  const created = await m.createFilter('disk', 'counter', { args: { step: '2' } });
  assert.deepEqual(created, {
    export: 'disk',
    name: 'counter',
    type: 'counter',
    args: { step: 2 },
    index: 0,
  });
  await m.createFilter('disk', 'pass', { position: { below: 'counter' } });
  await m.createFilter('disk', 'pass', {});
  assert.deepEqual(
    m.listFilters('disk').map((f) => f.name),
    ['pass-2', 'counter', 'pass'],
  );
  const stack = m.getExport('disk').stack;
  await stack.write(Buffer.from([1]), 0, 0);
  assert.deepEqual(m.filterStatus('disk', 'counter').status, { writes: 2 });
  await m.control('disk', 'counter', 'reset');
  assert.deepEqual(m.filterStatus('disk', 'counter').status, { writes: 0 });
  await assert.rejects(
    m.control('disk', 'counter', 'bogus'),
    (e: ManagerError) => e.code === 'failed',
  );
  await assert.rejects(
    m.createFilter('disk', 'counter', { args: { step: 0 } }),
    (e: ManagerError) => e.code === 'invalid' && /step/.test(e.message),
  );
  await assert.rejects(
    m.createFilter('disk', 'counter', { args: { nope: 1 } }),
    (e: ManagerError) => e.code === 'invalid' && /nope/.test(e.message),
  );
  await assert.rejects(m.createFilter('disk', 'nosuch'), (e: ManagerError) => e.code === 'invalid');
  await assert.rejects(
    m.createFilter('nodisk', 'pass'),
    (e: ManagerError) => e.code === 'not-found',
  );
  await assert.rejects(
    m.createFilter('disk', 'pass', { name: 'counter' }),
    (e: ManagerError) => e.code === 'exists',
  );
  await assert.rejects(
    m.removeFilter('disk', 'counter', { policy: 'shred' }),
    (e: ManagerError) => e.code === 'invalid' && /keep, drop/.test(e.message),
  );
  await m.removeFilter('disk', 'counter', { policy: 'drop' });
  assert.deepEqual(destroyed, ['drop']);
  assert.equal(await m.removeAll('disk'), 2);
  assert.deepEqual(m.listFilters(), []);
  assert.deepEqual(events.slice(0, 3), [
    'filter.created:counter',
    'filter.created:pass',
    'filter.created:pass-2',
  ]);
});

test('manager: a filter whose setup fails leaves the export untouched', async () => {
  const failing: FilterType = {
    ...passType,
    name: 'failing',
    create: () => Promise.reject(new Error('disk full')),
  };
  const m = manager(failing);
  await m.createFilter('disk', 'pass');
  const before = m.getExport('disk').stack.filters();
  await assert.rejects(
    m.createFilter('disk', 'failing'),
    (e: ManagerError) => e.code === 'failed' && /disk full/.test(e.message),
  );
  assert.equal(m.getExport('disk').stack.filters(), before);
});

test('manager: a create that times out destroys the prepared filter and changes nothing', async () => {
  let destroyed = 0;
  const tracked: FilterType = {
    ...passType,
    name: 'tracked',
    create: () => ({ destroy: () => void destroyed++ }),
  };
  let release!: () => void;
  const stuckType: FilterType = {
    ...passType,
    name: 'stuck',
    create: () => ({
      read: (next, b, o, f, c) =>
        new Promise<void>((r) => (release = r)).then(() => next.read(b, o, f, c)),
    }),
  };
  const m = manager(tracked, stuckType);
  await m.createFilter('disk', 'stuck');
  const stuck = readAt(m.getExport('disk').stack, 0, 1);
  await assert.rejects(
    m.createFilter('disk', 'tracked', { timeoutMs: 50 }),
    (e: ManagerError) => e.code === 'timeout',
  );
  assert.equal(destroyed, 1);
  assert.deepEqual(
    m.listFilters('disk').map((f) => f.name),
    ['stuck'],
  );
  release();
  await stuck;
});
