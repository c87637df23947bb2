/**
 * The config file's filter stacks, control socket and filter modules; `--filter` on the
 * command line; errors that name the file, line and field.
 */
import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { FilterTypeRegistry } from '../../src/core/filter-types.js';
import { builtinFilterTypes } from '../../src/filters/index.js';
import { checkFilterSpecs, parseConfig, ConfigError } from '../../src/cli/config.js';
import { parseFilterOption } from '../../src/cli/args.js';
import { describeResult } from '../helpers/run.js';
import { tempDir } from '../helpers/server.js';
import { runCli, startCliDaemon, writeTestModules } from './fixtures.js';

let dir: { path: string; cleanup: () => void };
let mods: ReturnType<typeof writeTestModules>;
let registry: FilterTypeRegistry;
before(async () => {
  dir = tempDir('devfilter-config-test-');
  mods = writeTestModules(dir.path);
  registry = new FilterTypeRegistry();
  for (const t of builtinFilterTypes) registry.register(t);
  await registry.load(mods.echo);
});
after(() => dir.cleanup());

/** parseConfig + checkFilterSpecs; returns the ConfigError message. */
function configError(text: string): string {
  try {
    const c = parseConfig(text, 'devfilter.yaml');
    checkFilterSpecs(c.exports, registry);
  } catch (err) {
    assert.ok(err instanceof ConfigError, String(err));
    return err.message;
  }
  assert.fail('expected a ConfigError');
}

describe('config file: filters, control, filterModules', () => {
  it('parses filter stacks (top → bottom), a control path and filter modules', () => {
    const c = parseConfig(
      `control: /run/x/control.sock
filterModules:
  - ./mods/a.js
  - /abs/b.js
  - some-package
exports:
  disk:
    memory: 1M
    filters:
      - stats
      - type: echo
        name: e
        args: { level: 3 }
      - { type: throttle, args: }
  plain: { memory: 1M }
`,
      '/etc/devfilter/devfilter.yaml',
    );
    assert.equal(c.control, '/run/x/control.sock');
    assert.deepEqual(c.filterModules, ['/etc/devfilter/mods/a.js', '/abs/b.js', 'some-package']);
    const disk = c.exports.find((e) => e.name === 'disk')!;
    assert.deepEqual(
      disk.filters!.map((f) => [f.type, f.name, f.args]),
      [
        ['stats', undefined, {}],
        ['echo', 'e', { level: 3 }],
        ['throttle', undefined, {}],
      ],
    );
    assert.equal(
      disk.filters![1]!.locate!(['args', 'level']),
      '/etc/devfilter/devfilter.yaml:13:24: exports.disk.filters.1.args.level',
    );
    assert.equal(c.exports.find((e) => e.name === 'plain')!.filters, undefined);
    checkFilterSpecs(c.exports, registry);
    assert.equal(parseConfig('control: false\nexports: {}\n', 'x.yaml').control, false);
  });

  it('structural errors name the line and the field', () => {
    assert.equal(
      configError('control: 5\nexports: {}\n'),
      'devfilter.yaml:1:10: control: expected a socket path, or false for no control socket',
    );
    assert.equal(
      configError('filterModules: [1]\nexports: {}\n'),
      'devfilter.yaml:1:17: filterModules.0: expected a module path or package name',
    );
    assert.equal(
      configError('exports:\n  disk:\n    memory: 1M\n    filters: stats\n'),
      'devfilter.yaml:4:14: exports.disk.filters: expected a list of filters (top → bottom)',
    );
    assert.equal(
      configError(
        'exports:\n  disk:\n    memory: 1M\n    filters:\n      - type: stats\n        nmae: s\n',
      ),
      'devfilter.yaml:6:15: exports.disk.filters.0.nmae: unknown key (expected one of type, name, args)',
    );
    assert.equal(
      configError(
        'exports:\n  disk:\n    memory: 1M\n    filters:\n      - { type: stats, name: "bad name" }\n',
      ),
      "devfilter.yaml:5:30: exports.disk.filters.0.name: expected a filter name: 1-64 letters, digits, '.', '_' or '-'",
    );
    assert.equal(
      configError('exports:\n  disk:\n    memory: 1M\n    filters:\n      - { name: x }\n'),
      'devfilter.yaml:5:9: exports.disk.filters.0.type: expected a filter type name',
    );
    assert.equal(
      configError(
        'exports:\n  disk:\n    memory: 1M\n    filters:\n      - { type: stats, args: [1] }\n',
      ),
      'devfilter.yaml:5:30: exports.disk.filters.0.args: expected a mapping of arguments',
    );
  });

  it('filter errors against the known types name the line and the field', () => {
    const base = 'exports:\n  disk:\n    memory: 1M\n    filters:\n';
    assert.match(
      configError(base + '      - stats\n      - type: nope\n'),
      /^devfilter\.yaml:6:15: exports\.disk\.filters\.1\.type: unknown filter type "nope" \(known: access, cbt, cdp, echo, fault, mirror, snapshot, stats, throttle\)$/,
    );
    assert.equal(
      configError(base + '      - type: echo\n        args:\n          level: 12\n'),
      'devfilter.yaml:7:18: exports.disk.filters.0.args.level: must be <= 9',
    );
    assert.equal(
      configError(base + '      - type: echo\n        args:\n          levle: 1\n'),
      'devfilter.yaml:7:18: exports.disk.filters.0.args.levle: unknown argument "levle" for echo',
    );
    assert.equal(
      configError(base + '      - type: echo\n        args:\n          mode: c\n'),
      'devfilter.yaml:7:17: exports.disk.filters.0.args.mode: must be equal to one of the allowed values',
    );
    assert.equal(
      configError(base + '      - { type: echo, name: a }\n      - { type: stats, name: a }\n'),
      'devfilter.yaml:6:30: exports.disk.filters.1.name: a filter named "a" is already declared on export "disk"',
    );
    // JSON works the same way.
    assert.equal(
      configError(
        '{"exports": {"disk": {"memory": "1M", "filters": [{"type": "echo", "args": {"level": "x"}}]}}}',
      ),
      'devfilter.yaml:1:86: exports.disk.filters.0.args.level: must be integer',
    );
  });

  it('--filter EXPORT:TYPE[:k=v,...]', () => {
    assert.deepEqual(
      (({ export: e, filter: f }) => [e, f.type, f.name, f.args])(
        parseFilterOption('disk:throttle:readIops=100,name=t,burst=2'),
      ),
      ['disk', 'throttle', 't', { readIops: '100', burst: '2' }],
    );
    assert.deepEqual(parseFilterOption('disk:stats').filter.args, {});
    assert.throws(() => parseFilterOption('disk'), /expected EXPORT:TYPE/);
    assert.throws(() => parseFilterOption('disk:Stats'), /bad filter type/);
    assert.throws(() => parseFilterOption('disk:stats:x'), /expected KEY=VALUE/);
    const f = parseFilterOption('disk:echo:level=12').filter;
    assert.throws(
      () =>
        checkFilterSpecs(
          [{ name: 'disk', backend: { type: 'memory', size: 1 }, filters: [f] }],
          registry,
        ),
      /^Error: --filter disk:echo:level=12: args\.level: must be <= 9$/,
    );
  });
});

describe('devfilter serve with declared filters', () => {
  it('puts the config file and --filter stacks on before serving', async () => {
    const cfg = join(dir.path, 'serve.yaml');
    writeFileSync(
      cfg,
      `filterModules: [./echo-filter.mjs]
exports:
  disk:
    memory: 4M
    filters:
      - { type: echo, name: top, args: { level: 2 } }
      - stats
  other: { memory: 1M }
`,
    );
    const d = await startCliDaemon([
      '--config',
      cfg,
      '--filter',
      'disk:throttle:readIops=100000',
      '--filter',
      'other:echo:name=o,level=5',
    ]);
    try {
      const r = await d.json<{
        filters: {
          export: string;
          name: string;
          type: string;
          args: Record<string, unknown>;
          index: number;
        }[];
      }>(['filter', 'list']);
      assert.deepEqual(
        r.filters.map((f) => [f.export, f.index, f.name, f.type]),
        [
          ['disk', 0, 'top', 'echo'],
          ['disk', 1, 'stats', 'stats'],
          ['disk', 2, 'throttle', 'throttle'],
          ['other', 0, 'o', 'echo'],
        ],
      );
      assert.deepEqual(r.filters[0]!.args, { level: 2 });
      assert.equal(r.filters[2]!.args.readIops, 100000);
      assert.deepEqual(r.filters[3]!.args, { level: 5 });
    } finally {
      assert.equal(await d.close(), 0);
    }
  });

  it('a bad declaration stops the daemon before it serves: exit 2 with file:line: field', async () => {
    const cfg = join(dir.path, 'bad.yaml');
    writeFileSync(
      cfg,
      `exports:\n  disk:\n    memory: 4M\n    filters:\n      - type: throttle\n        args: { readIops: lots }\n`,
    );
    const args = [
      'serve',
      '--config',
      cfg,
      '--socket',
      join(dir.path, 'bad.sock'),
      '--control',
      join(dir.path, 'bad-control.sock'),
    ];
    const r = await runCli(args);
    assert.equal(r.code, 2, describeResult('devfilter', args, r));
    assert.equal(
      r.stderr,
      `devfilter: ${cfg}:6:27: exports.disk.filters.0.args.readIops: must be number\n`,
    );
    const f = await runCli([
      'serve',
      '-e',
      'disk=memory:1M',
      '--filter',
      'disk:nope',
      '--control',
      join(dir.path, 'f.sock'),
    ]);
    assert.equal(f.code, 2);
    assert.match(f.stderr, /^devfilter: --filter disk:nope: type: unknown filter type "nope"/);
    const g = await runCli([
      'serve',
      '-e',
      'disk=memory:1M',
      '--filter',
      'ghost:stats',
      '--control',
      join(dir.path, 'g.sock'),
    ]);
    assert.equal(g.code, 2);
    assert.match(g.stderr, /no export named "ghost"/);
    // A filter whose setup fails: a runtime failure (exit 1), located.
    const h = await runCli([
      'serve',
      '-e',
      'disk=memory:1M',
      '--filter-module',
      mods.broken,
      '--filter',
      'disk:broken',
      '--control',
      join(dir.path, 'h.sock'),
    ]);
    assert.equal(h.code, 1, describeResult('devfilter', [], h));
    assert.match(h.stderr, /^devfilter: --filter disk:broken: broken: setup failed: no luck$/m);
  });
});
