/**
 * The daemon's config file (YAML or JSON, which is YAML too): listeners and exports.
 * Every error names the file, the line and the field, so a typo is found at once.
 *
 *   socket: /run/devfilter/nbd.sock
 *   listen: 127.0.0.1:10809
 *   defaultExport: disk
 *   exports:
 *     disk: { file: /var/lib/disk.img, create: 10G }
 *     scratch: { memory: 1G, description: scratch space }
 */
import { readFile } from 'node:fs/promises';
import { LineCounter, parseDocument, isMap, type Document } from 'yaml';
import { parseSize } from '../core/size.js';
import { validateExportName, type ExportSpec } from './export-spec.js';

export interface DaemonConfig {
  socket?: string;
  listen: string[];
  defaultExport?: string;
  exports: ExportSpec[];
}

export class ConfigError extends Error {}

const TOP_KEYS = new Set(['socket', 'listen', 'defaultExport', 'exports']);
const EXPORT_KEYS = new Set(['file', 'memory', 'readOnly', 'direct', 'create', 'description']);

export async function loadConfig(path: string): Promise<DaemonConfig> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (err) {
    throw new ConfigError(`cannot read config file ${path}: ${(err as Error).message}`);
  }
  return parseConfig(text, path);
}

export function parseConfig(text: string, source: string): DaemonConfig {
  const lines = new LineCounter();
  const doc = parseDocument(text, { lineCounter: lines, prettyErrors: false });
  if (doc.errors.length > 0) {
    const e = doc.errors[0]!;
    const pos = lines.linePos(e.pos[0]);
    throw new ConfigError(`${source}:${pos.line}:${pos.col}: ${e.message.split('\n')[0]}`);
  }
  const fail = (path: (string | number)[], message: string): never => {
    throw new ConfigError(`${where(doc, lines, source, path)}: ${path.join('.') || '(top)'}: ${message}`);
  };
  const root: unknown = doc.toJS();
  if (!isObject(root)) fail([], 'expected a mapping with "exports"');
  const top = root as Record<string, unknown>;
  for (const key of Object.keys(top)) if (!TOP_KEYS.has(key)) fail([key], `unknown key (expected one of ${[...TOP_KEYS].join(', ')})`);

  const config: DaemonConfig = { listen: [], exports: [] };
  if (top.socket !== undefined) {
    if (typeof top.socket !== 'string' || top.socket === '') fail(['socket'], 'expected a path');
    config.socket = top.socket as string;
  }
  if (top.listen !== undefined) {
    const list = Array.isArray(top.listen) ? top.listen : [top.listen];
    list.forEach((l, i) => {
      if (typeof l !== 'string') fail(Array.isArray(top.listen) ? ['listen', i] : ['listen'], 'expected HOST:PORT');
      config.listen.push(l as string);
    });
  }
  if (!isObject(top.exports)) fail(['exports'], 'expected a mapping of export names to definitions');
  for (const [name, def] of Object.entries(top.exports as Record<string, unknown>)) {
    const at = (key?: string): (string | number)[] => (key === undefined ? ['exports', name] : ['exports', name, key]);
    try {
      validateExportName(name);
    } catch (err) {
      fail(at(), (err as Error).message);
    }
    if (!isObject(def)) fail(at(), 'expected a mapping with file: PATH or memory: SIZE');
    const d = def as Record<string, unknown>;
    for (const key of Object.keys(d)) if (!EXPORT_KEYS.has(key)) fail(at(key), `unknown key (expected one of ${[...EXPORT_KEYS].join(', ')})`);
    for (const key of ['readOnly', 'direct'] as const) {
      if (d[key] !== undefined && typeof d[key] !== 'boolean') fail(at(key), 'expected true or false');
    }
    if (d.description !== undefined && typeof d.description !== 'string') fail(at('description'), 'expected text');
    const size = (key: string): number => {
      const v = d[key];
      if (typeof v === 'number' && Number.isSafeInteger(v) && v >= 0) return v;
      if (typeof v === 'string') {
        try {
          return parseSize(v);
        } catch (err) {
          fail(at(key), (err as Error).message);
        }
      }
      return fail(at(key), 'expected a size such as 1G or 4096');
    };
    const spec: ExportSpec = { name, backend: { type: 'memory', size: 0 } };
    if (d.readOnly === true) spec.readOnly = true;
    if (typeof d.description === 'string') spec.description = d.description;
    if ((d.file === undefined) === (d.memory === undefined)) fail(at(), 'needs exactly one of file: PATH or memory: SIZE');
    if (d.file !== undefined) {
      if (typeof d.file !== 'string' || d.file === '') fail(at('file'), 'expected a path');
      spec.backend = {
        type: 'file',
        path: d.file as string,
        direct: d.direct === true,
        ...(d.create !== undefined ? { create: size('create') } : {}),
      };
    } else {
      if (d.direct !== undefined || d.create !== undefined) fail(at(), 'direct and create apply to file exports');
      spec.backend = { type: 'memory', size: size('memory') };
    }
    config.exports.push(spec);
  }
  if (top.defaultExport !== undefined) {
    if (typeof top.defaultExport !== 'string') fail(['defaultExport'], 'expected an export name');
    if (!config.exports.some((e) => e.name === top.defaultExport)) fail(['defaultExport'], `no export named ${JSON.stringify(top.defaultExport)}`);
    config.defaultExport = top.defaultExport as string;
  }
  return config;
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/** "file:LINE:COL" of the deepest node on `path` that exists in the document. */
function where(doc: Document, lines: LineCounter, source: string, path: (string | number)[]): string {
  for (let depth = path.length; depth >= 0; depth--) {
    const node = depth === 0 ? doc.contents : doc.getIn(path.slice(0, depth), true);
    const range = (node as { range?: [number, number, number] } | undefined)?.range;
    if (range) {
      // For a key that exists, point at its value's pair in the parent mapping.
      const pos = lines.linePos(range[0]);
      return `${source}:${pos.line}:${pos.col}`;
    }
    if (depth > 0 && isMap(doc.getIn(path.slice(0, depth - 1), true))) continue;
  }
  return source;
}
