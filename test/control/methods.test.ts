/**
 * Every control method: the happy path, and the error codes it answers with.
 */
import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { ControlClient, callOnce } from '../../src/control/client.js';
import { ControlUnreachableError, RpcError } from '../../src/control/protocol.js';
import { METHOD_NAMES } from '../../src/control/schema.js';
import { gateType, startControl, type ControlFixture } from './fixtures.js';

let fx: ControlFixture;
let c: ControlClient;
const gate = gateType();
before(async () => {
  fx = await startControl({ extraTypes: [gate] });
  c = await ControlClient.connect(fx.path);
});
after(async () => {
  c.close();
  await fx.close();
});

/** Asserts that `p` rejects with an RpcError of the given code and name. */
async function rejectsWith(
  p: Promise<unknown>,
  code: number,
  name: string,
  message?: RegExp,
): Promise<void> {
  await assert.rejects(p, (err: unknown) => {
    assert.ok(err instanceof RpcError, `expected an RpcError, got ${String(err)}`);
    assert.equal(err.code, code, err.message);
    assert.equal(err.kind, name);
    if (message) assert.match(err.message, message);
    return true;
  });
}

const names = async (exp = 'disk'): Promise<string[]> =>
  (await c.call<{ filters: { name: string }[] }>('filter.list', { export: exp })).filters.map(
    (f) => f.name,
  );

describe('filter.create', () => {
  it('creates on top by default, with a generated name, validated and coerced args', async () => {
    const r = await c.call('filter.create', { export: 'disk', type: 'pass', args: { level: '3' } });
    assert.deepEqual(r, {
      export: 'disk',
      name: 'pass',
      type: 'pass',
      args: { level: 3 },
      index: 0,
    });
    const r2 = await c.call('filter.create', { export: 'disk', type: 'pass' });
    assert.deepEqual(r2, {
      export: 'disk',
      name: 'pass-2',
      type: 'pass',
      args: { level: 1 },
      index: 0,
    });
    assert.deepEqual(await names(), ['pass-2', 'pass']);
  });

  it('honours at, above and below', async () => {
    await c.call('filter.create', { export: 'disk', type: 'pass', name: 'bottom', at: 'bottom' });
    await c.call('filter.create', { export: 'disk', type: 'pass', name: 'mid', above: 'pass' });
    await c.call('filter.create', { export: 'disk', type: 'pass', name: 'low', below: 'pass' });
    await c.call('filter.create', {
      export: 'disk',
      type: 'pass',
      name: 'top',
      at: 'top',
      timeoutMs: 1000,
    });
    assert.deepEqual(await names(), ['top', 'pass-2', 'mid', 'pass', 'low', 'bottom']);
  });

  it('errors: not-found (-32004), exists (-32009), invalid (-32002), failed (-32000)', async () => {
    await rejectsWith(
      c.call('filter.create', { export: 'nope', type: 'pass' }),
      -32004,
      'not-found',
      /no export named "nope"/,
    );
    await rejectsWith(
      c.call('filter.create', { export: 'disk', type: 'pass', above: 'ghost' }),
      -32004,
      'not-found',
      /ghost/,
    );
    await rejectsWith(
      c.call('filter.create', { export: 'disk', type: 'pass', name: 'top' }),
      -32009,
      'exists',
    );
    await rejectsWith(
      c.call('filter.create', { export: 'disk', type: 'nope' }),
      -32002,
      'invalid',
      /unknown filter type "nope"/,
    );
    await rejectsWith(
      c.call('filter.create', { export: 'disk', type: 'pass', args: { level: 12 } }),
      -32002,
      'invalid',
      /level must be <= 9/,
    );
    await rejectsWith(
      c.call('filter.create', { export: 'disk', type: 'pass', args: { what: 1 } }),
      -32002,
      'invalid',
      /unknown argument "what"/,
    );
    await rejectsWith(
      c.call('filter.create', { export: 'disk', type: 'pass', name: 'bad name!' }),
      -32002,
      'invalid',
      /invalid filter name/,
    );
    await rejectsWith(
      c.call('filter.create', { export: 'disk', type: 'broken' }),
      -32000,
      'failed',
      /setup failed: cannot set up/,
    );
    assert.deepEqual(
      await names(),
      ['top', 'pass-2', 'mid', 'pass', 'low', 'bottom'],
      'nothing changed',
    );
  });
});

describe('filter.control, filter.status, filter.list', () => {
  it('control passes args and returns the result; errors map', async () => {
    assert.deepEqual(
      await c.call('filter.control', {
        export: 'disk',
        name: 'mid',
        command: 'ping',
        args: { a: '1' },
      }),
      { pong: { a: '1' } },
    );
    assert.deepEqual(
      await c.call('filter.control', { export: 'disk', name: 'mid', command: 'ping' }),
      { pong: {} },
    );
    await rejectsWith(
      c.call('filter.control', { export: 'disk', name: 'mid', command: 'nope' }),
      -32002,
      'invalid',
      /no command "nope"/,
    );
    await rejectsWith(
      c.call('filter.control', { export: 'disk', name: 'mid', command: 'fail' }),
      -32000,
      'failed',
      /it broke/,
    );
    await rejectsWith(
      c.call('filter.control', { export: 'disk', name: 'ghost', command: 'ping' }),
      -32004,
      'not-found',
    );
    await rejectsWith(
      c.call('filter.control', { export: 'disk', name: 'mid' }),
      -32602,
      'invalid-params',
      /missing member "command"/,
    );
  });

  it('status shows the summary and the filter status', async () => {
    const s = await c.call('filter.status', { export: 'disk', name: 'pass' });
    assert.deepEqual(s, {
      export: 'disk',
      name: 'pass',
      type: 'pass',
      args: { level: 3 },
      index: 3,
      status: { level: 3, label: null },
    });
    await rejectsWith(
      c.call('filter.status', { export: 'disk', name: 'ghost' }),
      -32004,
      'not-found',
    );
    await rejectsWith(
      c.call('filter.status', { export: 'ghost', name: 'pass' }),
      -32004,
      'not-found',
    );
  });

  it('list covers one export or all', async () => {
    await c.call('filter.create', { export: 'other', type: 'pass', name: 'o1' });
    const all = await c.call<{ filters: { export: string; name: string; index: number }[] }>(
      'filter.list',
    );
    assert.deepEqual(
      all.filters.map((f) => `${f.export}:${f.index}:${f.name}`),
      [
        'disk:0:top',
        'disk:1:pass-2',
        'disk:2:mid',
        'disk:3:pass',
        'disk:4:low',
        'disk:5:bottom',
        'other:0:o1',
      ],
    );
    await rejectsWith(c.call('filter.list', { export: 'ghost' }), -32004, 'not-found');
  });
});

describe('export.list, export.status, daemon.status, filter.types', () => {
  it('export.list', async () => {
    const r = await c.call('export.list');
    assert.deepEqual(r, {
      exports: [
        {
          name: 'disk',
          description: 'test disk',
          backend: 'memory:16M',
          size: 16 * 1024 * 1024,
          readOnly: false,
          filters: ['top', 'pass-2', 'mid', 'pass', 'low', 'bottom'],
        },
        {
          name: 'other',
          description: null,
          backend: 'memory:1M',
          size: 1024 * 1024,
          readOnly: false,
          filters: ['o1'],
        },
      ],
    });
  });

  it('export.status', async () => {
    const r = await c.call<Record<string, unknown>>('export.status', { export: 'other' });
    assert.equal(r.name, 'other');
    assert.equal(r.size, 1024 * 1024);
    assert.deepEqual(Object.keys(r.stack as object).sort(), [
      'changes',
      'held',
      'inFlight',
      'lastPauseMs',
    ]);
    assert.deepEqual(
      (r.filters as { name: string; status: unknown }[]).map((f) => [f.name, f.status]),
      [['o1', { level: 1, label: null }]],
    );
    await rejectsWith(c.call('export.status', { export: 'ghost' }), -32004, 'not-found');
    await rejectsWith(c.call('export.status', {}), -32602, 'invalid-params');
  });

  it('daemon.status', async () => {
    const r = await c.call<Record<string, unknown>>('daemon.status');
    assert.equal(r.version, '9.9.9');
    assert.equal(r.pid, process.pid);
    assert.equal(r.exports, 2);
    assert.equal(r.filters, 7);
    assert.equal(r.connections, 0);
    assert.ok((r.controlConnections as number) >= 1);
    assert.equal(r.controlSocket, fx.path);
    assert.deepEqual(r.filterTypes, ['broken', 'gate', 'pass']);
    assert.equal(typeof r.uptimeSeconds, 'number');
  });

  it('filter.types lists types with their argument schemas', async () => {
    const r = await c.call<{
      types: {
        name: string;
        argsSchema: { properties: object };
        removalPolicies: string[];
        source: string;
      }[];
    }>('filter.types');
    assert.deepEqual(
      r.types.map((t) => t.name),
      ['broken', 'gate', 'pass'],
    );
    const pass = r.types.find((t) => t.name === 'pass')!;
    assert.deepEqual(Object.keys(pass.argsSchema.properties), ['level', 'label']);
    assert.deepEqual(pass.removalPolicies, ['keep', 'discard']);
    assert.equal(pass.source, 'built-in');
  });
});

describe('filter.remove, filter.removeAll', () => {
  it('remove with a policy; unknown policy, filter and export are refused', async () => {
    const events: string[] = [];
    const onEvent = (e: {
      filter?: string;
      event: string;
      data?: Record<string, unknown>;
    }): void => {
      events.push(`${e.filter} ${e.event} ${JSON.stringify(e.data)}`);
    };
    fx.manager.on('event', onEvent);
    assert.deepEqual(
      await c.call('filter.remove', { export: 'disk', name: 'mid', policy: 'discard' }),
      { export: 'disk', name: 'mid', removed: true },
    );
    assert.deepEqual(await c.call('filter.remove', { export: 'disk', name: 'low' }), {
      export: 'disk',
      name: 'low',
      removed: true,
    });
    fx.manager.off('event', onEvent);
    assert.deepEqual(events, [
      'mid filter.removed {"policy":"discard"}',
      'low filter.removed {"policy":"keep"}',
    ]);
    await rejectsWith(
      c.call('filter.remove', { export: 'disk', name: 'pass', policy: 'shred' }),
      -32002,
      'invalid',
      /no removal policy "shred" \(one of: keep, discard\)/,
    );
    await rejectsWith(
      c.call('filter.remove', { export: 'disk', name: 'mid' }),
      -32004,
      'not-found',
    );
    await rejectsWith(
      c.call('filter.remove', { export: 'ghost', name: 'mid' }),
      -32004,
      'not-found',
    );
    assert.deepEqual(await names(), ['top', 'pass-2', 'pass', 'bottom']);
  });

  it('removeAll of one export, then of all', async () => {
    assert.deepEqual(await c.call('filter.removeAll', { export: 'other' }), {
      export: 'other',
      removed: 1,
    });
    assert.deepEqual(await c.call('filter.removeAll', { export: 'other' }), {
      export: 'other',
      removed: 0,
    });
    await rejectsWith(c.call('filter.removeAll', { export: 'ghost' }), -32004, 'not-found');
    assert.deepEqual(await c.call('filter.removeAll', { policy: 'discard' }), {
      export: null,
      removed: 4,
    });
    assert.deepEqual((await c.call<{ filters: unknown[] }>('filter.list')).filters, []);
  });
});

describe('a stack change that cannot drain', () => {
  it('times out with -32008 and leaves the stack as it was', async () => {
    await c.call('filter.create', { export: 'other', type: 'gate', name: 'g' });
    await c.call('filter.create', { export: 'other', type: 'pass', name: 'p', at: 'bottom' });
    await c.call('filter.control', { export: 'other', name: 'g', command: 'hold' });
    const exp = fx.manager.getExport('other');
    const stuck = exp.stack.read(Buffer.alloc(512), 0, 0);
    await rejectsWith(
      c.call('filter.create', { export: 'other', type: 'pass', name: 'new', timeoutMs: 200 }),
      -32008,
      'timeout',
      /still in flight/,
    );
    await rejectsWith(
      c.call('filter.remove', { export: 'other', name: 'p', timeoutMs: 100 }),
      -32008,
      'timeout',
    );
    await rejectsWith(
      c.call('filter.removeAll', { export: 'other', timeoutMs: 100 }),
      -32008,
      'timeout',
    );
    assert.deepEqual(await names('other'), ['g', 'p']);
    // Other connections and other exports are not held up meanwhile.
    assert.deepEqual(await callOnce(fx.path, 'filter.list', { export: 'disk' }), { filters: [] });
    gate.release();
    await stuck;
    await c.call('filter.create', { export: 'other', type: 'pass', name: 'new', timeoutMs: 200 });
    assert.deepEqual(await names('other'), ['new', 'g', 'p']);
    await c.call('filter.removeAll', { export: 'other' });
  });
});

describe('filter.loadModule', () => {
  it('loads a module by absolute path, or relative to cwd; refuses duplicates and bad modules', async () => {
    const mod = join(fx.dir, 'extra-filter.mjs');
    writeFileSync(
      mod,
      `export default { name: 'extra', apiVersion: 1, description: 'from a module', argsSchema: { type: 'object', properties: { n: { type: 'integer' } } }, create: () => ({}) };\n`,
    );
    assert.deepEqual(await c.call('filter.loadModule', { spec: mod }), {
      module: mod,
      types: ['extra'],
    });
    assert.ok(
      (await c.call<{ types: { name: string }[] }>('filter.types')).types.some(
        (t) => t.name === 'extra',
      ),
    );
    await c.call('filter.create', { export: 'disk', type: 'extra', args: { n: '5' } });
    await c.call('filter.remove', { export: 'disk', name: 'extra' });

    writeFileSync(
      join(fx.dir, 'second.mjs'),
      `export const filterTypes = [{ name: 'second', apiVersion: 1, description: 'x', argsSchema: { type: 'object', properties: {} }, create: () => ({}) }];\n`,
    );
    assert.deepEqual(await c.call('filter.loadModule', { spec: './second.mjs', cwd: fx.dir }), {
      module: './second.mjs',
      types: ['second'],
    });

    await rejectsWith(
      c.call('filter.loadModule', { spec: mod }),
      -32009,
      'exists',
      /already registered/,
    );
    await rejectsWith(
      c.call('filter.loadModule', { spec: join(fx.dir, 'missing.mjs') }),
      -32002,
      'invalid',
      /cannot load filter module/,
    );
    writeFileSync(
      join(fx.dir, 'v2.mjs'),
      `export default { name: 'vtwo', apiVersion: 2, description: 'x', argsSchema: { type: 'object', properties: {} }, create: () => ({}) };\n`,
    );
    await rejectsWith(
      c.call('filter.loadModule', { spec: join(fx.dir, 'v2.mjs') }),
      -32002,
      'invalid',
      /apiVersion 2 is not supported/,
    );
    writeFileSync(join(fx.dir, 'nothing.mjs'), `export const x = 1;\n`);
    await rejectsWith(
      c.call('filter.loadModule', { spec: join(fx.dir, 'nothing.mjs') }),
      -32002,
      'invalid',
      /exports no filter type/,
    );
    await rejectsWith(
      c.call('filter.loadModule', { spec: 'devfilter-no-such-package-xyz' }),
      -32002,
      'invalid',
      /cannot load filter module/,
    );
  });
});

describe('the schemas', () => {
  it('cover every method, and every method answers', async () => {
    const needs: Record<string, Record<string, unknown>> = {
      'filter.create': { export: 'ghost', type: 'pass' },
      'filter.remove': { export: 'ghost', name: 'x' },
      'filter.control': { export: 'ghost', name: 'x', command: 'y' },
      'filter.status': { export: 'ghost', name: 'x' },
      'filter.loadModule': { spec: '/nonexistent/x.mjs' },
      'export.status': { export: 'ghost' },
      'snapshot.create': { name: 's', exports: ['ghost'] },
      'snapshot.delete': { export: 'ghost', name: 's' },
      'snapshot.status': { export: 'ghost' },
      'snapshot.verify': { export: 'ghost' },
    };
    for (const m of METHOD_NAMES) {
      try {
        await c.call(m, needs[m] ?? {});
      } catch (err) {
        assert.ok(
          err instanceof RpcError && ['not-found', 'invalid'].includes(err.kind),
          `${m}: ${String(err)}`,
        );
      }
    }
    await c.call('events.unsubscribe');
  });
});

describe('ControlClient', () => {
  it('reports an unreachable socket and a timed-out call as ControlUnreachableError', async () => {
    await assert.rejects(ControlClient.connect(join(fx.dir, 'nothing.sock')), (err: unknown) => {
      assert.ok(err instanceof ControlUnreachableError);
      assert.match(err.message, /no such socket/);
      return true;
    });
    await c.call('filter.create', { export: 'other', type: 'gate', name: 'slow' });
    await c.call('filter.control', { export: 'other', name: 'slow', command: 'hold' });
    const stuck = fx.manager.getExport('other').stack.read(Buffer.alloc(512), 0, 0);
    // The change waits up to 2 s; the client gives up after 100 ms.
    await assert.rejects(
      c.call(
        'filter.create',
        { export: 'other', type: 'pass', timeoutMs: 2000 },
        { timeoutMs: 100 },
      ),
      ControlUnreachableError,
    );
    gate.release();
    await stuck;
    await c.call('filter.removeAll', {});
  });
});
