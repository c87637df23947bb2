import type { DeviceManager, PublishedExport } from '../core/manager.js';
import type { ExportSource, ExportTable, NbdExport } from '../nbd/exports.js';

/**
 * What NBD clients can open: the configured exports, then whatever filters publish while
 * they run (snapshot images such as "disk@monday"), looked up at negotiation time.
 */
export function exportSource(table: ExportTable, manager: DeviceManager): ExportSource {
  const toNbd = (p: PublishedExport): NbdExport => {
    // A snapshot of a TLS-only export is TLS-only too: it holds the same bytes.
    const tls = table.lookup(p.owner.export)?.tls;
    return {
      name: p.name,
      device: p.device,
      readOnly: p.readOnly,
      ...(p.description !== undefined ? { description: p.description } : {}),
      ...(tls !== undefined ? { tls } : {}),
    };
  };
  return {
    lookup: (name) => {
      const own = table.lookup(name);
      if (own !== undefined) return own;
      const published = manager.lookupPublished(name);
      return published === undefined ? undefined : toNbd(published);
    },
    list: () => [...table.list(), ...manager.publishedExports().map(toNbd)],
  };
}
