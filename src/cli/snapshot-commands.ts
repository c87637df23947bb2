/**
 * `devfilter snapshot create|delete|list|status|verify`: point-in-time images of live exports, one
 * command each, over the control plane. A snapshot of several exports is one consistency
 * group (the same instant on all of them); each image is served as the export `EXPORT@NAME`.
 */
import type { Command } from 'commander';
import { parseSize } from '../core/size.js';
import { InvalidArgumentError } from 'commander';
import {
  callTimeout,
  common,
  timeoutOption,
  withClient,
  type CommonOptions,
} from './filter-commands.js';
import { ExitError, printJson, printYaml, table } from './output.js';

interface SnapshotRow {
  export?: string;
  name: string;
  generation: number;
  takenAt: string;
  state: string;
  reason: string | null;
  image?: string;
}

function collect(value: string, previous: string[] = []): string[] {
  return [...previous, value];
}

function sizeArg(value: string): number {
  try {
    return parseSize(value);
  } catch (err) {
    throw new InvalidArgumentError((err as Error).message);
  }
}

function rows(list: SnapshotRow[]): string {
  if (list.length === 0) return 'no snapshots\n';
  return table(
    ['EXPORT', 'NAME', 'GEN', 'TAKEN', 'STATE', 'IMAGE'],
    list.map((s) => [
      s.export ?? '-',
      s.name,
      String(s.generation),
      s.takenAt,
      s.state === 'failed' && s.reason ? `failed: ${s.reason}` : s.state,
      s.image ?? `${s.export}@${s.name}`,
    ]),
  );
}

export function addSnapshotCommands(program: Command): void {
  const snap = program
    .command('snapshot')
    .description('Point-in-time images of live exports (backup-on-write), served as EXPORT@NAME');

  common(
    snap
      .command('create')
      .description('take snapshot NAME of every --export at one instant (a consistency group)')
      .argument('<name>', 'snapshot name')
      .requiredOption('-e, --export <name>', 'an export to snapshot (repeatable)', collect)
      .option('--store <dir>', 'difference store directory (needed the first time on an export)')
      .option(
        '--limit <size>',
        'store size limit; beyond it the snapshot fails, the export never does',
        sizeArg,
      )
      .option('--chunk-size <size>', 'copy unit (default 64K)', sizeArg)
      .addOption(timeoutOption()),
  )
    .addHelpText(
      'after',
      `\nExamples:\n  devfilter snapshot create nightly --export db --store /var/lib/devfilter/snap --limit 20G\n  devfilter snapshot create both --export db --export logs     # one instant for both\n  qemu-img convert -O qcow2 'nbd+unix:///db@nightly?socket=…' db-nightly.qcow2`,
    )
    .action(async (name: string, o: CommonOptions & Record<string, unknown>) => {
      await withClient(o, async (c) => {
        const params: Record<string, unknown> = { name, exports: o.export };
        if (o.store !== undefined) params.store = o.store;
        if (o.limit !== undefined) params.limit = o.limit;
        if (o.chunkSize !== undefined) params.chunkSize = o.chunkSize;
        if (o.timeout !== undefined) params.timeoutMs = o.timeout;
        const r = await c.call<{ snapshots: SnapshotRow[] }>('snapshot.create', params, {
          timeoutMs: callTimeout(o.timeout as number | undefined) * 2,
        });
        if (o.json) printJson(r);
        else
          process.stdout.write(
            rows(r.snapshots.map((s, i) => ({ export: (o.export as string[])[i], ...s }))),
          );
      });
    });

  common(
    snap
      .command('delete')
      .description('delete snapshot NAME of EXPORT and free its space')
      .argument('<export>', 'export name')
      .argument('<name>', 'snapshot name'),
  ).action(async (exportName: string, name: string, o: CommonOptions) => {
    await withClient(o, async (c) => {
      const r = await c.call('snapshot.delete', { export: exportName, name });
      if (o.json) printJson(r);
      else process.stdout.write(`deleted snapshot ${name} of ${exportName}\n`);
    });
  });

  common(
    snap
      .command('list')
      .description('list the snapshots of EXPORT, or of every export')
      .argument('[export]', 'export name (default: all)'),
  ).action(async (exportName: string | undefined, o: CommonOptions) => {
    await withClient(o, async (c) => {
      const r = await c.call<{ snapshots: SnapshotRow[] }>(
        'snapshot.list',
        exportName === undefined ? {} : { export: exportName },
      );
      if (o.json) printJson(r);
      else process.stdout.write(rows(r.snapshots));
    });
  });

  common(
    snap
      .command('status')
      .description("show EXPORT's difference store and snapshots")
      .argument('<export>', 'export name'),
  ).action(async (exportName: string, o: CommonOptions) => {
    await withClient(o, async (c) => {
      const r = await c.call('snapshot.status', { export: exportName });
      if (o.json) printJson(r);
      else await printYaml(r);
    });
  });

  common(
    snap
      .command('verify')
      .description(
        "read every copy in EXPORT's difference store back against its checksum; damaged copies fail the snapshots they serve (exit 1)",
      )
      .argument('<export>', 'export name'),
  ).action(async (exportName: string, o: CommonOptions) => {
    await withClient(o, async (c) => {
      const r = (await c.call('snapshot.verify', { export: exportName })) as {
        checked: number;
        bytes: number;
        skipped: number;
        damaged: unknown[];
        failed: string[];
      };
      if (o.json) printJson(r);
      else {
        process.stdout.write(
          `${r.checked} copies checked (${r.bytes} bytes), ${r.skipped} freed meanwhile, ${r.damaged.length} damaged\n`,
        );
        if (r.damaged.length > 0) await printYaml({ damaged: r.damaged, failed: r.failed });
      }
      if (r.damaged.length > 0) throw new ExitError(1); // reported above
    });
  });
}
