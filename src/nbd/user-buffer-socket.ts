/**
 * Moves a connected socket onto a new net.Socket that reads into buffers its owner provides
 * (Node's `onread` option), so that received bytes land where they are needed: request
 * headers in one reusable buffer per connection, large write payloads straight in their
 * final buffer. Without it Node allocates a fresh 64 KiB buffer for every read of a socket,
 * and a stream of 1 MiB writes becomes a stream of short-lived ArrayBuffers for the garbage
 * collector, plus a copy to gather each payload.
 *
 * Node offers `onread` only when it constructs the socket, and a server constructs accepted
 * sockets itself; so once negotiation is over the connection's handle is handed to a socket
 * constructed with it. That uses the handle behind `socket._handle`, which Node keeps
 * undocumented: where anything is not as expected (a TLS socket, writes still queued, no
 * handle) nothing is moved and the caller keeps reading the original socket's events.
 */
import net from 'node:net';

export interface UserBufferSink {
  /** Where the next bytes read from the socket go; called after every read. */
  nextBuffer(): Uint8Array;
  /** `n` bytes arrived at the start of `buf`, the buffer nextBuffer() last returned. */
  received(n: number, buf: Uint8Array): void;
}

interface StreamHandle {
  readStop(): number;
  reading: boolean;
  writeQueueSize: number;
  useUserBuffer(buf: Uint8Array): void;
}

interface SocketInternals {
  _handle: StreamHandle | null;
  _server: net.Server | null;
  server: net.Server | null;
}

/**
 * Returns the new socket and the bytes the old one had read but not yet delivered, or
 * undefined (and nothing changed) when the socket cannot be moved.
 */
export function moveToUserBuffers(
  socket: net.Socket,
  sink: UserBufferSink,
): { socket: net.Socket; leftover: Buffer[] } | undefined {
  if (socket.constructor !== net.Socket || socket.destroyed || socket.connecting) return undefined;
  const old = socket as unknown as SocketInternals;
  const handle = old._handle;
  if (
    handle === null ||
    typeof handle.useUserBuffer !== 'function' ||
    typeof handle.readStop !== 'function' ||
    // A write still in the kernel's hands would complete on the new socket's handle owner.
    handle.writeQueueSize !== 0 ||
    socket.writableLength !== 0 ||
    socket.readableEnded
  ) {
    return undefined;
  }
  socket.pause();
  handle.reading = false;
  handle.readStop();
  const leftover: Buffer[] = [];
  while (socket.readableLength > 0) {
    const chunk = socket.read() as Buffer | null;
    if (chunk === null) break;
    leftover.push(chunk);
  }
  handle.readStop(); // read() may have restarted it
  handle.reading = false;
  // The old socket lets go of the handle: destroying it later must not close the connection,
  // and the server counts the connection on the new socket.
  const server = old._server;
  old._handle = null;
  old._server = null;
  old.server = null;
  const moved = new net.Socket({
    handle: handle as never,
    allowHalfOpen: socket.allowHalfOpen,
    readable: true,
    writable: true,
    pauseOnCreate: true,
    onread: {
      buffer: () => sink.nextBuffer(),
      callback: (n: number, buf: Uint8Array) => {
        sink.received(n, buf);
        return true; // pausing is the owner's, through socket.pause()
      },
    },
  } as net.SocketConstructorOpts);
  // Whoever listened for errors on the old socket (a reset peer is no crash) hears the new one.
  for (const listener of socket.listeners('error')) {
    moved.on('error', listener as (err: Error) => void);
  }
  const internals = moved as unknown as SocketInternals;
  internals._server = server;
  internals.server = server;
  return { socket: moved, leftover };
}
