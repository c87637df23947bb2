/**
 * Property-based fuzzing of the control API (torture issue, item 3) against a real daemon.
 * Call sequences are generated from the methods' own parameter schemas — valid-looking values
 * from pools that hit real exports, filter types, commands and paths, mixed with arbitrary
 * JSON — so the fuzzer grows with the API. Properties: every call is answered (a result, or a
 * JSON-RPC error with a code and a message) within its time limit; the daemon never exits;
 * a client doing verified I/O on another export all along sees no error; memory stays bounded.
 *
 * Seeded: CONTROL_FUZZ_SEED=<seed> replays a run; CONTROL_FUZZ_RUNS=<n> runs longer
 * (default 1000 sequences of up to 8 calls).
 */
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import fc from 'fast-check';
import { ControlClient } from '../../src/control/client.js';
import { RpcError } from '../../src/control/protocol.js';
import { methodParamSchemas } from '../../src/control/schema.js';
import { NbdClient } from '../../src/nbd/client.js';
import { pattern } from '../filters/fixture.js';
import { spawnDaemon, tempDir, type DaemonProcess } from '../helpers/server.js';

const SEED =
  process.env.CONTROL_FUZZ_SEED !== undefined
    ? Number(process.env.CONTROL_FUZZ_SEED)
    : (Math.random() * 0x7fffffff) | 0;
const RUNS = Number(process.env.CONTROL_FUZZ_RUNS ?? 1000);
const CALL_TIMEOUT_MS = 20_000;
/** The daemon's resident memory may grow by this much over the run (stores live on disk). */
const RSS_GROWTH_LIMIT_MIB = 150;

const dir = tempDir('devfilter-fuzz-');
let daemon: DaemonProcess;
let control: string;

before(async () => {
  control = join(dir.path, 'control.sock');
  daemon = await spawnDaemon(
    [
      '--control',
      control,
      '--export',
      'disk=memory:16M',
      '--export',
      'other=memory:8M',
      '--export',
      'steady=memory:8M',
      '--log-level',
      'error',
    ],
    // Relative paths the fuzzer sends (stores, modules) resolve inside the test's directory.
    { cwd: dir.path },
  );
});

after(async () => {
  if (daemon.child.exitCode === null) await daemon.kill9();
  dir.cleanup();
});

type Schema = {
  type?: string | string[];
  required?: readonly string[];
  enum?: readonly unknown[];
  properties?: Record<string, Schema>;
  items?: Schema;
  minimum?: number;
  maximum?: number;
};

/** Values that reach real objects: exports, filters, types, commands — never "steady". */
function pools(): Record<string, fc.Arbitrary<unknown>> {
  const exportNames = fc.constantFrom('disk', 'other', 'nope', '', 'disk@s1', 'disk@s2');
  const paths = fc.constantFrom(
    join(dir.path, 'store'),
    join(dir.path, 'cbt'),
    'relative-store',
    join(dir.path, 'not-a-dir', '..', 'store2'),
    '/proc/devfilter-no-such-dir',
    '',
  );
  const size = fc.oneof(
    fc.constantFrom('64K', '1M', '4K', '3K', '0', '-1', 'lots', 65536),
    fc.integer(),
  );
  return {
    export: exportNames,
    exports: fc.array(exportNames, { maxLength: 4 }),
    type: fc.constantFrom('stats', 'fault', 'throttle', 'snapshot', 'cbt', 'nope', ''),
    name: fc.constantFrom('stats', 'fault', 'throttle', 'snapshot', 'cbt', 'f1', 's1', 's2', '..'),
    above: fc.constantFrom('stats', 'fault', 'snapshot', 'nope'),
    below: fc.constantFrom('stats', 'fault', 'snapshot', 'nope'),
    command: fc.constantFrom(
      'take',
      'delete',
      'list',
      'status',
      'verify',
      'set-rules',
      'add-rule',
      'remove-rule',
      'clear',
      'reseed',
      'generation',
      'changed',
      'reset',
      'mark-dirty',
      'nope',
    ),
    policy: fc.constantFrom('keep', 'drop', 'nope'),
    store: paths,
    dir: paths,
    spec: fc.constantFrom(
      './no-such-module.js',
      '/devfilter-no-such-module.mjs',
      'devfilter-no-such-package',
      'node:fs',
    ),
    cwd: fc.constantFrom(dir.path, '/nonexistent'),
    timeoutMs: fc.constantFrom(1, 50, 5000, 0, -1, 1.5),
    limit: size,
    chunkSize: size,
    blockSize: size,
    seed: fc.oneof(fc.nat(), fc.integer()),
    iops: fc.oneof(fc.constantFrom(1e9, 1e6), fc.double()),
    bps: fc.oneof(fc.constantFrom(1e12), fc.double()),
    rules: fc.oneof(
      fc.constant([]),
      fc.constant([{ action: 'error', ops: 'read', probability: 0.5 }]),
      fc.constant([{ action: 'delay', ops: 'write', delayMs: 1 }]),
      fc.constant('[{"action":"drop","ops":"read"}]'),
      fc.jsonValue(),
    ),
    action: fc.constantFrom('error', 'delay', 'flakey', 'drop', 'torn', 'nope'),
    ops: fc.constantFrom('read', 'write', 'all', 'read,write', 'nope'),
    id: fc.oneof(fc.nat(10), fc.string()),
    since: fc.oneof(fc.nat(5), fc.integer()),
    offset: fc.oneof(fc.nat(1 << 24), fc.integer()),
    length: fc.oneof(fc.nat(1 << 24), fc.integer()),
  };
}

function valueFor(
  key: string,
  schema: Schema | undefined,
  p: Record<string, fc.Arbitrary<unknown>>,
): fc.Arbitrary<unknown> {
  const wild = { weight: 1, arbitrary: fc.jsonValue({ maxDepth: 2 }) };
  const known: fc.WeightedArbitrary<unknown>[] = [];
  if (key === 'args') known.push({ weight: 6, arbitrary: argsObject(p) });
  else if (p[key]) known.push({ weight: 6, arbitrary: p[key]! });
  if (schema?.enum) known.push({ weight: 3, arbitrary: fc.constantFrom(...schema.enum) });
  return fc.oneof(wild, ...known);
}

/** Filter and command arguments: keys the built-in types know, values from the pools. */
function argsObject(p: Record<string, fc.Arbitrary<unknown>>): fc.Arbitrary<unknown> {
  const keys = [
    'name',
    'store',
    'limit',
    'chunkSize',
    'growStep',
    'rules',
    'seed',
    'iops',
    'bps',
    'dir',
    'blockSize',
    'timeoutMs',
    'action',
    'ops',
    'id',
    'since',
    'offset',
    'length',
    'unknownArg',
  ];
  return fc
    .uniqueArray(fc.constantFrom(...keys), { maxLength: 5 })
    .chain((ks) =>
      fc.record(Object.fromEntries(ks.map((k) => [k, p[k] ?? fc.jsonValue({ maxDepth: 1 })]))),
    );
}

interface Call {
  method: string;
  params: unknown;
}

function callArbitrary(): fc.Arbitrary<Call> {
  const p = pools();
  const methods = Object.keys(methodParamSchemas);
  const shaped = fc.constantFrom(...methods).chain((method) => {
    const schema = (methodParamSchemas as unknown as Record<string, Schema>)[method]!;
    // Required keys are there most of the time, so that most calls get past validation.
    const required = new Set(schema.required ?? []);
    const entries = [...Object.keys(schema.properties ?? {}), 'extra'].map((k) => {
      const value = valueFor(k, schema.properties?.[k], p);
      // Weights, not a drawn number: fast-check biases numbers towards 0 and the edges.
      const [inW, outW] = required.has(k) ? [9, 1] : k === 'extra' ? [1, 19] : [2, 3];
      return fc.oneof(
        { weight: inW, arbitrary: value.map((v) => [k, v] as const) },
        { weight: outW, arbitrary: fc.constant(undefined) },
      );
    });
    return fc
      .tuple(...entries)
      .map((kv) => ({ method, params: Object.fromEntries(kv.filter((e) => e !== undefined)) }));
  });
  const wild = fc.record({
    method: fc.oneof(fc.constantFrom(...methods), fc.string({ maxLength: 40 })),
    params: fc.oneof(fc.jsonValue({ maxDepth: 3 }), fc.constant(undefined)),
  });
  return fc.oneof({ weight: 4, arbitrary: shaped }, { weight: 1, arbitrary: wild });
}

function rssMiB(pid: number): number {
  const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  return m ? Number(m[1]) / 1024 : 0;
}

test(`control API fuzz: always answered, never down, others unaffected (CONTROL_FUZZ_SEED=${SEED})`, async (t) => {
  const pid = daemon.child.pid!;
  const rssBefore = rssMiB(pid);

  // A client on another export writes and reads back all along: it must never see an error.
  const steady = await NbdClient.fromUri(daemon.uri('steady'));
  let stop = false;
  let verified = 0;
  const verifier = (async () => {
    for (let i = 0; !stop; i++) {
      const off = ((i * 37) % 2048) * 4096;
      const data = pattern(4096, i + 1);
      await steady.write(off, data);
      const back = await steady.read(off, 4096);
      assert.ok(back.equals(data), `steady export: block at ${off} reads back wrong`);
      verified++;
    }
  })();

  let calls = 0;
  const outcomes = new Map<string, number>();
  try {
    await fc.assert(
      fc.asyncProperty(fc.array(callArbitrary(), { minLength: 1, maxLength: 8 }), async (seq) => {
        const c = await ControlClient.connect(control);
        try {
          for (const { method, params } of seq) {
            calls++;
            try {
              await c.call(method, params as Record<string, unknown>, {
                timeoutMs: CALL_TIMEOUT_MS,
              });
              outcomes.set('ok', (outcomes.get('ok') ?? 0) + 1);
            } catch (err) {
              // Anything but a JSON-RPC error (no answer, connection lost) is a failure.
              assert.ok(
                err instanceof RpcError,
                `${method} ${JSON.stringify(params)}: ${(err as Error).message}`,
              );
              assert.ok(Number.isInteger(err.code) && err.message.length > 0);
              const k = String(err.data?.code ?? err.code);
              outcomes.set(k, (outcomes.get(k) ?? 0) + 1);
            }
            assert.equal(daemon.child.exitCode, null, `the daemon exited: ${daemon.stderr()}`);
          }
        } finally {
          c.close();
        }
      }),
      { seed: SEED, numRuns: RUNS, endOnFailure: true },
    );
  } finally {
    stop = true;
    await verifier;
    await steady.disconnect();
  }
  const rssAfter = rssMiB(pid);
  t.diagnostic(
    `${calls} calls; outcomes ${JSON.stringify(Object.fromEntries(outcomes))}; ` +
      `${verified} verified writes alongside; RSS ${rssBefore.toFixed(0)} → ${rssAfter.toFixed(0)} MiB`,
  );
  assert.ok(verified > 0, 'the steady client made progress');
  assert.ok(
    rssAfter - rssBefore < RSS_GROWTH_LIMIT_MIB,
    `daemon RSS grew by ${(rssAfter - rssBefore).toFixed(0)} MiB`,
  );
  // Still whole: a plain request answers, and the stack of the fuzzed export can be emptied.
  const c = await ControlClient.connect(control);
  try {
    await c.call('daemon.status');
    await c.call('filter.removeAll', { export: 'disk', policy: 'drop' });
  } finally {
    c.close();
  }
  assert.doesNotMatch(daemon.stderr(), /uncaught|unhandled|FATAL/i);
  // Whatever the fuzzer left behind, SIGTERM stops the daemon cleanly and promptly.
  const code = await Promise.race([
    daemon.stop(),
    new Promise<string>((resolve) => setTimeout(() => resolve('hung'), 20_000)),
  ]);
  if (code === 'hung') await daemon.kill9();
  assert.equal(code, 0, `SIGTERM: ${String(code)}; stderr: ${daemon.stderr().slice(-2000)}`);
});
