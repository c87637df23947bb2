/**
 * A cdp view: a read-only device showing the export exactly as it was at one point of its
 * history. Per block: the undo data of the first change after the point that touched the block
 * (what the block held just before that change), zeros for an all-zero undo record, or — when
 * nothing changed the block since the point — the device's current content.
 *
 * Reading never blocks the export's writes. The one race — a block read from the device while
 * a write changes it — is closed by looking again after the read: a change's undo record is in
 * the index before the change goes down, so a block that still has no change after the point
 * once the device read has finished was not changed under it; one that has by then is read
 * again from the journal. The snapshot image uses the same look-again.
 */
import { ExtentState, type Device, type DeviceInfo, type Extent } from '../../core/device.js';
import { DeviceError, assert } from '../../core/errors.js';
import { imageFacts } from '../image-facts.js';
import { RecordType } from './format.js';
import type { ChangeLog } from './history.js';

/** What a view needs from its filter. */
export interface ViewSource {
  readonly blockSize: number;
  readonly size: number;
  readonly log: ChangeLog;
  /** The device below the filter (the export's current content). */
  readonly origin: Device;
  readPayload(segmentNo: number, pos: number, buf: Buffer): Promise<void>;
}

const PARALLEL_READS = 32;
/** Block status looks at most this many blocks per request; the client asks again for more. */
const STATUS_BLOCKS = 65536;
const MAX_EXTENTS = 1024;
const HOLE_ZERO = ExtentState.HOLE | ExtentState.ZERO;

/** A byte range [from, to) of the view and where its content comes from. */
interface Piece {
  from: number;
  to: number;
  /** The change whose undo data holds it, 0 for zeros, -1 for the device. */
  seq: number;
  segmentNo: number;
  pos: number;
}

export class CdpView implements Device {
  private readonly facts: DeviceInfo;
  private closedReason: string | null = null;

  constructor(
    private readonly src: ViewSource,
    /** The point shown: the state after change `point` and before `point + 1`. */
    readonly point: number,
  ) {
    this.facts = imageFacts(src.origin.info(), src.size);
  }

  info(): DeviceInfo {
    return this.facts;
  }

  /** The view stops answering (closed, or its history expired or was lost). */
  invalidate(reason: string): void {
    this.closedReason ??= reason;
  }

  get isOpen(): boolean {
    return this.closedReason === null;
  }

  async read(buf: Buffer, offset: number, _flags: number): Promise<void> {
    this.check(offset, buf.length);
    const pieces = this.plan(offset, offset + buf.length);
    await this.fetch(pieces, buf, offset);
    const again: Piece[] = [];
    for (const p of pieces) if (p.seq === -1) this.replan(p, again);
    if (again.length > 0) await this.fetch(again, buf, offset);
    this.check(offset, buf.length); // lost meanwhile: what was read proves nothing
  }

  /** Where each part of [from, to) is, merging neighbours from the same place. */
  private plan(from: number, to: number): Piece[] {
    const out: Piece[] = [];
    const B = this.src.blockSize;
    for (let pos = from; pos < to;) {
      const b = Math.floor(pos / B);
      const end = Math.min(to, (b + 1) * B);
      const seq = this.src.log.firstChangeAfter(b, this.point);
      let piece: Piece;
      if (seq === -1) piece = { from: pos, to: end, seq: -1, segmentNo: 0, pos: 0 };
      else {
        const row = this.src.log.row(seq);
        if (row.type === RecordType.UNDO_ZERO)
          piece = { from: pos, to: end, seq: 0, segmentNo: 0, pos: 0 };
        else
          piece = {
            from: pos,
            to: end,
            seq,
            segmentNo: row.segmentNo,
            pos: row.payloadPos + (b - row.blockStart) * B + (pos - b * B),
          };
      }
      const last = out[out.length - 1];
      if (
        last !== undefined &&
        last.to === piece.from &&
        last.seq === piece.seq &&
        (piece.seq <= 0 || last.pos + (last.to - last.from) === piece.pos)
      )
        last.to = piece.to;
      else out.push(piece);
      pos = end;
    }
    return out;
  }

  /** A device piece looked at again: the parts changed meanwhile, planned from the journal. */
  private replan(p: Piece, out: Piece[]): void {
    const B = this.src.blockSize;
    for (let b = Math.floor(p.from / B); b * B < p.to; b++) {
      if (this.src.log.firstChangeAfter(b, this.point) === -1) continue;
      const from = Math.max(p.from, b * B);
      const to = Math.min(p.to, (b + 1) * B);
      for (const q of this.plan(from, to)) if (q.seq !== -1) out.push(q);
    }
  }

  private async fetch(pieces: readonly Piece[], buf: Buffer, base: number): Promise<void> {
    let next = 0;
    const worker = async (): Promise<void> => {
      while (next < pieces.length) {
        const p = pieces[next++]!;
        const dst = buf.subarray(p.from - base, p.to - base);
        if (p.seq === 0) dst.fill(0);
        else if (p.seq === -1) await this.src.origin.read(dst, p.from, 0);
        else await this.src.readPayload(p.segmentNo, p.pos, dst);
      }
    };
    const workers: Promise<void>[] = [];
    for (let i = 0; i < Math.min(PARALLEL_READS, pieces.length); i++) workers.push(worker());
    await Promise.all(workers);
  }

  async blockStatus(offset: number, length: number, flags: number): Promise<Extent[]> {
    this.check(offset, length);
    const B = this.src.blockSize;
    const end = Math.min(
      offset + length,
      this.src.size,
      (Math.floor(offset / B) + STATUS_BLOCKS) * B,
    );
    const out: Extent[] = [];
    const push = (len: number, state: number): void => {
      const last = out[out.length - 1];
      if (last !== undefined && last.state === state) last.length += len;
      else out.push({ length: len, state });
    };
    let pos = offset;
    while (pos < end && out.length < MAX_EXTENTS) {
      const b = Math.floor(pos / B);
      const seq = this.src.log.firstChangeAfter(b, this.point);
      if (seq !== -1) {
        const to = Math.min((b + 1) * B, end);
        push(to - pos, this.src.log.row(seq).type === RecordType.UNDO_ZERO ? HOLE_ZERO : 0);
        pos = to;
        continue;
      }
      // A run of blocks unchanged since the point: the device knows their allocation.
      let runEnd = (b + 1) * B;
      while (runEnd < end && this.src.log.firstChangeAfter(runEnd / B, this.point) === -1)
        runEnd += B;
      runEnd = Math.min(runEnd, end);
      const extents = await this.src.origin.blockStatus(pos, runEnd - pos, flags);
      // Changed while asking: the device may describe the new content; call it data.
      let changed = false;
      for (let k = b; k * B < runEnd; k++)
        if (this.src.log.firstChangeAfter(k, this.point) !== -1) changed = true;
      if (changed) push(runEnd - pos, 0);
      else {
        let at = pos;
        for (const e of extents) {
          if (at >= runEnd) break;
          const len = Math.min(e.length, runEnd - at);
          assert(len > 0, 'empty extent from the device below');
          push(len, e.state);
          at += len;
        }
        if (at === pos)
          push(runEnd - pos, 0); // no answer: data is always true
        else if (at < runEnd) runEnd = at; // the device answered less: stop there
      }
      pos = runEnd;
    }
    this.check(offset, length);
    return out;
  }

  write(): Promise<void> {
    return Promise.reject(new DeviceError('EPERM', 'a cdp view is read-only'));
  }

  flush(): Promise<void> {
    return Promise.resolve();
  }

  trim(): Promise<void> {
    return this.write();
  }

  writeZeroes(): Promise<void> {
    return this.write();
  }

  cache(): Promise<void> {
    return Promise.resolve();
  }

  close(): Promise<void> {
    this.invalidate('closed');
    return Promise.resolve();
  }

  private check(offset: number, length: number): void {
    if (this.closedReason !== null)
      throw new DeviceError('EIO', `cdp view of point ${this.point} is gone: ${this.closedReason}`);
    assert(offset + length <= this.src.size, 'view request past the end');
  }
}
