/** The cdp filter's commands and the schemas their arguments are checked against. */
import { commandValidator } from '../args.js';
import { DEFAULT_PAUSE_TIMEOUT_MS } from './settings.js';

export const COMMANDS = [
  'status',
  'mark',
  'unmark',
  'marks',
  'resolve',
  'view',
  'close-view',
  'views',
  'rollback',
  'timeline',
  'retain',
  'resume',
  'reset',
] as const;

const pointProperties = {
  seq: { type: 'integer', minimum: 0, description: 'a sequence number' },
  at: { type: 'string', minLength: 1, description: 'a time (ISO 8601, or ms since the epoch)' },
  mark: { type: 'string', minLength: 1, description: 'a bookmark name' },
};
export interface PointArgs {
  seq?: number;
  at?: string;
  mark?: string;
}
export const resolveArgs = commandValidator<PointArgs>(
  { type: 'object', properties: pointProperties, additionalProperties: false },
  'resolve',
);
export const markArgs = commandValidator<PointArgs & { name: string }>(
  {
    type: 'object',
    properties: { name: { type: 'string' }, ...pointProperties },
    required: ['name'],
    additionalProperties: false,
  },
  'mark',
);
export const nameArgs = commandValidator<{ name: string }>(
  {
    type: 'object',
    properties: { name: { type: 'string', minLength: 1 } },
    required: ['name'],
    additionalProperties: false,
  },
  'arguments',
);
export const viewArgs = commandValidator<PointArgs & { name?: string }>(
  {
    type: 'object',
    properties: { name: { type: 'string', minLength: 1 }, ...pointProperties },
    additionalProperties: false,
  },
  'view',
);
export const rollbackArgs = commandValidator<PointArgs & { timeoutMs: number }>(
  {
    type: 'object',
    properties: {
      ...pointProperties,
      timeoutMs: { type: 'integer', minimum: 1, default: DEFAULT_PAUSE_TIMEOUT_MS },
    },
    additionalProperties: false,
  },
  'rollback',
);
export const timelineArgs = commandValidator<{ minutes: number; bucketSeconds: number }>(
  {
    type: 'object',
    properties: {
      minutes: { type: 'number', exclusiveMinimum: 0, maximum: 1e6, default: 60 },
      bucketSeconds: { type: 'integer', minimum: 1, maximum: 86400, default: 60 },
    },
    additionalProperties: false,
  },
  'timeline',
);
export const noArgs = commandValidator<Record<string, never>>(
  { type: 'object', properties: {}, additionalProperties: false },
  'cdp',
);
