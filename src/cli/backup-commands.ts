/**
 * `devfilter backup full|incremental|verify` and `devfilter restore`: qcow2 backups of a live
 * export from a snapshot and its change map (src/backup/run.ts), the check of a chain against
 * its manifests, and a chain written back to a file, a block device or an NBD export.
 * Progress: a bar on a terminal, JSON lines with --json, nothing otherwise.
 */
import type { Command } from 'commander';
import { InvalidArgumentError } from 'commander';
import { BackupRefused, runBackup, type BackupMode, type BackupProgress } from '../backup/run.js';
import { restoreChain } from '../backup/restore.js';
import { verifyChain } from '../backup/verify.js';
import { resolveControlPath } from '../control/socket-path.js';
import { parseSize } from '../core/size.js';
import { common, type CommonOptions } from './filter-commands.js';
import { ExitError, printJson, reportError, UsageError } from './output.js';

interface BackupOptions extends CommonOptions {
  base?: string;
  store?: string;
  limit?: number;
  cbt?: string;
  clusterSize?: number;
}

function sizeArg(value: string): number {
  try {
    return parseSize(value);
  } catch (err) {
    throw new InvalidArgumentError((err as Error).message);
  }
}

export function fmtBytes(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let v = n;
  let u = 0;
  while (v >= 1024 && u < units.length - 1) {
    v /= 1024;
    u++;
  }
  return `${u === 0 ? v : v.toFixed(1)} ${units[u]}`;
}

/** A one-line bar on stderr, redrawn in place; `done()` ends the line. */
export function progressBar(label: string): {
  update: (done: number, total: number, extra: string) => void;
  done: () => void;
} {
  const started = performance.now();
  let drawn = false;
  return {
    update: (done, total, extra) => {
      const frac = total > 0 ? Math.min(1, done / total) : 1;
      const width = 30;
      const fill = Math.round(frac * width);
      const secs = (performance.now() - started) / 1000;
      const rate = secs > 0 ? done / secs : 0;
      process.stderr.write(
        `\r${label} [${'#'.repeat(fill)}${'-'.repeat(width - fill)}] ${(frac * 100).toFixed(0).padStart(3)}% ` +
          `${fmtBytes(done)}/${fmtBytes(total)} ${fmtBytes(rate)}/s ${extra}\x1b[K`,
      );
      drawn = true;
    },
    done: () => {
      if (drawn) process.stderr.write('\n');
    },
  };
}

async function backupAction(
  mode: BackupMode,
  exportName: string,
  dest: string,
  o: BackupOptions,
): Promise<void> {
  const bar = !o.json && process.stderr.isTTY ? progressBar(`backup ${exportName}`) : undefined;
  const onProgress = (p: BackupProgress): void => {
    if (o.json) process.stdout.write(JSON.stringify({ event: 'progress', ...p }) + '\n');
    else bar?.update(p.doneBytes, p.totalBytes, `(${fmtBytes(p.dataBytes)} data)`);
  };
  try {
    const r = await runBackup({
      mode,
      exportName,
      dest,
      controlPath: resolveControlPath(o.control),
      ...(o.base !== undefined ? { base: o.base } : {}),
      ...(o.store !== undefined ? { store: o.store } : {}),
      ...(o.limit !== undefined ? { limit: o.limit } : {}),
      ...(o.cbt !== undefined ? { cbt: o.cbt } : {}),
      ...(o.clusterSize !== undefined ? { clusterSize: o.clusterSize } : {}),
      onProgress,
    });
    bar?.done();
    if (o.json) {
      process.stdout.write(JSON.stringify({ event: 'done', ...r }) + '\n');
      return;
    }
    process.stdout.write(
      `${r.mode} backup of ${r.export} at ${r.snapshotTime}: ${r.path}\n` +
        `  ${fmtBytes(r.fileSize)} file; ${fmtBytes(r.dataBytes)} data, ${fmtBytes(r.zeroBytes)} zeros ` +
        `of ${fmtBytes(r.scannedBytes)} ${r.mode === 'full' ? 'scanned' : 'changed'} (device ${fmtBytes(r.virtualSize)}) in ${r.seconds.toFixed(1)} s\n` +
        (r.base !== null ? `  on top of ${r.base}\n` : '') +
        (r.generation !== null
          ? `  change history ${r.generationId}, next incremental from generation ${r.generation}\n`
          : '') +
        r.notes.map((n) => `  note: ${n}\n`).join(''),
    );
  } catch (err) {
    bar?.done();
    throw new ExitError(
      reportError(err instanceof BackupRefused ? new UsageError(err.message) : err, o.json),
    );
  }
}

export function addBackupCommands(program: Command): void {
  const backup = program
    .command('backup')
    .description(
      'Full and incremental qcow2 backups of a live export (snapshot + cbt change map); verify a chain',
    );

  const withBackupOptions = (cmd: Command): Command =>
    common(cmd)
      .option(
        '--store <dir>',
        'difference store for the snapshot (needed the first time on an export)',
      )
      .option('--limit <size>', 'store size limit for a new snapshot filter', sizeArg)
      .option('--cbt <name>', "the export's cbt filter (default: its only one)");

  withBackupOptions(
    backup
      .command('full')
      .description(
        'snapshot EXPORT, copy all of it (holes and zeros skipped) into the qcow2 file DEST, record the change generation, drop the snapshot',
      )
      .argument('<export>', 'export name')
      .argument('<dest>', 'the backup image to create (must not exist)')
      .option('--cluster-size <size>', 'qcow2 cluster size, 4K..2M (default 64K)', sizeArg),
  ).action((exportName: string, dest: string, o: BackupOptions) =>
    backupAction('full', exportName, dest, o),
  );

  withBackupOptions(
    backup
      .command('incremental')
      .description(
        'snapshot EXPORT and copy only what changed since the base backup into DEST, a qcow2 file whose backing file is the base',
      )
      .argument('<export>', 'export name')
      .argument('<dest>', 'the backup image to create (must not exist)')
      .option(
        '--base <image>',
        "the backup to build on (default: the newest backup of EXPORT in DEST's directory)",
      ),
  ).action((exportName: string, dest: string, o: BackupOptions) =>
    backupAction('incremental', exportName, dest, o),
  );

  backup
    .command('verify')
    .description(
      'check IMAGE and its backing chain against the checksums recorded when they were written (exit 1 if anything is wrong)',
    )
    .argument('<image>', 'the top image of the chain')
    .option('--json', 'print the JSON report', false)
    .action(async (image: string, o: { json: boolean }) => {
      let ok: boolean;
      try {
        const r = await verifyChain(image);
        ok = r.ok;
        if (o.json) printJson(r);
        else {
          for (const i of r.images) {
            const md = i.metadata;
            process.stdout.write(
              `${i.path}: ${i.format}, ${i.checkedClusters} data clusters checked` +
                (md?.export !== undefined
                  ? `; ${String(md.kind ?? 'backup')} of ${md.export} at ${String(md.snapshotTime)}`
                  : '') +
                '\n',
            );
          }
          for (const n of r.notes) process.stdout.write(`note: ${n}\n`);
          for (const p of r.problems) process.stdout.write(`PROBLEM ${p.image}: ${p.message}\n`);
          process.stdout.write(
            r.ok
              ? `ok: ${r.images.length} image(s) verified\n`
              : `${r.problems.length} problem(s)\n`,
          );
        }
      } catch (err) {
        throw new ExitError(reportError(err, o.json));
      }
      // The report is out; the exit code says whether the chain is whole.
      if (!ok) throw new ExitError(1);
    });

  program
    .command('restore')
    .description(
      'Write the backup chain ending in IMAGE to TARGET: a new file (sparse), a block device, or an NBD export (nbd://…, nbd+unix://…); the chain is verified first',
    )
    .argument('<image>', 'the top image of the chain (a full or incremental backup)')
    .argument('<target>', 'file path, block device, or NBD URI')
    .option('--force', 'replace an existing regular file', false)
    .option('--no-verify', 'skip checking the chain against its manifests first')
    .option('--json', 'progress and result as JSON lines', false)
    .action(
      async (
        image: string,
        target: string,
        o: { force: boolean; verify: boolean; json: boolean },
      ) => {
        const bar = !o.json && process.stderr.isTTY ? progressBar('restore') : undefined;
        try {
          const r = await restoreChain(image, target, {
            force: o.force,
            verify: o.verify,
            onProgress: (p) => {
              if (o.json) process.stdout.write(JSON.stringify({ event: 'progress', ...p }) + '\n');
              else bar?.update(p.doneBytes, p.totalBytes, `(${fmtBytes(p.dataBytes)} data)`);
            },
          });
          bar?.done();
          if (o.json) process.stdout.write(JSON.stringify({ event: 'done', ...r }) + '\n');
          else
            process.stdout.write(
              `restored ${image} to ${r.target} (${r.kind}): ${fmtBytes(r.virtualSize)}, ` +
                `${fmtBytes(r.dataBytes)} data, ${fmtBytes(r.zeroBytes)} zeros in ${r.seconds.toFixed(1)} s\n` +
                r.notes.map((n) => `  note: ${n}\n`).join(''),
            );
        } catch (err) {
          bar?.done();
          throw new ExitError(reportError(err, o.json));
        }
      },
    );
}
