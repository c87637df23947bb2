/**
 * Fixed log-scale latency buckets: upper bounds 16 µs, 32 µs, … 16.8 s (powers of two), then
 * an overflow bucket. Fixed bounds keep recording to a Math.log2 and an array increment, and
 * make histograms of different filters and exports comparable (and summable in Prometheus).
 */

/** Upper bound of the first bucket, in milliseconds. */
const FIRST_BOUND_MS = 0.016;
/** Finite buckets: 16 µs · 2^0 … 16 µs · 2^20 (≈ 16.8 s). */
export const FINITE_BUCKETS = 21;
/** Finite buckets plus the overflow (+Inf) bucket. */
export const BUCKETS = FINITE_BUCKETS + 1;

/** Upper bounds in milliseconds of the finite buckets. */
export const BUCKET_BOUNDS_MS: readonly number[] = Array.from(
  { length: FINITE_BUCKETS },
  (_, i) => FIRST_BOUND_MS * 2 ** i,
);

/** The bucket a latency falls in: the first whose upper bound is >= `ms`. */
export function bucketOf(ms: number): number {
  if (ms <= FIRST_BOUND_MS) return 0;
  const i = Math.ceil(Math.log2(ms / FIRST_BOUND_MS));
  return i < FINITE_BUCKETS ? i : FINITE_BUCKETS;
}

/**
 * Estimates a quantile (0..1) from the counts `hist[base .. base + BUCKETS)`, interpolating
 * linearly inside the bucket it falls in (as Prometheus' histogram_quantile does), and never
 * above the largest latency seen. Returns 0 for an empty histogram.
 */
export function quantileMs(
  hist: Float64Array,
  base: number,
  count: number,
  q: number,
  maxMs: number,
): number {
  if (count === 0) return 0;
  const target = q * count;
  let below = 0;
  for (let b = 0; b < BUCKETS; b++) {
    const n = hist[base + b]!;
    if (n > 0 && below + n >= target) {
      const lower = b === 0 ? 0 : BUCKET_BOUNDS_MS[b - 1]!;
      const upper = b < FINITE_BUCKETS ? BUCKET_BOUNDS_MS[b]! : maxMs;
      const estimate = lower + (upper - lower) * ((target - below) / n);
      return Math.min(estimate, maxMs);
    }
    below += n;
  }
  return maxMs;
}
