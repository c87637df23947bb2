/**
 * Holds the origin's writes still for an instant: the point in time of a snapshot. Freezing
 * holds new writes (and trims and zeroing) at the filter and waits for those in flight to
 * finish, so every write acknowledged before the freeze is in the image and none after it;
 * reads go on. Thawing lets the held writes go, in the order they came.
 *
 * This is the stack's suspend/drain/resume (stack.ts) narrowed to writes and to one filter,
 * so that a snapshot needs no stack change and reads never pause. Operations that freeze
 * (take, delete) run one at a time through `exclusive`. A filter that must hold every kind of
 * request (the cdp filter's rollback) passes all of them through the gate.
 */
import { assert } from '../core/errors.js';

export class WriteGateTimeout extends Error {
  override name = 'WriteGateTimeout';
}

export class WriteGate {
  /** Writes past the gate and not yet finished. */
  private writers = 0;
  /** Set while frozen: held writes wait on it. */
  gate: Promise<void> | null = null;
  private openGate: (() => void) | null = null;
  private onDrained: (() => void) | null = null;
  private lock: Promise<unknown> = Promise.resolve();
  /** Bound as a property: passed to `finally` on every write without a closure. */
  readonly leave = (): void => {
    assert(this.writers > 0, 'write gate: more leaves than enters');
    this.writers--;
    if (this.writers === 0 && this.onDrained !== null) this.onDrained();
  };

  get inFlight(): number {
    return this.writers;
  }

  /** Counts a write in; only when not frozen (callers wait on `gate` first). */
  enter(): void {
    assert(this.gate === null, 'write entered a frozen gate');
    this.writers++;
  }

  /** Runs `fn` with no other freezing operation on this gate at the same time. */
  exclusive<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.lock.then(fn, fn);
    this.lock = run.catch(() => undefined);
    return run;
  }

  /**
   * Holds new writes and waits for those in flight; resolves with the thaw function. On
   * timeout, thaws and throws: nothing changed.
   */
  async freeze(timeoutMs: number): Promise<() => void> {
    assert(this.gate === null, 'write gate frozen twice');
    this.gate = new Promise((resolve) => (this.openGate = resolve));
    const thaw = (): void => {
      if (this.gate === null) return;
      const open = this.openGate!;
      this.gate = null;
      this.openGate = null;
      open();
    };
    if (this.writers > 0) {
      try {
        await new Promise<void>((resolve, reject) => {
          const timer = setTimeout(() => {
            this.onDrained = null;
            reject(
              new WriteGateTimeout(
                `${this.writers} write(s) still in flight after ${timeoutMs} ms`,
              ),
            );
          }, timeoutMs);
          this.onDrained = () => {
            clearTimeout(timer);
            this.onDrained = null;
            resolve();
          };
        });
      } catch (err) {
        thaw();
        throw err;
      }
    }
    return thaw;
  }
}
