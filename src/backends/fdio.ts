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
