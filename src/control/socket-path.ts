/**
 * Where the control socket lives, and creating unix sockets that only their owner can use.
 *
 * Default path (what `devfilter serve` listens on and every client command connects to):
 *   1. $DEVFILTER_CONTROL, if set;
 *   2. /run/devfilter/control.sock when running as root;
 *   3. $XDG_RUNTIME_DIR/devfilter/control.sock when XDG_RUNTIME_DIR is set;
 *   4. /tmp/devfilter-<uid>/control.sock otherwise.
 */
import { existsSync, lstatSync, unlinkSync, chmodSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { makeDirsSync } from '../core/make-dirs.js';

export const CONTROL_ENV = 'DEVFILTER_CONTROL';

/** The default control socket path, ignoring $DEVFILTER_CONTROL. */
export function builtinControlPath(env: NodeJS.ProcessEnv = process.env): string {
  const uid = process.getuid?.() ?? 0;
  if (uid === 0) return '/run/devfilter/control.sock';
  if (env.XDG_RUNTIME_DIR !== undefined && env.XDG_RUNTIME_DIR !== '') {
    return join(env.XDG_RUNTIME_DIR, 'devfilter', 'control.sock');
  }
  return join(tmpdir(), `devfilter-${uid}`, 'control.sock');
}

/** The control socket a command uses: `--control PATH`, else $DEVFILTER_CONTROL, else the default. */
export function resolveControlPath(
  explicit: string | undefined,
  env: NodeJS.ProcessEnv = process.env,
): string {
  if (explicit !== undefined && explicit !== '') return resolve(explicit);
  const fromEnv = env[CONTROL_ENV];
  if (fromEnv !== undefined && fromEnv !== '') return resolve(fromEnv);
  return builtinControlPath(env);
}

/**
 * Makes sure the directory of a socket exists. Directories it creates are 0700. For the
 * built-in default under a shared directory (/tmp/devfilter-<uid>), the directory must be a
 * real directory owned by us and closed to others, or someone else could own our socket.
 */
export function prepareSocketDir(path: string, opts: { strict: boolean }): void {
  const dir = dirname(path);
  makeDirsSync(dir, 0o700);
  if (!opts.strict) return;
  const st = lstatSync(dir);
  const uid = process.getuid?.();
  if (!st.isDirectory()) throw new Error(`${dir} is not a directory`);
  if (uid !== undefined && st.uid !== uid)
    throw new Error(`${dir} belongs to uid ${st.uid}, not to us (uid ${uid})`);
  if ((st.mode & 0o077) !== 0) {
    // Ours but open to others: close it (we created it with 0700, so someone changed it).
    chmodSync(dir, 0o700);
  }
}

/** A socket file left by a process that died is removed; one that still answers is an error. */
export async function clearStaleSocket(path: string): Promise<void> {
  if (!existsSync(path)) return;
  const alive = await new Promise<boolean>((done) => {
    const probe = net.connect(path);
    probe.once('connect', () => {
      probe.destroy();
      done(true);
    });
    probe.once('error', () => done(false));
  });
  if (alive) {
    const err = new Error(`socket ${path} is in use by another server`) as NodeJS.ErrnoException;
    err.code = 'EADDRINUSE';
    throw err;
  }
  unlinkSync(path);
}

export function removeSocketFile(path: string): void {
  try {
    unlinkSync(path);
  } catch {
    // already gone
  }
}

/**
 * Listens on a unix socket that only the owner can connect to (mode 0600). The umask is
 * narrowed while the socket is bound (binding happens synchronously inside listen()), so
 * there is no moment at which the file exists with looser permissions.
 */
export function listenOwnerOnly(server: net.Server, path: string): Promise<void> {
  return new Promise((done, fail) => {
    const onError = (err: Error): void => fail(err);
    server.once('error', onError);
    const old = process.umask(0o177);
    try {
      server.listen(path, () => {
        server.off('error', onError);
        try {
          chmodSync(path, 0o600);
        } catch (err) {
          fail(err as Error);
          return;
        }
        done();
      });
    } finally {
      process.umask(old);
    }
  });
}
