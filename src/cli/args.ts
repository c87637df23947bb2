/**
 * Parsing `k=v` arguments from the command line (`--arg rate=100`, `filter control … k=v`,
 * `--filter disk:throttle:readIops=100`). Values stay strings: the filter type's schema coerces
 * them. A key given twice becomes a list of strings.
 */
import type { FilterSpec } from './export-spec.js';

export function parseKeyValue(text: string): [string, string] {
  const eq = text.indexOf('=');
  if (eq <= 0) throw new Error(`expected KEY=VALUE, got ${JSON.stringify(text)}`);
  return [text.slice(0, eq), text.slice(eq + 1)];
}

/** Builds an arguments object from `k=v` pairs, on top of `base` (from --args-json). */
export function keyValuesToArgs(
  pairs: readonly string[],
  base: Record<string, unknown> = {},
): Record<string, unknown> {
  const args: Record<string, unknown> = { ...base };
  const seen = new Set<string>();
  for (const pair of pairs) {
    const [k, v] = parseKeyValue(pair);
    if (seen.has(k)) {
      const prev = args[k];
      args[k] = Array.isArray(prev) ? [...(prev as unknown[]), v] : [prev, v];
    } else {
      args[k] = v;
      seen.add(k);
    }
  }
  return args;
}

/** Parses a JSON object given on the command line (`--args-json '{"rules":[]}'`). */
export function parseJsonObject(text: string, what = '--args-json'): Record<string, unknown> {
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (err) {
    throw new Error(`${what}: not valid JSON: ${(err as Error).message}`);
  }
  if (typeof value !== 'object' || value === null || Array.isArray(value))
    throw new Error(`${what}: expected a JSON object`);
  return value as Record<string, unknown>;
}

export const FILTER_OPTION_HELP = 'EXPORT:TYPE[:k=v,k=v...]';

/** Parses `--filter EXPORT:TYPE[:k=v,...]`. The key `name` names the filter. */
export function parseFilterOption(text: string): { export: string; filter: FilterSpec } {
  const first = text.indexOf(':');
  if (first <= 0)
    throw new Error(`invalid --filter ${JSON.stringify(text)}: expected ${FILTER_OPTION_HELP}`);
  const exportName = text.slice(0, first);
  const rest = text.slice(first + 1);
  const second = rest.indexOf(':');
  const type = second < 0 ? rest : rest.slice(0, second);
  if (!/^[a-z][a-z0-9-]*$/.test(type))
    throw new Error(
      `invalid --filter ${JSON.stringify(text)}: bad filter type ${JSON.stringify(type)}`,
    );
  const pairs =
    second < 0 || rest.slice(second + 1) === '' ? [] : rest.slice(second + 1).split(',');
  let args: Record<string, unknown>;
  try {
    args = keyValuesToArgs(pairs);
  } catch (err) {
    throw new Error(`invalid --filter ${JSON.stringify(text)}: ${(err as Error).message}`);
  }
  const filter: FilterSpec = {
    type,
    args,
    locate: (field) => `--filter ${text}` + (field.length > 0 ? `: ${field.join('.')}` : ''),
  };
  if (typeof args.name === 'string') {
    filter.name = args.name;
    delete args.name;
  }
  return { export: exportName, filter };
}
