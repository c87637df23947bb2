/**
 * Human-readable byte sizes, always in binary units: "64K" is 65536 bytes, as dd, truncate and
 * qemu-img read it. Device sizes are byte-exact, so a size that is not a whole number of bytes
 * ("1.3K") is an error rather than something to round silently.
 */

const UNITS = ['B', 'K', 'M', 'G', 'T', 'P'] as const;

/** "4096", "64K", "512m", "1GiB", "1.5 GB", "2 TiB": number, then an optional unit. */
const SIZE_PATTERN = /^(\d+(?:\.\d+)?|\.\d+)\s*(?:([kmgtp])(?:i?b)?|b)?$/i;

export function parseSize(text: string): number {
  const match = SIZE_PATTERN.exec(text.trim());
  if (!match) {
    throw new Error(
      `invalid size ${JSON.stringify(text)}: expected a number with an optional unit ` +
        `K, M, G, T or P (binary, e.g. "512M", "1GiB", "1.5G")`,
    );
  }
  const [, number, unit] = match as unknown as [string, string, string | undefined];
  const exponent = unit ? UNITS.indexOf(unit.toUpperCase() as (typeof UNITS)[number]) : 0;
  const bytes = Number(number) * 1024 ** exponent;
  if (!Number.isInteger(bytes)) {
    throw new Error(`invalid size ${JSON.stringify(text)}: not a whole number of bytes`);
  }
  if (!Number.isSafeInteger(bytes)) {
    throw new Error(`invalid size ${JSON.stringify(text)}: larger than 2^53 - 1 bytes`);
  }
  return bytes;
}

/**
 * The largest unit that keeps the number at least 1, e.g. "1 GiB", "1.5 MiB", "512 B". Values
 * that are not exact are shown with up to two decimals, so the output is for people, not for
 * parseSize round trips (which it survives only when exact).
 */
export function formatSize(bytes: number): string {
  if (!Number.isFinite(bytes) || bytes < 0) throw new Error(`invalid byte count: ${bytes}`);
  let exponent = 0;
  while (exponent < UNITS.length - 1 && bytes >= 1024 ** (exponent + 1)) exponent++;
  const value = bytes / 1024 ** exponent;
  const shown = Number.isInteger(value) ? String(value) : String(Number(value.toFixed(2)));
  return exponent === 0 ? `${shown} B` : `${shown} ${UNITS[exponent]}iB`;
}
