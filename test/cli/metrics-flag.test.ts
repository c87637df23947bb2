/**
 * `devfilter serve --metrics HOST:PORT` serves the Prometheus endpoint; filters created through
 * the CLI show up in it.
 */
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { NbdClient } from '../../src/nbd/client.js';
import { waitFor } from '../helpers/run.js';
import { runCli, startCliDaemon } from './fixtures.js';

describe('serve --metrics', () => {
  it('serves /metrics with the filters created through the CLI', async () => {
    const d = await startCliDaemon(['-e', 'disk=memory:4M', '--metrics', '127.0.0.1:0']);
    try {
      const port = await waitFor('the metrics port in the log', () => {
        for (const line of d.stderr().split('\n')) {
          if (!line.includes('metrics endpoint listening')) continue;
          return (JSON.parse(line) as { port: number }).port;
        }
        return undefined;
      });
      const r = await d.cli(['filter', 'create', 'disk', 'stats', '--name', 'm1']);
      assert.equal(r.code, 0, r.stderr);
      const c = await NbdClient.fromUri(d.uri('disk'));
      await c.read(0, 4096);
      await c.disconnect();
      const text = await (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
      assert.match(text, /^devfilter_filter_info\{.*filter="m1".*\} 1$/m);
      assert.match(
        text,
        /^devfilter_requests_total\{.*export="disk".*filter="m1".*op="read".*\} 1$/m,
      );
    } finally {
      assert.equal(await d.close(), 0);
    }
  });

  it('a bad --metrics address is a usage error', async () => {
    const r = await runCli([
      'serve',
      '-e',
      'disk=memory:1M',
      '--metrics',
      'localhost:99999',
      '--no-control',
    ]);
    assert.equal(r.code, 2);
    assert.match(r.stderr, /invalid port/);
  });
});
