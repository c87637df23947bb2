#!/usr/bin/env node
// Joins stdin/stdout to a unix socket: the command of a QEMU `guestfwd=...-cmd:` rule, which
// QEMU (libslirp) runs once per guest connection with the connection as stdin, stdout and
// stderr. Unlike the `-unix:PATH` form (one connection per rule, opened when QEMU starts), it
// lets the guest open as many connections as it likes, e.g. `nbd-client -C 2`.
// It must never write anything of its own: stderr is the guest's connection too.
//
// Usage: node unix-bridge.mjs SOCKET-PATH
import net from 'node:net';

const path = process.argv[2];
if (!path) process.exit(2);
const sock = net.connect(path);
const quit = (code) => () => process.exit(code);
sock.on('error', quit(1));
sock.on('close', quit(0));
process.stdin.on('error', quit(1));
process.stdout.on('error', quit(1));
sock.once('connect', () => {
  process.stdin.pipe(sock);
  sock.pipe(process.stdout);
});
