/**
 * The acceptance test: fio (NBD engine, crc32c verification, several jobs) runs while
 * other processes — the real `devfilter` CLI binary — create and remove filters 200 times:
 * stats, fault with no rules, and throttle with a limit far above what fio does. fio must see
 * zero errors and zero verify failures, and the daemon must log no errors.
 *
 * How: four worker loops run in parallel, 50 cycles each; a cycle is one `devfilter filter
 * create` (type rotating, position varying: top, bottom, above or below a resident stats filter)
 * and one `devfilter filter remove`, each its own CLI process — 400 CLI invocations, 400 stack
 * changes. fio runs back to back (each run verified in full) until the workers are done, so
 * I/O is in flight throughout.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { describeResult, run, type RunResult } from '../helpers/run.js';
import { tempDir } from '../helpers/server.js';
import { requireTools } from '../helpers/tools.js';
import { startCliDaemon, type CliDaemon } from './fixtures.js';

const CYCLES = 200;
const WORKERS = 4;

interface FioJob {
  jobname: string;
  error: number;
  read: { io_bytes: number };
  write: { io_bytes: number };
}

let dir: { path: string; cleanup: () => void };
before(() => {
  dir = tempDir('devfilter-fio-cycles-');
});
after(() => dir.cleanup());

function daemonErrors(stderr: string): string[] {
  return stderr.split('\n').filter((line) => {
    if (!line.startsWith('{')) return false;
    try {
      return (JSON.parse(line) as { level?: number }).level! >= 50;
    } catch {
      return false;
    }
  });
}

async function fio(
  uri: string,
  n: number,
): Promise<{ r: RunResult; jobs: FioJob[]; text: string; args: string[] }> {
  const out = join(dir.path, `fio-${n}.json`);
  const args = [
    '--ioengine=nbd',
    `--uri=${uri}`,
    '--output-format=json',
    `--output=${out}`,
    '--name=cycles',
    '--rw=randrw',
    '--bs=4k',
    '--size=8M',
    '--offset_increment=8M', // each job its own range, or verify headers clash by design
    '--numjobs=4',
    '--iodepth=16',
    '--verify=crc32c',
    '--verify_fatal=1',
    '--verify_state_save=0', // no local-*-verify.state files left in the cwd
  ];
  const r = await run('fio', args, { timeoutMs: 120_000 });
  const text = fs.existsSync(out) ? fs.readFileSync(out, 'utf8') : '';
  const start = text.search(/^\{$/m);
  const jobs = start >= 0 ? (JSON.parse(text.slice(start)) as { jobs: FioJob[] }).jobs : [];
  return { r, jobs, text, args };
}

describe('fio while filters come and go', () => {
  it(
    `fio --verify=crc32c with 4 jobs: no errors while the CLI creates and removes filters ${CYCLES} times`,
    { timeout: 240_000 },
    async (t) => {
      if (!requireTools(t, 'fio')) return;
      const d: CliDaemon = await startCliDaemon(['-e', 'disk=memory:64M'], { dir: dir.path });
      let fioRuns = 0;
      let fioBytes = 0;
      const cli = async (args: string[]): Promise<void> => {
        const r = await d.cli(args, { timeoutMs: 60_000 });
        assert.equal(r.code, 0, describeResult('devfilter', args, r));
      };
      try {
        // A resident filter to insert above and below, and to prove I/O went through a filter.
        await cli(['filter', 'create', 'disk', 'stats', '--name', 'resident']);

        let cyclesDone = 0;
        let workersDone = false;
        const started = Date.now();
        const fioLoop = (async () => {
          // At least one full run, and keep going until the workers are done.
          do {
            const f = await fio(d.uri('disk'), fioRuns++);
            const what = `${describeResult('fio', f.args, f.r)}\n--- output:\n${f.text.slice(-3000)}`;
            assert.equal(f.r.code, 0, what);
            assert.doesNotMatch(
              f.r.stdout + f.r.stderr + f.text,
              /verify: |bad magic|bad header/i,
              what,
            );
            assert.equal(f.jobs.length, 4, what);
            for (const j of f.jobs) {
              assert.equal(j.error, 0, `job ${j.jobname}: error ${j.error}\n${what}`);
              fioBytes += j.read.io_bytes + j.write.io_bytes;
            }
          } while (!workersDone);
        })();

        const types: string[][] = [
          ['stats'],
          ['fault', '--arg', 'seed=7'], // no rules: passes everything
          ['throttle', '--arg', 'iops=1000000', '--arg', 'bps=16G'], // far above what fio does
        ];
        const positions: string[][] = [
          [],
          ['--bottom'],
          ['--above', 'resident'],
          ['--below', 'resident'],
        ];
        const worker = async (w: number): Promise<void> => {
          for (let i = 0; i < CYCLES / WORKERS; i++) {
            const name = `w${w}-${i}`;
            const [type, ...args] = types[(w + i) % types.length]!;
            await cli([
              'filter',
              'create',
              'disk',
              type!,
              '--name',
              name,
              ...positions[(w * 3 + i) % positions.length]!,
              ...args,
            ]);
            await cli(['filter', 'remove', 'disk', name]);
            cyclesDone++;
          }
        };
        const workers = await Promise.allSettled(
          Array.from({ length: WORKERS }, (_, w) => worker(w)),
        );
        workersDone = true;
        const cycleMs = Date.now() - started;
        await fioLoop; // its failure first: a worker may have failed because I/O did
        for (const w of workers) if (w.status === 'rejected') throw w.reason;
        assert.equal(cyclesDone, CYCLES);

        const exp = await d.json<{
          stack: { changes: number; inFlight: number };
          filters: { name: string; status: { totals: { requests: number; errors: number } } }[];
        }>(['status', 'disk']);
        assert.deepEqual(
          exp.filters.map((f) => f.name),
          ['resident'],
          'every cycle removed what it created',
        );
        assert.ok(exp.stack.changes >= 2 * CYCLES + 1, `stack changes: ${exp.stack.changes}`);
        const resident = exp.filters[0]!.status.totals;
        assert.ok(resident.requests > 0, 'fio I/O went through the filter stack');
        assert.equal(resident.errors, 0, 'no request failed');
        t.diagnostic(
          `${CYCLES} create/remove cycles (${2 * CYCLES} CLI runs) in ${cycleMs} ms with ${WORKERS} workers; ` +
            `${fioRuns} fio run(s), ${(fioBytes / 1024 / 1024).toFixed(0)} MiB verified I/O; resident stats saw ${resident.requests} requests`,
        );
      } finally {
        const code = await d.close();
        assert.equal(code, 0, `daemon exit code:\n${d.stderr().slice(-3000)}`);
        assert.deepEqual(daemonErrors(d.stderr()), [], 'daemon logged errors');
      }
    },
  );
});
