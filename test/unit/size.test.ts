import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { formatSize, parseSize } from '../../src/core/size.js';

const K = 1024;
const M = K * K;
const G = M * K;

describe('parseSize', () => {
  it('parses plain byte counts', () => {
    assert.equal(parseSize('4096'), 4096);
    assert.equal(parseSize('0'), 0);
    assert.equal(parseSize('512B'), 512);
    assert.equal(parseSize(' 77 '), 77);
  });

  it('parses binary units, case-insensitively, with optional B or iB', () => {
    assert.equal(parseSize('64K'), 64 * K);
    assert.equal(parseSize('512M'), 512 * M);
    assert.equal(parseSize('1G'), G);
    assert.equal(parseSize('1GiB'), G);
    assert.equal(parseSize('1gib'), G);
    assert.equal(parseSize('1GB'), G);
    assert.equal(parseSize('1 GiB'), G);
    assert.equal(parseSize('2t'), 2 * G * K);
    assert.equal(parseSize('1P'), G * M);
  });

  it('parses fractions that come to whole bytes', () => {
    assert.equal(parseSize('1.5G'), 1.5 * G);
    assert.equal(parseSize('0.5K'), 512);
    assert.equal(parseSize('.25M'), M / 4);
  });

  it('rejects bad input with a message naming it', () => {
    for (const bad of ['', 'G', '1X', '-1', '1.3K', '1.5', '1KK', '1 iB', '0x10', '1e3', 'abc']) {
      assert.throws(
        () => parseSize(bad),
        { message: new RegExp(`invalid size ${JSON.stringify(bad)}`) },
        bad,
      );
    }
    assert.throws(() => parseSize('9000P'), /larger than/);
  });
});

describe('formatSize', () => {
  it('picks the largest unit that keeps the number >= 1', () => {
    assert.equal(formatSize(0), '0 B');
    assert.equal(formatSize(1023), '1023 B');
    assert.equal(formatSize(K), '1 KiB');
    assert.equal(formatSize(G), '1 GiB');
    assert.equal(formatSize(1.5 * M), '1.5 MiB');
    assert.equal(formatSize(G + 1), '1 GiB');
    assert.equal(formatSize(4 * G * M), '4 PiB');
  });

  it('round-trips exact sizes through parseSize', () => {
    for (const n of [0, 1, 4096, 64 * K, 1.5 * G, 3 * G * K]) {
      assert.equal(parseSize(formatSize(n)), n);
    }
  });
});
