/** Shared by the backup tests: a seeded random model of an image's content, and qemu-img. */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import {
  createQcow2Writer,
  type Qcow2WriterOptions,
  type Qcow2WriteResult,
} from '../../src/backup/index.js';
import type { Device } from '../../src/core/device.js';
import { describeResult, run, runOk } from '../helpers/run.js';

export const KIB = 1024;
export const MIB = 1024 * KIB;

/** mulberry32: small, seeded, good enough to pick test cases reproducibly. */
export function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export function randomBytes(next: () => number, length: number): Buffer {
  const buf = Buffer.allocUnsafe(length);
  for (let i = 0; i < length; i += 4) {
    const v = (next() * 4294967296) >>> 0;
    for (let k = 0; k < 4 && i + k < length; k++) buf[i + k] = (v >>> (8 * k)) & 0xff;
  }
  // Never all zeros by accident: the writer would store it as a zero cluster.
  buf[0] = buf[0]! | 1;
  return buf;
}

export type Op =
  { kind: 'data'; offset: number; data: Buffer } | { kind: 'zero'; offset: number; length: number };

export interface PlanCounts {
  data: number;
  zeroData: number;
  zero: number;
  hole: number;
}

/**
 * A random plan over the whole image in runs of 1..6 clusters: holes (left alone), data,
 * all-zero data (the writer's zero detection), and zero ranges. Applied to `model` as it goes.
 */
export function randomPlan(
  next: () => number,
  model: Buffer,
  clusterSize: number,
): { ops: Op[]; counts: PlanCounts } {
  const ops: Op[] = [];
  const counts: PlanCounts = { data: 0, zeroData: 0, zero: 0, hole: 0 };
  const size = model.length;
  let offset = 0;
  while (offset < size) {
    const clusters = 1 + Math.floor(next() * 6);
    const end = Math.min(size, offset + clusters * clusterSize);
    const length = end - offset;
    const pick = next();
    if (pick < 0.35) {
      counts.hole++;
    } else if (pick < 0.75) {
      const data = randomBytes(next, length);
      ops.push({ kind: 'data', offset, data });
      data.copy(model, offset);
      counts.data++;
    } else if (pick < 0.85) {
      ops.push({ kind: 'data', offset, data: Buffer.alloc(length) });
      model.fill(0, offset, end);
      counts.zeroData++;
    } else {
      ops.push({ kind: 'zero', offset, length });
      model.fill(0, offset, end);
      counts.zero++;
    }
    offset = end;
  }
  return { ops, counts };
}

/** Writes a backup image from a plan. */
export async function writeImage(
  dest: string,
  options: Qcow2WriterOptions,
  ops: Op[],
): Promise<Qcow2WriteResult> {
  const writer = await createQcow2Writer(dest, options);
  try {
    for (const op of ops) {
      if (op.kind === 'data') await writer.writeData(op.offset, op.data);
      else await writer.writeZeroes(op.offset, op.length);
    }
    return await writer.finish();
  } catch (err) {
    await writer.abort();
    throw err;
  }
}

export async function qemuImg(args: string[]): Promise<string> {
  return (await runOk('qemu-img', args, { timeoutMs: 60_000 })).stdout;
}

/** `qemu-img compare` of an image with a raw file: asserts they are identical. */
export async function assertIdentical(image: string, raw: string, format = 'qcow2'): Promise<void> {
  const args = ['compare', '-f', format, '-F', 'raw', image, raw];
  const r = await run('qemu-img', args, { timeoutMs: 60_000 });
  assert.equal(r.code, 0, describeResult('qemu-img', args, r));
}

export async function assertCheckPasses(image: string): Promise<void> {
  const args = ['check', '-f', 'qcow2', image];
  const r = await run('qemu-img', args, { timeoutMs: 60_000 });
  assert.equal(r.code, 0, describeResult('qemu-img', args, r));
  assert.match(r.stdout, /No errors were found on the image/);
}

/** Reads a whole device, in pieces of `piece` bytes. */
export async function readAll(dev: Device, piece = 3 * MIB + 4097): Promise<Buffer> {
  const size = dev.info().size;
  const out = Buffer.alloc(size, 0xee);
  for (let at = 0; at < size; at += piece) {
    await dev.read(out.subarray(at, Math.min(size, at + piece)), at, 0);
  }
  return out;
}

export function writeRaw(path: string, content: Buffer): void {
  fs.writeFileSync(path, content);
}

/** The content as QEMU sees it: the size rounded up to whole 512-byte sectors. */
export function padTo512(content: Buffer): Buffer {
  const size = Math.ceil(content.length / 512) * 512;
  if (size === content.length) return content;
  const out = Buffer.alloc(size);
  content.copy(out);
  return out;
}

/**
 * The plan of the first seed from `seed` on that has every kind of range, applied to a copy
 * of `base`: deterministic, and never a vacuous test.
 */
export function planWithEveryKind(
  seed: number,
  base: Buffer,
  clusterSize: number,
): { ops: Op[]; model: Buffer } {
  for (let s = seed; s < seed + 1000; s++) {
    const model = Buffer.from(base);
    const { ops, counts } = randomPlan(rng(s), model, clusterSize);
    if (counts.data > 0 && counts.hole > 0 && counts.zero > 0 && counts.zeroData > 0) {
      return { ops, model };
    }
  }
  throw new Error('no plan with every kind of range: the image is too small');
}
