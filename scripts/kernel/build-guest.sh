#!/usr/bin/env bash
# Builds (or finds in the cache) the QEMU guest of the kernel-client test: a stock Debian kernel
# and a small initramfs with busybox-static, the kernel modules the test needs (nbd, virtio_net,
# ext4 and their dependencies), Debian's nbd-client and e2fsprogs (with the shared libraries ldd
# names), and scripts/kernel/guest-init.sh as /init.
#
# The kernel package is fetched with `apt-get download` and unpacked with `dpkg-deb`, never
# installed. Everything lands in a cache directory, so a second run does nothing but print the
# path of the guest:
#
#   $DEVFILTER_KERNEL_CACHE  (default: ${XDG_CACHE_HOME:-$HOME/.cache}/devfilter/kernel-test)
#     debs/linux-image-*.deb                 the kernel package (kept: a rebuild needs no download)
#     guest-<kernel release>-<hash>/         one built guest: vmlinuz, initramfs.img, manifest
#
# <hash> covers this script, guest-init.sh and the versions of the host binaries copied into the
# initramfs, so editing the guest's init, or an upgrade of nbd-client, builds a new guest.
#
# Usage: scripts/kernel/build-guest.sh [--force]
#   --force   rebuild the guest even if the cache has it (the kernel package is still reused)
# Environment: DEVFILTER_KERNEL_PACKAGE (default linux-image-amd64; a metapackage is resolved to
#   the linux-image-X.Y.Z-N-amd64 package it depends on).
# Prints what it does on stderr and, on success, the guest directory as the last line of stdout.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${DEVFILTER_KERNEL_CACHE:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/devfilter/kernel-test}"
package="${DEVFILTER_KERNEL_PACKAGE:-linux-image-amd64}"
force=0
for arg in "$@"; do
  case "$arg" in
    --force) force=1 ;;
    -h | --help)
      sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
      exit 0
      ;;
    *)
      echo "build-guest: unknown argument: $arg" >&2
      exit 2
      ;;
  esac
done

say() { echo "build-guest: $*" >&2; }
die() {
  echo "build-guest: error: $*" >&2
  exit 1
}

# --- host tools -------------------------------------------------------------------------------
# busybox must be the static one (busybox-static): the initramfs has no libc for it otherwise.
busybox=""
for b in /bin/busybox /usr/bin/busybox; do
  if [ -x "$b" ] && ! ldd "$b" >/dev/null 2>&1; then
    busybox="$b"
    break
  fi
done
missing=()
for tool in apt-get apt-cache dpkg-deb cpio gzip ldd nbd-client mke2fs e2fsck sha256sum; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
[ -n "$busybox" ] || missing+=("busybox (static: Debian package busybox-static)")
[ "${#missing[@]}" -eq 0 ] || die "missing host tools: ${missing[*]} (Debian: busybox-static cpio nbd-client e2fsprogs xz-utils zstd)"

nbd_client="$(command -v nbd-client)"
mke2fs="$(command -v mke2fs)"
e2fsck="$(command -v e2fsck)"

mkdir -p "$cache/debs"
# One build at a time (two test runs may start together); the second then finds the guest built.
command -v flock >/dev/null 2>&1 && { exec 9>"$cache/.lock"; flock 9; }

# --- the kernel package -----------------------------------------------------------------------
# Which linux-image-X package does $package stand for? apt-cache only reads the local lists.
resolve_package() {
  local p="$1" dep
  local info
  info="$(apt-cache show "$p" 2>/dev/null || true)"
  if grep -q '^Package:' <<<"$info"; then
    case "$p" in
      linux-image-[0-9]*) echo "$p" ;;
      *)
        dep="$(apt-cache depends --important "$p" 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*\).*/\1/p' | sed -n 1p)"
        [ -n "$dep" ] && echo "$dep"
        ;;
    esac
  fi
}

pkg="$(resolve_package "$package" || true)"
if [ -z "$pkg" ]; then
  # No package lists yet (a fresh machine). Reuse a cached package if there is one, else fetch
  # the lists once.
  cached_deb="$(ls -1t "$cache"/debs/linux-image-*.deb 2>/dev/null | sed -n 1p || true)"
  if [ -z "$cached_deb" ]; then
    say "apt-cache does not know $package: running apt-get update"
    apt-get update -qq >&2 || die "apt-get update failed"
    pkg="$(resolve_package "$package" || true)"
    [ -n "$pkg" ] || die "cannot resolve $package to a linux-image package"
  fi
fi

# download PKG: puts the candidate version of PKG in the cache as $deb (fails if apt cannot).
download() {
  local p="$1" version tmp got old
  version="$(apt-cache policy "$p" | sed -n 's/^ *Candidate: //p')"
  [ -n "$version" ] && [ "$version" != "(none)" ] || { say "no candidate version for $p"; return 1; }
  deb="$cache/debs/${p}_${version//:/%3a}_amd64.deb"
  if [ -s "$deb" ]; then
    say "kernel package: $p $version (cached: $deb)"
    return 0
  fi
  say "kernel package: $p $version: apt-get download"
  tmp="$(mktemp -d "$cache/debs/.download.XXXXXX")"
  # apt downloads as its _apt user where that user may write (else it warns and does it as root).
  chown _apt "$tmp" 2>/dev/null || true
  if ! (cd "$tmp" && apt-get download -q "$p=$version" >&2); then
    rm -rf "$tmp"
    return 1
  fi
  got="$(ls -1 "$tmp"/*.deb | sed -n 1p)"
  mv "$got" "$deb"
  rm -rf "$tmp"
  # Older kernel packages are of no more use.
  for old in "$cache"/debs/linux-image-*.deb; do
    [ "$old" = "$deb" ] || { say "removing the older kernel package $old"; rm -f "$old" "$old.release"; }
  done
}

if [ -n "$pkg" ]; then
  if ! download "$pkg"; then
    # Stale lists name a version the mirror no longer has: refresh them and resolve again.
    say "apt-get download failed: running apt-get update and trying again"
    apt-get update -qq >&2 || die "apt-get update failed"
    pkg="$(resolve_package "$package" || true)"
    [ -n "$pkg" ] || die "cannot resolve $package to a linux-image package"
    download "$pkg" || die "apt-get download $pkg failed"
  fi
else
  deb="$cached_deb"
  say "no package lists: using the cached kernel package $deb"
fi

# The kernel release (e.g. 6.1.0-56-amd64) from the package's file list, without unpacking it.
# Listing the package takes seconds (it is xz-compressed), so the answer is kept beside it.
if [ -s "$deb.release" ]; then
  release="$(cat "$deb.release")"
else
  release="$(dpkg-deb --fsys-tarfile "$deb" | tar -t 2>/dev/null | sed -n 's#^\./boot/vmlinuz-##p' | sed -n 1p)"
  [ -n "$release" ] || die "no /boot/vmlinuz-* in $deb"
  echo "$release" >"$deb.release"
fi

# --- the guest, keyed by what goes into it ------------------------------------------------------
binver() { dpkg-query -W -f='${Package} ${Version}\n' "$@" 2>/dev/null || true; }
key="$(
  {
    sha256sum "$here/build-guest.sh" "$here/guest-init.sh" | cut -d' ' -f1
    basename "$deb"
    binver nbd-client e2fsprogs libext2fs2 busybox-static
    sha256sum "$nbd_client" "$mke2fs" "$e2fsck" "$busybox" | cut -d' ' -f1
  } | sha256sum | cut -c1-12
)"
guest="$cache/guest-$release-$key"
if [ "$force" = 0 ] && [ -s "$guest/vmlinuz" ] && [ -s "$guest/initramfs.img" ] && [ -s "$guest/manifest" ]; then
  say "guest is up to date: $guest"
  echo "$guest"
  exit 0
fi

say "building the guest for kernel $release in $guest"
work="$(mktemp -d "$cache/.build.XXXXXX")"
trap 'rm -rf "$work"' EXIT
kroot="$work/kernel"
mkdir -p "$kroot"
# Only the kernel image and the module tree's metadata and .ko files are needed.
say "unpacking $(basename "$deb")"
dpkg-deb -x "$deb" "$kroot"
moddir="$kroot/lib/modules/$release"
[ -f "$kroot/boot/vmlinuz-$release" ] || die "no vmlinuz-$release in the package"
[ -d "$moddir" ] || die "no lib/modules/$release in the package"

root="$work/initramfs"
mkdir -p "$root"/{bin,sbin,etc,proc,sys,dev,tmp,mnt,run,lib/modules,usr/bin,usr/sbin,root}

# --- modules ----------------------------------------------------------------------------------
# Wanted, by module name. crc32c_generic: ext4's metadata checksums ask the crypto API for
# "crc32c" (a softdep, not a symbol dependency), and the initramfs has no modprobe to load it on
# demand.
wanted=(nbd virtio_pci virtio_net crc32c_generic ext4 virtio_blk dm_mod 9p 9pnet_virtio)
builtin_list="$moddir/modules.builtin"

declare -A module_path=()
while IFS= read -r f; do
  b="${f##*/}"
  b="${b%%.ko*}"
  module_path[${b//-/_}]="$f"
done < <(find "$moddir/kernel" \( -name '*.ko' -o -name '*.ko.xz' -o -name '*.ko.zst' -o -name '*.ko.gz' \) -print)
declare -A builtin=()
if [ -f "$builtin_list" ]; then
  while IFS= read -r f; do
    b="${f##*/}"
    b="${b%.ko}"
    builtin[${b//-/_}]=1
  done <"$builtin_list"
fi

# Writes module $1 decompressed to $root/lib/modules/NAME.ko and prints NAME.
extract_module() {
  local src="$1" base out
  base="$(basename "$src")"
  base="${base%%.ko*}"
  out="$root/lib/modules/$base.ko"
  case "$src" in
    *.ko.xz) xz -dc "$src" >"$out" || die "xz failed on $src (install xz-utils)" ;;
    *.ko.zst) zstd -qdc "$src" >"$out" || die "zstd failed on $src (install zstd)" ;;
    *.ko.gz) gzip -dc "$src" >"$out" ;;
    *) cp "$src" "$out" ;;
  esac
  echo "$base"
}

# The "depends=" field of a module's .modinfo section (NUL-separated key=value strings).
module_deps() {
  tr '\0' '\n' <"$1" | sed -n 's/^depends=//p' | sed -n 1p | tr ',' ' '
}

declare -A seen=()
order=()
# Depth-first: dependencies first, so that insmod in this order always finds its symbols.
add_module() {
  local n="${1//-/_}" f name d
  [ -n "${seen[$n]:-}" ] && return 0
  seen[$n]=1
  if [ -n "${builtin[$n]:-}" ]; then
    say "  module $n: built into the kernel"
    return 0
  fi
  f="${module_path[$n]:-}"
  [ -n "$f" ] || die "module $n is neither built in nor in the package"
  name="$(extract_module "$f")"
  for d in $(module_deps "$root/lib/modules/$name.ko"); do
    add_module "$d"
  done
  say "  module $name: ${f#"$moddir"/}"
  order+=("$name")
}
say "collecting modules: ${wanted[*]}"
for m in "${wanted[@]}"; do add_module "$m"; done
printf '%s\n' "${order[@]}" >"$root/etc/modules.order"

# --- binaries and their libraries ---------------------------------------------------------------
copy_file() { # copy_file SRC [DEST-IN-ROOT]: keeps the path, follows symlinks
  local src="$1" dest="${2:-$1}"
  mkdir -p "$root$(dirname "$dest")"
  cp -L "$src" "$root$dest"
}
copy_with_libs() {
  local bin="$1" dest="$2" lib
  copy_file "$bin" "$dest"
  # "libx.so => /lib/.../libx.so (0x...)" and the loader line "/lib64/ld-linux-x86-64.so.2 (0x...)".
  for lib in $(ldd "$bin" | sed -n 's/.*=> \(\/[^ ]*\) .*/\1/p; s/^[[:space:]]*\(\/[^ ]*\) (0x.*/\1/p'); do
    [ -e "$root$lib" ] || copy_file "$lib"
  done
}
say "copying busybox ($busybox), nbd-client ($nbd_client), mke2fs, e2fsck and their libraries"
copy_file "$busybox" /bin/busybox
copy_with_libs "$nbd_client" /sbin/nbd-client
copy_with_libs "$mke2fs" /sbin/mke2fs
copy_with_libs "$e2fsck" /sbin/e2fsck
ln -s mke2fs "$root/sbin/mkfs.ext4"
ln -s e2fsck "$root/sbin/fsck.ext4"
[ -f /etc/mke2fs.conf ] && copy_file /etc/mke2fs.conf
# Busybox applets as symlinks, except where a real program is there already (mke2fs, e2fsck...).
for applet in $("$busybox" --list); do
  case "$applet" in busybox | linuxrc | init) continue ;; esac
  [ -e "$root/sbin/$applet" ] || [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
done
ln -sf /proc/mounts "$root/etc/mtab"
echo 'root:x:0:0:root:/root:/bin/sh' >"$root/etc/passwd"
echo 'root:x:0:' >"$root/etc/group"

install -m 0755 "$here/guest-init.sh" "$root/init"

# --- pack ---------------------------------------------------------------------------------------
mkdir -p "$work/out"
cp "$kroot/boot/vmlinuz-$release" "$work/out/vmlinuz"
(cd "$root" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet -R 0:0) | gzip -1 >"$work/out/initramfs.img"
{
  echo "kernel-package: $(basename "$deb")"
  echo "kernel-release: $release"
  echo "modules: ${order[*]}"
  echo "key: $key"
  binver nbd-client e2fsprogs busybox-static | sed 's/^/host-binary: /'
  echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
} >"$work/out/manifest"

# Replace atomically; older guests go (their inputs changed).
rm -rf "$guest"
mv "$work/out" "$guest"
for old in "$cache"/guest-*; do
  [ "$old" = "$guest" ] || { say "removing the older guest $old"; rm -rf "$old"; }
done
say "guest ready: $guest ($(du -h "$guest/initramfs.img" | cut -f1) initramfs, modules: ${order[*]})"
echo "$guest"
