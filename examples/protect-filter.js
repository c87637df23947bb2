// An external devfilter filter type: makes byte ranges of an export read-only.
//
//   devfilter serve --filter-module ./examples/protect-filter.js -e disk=file:disk.img
//   devfilter filter create disk protect --arg ranges='[[0, 1048576]]'
//   devfilter filter control disk protect add start=4194304 end=8388608
//   devfilter filter status disk protect
//
// Plain JavaScript (an ES module), so it loads as it is; docs/filter-api.md walks through it.

/** @typedef {import('devfilter').Filter} Filter */

/** Errors a filter reports are errno-style; the NBD layer sends them to the client as such. */
class DeviceError extends Error {
  constructor(errno, message) {
    super(message);
    this.errno = errno;
  }
}

/** @type {import('devfilter').FilterType<{ ranges: Array<[number, number]> }>} */
const protect = {
  name: 'protect',
  apiVersion: 1,
  description: 'Refuses writes, trims and zeroing that touch protected byte ranges (EPERM)',
  argsSchema: {
    type: 'object',
    properties: {
      ranges: {
        description: 'protected [start, end) byte ranges; a JSON string is accepted too',
        type: ['array', 'string'],
        default: [],
      },
    },
    additionalProperties: false,
  },

  // The prepare step: parse and check everything before the filter goes live.
  create(args, env) {
    let ranges = parseRanges(args.ranges);
    let denied = 0;

    /** Passes a write-type request down unless it overlaps a protected range. */
    const guard = (offset, length, pass) => {
      for (const [start, end] of ranges) {
        if (offset < end && start < offset + length) {
          denied++;
          return Promise.reject(
            new DeviceError(
              'EPERM',
              `[${offset}, +${length}) overlaps protected [${start}, ${end})`,
            ),
          );
        }
      }
      return pass();
    };

    /** @type {Filter} */
    const filter = {
      // Reads, flushes, block status and cache have no hook: they pass through untouched.
      write: (next, data, offset, flags, ctx) =>
        guard(offset, data.length, () => next.write(data, offset, flags, ctx)),
      trim: (next, offset, length, flags, ctx) =>
        guard(offset, length, () => next.trim(offset, length, flags, ctx)),
      writeZeroes: (next, offset, length, flags, ctx) =>
        guard(offset, length, () => next.writeZeroes(offset, length, flags, ctx)),

      status: () => ({ ranges, denied }),

      control(command, cargs) {
        if (command === 'add') {
          const range = [Number(cargs.start), Number(cargs.end)];
          ranges = [...ranges, ...parseRanges([range])]; // replaced whole: requests see old or new
          env.emit('protect.changed', { ranges });
          return { ranges };
        }
        if (command === 'clear') {
          ranges = [];
          env.emit('protect.changed', { ranges });
          return { ranges };
        }
        throw new Error(`unknown command "${command}" (add start=N end=N, clear)`);
      },
    };
    return filter;
  },
};

function parseRanges(value) {
  const list = typeof value === 'string' ? JSON.parse(value) : value;
  if (!Array.isArray(list)) throw new Error('ranges must be a list of [start, end] pairs');
  return list.map((r) => {
    if (
      !Array.isArray(r) ||
      r.length !== 2 ||
      !r.every(Number.isSafeInteger) ||
      r[0] < 0 ||
      r[1] <= r[0]
    ) {
      throw new Error(
        `invalid range ${JSON.stringify(r)}: expected [start, end) with 0 <= start < end`,
      );
    }
    return [r[0], r[1]];
  });
}

export default protect;
