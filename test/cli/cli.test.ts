/**
 * The real `devfilter` CLI against a real daemon: output (tables and --json), exit codes,
 * finding the control socket (--control, DEVFILTER_CONTROL), several daemons side by side.
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { background, describeResult, waitFor, type RunResult } from '../helpers/run.js';
import { CLI, spawnDaemon, tempDir } from '../helpers/server.js';
import { runCli, startCliDaemon, writeTestModules, type CliDaemon } from './fixtures.js';

let dir: { path: string; cleanup: () => void };
let d: CliDaemon;
let mods: ReturnType<typeof writeTestModules>;

before(async () => {
  dir = tempDir('devfilter-cli-test-');
  mods = writeTestModules(dir.path);
  d = await startCliDaemon([
    '-e',
    'disk=memory:16M',
    '-e',
    'other=memory:1M,readonly',
    '--filter-module',
    mods.echo,
    '--filter-module',
    mods.broken,
  ]);
});
after(async () => {
  const code = await d.close();
  dir.cleanup();
  assert.equal(code, 0, 'daemon exits 0 on SIGTERM');
});

function ok(r: RunResult, what: string): RunResult {
  assert.equal(r.code, 0, describeResult('devfilter', [what], r));
  return r;
}

function exits(r: RunResult, code: number, stderr: RegExp): void {
  assert.equal(r.code, code, describeResult('devfilter', [], r));
  assert.match(r.stderr, stderr);
}

describe('devfilter filter …', () => {
  it('the control socket is owner-only', () => {
    assert.equal(statSync(d.control).mode & 0o777, 0o600);
  });

  it('types: a table, one type in detail, and --json with the schemas', async () => {
    const r = ok(await d.cli(['filter', 'types']), 'types');
    assert.match(r.stdout, /^TYPE\s+SOURCE\s+DESCRIPTION\n/);
    assert.match(
      r.stdout,
      new RegExp(
        `^echo\\s+${mods.echo.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}\\s+test: echoes`,
        'm',
      ),
    );
    const one = ok(await d.cli(['filter', 'types', 'echo']), 'types echo');
    assert.match(one.stdout, /removal policies: keep, drop \(default keep\)/);
    assert.match(one.stdout, /^level\s+integer\s+no\s+1\s+a level$/m);
    assert.match(one.stdout, /^tags\s+string\[\]/m);
    assert.match(one.stdout, /^mode\s+"a"\|"b"/m);
    const j = await d.json<{ types: { name: string; argsSchema: unknown }[] }>(['filter', 'types']);
    assert.ok(j.types.some((t) => t.name === 'echo' && typeof t.argsSchema === 'object'));
    exits(await d.cli(['filter', 'types', 'nope']), 3, /unknown filter type "nope"/);
  });

  it('create, list, status, control, remove, with tables', async () => {
    let r = ok(
      await d.cli([
        'filter',
        'create',
        'disk',
        'echo',
        '--name',
        'e1',
        '--arg',
        'level=4',
        '--arg',
        'tags=x',
        '--arg',
        'tags=y',
      ]),
      'create',
    );
    assert.equal(r.stdout, 'created filter e1 (echo) on export disk at position 0\n');
    r = ok(
      await d.cli([
        'filter',
        'create',
        'disk',
        'echo',
        '--below',
        'e1',
        '--args-json',
        '{"tags":["j"],"level":2}',
        '-a',
        'level=3',
      ]),
      'create 2',
    );
    assert.equal(r.stdout, 'created filter echo (echo) on export disk at position 1\n');
    r = ok(
      await d.cli(['filter', 'create', 'disk', 'echo', '--name', 'top', '--timeout', '2000']),
      'create 3',
    );
    r = ok(await d.cli(['filter', 'list']), 'list');
    assert.equal(
      r.stdout,
      [
        'EXPORT  POS  NAME  TYPE  ARGS',
        'disk    0    top   echo  level=1',
        'disk    1    e1    echo  level=4,tags=["x","y"]',
        'disk    2    echo  echo  tags=["j"],level=3',
        '',
      ].join('\n'),
    );
    assert.equal(ok(await d.cli(['filter', 'list', 'other']), 'list other').stdout, 'no filters\n');

    r = ok(await d.cli(['filter', 'status', 'disk', 'e1']), 'status');
    assert.match(
      r.stdout,
      /^export: disk\nname: e1\ntype: echo\nposition: 1\nargs:\n {2}level: 4\n/,
    );
    assert.match(r.stdout, /filterName: e1/);

    r = ok(
      await d.cli([
        'filter',
        'control',
        'disk',
        'e1',
        'set',
        'a=1',
        'b=two',
        '--args-json',
        '{"c":[1]}',
      ]),
      'control',
    );
    assert.equal(r.stdout, 'command: set\nargs:\n  c:\n    - 1\n  a: "1"\n  b: two\n');
    const j = await d.json(['filter', 'control', 'disk', 'e1', 'go', 'x=y']);
    assert.deepEqual(j, { command: 'go', args: { x: 'y' } });

    r = ok(await d.cli(['filter', 'remove', 'disk', 'e1', '--policy', 'drop']), 'remove');
    assert.equal(r.stdout, 'removed filter e1 from export disk\n');
    r = ok(await d.cli(['filter', 'remove-all', 'disk']), 'remove-all');
    assert.equal(r.stdout, 'removed 2 filter(s) from export disk\n');
  });

  it('--json prints exactly the JSON result', async () => {
    const created = await d.json(['filter', 'create', 'disk', 'echo', '--name', 'j1', '--bottom']);
    assert.deepEqual(created, {
      export: 'disk',
      name: 'j1',
      type: 'echo',
      args: { level: 1 },
      index: 0,
    });
    assert.deepEqual(await d.json(['filter', 'list', 'disk']), { filters: [created] });
    assert.deepEqual(await d.json(['filter', 'status', 'disk', 'j1']), {
      ...(created as object),
      status: { args: { level: 1 }, exportName: 'disk', filterName: 'j1' },
    });
    assert.deepEqual(await d.json(['filter', 'remove', 'disk', 'j1']), {
      export: 'disk',
      name: 'j1',
      removed: true,
    });
    assert.deepEqual(await d.json(['filter', 'remove-all']), { export: null, removed: 0 });
  });

  it('exit 3 for what does not exist', async () => {
    exits(
      await d.cli(['filter', 'remove', 'disk', 'ghost']),
      3,
      /^devfilter: no filter named "ghost" on export "disk"\n$/,
    );
    exits(await d.cli(['filter', 'create', 'ghost', 'echo']), 3, /no export named "ghost"/);
    exits(
      await d.cli(['filter', 'create', 'disk', 'echo', '--above', 'ghost']),
      3,
      /no filter named "ghost"/,
    );
    exits(await d.cli(['filter', 'status', 'disk', 'ghost']), 3, /no filter named/);
    exits(await d.cli(['filter', 'control', 'disk', 'ghost', 'x']), 3, /no filter named/);
    exits(await d.cli(['filter', 'list', 'ghost']), 3, /no export/);
    exits(await d.cli(['filter', 'remove-all', 'ghost']), 3, /no export/);
    exits(await d.cli(['status', 'ghost']), 3, /no export/);
  });

  it('with --json, errors are JSON on stderr', async () => {
    const r = await d.cli(['filter', 'remove', 'disk', 'ghost', '--json']);
    assert.equal(r.code, 3);
    assert.equal(r.stdout, '');
    assert.deepEqual(JSON.parse(r.stderr), {
      error: {
        code: -32004,
        message: 'no filter named "ghost" on export "disk"',
        data: { code: 'not-found' },
      },
    });
  });

  it('exit 2 for usage errors and invalid arguments', async () => {
    exits(
      await d.cli(['filter', 'create', 'disk', 'echo', '--arg', 'level=12']),
      2,
      /echo: level must be <= 9/,
    );
    exits(
      await d.cli(['filter', 'create', 'disk', 'echo', '--arg', 'bogus=1']),
      2,
      /unknown argument "bogus"/,
    );
    exits(await d.cli(['filter', 'create', 'disk', 'nope']), 2, /unknown filter type "nope"/);
    exits(
      await d.cli(['filter', 'create', 'disk', 'echo', '--arg', 'novalue']),
      2,
      /expected KEY=VALUE/,
    );
    exits(
      await d.cli(['filter', 'create', 'disk', 'echo', '--args-json', '[1]']),
      2,
      /expected a JSON object/,
    );
    exits(
      await d.cli(['filter', 'create', 'disk', 'echo', '--above', 'a', '--below', 'b']),
      2,
      /cannot be used with/,
    );
    exits(
      await d.cli(['filter', 'create', 'disk', 'echo', '--timeout', 'soon']),
      2,
      /expected milliseconds/,
    );
    exits(await d.cli(['filter', 'create', 'disk']), 2, /missing required argument 'type'/);
    exits(await d.cli(['filter', 'frobnicate']), 2, /unknown command/);
    exits(await d.cli(['filter', 'control', 'disk', 'x', 'cmd', 'oops']), 2, /expected KEY=VALUE/);
    ok(await d.cli(['filter', 'create', 'disk', 'echo', '--name', 'dup']), 'create dup');
    exits(
      await d.cli(['filter', 'create', 'disk', 'echo', '--name', 'dup']),
      2,
      /already on export "disk"/,
    );
    exits(
      await d.cli(['filter', 'remove', 'disk', 'dup', '--policy', 'shred']),
      2,
      /no removal policy "shred"/,
    );
    ok(await d.cli(['filter', 'remove', 'disk', 'dup']), 'remove dup');
  });

  it('exit 1 when the daemon fails the request', async () => {
    exits(await d.cli(['filter', 'create', 'disk', 'broken']), 1, /broken: setup failed: no luck/);
    ok(await d.cli(['filter', 'create', 'disk', 'echo', '--name', 'f']), 'create f');
    exits(await d.cli(['filter', 'control', 'disk', 'f', 'fail']), 1, /echo failed on purpose/);
    ok(await d.cli(['filter', 'remove', 'disk', 'f']), 'remove f');
  });

  it('exit 4 when the daemon cannot be reached', async () => {
    exits(
      await runCli(['filter', 'list'], { env: { DEVFILTER_CONTROL: join(dir.path, 'none.sock') } }),
      4,
      /cannot reach the devfilter daemon at .*none\.sock: no such socket/,
    );
    exits(await d.cli(['status', '--control', join(dir.path, 'none.sock')]), 4, /cannot reach/);
    // A stale socket file: its process died, nobody listens.
    const stale = join(dir.path, 'stale.sock');
    spawnSync(process.execPath, [
      '-e',
      `require('net').createServer().listen(${JSON.stringify(stale)}, () => process.kill(process.pid, 'SIGKILL'))`,
    ]);
    assert.ok(existsSync(stale));
    exits(await runCli(['status', '--control', stale]), 4, /connection refused/);
    const j = await runCli(['filter', 'list', '--json'], {
      env: { DEVFILTER_CONTROL: join(dir.path, 'none.sock') },
    });
    assert.equal(j.code, 4);
    assert.equal(
      (JSON.parse(j.stderr) as { error: { data: { code: string } } }).error.data.code,
      'unreachable',
    );
  });

  it('--help documents the exit codes', async () => {
    const r = ok(await runCli(['filter', 'create', '--help']), 'help');
    assert.match(r.stdout, /Exit codes:\n\s+0\s+success\n\s+1\s+the daemon failed/);
    assert.match(r.stdout, /4\s+cannot reach the daemon/);
    assert.match(ok(await runCli(['--help']), 'help').stdout, /Exit codes:/);
  });
});

describe('devfilter status, export, events', () => {
  it('status: the daemon and a table of exports; --json; one export', async () => {
    ok(await d.cli(['filter', 'create', 'disk', 'echo', '--name', 's1']), 'create');
    const r = ok(await d.cli(['status']), 'status');
    assert.match(
      r.stdout,
      /^devfilter \d+\.\d+\.\d+, pid \d+, up \d+\w*, 0 NBD connection\(s\), control .*control\.sock\n/,
    );
    assert.match(
      r.stdout,
      /^filter types: access, broken, cbt, cdp, echo, fault, mirror, snapshot, stats, throttle$/m,
    );
    assert.match(
      r.stdout,
      /^EXPORT\s+SIZE\s+MODE\s+IN-FLIGHT\s+CHANGES\s+FILTERS \(top → bottom\)\s+BACKEND$/m,
    );
    assert.match(r.stdout, /^disk\s+16 MiB\s+rw\s+0\s+\d+\s+s1\s+memory:16777216$/m);
    assert.match(r.stdout, /^other\s+1 MiB\s+ro\s+0\s+\d+\s+-\s+memory:1048576$/m);
    const j = await d.json<{
      daemon: { pid: number; exports: number };
      exports: { name: string; filters: { name: string }[] }[];
    }>(['status']);
    assert.equal(j.daemon.pid, d.child.pid);
    assert.equal(j.daemon.exports, 2);
    assert.deepEqual(
      j.exports.map((e) => [e.name, e.filters.map((f) => f.name)]),
      [
        ['disk', ['s1']],
        ['other', []],
      ],
    );
    const one = ok(await d.cli(['status', 'disk']), 'status disk');
    assert.match(one.stdout, /^export:\s+disk\n/);
    assert.match(one.stdout, /^size:\s+16 MiB \(16777216 bytes\), read-write$/m);
    assert.match(one.stdout, /^disk\s+0\s+s1\s+echo\s+level=1$/m);
    const exp = ok(await d.cli(['export', 'list']), 'export list');
    assert.match(exp.stdout, /^disk\s+16 MiB\s+rw\s+s1\s+memory:16777216$/m);
    assert.deepEqual((await d.json<{ name: string }>(['export', 'status', 'other'])).name, 'other');
    ok(await d.cli(['filter', 'remove-all']), 'remove-all');
  });

  it('events: streams filter events until interrupted', async () => {
    const ev = background(process.execPath, [CLI, 'events', '--json', '--control', d.control]);
    try {
      // Subscribed once a first event arrives: create/remove until one shows up.
      await waitFor('the events stream to start', async () => {
        await d.cli(['filter', 'create', 'disk', 'echo', '--name', 'ev0']);
        await d.cli(['filter', 'remove', 'disk', 'ev0']);
        return ev.stdout().includes('filter.removed') ? true : undefined;
      });
      const seen = ev.stdout().length;
      ok(await d.cli(['filter', 'create', 'disk', 'echo', '--name', 'ev']), 'create ev');
      ok(await d.cli(['filter', 'remove', 'disk', 'ev']), 'remove ev');
      await waitFor('the removal event', () =>
        ev.stdout().slice(seen).includes('filter.removed') ? true : undefined,
      );
      const lines = ev
        .stdout()
        .slice(seen)
        .trim()
        .split('\n')
        .map(
          (l) =>
            JSON.parse(l) as {
              method: string;
              params: { export: string; filter: string; event: string; data: unknown };
            },
        );
      assert.deepEqual(
        lines.map((l) => [
          l.method,
          l.params.export,
          l.params.filter,
          l.params.event,
          l.params.data,
        ]),
        [
          ['event', 'disk', 'ev', 'filter.created', { type: 'echo' }],
          ['event', 'disk', 'ev', 'filter.removed', { policy: 'keep' }],
        ],
      );
    } finally {
      const r = await ev.stop('SIGINT');
      assert.equal(r.code, 0, ev.stderr());
    }
  });
});

describe('finding the daemon', () => {
  it('several daemons side by side, each with its own control socket', async () => {
    const d2 = await startCliDaemon(['-e', 'disk=memory:1M']);
    try {
      ok(
        await d2.cli(['filter', 'create', 'disk', 'stats', '--name', 'only-on-2']),
        'create on d2',
      );
      assert.deepEqual(await d.json(['filter', 'list', 'disk']), { filters: [] });
      // --control beats DEVFILTER_CONTROL.
      const r = ok(await d.cli(['filter', 'list', '--control', d2.control]), 'list d2');
      assert.match(r.stdout, /only-on-2/);
    } finally {
      assert.equal(await d2.close(), 0);
    }
  });

  it('serve listens on $DEVFILTER_CONTROL; --no-control listens nowhere; a taken --control path is an error', async () => {
    const t = tempDir();
    try {
      const ctl = join(t.path, 'env-control.sock');
      const e = await spawnDaemon(['-e', 'disk=memory:1M'], {
        socket: join(t.path, 'a.sock'),
        env: { DEVFILTER_CONTROL: ctl },
      });
      try {
        const r = ok(
          await runCli(['filter', 'list', 'disk'], { env: { DEVFILTER_CONTROL: ctl } }),
          'list via env',
        );
        assert.equal(r.stdout, 'no filters\n');
        // A second daemon asking for the same path explicitly fails (exit 1) and leaves it alone.
        const clash = await runCli([
          'serve',
          '-e',
          'x=memory:1M',
          '--socket',
          join(t.path, 'b.sock'),
          '--control',
          ctl,
          '--log-level',
          'fatal',
        ]);
        assert.equal(clash.code, 1, describeResult('devfilter serve', [], clash));
        assert.match(
          clash.stderr,
          /control socket .*env-control\.sock: socket .* is in use by another server/,
        );
        ok(
          await runCli(['filter', 'list', 'disk'], { env: { DEVFILTER_CONTROL: ctl } }),
          'first daemon still reachable',
        );
      } finally {
        assert.equal(await e.stop(), 0);
      }
      assert.equal(existsSync(ctl), false, 'the control socket is removed at exit');
      const nc = await spawnDaemon(['-e', 'disk=memory:1M', '--no-control'], {
        socket: join(t.path, 'c.sock'),
        env: { DEVFILTER_CONTROL: ctl },
      });
      try {
        assert.equal(existsSync(ctl), false);
        exits(await runCli(['status'], { env: { DEVFILTER_CONTROL: ctl } }), 4, /no such socket/);
      } finally {
        await nc.stop();
      }
    } finally {
      t.cleanup();
    }
  });
});
