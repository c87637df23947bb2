/**
 * JSON Schemas of every control method's parameters. They are part of the documented API
 * (docs/control.md): a request whose params do not match gets -32602 (invalid-params) with a
 * message naming the field. No type coercion happens here: JSON clients send JSON types.
 */
import { Ajv, type ErrorObject, type ValidateFunction } from 'ajv';
import { RpcError } from './protocol.js';

const exportName = { type: 'string', maxLength: 4096, description: 'an export name' } as const;
const filterName = {
  type: 'string',
  minLength: 1,
  maxLength: 64,
  description: 'a filter name on that export',
} as const;
const timeoutMs = {
  type: 'integer',
  minimum: 1,
  maximum: 3_600_000,
  description: 'how long a stack change may wait for requests in flight to drain (default 10000)',
} as const;
const policy = {
  type: 'string',
  minLength: 1,
  maxLength: 64,
  description: 'a removal policy of the filter type',
} as const;
const none = { type: 'object', properties: {}, additionalProperties: false } as const;

export const methodParamSchemas = {
  'filter.create': {
    type: 'object',
    properties: {
      export: exportName,
      type: {
        type: 'string',
        minLength: 1,
        maxLength: 64,
        description: 'a filter type (see filter.types)',
      },
      name: {
        ...filterName,
        description: 'the new filter name (default: the type, or TYPE-2, TYPE-3, …)',
      },
      args: {
        type: 'object',
        description: "arguments, validated (and coerced) by the type's argsSchema",
      },
      at: {
        enum: ['top', 'bottom'],
        description: 'put the filter on top (default) or at the bottom',
      },
      above: { ...filterName, description: 'put the filter just above this one' },
      below: { ...filterName, description: 'put the filter just below this one' },
      timeoutMs,
    },
    required: ['export', 'type'],
    additionalProperties: false,
  },
  'filter.remove': {
    type: 'object',
    properties: { export: exportName, name: filterName, policy, timeoutMs },
    required: ['export', 'name'],
    additionalProperties: false,
  },
  'filter.removeAll': {
    type: 'object',
    properties: {
      export: { ...exportName, description: 'only this export (default: every export)' },
      policy: {
        ...policy,
        description:
          'a removal policy, used for the filters whose type has it (others get their default)',
      },
      timeoutMs,
    },
    additionalProperties: false,
  },
  'filter.control': {
    type: 'object',
    properties: {
      export: exportName,
      name: filterName,
      command: {
        type: 'string',
        minLength: 1,
        maxLength: 128,
        description: 'a command the filter type documents',
      },
      args: { type: 'object', description: 'the command arguments' },
    },
    required: ['export', 'name', 'command'],
    additionalProperties: false,
  },
  'filter.list': {
    type: 'object',
    properties: {
      export: { ...exportName, description: 'only this export (default: every export)' },
    },
    additionalProperties: false,
  },
  'filter.status': {
    type: 'object',
    properties: { export: exportName, name: filterName },
    required: ['export', 'name'],
    additionalProperties: false,
  },
  'filter.types': none,
  'filter.loadModule': {
    type: 'object',
    properties: {
      spec: {
        type: 'string',
        minLength: 1,
        maxLength: 4096,
        description:
          'an ES module path (absolute, or relative to cwd) or an installed package name',
      },
      cwd: {
        type: 'string',
        minLength: 1,
        maxLength: 4096,
        description: "directory a relative path is resolved from (default: the daemon's)",
      },
    },
    required: ['spec'],
    additionalProperties: false,
  },
  'export.list': none,
  'export.status': {
    type: 'object',
    properties: { export: exportName },
    required: ['export'],
    additionalProperties: false,
  },
  'snapshot.create': {
    type: 'object',
    properties: {
      name: { type: 'string', minLength: 1, maxLength: 64, description: 'the snapshot name' },
      exports: {
        type: 'array',
        items: exportName,
        minItems: 1,
        maxItems: 64,
        uniqueItems: true,
        description: 'exports snapshotted at one instant (a consistency group)',
      },
      store: {
        type: 'string',
        minLength: 1,
        maxLength: 4096,
        description: 'difference store directory, for exports without a snapshot filter yet',
      },
      limit: { type: ['string', 'integer'], description: 'store size limit (e.g. 10G)' },
      chunkSize: { type: ['string', 'integer'], description: 'copy unit (default 64K)' },
      timeoutMs,
    },
    required: ['name', 'exports'],
    additionalProperties: false,
  },
  'snapshot.delete': {
    type: 'object',
    properties: { export: exportName, name: { type: 'string', minLength: 1, maxLength: 64 } },
    required: ['export', 'name'],
    additionalProperties: false,
  },
  'snapshot.list': {
    type: 'object',
    properties: {
      export: { ...exportName, description: 'only this export (default: every export)' },
    },
    additionalProperties: false,
  },
  'snapshot.status': {
    type: 'object',
    properties: { export: exportName },
    required: ['export'],
    additionalProperties: false,
  },
  'snapshot.verify': {
    type: 'object',
    properties: { export: exportName },
    required: ['export'],
    additionalProperties: false,
  },
  'daemon.status': none,
  'events.subscribe': none,
  'events.unsubscribe': none,
} as const;

export type MethodName = keyof typeof methodParamSchemas;

export const METHOD_NAMES = Object.keys(methodParamSchemas) as MethodName[];

const ajv = new Ajv({ allErrors: false, strict: false });
const validators = new Map<string, ValidateFunction>(
  Object.entries(methodParamSchemas).map(([name, schema]) => [name, ajv.compile(schema)]),
);

export function isMethod(name: string): name is MethodName {
  return validators.has(name);
}

/** Checks `params` of `method`; throws invalid-params with a message naming the field. */
export function validateParams(method: MethodName, params: unknown): Record<string, unknown> {
  const validate = validators.get(method)!;
  if (!validate(params))
    throw RpcError.of('invalid-params', `${method}: ${describe(validate.errors?.[0])}`);
  return params as Record<string, unknown>;
}

function describe(e: ErrorObject | undefined): string {
  if (e === undefined) return 'invalid params';
  const field = ['params', ...e.instancePath.split('/').filter((s) => s !== '')].join('.');
  switch (e.keyword) {
    case 'additionalProperties':
      return `${field}: unknown member "${String((e.params as { additionalProperty: string }).additionalProperty)}"`;
    case 'required':
      return `${field}: missing member "${String((e.params as { missingProperty: string }).missingProperty)}"`;
    case 'enum':
      return `${field} must be one of ${(e.params as { allowedValues: unknown[] }).allowedValues.map((v) => JSON.stringify(v)).join(', ')}`;
    default:
      return `${field} ${e.message ?? 'is invalid'}`;
  }
}
