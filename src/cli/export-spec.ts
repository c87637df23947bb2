/**
 * Export definitions, from the command line (`NAME=file:PATH,readonly`) or a config file,
 * and opening their backends.
 */
import type { Logger } from 'pino';
import type { LinearSegment } from '../backends/linear.js';
import type { Device } from '../core/device.js';
import { parseSize } from '../core/size.js';
import { EXPORT_TLS_POLICIES, type ExportTlsPolicy } from '../nbd/tls-policy.js';

export type BackendSpec =
  | { type: 'file'; path: string; direct?: boolean; create?: number }
  | { type: 'memory'; size: number }
  | { type: 'nbd'; uri: string; connections?: number }
  /** Pieces of other devices back to back, as a dm linear table (devfilter interpose). */
  | { type: 'linear'; segments: LinearSegment[] };

export interface ExportSpec {
  name: string;
  backend: BackendSpec;
  readOnly?: boolean;
  description?: string;
  /** Whether clients must use TLS to open it; absent: the server's default. */
  tls?: ExportTlsPolicy;
  /** Filters to put on the export at start, top → bottom. */
  filters?: FilterSpec[];
}

/** A filter declared at start (config file or `--filter`). */
export interface FilterSpec {
  type: string;
  name?: string;
  args: Record<string, unknown>;
  /**
   * Where the declaration is, for error messages: "FILE:LINE:COL: exports.disk.filters.0.args.rate"
   * for a field path below the declaration (e.g. ['args', 'rate']).
   */
  locate?: (field: (string | number)[]) => string;
}

export const EXPORT_SPEC_HELP =
  'NAME=file:PATH, NAME=memory:SIZE or NAME=nbd:URI (an export of another NBD server), then ' +
  'comma-separated options: readonly, direct (file), create=SIZE (file: create a sparse file ' +
  'if missing), connections=N (nbd: 1-16, default 4), description=TEXT, tls=required|optional';

/** Parses `NAME=TYPE:ARG[,option...]`; throws an Error that says what is wrong. */
export function parseExportSpec(text: string): ExportSpec {
  const eq = text.indexOf('=');
  if (eq < 0)
    throw new Error(`invalid export ${JSON.stringify(text)}: expected ${EXPORT_SPEC_HELP}`);
  const name = text.slice(0, eq);
  const [backendText = '', ...options] = text.slice(eq + 1).split(',');
  const colon = backendText.indexOf(':');
  if (colon < 0) {
    throw new Error(
      `invalid export ${JSON.stringify(text)}: backend must be file:PATH, memory:SIZE or nbd:URI`,
    );
  }
  const type = backendText.slice(0, colon);
  const arg = backendText.slice(colon + 1);
  const spec: ExportSpec = { name, backend: { type: 'memory', size: 0 } };
  let direct = false;
  let create: number | undefined;
  let connections: number | undefined;
  for (const option of options) {
    const [key, value] = splitOption(option);
    if (key === 'readonly' || key === 'ro') spec.readOnly = true;
    else if (key === 'direct') direct = true;
    else if (key === 'create' && value !== undefined) create = parseSize(value);
    else if (key === 'connections' && value !== undefined) {
      connections = Number(value);
      if (!/^\d+$/.test(value) || connections < 1 || connections > 16)
        throw new Error(`invalid export ${JSON.stringify(text)}: connections must be 1 to 16`);
    } else if (key === 'description' && value !== undefined) spec.description = value;
    else if (key === 'tls' && value !== undefined) {
      if (!(EXPORT_TLS_POLICIES as readonly string[]).includes(value))
        throw new Error(
          `invalid export ${JSON.stringify(text)}: tls must be ${EXPORT_TLS_POLICIES.join(' or ')}`,
        );
      spec.tls = value as ExportTlsPolicy;
    } else
      throw new Error(
        `invalid export ${JSON.stringify(text)}: unknown option ${JSON.stringify(option)}`,
      );
  }
  if (connections !== undefined && type !== 'nbd')
    throw new Error(`invalid export ${JSON.stringify(text)}: connections applies to nbd exports`);
  if (type === 'nbd') {
    if (direct || create !== undefined)
      throw new Error(
        `invalid export ${JSON.stringify(text)}: direct and create apply to file exports`,
      );
    if (!/^nbds?(\+unix)?:\/\//.test(arg))
      throw new Error(
        `invalid export ${JSON.stringify(text)}: nbd needs a URI (nbd://HOST:PORT/NAME or nbd+unix:///NAME?socket=PATH)`,
      );
    spec.backend = { type: 'nbd', uri: arg, ...(connections !== undefined ? { connections } : {}) };
  } else if (type === 'file') {
    if (arg === '') throw new Error(`invalid export ${JSON.stringify(text)}: file needs a path`);
    spec.backend = { type: 'file', path: arg, direct, ...(create !== undefined ? { create } : {}) };
  } else if (type === 'memory') {
    if (direct || create !== undefined) {
      throw new Error(
        `invalid export ${JSON.stringify(text)}: direct and create apply to file exports`,
      );
    }
    spec.backend = { type: 'memory', size: parseSize(arg) };
  } else {
    throw new Error(
      `invalid export ${JSON.stringify(text)}: unknown backend type ${JSON.stringify(type)} (file, memory or nbd)`,
    );
  }
  validateExportName(name);
  return spec;
}

export function validateExportName(name: string): void {
  if (Buffer.byteLength(name, 'utf8') > 4096) throw new Error('export name longer than 4096 bytes');
  if (name.includes('\0')) throw new Error('export name contains a NUL character');
}

function splitOption(option: string): [string, string | undefined] {
  const eq = option.indexOf('=');
  return eq < 0 ? [option, undefined] : [option.slice(0, eq), option.slice(eq + 1)];
}

export async function openBackend(
  spec: BackendSpec,
  readOnly: boolean,
  logger?: Logger,
): Promise<Device> {
  // Loaded here, not at the top: client commands parse export specs' module but open nothing.
  if (spec.type === 'memory') {
    const { MemoryBackend } = await import('../backends/memory.js');
    return new MemoryBackend({ size: spec.size, readOnly });
  }
  if (spec.type === 'nbd') {
    const { NbdBackend } = await import('../backends/nbd.js');
    return NbdBackend.open(spec.uri, {
      readOnly,
      ...(spec.connections !== undefined ? { connections: spec.connections } : {}),
      ...(logger !== undefined ? { logger } : {}),
    });
  }
  if (spec.type === 'linear') {
    const { LinearBackend } = await import('../backends/linear.js');
    return LinearBackend.open(spec.segments, { readOnly });
  }
  const { FileBackend } = await import('../backends/file.js');
  return FileBackend.open(spec.path, {
    readOnly,
    direct: spec.direct === true,
    ...(spec.create !== undefined ? { create: { size: spec.create } } : {}),
  });
}
