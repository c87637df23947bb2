/** Errors the CLI turns into exit codes (kept free of heavy imports: every command loads it). */

/** Bad command-line input found by devfilter itself (exit code 2). */
export class UsageError extends Error {}

/** A bad config file, or a bad declaration at start (exit code 2). */
export class ConfigError extends Error {}

/** An error that has been reported already; main() only turns it into an exit code. */
export class ExitError extends Error {
  constructor(readonly exitCode: number) {
    super(`exit ${exitCode}`);
  }
}
