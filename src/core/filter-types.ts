/**
 * The filter types a daemon knows: built-ins plus types loaded at run time from an ES module
 * path or an installed npm package. Arguments are validated against each type's JSON Schema;
 * strings from the command line (`--arg rate=100`) are coerced to the schema's types.
 */
import { pathToFileURL } from 'node:url';
import { isAbsolute, resolve } from 'node:path';
import { Ajv, type ValidateFunction } from 'ajv';
import { checkFilterType, type FilterType } from './filter.js';

export class FilterArgsError extends Error {
  override name = 'FilterArgsError';
}

interface Known {
  type: FilterType;
  validate: ValidateFunction;
  source: string;
}

export class FilterTypeRegistry {
  private readonly types = new Map<string, Known>();
  private readonly ajv = new Ajv({
    coerceTypes: true,
    useDefaults: true,
    allErrors: true,
    strict: false,
  });

  register(type: FilterType, source = 'built-in'): void {
    const t = checkFilterType(type, source);
    if (this.types.has(t.name)) {
      throw new Error(
        `${source}: filter type "${t.name}" is already registered (from ${this.types.get(t.name)!.source})`,
      );
    }
    let validate: ValidateFunction;
    try {
      validate = this.ajv.compile(t.argsSchema);
    } catch (err) {
      throw new Error(
        `${source}: filter type "${t.name}" has an invalid argsSchema: ${(err as Error).message}`,
      );
    }
    this.types.set(t.name, { type: t, validate, source });
  }

  /**
   * Loads filter types from an ES module: its default export, or `filterTypes` (an array), or
   * `filterType`. `spec` is a file path (relative to `cwd`) or a package name.
   */
  async load(spec: string, cwd = process.cwd()): Promise<FilterType[]> {
    const isPath = spec.startsWith('.') || isAbsolute(spec);
    const target = isPath ? pathToFileURL(resolve(cwd, spec)).href : spec;
    let mod: Record<string, unknown>;
    try {
      mod = (await import(target)) as Record<string, unknown>;
    } catch (err) {
      throw new Error(`cannot load filter module ${spec}: ${(err as Error).message}`);
    }
    const found = Array.isArray(mod.filterTypes)
      ? mod.filterTypes
      : [mod.default ?? mod.filterType].filter((t) => t !== undefined);
    if (found.length === 0) {
      throw new Error(
        `${spec}: exports no filter type (default export, filterType or filterTypes)`,
      );
    }
    const types = found.map((t) => checkFilterType(t, spec));
    for (const t of types) this.register(t, spec);
    return types;
  }

  get(name: string): FilterType {
    const known = this.types.get(name);
    if (!known) {
      throw new FilterArgsError(
        `unknown filter type "${name}" (known: ${[...this.types.keys()].sort().join(', ')})`,
      );
    }
    return known.type;
  }

  list(): {
    name: string;
    description: string;
    argsSchema: object;
    source: string;
    removalPolicies: readonly string[];
  }[] {
    return [...this.types.values()].map((k) => ({
      name: k.type.name,
      description: k.type.description,
      argsSchema: k.type.argsSchema,
      source: k.source,
      removalPolicies: k.type.removalPolicies ?? [],
    }));
  }

  /** Validates (and coerces, and fills defaults into) a copy of `args`. */
  validateArgs(typeName: string, args: Record<string, unknown>): Record<string, unknown> {
    this.get(typeName);
    const known = this.types.get(typeName)!;
    const copy = structuredClone(args);
    if (!known.validate(copy)) {
      const problems = (known.validate.errors ?? []).map((e) => {
        const field = e.instancePath.replace(/^\//, '').replaceAll('/', '.');
        if (e.keyword === 'additionalProperties') {
          return `unknown argument "${String((e.params as { additionalProperty: string }).additionalProperty)}"`;
        }
        return `${field || 'arguments'} ${e.message ?? 'is invalid'}`;
      });
      throw new FilterArgsError(`${typeName}: ${problems.join('; ')}`);
    }
    return copy;
  }
}
