/**
 * The orderings copy-before-write depends on, forced with a test filter below the snapshot
 * filter (between it and the origin) that can hold a request until released:
 * - the origin write is issued only after the chunk's copy is committed (durable);
 * - an image read of a chunk without a copy, held at the origin while a write copies the
 *   chunk and overwrites it, still returns the old content (the look-again after the read);
 * - the same for block status (a chunk trimmed meanwhile is not reported as a hole);
 * - concurrent writes to one chunk make one copy; a write to another chunk does not wait.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { ExtentState } from '../../src/core/device.js';
import { FILTER_API_VERSION, type Filter, type FilterType } from '../../src/core/filter.js';
import { pattern } from '../filters/fixture.js';
import { KiB, MiB, startSnapFixture, type SnapFixture } from './fixture.js';

const CHUNK = 64 * KiB;

/** Holds the next request of a kind when armed; records the order of what passes. */
class Holder {
  armed: 'read' | 'blockStatus' | 'write' | null = null;
  private release: (() => void) | null = null;
  held: Promise<void> | null = null;
  onWrite: ((offset: number) => void) | null = null;

  arm(kind: 'read' | 'blockStatus' | 'write'): Promise<void> {
    this.armed = kind;
    return new Promise((resolve) => {
      this.held = new Promise<void>((r) => (this.release = r));
      const check = setInterval(() => {
        if (this.armed === null) {
          clearInterval(check);
          resolve();
        }
      }, 1);
    });
  }

  letGo(): void {
    this.release?.();
    this.release = null;
  }

  async maybeHold(kind: 'read' | 'blockStatus' | 'write'): Promise<void> {
    if (this.armed !== kind) return;
    this.armed = null;
    await this.held;
  }

  filter(): Filter {
    return {
      read: async (next, buf, offset, flags, ctx) => {
        await this.maybeHold('read');
        return next.read(buf, offset, flags, ctx);
      },
      blockStatus: async (next, offset, length, flags, ctx) => {
        await this.maybeHold('blockStatus');
        return next.blockStatus(offset, length, flags, ctx);
      },
      write: async (next, data, offset, flags, ctx) => {
        this.onWrite?.(offset);
        await this.maybeHold('write');
        return next.write(data, offset, flags, ctx);
      },
    };
  }
}

describe('snapshot orderings', () => {
  let fx: SnapFixture;
  const holder = new Holder();
  before(async () => {
    fx = await startSnapFixture([{ name: 'disk', size: 8 * MiB }]);
    const holdType: FilterType = {
      name: 'hold',
      apiVersion: FILTER_API_VERSION,
      description: 'test: holds a request when armed',
      argsSchema: { type: 'object', properties: {}, additionalProperties: false },
      create: () => holder.filter(),
    };
    fx.manager.types.register(holdType);
    await fx.manager.createFilter('disk', 'hold', { name: 'hold', position: { at: 'bottom' } });
    await fx.manager.createFilter('disk', 'snapshot', {
      name: 'snap',
      args: { store: fx.storeDir, chunkSize: CHUNK },
      position: { at: 'top' },
    });
  });
  after(async () => {
    await fx.close();
  });

  test('the origin write comes after the copy is committed', async () => {
    const c = await fx.connect('disk');
    await c.write(0, pattern(MiB, 1));
    await fx.control('disk', 'take', { name: 'order' });
    const snap = fx.filter('disk');
    const seen: string[] = [];
    holder.onWrite = (offset) => {
      const chunk = Math.floor(offset / CHUNK);
      const gen = (snap.list().find((s) => s.name === 'order') ?? { generation: 0 }).generation;
      seen.push(
        `${chunk}:${(snap as unknown as { cow: { find(c: number, g: number): number } }).cow.find(chunk, gen) >= 0 ? 'copied' : 'NOT copied'}`,
      );
    };
    await Promise.all([
      c.write(3 * CHUNK + 10, pattern(100, 2)),
      c.write(5 * CHUNK, pattern(2 * CHUNK, 3)),
    ]);
    holder.onWrite = null;
    assert.deepEqual(seen.sort(), ['3:copied', '5:copied'].sort());
    await fx.control('disk', 'delete', { name: 'order' });
  });

  test('an image read held at the origin while the chunk is copied and overwritten sees the old data', async () => {
    const c = await fx.connect('disk');
    const old = pattern(CHUNK, 10);
    await c.write(10 * CHUNK, old);
    await fx.control('disk', 'take', { name: 'r' });
    const img = fx.filter('disk').image('r')!;
    const armed = holder.arm('read');
    const buf = Buffer.alloc(CHUNK);
    const reading = img.read(buf, 10 * CHUNK, 0);
    await armed; // the image's origin read is now held below the snapshot filter
    await c.write(10 * CHUNK, pattern(CHUNK, 11)); // copies, then overwrites the origin
    holder.letGo();
    await reading;
    assert.ok(buf.equals(old), 'the image read must not show the new data');
    await fx.control('disk', 'delete', { name: 'r' });
  });

  test('block status held at the origin while the chunk is copied and trimmed reports data', async () => {
    const c = await fx.connect('disk');
    await c.write(20 * CHUNK, pattern(CHUNK, 20));
    await fx.control('disk', 'take', { name: 'b' });
    const img = fx.filter('disk').image('b')!;
    const armed = holder.arm('blockStatus');
    const status = img.blockStatus(20 * CHUNK, CHUNK, 0);
    await armed;
    await c.trim(20 * CHUNK, CHUNK); // copied, then the origin becomes a hole
    holder.letGo();
    const extents = await status;
    assert.equal(
      extents[0]!.state & ExtentState.ZERO,
      0,
      `a chunk with data must not be reported as zero: ${JSON.stringify(extents)}`,
    );
    await fx.control('disk', 'delete', { name: 'b' });
  });

  test('concurrent writes to one chunk copy it once; other chunks do not wait for it', async () => {
    const c1 = await fx.connect('disk');
    const c2 = await fx.connect('disk');
    await fx.control('disk', 'take', { name: 'once' });
    const snap = fx.filter('disk');
    const before = (
      snap.status() as { copies: { copiedSinceAttach: number; zeroChunksSinceAttach: number } }
    ).copies;
    // Hold the first origin write (which comes after its copy): the others to that chunk wait
    // for nothing but the copy; a write to another chunk completes meanwhile.
    await c1.write(40 * CHUNK, pattern(CHUNK, 40));
    await fx.control('disk', 'delete', { name: 'once' });
    await fx.control('disk', 'take', { name: 'once' });
    const armed = holder.arm('write');
    const first = c1.write(40 * CHUNK, pattern(100, 41));
    await armed;
    const sameChunk = [
      c2.write(40 * CHUNK + 200, pattern(100, 42)),
      c2.write(40 * CHUNK + 400, pattern(100, 43)),
    ];
    await c1.write(50 * CHUNK, pattern(100, 50)); // another chunk: not held up
    holder.letGo();
    await Promise.all([first, ...sameChunk]);
    const afterCopies = (
      snap.status() as { copies: { copiedSinceAttach: number; zeroChunksSinceAttach: number } }
    ).copies;
    const made =
      afterCopies.copiedSinceAttach +
      afterCopies.zeroChunksSinceAttach -
      (before.copiedSinceAttach + before.zeroChunksSinceAttach);
    assert.equal(
      made,
      1 + 1 + 1,
      'one copy of chunk 40 for the first snapshot, one for the second, one of chunk 50',
    );
    const img = snap.image('once')!;
    const buf = Buffer.alloc(CHUNK);
    await img.read(buf, 40 * CHUNK, 0);
    assert.ok(buf.equals(pattern(CHUNK, 40)));
    await fx.control('disk', 'delete', { name: 'once' });
  });
});
