/**
 * A token bucket that may go into debt: a request is admitted while the bucket holds any
 * tokens at all, and is then charged its full cost. So a request larger than the bucket is
 * never stuck, the long-run rate is exactly `rate` whatever the request sizes, and a burst is
 * at most `capacity` plus one request.
 */
export class TokenBucket {
  tokens: number;
  private last: number;

  constructor(
    /** Tokens per second, > 0. */
    public rate: number,
    /** Most tokens the bucket holds (the burst), > 0. */
    public capacity: number,
    now: number,
  ) {
    this.tokens = capacity;
    this.last = now;
  }

  /** Adds the tokens earned since the last refill; `now` is performance.now() milliseconds. */
  refill(now: number): void {
    if (now <= this.last) return;
    const t = this.tokens + ((now - this.last) * this.rate) / 1000;
    this.tokens = t < this.capacity ? t : this.capacity;
    this.last = now;
  }

  /** Milliseconds until the bucket holds tokens again (0 if it does). */
  waitMs(): number {
    return this.tokens > 0 ? 0 : (-this.tokens * 1000) / this.rate;
  }

  /** Changes the rate and size, keeping the tokens it holds (up to the new size). */
  reconfigure(rate: number, capacity: number, now: number): void {
    this.refill(now);
    this.rate = rate;
    this.capacity = capacity;
    if (this.tokens > capacity) this.tokens = capacity;
  }
}
