import { pino, type Logger, type Level } from 'pino';

export const LOG_LEVELS: Level[] = ['fatal', 'error', 'warn', 'info', 'debug', 'trace'];

/** Structured JSON logs on stderr, written synchronously so the last lines survive a crash. */
export function createLogger(level: string): Logger {
  return pino({ level, base: { pid: process.pid } }, pino.destination({ fd: 2, sync: true }));
}
