/**
 * After a cutover, a daemon restarted from a config file that still names the old backend
 * must not serve it (stale data): real `devfilter serve` daemons, stopped and started again.
 *
 * 1. File source, mirror started from the CLI: the cutover leaves SOURCE.devfilter-cutover;
 *    the old config (and `-e` naming the same file) is refused with a clear error; the config
 *    pointed at the target serves everything, including what was written after the cutover.
 * 2. Memory source with the mirror declared in the config (stateDir, autoCutover): starting
 *    again would copy the empty source over the target; the mirror's stateDir record refuses
 *    it, and the target keeps its data.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { NbdClient } from '../../src/nbd/client.js';
import { describeResult } from '../helpers/run.js';
import { tempDir } from '../helpers/server.js';
import { runCli, startCliDaemon, type CliDaemon } from '../cli/fixtures.js';
import { MiB, pattern } from './fixture.js';

const SIZE = 8 * MiB;

async function writeThrough(uri: string, data: Buffer, offset = 0): Promise<void> {
  const c = await NbdClient.fromUri(uri);
  try {
    for (let o = 0; o < data.length; o += MiB)
      await c.write(offset + o, data.subarray(o, Math.min(o + MiB, data.length)));
    await c.flush();
  } finally {
    await c.close();
  }
}

async function readThrough(uri: string): Promise<Buffer> {
  const c = await NbdClient.fromUri(uri);
  try {
    return await c.read(0, SIZE);
  } finally {
    await c.close();
  }
}

/** `devfilter serve` that is expected to refuse to start: its exit code and stderr. */
async function serveRefused(
  dir: string,
  args: string[],
): Promise<{ code: number | null; err: string }> {
  const r = await runCli(
    [
      'serve',
      '--socket',
      join(dir, 'again.sock'),
      '--control',
      join(dir, 'again-control.sock'),
      ...args,
    ],
    { timeoutMs: 20_000 },
  );
  assert.equal(r.timedOut, false, 'the daemon started (and served) instead of refusing');
  return { code: r.code, err: r.stderr };
}

async function cliOk(d: CliDaemon, args: string[]): Promise<string> {
  const r = await d.cli(args, { timeoutMs: 60_000 });
  assert.equal(r.code, 0, describeResult('devfilter', args, r));
  return r.stdout;
}

describe('after a cutover, the config file still names the old backend', () => {
  it('a file source is fenced: the restarted daemon refuses it and says what to do', async (t) => {
    const dir = tempDir('devfilter-mirror-cfg-');
    const a = join(dir.path, 'a.img');
    const b = join(dir.path, 'b.img');
    const cfg = join(dir.path, 'devfilter.yaml');
    fs.writeFileSync(cfg, `exports:\n  disk:\n    file: ${a}\n    create: ${SIZE}\n`);
    let d: CliDaemon | undefined = await startCliDaemon(['--config', cfg], { dir: dir.path });
    try {
      const expected = pattern(SIZE, 1);
      await writeThrough(d.uri('disk'), expected);
      // A mirror onto the export's own backend is refused (it would copy the file onto itself).
      const self = await d.cli(['mirror', 'start', 'disk', '--target', a]);
      assert.notEqual(self.code, 0);
      assert.match(self.stderr, /is the export's own backend/);
      await cliOk(d, ['mirror', 'start', 'disk', '--target', b]);
      const out = await cliOk(d, ['mirror', 'cutover', 'disk', '--wait', '30000']);
      assert.match(out, /now runs on file:.*b\.img/);
      assert.match(out, /recorded in .*a\.img\.devfilter-cutover/);
      const after = pattern(64 * 1024, 2);
      await writeThrough(d.uri('disk'), after, MiB);
      after.copy(expected, MiB);
      assert.equal(await d.close(), 0);
      d = undefined;

      const fence = JSON.parse(fs.readFileSync(`${a}.devfilter-cutover`, 'utf8')) as Record<
        string,
        unknown
      >;
      assert.equal(fence.state, 'done');
      assert.equal(fence.from, `file:${a}`);
      assert.equal(fence.to, `file:${b}`);

      // The unchanged config: refused, with the way out.
      let r = await serveRefused(dir.path, ['--config', cfg]);
      assert.equal(r.code, 2, r.err);
      assert.match(r.err, /export disk: the backend file:.*a\.img was cut over to file:.*b\.img/);
      assert.match(r.err, /stale data/);
      assert.match(r.err, /delete .*a\.img\.devfilter-cutover/);
      // Any daemon asked for that file, under any export name: the record is next to the data.
      r = await serveRefused(dir.path, ['-e', `other=file:${a}`]);
      assert.equal(r.code, 2, r.err);
      assert.match(r.err, /export other: the backend/);
      t.diagnostic(`refusal: ${r.err.trim()}`);

      // The config pointed at the target: everything is there.
      fs.writeFileSync(cfg, `exports:\n  disk:\n    file: ${b}\n`);
      d = await startCliDaemon(['--config', cfg], { dir: dir.path });
      assert.ok((await readThrough(d.uri('disk'))).equals(expected));
    } finally {
      await d?.close();
      dir.cleanup();
    }
  });

  it('a mirror declared in the config with a stateDir refuses to copy a stale source over the target', async () => {
    const dir = tempDir('devfilter-mirror-cfg2-');
    const b = join(dir.path, 'b.img');
    const state = join(dir.path, 'state');
    fs.mkdirSync(state);
    const cfg = join(dir.path, 'devfilter.yaml');
    fs.writeFileSync(
      cfg,
      [
        'exports:',
        '  disk:',
        `    memory: ${SIZE}`,
        '    filters:',
        '      - type: mirror',
        `        args: { target: ${b}, stateDir: ${state}, autoCutover: true }`,
        '',
      ].join('\n'),
    );
    let d: CliDaemon | undefined = await startCliDaemon(['--config', cfg], { dir: dir.path });
    try {
      const deadline = Date.now() + 30_000;
      for (;;) {
        const s = await d.json<{ backend: string }>(['export', 'status', 'disk']);
        if (s.backend === `file:${b}`) break;
        assert.ok(Date.now() < deadline, `no automatic cutover: ${JSON.stringify(s)}`);
        await new Promise((r) => setTimeout(r, 50));
      }
      const expected = pattern(SIZE, 3);
      await writeThrough(d.uri('disk'), expected);
      assert.equal(await d.close(), 0);
      d = undefined;

      const r = await serveRefused(dir.path, ['--config', cfg]);
      assert.notEqual(r.code, 0, r.err);
      assert.match(r.err, /the backend memory:\d+ was cut over to file:.*b\.img/);
      assert.match(r.err, /disk\.mirror-cutover/);
      // The target was not touched by the refused start.
      assert.ok(fs.readFileSync(b).equals(expected));
    } finally {
      await d?.close();
      dir.cleanup();
    }
  });
});
