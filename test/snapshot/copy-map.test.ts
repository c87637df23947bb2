/**
 * The in-memory copy map and slot pool against plain reference structures, with random
 * operations: adds, lookups, prunes; slots taken and released.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { CopyMap, SlotPool } from '../../src/filters/snapshot/copy-map.js';
import { NO_SLOT } from '../../src/filters/snapshot/format.js';
import { Rng, seedFromEnv } from './fixture.js';

const SEED = seedFromEnv();

test(`copy map agrees with a reference model (seed ${SEED})`, () => {
  const rng = new Rng(SEED);
  const chunks = 5000;
  const map = new CopyMap(chunks);
  // Reference: per chunk, its copies; and lastWriteGen.
  const ref = new Map<number, { slot: number; low: number; high: number }[]>();
  const lwg = new Uint32Array(chunks);
  let gen = 1;
  let nextSlot = 0;
  for (let step = 0; step < 20000; step++) {
    const x = rng.next();
    if (x < 0.6) {
      const c = rng.int(chunks);
      if (lwg[c]! >= gen) continue;
      const copy = { slot: rng.next() < 0.2 ? NO_SLOT : nextSlot++, low: lwg[c]!, high: gen };
      map.add(c, copy.slot, copy.low, copy.high);
      ref.set(c, [...(ref.get(c) ?? []), copy]);
      lwg[c] = gen;
    } else if (x < 0.65) {
      gen++;
    } else if (x < 0.67) {
      // Prune the copies serving a random generation window.
      const cut = rng.int(gen + 1);
      const keep = (low: number, high: number): boolean => !(low < cut && cut <= high); // drop those serving `cut`
      const freed: number[] = [];
      map.prune(keep, (s) => freed.push(s));
      const want: number[] = [];
      for (const [c, list] of ref) {
        const kept = list.filter((k) => !(k.low < cut && cut <= k.high));
        for (const k of list)
          if (k.low < cut && cut <= k.high && k.slot !== NO_SLOT) want.push(k.slot);
        if (kept.length === 0) ref.delete(c);
        else ref.set(c, kept);
      }
      assert.deepEqual(
        freed.sort((a, b) => a - b),
        want.sort((a, b) => a - b),
      );
    } else {
      const c = rng.int(chunks);
      const g = rng.between(1, gen);
      const hit = (ref.get(c) ?? []).find((k) => k.low < g && g <= k.high);
      assert.equal(
        map.find(c, g),
        hit === undefined ? -1 : hit.slot,
        `seed ${SEED}: chunk ${c} generation ${g}`,
      );
    }
  }
  let total = 0;
  for (const list of ref.values()) total += list.length;
  assert.equal(map.size, total);
  assert.equal(map.chunksWithCopies, ref.size);
  let seen = 0;
  map.forEach(() => seen++);
  assert.equal(seen, total);
  assert.deepEqual(map.lastWriteGen, lwg);
});

test('slot pool: reuses freed slots, stops at its limit, rebuilds from the slots in use', () => {
  const pool = new SlotPool(4);
  assert.deepEqual([pool.take(), pool.take(), pool.take()], [0, 1, 2]);
  pool.release(1);
  assert.equal(pool.take(), 1);
  assert.equal(pool.take(), 3);
  assert.equal(pool.take(), -1, 'the limit');
  assert.equal(pool.inUse, 4);
  const rebuilt = SlotPool.fromUsed([0, 3, 5], 10);
  assert.deepEqual([rebuilt.inUse, rebuilt.highWater, rebuilt.freeSlots], [3, 6, 3]);
  assert.deepEqual([rebuilt.take(), rebuilt.take(), rebuilt.take(), rebuilt.take()], [1, 2, 4, 6]);
  assert.throws(() => rebuilt.release(9), /never handed out/);
});
