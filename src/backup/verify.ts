/**
 * `backup verify`: checks a backup chain against the manifests written with it. For every
 * qcow2 image in the chain, top down:
 *  - its manifest exists, is intact (magic, version, SHA-256) and describes this image (backup
 *    id in the header extension, virtual size, cluster size, backing file name and format);
 *  - the image's own cluster map (data, zero, unallocated) is exactly the manifest's;
 *  - every data cluster's CRC-32, and the SHA-256 of all data clusters, match;
 *  - the chain link: the backing image exists and its manifest's digest is the one recorded.
 * Problems are collected, not thrown: the report says all that is wrong, up to a limit.
 */
import { crc32 } from '../core/crc32.js';
import { createHash } from 'node:crypto';
import {
  ExtentKind,
  manifestPathOf,
  readManifest,
  type BackupMetadata,
  type Manifest,
} from './manifest.js';
import { Qcow2Image, resolveBackingPath, type ClusterKind } from './qcow2-reader.js';
import { QCOW2_MAGIC } from './qcow2-format.js';
import { headerSize } from './qcow2-writer.js';
import fs from 'node:fs';

export interface VerifyOptions {
  /** Problems reported per image before the rest are only counted. 100 by default. */
  maxProblems?: number;
  /** Longest chain followed. 64 by default. */
  maxChainDepth?: number;
}

export interface VerifiedImage {
  path: string;
  format: 'qcow2' | 'raw';
  /** Digest of its manifest, if one could be read. */
  manifestDigest: string | null;
  backupId: string | null;
  metadata: BackupMetadata | null;
  /** Data clusters whose checksum was compared. */
  checkedClusters: number;
}

export interface VerifyProblem {
  image: string;
  message: string;
}

export interface VerifyReport {
  ok: boolean;
  /** The chain as followed, top first. */
  images: VerifiedImage[];
  problems: VerifyProblem[];
  /** Facts worth telling that are not damage (e.g. a raw base image carries no checksums). */
  notes: string[];
}

/** How many clusters of data verify reads at once. */
const READ_BYTES = 8 * 1024 * 1024;

export async function verifyChain(top: string, options: VerifyOptions = {}): Promise<VerifyReport> {
  const report: VerifyReport = { ok: true, images: [], problems: [], notes: [] };
  const maxDepth = options.maxChainDepth ?? 64;
  let current: string | undefined = top;
  let format: string | undefined = 'qcow2';
  /** What the image above recorded about this one's manifest. */
  let expectedDigest: string | null | undefined;
  let referrer: string | undefined;
  const seen = new Set<string>();
  while (current !== undefined) {
    if (report.images.length >= maxDepth) {
      problem(report, current, `backing chain longer than ${maxDepth}`);
      break;
    }
    const file: string = current;
    if (!fs.existsSync(file)) {
      problem(
        report,
        referrer ?? file,
        referrer ? `chain link broken: backing file missing: ${file}` : `image not found: ${file}`,
      );
      break;
    }
    const real = fs.realpathSync(file);
    if (seen.has(real)) {
      problem(report, file, 'backing chain loops back to itself');
      break;
    }
    seen.add(real);
    if (format === 'raw' || (format === undefined && !(await hasQcow2Magic(file)))) {
      report.images.push({
        path: file,
        format: 'raw',
        manifestDigest: null,
        backupId: null,
        metadata: null,
        checkedClusters: 0,
      });
      report.notes.push(`${file}: raw base image, not covered by checksums`);
      break;
    }
    const next = await verifyImage(file, expectedDigest, referrer, report, options);
    current = next?.path;
    format = next?.format;
    expectedDigest = next?.digest;
    referrer = file;
  }
  report.ok = report.problems.length === 0;
  return report;
}

async function hasQcow2Magic(file: string): Promise<boolean> {
  const handle = await fs.promises.open(file, 'r');
  try {
    const buf = Buffer.alloc(4);
    await handle.read(buf, 0, 4, 0);
    return buf.readUInt32BE(0) === QCOW2_MAGIC;
  } finally {
    await handle.close();
  }
}

function problem(report: VerifyReport, image: string, message: string): void {
  report.problems.push({ image, message });
}

/** Verifies one qcow2 image; returns where the chain continues, if it does. */
async function verifyImage(
  file: string,
  expectedDigest: string | null | undefined,
  referrer: string | undefined,
  report: VerifyReport,
  options: VerifyOptions,
): Promise<{ path: string; format: string | undefined; digest: string | null } | undefined> {
  const entry: VerifiedImage = {
    path: file,
    format: 'qcow2',
    manifestDigest: null,
    backupId: null,
    metadata: null,
    checkedClusters: 0,
  };
  report.images.push(entry);
  const limit = options.maxProblems ?? 100;
  let count = 0;
  const fail = (message: string): void => {
    if (count++ < limit) problem(report, file, message);
  };

  let manifest: Manifest | undefined;
  try {
    manifest = await readManifest(manifestPathOf(file));
    if (manifest === undefined) fail(`manifest missing: ${manifestPathOf(file)}`);
  } catch (err) {
    fail(`manifest unreadable: ${err instanceof Error ? err.message : String(err)}`);
  }
  if (manifest !== undefined) {
    entry.manifestDigest = manifest.digest;
    entry.backupId = manifest.body.backupId;
    entry.metadata = manifest.body.metadata;
    if (expectedDigest !== undefined && expectedDigest !== null) {
      if (manifest.digest !== expectedDigest) {
        problem(
          report,
          referrer!,
          `chain link broken: ${file} is not the backup this image was written on top of ` +
            `(its manifest digest ${manifest.digest} differs from the recorded ${expectedDigest})`,
        );
      }
    }
  }
  if (expectedDigest === null && referrer !== undefined) {
    report.notes.push(`${referrer}: no manifest digest recorded for its backing file ${file}`);
  }

  let image: Qcow2Image;
  try {
    image = await Qcow2Image.open(file, { followBacking: false });
  } catch (err) {
    fail(`cannot open: ${err instanceof Error ? err.message : String(err)}`);
    // Without a readable header, the manifest is all that names the next link.
    if (manifest?.body.backing) {
      return {
        path: resolveBackingPath(file, manifest.body.backing.file),
        format: manifest.body.backing.format,
        digest: manifest.body.backing.manifestDigest,
      };
    }
    return undefined;
  }
  try {
    const h = image.header;
    if (manifest !== undefined) {
      const b = manifest.body;
      if (h.backupId !== b.backupId) {
        fail(`backup id ${h.backupId ?? '(none)'} in the image differs from the manifest's`);
      }
      if (h.size !== headerSize(b.virtualSize)) {
        fail(`virtual size ${h.size} differs from the manifest's ${b.virtualSize}`);
      }
      if (h.clusterSize !== b.clusterSize) fail(`cluster size differs from the manifest's`);
      const headerBacking = h.backingFile ?? null;
      if (headerBacking !== (b.backing?.file ?? null)) {
        fail(`backing file '${headerBacking}' differs from the manifest's '${b.backing?.file}'`);
      }
      if (b.backing && (h.backingFormat ?? 'qcow2') !== b.backing.format) {
        fail(`backing format '${h.backingFormat}' differs from the manifest's`);
      }
      if (h.clusterSize === b.clusterSize && h.size === headerSize(b.virtualSize)) {
        entry.checkedClusters = await checkClusters(image, manifest, fail);
      }
    }
    if (count > limit) problem(report, file, `... and ${count - limit} more problems`);
    if (h.backingFile === undefined) return undefined;
    return {
      path: resolveBackingPath(file, h.backingFile),
      format: h.backingFormat,
      digest: manifest?.body.backing?.manifestDigest ?? null,
    };
  } finally {
    await image.close();
  }
}

/** Walks the image's own map against the manifest's extents and checks every data cluster. */
async function checkClusters(
  image: Qcow2Image,
  manifest: Manifest,
  fail: (message: string) => void,
): Promise<number> {
  const cs = image.header.clusterSize;
  const size = manifest.body.virtualSize; // the exact size: checksums cover only these bytes
  const total = Math.ceil(size / cs);
  const sha = createHash('sha256');
  let crcIndex = 0;
  let checked = 0;
  let extent = 0;
  const kindAt = (cluster: number): ClusterKind => {
    while (
      extent < manifest.extentFirst.length &&
      manifest.extentFirst[extent]! + manifest.extentCount[extent]! <= cluster
    ) {
      extent++;
    }
    if (extent >= manifest.extentFirst.length || manifest.extentFirst[extent]! > cluster) {
      return 'unallocated';
    }
    return manifest.extentKind[extent] === ExtentKind.DATA ? 'data' : 'zero';
  };
  const maxRun = Math.max(1, READ_BYTES / cs);
  let buf = Buffer.alloc(0);
  let cluster = 0;
  while (cluster < total) {
    let run;
    try {
      run = await image.mapRun(cluster, maxRun);
    } catch (err) {
      fail(err instanceof Error ? err.message : String(err));
      // Skip to the next L2 table's range: this one is unreadable.
      const l2Entries = cs / 8;
      cluster = (Math.floor(cluster / l2Entries) + 1) * l2Entries;
      continue;
    }
    for (let i = 0; i < run.count; i++) {
      const expected = kindAt(cluster + i);
      if (expected === 'data' && run.kind !== 'data') crcIndex++;
      if (expected !== run.kind) {
        fail(
          `cluster ${cluster + i} (guest offset ${(cluster + i) * cs}) is ${run.kind} in the ` +
            `image but ${expected} in the manifest`,
        );
      }
    }
    if (run.kind === 'data') {
      const bytes = Math.min(run.count * cs, size - cluster * cs);
      if (buf.length < bytes) buf = Buffer.alloc(bytes);
      const data = buf.subarray(0, bytes);
      await image.readHost(data, run.hostOffset);
      for (let i = 0; i < run.count; i++) {
        if (kindAt(cluster + i) !== 'data') continue;
        const piece = data.subarray(i * cs, Math.min((i + 1) * cs, bytes));
        const want = manifest.crcs[crcIndex++];
        sha.update(piece);
        checked++;
        if (crc32(piece) !== want) {
          fail(
            `cluster ${cluster + i} (guest offset ${(cluster + i) * cs}, host offset ` +
              `${run.hostOffset + i * cs}): checksum mismatch, the data is damaged`,
          );
        }
      }
    }
    cluster += run.count;
  }
  if (checked === manifest.body.dataClusters && sha.digest('hex') !== manifest.body.dataSha256) {
    fail('SHA-256 of the stored data differs from the manifest');
  }
  return checked;
}
