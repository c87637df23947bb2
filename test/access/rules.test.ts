/**
 * The access filter's rules document and the audit log format, without a server: validation
 * with messages naming rules[i].field, range and address parsing, the first-match walk with
 * client identities (uid, gid, address/CIDR, export), and audit verification of an edited,
 * removed, reordered or truncated log.
 */
import assert from 'node:assert/strict';
import { appendFileSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { pino } from 'pino';
import type { IoContext } from '../../src/core/device.js';
import { AuditLog } from '../../src/filters/access/audit-log.js';
import { verifyAuditLog } from '../../src/filters/access/audit-verify.js';
import { RuleSet, parseRulesDocument } from '../../src/filters/access/rules.js';
import { Op, opBit } from '../../src/filters/ops.js';
import { tempDir } from '../helpers/server.js';

const MiB = 1024 * 1024;
const SIZE = 64 * MiB;
const logger = pino({ level: 'silent' });

function refused(doc: unknown, message: RegExp): void {
  assert.throws(() => parseRulesDocument(doc, SIZE, 4096), message);
}

describe('rules document', () => {
  test('the example from the issue works as written', () => {
    const doc = parseRulesDocument(
      {
        default: 'allow',
        rules: [{ action: 'deny', ops: ['write', 'trim', 'zero'], range: [0, 1048576] }],
      },
      SIZE,
      4096,
    );
    assert.deepEqual(doc, {
      default: 'allow',
      rules: [{ action: 'deny', ops: ['write', 'trim', 'zero'], range: [[0, MiB]] }],
      worm: [],
    });
  });

  test('sizes, "end", comma strings, lists and merging', () => {
    const doc = parseRulesDocument(
      {
        default: 'deny',
        rules: [
          {
            name: 'ro',
            action: 'allow',
            ops: 'read, block-status',
            range: [
              ['2M', '3M'],
              ['1M', '2M'],
              ['10M', 'end'],
            ],
            uid: 1000,
            gid: [10, 20],
            address: ['10.0.0.0/8', '::1'],
            export: 'disk',
          },
        ],
        worm: ['32M', 'end'],
      },
      SIZE,
      4096,
    );
    assert.deepEqual(doc.rules[0], {
      name: 'ro',
      action: 'allow',
      ops: ['read', 'block-status'],
      range: [
        [MiB, 3 * MiB],
        [10 * MiB, SIZE],
      ],
      uid: [1000],
      gid: [10, 20],
      address: ['10.0.0.0/8', '::1'],
      export: ['disk'],
    });
    assert.deepEqual(doc.worm, [[32 * MiB, SIZE]]);
  });

  test('bad documents are refused with the field named', () => {
    refused({ rules: [{ action: 'block' }] }, /rules\[0\]\.action must be one of "allow"/);
    refused({ rules: [{ action: 'deny', opz: 'read' }] }, /rules\[0\]: unknown field "opz"/);
    refused({ rules: [{ action: 'deny', ops: 'wrote' }] }, /rules\[0\]\.ops: unknown operation/);
    refused({ rules: [{ action: 'deny', range: [5, 5] }] }, /rules\[0\]\.range: end \(5\)/);
    refused(
      { rules: [{ action: 'deny', range: [0, '1G'] }] },
      /rules\[0\]\.range: end \(1073741824\) is past the end of the device/,
    );
    refused(
      { rules: [{ action: 'deny' }, { action: 'deny', address: '10.0.0.300' }] },
      /rules\[1\]\.address: "10\.0\.0\.300" is not an IP address/,
    );
    refused(
      { rules: [{ action: 'deny', address: '10.0.0.0/33' }] },
      /prefix length must be 0\.\.32/,
    );
    refused({ rules: [{ action: 'deny', uid: -1 }] }, /rules\[0\]\.uid/);
    refused(
      { rules: [{ action: 'deny', tlsSubject: 'C = GB, CN = x' }] },
      /rules\[0\]\.tlsSubject: .*RFC 2253/,
    );
    refused({ rules: [{ action: 'deny', pskIdentity: '' }] }, /rules\[0\]\.pskIdentity/);
    refused({ default: 'maybe' }, /default must be one of/);
    refused({ worm: [100, 8192] }, /worm: .*aligned to the WORM block size/);
    refused({ rules: {} }, /rules must be array/);
    refused([], /must be an object/);
  });
});

describe('first match wins, with identities', () => {
  const ctx = (client: IoContext['client'], exportName = 'disk'): IoContext => ({
    exportName,
    client,
  });
  const W = opBit(Op.WRITE);
  const R = opBit(Op.READ);
  const doc = parseRulesDocument(
    {
      default: 'deny',
      rules: [
        { action: 'allow', uid: 0 },
        { action: 'audit', ops: 'write', address: '192.168.0.0/16', range: [0, '1M'] },
        { action: 'allow', ops: 'read', address: ['192.168.0.0/16', 'fd00::/8'] },
        { action: 'allow', export: 'scratch' },
        { action: 'deny', gid: 50, ops: 'flush' },
        { action: 'allow', ops: 'flush' },
      ],
    },
    SIZE,
    4096,
  );
  const rs = new RuleSet(doc, false);
  const root = ctx({ transport: 'unix', uid: 0, gid: 0 });
  const user = ctx({ transport: 'unix', uid: 1000, gid: 50 });
  const lan = ctx({ transport: 'tcp', address: '192.168.1.5', port: 1 });
  const mapped = ctx({ transport: 'tcp', address: '::ffff:192.168.7.7', port: 1 });
  const v6 = ctx({ transport: 'tcp', address: 'fd00::1', port: 1 });
  const other = ctx({ transport: 'tcp', address: '10.1.1.1', port: 1 });

  test('decisions', () => {
    assert.equal(rs.decide(W, false, 0, 4096, root), 0);
    assert.equal(rs.decide(W, false, 0, 4096, lan), 1);
    assert.equal(rs.decide(W, false, MiB - 1, 2, lan), 1, 'partial overlap matches');
    assert.equal(rs.decide(W, false, MiB, 4096, lan), -1, 'next to the range: default');
    assert.equal(rs.decide(W, false, 0, 4096, mapped), 1, 'v4-mapped address is v4');
    assert.equal(rs.decide(R, false, 0, 4096, v6), 2);
    assert.equal(rs.decide(R, false, 0, 4096, other), -1);
    assert.equal(rs.decide(R, false, 0, 4096, ctx(other.client, 'scratch')), 3);
    const F = opBit(Op.FLUSH);
    assert.equal(rs.decide(F, true, 0, 0, user), 4);
    assert.equal(rs.decide(F, true, 0, 0, other), 5);
    assert.equal(rs.decide(W, false, 0, 4096, undefined), -1, 'internal I/O has no identity');
    assert.equal(rs.slowMask, 0x7f, 'a deny default makes every operation slow');
  });

  test('an allow-everything set costs nothing; WORM makes writes slow', () => {
    const free = new RuleSet(parseRulesDocument({}, SIZE, 4096), false);
    assert.equal(free.slowMask, 0);
    const worm = new RuleSet(parseRulesDocument({ worm: [0, '1M'] }, SIZE, 4096), false);
    assert.equal(worm.slowMask, opBit(Op.WRITE) | opBit(Op.TRIM) | opBit(Op.ZERO));
    assert.ok(worm.touchesWorm(MiB - 1, 1));
    assert.ok(!worm.touchesWorm(MiB, 4096));
    const readOnly = new RuleSet(
      parseRulesDocument(
        { rules: [{ action: 'allow', ops: 'write' }, { action: 'deny' }] },
        SIZE,
        4096,
      ),
      false,
    );
    assert.equal(readOnly.slowMask, 0x7f);
  });
});

describe('audit log', () => {
  async function writeLog(path: string, events: number): Promise<void> {
    const log = await AuditLog.open(path, { exportName: 'disk', filterName: 'acl', logger });
    await Promise.all(
      Array.from({ length: events }, (_, i) =>
        log.append({
          type: 'event',
          op: 'write',
          offset: i * 4096,
          length: 4096,
          action: 'deny',
          result: 'denied',
        }),
      ),
    );
    await log.close();
  }
  const lines = (p: string): string[] => readFileSync(p, 'utf8').split('\n').slice(0, -1);
  const put = (p: string, ls: string[]): void => writeFileSync(p, ls.map((l) => `${l}\n`).join(''));

  test('a written log verifies; edits, removals and reordering are found', async () => {
    const dir = tempDir('devfilter-audit-');
    try {
      const path = join(dir.path, 'audit.log');
      await writeLog(path, 5);
      const good = await verifyAuditLog(path);
      assert.equal(good.status, 'ok', JSON.stringify(good));
      // header, open, 5 events, close
      assert.equal(good.lines, 8);
      assert.equal(good.denied, 5);
      assert.ok(good.endsWithClose);
      const orig = lines(path);

      const edited = [...orig];
      edited[3] = edited[3]!.replace('"offset":4096', '"offset":8192');
      put(path, edited);
      let r = await verifyAuditLog(path);
      assert.equal(r.status, 'tampered');
      assert.equal(r.firstBad?.line, 4);
      assert.match(r.firstBad!.reason, /hash does not match/);

      put(
        path,
        orig.filter((_, i) => i !== 4),
      );
      r = await verifyAuditLog(path);
      assert.equal(r.status, 'tampered');
      assert.equal(r.firstBad?.line, 5);
      assert.match(r.firstBad!.reason, /seq is 5, expected 4/);

      const swapped = [...orig];
      [swapped[3], swapped[4]] = [swapped[4]!, swapped[3]!];
      put(path, swapped);
      r = await verifyAuditLog(path);
      assert.equal(r.firstBad?.line, 4);

      // Removing the line and renumbering the rest is caught by the chain.
      const renumbered = orig
        .filter((_, i) => i !== 4)
        .map((l, i) => (i >= 4 ? l.replace(/^\{"seq":\d+/, `{"seq":${i}`) : l));
      put(path, renumbered);
      r = await verifyAuditLog(path);
      assert.equal(r.firstBad?.line, 5);

      put(path, orig);
      writeFileSync(path, readFileSync(path).subarray(0, -20));
      r = await verifyAuditLog(path);
      assert.equal(r.status, 'truncated');
      assert.equal(r.truncatedTail?.line, 8);
      assert.equal(r.lines, 7);
    } finally {
      dir.cleanup();
    }
  });

  test('reopening continues the chain; a torn tail is cut and recorded', async () => {
    const dir = tempDir('devfilter-audit-');
    try {
      const path = join(dir.path, 'audit.log');
      await writeLog(path, 2);
      appendFileSync(path, '{"seq":99,"type":"event","ti');
      assert.equal((await verifyAuditLog(path)).status, 'truncated');
      await writeLog(path, 3);
      const r = await verifyAuditLog(path);
      assert.equal(r.status, 'ok', JSON.stringify(r));
      assert.equal(r.tornTailsRecorded, 1);
      assert.equal(r.opens, 2);
      assert.equal(r.events, 5);
      // A log whose last line was edited is not continued.
      const ls = lines(path);
      ls[ls.length - 1] = ls[ls.length - 1]!.replace('"close"', '"clos"');
      put(path, ls);
      await assert.rejects(
        AuditLog.open(path, { exportName: 'disk', filterName: 'acl', logger }),
        /last complete line does not verify/,
      );
    } finally {
      dir.cleanup();
    }
  });
});
