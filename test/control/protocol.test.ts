/**
 * JSON-RPC 2.0 conformance of the control socket, and robustness: malformed, oversized and
 * garbage input never crash the server or disturb other clients.
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { statSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { pino } from 'pino';
import { tempDir } from '../helpers/server.js';
import { ControlClient } from '../../src/control/client.js';
import { ControlServer } from '../../src/control/server.js';
import { RPC_ERROR_CODES } from '../../src/control/protocol.js';
import { RawConn, errorOf, startControl, type ControlFixture } from './fixtures.js';

let fx: ControlFixture;
before(async () => {
  fx = await startControl({ maxConnections: 8 });
});
after(() => fx.close());

/** The server still answers a well-formed request on a fresh connection. */
async function stillServing(): Promise<void> {
  const c = await ControlClient.connect(fx.path);
  try {
    const r = await c.call<{ exports: unknown[] }>('export.list');
    assert.equal(r.exports.length, 2);
  } finally {
    c.close();
  }
}

describe('control socket', () => {
  it('is a socket with mode 0600 (owner only)', () => {
    const st = statSync(fx.path);
    assert.ok(st.isSocket());
    assert.equal(st.mode & 0o777, 0o600);
  });

  it('replaces a stale socket file but refuses one that answers', async () => {
    const dir = tempDir();
    try {
      const path = join(dir.path, 'c.sock');
      // A stale socket: a process bound it and died without removing the file.
      const r = spawnSync(process.execPath, [
        '-e',
        `require('net').createServer().listen(${JSON.stringify(path)}, () => process.kill(process.pid, 'SIGKILL'))`,
      ]);
      assert.equal(r.signal, 'SIGKILL');
      assert.ok(statSync(path).isSocket(), 'the stale socket file is there');
      const s1 = new ControlServer(fx.server.ctx, { logger: pino({ level: 'silent' }) });
      await s1.listen(path);
      assert.equal(statSync(path).mode & 0o777, 0o600);
      const s2 = new ControlServer(fx.server.ctx, { logger: pino({ level: 'silent' }) });
      await assert.rejects(s2.listen(path), { code: 'EADDRINUSE' });
      await s2.close();
      await s1.close();
    } finally {
      dir.cleanup();
    }
  });
});

describe('JSON-RPC conformance', () => {
  it('answers a request with the same id, and string ids too', async () => {
    const c = await RawConn.connect(fx.path);
    const r = await c.request({ jsonrpc: '2.0', id: 7, method: 'filter.list' });
    assert.deepEqual(r, { jsonrpc: '2.0', id: 7, result: { filters: [] } });
    const s = await c.request({
      jsonrpc: '2.0',
      id: 'abc',
      method: 'filter.list',
      params: { export: 'disk' },
    });
    assert.equal(s.id, 'abc');
    const n = await c.request({ jsonrpc: '2.0', id: null, method: 'filter.list' });
    assert.equal(n.id, null);
    assert.ok('result' in n);
    c.close();
  });

  it('parse error: -32700 with id null, and the connection keeps working', async () => {
    const c = await RawConn.connect(fx.path);
    c.write('{"jsonrpc": "2.0", "method": "filter.list", "id": 1\n');
    const r = (await c.next()) as Record<string, unknown>;
    assert.equal(r.id, null);
    assert.equal(errorOf(r).code, -32700);
    assert.equal(errorOf(r).data.code, 'parse-error');
    const ok = await c.request({ jsonrpc: '2.0', id: 2, method: 'filter.list' });
    assert.ok('result' in ok);
    c.close();
  });

  it('invalid requests: -32600', async () => {
    const c = await RawConn.connect(fx.path);
    const cases: [unknown, unknown][] = [
      [{ id: 1, method: 'filter.list' }, 1], // no jsonrpc
      [{ jsonrpc: '1.0', id: 2, method: 'filter.list' }, 2],
      [{ jsonrpc: '2.0', id: 3, method: 42 }, 3],
      [{ jsonrpc: '2.0', id: 4, method: 'filter.list', params: 'x' }, 4],
      [{ jsonrpc: '2.0', id: { a: 1 }, method: 'filter.list' }, null],
      [{ jsonrpc: '2.0', id: [1], method: 'filter.list' }, null],
      ['just a string', null],
      [42, null],
      [null, null],
    ];
    for (const [req, id] of cases) {
      const r = await c.request(req);
      assert.equal(errorOf(r).code, -32600, JSON.stringify(req));
      assert.equal(errorOf(r).data.code, 'invalid-request');
      assert.equal(r.id, id, JSON.stringify(req));
      assert.equal(r.jsonrpc, '2.0');
    }
    c.close();
  });

  it('unknown method: -32601', async () => {
    const c = await RawConn.connect(fx.path);
    const r = await c.request({ jsonrpc: '2.0', id: 1, method: 'filter.explode' });
    assert.equal(errorOf(r).code, -32601);
    assert.equal(errorOf(r).data.code, 'method-not-found');
    assert.match(errorOf(r).message, /filter\.explode/);
    const proto = await c.request({ jsonrpc: '2.0', id: 2, method: '__proto__' });
    assert.equal(errorOf(proto).code, -32601);
    const ts = await c.request({ jsonrpc: '2.0', id: 3, method: 'toString' });
    assert.equal(errorOf(ts).code, -32601);
    c.close();
  });

  it('invalid params: -32602 naming the field', async () => {
    const c = await RawConn.connect(fx.path);
    const check = async (params: unknown, pattern: RegExp): Promise<void> => {
      const r = await c.request({ jsonrpc: '2.0', id: 1, method: 'filter.create', params });
      assert.equal(errorOf(r).code, -32602, JSON.stringify(params));
      assert.equal(errorOf(r).data.code, 'invalid-params');
      assert.match(errorOf(r).message, pattern);
    };
    await check({ type: 'pass' }, /missing member "export"/);
    await check({ export: 5, type: 'pass' }, /params\.export must be string/);
    await check({ export: 'disk', type: 'pass', bogus: 1 }, /unknown member "bogus"/);
    await check(
      { export: 'disk', type: 'pass', at: 'middle' },
      /params\.at must be one of "top", "bottom"/,
    );
    await check(
      { export: 'disk', type: 'pass', above: 'a', below: 'b' },
      /only one of at, above, below/,
    );
    await check({ export: 'disk', type: 'pass', timeoutMs: -1 }, /params\.timeoutMs must be >= 1/);
    await check(['disk', 'pass'], /must be an object/);
    const r = await c.request({ jsonrpc: '2.0', id: 1, method: 'daemon.status', params: { x: 1 } });
    assert.equal(errorOf(r).code, -32602);
    c.close();
  });

  it('notifications get no response (even when they fail), but they run', async () => {
    const c = await RawConn.connect(fx.path);
    c.write(
      JSON.stringify({
        jsonrpc: '2.0',
        method: 'filter.create',
        params: { export: 'other', type: 'pass', name: 'note' },
      }) + '\n',
    );
    c.write(JSON.stringify({ jsonrpc: '2.0', method: 'no.such.method' }) + '\n');
    c.write(
      JSON.stringify({ jsonrpc: '2.0', method: 'filter.list', params: { bad: true } }) + '\n',
    );
    const r = await c.request({
      jsonrpc: '2.0',
      id: 99,
      method: 'filter.list',
      params: { export: 'other' },
    });
    assert.equal(r.id, 99, 'the first response is the one for the request with an id');
    assert.deepEqual(
      (r.result as { filters: { name: string }[] }).filters.map((f) => f.name),
      ['note'],
    );
    const removed = await c.request({
      jsonrpc: '2.0',
      id: 100,
      method: 'filter.removeAll',
      params: { export: 'other' },
    });
    assert.deepEqual(removed.result, { export: 'other', removed: 1 });
    c.close();
  });

  it('batches: answered as an array in order, notifications left out; empty and oversized batches refused', async () => {
    const c = await RawConn.connect(fx.path);
    c.write(
      JSON.stringify([
        { jsonrpc: '2.0', id: 1, method: 'filter.list' },
        { jsonrpc: '2.0', method: 'filter.list' },
        { jsonrpc: '2.0', id: 2, method: 'nope' },
        'garbage',
        { jsonrpc: '2.0', id: 3, method: 'export.list' },
      ]) + '\n',
    );
    const batch = (await c.next()) as Record<string, unknown>[];
    assert.ok(Array.isArray(batch));
    assert.deepEqual(
      batch.map((r) => [r.id, 'error' in r ? (r.error as { code: number }).code : 'ok']),
      [
        [1, 'ok'],
        [2, -32601],
        [null, -32600],
        [3, 'ok'],
      ],
    );
    c.write('[]\n');
    assert.equal(errorOf((await c.next()) as Record<string, unknown>).code, -32600);
    c.write(
      JSON.stringify(
        Array.from({ length: 65 }, (_, i) => ({ jsonrpc: '2.0', id: i, method: 'filter.list' })),
      ) + '\n',
    );
    assert.match(errorOf((await c.next()) as Record<string, unknown>).message, /batch of 65/);
    // A batch of notifications only: no response at all.
    c.write(JSON.stringify([{ jsonrpc: '2.0', method: 'filter.list' }]) + '\n');
    const r = await c.request({ jsonrpc: '2.0', id: 'after', method: 'filter.list' });
    assert.equal(r.id, 'after');
    c.close();
  });

  it('blank lines and CRLF line ends are accepted', async () => {
    const c = await RawConn.connect(fx.path);
    c.write(
      '\n\r\n   \n' + JSON.stringify({ jsonrpc: '2.0', id: 1, method: 'filter.list' }) + '\r\n',
    );
    const r = (await c.next()) as Record<string, unknown>;
    assert.equal(r.id, 1);
    assert.ok('result' in r);
    c.close();
  });

  it('requests split across writes and several in one write', async () => {
    const c = await RawConn.connect(fx.path);
    const line = JSON.stringify({ jsonrpc: '2.0', id: 1, method: 'export.list' }) + '\n';
    for (const ch of line.slice(0, 20)) {
      c.write(ch);
      await new Promise((r) => setTimeout(r, 2));
    }
    c.write(line.slice(20) + line.replace('"id":1', '"id":2') + line.replace('"id":1', '"id":3'));
    const ids = [];
    for (let i = 0; i < 3; i++) ids.push(((await c.next()) as Record<string, unknown>).id);
    assert.deepEqual(ids, [1, 2, 3]);
    c.close();
  });
});

describe('robustness', () => {
  it('an oversized line gets -32600 (too-large) and the connection is closed; others keep working', async () => {
    const other = await RawConn.connect(fx.path);
    const c = await RawConn.connect(fx.path);
    // 1 MiB + a bit, without a newline, in pieces.
    const piece = Buffer.alloc(64 * 1024, 0x61);
    for (let i = 0; i < 17 && !c.closed; i++) c.write(piece);
    const r = (await c.next()) as Record<string, unknown>;
    assert.equal(errorOf(r).code, -32600);
    assert.equal(errorOf(r).data.code, 'too-large');
    assert.equal(r.id, null);
    await c.waitClosed();
    const ok = await other.request({ jsonrpc: '2.0', id: 1, method: 'filter.list' });
    assert.ok('result' in ok);
    other.close();
    await stillServing();
  });

  it('a line just under the limit is parsed (and refused for what it is, not its size)', async () => {
    const c = await RawConn.connect(fx.path);
    const label = 'y'.repeat(1024 * 1024 - 200);
    const r = await c.request({
      jsonrpc: '2.0',
      id: 1,
      method: 'filter.list',
      params: { export: 'disk', label },
    });
    assert.equal(errorOf(r).code, -32602);
    c.close();
  });

  it('an oversized line with a newline far away is refused too', async () => {
    const c = await RawConn.connect(fx.path);
    c.write(Buffer.concat([Buffer.alloc(2 * 1024 * 1024, 0x20), Buffer.from('\n')]));
    const r = (await c.next()) as Record<string, unknown>;
    assert.equal(errorOf(r).data.code, 'too-large');
    await c.waitClosed();
  });

  it('garbage bytes: invalid UTF-8 and binary get -32700; the connection and daemon survive', async () => {
    const c = await RawConn.connect(fx.path);
    c.write(Buffer.from([0xff, 0xfe, 0x00, 0x80, 0x0a]));
    const r1 = (await c.next()) as Record<string, unknown>;
    assert.equal(errorOf(r1).code, -32700);
    assert.match(errorOf(r1).message, /UTF-8/);
    c.write(Buffer.from([0x7b, 0x00, 0x01, 0x02, 0x7d, 0x0a]));
    assert.equal(errorOf((await c.next()) as Record<string, unknown>).code, -32700);
    const random = Buffer.alloc(4096);
    for (let i = 0; i < random.length; i++) random[i] = (i * 7919 + 13) % 256;
    c.write(random);
    c.write('\n');
    // However many lines that was, every answer is a parse or request error, then it works.
    const ok = await c.request({ jsonrpc: '2.0', id: 'x', method: 'filter.list' });
    let last = ok;
    while (last.id !== 'x') last = (await c.next()) as Record<string, unknown>;
    assert.ok('result' in last);
    c.close();
    await stillServing();
  });

  it('half a message, then the client closes: nothing breaks', async () => {
    for (let i = 0; i < 20; i++) {
      const c = await RawConn.connect(fx.path);
      c.write('{"jsonrpc":"2.0","id":1,"method":"filter.cre');
      c.close();
    }
    await stillServing();
  });

  it('a request without its newline is answered when the client shuts down its side', async () => {
    const c = await RawConn.connect(fx.path);
    c.socket.end(JSON.stringify({ jsonrpc: '2.0', id: 5, method: 'filter.list' }));
    const r = (await c.next()) as Record<string, unknown>;
    assert.equal(r.id, 5);
    await c.waitClosed();
  });

  it('a client that closes while its request runs does not disturb the server', async () => {
    const c = await RawConn.connect(fx.path);
    c.write(
      JSON.stringify({
        jsonrpc: '2.0',
        id: 1,
        method: 'filter.create',
        params: { export: 'other', type: 'pass', name: 'gone' },
      }) + '\n',
    );
    c.close();
    await new Promise((r) => setTimeout(r, 50));
    await stillServing();
    await fx.manager.removeAll('other');
  });

  it('connections beyond the limit are told busy (-32001) and closed', async () => {
    const held: RawConn[] = [];
    try {
      for (let i = 0; i < 8; i++) held.push(await RawConn.connect(fx.path));
      await new Promise((r) => setTimeout(r, 50));
      const extra = await RawConn.connect(fx.path);
      const r = (await extra.next()) as Record<string, unknown>;
      assert.equal(errorOf(r).code, RPC_ERROR_CODES.busy);
      await extra.waitClosed();
    } finally {
      for (const h of held) h.close();
    }
    await new Promise((r) => setTimeout(r, 50));
    await stillServing();
  });
});

describe('events.subscribe', () => {
  it('streams manager events as "event" notifications until unsubscribed', async () => {
    const sub = await ControlClient.connect(fx.path);
    const seen: { method: string; params: Record<string, unknown> }[] = [];
    sub.on('notification', (method, params) =>
      seen.push({ method, params: params as Record<string, unknown> }),
    );
    assert.deepEqual(await sub.call('events.subscribe'), { subscribed: true });
    const c = await ControlClient.connect(fx.path);
    await c.call('filter.create', { export: 'disk', type: 'pass', name: 'ev' });
    await c.call('filter.control', {
      export: 'disk',
      name: 'ev',
      command: 'emit',
      args: { count: 2 },
    });
    await c.call('filter.remove', { export: 'disk', name: 'ev' });
    // Everything sent before the response to this call has arrived.
    await sub.call('filter.list');
    const events = seen
      .filter((s) => s.method === 'event')
      .map((s) => `${s.params.export}/${s.params.filter} ${s.params.event}`);
    assert.deepEqual(events, [
      'disk/ev filter.created',
      'disk/ev test.tick',
      'disk/ev test.tick',
      'disk/ev filter.control',
      'disk/ev filter.removed',
    ]);
    assert.equal(typeof seen[0]!.params.time, 'string');
    assert.deepEqual(await sub.call('events.unsubscribe'), { subscribed: false });
    const before = seen.length;
    await c.call('filter.create', { export: 'disk', type: 'pass', name: 'ev2' });
    await c.call('filter.remove', { export: 'disk', name: 'ev2' });
    await sub.call('filter.list');
    assert.equal(seen.length, before);
    c.close();
    sub.close();
  });

  it('subscribers that vanish free their slots; a half-closed one still gets events', async () => {
    const small = await startControl({ maxConnections: 4 });
    try {
      // Found by the control fuzzer: each subscriber that disconnected held a slot until the
      // next event, so a few of them locked everyone out with "busy".
      for (let i = 0; i < 12; i++) {
        const sub = await ControlClient.connect(small.path);
        await sub.call('events.subscribe');
        sub.close();
        const deadline = Date.now() + 5000;
        while (small.server.connectionCount > 0 && Date.now() < deadline)
          await new Promise((r) => setTimeout(r, 5));
        assert.equal(small.server.connectionCount, 0, `subscriber ${i} still holds a slot`);
      }
      const raw = await RawConn.connect(small.path);
      await raw.request({ jsonrpc: '2.0', id: 1, method: 'events.subscribe' });
      raw.socket.end(); // half-close: no more requests, events still wanted
      const ack = (await raw.next(10_000)) as Record<string, unknown>;
      assert.equal(ack.method, 'events.input-closed');
      const c = await ControlClient.connect(small.path);
      await c.call('filter.create', { export: 'disk', type: 'pass', name: 'after-end' });
      const m = (await raw.next(10_000)) as Record<string, unknown>;
      assert.equal(m.method, 'event');
      assert.equal((m.params as { event: string }).event, 'filter.created');
      await c.call('filter.remove', { export: 'disk', name: 'after-end' });
      c.close();
      raw.close();
    } finally {
      await small.close();
    }
  });

  it('a subscriber that does not read loses events (counted), and the server stays bounded', async () => {
    const small = await startControl({ maxEventBacklogBytes: 64 * 1024 });
    try {
      const raw = await RawConn.connect(small.path);
      const r = await raw.request({ jsonrpc: '2.0', id: 1, method: 'events.subscribe' });
      assert.deepEqual(r.result, { subscribed: true });
      raw.socket.pause(); // stop reading
      const c = await ControlClient.connect(small.path);
      await c.call('filter.create', { export: 'disk', type: 'pass', name: 'loud' });
      // ~20 MB of events: far more than the socket buffers plus the 64 KiB allowance.
      for (let i = 0; i < 10; i++) {
        await c.call('filter.control', {
          export: 'disk',
          name: 'loud',
          command: 'emit',
          args: { count: 2000, bytes: 1000 },
        });
      }
      raw.socket.resume();
      // Read until the drop notice arrives.
      let dropped: number | undefined;
      const deadline = Date.now() + 20_000;
      while (dropped === undefined && Date.now() < deadline) {
        const m = (await raw.next(10_000)) as Record<string, unknown>;
        if (m.method === 'events.dropped') dropped = (m.params as { count: number }).count;
      }
      assert.ok(
        dropped !== undefined && dropped > 0,
        `events were dropped and counted (${dropped})`,
      );
      // After catching up, events flow again.
      await c.call('filter.remove', { export: 'disk', name: 'loud' });
      let removedSeen = false;
      while (!removedSeen) {
        const m = (await raw.next(10_000)) as Record<string, unknown>;
        if (m.method === 'event' && (m.params as { event: string }).event === 'filter.removed')
          removedSeen = true;
      }
      c.close();
      raw.close();
    } finally {
      await small.close();
    }
  });
});
