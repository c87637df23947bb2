#!/usr/bin/env node
// The long crash round: `npm run torture -- --minutes 30 [--seed N]`. Runs kill -9 rounds
// over every scenario until time is up and prints the seed of any failure for replay
// (TORTURE_SEED=<seed> npm test -- crash, or --seed here).
import { parseArgs } from 'node:util';

const { values } = parseArgs({
  options: {
    minutes: { type: 'string', default: '5' },
    seed: { type: 'string' },
    help: { type: 'boolean', default: false },
  },
});
if (values.help) {
  console.log('usage: npm run torture -- [--minutes N] [--seed N]');
  process.exit(0);
}
const minutes = Number(values.minutes);
if (!(minutes > 0)) {
  console.error(`--minutes must be a positive number, got ${values.minutes}`);
  process.exit(2);
}
const { crashRound } = await import('../dist/test/crash/harness.js');

const scenarios = [
  ['plain', {}],
  [
    'filters',
    {
      filters: [
        { type: 'stats' },
        { type: 'fault' },
        { type: 'throttle', args: { iops: 1_000_000 } },
      ],
    },
  ],
  ['churn', { churn: true }],
  ['deep queue', { depth: 32, blocks: 1024 }],
  ['snapshots', { snapshots: true }],
  ['cdp', { cdp: true }],
  ['cutover', { cutover: true }],
];
const deadline = Date.now() + minutes * 60_000;
let seed = values.seed !== undefined ? Number(values.seed) : Date.now() % 1_000_000;
const totals = {
  rounds: 0,
  requests: 0,
  acknowledged: 0,
  stackChanges: 0,
  lost: 0,
  snapshotsIntact: 0,
  snapshotsFailed: 0,
};
let failed = false;
while (Date.now() < deadline) {
  const [name, opts] = scenarios[totals.rounds % scenarios.length];
  const r = await crashRound({ ...opts, seed });
  totals.rounds++;
  totals.requests += r.requests;
  totals.acknowledged += r.acknowledged;
  totals.stackChanges += r.stackChanges;
  totals.lost += r.lost.length;
  totals.snapshotsIntact += r.snapshotsIntact;
  totals.snapshotsFailed += r.snapshotsFailed.length;
  if (r.lost.length > 0) {
    failed = true;
    console.error(`FAIL scenario ${name} seed ${seed}: ${r.lost.length} blocks lost or wrong`);
    for (const l of r.lost.slice(0, 10)) console.error(`  ${l}`);
  }
  seed++;
}
console.log(
  `torture: ${totals.rounds} kill -9 rounds, ${totals.requests} requests (${totals.acknowledged} acknowledged), ` +
    `${totals.stackChanges} stack changes, ${totals.lost} durable blocks lost or images wrong; ` +
    `snapshots and cdp mark views after restart: ${totals.snapshotsIntact} intact, ${totals.snapshotsFailed} failed`,
);
process.exit(failed ? 1 : 0);
