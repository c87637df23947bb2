/**
 * Memory alignment for O_DIRECT, which wants the buffer address (not just offset and length)
 * aligned to the logical block size. Node gives no control over where a Buffer lives, but
 * ArrayBuffer memory never moves, so koffi.address() of it stays valid: over-allocate and slice.
 */
import koffi from 'koffi';

export function isAligned(buf: Buffer, alignment: number): boolean {
  return buf.length === 0 || koffi.address(buf) % BigInt(alignment) === 0n;
}

/** A `size`-byte Buffer whose address is a multiple of `alignment` (a power of two). */
export function allocAligned(size: number, alignment: number): Buffer {
  // allocUnsafeSlow: its own ArrayBuffer, never a slice of Node's shared pool.
  const raw = Buffer.allocUnsafeSlow(size + alignment);
  const misalignment = Number(koffi.address(raw) % BigInt(alignment));
  const skip = misalignment === 0 ? 0 : alignment - misalignment;
  return raw.subarray(skip, skip + size);
}
