/**
 * `devfilter cdp status|mark|unmark|marks|view|close|views|rollback|timeline|reset EXPORT`:
 * continuous data protection, as sugar over `filter.control` of a `cdp` filter (docs/cdp.md).
 */
import { Command, InvalidArgumentError, Option } from 'commander';
import { formatSize } from '../core/size.js';
import { common, withClient, type CommonOptions } from './filter-commands.js';
import { printJson, printYaml } from './output.js';

const DEFAULT_NAME = 'cdp';

type Opts = CommonOptions & Record<string, unknown>;

const nameOf = (o: Opts): string => (o.name as string | undefined) ?? DEFAULT_NAME;

function seqArg(value: string): number {
  const n = Number(value);
  if (!/^\d+$/.test(value) || !Number.isSafeInteger(n))
    throw new InvalidArgumentError('expected a sequence number');
  return n;
}

function positiveArg(value: string): number {
  const n = Number(value);
  if (!(n > 0) || !Number.isFinite(n)) throw new InvalidArgumentError('expected a number > 0');
  return n;
}

/** --at, --seq, --mark: one of them names a point of the history. */
function pointOptions(cmd: Command, required: boolean): Command {
  return cmd
    .addOption(
      new Option('--at <time>', 'a time, ISO 8601 (2026-11-26T10:41:07Z) or local').conflicts([
        'seq',
        'mark',
      ]),
    )
    .addOption(new Option('--seq <n>', 'a sequence number').argParser(seqArg).conflicts('mark'))
    .addOption(new Option('--mark <name>', 'a bookmark made with `cdp mark`'))
    .hook('preAction', (c) => {
      const o = c.opts<Opts>();
      if (required && o.at === undefined && o.seq === undefined && o.mark === undefined)
        c.error('error: give the point with one of --at, --seq or --mark');
    });
}

function pointOf(o: Opts): Record<string, unknown> {
  const p: Record<string, unknown> = {};
  if (o.at !== undefined) p.at = o.at;
  if (o.seq !== undefined) p.seq = o.seq;
  if (o.mark !== undefined) p.mark = o.mark;
  return p;
}

interface Timeline {
  from: string;
  to: string;
  bucketSeconds: number;
  buckets: Array<{ start: string; changes: number; bytes: number; rollback: number }>;
  marks: Array<{ name: string; point: number; markedAt: string }>;
  oldest: { point: number; before: string | null };
  newest: { point: number; time: string | null };
  retention: { keepHours: number; keepBytes: number };
}

const BAR_WIDTH = 40;
const EIGHTHS = ['', '▏', '▎', '▍', '▌', '▋', '▊', '▉'];

function bar(value: number, max: number): string {
  if (value === 0 || max === 0) return '';
  const eighths = Math.max(1, Math.round((value / max) * BAR_WIDTH * 8));
  return '█'.repeat(Math.floor(eighths / 8)) + EIGHTHS[eighths % 8]!;
}

/** One line per bucket: time, a bar of changes, counts, and the marks made in it. */
export function renderTimeline(t: Timeline): string {
  const max = Math.max(0, ...t.buckets.map((b) => b.changes + b.rollback));
  const bucketMs = t.bucketSeconds * 1000;
  const oldestMs = t.oldest.before === null ? null : Date.parse(t.oldest.before);
  const lines = [
    `history: points ${t.oldest.point}..${t.newest.point}` +
      (t.oldest.before !== null ? `, oldest just before ${t.oldest.before}` : '') +
      `; keep ${t.retention.keepHours} h, ${formatSize(t.retention.keepBytes)}`,
    `${t.bucketSeconds}-second buckets from ${t.from} to ${t.to} (local time):`,
  ];
  for (const b of t.buckets) {
    const start = Date.parse(b.start);
    const when = new Date(start).toTimeString().slice(0, 8);
    const total = b.changes + b.rollback;
    const inWindow = oldestMs === null || start + bucketMs > oldestMs;
    const marks = t.marks
      .filter((m) => {
        const at = Date.parse(m.markedAt);
        return at >= start && at < start + bucketMs;
      })
      .map((m) => `◆ ${m.name}`);
    const facts =
      total > 0
        ? `${total} change${total === 1 ? '' : 's'}, ${formatSize(b.bytes)}${b.rollback > 0 ? ` (${b.rollback} by rollback)` : ''}`
        : '';
    lines.push(
      `${when} ${inWindow ? '│' : '┆'} ${bar(total, max).padEnd(BAR_WIDTH + 1)} ${facts} ${marks.join(' ')}`.trimEnd(),
    );
  }
  return lines.join('\n') + '\n';
}

function describeStatus(s: Record<string, unknown>): string {
  const oldest = s.oldest as { point: number; before: string | null };
  const newest = s.newest as { point: number; time: string | null };
  const journal = s.journal as { bytes: number; segments: number };
  const index = s.index as { entries: number; approxBytes: number };
  const retention = s.retention as { keepHours: number; keepBytes: number; heldBy: string[] };
  const views = s.views as Array<{ name: string; point: number }>;
  const rollback = s.rollback as { id: number; state: string; target: number } | null;
  const failure = s.failure as { reason: string } | null;
  const lines = [
    `state:     ${String(s.state)}${failure ? `: ${failure.reason}` : ''}`,
    `history:   ${String(s.historyId)} in ${String(s.dir)}`,
    `oldest:    point ${oldest.point}${oldest.before ? ` (just before ${oldest.before})` : ''}`,
    `newest:    point ${newest.point}${newest.time ? ` (${newest.time})` : ''}`,
    `journal:   ${formatSize(journal.bytes)} in ${journal.segments} segment(s), ${String(s.changes)} changes`,
    `index:     ${index.entries} block entries, about ${formatSize(index.approxBytes)}`,
    `retention: ${retention.keepHours} h, ${formatSize(retention.keepBytes)}${retention.heldBy.length > 0 ? `; held back by ${retention.heldBy.join(', ')}` : ''}`,
    `marks:     ${String(s.marks)}`,
    `views:     ${views.length === 0 ? 'none' : views.map((v) => `${v.name} (point ${v.point})`).join(', ')}`,
  ];
  if (rollback !== null)
    lines.push(`rollback:  ${rollback.id} to point ${rollback.target}: ${rollback.state}`);
  return lines.join('\n') + '\n';
}

export function addCdpCommands(program: Command): void {
  const cdp = program
    .command('cdp')
    .description(
      'Continuous data protection: bookmarks, views of any past point, rollback, timeline',
    )
    .addHelpText(
      'after',
      `\nAttach first: devfilter filter create EXPORT cdp --arg dir=/var/lib/devfilter/cdp/EXPORT\n\nExamples:\n  devfilter cdp mark disk after-checkpoint\n  devfilter cdp view disk --at 2026-11-26T10:41:07Z\n  devfilter cdp rollback disk --mark after-checkpoint\n  devfilter cdp timeline disk --minutes 30`,
    );

  const named = (cmd: Command): Command =>
    common(
      cmd
        .argument('<export>', 'export name')
        .option('-n, --name <name>', 'cdp filter name', DEFAULT_NAME),
    );

  const call = (
    exportName: string,
    o: Opts,
    command: string,
    args: Record<string, unknown>,
    show: (r: unknown) => string | Promise<void>,
  ) =>
    withClient(o, async (c) => {
      const r = await c.call(
        'filter.control',
        { export: exportName, name: nameOf(o), command, args },
        { timeoutMs: 0 },
      );
      if (o.json) printJson(r);
      else {
        const text = await show(r);
        if (typeof text === 'string') process.stdout.write(text);
      }
    });

  named(cdp.command('status').description('history window, journal, index, marks, views')).action(
    (exportName: string, o: Opts) =>
      call(exportName, o, 'status', {}, (r) => describeStatus(r as Record<string, unknown>)),
  );

  pointOptions(
    named(
      cdp
        .command('mark')
        .description('name a point: now (after every write acknowledged so far), or the one given'),
    ).argument('<mark>', 'bookmark name'),
    false,
  ).action((exportName: string, mark: string, o: Opts) =>
    call(exportName, o, 'mark', { name: mark, ...pointOf(o) }, (r) => {
      const m = r as { name: string; point: number; time: string };
      return `marked point ${m.point} as ${m.name}\n`;
    }),
  );

  named(cdp.command('unmark').description('delete a bookmark'))
    .argument('<mark>', 'bookmark name')
    .action((exportName: string, mark: string, o: Opts) =>
      call(exportName, o, 'unmark', { name: mark }, () => `mark ${mark} deleted\n`),
    );

  named(cdp.command('marks').description('list the bookmarks')).action(
    (exportName: string, o: Opts) =>
      call(exportName, o, 'marks', {}, (r) => {
        const marks = r as Array<{ name: string; point: number; markedAt: string }>;
        if (marks.length === 0) return 'no marks\n';
        return marks.map((m) => `${m.name}\tpoint ${m.point}\t${m.markedAt}\n`).join('');
      }),
  );

  pointOptions(
    named(
      cdp
        .command('view')
        .description('open a read-only export showing EXPORT as it was at a point')
        .option('--view-name <name>', 'export name of the view (default EXPORT@cdp-POINT)'),
    ),
    true,
  ).action((exportName: string, o: Opts) => {
    const args = pointOf(o);
    if (o.viewName !== undefined) args.name = o.viewName;
    return call(exportName, o, 'view', args, (r) => {
      const v = r as { name: string; point: number; time: string | null };
      return `view ${v.name} open: ${exportName} as of point ${v.point}${v.time ? ` (${v.time})` : ''}\n`;
    });
  });

  named(cdp.command('close').description('close a view'))
    .argument('<view>', 'view export name')
    .action((exportName: string, view: string, o: Opts) =>
      call(exportName, o, 'close-view', { name: view }, () => `view ${view} closed\n`),
    );

  named(cdp.command('views').description('list the open views')).action(
    (exportName: string, o: Opts) => call(exportName, o, 'views', {}, (r) => printYaml(r)),
  );

  pointOptions(
    named(
      cdp
        .command('rollback')
        .description(
          'bring EXPORT back to a point: its requests pause meanwhile; journaled, so it can be undone',
        )
        .option(
          '--force',
          'roll back even though NBD clients are connected to the daemon (stop or unmount clients that cache the device first)',
          false,
        ),
    ),
    true,
  ).action(async (exportName: string, o: Opts) => {
    await withClient(o, async (c) => {
      if (o.force !== true) {
        const d = await c.call<{ connections: number }>('daemon.status', {});
        if (d.connections > 0)
          throw new Error(
            `${d.connections} NBD connection(s) are open on the daemon: a client that caches the device (a mounted file system, a VM) would not see the rollback. Stop them, or pass --force (their requests pause during the rollback)`,
          );
      }
      const r = await c.call<{
        id: number;
        target: number;
        from: number;
        to: number;
        blocksRestored: number;
        undo: string;
      }>(
        'filter.control',
        { export: exportName, name: nameOf(o), command: 'rollback', args: pointOf(o) },
        { timeoutMs: 0 },
      );
      if (o.json) printJson(r);
      else
        process.stdout.write(
          `rolled ${exportName} back to point ${r.target} (rollback ${r.id}, ${r.blocksRestored} blocks restored, now point ${r.to})\nundo: devfilter cdp rollback ${exportName} --${r.undo}\n`,
        );
    });
  });

  named(
    cdp
      .command('timeline')
      .description('changes per minute, bookmarks and the retention window, as a terminal chart')
      .option('--minutes <n>', 'how far back (default 60)', positiveArg)
      .option('--bucket <seconds>', 'bucket width in seconds (default 60)', positiveArg),
  ).action((exportName: string, o: Opts) => {
    const args: Record<string, unknown> = {};
    if (o.minutes !== undefined) args.minutes = o.minutes;
    if (o.bucket !== undefined) args.bucketSeconds = Math.round(o.bucket as number);
    return call(exportName, o, 'timeline', args, (r) => renderTimeline(r as Timeline));
  });

  named(
    cdp
      .command('reset')
      .description('drop the whole history and start a new one (after a journal failure)'),
  ).action((exportName: string, o: Opts) =>
    call(exportName, o, 'reset', {}, (r) => {
      const x = r as { historyId: string };
      return `new history ${x.historyId}\n`;
    }),
  );
}
