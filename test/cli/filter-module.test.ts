/**
 * External filter modules: `devfilter serve --filter-module SPEC` and `devfilter filter
 * load-module SPEC`, by path and by package name; the loaded filter really sees the I/O.
 */
import assert from 'node:assert/strict';
import { mkdirSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { NbdClient } from '../../src/nbd/client.js';
import { background, describeResult, waitFor } from '../helpers/run.js';
import { CLI, REPO_ROOT, spawnDaemon, tempDir } from '../helpers/server.js';
import { runCli, writeTestModules } from './fixtures.js';

let dir: { path: string; cleanup: () => void };
before(() => {
  dir = tempDir('devfilter-module-test-');
  writeTestModules(dir.path);
});
after(() => dir.cleanup());

describe('filter modules', () => {
  it('--filter-module (relative to the daemon cwd) and load-module (relative to the CLI cwd); the filter sees the I/O', async () => {
    const control = join(dir.path, 'control.sock');
    const env = { DEVFILTER_CONTROL: control };
    // The daemon runs in dir and is given the module relative to it.
    const nbd = join(dir.path, 'nbd.sock');
    const daemon = background(
      process.execPath,
      [
        CLI,
        'serve',
        '-e',
        'disk=memory:4M',
        '--socket',
        nbd,
        '--control',
        control,
        '--filter-module',
        './echo-filter.mjs',
      ],
      {
        cwd: dir.path,
      },
    );
    await waitFor('the daemon to listen', async () => {
      if (daemon.child.exitCode !== null) throw new Error(`serve exited: ${daemon.stderr()}`);
      return (await runCli(['status'], { env })).code === 0 ? true : undefined;
    });
    const d = {
      uri: (name: string) => `nbd+unix:///${name}?socket=${nbd}`,
      stop: async () => (await daemon.stop()).code,
    };
    try {
      let r = await runCli(['filter', 'types'], { env });
      assert.match(r.stdout, /^echo\s/m);
      assert.doesNotMatch(r.stdout, /^pass\s/m);

      const sub = join(dir.path, 'sub');
      mkdirSync(sub);
      r = await runCli(['filter', 'load-module', '../pass-filter.mjs'], { env, cwd: sub });
      assert.equal(r.code, 0, describeResult('devfilter', ['filter', 'load-module'], r));
      assert.equal(
        r.stdout,
        `loaded filter type(s) pass from ${join(dir.path, 'pass-filter.mjs')}\n`,
      );

      r = await runCli(['filter', 'create', 'disk', 'pass', '--name', 'p'], { env });
      assert.equal(r.code, 0, r.stderr);
      const client = await NbdClient.fromUri(d.uri('disk'));
      await client.write(0, Buffer.alloc(4096, 7));
      const back = await client.read(0, 4096);
      assert.ok(back.equals(Buffer.alloc(4096, 7)));
      await client.disconnect();
      const st = JSON.parse(
        (await runCli(['filter', 'status', 'disk', 'p', '--json'], { env })).stdout,
      ) as { status: { requests: number } };
      assert.equal(st.status.requests, 2, 'the external filter saw the write and the read');

      // Loading the same module again: the type exists (exit 2); a missing module (exit 2).
      r = await runCli(['filter', 'load-module', join(dir.path, 'pass-filter.mjs')], { env });
      assert.equal(r.code, 2);
      assert.match(r.stderr, /filter type "pass" is already registered/);
      r = await runCli(['filter', 'load-module', './missing.mjs', '--json'], {
        env,
        cwd: dir.path,
      });
      assert.equal(r.code, 2);
      assert.equal((JSON.parse(r.stderr) as { error: { code: number } }).error.code, -32002);
    } finally {
      assert.equal(await d.stop(), 0);
    }
  });

  it('an installed package, by name', async () => {
    // Installed where devfilter resolves packages from (its own node_modules chain).
    const pkg = join(REPO_ROOT, 'dist', 'node_modules', 'devfilter-test-pkg-filter');
    mkdirSync(pkg, { recursive: true });
    try {
      writeFileSync(
        join(pkg, 'package.json'),
        JSON.stringify({
          name: 'devfilter-test-pkg-filter',
          type: 'module',
          exports: './index.js',
        }),
      );
      writeFileSync(
        join(pkg, 'index.js'),
        `export default { name: 'pkg-filter', apiVersion: 1, description: 'from a package', argsSchema: { type: 'object', properties: {} }, create: () => ({}) };\n`,
      );
      const control = join(dir.path, 'pkg-control.sock');
      const d = await spawnDaemon(
        [
          '-e',
          'disk=memory:1M',
          '--control',
          control,
          '--filter-module',
          'devfilter-test-pkg-filter',
        ],
        {
          socket: join(dir.path, 'pkg.sock'),
        },
      );
      try {
        const r = await runCli(['filter', 'types', 'pkg-filter', '--json'], {
          env: { DEVFILTER_CONTROL: control },
        });
        assert.equal(r.code, 0, r.stderr);
        assert.equal(
          (JSON.parse(r.stdout) as { source: string }).source,
          'devfilter-test-pkg-filter',
        );
      } finally {
        assert.equal(await d.stop(), 0);
      }
    } finally {
      rmSync(pkg, { recursive: true, force: true });
    }
  });

  it('a module that cannot be loaded stops serve with exit 2 and says why', async () => {
    writeFileSync(
      join(dir.path, 'bad-version.mjs'),
      `export default { name: 'bad', apiVersion: 7, description: 'x', argsSchema: { type: 'object', properties: {} }, create() {} };\n`,
    );
    const cases: [string, RegExp][] = [
      [join(dir.path, 'nope.mjs'), /--filter-module: cannot load filter module .*nope\.mjs/],
      [
        join(dir.path, 'bad-version.mjs'),
        /apiVersion 7 is not supported \(this devfilter speaks 1\)/,
      ],
      ['devfilter-no-such-package', /cannot load filter module devfilter-no-such-package/],
    ];
    for (const [spec, message] of cases) {
      const r = await runCli([
        'serve',
        '-e',
        'disk=memory:1M',
        '--no-control',
        '--socket',
        join(dir.path, 'x.sock'),
        '--filter-module',
        spec,
      ]);
      assert.equal(r.code, 2, describeResult('devfilter serve', [spec], r));
      assert.match(r.stderr, message);
    }
  });
});
