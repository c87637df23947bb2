#!/usr/bin/env node
// Lets the test guest run one `devfilter` control command on the host, e.g. take a snapshot at
// a moment the guest chooses (while its own writes are in flight). It is the command of a QEMU
// `guestfwd=tcp:10.0.2.100:10900-cmd:node host-hook.mjs CLI CONTROL-SOCKET` rule: QEMU runs it
// for every guest connection, with the connection as stdin, stdout and stderr. The guest sends
// one line of arguments (split at spaces), e.g.
//
//   filter control disk snapshot take name=s1
//
// and gets back the command's output, then a last line `HOOK rc=<exit code>`; then the
// connection closes. Only `filter`, `status` and `export` commands are run, always with
// `--control CONTROL-SOCKET`.
//
// Usage: node host-hook.mjs DEVFILTER-CLI CONTROL-SOCKET
import { spawn } from 'node:child_process';

const [cli, control] = process.argv.slice(2);
let input = '';
let started = false;

function finish(text) {
  process.stdout.write(text, () => process.exit(0));
}

function runLine(line) {
  if (started) return;
  started = true;
  const args = line.trim().split(/\s+/).filter(Boolean);
  if (!['filter', 'status', 'export'].includes(args[0] ?? '')) {
    finish(`not allowed: ${line.trim()}\nHOOK rc=126\n`);
    return;
  }
  const child = spawn(process.execPath, [cli, ...args, '--control', control], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  child.stdout.on('data', (d) => (out += d));
  child.stderr.on('data', (d) => (out += d));
  child.on('error', (err) => finish(`${out}${err.message}\nHOOK rc=127\n`));
  child.on('close', (code) =>
    finish(`${out}${out.endsWith('\n') || out === '' ? '' : '\n'}HOOK rc=${code ?? 128}\n`),
  );
}

process.stdin.setEncoding('utf8');
process.stdin.on('data', (d) => {
  input += d;
  const nl = input.indexOf('\n');
  if (nl >= 0) runLine(input.slice(0, nl));
});
process.stdin.on('end', () => runLine(input));
process.stdin.on('error', () => process.exit(1));
