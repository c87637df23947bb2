/**
 * The access filter through real NBD clients (our NbdClient, and qemu-io where simple) against
 * an in-process server: a deny rule on a range gives EPERM on exactly that range, read-only
 * rules, per-client rules (TCP source address 127.0.0.1 vs 127.0.0.2; unix peer uid, with a
 * second client running as another user), atomic rule swaps, audit lines for every deny and
 * audit event, and write-once ranges.
 */
import assert from 'node:assert/strict';
import { chmodSync, readFileSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { pino } from 'pino';
import { MemoryBackend } from '../../src/backends/memory.js';
import { FilterTypeRegistry } from '../../src/core/filter-types.js';
import { DeviceManager } from '../../src/core/manager.js';
import { verifyAuditLog } from '../../src/filters/access/audit-verify.js';
import { builtinFilterTypes } from '../../src/filters/index.js';
import { NbdClient } from '../../src/nbd/client.js';
import { NbdRequestError } from '../../src/nbd/client-errors.js';
import { ExportTable } from '../../src/nbd/exports.js';
import { NbdServer } from '../../src/nbd/server.js';
import { run } from '../helpers/run.js';
import { tempDir } from '../helpers/server.js';
import { hasTool, requireTools } from '../helpers/tools.js';

const KiB = 1024;
const MiB = 1024 * 1024;

interface Fx {
  manager: DeviceManager;
  backend: MemoryBackend;
  dir: string;
  socket: string;
  uri: string;
  port: number;
  unix(): Promise<NbdClient>;
  tcp(from: string): Promise<NbdClient>;
  create(args: Record<string, unknown>, name?: string): Promise<void>;
  control<T = Record<string, unknown>>(command: string, args?: Record<string, unknown>): Promise<T>;
  status<T = Record<string, unknown>>(): T;
  close(): Promise<void>;
}

async function start(size = 16 * MiB): Promise<Fx> {
  const logger = pino({ level: process.env.DEVFILTER_TEST_LOG ?? 'silent' });
  const types = new FilterTypeRegistry();
  builtinFilterTypes.forEach((t) => types.register(t));
  const manager = new DeviceManager(types, logger);
  const backend = new MemoryBackend({ size });
  const exp = manager.addExport('mem', backend);
  const table = new ExportTable();
  table.add({ name: 'mem', device: exp.stack });
  const server = new NbdServer({ exports: table, logger });
  const dir = tempDir('devfilter-access-');
  chmodSync(dir.path, 0o755); // a client of another user must reach the socket
  const socket = join(dir.path, 'nbd.sock');
  await server.listen({ path: socket });
  chmodSync(socket, 0o777);
  const tcp = await server.listen({ host: '127.0.0.1', port: 0 });
  const port = (tcp.address() as net.AddressInfo).port;
  const clients: NbdClient[] = [];
  const keep = (c: NbdClient): NbdClient => (clients.push(c), c);
  let filterName = 'acl';
  return {
    manager,
    backend,
    dir: dir.path,
    socket,
    uri: `nbd+unix:///mem?socket=${socket}`,
    port,
    unix: async () => keep(await NbdClient.fromUri(`nbd+unix:///mem?socket=${socket}`)),
    tcp: async (from) =>
      keep(
        await NbdClient.connect({
          socket: net.connect({ host: '127.0.0.1', port, localAddress: from }),
          exportName: 'mem',
        }),
      ),
    create: async (args, name = 'acl') => {
      filterName = name;
      await manager.createFilter('mem', 'access', { name, args });
    },
    control: async <T>(command: string, args: Record<string, unknown> = {}) =>
      (await manager.control('mem', filterName, command, args)) as T,
    status: <T>() => manager.filterStatus('mem', filterName).status as T,
    close: async () => {
      for (const c of clients) await c.close().catch(() => undefined);
      await server.close();
      await manager.close();
      dir.cleanup();
    },
  };
}

/** The errno name a request failed with, or 'ok'. */
async function outcome(p: Promise<unknown>): Promise<string> {
  try {
    await p;
    return 'ok';
  } catch (err) {
    if (err instanceof NbdRequestError) return err.errnoName ?? String(err.errno);
    throw err;
  }
}

interface AccessStatus {
  rules: { generation: number; rules: Array<{ hits: number }>; defaultHits: number; free: boolean };
  counters: { denied: number; audited: number; wormDenied: number };
  worm: { sealedBlocks: number; persistence: { mode: string } };
  auditLog: { lastSeq: number; written: number } | null;
}

const block = (seed: number, n = 4 * KiB): Buffer => Buffer.alloc(n, seed);

describe('no arguments', () => {
  test('an access filter created with no rules allows everything', async () => {
    const fx = await start();
    try {
      await fx.create({});
      const c = await fx.unix();
      assert.equal(await outcome(c.write(0, block(3))), 'ok');
      assert.ok((await c.read(0, 4 * KiB)).equals(block(3)));
      assert.equal(await outcome(c.trim(0, 4 * KiB)), 'ok');
      await c.disconnect();
      assert.equal(fx.status<AccessStatus>().counters.denied, 0);
    } finally {
      await fx.close();
    }
  });
});

describe('rules over NBD', () => {
  let fx: Fx;
  before(async () => {
    fx = await start();
  });
  after(async () => {
    await fx.close();
  });

  test('the issue example from a file: EPERM on exactly [0, 1M) for write, trim and zero', async () => {
    const file = join(fx.dir, 'rules.json');
    writeFileSync(
      file,
      '{"default": "allow", "rules": [{"action": "deny", "ops": ["write", "trim", "zero"], "range": [0, 1048576]}]}',
    );
    await fx.create({ rules: file, auditLog: join(fx.dir, 'audit.log') });
    const c = await fx.unix();
    assert.equal(await outcome(c.write(0, block(1))), 'EPERM');
    assert.equal(await outcome(c.write(MiB - 4 * KiB, block(1))), 'EPERM', 'last block inside');
    assert.equal(
      await outcome(c.write(MiB - 4 * KiB, block(1, 8 * KiB))),
      'EPERM',
      'a request overlapping the range partly is denied whole',
    );
    assert.equal(await outcome(c.write(MiB, block(2))), 'ok', 'the request next to it passes');
    assert.equal(await outcome(c.trim(512 * KiB, 4 * KiB)), 'EPERM');
    assert.equal(await outcome(c.writeZeroes(MiB - 1, 2)), 'EPERM');
    assert.equal(await outcome(c.writeZeroes(MiB, 4 * KiB)), 'ok');
    assert.equal(await outcome(c.read(0, 64 * KiB)), 'ok', 'reads are not named');
    assert.equal(await outcome(c.flush()), 'ok');
    // Nothing reached the device in the range; next to it the write (then zero) did.
    const inRange = Buffer.alloc(MiB);
    await fx.backend.read(inRange, 0, 0);
    assert.ok(inRange.equals(Buffer.alloc(MiB)));
    const s = fx.status<AccessStatus>();
    assert.equal(s.counters.denied, 5);
    assert.equal(s.rules.rules[0]!.hits, 5);
    const log = await verifyAuditLog(join(fx.dir, 'audit.log'));
    assert.equal(log.status, 'ok');
    assert.equal(log.denied, 5);
    const events = readFileSync(join(fx.dir, 'audit.log'), 'utf8')
      .trim()
      .split('\n')
      .map((l) => JSON.parse(l) as Record<string, unknown>)
      .filter((e) => e.type === 'event');
    assert.deepEqual(
      events.map((e) => [e.op, e.offset, e.length, e.rule, e.result, e.errno]),
      [
        ['write', 0, 4096, 'rules[0]', 'denied', 'EPERM'],
        ['write', MiB - 4096, 4096, 'rules[0]', 'denied', 'EPERM'],
        ['write', MiB - 4096, 8192, 'rules[0]', 'denied', 'EPERM'],
        ['trim', 512 * KiB, 4096, 'rules[0]', 'denied', 'EPERM'],
        ['zero', MiB - 1, 2, 'rules[0]', 'denied', 'EPERM'],
      ],
    );
    assert.deepEqual(events[0]!.client, {
      transport: 'unix',
      uid: process.getuid!(),
      gid: process.getgid!(),
    });
    assert.equal(events[0]!.export, 'mem');
  });

  test('qemu-io sees the same: EPERM inside, success next to it', async (t) => {
    if (!requireTools(t, 'qemu-io')) return;
    const io = (cmd: string) => run('qemu-io', ['-f', 'raw', '-c', cmd, fx.uri]);
    const denied = await io('write -P 0x11 0 4k');
    assert.match(denied.stdout + denied.stderr, /Operation not permitted/);
    const passed = await io(`write -P 0x22 ${MiB} 4k`);
    assert.equal(passed.code, 0, passed.stderr);
    assert.doesNotMatch(passed.stdout + passed.stderr, /failed/);
  });

  test('set-rules swaps atomically; a bad document changes nothing', async () => {
    const before = fx.status<AccessStatus>().rules.generation;
    await assert.rejects(
      fx.control('set-rules', {
        rules: {
          rules: [
            { action: 'deny', ops: 'read' },
            { action: 'deny', ops: 'nope' },
          ],
        },
      }),
      /rules\[1\]\.ops: unknown operation "nope"/,
    );
    assert.equal(fx.status<AccessStatus>().rules.generation, before);
    const c = await fx.unix();
    assert.equal(await outcome(c.read(0, 4096)), 'ok', 'the old rules are still in force');
    // Read-only: every change refused, reads pass.
    await fx.control('set-rules', {
      rules: '{"rules": [{"name": "ro", "action": "deny", "ops": "write,trim,zero"}]}',
    });
    assert.equal(await outcome(c.write(8 * MiB, block(3))), 'EPERM');
    assert.equal(await outcome(c.trim(8 * MiB, 4096)), 'EPERM');
    assert.equal(await outcome(c.writeZeroes(8 * MiB, 4096)), 'EPERM');
    assert.equal(await outcome(c.read(8 * MiB, 4096)), 'ok');
    assert.equal(await outcome(c.flush()), 'ok');
    // reload reads the file again: set-rules with a path made it the file.
    const file = join(fx.dir, 'rules.yaml');
    writeFileSync(file, 'default: allow\nrules:\n  - action: audit\n    ops: [write]\n');
    await fx.control('set-rules', { rules: file });
    assert.equal(await outcome(c.write(8 * MiB, block(4))), 'ok');
    writeFileSync(file, 'rules:\n  - action: deny\n    ops: write\n    range: [8M, 9M]\n');
    await fx.control('reload');
    assert.equal(await outcome(c.write(8 * MiB, block(5))), 'EPERM');
    assert.equal(await outcome(c.write(9 * MiB, block(5))), 'ok');
    writeFileSync(file, 'rules:\n  - action: deny\n    bogus: 1\n');
    await assert.rejects(fx.control('reload'), /rules\[0\]: unknown field "bogus"/);
    assert.equal(await outcome(c.write(8 * MiB, block(5))), 'EPERM', 'still the last good rules');
    const s = fx.status<AccessStatus>();
    assert.equal(s.counters.audited, 1);
    assert.equal((await verifyAuditLog(join(fx.dir, 'audit.log'))).status, 'ok');
  });

  test('per client: TCP source 127.0.0.2 is read-only, 127.0.0.1 is not', async () => {
    await fx.control('set-rules', {
      rules: {
        rules: [
          { action: 'deny', ops: 'write,trim,zero', address: '127.0.0.2/32' },
          { action: 'audit', ops: 'write', address: '127.0.0.0/8', range: ['4M', '5M'] },
        ],
      },
    });
    const a = await fx.tcp('127.0.0.1');
    const b = await fx.tcp('127.0.0.2');
    assert.equal(await outcome(a.write(4 * MiB, block(6))), 'ok');
    assert.equal(await outcome(b.write(4 * MiB, block(7))), 'EPERM');
    assert.equal(await outcome(b.trim(6 * MiB, 4096)), 'EPERM');
    assert.equal(await outcome(b.read(4 * MiB, 4096)), 'ok');
    assert.ok((await b.read(4 * MiB, 4096)).equals(block(6)), 'B reads what A wrote');
    const u = await fx.unix();
    assert.equal(await outcome(u.write(6 * MiB, block(8))), 'ok', 'unix peers have no address');
    const lines = readFileSync(join(fx.dir, 'audit.log'), 'utf8')
      .trim()
      .split('\n')
      .map((l) => JSON.parse(l) as { client?: { address?: string }; result?: string });
    const tail = lines.slice(-3);
    assert.deepEqual(
      tail.map((l) => [l.client?.address, l.result]),
      [
        ['127.0.0.1', 'allowed'],
        ['127.0.0.2', 'denied'],
        ['127.0.0.2', 'denied'],
      ],
    );
  });

  test('per client: unix peer uid (a second client runs as nobody)', async (t) => {
    if (process.getuid?.() !== 0 || !hasTool('setpriv')) {
      t.skip('needs root and setpriv to run a client as another user');
      return;
    }
    if (!requireTools(t, 'qemu-io')) return;
    await fx.control('set-rules', {
      rules: { rules: [{ action: 'deny', ops: 'write,trim,zero', uid: 65534 }] },
    });
    const asNobody = (cmd: string) =>
      run('setpriv', [
        '--reuid=65534',
        '--regid=65534',
        '--clear-groups',
        'qemu-io',
        '-f',
        'raw',
        '-c',
        cmd,
        fx.uri,
      ]);
    const denied = await asNobody(`write -P 0x33 ${10 * MiB} 4k`);
    assert.match(denied.stdout + denied.stderr, /Operation not permitted/);
    const read = await asNobody(`read -P 0 ${10 * MiB} 4k`);
    assert.equal(read.code, 0, read.stderr);
    assert.doesNotMatch(read.stdout + read.stderr, /failed|Permission/);
    const root = await fx.unix();
    assert.equal(await outcome(root.write(10 * MiB, block(9))), 'ok', 'uid 0 may write');
    const last = readFileSync(join(fx.dir, 'audit.log'), 'utf8').trim().split('\n');
    const denial = last
      .map((l) => JSON.parse(l) as { result?: string; client?: { uid?: number } })
      .filter((l) => l.result === 'denied')
      .at(-1)!;
    assert.equal(denial.client?.uid, 65534);
  });
});

describe('write-once ranges', () => {
  let fx: Fx;
  before(async () => {
    fx = await start();
  });
  after(async () => {
    await fx.close();
  });

  test('write once, then never overwrite, trim or zero; never-written blocks stay writable', async () => {
    await fx.create({
      rules: { worm: [['1M', '2M']] },
      auditLog: join(fx.dir, 'audit.log'),
      wormBlockSize: '4K',
    });
    const c = await fx.unix();
    assert.equal(await outcome(c.write(MiB, block(1))), 'ok', 'first write');
    assert.equal(await outcome(c.write(MiB, block(2))), 'EPERM', 'overwrite');
    assert.equal(await outcome(c.write(MiB + 2048, block(2, 512))), 'EPERM', 'partial overwrite');
    assert.equal(await outcome(c.trim(MiB, 4096)), 'EPERM');
    assert.equal(await outcome(c.writeZeroes(MiB, 4096)), 'EPERM');
    assert.equal(await outcome(c.trim(MiB + 64 * KiB, 4096)), 'EPERM', 'trim in the range');
    assert.equal(await outcome(c.write(MiB + 4096, block(3))), 'ok', 'a never-written block');
    assert.equal(
      await outcome(c.write(MiB - 4096, block(4, 12 * KiB))),
      'EPERM',
      'straddling into a written block',
    );
    assert.equal(await outcome(c.write(MiB - 4096, block(4))), 'ok', 'outside the range');
    assert.equal(await outcome(c.write(MiB - 4096, block(5))), 'ok', 'outside: rewritable');
    assert.ok((await c.read(MiB, 4096)).equals(block(1)), 'the first write stays');
    assert.ok((await c.read(MiB + 4096, 4096)).equals(block(3)));
    const s = fx.status<AccessStatus>();
    assert.equal(s.worm.sealedBlocks, 2);
    assert.equal(s.worm.persistence.mode, 'memory');
    assert.equal(s.counters.wormDenied, 6);
    const ws = await fx.control<{ extents: Array<{ offset: number; length: number }> }>(
      'worm-status',
    );
    assert.deepEqual(ws.extents, [{ offset: MiB, length: 8192 }]);
  });

  test('concurrent first writes to one block: exactly one wins', async () => {
    const c = await fx.unix();
    const d = await fx.unix();
    const at = MiB + 256 * KiB;
    const results = await Promise.all([
      outcome(c.write(at, block(0x41))),
      outcome(d.write(at, block(0x42))),
      outcome(c.write(at + 1024, block(0x43, 1024))),
    ]);
    assert.deepEqual(
      results.filter((r) => r === 'ok').length,
      1,
      `one write lands: ${results.join(',')}`,
    );
    const winner = results.indexOf('ok');
    const data = await c.read(at, 4096);
    if (winner < 2) assert.ok(data.equals(block(0x41 + winner)));
  });

  test('a block already holding data when the range was declared is refused', async () => {
    // Data put below the filter, as if written before the filter came.
    await fx.backend.write(block(0x77), MiB + 512 * KiB, 0);
    const c = await fx.unix();
    assert.equal(await outcome(c.write(MiB + 512 * KiB, block(1))), 'EPERM');
    assert.ok((await c.read(MiB + 512 * KiB, 4096)).equals(block(0x77)));
    const r = await verifyAuditLog(join(fx.dir, 'audit.log'));
    assert.equal(r.status, 'ok');
    const lines = readFileSync(join(fx.dir, 'audit.log'), 'utf8').trim().split('\n');
    assert.match(lines.at(-1)!, /"rule":"worm".*written before the filter knew it/);
  });

  test('write-once ranges can grow, never shrink, while attached', async () => {
    await assert.rejects(
      fx.control('set-rules', { rules: { worm: [['1M', '1536K']] } }),
      /write-once ranges can only grow/,
    );
    await fx.control('set-rules', { rules: { worm: [['1M', '3M']] } });
    const c = await fx.unix();
    assert.equal(await outcome(c.write(2 * MiB, block(1))), 'ok');
    assert.equal(await outcome(c.write(2 * MiB, block(1))), 'EPERM');
  });
});
