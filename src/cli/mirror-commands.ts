/**
 * `devfilter mirror start|status|pause|resume|set-rate|verify|cutover|cancel EXPORT`: live
 * migration of an export, as sugar over the control plane's `filter.create`, `filter.status`,
 * `filter.control` and `filter.remove` for a `mirror` filter (docs/mirror.md).
 */
import { Command, InvalidArgumentError } from 'commander';
import { formatSize, parseSize } from '../core/size.js';
import type { FilterSummary } from '../core/manager.js';
import {
  callTimeout,
  common,
  timeoutOption,
  withClient,
  type CommonOptions,
} from './filter-commands.js';
import { printJson, printYaml } from './output.js';

const DEFAULT_NAME = 'mirror';

function sizeArg(value: string): number {
  try {
    return parseSize(value);
  } catch (err) {
    throw new InvalidArgumentError((err as Error).message);
  }
}

function msArg(value: string): number {
  const n = Number(value);
  if (!/^\d+$/.test(value) || !Number.isSafeInteger(n))
    throw new InvalidArgumentError('expected milliseconds');
  return n;
}

type Opts = CommonOptions & Record<string, unknown>;

const nameOf = (o: Opts): string => (o.name as string | undefined) ?? DEFAULT_NAME;

function describe(s: Record<string, unknown>): string {
  const pct = ((s.progress as number) * 100).toFixed(1);
  const eta = s.etaSeconds === null ? '-' : `${String(s.etaSeconds)}s`;
  const lines = [
    `state:    ${String(s.state)}${s.reason ? ` (${String(s.reason)})` : ''}`,
    `target:   ${String(s.target)}`,
    `mode:     ${String(s.mode)}${s.mirroringWrites ? ', writes mirrored' : ''}`,
    `progress: ${pct}% (${formatSize(s.bytesDone as number)} of ${formatSize(s.size as number)}), dirty ${formatSize(s.dirtyBytes as number)}`,
    `copied:   ${formatSize(s.bytesCopied as number)} (${formatSize(s.bytesCopiedSinceResume as number)} since resume), zero ${formatSize(s.zeroBytes as number)}`,
    `rate:     ${formatSize(s.rate as number)}/s (limit ${s.rateLimit ? `${formatSize(s.rateLimit as number)}/s` : 'none'}), ETA ${eta}`,
  ];
  return lines.join('\n') + '\n';
}

export function addMirrorCommands(program: Command): void {
  const mirror = program
    .command('mirror')
    .description('Live migration of an export to a file, block device or NBD export, then cutover');

  const named = (cmd: Command): Command =>
    common(
      cmd
        .argument('<export>', 'export name')
        .option('-n, --name <name>', 'mirror filter name', DEFAULT_NAME),
    );

  named(
    mirror
      .command('start')
      .description('start copying EXPORT to --target (a mirror filter at the bottom of its stack)')
      .requiredOption(
        '-t, --target <path-or-uri>',
        'file, block device, or nbd:// / nbd+unix:// URI',
      )
      .option('--mode <mode>', 'background (default) or sync')
      .option('--rate <bytes/s>', 'copy rate limit, e.g. 50M (default: unlimited)', sizeArg)
      .option('--chunk-size <size>', 'copy unit (default 1M)', sizeArg)
      .option('--state-dir <dir>', 'directory for the resume state (survives a daemon restart)')
      .option('--auto-cutover', 'cut over by itself once synced', false)
      .addOption(timeoutOption()),
  )
    .addHelpText(
      'after',
      `\nExamples:\n  devfilter mirror start disk --target /srv/new/disk.img --rate 100M\n  devfilter mirror start disk --target 'nbd+unix:///disk?socket=/run/other.sock' --mode sync`,
    )
    .action(async (exportName: string, o: Opts) => {
      await withClient(o, async (c) => {
        const args: Record<string, unknown> = { target: o.target };
        if (o.mode !== undefined) args.mode = o.mode;
        if (o.rate !== undefined) args.rate = o.rate;
        if (o.chunkSize !== undefined) args.chunkSize = o.chunkSize;
        if (o.stateDir !== undefined) args.stateDir = o.stateDir;
        if (o.autoCutover === true) args.autoCutover = true;
        const params: Record<string, unknown> = {
          export: exportName,
          type: 'mirror',
          name: nameOf(o),
          args,
          at: 'bottom',
        };
        if (o.timeout !== undefined) params.timeoutMs = o.timeout;
        const r = await c.call<FilterSummary>('filter.create', params, {
          timeoutMs: callTimeout(o.timeout as number | undefined),
        });
        if (o.json) printJson(r);
        else
          process.stdout.write(
            `mirroring export ${exportName} to ${String(o.target)} (filter ${r.name})\n`,
          );
      });
    });

  named(mirror.command('status').description('progress, rate, ETA, dirty bytes and state')).action(
    async (exportName: string, o: Opts) => {
      await withClient(o, async (c) => {
        const r = await c.call<{ status: Record<string, unknown> }>('filter.status', {
          export: exportName,
          name: nameOf(o),
        });
        if (o.json) printJson(r.status);
        else process.stdout.write(describe(r.status));
      });
    },
  );

  const simple = (command: string, description: string, extra?: (cmd: Command) => Command) => {
    let cmd = named(mirror.command(command).description(description));
    if (extra) cmd = extra(cmd);
    cmd.action(async (exportName: string, o: Opts) => {
      await withClient(o, async (c) => {
        const args: Record<string, unknown> = {};
        if (o.rate !== undefined) args.rate = o.rate;
        if (o.mode !== undefined) args.mode = o.mode;
        const r = await c.call(
          'filter.control',
          {
            export: exportName,
            name: nameOf(o),
            command,
            args,
          },
          { timeoutMs: 0 },
        );
        if (o.json) printJson(r);
        else await printYaml(r);
      });
    });
  };
  simple('pause', 'stop copying (writes keep being tracked in the dirty map)');
  simple('resume', 'continue after a pause or a target failure, copying only what is dirty');
  simple('verify', 'compare source and target chunk by chunk; lists differing chunks');
  simple('set-rate', 'change the copy rate limit live', (cmd) =>
    cmd.requiredOption('--rate <bytes/s>', 'new limit, 0 = unlimited', sizeArg),
  );
  simple('set-mode', 'switch between background and sync mirroring of writes', (cmd) =>
    cmd.requiredOption('--mode <mode>', 'background or sync'),
  );

  named(
    mirror
      .command('cutover')
      .description(
        'atomically make the target the backend of EXPORT (clients stay connected), then remove the mirror filter',
      )
      .option('--wait <ms>', 'wait this long for the mirror to be synced (default 0)', msArg)
      .option('--verify', 'compare source and target first; refuse if they differ', false)
      .option('--keep-filter', 'leave the (now idle) mirror filter on the export', false)
      .addOption(timeoutOption()),
  ).action(async (exportName: string, o: Opts) => {
    await withClient(o, async (c) => {
      const args: Record<string, unknown> = {};
      if (o.wait !== undefined) args.wait = o.wait;
      if (o.timeout !== undefined) args.timeoutMs = o.timeout;
      if (o.verify === true) args.verify = true;
      const r = await c.call<Record<string, unknown>>(
        'filter.control',
        { export: exportName, name: nameOf(o), command: 'cutover', args },
        { timeoutMs: 0 },
      );
      if (o.keepFilter !== true)
        await c.call(
          'filter.remove',
          { export: exportName, name: nameOf(o) },
          {
            timeoutMs: callTimeout(o.timeout as number | undefined),
          },
        );
      if (o.json) printJson(r);
      else {
        process.stdout.write(
          `export ${exportName} now runs on ${String(r.to)} (was ${String(r.from)})\n`,
        );
        const recorded = (r.recorded as string[] | undefined) ?? [];
        if (recorded.length > 0)
          process.stdout.write(
            `recorded in ${recorded.join(', ')}: a daemon asked to serve ${String(r.from)} again refuses it; update its config to ${String(r.to)}\n`,
          );
      }
      // The one thing the operator must still do by hand: say it even with --json.
      if (typeof r.warning === 'string') process.stderr.write(`devfilter: warning: ${r.warning}\n`);
    });
  });

  named(
    mirror
      .command('cancel')
      .description(
        'stop mirroring and remove the filter; a synced target is left as a consistent copy',
      )
      .addOption(timeoutOption()),
  ).action(async (exportName: string, o: Opts) => {
    await withClient(o, async (c) => {
      const r = await c.call<Record<string, unknown>>(
        'filter.control',
        {
          export: exportName,
          name: nameOf(o),
          command: 'cancel',
          args: {},
        },
        { timeoutMs: 0 },
      );
      await c.call(
        'filter.remove',
        { export: exportName, name: nameOf(o), policy: 'cancel' },
        {
          timeoutMs: callTimeout(o.timeout as number | undefined),
        },
      );
      if (o.json) printJson(r);
      else process.stdout.write(`mirror of ${exportName} cancelled: ${String(r.note)}\n`);
    });
  });
}
