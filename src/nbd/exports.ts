import type { Device } from '../core/device.js';
import type { ExportTlsPolicy } from './tls-policy.js';

/** A named device that NBD clients open. */
export interface NbdExport {
  readonly name: string;
  readonly description?: string;
  /** Refuse every write regardless of what the device could do. */
  readonly readOnly?: boolean;
  readonly device: Device;
  /**
   * Whether a client must be on TLS to open it; absent: the server's default (required when
   * the server's TLS mode is `require`, optional when `on`). Meaningless without TLS.
   */
  readonly tls?: ExportTlsPolicy;
}

/**
 * Where the server finds exports. The server asks at negotiation time, so exports may come
 * and go while it runs (snapshot images, views).
 */
export interface ExportSource {
  lookup(name: string): NbdExport | undefined;
  list(): Iterable<NbdExport>;
}

/** A plain table of exports, with an optional alias for the default (empty) name. */
export class ExportTable implements ExportSource {
  private readonly byName = new Map<string, NbdExport>();
  private defaultName: string | undefined;

  add(exp: NbdExport): void {
    if (this.byName.has(exp.name)) throw new Error(`export "${exp.name}" is defined twice`);
    this.byName.set(exp.name, exp);
  }

  remove(name: string): NbdExport | undefined {
    const exp = this.byName.get(name);
    this.byName.delete(name);
    if (this.defaultName === name) this.defaultName = undefined;
    return exp;
  }

  /** Makes the empty export name ('') open `name`. */
  setDefault(name: string): void {
    if (!this.byName.has(name)) throw new Error(`default export "${name}" is not defined`);
    this.defaultName = name;
  }

  getDefault(): string | undefined {
    return this.defaultName;
  }

  lookup(name: string): NbdExport | undefined {
    const exp = this.byName.get(name);
    if (exp !== undefined) return exp;
    if (name === '' && this.defaultName !== undefined) return this.byName.get(this.defaultName);
    return undefined;
  }

  list(): Iterable<NbdExport> {
    return this.byName.values();
  }

  get size(): number {
    return this.byName.size;
  }
}
