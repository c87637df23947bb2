/** Small helpers shared by the backend unit tests. */
import { ExtentState } from '../../src/core/device.js';

export const HOLE_ZERO = ExtentState.HOLE | ExtentState.ZERO;
export const DATA = 0;

/** Deterministic bytes that differ per seed and never form long runs of zeros. */
export function pattern(length: number, seed = 1): Buffer {
  const buf = Buffer.allocUnsafe(length);
  for (let i = 0; i < length; i++) buf[i] = ((i * 31 + seed * 17) % 251) + 1;
  return buf;
}

/** A buffer full of 0xee, so a read that fails to fill it cannot pass for zeros. */
export function dirty(length: number): Buffer {
  return Buffer.alloc(length, 0xee);
}

export function isZero(buf: Buffer): boolean {
  for (let i = 0; i < buf.length; i++) if (buf[i] !== 0) return false;
  return true;
}

/** assert.rejects matcher for a DeviceError with a given errno. */
export function deviceError(errno: string): { name: string; errno: string } {
  return { name: 'DeviceError', errno };
}
