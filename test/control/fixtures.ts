/**
 * An in-process control server over a DeviceManager with memory exports and small test filter
 * types, on a socket in a fresh temporary directory; and a raw line-oriented socket client for
 * conformance tests.
 */
import net from 'node:net';
import { join } from 'node:path';
import { pino } from 'pino';
import { MemoryBackend } from '../../src/backends/memory.js';
import { FilterCommandError, type FilterType } from '../../src/core/filter.js';
import { FilterTypeRegistry } from '../../src/core/filter-types.js';
import { DeviceManager } from '../../src/core/manager.js';
import { ControlServer, type ControlServerOptions } from '../../src/control/server.js';
import { tempDir } from '../helpers/server.js';

/** Passes everything through; `ping` answers, `fail` fails, `emit` publishes N events. */
export const passType: FilterType = {
  name: 'pass',
  apiVersion: 1,
  description: 'test: passes every request through',
  argsSchema: {
    type: 'object',
    properties: {
      level: { type: 'integer', minimum: 0, maximum: 9, default: 1, description: 'a number' },
      label: { type: 'string', description: 'a string' },
    },
    additionalProperties: false,
  },
  removalPolicies: ['keep', 'discard'],
  create(args, env) {
    return {
      status: () => ({ level: args.level, label: args.label ?? null }),
      control(command, cargs) {
        if (command === 'ping') return { pong: cargs };
        if (command === 'fail') throw new Error('it broke');
        if (command === 'emit') {
          const n = Number(cargs.count ?? 1);
          const pad = 'x'.repeat(Number(cargs.bytes ?? 0));
          for (let i = 0; i < n; i++) env.emit('test.tick', { i, pad });
          return { emitted: n };
        }
        throw new FilterCommandError(`no command "${command}"`);
      },
    };
  },
};

/** Setup always fails. */
export const brokenType: FilterType = {
  name: 'broken',
  apiVersion: 1,
  description: 'test: setup fails',
  argsSchema: { type: 'object', properties: {} },
  create() {
    throw new Error('cannot set up');
  },
};

/** Holds reads while `hold` is on (control hold/release), so that a stack change cannot drain. */
export function gateType(): FilterType & { release(): void } {
  let gate: { promise: Promise<void>; open(): void } | undefined;
  const release = (): void => {
    gate?.open();
    gate = undefined;
  };
  return {
    name: 'gate',
    apiVersion: 1,
    description: 'test: holds reads on command',
    argsSchema: { type: 'object', properties: {} },
    release,
    create() {
      return {
        async read(next, buf, offset, flags, ctx) {
          if (gate) await gate.promise;
          return next.read(buf, offset, flags, ctx);
        },
        control(command) {
          if (command === 'hold') {
            let open!: () => void;
            const promise = new Promise<void>((r) => (open = r));
            gate = { promise, open };
          } else if (command === 'release') release();
          return null;
        },
      };
    },
  };
}

export interface ControlFixture {
  server: ControlServer;
  manager: DeviceManager;
  path: string;
  dir: string;
  close(): Promise<void>;
}

export async function startControl(
  opts: Partial<ControlServerOptions> & { extraTypes?: FilterType[] } = {},
): Promise<ControlFixture> {
  const dir = tempDir('devfilter-control-');
  const logger = pino({ level: process.env.DEVFILTER_TEST_LOG ?? 'silent' });
  const types = new FilterTypeRegistry();
  for (const t of [passType, brokenType, ...(opts.extraTypes ?? [])]) types.register(t);
  const manager = new DeviceManager(types, logger);
  manager.addExport('disk', new MemoryBackend({ size: 16 * 1024 * 1024 }), {
    backendLabel: 'memory:16M',
    description: 'test disk',
  });
  manager.addExport('other', new MemoryBackend({ size: 1024 * 1024 }), {
    backendLabel: 'memory:1M',
  });
  const server = new ControlServer(
    {
      manager,
      version: '9.9.9',
      startedAt: Date.now(),
      nbdConnections: () => 0,
      loadModule: async (spec, cwd) => (await types.load(spec, cwd)).map((t) => t.name),
    },
    { logger, ...opts },
  );
  const path = join(dir.path, 'control.sock');
  await server.listen(path);
  return {
    server,
    manager,
    path,
    dir: dir.path,
    close: async () => {
      await server.close();
      await manager.close();
      dir.cleanup();
    },
  };
}

/** A raw connection that reads newline-delimited JSON. */
export class RawConn {
  readonly socket: net.Socket;
  private buf = '';
  private readonly waiting: Array<() => void> = [];
  closed = false;
  readonly lines: string[] = [];

  private constructor(socket: net.Socket) {
    this.socket = socket;
    socket.setEncoding('utf8');
    socket.on('data', (d: string) => {
      this.buf += d;
      let nl;
      while ((nl = this.buf.indexOf('\n')) >= 0) {
        this.lines.push(this.buf.slice(0, nl));
        this.buf = this.buf.slice(nl + 1);
      }
      this.wake();
    });
    socket.on('error', () => {});
    socket.on('close', () => {
      this.closed = true;
      this.wake();
    });
  }

  static connect(path: string): Promise<RawConn> {
    return new Promise((resolve, reject) => {
      const s = net.connect(path);
      s.once('connect', () => resolve(new RawConn(s)));
      s.once('error', reject);
    });
  }

  private wake(): void {
    for (const w of this.waiting.splice(0)) w();
  }

  write(data: string | Buffer): void {
    this.socket.write(data);
  }

  /** The next line parsed as JSON; rejects on timeout or close. */
  async next(timeoutMs = 5000): Promise<Record<string, unknown> | Record<string, unknown>[]> {
    const deadline = Date.now() + timeoutMs;
    while (this.lines.length === 0) {
      if (this.closed) throw new Error('connection closed');
      if (Date.now() > deadline) throw new Error('timed out waiting for a line');
      await new Promise<void>((r) => {
        const t = setTimeout(r, Math.max(1, deadline - Date.now()));
        this.waiting.push(() => {
          clearTimeout(t);
          r();
        });
      });
    }
    return JSON.parse(this.lines.shift()!) as Record<string, unknown>;
  }

  /** Sends a request line and returns the next response line. */
  async request(obj: unknown): Promise<Record<string, unknown>> {
    this.write(JSON.stringify(obj) + '\n');
    return (await this.next()) as Record<string, unknown>;
  }

  /** Resolves once the server has closed the connection. */
  async waitClosed(timeoutMs = 5000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (!this.closed) {
      if (Date.now() > deadline) throw new Error('connection still open');
      await new Promise((r) => setTimeout(r, 10));
    }
  }

  close(): void {
    this.socket.destroy();
  }
}

/** The error object of a response, checked to have the JSON-RPC shape. */
export function errorOf(r: Record<string, unknown>): {
  code: number;
  message: string;
  data: { code: string };
} {
  if (!('error' in r)) throw new Error(`expected an error response, got ${JSON.stringify(r)}`);
  return r.error as { code: number; message: string; data: { code: string } };
}
