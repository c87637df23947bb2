/**
 * The daemon's config file (YAML or JSON, which is YAML too): listeners, the control socket,
 * filter modules, and exports with their filter stacks. Every error names the file, the line
 * and the field, so a typo is found at once.
 *
 *   socket: /run/devfilter/nbd.sock
 *   listen: 127.0.0.1:10809
 *   control: /run/devfilter/control.sock     # or false
 *   filterModules: [./my-filter.js]          # relative to this file
 *   defaultExport: disk
 *   exports:
 *     disk:
 *       file: /var/lib/disk.img
 *       create: 10G
 *       filters:                             # top → bottom
 *         - type: stats
 *         - { type: throttle, name: slow, args: { readIops: 100 } }
 *     scratch: { memory: 1G, description: scratch space }
 */
import { readFile } from 'node:fs/promises';
import { dirname, isAbsolute, resolve } from 'node:path';
import { Ajv, type ValidateFunction } from 'ajv';
import { LineCounter, parseDocument, isMap, type Document } from 'yaml';
import type { FilterTypeRegistry } from '../core/filter-types.js';
import { parseSize } from '../core/size.js';
import { ConfigError } from './errors.js';
import { validateExportName, type ExportSpec, type FilterSpec } from './export-spec.js';
import { EXPORT_TLS_POLICIES, type ExportTlsPolicy } from '../nbd/tls-policy.js';
import { tlsSettingsFromConfig, type PartialTlsSettings } from './tls-options.js';

export interface DaemonConfig {
  socket?: string;
  listen: string[];
  defaultExport?: string;
  exports: ExportSpec[];
  /** The control socket path, or false for none. */
  control?: string | false;
  /** Filter modules (paths resolved against the config file's directory, or package names). */
  filterModules: string[];
  /** TLS settings (paths resolved against the config file's directory). */
  tls?: PartialTlsSettings;
}

export { ConfigError };

const TOP_KEYS = new Set([
  'socket',
  'listen',
  'control',
  'filterModules',
  'defaultExport',
  'exports',
  'tls',
]);
const EXPORT_KEYS = new Set([
  'file',
  'memory',
  'nbd',
  'connections',
  'readOnly',
  'direct',
  'create',
  'description',
  'filters',
  'tls',
]);
const FILTER_KEYS = new Set(['type', 'name', 'args']);
/** Filter names, as the manager accepts them. */
const FILTER_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;

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
    throw new ConfigError(
      `${where(doc, lines, source, path)}: ${path.join('.') || '(top)'}: ${message}`,
    );
  };
  const root: unknown = doc.toJS();
  if (!isObject(root)) fail([], 'expected a mapping with "exports"');
  const top = root as Record<string, unknown>;
  for (const key of Object.keys(top))
    if (!TOP_KEYS.has(key))
      fail([key], `unknown key (expected one of ${[...TOP_KEYS].join(', ')})`);

  const config: DaemonConfig = { listen: [], exports: [], filterModules: [] };
  if (top.socket !== undefined) {
    if (typeof top.socket !== 'string' || top.socket === '') fail(['socket'], 'expected a path');
    config.socket = top.socket as string;
  }
  if (top.control !== undefined) {
    if (top.control !== false && (typeof top.control !== 'string' || top.control === '')) {
      fail(['control'], 'expected a socket path, or false for no control socket');
    }
    config.control = top.control as string | false;
  }
  if (top.filterModules !== undefined) {
    const list = Array.isArray(top.filterModules) ? top.filterModules : [top.filterModules];
    list.forEach((m, i) => {
      const at = Array.isArray(top.filterModules) ? ['filterModules', i] : ['filterModules'];
      if (typeof m !== 'string' || m === '') fail(at, 'expected a module path or package name');
      const spec = m as string;
      // A path is relative to the config file, wherever the daemon was started.
      const isPath = spec.startsWith('.') || isAbsolute(spec);
      config.filterModules.push(isPath ? resolve(dirname(resolve(source)), spec) : spec);
    });
  }
  if (top.tls !== undefined) {
    const tls = tlsSettingsFromConfig(top.tls, dirname(resolve(source)));
    if (Array.isArray(tls)) fail(['tls', ...tls[0]], tls[1]);
    else config.tls = tls;
  }
  if (top.listen !== undefined) {
    const list = Array.isArray(top.listen) ? top.listen : [top.listen];
    list.forEach((l, i) => {
      if (typeof l !== 'string')
        fail(Array.isArray(top.listen) ? ['listen', i] : ['listen'], 'expected HOST:PORT');
      config.listen.push(l as string);
    });
  }
  if (!isObject(top.exports))
    fail(['exports'], 'expected a mapping of export names to definitions');
  for (const [name, def] of Object.entries(top.exports as Record<string, unknown>)) {
    const at = (key?: string): (string | number)[] =>
      key === undefined ? ['exports', name] : ['exports', name, key];
    try {
      validateExportName(name);
    } catch (err) {
      fail(at(), (err as Error).message);
    }
    if (!isObject(def)) fail(at(), 'expected a mapping with file: PATH, memory: SIZE or nbd: URI');
    const d = def as Record<string, unknown>;
    for (const key of Object.keys(d))
      if (!EXPORT_KEYS.has(key))
        fail(at(key), `unknown key (expected one of ${[...EXPORT_KEYS].join(', ')})`);
    for (const key of ['readOnly', 'direct'] as const) {
      if (d[key] !== undefined && typeof d[key] !== 'boolean')
        fail(at(key), 'expected true or false');
    }
    if (d.description !== undefined && typeof d.description !== 'string')
      fail(at('description'), 'expected text');
    if (
      d.tls !== undefined &&
      (typeof d.tls !== 'string' || !(EXPORT_TLS_POLICIES as readonly string[]).includes(d.tls))
    )
      fail(at('tls'), `expected ${EXPORT_TLS_POLICIES.join(' or ')}`);
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
    if (d.tls !== undefined) spec.tls = d.tls as ExportTlsPolicy;
    if ([d.file, d.memory, d.nbd].filter((x) => x !== undefined).length !== 1)
      fail(at(), 'needs exactly one of file: PATH, memory: SIZE or nbd: URI');
    if (d.connections !== undefined && d.nbd === undefined)
      fail(at('connections'), 'connections applies to nbd exports');
    if (d.nbd !== undefined) {
      if (typeof d.nbd !== 'string' || !/^nbds?(\+unix)?:\/\//.test(d.nbd))
        fail(
          at('nbd'),
          'expected an NBD URI (nbd://HOST:PORT/NAME or nbd+unix:///NAME?socket=PATH)',
        );
      if (d.direct !== undefined || d.create !== undefined)
        fail(at(), 'direct and create apply to file exports');
      const c = d.connections;
      if (c !== undefined && (typeof c !== 'number' || !Number.isInteger(c) || c < 1 || c > 16))
        fail(at('connections'), 'expected 1 to 16');
      spec.backend = {
        type: 'nbd',
        uri: d.nbd as string,
        ...(c !== undefined ? { connections: c as number } : {}),
      };
    } else if (d.file !== undefined) {
      if (typeof d.file !== 'string' || d.file === '') fail(at('file'), 'expected a path');
      spec.backend = {
        type: 'file',
        path: d.file as string,
        direct: d.direct === true,
        ...(d.create !== undefined ? { create: size('create') } : {}),
      };
    } else {
      if (d.direct !== undefined || d.create !== undefined)
        fail(at(), 'direct and create apply to file exports');
      spec.backend = { type: 'memory', size: size('memory') };
    }
    if (d.filters !== undefined) {
      if (!Array.isArray(d.filters))
        fail(at('filters'), 'expected a list of filters (top → bottom)');
      spec.filters = (d.filters as unknown[]).map((f, i) => {
        const fat = (...rest: (string | number)[]): (string | number)[] => [
          'exports',
          name,
          'filters',
          i,
          ...rest,
        ];
        const locate = (field: (string | number)[]): string => {
          const path = [...fat(), ...field];
          return `${where(doc, lines, source, path)}: ${path.join('.')}`;
        };
        if (typeof f === 'string') return { type: f, args: {}, locate };
        if (!isObject(f))
          fail(fat(), 'expected a filter: a type name, or a mapping with type, name and args');
        const fd = f as Record<string, unknown>;
        for (const key of Object.keys(fd))
          if (!FILTER_KEYS.has(key))
            fail(fat(key), `unknown key (expected one of ${[...FILTER_KEYS].join(', ')})`);
        if (typeof fd.type !== 'string' || fd.type === '')
          fail(fat('type'), 'expected a filter type name');
        if (fd.name !== undefined && (typeof fd.name !== 'string' || !FILTER_NAME.test(fd.name))) {
          fail(fat('name'), "expected a filter name: 1-64 letters, digits, '.', '_' or '-'");
        }
        if (fd.args !== undefined && fd.args !== null && !isObject(fd.args))
          fail(fat('args'), 'expected a mapping of arguments');
        const filter: FilterSpec = {
          type: fd.type as string,
          args: (fd.args as Record<string, unknown> | undefined) ?? {},
          locate,
        };
        if (fd.name !== undefined) filter.name = fd.name as string;
        return filter;
      });
    }
    config.exports.push(spec);
  }
  if (top.defaultExport !== undefined) {
    if (typeof top.defaultExport !== 'string') fail(['defaultExport'], 'expected an export name');
    if (!config.exports.some((e) => e.name === top.defaultExport))
      fail(['defaultExport'], `no export named ${JSON.stringify(top.defaultExport)}`);
    config.defaultExport = top.defaultExport as string;
  }
  return config;
}

/**
 * Checks declared filters against the filter types the daemon knows (after filter modules are
 * loaded): the type exists, names are valid and unique per export, and the arguments match the
 * type's schema. Errors point at the declaration ("FILE:LINE:COL: exports.disk.filters.0.args.rate").
 */
export function checkFilterSpecs(exports: ExportSpec[], registry: FilterTypeRegistry): void {
  const known = new Map(registry.list().map((t) => [t.name, t]));
  const ajv = new Ajv({ coerceTypes: true, useDefaults: true, allErrors: false, strict: false });
  const validators = new Map<string, ValidateFunction>();
  for (const exp of exports) {
    const names = new Set<string>();
    for (const f of exp.filters ?? []) {
      const fail = (field: (string | number)[], message: string): never => {
        throw new ConfigError(
          `${f.locate?.(field) ?? `filter ${f.type} on export ${exp.name}`}: ${message}`,
        );
      };
      const type = known.get(f.type);
      if (!type)
        fail(
          ['type'],
          `unknown filter type "${f.type}" (known: ${[...known.keys()].sort().join(', ') || 'none'})`,
        );
      if (f.name !== undefined) {
        if (!FILTER_NAME.test(f.name))
          fail(['name'], `invalid filter name "${f.name}": 1-64 letters, digits, '.', '_' or '-'`);
        if (names.has(f.name))
          fail(['name'], `a filter named "${f.name}" is already declared on export "${exp.name}"`);
        names.add(f.name);
      }
      let validate = validators.get(f.type);
      if (!validate) {
        validate = ajv.compile(type!.argsSchema);
        validators.set(f.type, validate);
      }
      if (!validate(structuredClone(f.args))) {
        const e = validate.errors![0]!;
        const field = ['args', ...e.instancePath.split('/').filter((s) => s !== '')];
        if (e.keyword === 'additionalProperties') {
          const extra = String((e.params as { additionalProperty: string }).additionalProperty);
          fail([...field, extra], `unknown argument "${extra}" for ${f.type}`);
        }
        if (e.keyword === 'required') {
          fail(
            field,
            `missing argument "${String((e.params as { missingProperty: string }).missingProperty)}" for ${f.type}`,
          );
        }
        fail(field, `${e.message ?? 'is invalid'}`);
      }
    }
  }
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/** "file:LINE:COL" of the deepest node on `path` that exists in the document. */
function where(
  doc: Document,
  lines: LineCounter,
  source: string,
  path: (string | number)[],
): string {
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
