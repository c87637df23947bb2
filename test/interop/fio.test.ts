/**
 * fio's NBD engine (libnbd) against `devfilter serve`: verified random and sequential I/O with
 * several jobs (one connection each), trim, and a clean shutdown while fio is writing.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { spawnDaemon, tempDir } from '../helpers/server.js';
import { background, describeResult, run, type RunResult } from '../helpers/run.js';
import { requireTools } from '../helpers/tools.js';
import { MIB, allocatedBytes, daemonErrors, readRange, tail, withDaemon } from './fixtures.js';

interface FioDir {
  io_bytes: number;
  total_ios: number;
}
interface FioJob {
  jobname: string;
  error: number;
  read: FioDir;
  write: FioDir;
  trim: FioDir;
}

let dir: { path: string; cleanup: () => void };
before(() => {
  dir = tempDir('devfilter-interop-fio-');
});
after(() => dir.cleanup());

let outputs = 0;

/**
 * fio writes its own messages ("fio: connected to NBD server", "fio: terminating on signal")
 * into the --output file ahead of the JSON; the JSON document starts at the first "{" line.
 */
function parseFioJson(text: string): FioJob[] {
  const start = text.search(/^\{$/m);
  assert.ok(start >= 0, `no JSON in fio output:\n${tail(text)}`);
  // fio prints its report as indented JSON: the report ends at the first "}" alone on a line.
  // Stopped by a signal it may print messages, or a second report, after it.
  const close = /^\}$/m.exec(text.slice(start));
  const end = close === null ? text.length : start + close.index + 1;
  return (JSON.parse(text.slice(start, end)) as { jobs: FioJob[] }).jobs;
}

interface FioRun {
  result: RunResult;
  args: string[];
  output: string;
  jobs: FioJob[];
}

async function fio(uri: string, options: string[], timeoutMs = 90_000): Promise<FioRun> {
  const outFile = join(dir.path, `fio-${outputs++}.json`);
  const args = [
    '--ioengine=nbd',
    `--uri=${uri}`,
    '--output-format=json',
    `--output=${outFile}`,
    ...options,
  ];
  // fio leaves verify state files in its working directory: keep them in the temp dir.
  const result = await run('fio', args, { timeoutMs, cwd: dir.path });
  const output = fs.existsSync(outFile) ? fs.readFileSync(outFile, 'utf8') : '';
  let jobs: FioJob[] = [];
  try {
    jobs = parseFioJson(output);
  } catch (err) {
    if (result.code === 0) throw err;
  }
  return { result, args, output, jobs };
}

/** fio exited 0, printed no verify complaint, and every job reports error 0. */
function assertFioClean(r: FioRun, jobs: number): void {
  const what = `${describeResult('fio', r.args, r.result)}\n--- output file:\n${tail(r.output)}`;
  assert.equal(r.result.code, 0, what);
  assert.doesNotMatch(
    r.result.stdout + r.result.stderr + r.output,
    /verify: |bad magic|bad header/i,
    what,
  );
  assert.doesNotMatch(r.result.stdout + r.result.stderr, /err=\s*[1-9]/, what);
  assert.equal(r.jobs.length, jobs, what);
  for (const j of r.jobs) assert.equal(j.error, 0, `job ${j.jobname}: error ${j.error}\n${what}`);
}

describe('fio --ioengine=nbd', () => {
  it('randrw 4k, 4 jobs × 32 MiB, iodepth 16, verify=crc32c', async (t) => {
    if (!requireTools(t, 'fio')) return;
    await withDaemon(['--export', 'mem=memory:128M'], async (d) => {
      // Each job gets its own 32 MiB (offset_increment): jobs sharing blocks would overwrite
      // each other's verify headers and fail verification by design, whatever the server does.
      const r = await fio(d.uri('mem'), [
        '--name=randrw',
        '--rw=randrw',
        '--bs=4k',
        '--size=32M',
        '--offset_increment=32M',
        '--numjobs=4',
        '--iodepth=16',
        '--verify=crc32c',
        '--verify_fatal=1',
      ]);
      assertFioClean(r, 4);
      for (const j of r.jobs) {
        assert.ok(
          j.write.io_bytes > 0 && j.read.io_bytes > 0,
          `job did I/O: ${JSON.stringify({ r: j.read, w: j.write })}`,
        );
      }
      const conns = d
        .stderr()
        .split('\n')
        .filter((l) => l.includes('"msg":"export opened"')).length;
      assert.ok(conns >= 4, `4 jobs, at least 4 connections (saw ${conns})`);
    });
  });

  it('sequential 1M writes with verify and fsync, verify_only from new connections, trim', async (t) => {
    if (!requireTools(t, 'fio')) return;
    const image = join(dir.path, 'seq.img');
    await withDaemon(['--export', `disk=file:${image},create=64M`], async (d) => {
      const uri = d.uri('disk');
      const job = ['--name=seq', '--bs=1M', '--size=64M', '--verify=crc32c', '--verify_fatal=1'];
      const w = await fio(uri, [...job, '--rw=write', '--iodepth=4', '--fsync=8']);
      assertFioClean(w, 1);
      assert.equal(w.jobs[0]!.write.io_bytes, 64 * MIB);

      // Verify again, from a new process and connection: the data is really in the export.
      const v = await fio(uri, [...job, '--rw=write', '--verify_only']);
      assertFioClean(v, 1);
      assert.equal(v.jobs[0]!.read.io_bytes, 64 * MIB, 'verify_only read everything back');

      // The check can fail: corrupt one byte in devfilter's file and verify again.
      const fd = fs.openSync(image, 'r+');
      const at = 5 * MIB + 777;
      const old = readRange(image, at, 1)[0]!;
      fs.writeSync(fd, Buffer.from([old ^ 0xff]), 0, 1, at);
      const bad = await fio(uri, [...job, '--rw=write', '--verify_only']);
      fs.writeSync(fd, Buffer.from([old]), 0, 1, at);
      fs.closeSync(fd);
      assert.notEqual(bad.result.code, 0, 'verify_only must fail on a corrupted block');
      assert.match(bad.result.stdout + bad.result.stderr + bad.output, /verify/i);

      // rw=trim over the first half; the second half must be untouched.
      const allocatedBefore = allocatedBytes(image);
      const tr = await fio(uri, [
        '--name=trim',
        '--rw=trim',
        '--bs=64k',
        '--size=32M',
        '--iodepth=8',
      ]);
      assertFioClean(tr, 1);
      assert.equal(tr.jobs[0]!.trim.io_bytes, 32 * MIB, 'fio trimmed 32 MiB');
      assert.equal(tr.jobs[0]!.trim.total_ios, 512);
      const rest = await fio(uri, [
        ...job,
        '--rw=write',
        '--offset=32M',
        '--size=32M',
        '--verify_only',
      ]);
      assertFioClean(rest, 1);
      t.diagnostic(`allocated before trim ${allocatedBefore}, after ${allocatedBytes(image)}`);
    });
  });

  it('SIGTERM while fio writes: the daemon exits 0 promptly and acknowledged data is in the file', async (t) => {
    if (!requireTools(t, 'fio')) return;
    const image = join(dir.path, 'sigterm.img');
    const uri = (socket: string): string => `nbd+unix:///disk?socket=${socket}`;
    // Sequential 64 KiB writes one at a time, so the completed writes are exactly the first
    // write.io_bytes bytes; rate-limited so that fio is still busy when the signal comes.
    const job = [
      '--name=sigterm',
      '--rw=write',
      '--bs=64k',
      '--iodepth=1',
      '--verify=crc32c',
      '--size=256M',
    ];
    const outFile = join(dir.path, 'sigterm-fio.json');

    const d = await spawnDaemon(['--export', `disk=file:${image},create=256M`]);
    const daemonExit = new Promise<number | null>((resolve) => {
      if (d.child.exitCode !== null) resolve(d.child.exitCode);
      else d.child.once('exit', (code) => resolve(code));
    });
    const fioProc = background(
      'fio',
      [
        '--ioengine=nbd',
        `--uri=${uri(d.socket)}`,
        ...job,
        '--do_verify=0',
        '--rate=24m',
        '--output-format=json',
        `--output=${outFile}`,
      ],
      { cwd: dir.path },
    );
    let exitMs = -1;
    let exitCode: number | null = null;
    let fioExit: { code: number | null; signal: NodeJS.Signals | null } | undefined;
    try {
      // Let it write for about a second (24 MiB into the file).
      const deadline = Date.now() + 15_000;
      while (
        allocatedBytes(image) < 24 * MIB &&
        Date.now() < deadline &&
        fioProc.child.exitCode === null
      ) {
        await new Promise((r) => setTimeout(r, 50));
      }
      assert.equal(fioProc.child.exitCode, null, `fio ended early: ${fioProc.stderr()}`);
      const signalled = Date.now();
      d.child.kill('SIGTERM');
      const timer = (ms: number): Promise<'timeout'> =>
        new Promise((r) => setTimeout(() => r('timeout'), ms).unref());
      let first = await Promise.race([daemonExit, timer(5_000)]);
      if (first === 'timeout') {
        // Still serving fio: stop fio (SIGINT, so that it still writes its report) and see
        // whether the daemon then finishes on its own.
        t.diagnostic('daemon still running 5 s after SIGTERM; stopping fio');
        await fioProc.stop('SIGINT', 10_000);
        first = await Promise.race([daemonExit, timer(10_000)]);
        if (first === 'timeout') {
          await d.kill9();
          first = null;
        }
      }
      exitMs = Date.now() - signalled;
      exitCode = first;
    } finally {
      fioExit = await fioProc.stop('SIGINT', 10_000);
      t.diagnostic(`fio exit ${JSON.stringify(fioExit)}`);
      if (d.child.exitCode === null && d.child.signalCode === null) await d.kill9();
      await d.stop(); // already exited: this only removes its temporary socket directory
    }
    let done: number;
    if (fioExit?.signal === 'SIGSEGV' || fioExit?.signal === 'SIGABRT') {
      // fio's nbd engine sometimes crashes on the errors of a closing server, before its
      // report is written. What it had acknowledged is then known only from below: the file
      // held 24 MiB before the signal, and at most one 64 KiB write was in flight.
      done = 24 * MIB - 64 * 1024;
      t.diagnostic(
        `!!! fio crashed (${fioExit.signal}) without a report: checking the first ${done} bytes, which it must have had acknowledged`,
      );
    } else {
      const jobs = parseFioJson(fs.readFileSync(outFile, 'utf8'));
      done = jobs[0]!.write.io_bytes;
      t.diagnostic(`fio completed ${done} bytes, job error ${jobs[0]!.error}`);
    }
    t.diagnostic(`daemon exit ${exitCode} after ${exitMs} ms`);
    const daemonLog = tail(d.stderr());
    assert.ok(done >= 8 * MIB && done % (64 * 1024) === 0, `fio completed ${done} bytes`);

    // Everything fio had acknowledged is in the file: verify it with fio itself, on a new daemon.
    await withDaemon(['--export', `disk=file:${image}`], async (d2) => {
      const v = await fio(d2.uri('disk'), [
        ...job,
        `--size=${done}`,
        '--verify_only',
        '--verify_fatal=1',
      ]);
      assertFioClean(v, 1);
      assert.equal(v.jobs[0]!.read.io_bytes, done);
    });

    // Checked last, so that a slow shutdown is reported together with the data check above.
    assert.ok(
      exitMs >= 0 && exitMs < 5_000,
      `daemon must exit within 5 s of SIGTERM while fio is connected; it exited ${exitCode} after ${exitMs} ms:\n${daemonLog}`,
    );
    assert.equal(exitCode, 0, `daemon exit code after SIGTERM:\n${daemonLog}`);
    assert.ok(done < 256 * MIB, 'fio was cut off by the shutdown, not allowed to finish');
    assert.deepEqual(daemonErrors(d), []);
  });
});
