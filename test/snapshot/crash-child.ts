/**
 * The process the crash test kills: a DeviceManager with a file-backed export "disk" and a
 * snapshot filter, running the workload of crash-plan.ts until SIGKILL. Every acknowledged
 * operation and every snapshot taken is appended to acks.log and synced before the next step,
 * so the test knows exactly what was acknowledged.
 *
 * Usage: node crash-child.js DIR SEED
 */
import fs from 'node:fs';
import { join } from 'node:path';
import { pino } from 'pino';
import { FileBackend } from '../../src/backends/file.js';
import { FilterTypeRegistry } from '../../src/core/filter-types.js';
import { DeviceManager } from '../../src/core/manager.js';
import { builtinFilterTypes } from '../../src/filters/index.js';
import { CHUNK, PHASES, WORKERS, phaseOps } from './crash-plan.js';

const [dir, seedText] = process.argv.slice(2);
if (dir === undefined || seedText === undefined) throw new Error('usage: crash-child DIR SEED');
const seed = Number(seedText);

const types = new FilterTypeRegistry();
builtinFilterTypes.forEach((t) => types.register(t));
const manager = new DeviceManager(types, pino({ level: 'silent' }));
const originPath = join(dir, 'origin.img');
const backend = await FileBackend.open(originPath);
const exp = manager.addExport('disk', backend, { backendLabel: `file:${originPath}` });
await manager.createFilter('disk', 'snapshot', {
  name: 'snap',
  args: { store: join(dir, 'stores'), chunkSize: CHUNK },
  position: { at: 'bottom' },
});

const log = fs.openSync(join(dir, 'acks.log'), 'a');
const note = (line: string): void => {
  fs.writeSync(log, `${line}\n`);
  fs.fdatasyncSync(log);
};
note('ready');

const dev = exp.stack;
for (let p = 0; p < PHASES; p++) {
  await manager.control('disk', 'snap', 'take', { name: `p${p}` });
  note(`took ${p}`);
  await Promise.all(
    Array.from({ length: WORKERS }, async (_, w) => {
      const ops = phaseOps(seed, p, w);
      for (let i = 0; i < ops.length; i++) {
        const op = ops[i]!;
        if (op.kind === 'write') await dev.write(op.data!, op.offset, 0);
        else if (op.kind === 'trim') await dev.trim(op.offset, op.length, 0);
        else await dev.writeZeroes(op.offset, op.length, 0);
        note(`ack ${p} ${w} ${i}`);
      }
    }),
  );
  note(`done ${p}`);
  // Keep the snapshot count bounded (and crash during deletes too).
  if (p >= 6) await manager.control('disk', 'snap', 'delete', { name: `p${p - 6}` });
}
note('finished');
