/**
 * `devfilter interpose attach|detach|status`: filters in front of an existing, mounted
 * device-mapper device (docs/interpose.md). `interpose serve` is the dedicated daemon that
 * attach starts; it is not meant to be run by hand.
 */
import { Command, InvalidArgumentError, Option } from 'commander';
import { DEFAULT_STATE_ROOT, listStates, type InterposeFilter } from '../interpose/state.js';
import { keyValuesToArgs } from './args.js';
import { createLogger } from './logger.js';
import { printJson } from './output.js';

function filterArg(value: string, previous: InterposeFilter[] = []): InterposeFilter[] {
  const colon = value.indexOf(':');
  const type = colon < 0 ? value : value.slice(0, colon);
  if (!/^[a-z][a-z0-9-]*$/.test(type))
    throw new InvalidArgumentError(`bad filter type ${JSON.stringify(type)} (TYPE[:k=v,...])`);
  const rest = colon < 0 ? '' : value.slice(colon + 1);
  let args: Record<string, unknown>;
  try {
    args = keyValuesToArgs(rest === '' ? [] : rest.split(','));
  } catch (err) {
    throw new InvalidArgumentError((err as Error).message);
  }
  const f: InterposeFilter = { type, args };
  if (typeof args.name === 'string') {
    f.name = args.name;
    delete args.name;
  }
  return [...previous, f];
}

function msArg(value: string): number {
  const n = Number(value);
  if (!/^\d+$/.test(value) || n < 1) throw new InvalidArgumentError('expected milliseconds');
  return n;
}

const stateRootOption = () =>
  new Option('--state-dir <dir>', 'where the state of interposed devices lives').default(
    DEFAULT_STATE_ROOT,
  );

export function addInterposeCommands(program: Command): void {
  const cmd = program
    .command('interpose')
    .description(
      'Put filters in front of an existing, mounted device-mapper device (an LVM volume), and take them away again',
    )
    .addHelpText(
      'after',
      `\nExamples:\n  devfilter interpose attach /dev/vg0/data --filter stats --filter snapshot:store=/var/lib/devfilter/snap\n  devfilter filter status --control /run/devfilter/interpose/vg0-data/control.sock vg0-data stats\n  devfilter interpose detach /dev/vg0/data\n\nRoot only. See docs/interpose.md.`,
    );

  cmd
    .command('attach')
    .description(
      'serve DMDEV through devfilter: its table is swapped (suspend, load, resume) to an NBD device whose backend is the original table',
    )
    .argument('<dmdev>', 'dm device: /dev/mapper/NAME, /dev/VG/LV, /dev/dm-N or NAME')
    .option(
      '-f, --filter <type[:k=v,...]>',
      'a filter, live before the resume (repeatable, top first)',
      filterArg,
    )
    .option(
      '--timeout <ms>',
      'how long the daemon and the NBD device may take to come up',
      msArg,
      60_000,
    )
    .addOption(stateRootOption())
    .option('--json', 'print the state as JSON', false)
    .action(
      async (
        dev: string,
        o: { filter?: InterposeFilter[]; timeout: number; stateDir: string; json: boolean },
      ) => {
        const { attach } = await import('../interpose/attach.js');
        const state = await attach(dev, {
          stateRoot: o.stateDir,
          filters: o.filter ?? [],
          timeoutMs: o.timeout,
          say: (line) => {
            if (!o.json) process.stdout.write(`${line}\n`);
          },
        });
        if (o.json) printJson(state);
        else
          process.stdout.write(
            `export ${state.exportName} on /dev/${state.nbd}; control: devfilter filter list --control ${state.control}\n`,
          );
      },
    );

  cmd
    .command('detach')
    .description('put the original table back (suspend, load, resume) and stop serving DMDEV')
    .argument('<dmdev>', 'dm device or its name')
    .option('--timeout <ms>', 'how long the daemon may take to stop', msArg, 60_000)
    .addOption(stateRootOption())
    .action(async (dev: string, o: { timeout: number; stateDir: string }) => {
      const { detach } = await import('../interpose/attach.js');
      await detach(dev, {
        stateRoot: o.stateDir,
        timeoutMs: o.timeout,
        say: (line) => process.stdout.write(`${line}\n`),
      });
    });

  cmd
    .command('status')
    .description('the interposed devices, their NBD devices, daemons and control sockets')
    .addOption(stateRootOption())
    .option('--json', 'print JSON', false)
    .action(async (o: { stateDir: string; json: boolean }) => {
      const states = await listStates(o.stateDir);
      if (o.json) return printJson(states);
      if (states.length === 0) return void process.stdout.write('no device is interposed\n');
      for (const s of states)
        process.stdout.write(
          `${s.dmName}\t${s.phase}\t/dev/${s.nbd ?? '-'}\tpid ${s.pid ?? '-'}\t${s.control}\tfilters: ${s.filters.map((f) => f.type).join(', ') || 'none'}\n`,
        );
    });

  cmd
    .command('serve', { hidden: true })
    .description('the daemon behind one interposed device (started by attach)')
    .requiredOption('--state <file>', 'the state file attach wrote')
    .option('--log-level <level>', 'log level', 'info')
    .action(async (o: { state: string; logLevel: string }) => {
      const { serveInterposed } = await import('../interpose/serve.js');
      await serveInterposed(o.state, await createLogger(o.logLevel));
    });
}
