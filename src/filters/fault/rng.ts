/**
 * A small seeded PRNG (mulberry32): 32-bit state, period 2^32, good enough statistics for
 * fault injection, and the same sequence for the same seed on every platform and Node
 * version — which is the point: a failing run can be replayed with its seed.
 */
export function mulberry32(seed: number): () => number {
  let state = seed >>> 0;
  return () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
