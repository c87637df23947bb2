/**
 * Export definitions naming a remote NBD export: on the command line (`NAME=nbd:URI`) and in
 * the config file (`nbd: URI`, `connections: N`), with clear errors for what is wrong.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { parseConfig } from '../../src/cli/config.js';
import { parseExportSpec } from '../../src/cli/export-spec.js';

test('NAME=nbd:URI with connections; mistakes are named', () => {
  assert.deepEqual(parseExportSpec('front=nbd:nbd+unix:///disk?socket=/run/a.sock').backend, {
    type: 'nbd',
    uri: 'nbd+unix:///disk?socket=/run/a.sock',
  });
  assert.deepEqual(parseExportSpec('r=nbd:nbd://10.0.0.2:10809/vol,connections=8,ro'), {
    name: 'r',
    backend: { type: 'nbd', uri: 'nbd://10.0.0.2:10809/vol', connections: 8 },
    readOnly: true,
  });
  assert.throws(() => parseExportSpec('x=nbd:disk'), /nbd needs a URI/);
  assert.throws(() => parseExportSpec('x=nbd:nbd://h/d,connections=17'), /1 to 16/);
  assert.throws(() => parseExportSpec('x=file:/a,connections=2'), /connections applies to nbd/);
  assert.throws(() => parseExportSpec('x=nbd:nbd://h/d,create=1G'), /apply to file exports/);
});

test('config file: nbd and connections', () => {
  const ok = 'exports:\n  front:\n    nbd: nbd://10.0.0.2/vol\n    connections: 2\n';
  assert.deepEqual(parseConfig(ok, 'ok.yaml').exports[0]!.backend, {
    type: 'nbd',
    uri: 'nbd://10.0.0.2/vol',
    connections: 2,
  });
  const both = 'exports:\n  front:\n    nbd: nbd://h/v\n    memory: 1G\n';
  assert.throws(
    () => parseConfig(both, 'both.yaml'),
    /needs exactly one of file: PATH, memory: SIZE or nbd: URI/,
  );
  const bad = 'exports:\n  front:\n    nbd: disk\n';
  assert.throws(() => parseConfig(bad, 'bad.yaml'), /bad\.yaml:3:\d+: .*expected an NBD URI/);
});
