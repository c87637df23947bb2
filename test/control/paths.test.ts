/**
 * Where the control socket is looked for, and the directory checks for the default path.
 */
import assert from 'node:assert/strict';
import { chmodSync, mkdirSync, statSync, symlinkSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { describe, it } from 'node:test';
import {
  builtinControlPath,
  prepareSocketDir,
  resolveControlPath,
} from '../../src/control/socket-path.js';
import { tempDir } from '../helpers/server.js';

const uid = process.getuid!();

describe('control socket path', () => {
  it('--control wins, then $DEVFILTER_CONTROL, then the built-in default', () => {
    const env = { DEVFILTER_CONTROL: '/run/x/env.sock', XDG_RUNTIME_DIR: '/run/user/1000' };
    assert.equal(resolveControlPath('/tmp/a.sock', env), '/tmp/a.sock');
    assert.equal(resolveControlPath('rel.sock', env), resolve('rel.sock'));
    assert.equal(resolveControlPath(undefined, env), '/run/x/env.sock');
    assert.equal(
      resolveControlPath(undefined, { ...env, DEVFILTER_CONTROL: '' }),
      builtinControlPath(env),
    );
  });

  it('default: /run/devfilter as root, else $XDG_RUNTIME_DIR/devfilter, else /tmp/devfilter-UID', () => {
    if (uid === 0) {
      assert.equal(
        builtinControlPath({ XDG_RUNTIME_DIR: '/run/user/0' }),
        '/run/devfilter/control.sock',
      );
    } else {
      assert.equal(
        builtinControlPath({ XDG_RUNTIME_DIR: '/run/user/1000' }),
        '/run/user/1000/devfilter/control.sock',
      );
      assert.equal(builtinControlPath({}), join(tmpdir(), `devfilter-${uid}`, 'control.sock'));
    }
  });

  it('creates missing directories 0700; the strict check closes an open directory and refuses a non-directory', () => {
    const dir = tempDir();
    try {
      const sock = join(dir.path, 'a', 'b', 'control.sock');
      prepareSocketDir(sock, { strict: true });
      assert.equal(statSync(join(dir.path, 'a', 'b')).mode & 0o777, 0o700);
      const open = join(dir.path, 'open');
      mkdirSync(open);
      chmodSync(open, 0o777);
      prepareSocketDir(join(open, 'control.sock'), { strict: true });
      assert.equal(statSync(open).mode & 0o777, 0o700);
      // A symlink where the directory should be is refused (lstat: not a directory).
      symlinkSync(open, join(dir.path, 'link'));
      assert.throws(
        () => prepareSocketDir(join(dir.path, 'link', 'control.sock'), { strict: true }),
        /is not a directory/,
      );
      // Not strict (an explicit --control PATH): the user's directory is left as it is.
      const mine = join(dir.path, 'mine');
      mkdirSync(mine);
      chmodSync(mine, 0o755);
      prepareSocketDir(join(mine, 'c.sock'), { strict: false });
      assert.equal(statSync(mine).mode & 0o777, 0o755);
    } finally {
      dir.cleanup();
    }
  });
});
