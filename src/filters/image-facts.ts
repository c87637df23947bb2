/**
 * What a read-only image of a past instant (a snapshot image, a cdp view) tells clients: the
 * origin's size and block sizes, read-only, nothing but reads, flush and block status, and
 * safe for several connections at once.
 */
import { readOnlyImageCaps, type DeviceInfo } from '../core/device.js';

export function imageFacts(
  below: DeviceInfo,
  size: number,
  statusContexts: readonly string[] = [],
): DeviceInfo {
  return Object.freeze({
    size,
    ...(statusContexts.length > 0 ? { statusContexts: Object.freeze([...statusContexts]) } : {}),
    blockSize: below.blockSize,
    caps: readOnlyImageCaps(below.caps.rotational),
  });
}
