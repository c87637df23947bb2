/**
 * nbdinfo (libnbd) and nbd-client -l against `devfilter serve`: export properties, listing,
 * block status maps, TCP listeners and export names that need percent-encoding.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { tempDir } from '../helpers/server.js';
import { describeResult, run, runOk, tcpPort } from '../helpers/run.js';
import { requireTools } from '../helpers/tools.js';
import {
  KIB,
  MIB,
  assertCovers,
  overlapping,
  parseNbdinfoMap,
  withDaemon,
  type MapExtent,
} from './fixtures.js';

interface NbdinfoExport {
  'export-name': string;
  description?: string;
  'export-size': number;
  is_read_only: boolean;
  can_flush: boolean;
  can_fua: boolean;
  can_trim: boolean;
  can_zero: boolean;
  can_multi_conn: boolean;
  can_df?: boolean;
  contexts?: string[];
  block_size_minimum?: number;
  block_size_preferred?: number;
  block_size_maximum?: number;
}

interface NbdinfoJson {
  protocol: string;
  structured?: boolean;
  exports: NbdinfoExport[];
}

async function nbdinfoJson(...args: string[]): Promise<NbdinfoJson> {
  const r = await runOk('nbdinfo', ['--json', ...args], { timeoutMs: 20_000 });
  try {
    return JSON.parse(r.stdout) as NbdinfoJson;
  } catch (err) {
    throw new Error(
      `nbdinfo --json printed invalid JSON (${(err as Error).message}):\n${r.stdout}`,
    );
  }
}

let dir: { path: string; cleanup: () => void };
before(() => {
  dir = tempDir('devfilter-interop-nbdinfo-');
});
after(() => dir.cleanup());

describe('nbdinfo', () => {
  it('reports size and capabilities of a writable file export and a read-only one', async (t) => {
    if (!requireTools(t, 'nbdinfo')) return;
    const ro = join(dir.path, 'ro.img');
    fs.writeFileSync(ro, Buffer.alloc(3 * MIB, 0x42));
    await withDaemon(
      [
        '--export',
        `disk=file:${join(dir.path, 'caps.img')},create=48M,description=a sparse disk`,
        '--export',
        `ro=file:${ro},readonly`,
      ],
      async (d) => {
        const info = await nbdinfoJson(d.uri('disk'));
        assert.equal(info.protocol, 'newstyle-fixed');
        assert.equal(info.structured, true, 'structured replies negotiated');
        assert.equal(info.exports.length, 1);
        const disk = info.exports[0]!;
        assert.equal(disk['export-name'], 'disk');
        assert.equal(disk.description, 'a sparse disk');
        assert.equal(disk['export-size'], 48 * MIB);
        assert.equal(disk.is_read_only, false);
        for (const cap of [
          'can_flush',
          'can_fua',
          'can_trim',
          'can_zero',
          'can_multi_conn',
        ] as const) {
          assert.equal(disk[cap], true, `${cap} on a writable file export`);
        }
        assert.ok(
          disk.contexts?.includes('base:allocation'),
          `contexts: ${JSON.stringify(disk.contexts)}`,
        );
        if (disk.block_size_minimum !== undefined) {
          assert.ok(disk.block_size_minimum >= 1 && disk.block_size_minimum <= 64 * KIB);
          assert.ok(disk.block_size_maximum! >= disk.block_size_preferred!);
        }

        const roInfo = (await nbdinfoJson(d.uri('ro'))).exports[0]!;
        assert.equal(roInfo['export-name'], 'ro');
        assert.equal(roInfo['export-size'], 3 * MIB);
        assert.equal(roInfo.is_read_only, true);
        assert.equal(roInfo.can_trim, false, 'no trim on a read-only export');
        assert.equal(roInfo.can_zero, false, 'no write zeroes on a read-only export');
        assert.equal(roInfo.can_fua, false, 'no FUA on a read-only export');

        // A name the server does not have must fail, not silently give the default export.
        const bad = await run('nbdinfo', ['--json', d.uri('no-such-export')], {
          timeoutMs: 20_000,
        });
        assert.notEqual(bad.code, 0, describeResult('nbdinfo', [d.uri('no-such-export')], bad));
      },
    );
  });

  it('--list --json lists every export with its description', async (t) => {
    if (!requireTools(t, 'nbdinfo')) return;
    const exports = [
      {
        name: 'alpha',
        spec: `file:${join(dir.path, 'alpha.img')},create=8M`,
        description: 'first disk',
        size: 8 * MIB,
      },
      { name: 'beta', spec: 'memory:16M', description: 'scratch memory', size: 16 * MIB },
      {
        name: 'gamma',
        spec: 'memory:4M,readonly',
        description: 'read-only scratch é中',
        size: 4 * MIB,
      },
      { name: 'plain', spec: 'memory:1M', description: undefined, size: MIB },
    ];
    const args = exports.flatMap((e) => [
      '--export',
      `${e.name}=${e.spec}${e.description !== undefined ? `,description=${e.description}` : ''}`,
    ]);
    await withDaemon(args, async (d) => {
      const info = await nbdinfoJson('--list', d.uri());
      const byName = new Map(info.exports.map((e) => [e['export-name'], e]));
      assert.deepEqual([...byName.keys()].sort(), exports.map((e) => e.name).sort());
      for (const e of exports) {
        const got = byName.get(e.name)!;
        assert.equal(got.description, e.description, `description of ${e.name}`);
        assert.equal(got['export-size'], e.size, `size of ${e.name}`);
        assert.equal(got.is_read_only, e.name === 'gamma', `is_read_only of ${e.name}`);
      }
      // The plain-text listing names them too.
      const text = await runOk('nbdinfo', ['--list', d.uri()], { timeoutMs: 20_000 });
      for (const e of exports) assert.match(text.stdout, new RegExp(`export="${e.name}"`));
    });
  });

  it('--map and --map --json show a 64 KiB write at 1 MiB as data between holes', async (t) => {
    if (!requireTools(t, 'nbdinfo', 'qemu-io')) return;
    const image = join(dir.path, 'map.img');
    const size = 16 * MIB;
    await withDaemon(
      ['--export', `disk=file:${image},create=16M`, '--export', 'mem=memory:16M'],
      async (d) => {
        for (const name of ['disk', 'mem']) {
          const uri = d.uri(name);
          const fresh = parseNbdinfoMap(
            (await runOk('nbdinfo', ['--map', uri], { timeoutMs: 20_000 })).stdout,
          );
          assertCovers(fresh, size, `fresh ${name}`);
          for (const e of fresh)
            assert.equal(e.type, 3, `a fresh ${name} is all hole,zero: ${JSON.stringify(fresh)}`);

          await runOk('qemu-io', ['-f', 'raw', '-t', 'none', '-c', 'write -P 0x5a 1M 64k', uri], {
            timeoutMs: 20_000,
          });

          const text = parseNbdinfoMap(
            (await runOk('nbdinfo', ['--map', uri], { timeoutMs: 20_000 })).stdout,
          );
          const json = JSON.parse(
            (await runOk('nbdinfo', ['--map', '--json', uri], { timeoutMs: 20_000 })).stdout,
          ) as MapExtent[];
          assert.deepEqual(
            json.map((e) => [e.offset, e.length, e.type]),
            text.map((e) => [e.offset, e.length, e.type]),
            '--map and --map --json agree',
          );
          assertCovers(text, size, `${name} after the write`);
          // The written range is data (neither hole nor zero)...
          const written = { offset: MIB, length: 64 * KIB };
          for (const e of overlapping(text, written)) {
            assert.equal(
              e.type,
              0,
              `${name}: extent over the write should be data: ${JSON.stringify(text)}`,
            );
            assert.equal(e.description, 'data');
          }
          // ...and the rest reads as zeros, allowing the backend to round the data out to 64 KiB.
          const slack = 64 * KIB;
          const dataBytes = text.filter((e) => e.type !== 3).reduce((n, e) => n + e.length, 0);
          assert.ok(
            dataBytes <= written.length + 2 * slack,
            `${name}: too much data: ${JSON.stringify(text)}`,
          );
          for (const e of text.filter((x) => x.type !== 3)) {
            assert.ok(
              e.offset >= written.offset - slack &&
                e.offset + e.length <= written.offset + written.length + slack,
              `${name}: data outside the written range: ${JSON.stringify(text)}`,
            );
          }
          for (const e of text.filter((x) => x.type === 3))
            assert.equal(e.description, 'hole,zero');
          // This machine's file systems report it exactly; print it for the log.
          t.diagnostic(
            `${name}: ${text.map((e) => `${e.offset}+${e.length}:${e.type}`).join(' ')}`,
          );
        }
        // The file itself has the bytes.
        const fd = fs.openSync(image, 'r');
        const buf = Buffer.alloc(64 * KIB);
        fs.readSync(fd, buf, 0, buf.length, MIB);
        fs.closeSync(fd);
        assert.ok(
          buf.every((b) => b === 0x5a),
          'devfilter wrote the pattern into its file',
        );
      },
    );
  });
});

describe('TCP listener and export names', () => {
  it('serves nbd://127.0.0.1:PORT/name, and nbd-client -l lists the exports', async (t) => {
    if (!requireTools(t, 'nbdinfo', 'nbd-client')) return;
    await withDaemon(
      [
        '--listen',
        '127.0.0.1:0',
        '--export',
        'mem=memory:12M,description=memory over TCP',
        '--export',
        `disk=file:${join(dir.path, 'tcp.img')},create=20M`,
        '--export',
        'hello world=memory:3M',
        '--export',
        'é中=memory:5M',
      ],
      async (d) => {
        const port = await tcpPort(d);
        const mem = await nbdinfoJson(`nbd://127.0.0.1:${port}/mem`);
        assert.equal(mem.exports[0]!['export-name'], 'mem');
        assert.equal(mem.exports[0]!['export-size'], 12 * MIB);
        const disk = await nbdinfoJson(`nbd://127.0.0.1:${port}/disk`);
        assert.equal(disk.exports[0]!['export-size'], 20 * MIB);
        const utf8 = await nbdinfoJson(`nbd://127.0.0.1:${port}/${encodeURIComponent('é中')}`);
        assert.equal(utf8.exports[0]!['export-name'], 'é中');
        assert.equal(utf8.exports[0]!['export-size'], 5 * MIB);

        // nbd-client -l speaks NBD_OPT_LIST and prints "name[: description]" per export.
        const list = await runOk('nbd-client', ['-l', '127.0.0.1', String(port)], {
          timeoutMs: 20_000,
        });
        const lines = list.stdout.split('\n').map((l) => l.trim());
        assert.ok(lines.includes('mem: memory over TCP'), `nbd-client -l output:\n${list.stdout}`);
        assert.ok(lines.includes('disk'), `nbd-client -l output:\n${list.stdout}`);
        assert.ok(lines.includes('hello world'), `nbd-client -l output:\n${list.stdout}`);
        assert.ok(lines.includes('é中'), `nbd-client -l output:\n${list.stdout}`);
      },
    );
  });

  it('opens exports whose names need percent-encoding over the unix socket', async (t) => {
    if (!requireTools(t, 'nbdinfo', 'qemu-img')) return;
    await withDaemon(
      [
        '--export',
        'hello world=memory:3M',
        '--export',
        'é中=memory:5M',
        '--export',
        '/abs=memory:7M',
        '--export',
        'plain=memory:1M',
      ],
      async (d) => {
        const cases = [
          {
            uri: `nbd+unix:///hello%20world?socket=${d.socket}`,
            name: 'hello world',
            size: 3 * MIB,
          },
          {
            uri: `nbd+unix:///${encodeURIComponent('é中')}?socket=${d.socket}`,
            name: 'é中',
            size: 5 * MIB,
          },
          { uri: `nbd+unix:////abs?socket=${d.socket}`, name: '/abs', size: 7 * MIB },
        ];
        for (const c of cases) {
          const info = await nbdinfoJson(c.uri);
          assert.equal(info.exports[0]!['export-name'], c.name, c.uri);
          assert.equal(info.exports[0]!['export-size'], c.size, c.uri);
          // qemu decodes the path the same way.
          const q = await runOk('qemu-img', ['info', '--output=json', '-f', 'raw', c.uri], {
            timeoutMs: 20_000,
          });
          assert.equal(
            (JSON.parse(q.stdout) as { 'virtual-size': number })['virtual-size'],
            c.size,
            `qemu-img info ${c.uri}`,
          );
        }
        // Several exports and no default: the empty name must not silently pick one.
        const empty = await run('nbdinfo', [d.uri('')], { timeoutMs: 20_000 });
        assert.notEqual(
          empty.code,
          0,
          `the empty export name with no default export:\n${describeResult('nbdinfo', [d.uri('')], empty)}`,
        );
      },
    );
  });
});

describe('listing with other clients', () => {
  it('qemu-nbd --list shows names, sizes, flags and descriptions; --no-list refuses nbd-client -l', async (t) => {
    if (!requireTools(t, 'qemu-nbd', 'nbd-client')) return;
    await withDaemon(
      ['--export', 'one=memory:2M,description=first', '--export', 'two=memory:3M,readonly'],
      async (d) => {
        const r = await runOk('qemu-nbd', ['--list', '-k', d.socket], { timeoutMs: 20_000 });
        assert.match(r.stdout, /exports available: 2/);
        assert.match(r.stdout, /export: 'one'\n\s+description: first\n\s+size:\s+2097152\n/);
        assert.match(r.stdout, /export: 'two'\n\s+size:\s+3145728\n\s+flags: 0x\w+ \( readonly /);
        assert.match(r.stdout, /base:allocation/);
      },
    );
    await withDaemon(
      ['--no-list', '--listen', '127.0.0.1:0', '--export', 'hidden=memory:1M'],
      async (d) => {
        const port = await tcpPort(d);
        const args = ['-l', '127.0.0.1', String(port)];
        const r = await run('nbd-client', args, { timeoutMs: 20_000 });
        assert.notEqual(r.code, 0, describeResult('nbd-client', args, r));
        // nbd-client's message for NBD_REP_ERR_POLICY, the reply the spec asks for.
        assert.match(
          r.stdout + r.stderr,
          /listing not allowed by server/,
          describeResult('nbd-client', args, r),
        );
        assert.doesNotMatch(r.stdout, /hidden/);
      },
    );
  });
});
