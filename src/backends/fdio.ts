/**
 * Positional I/O on a raw fd through the callback fs API. FileHandle would add a promise, an
 * object and a close-tracking layer per call; a backend that owns its fd and serialises its own
 * close needs none of that.
 */
import fs from 'node:fs';
import { DeviceError } from '../core/errors.js';

/** fs.read and fs.write refuse more than 2 GiB - 1 bytes in one call. */
const MAX_IO = 1 << 30;

function readOnce(fd: number, buf: Buffer, at: number, length: number, position: number) {
  return new Promise<number>((resolve, reject) => {
    fs.read(fd, buf, at, length, position, (err, n) => (err ? reject(err) : resolve(n)));
  });
}

function writeOnce(fd: number, data: Buffer, at: number, length: number, position: number) {
  return new Promise<number>((resolve, reject) => {
    fs.write(fd, data, at, length, position, (err, n) => (err ? reject(err) : resolve(n)));
  });
}

/** Fills `buf` from `position`, looping on short reads; bytes past end of file read as zeros. */
export async function preadFull(fd: number, buf: Buffer, position: number): Promise<void> {
  let done = 0;
  while (done < buf.length) {
    const n = await readOnce(fd, buf, done, Math.min(buf.length - done, MAX_IO), position + done);
    if (n === 0) {
      buf.fill(0, done);
      return;
    }
    done += n;
  }
}

/** Writes all of `data` at `position`, looping on short writes. */
export async function pwriteFull(fd: number, data: Buffer, position: number): Promise<void> {
  let done = 0;
  while (done < data.length) {
    const length = Math.min(data.length - done, MAX_IO);
    const n = await writeOnce(fd, data, done, length, position + done);
    // write(2) returning 0 for a non-empty buffer would loop forever; treat it as an I/O error.
    if (n === 0) throw new DeviceError('EIO', `write at ${position + done} made no progress`);
    done += n;
  }
}

function writevOnce(fd: number, bufs: Buffer[], position: number) {
  return new Promise<number>((resolve, reject) => {
    fs.writev(fd, bufs, position, (err, n) => (err ? reject(err) : resolve(n)));
  });
}

/** Most buffers one writev(2) takes (IOV_MAX on Linux). */
export const MAX_IOVECS = 1024;

/** Writes `bufs` back to back from `position` with as few writev(2) calls as it takes. */
export async function pwritevFull(
  fd: number,
  bufs: readonly Buffer[],
  position: number,
): Promise<void> {
  let i = 0;
  let skip = 0; // bytes of bufs[i] already written
  let at = position;
  while (i < bufs.length) {
    const batch: Buffer[] = [];
    for (let k = i; k < bufs.length && batch.length < MAX_IOVECS; k++)
      batch.push(k === i ? bufs[k]!.subarray(skip) : bufs[k]!);
    const total = batch.reduce((n, b) => n + b.length, 0);
    const n = total === 0 ? 0 : await writevOnce(fd, batch, at);
    if (n === 0 && total > 0) throw new DeviceError('EIO', `writev at ${at} made no progress`);
    at += n;
    // Advance over what was written, whole buffers first.
    let left = n + skip;
    while (i < bufs.length && left >= bufs[i]!.length) {
      left -= bufs[i]!.length;
      i++;
    }
    skip = left;
    if (total === 0) break;
  }
}

export function fdatasync(fd: number): Promise<void> {
  return new Promise((resolve, reject) => {
    fs.fdatasync(fd, (err) => (err ? reject(err) : resolve()));
  });
}

export function closeFd(fd: number): Promise<void> {
  return new Promise((resolve, reject) => {
    fs.close(fd, (err) => (err ? reject(err) : resolve()));
  });
}
