/**
 * Validation of `filter control` arguments for the built-in filters. Commands get the same
 * treatment as creation arguments (src/core/filter-types.ts): a JSON Schema checked by ajv,
 * with strings from the command line (`devfilter filter control mem t set iops=100`) coerced
 * to the schema's types, and readable messages. Failures are FilterCommandError, which the
 * manager reports as invalid input.
 */
import { Ajv, type ErrorObject, type ValidateFunction } from 'ajv';
import { FilterCommandError, type ArgsSchema } from '../core/filter.js';
import { parseSize } from '../core/size.js';

const ajv = new Ajv({ coerceTypes: true, useDefaults: true, allErrors: true, strict: false });

/** Reads like the registry's messages: `rules.0.probability must be <= 1`. */
export function describeAjvErrors(
  errors: readonly ErrorObject[] | null | undefined,
  prefix = '',
): string {
  const problems = (errors ?? []).map((e) => {
    const field = prefix + e.instancePath.replace(/^\//, '').replaceAll('/', '.');
    if (e.keyword === 'additionalProperties') {
      const extra = (e.params as { additionalProperty: string }).additionalProperty;
      return `unknown argument "${field ? `${field}.` : ''}${extra}"`;
    }
    if (e.keyword === 'enum') {
      const allowed = (e.params as { allowedValues: unknown[] }).allowedValues;
      return `${field || 'arguments'} must be one of ${allowed.map((v) => JSON.stringify(v)).join(', ')}`;
    }
    return `${field || 'arguments'} ${e.message ?? 'is invalid'}`;
  });
  return [...new Set(problems)].join('; ');
}

/**
 * Compiles a schema into a function that validates (and coerces, and fills defaults into) a
 * copy of its input, throwing FilterCommandError with `what` as context.
 */
export function commandValidator<T>(
  schema: ArgsSchema | Record<string, unknown>,
  what: string,
): (input: unknown) => T {
  const validate: ValidateFunction = ajv.compile(schema);
  return (input: unknown): T => {
    const copy = structuredClone(input ?? {});
    if (!validate(copy))
      throw new FilterCommandError(`${what}: ${describeAjvErrors(validate.errors)}`);
    return copy as T;
  };
}

/** Unknown command: lists what the filter understands. */
export function unknownCommand(
  type: string,
  command: string,
  known: readonly string[],
): FilterCommandError {
  return new FilterCommandError(
    `${type} has no command "${command}" (commands: ${known.join(', ')})`,
  );
}

/**
 * A creation argument that is a byte count, given as a number or a size string ("64K"), or
 * `fallback` when absent; throws a message naming `what` for anything else.
 */
export function sizeArg(
  what: string,
  value: number | string | undefined,
  fallback: number,
): number {
  if (value === undefined) return fallback;
  const n = typeof value === 'number' ? value : parseSize(value);
  if (!Number.isSafeInteger(n) || n < 0)
    throw new Error(`${what} must be a whole number of bytes, got ${String(value)}`);
  return n;
}
