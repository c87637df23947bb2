/** The filter types built into devfilter; each lives in its own folder. */
import type { FilterType } from '../core/filter.js';
import { accessFilterType } from './access/index.js';
import { cbtFilterType } from './cbt/index.js';
import { cdpFilterType } from './cdp/index.js';
import { faultFilterType } from './fault/index.js';
import { mirrorFilterType } from './mirror/index.js';
import { snapshotFilterType } from './snapshot/index.js';
import { statsFilterType } from './stats/index.js';
import { throttleFilterType } from './throttle/index.js';

export { accessFilterType } from './access/index.js';
export { cbtFilterType } from './cbt/index.js';
export { cdpFilterType } from './cdp/index.js';
export { faultFilterType } from './fault/index.js';
export { statsFilterType } from './stats/index.js';
export { throttleFilterType } from './throttle/index.js';

export const builtinFilterTypes: FilterType[] = [
  statsFilterType,
  faultFilterType,
  throttleFilterType,
  snapshotFilterType,
  cbtFilterType,
  cdpFilterType,
  mirrorFilterType,
  accessFilterType,
];
