/**
 * End to end through the CLI: a stack change with a stuck request in flight times out (exit 1,
 * -32008) and leaves the stack as it was; the stuck request then completes normally and the
 * client never sees an error. The request is held by the real `fault` filter's delay rule.
 */
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { NbdClient } from '../../src/nbd/client.js';
import { describeResult, waitFor } from '../helpers/run.js';
import { startCliDaemon } from './fixtures.js';

describe('a stack change that cannot drain', () => {
  it('times out through the CLI and leaves the stack as it was', async () => {
    const d = await startCliDaemon(['-e', 'disk=memory:16M']);
    let client: NbdClient | undefined;
    try {
      const ok = async (args: string[]): Promise<string> => {
        const r = await d.cli(args);
        assert.equal(r.code, 0, describeResult('devfilter', args, r));
        return r.stdout;
      };
      await ok(['filter', 'create', 'disk', 'stats', '--name', 'top']);
      await ok([
        'filter',
        'create',
        'disk',
        'fault',
        '--name',
        'slow',
        '--bottom',
        '--args-json',
        '{"rules":[{"action":"delay","delayMs":3000,"ops":"read"}]}',
      ]);
      const before = await d.json<{ filters: unknown[] }>(['filter', 'list', 'disk']);

      client = await NbdClient.fromUri(d.uri('disk'));
      await client.write(0, Buffer.alloc(4096, 0x5a));
      const started = Date.now();
      const stuck = client.read(0, 4096);
      await waitFor('the read to be in flight', async () => {
        const s = await d.json<{ stack: { inFlight: number } }>(['status', 'disk']);
        return s.stack.inFlight > 0 ? true : undefined;
      });

      const create = await d.cli(['filter', 'create', 'disk', 'throttle', '--timeout', '300']);
      assert.equal(create.code, 1, describeResult('devfilter', ['filter', 'create'], create));
      assert.match(
        create.stderr,
        /^devfilter: 1 request\(s\) still in flight after 300 ms; the stack is unchanged$/m,
      );
      const remove = await d.cli([
        'filter',
        'remove',
        'disk',
        'slow',
        '--timeout',
        '200',
        '--json',
      ]);
      assert.equal(remove.code, 1);
      assert.equal(
        (JSON.parse(remove.stderr) as { error: { code: number; data: { code: string } } }).error
          .code,
        -32008,
      );
      const removeAll = await d.cli(['filter', 'remove-all', '--timeout', '200']);
      assert.equal(removeAll.code, 1);
      assert.deepEqual(await d.json(['filter', 'list', 'disk']), before, 'the stack is as it was');

      // The stuck read was never disturbed: it completes, with the data.
      const data = await stuck;
      assert.ok(data.equals(Buffer.alloc(4096, 0x5a)));
      assert.ok(Date.now() - started >= 2500, 'the read was held by the delay rule');

      // With nothing in flight, changes go through again.
      await ok(['filter', 'control', 'disk', 'slow', 'clear']);
      await ok(['filter', 'create', 'disk', 'throttle', '--timeout', '300']);
      await ok(['filter', 'remove-all', 'disk']);
      assert.ok((await client.read(0, 4096)).equals(Buffer.alloc(4096, 0x5a)));
    } finally {
      await client?.disconnect();
      assert.equal(await d.close(), 0);
    }
  });
});
