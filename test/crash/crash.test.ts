/**
 * Short crash rounds for CI: kill -9 the daemon under a random workload, with and without a
 * filter stack and with the stack changing; nothing durable may be lost. The long round is
 * `npm run torture -- --minutes N`. Replay a failure with TORTURE_SEED=<seed>.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { crashRound, type RoundOptions } from './harness.js';

const baseSeed =
  process.env.TORTURE_SEED !== undefined
    ? Number(process.env.TORTURE_SEED)
    : Date.now() % 1_000_000;

const scenarios: Array<[string, Omit<RoundOptions, 'seed'>]> = [
  ['plain file export', {}],
  [
    'stats, fault (no rules) and throttle (high limit) in the stack',
    {
      filters: [
        { type: 'stats' },
        { type: 'fault' },
        { type: 'throttle', args: { iops: 1_000_000 } },
      ],
    },
  ],
  ['filters created and removed while the daemon is killed', { churn: true }],
  ['snapshots taken and deleted all along, images checked after the restart', { snapshots: true }],
  ['cdp marks made all along, their views checked after the restart', { cdp: true }],
  [
    'a mirror cut over at a random moment: the source or the target, whichever is current',
    { cutover: true },
  ],
];

for (const [i, [name, opts]] of scenarios.entries()) {
  test(`kill -9 under load loses nothing durable: ${name}`, async (t) => {
    for (let round = 0; round < 3; round++) {
      const seed = baseSeed + i * 1000 + round;
      const r = await crashRound({ ...opts, seed });
      assert.deepEqual(
        r.lost,
        [],
        `seed ${seed} (replay with TORTURE_SEED=${seed - i * 1000 - round}): ${r.lost.length} durable blocks lost`,
      );
      assert.ok(r.acknowledged > 0, `seed ${seed}: no request completed before the kill`);
      if (opts.churn)
        assert.ok(r.stackChanges > 0, `seed ${seed}: the stack never changed before the kill`);
      if (opts.cutover)
        t.diagnostic(
          `seed ${seed}: ${r.cutOver ? 'cut over: the target checked' : 'not cut over: the source checked'}; ${r.cutoverRefusals} cutover(s) refused first`,
        );
      if (opts.cdp) {
        t.diagnostic(`seed ${seed}: ${r.snapshotsIntact} mark view(s) intact after the restart`);
        assert.ok(r.snapshotsIntact > 0, `seed ${seed}: no mark to check after the restart`);
      }
      if (opts.snapshots) {
        t.diagnostic(
          `seed ${seed}: ${r.snapshotsIntact} snapshot(s) intact after the restart, ` +
            `${r.snapshotsFailed.length} failed ${JSON.stringify(r.snapshotsFailed)}`,
        );
        assert.ok(
          r.snapshotsIntact + r.snapshotsFailed.length > 0,
          `seed ${seed}: no snapshot to check after the restart`,
        );
      }
    }
  });
}
