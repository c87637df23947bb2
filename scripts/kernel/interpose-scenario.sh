#!/bin/bash
# The interpose scenario of the kernel test (test/kernel/interpose.test.ts). The guest's /init
# runs it with the host's bash in the host's root file system (shared read-only over 9p, with
# the guest's /proc, /sys, /dev and /run mounted into it), so it runs the host's
# node, devfilter (this repository's dist/), dmsetup, nbd-client and e2fsprogs on the guest's
# kernel, where device-mapper and nbd exist. /dev/vda is a scratch disk of at least 128 MiB.
#
#   interpose-scenario.sh normal   attach with stats and snapshot filters under a mounted ext4
#                                  with a writer and a reader at work, snapshot, detach, check
#   interpose-scenario.sh fail     the same volume, but attach fails between suspend and resume
#                                  (DEVFILTER_INTERPOSE_FAIL=after-suspend): the original table
#                                  must be back and the file system must not notice
#
# Prints DEVFILTER-TEST lines like /init does (PASS/FAIL/INFO/MD5); /init prints DONE.
set -u
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# Scratch space and the volume's mount point live on the guest's tmpfs at /run: the host's
# /tmp and /mnt are left as they are (the repository may well be under /tmp).
S=/run/scratch
MNT=/run/mnt
mkdir -p "$S" "$MNT"
export HOME=$S TMPDIR=$S
# No udev in the guest: libdevmapper creates /dev/mapper nodes itself.
export DM_DISABLE_UDEV=1
MODE=${1:-normal}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
df() { node "$REPO/dist/src/cli/main.js" "$@"; }
STATE=/run/devfilter/interpose/vol
CTL=$STATE/control.sock

mark() { echo "DEVFILTER-TEST: $*"; }
now() { cut -d' ' -f1 /proc/uptime; }
step() {
  local name=$1 t0 t1 out rc
  shift
  t0=$(now)
  out=$("$@" 2>&1)
  rc=$?
  t1=$(now)
  if [ "$rc" -eq 0 ]; then
    mark "PASS $name $(awk "BEGIN { printf \"%.2f\", $t1 - $t0 }")"
    [ -n "${VERBOSE_STEP:-}" ] && [ -n "$out" ] && echo "$out" | sed 's/^/  | /'
    return 0
  fi
  mark "FAIL $name rc=$rc"
  [ -n "$out" ] && echo "$out" | sed 's/^/  | /'
  cleanup
  exit 1
}
cleanup() {
  echo "--- kernel log (tail) ---"
  dmesg | tail -n 40
  [ -f "$STATE/daemon.log" ] && { echo "--- daemon log (tail) ---"; tail -n 30 "$STATE/daemon.log"; }
  stop_load
  fsfreeze --unfreeze $MNT 2>/dev/null
  umount $MNT 2>/dev/null
}

# Two linear targets, the second at an offset that is no multiple of the first's (4 KiB
# aligned, as interpose requires): the LVM case, and a test that offsets are taken as they are.
TABLE="0 65536 linear 254:0 2048
65536 131072 linear 254:0 100008"
make_volume() {
  local vda
  vda=$(cat /sys/class/block/vda/dev) || return 1
  TABLE=${TABLE//254:0/$vda}
  dmsetup create vol --table "$TABLE" && dmsetup table vol
}

# A writer that keeps adding 64 KiB files (and their md5s, computed from the data before it is
# written, to $S/written), and a reader that keeps reading a file written before and checks
# it. Both count their errors in $S/errors. (Their stdio is /dev/null: step's command
# substitution would otherwise wait for them to end.)
start_load() {
  : >$S/written
  : >$S/errors
  (
    i=0
    while [ ! -e $S/stop ]; do
      i=$((i + 1))
      head -c 65536 /dev/urandom >$S/chunk
      sum=$(md5sum <$S/chunk | cut -d' ' -f1)
      if cp $S/chunk "$MNT/w/$i"; then echo "$sum w/$i" >>$S/written; else echo "write $i" >>$S/errors; fi
      sleep 0.05
    done
  ) </dev/null >/dev/null 2>&1 &
  echo $! >$S/writer.pid
  (
    while [ ! -e $S/stop ]; do
      # O_DIRECT: each read goes to the device (through devfilter while interposed), and no
      # cache dropping hides a stale page anywhere below.
      sum=$(dd if=$MNT/before iflag=direct bs=64k 2>/dev/null | md5sum | cut -d' ' -f1) || echo "read" >>$S/errors
      [ "$sum" = "$(cat $S/before.md5)" ] || echo "read mismatch $sum" >>$S/errors
      sleep 0.1
    done
  ) </dev/null >/dev/null 2>&1 &
  echo $! >$S/reader.pid
}
stop_load() {
  touch $S/stop
  for p in writer reader; do
    [ -e $S/$p.pid ] && wait "$(cat $S/$p.pid)" 2>/dev/null
    rm -f $S/$p.pid
  done
  true
}
prepare() {
  mkfs.ext4 -q -F /dev/mapper/vol &&
    mount -t ext4 /dev/mapper/vol $MNT &&
    mkdir $MNT/w &&
    head -c 4194304 /dev/urandom >$MNT/before &&
    md5sum <$MNT/before | cut -d' ' -f1 >$S/before.md5 &&
    sync
}
no_errors() {
  [ -s $S/errors ] && { cat $S/errors; return 1; }
  echo "$(wc -l <$S/written) files written"
}
same_table() {
  local live
  live=$(dmsetup table vol)
  [ "$live" = "$TABLE" ] || { echo "table is now:"; echo "$live"; return 1; }
}
still_mounted() { grep -q " $MNT ext4 " /proc/mounts; }
# Every file the writer wrote is there with its content, read from the disk (caches dropped).
verify_written() {
  echo 3 >/proc/sys/vm/drop_caches
  local bad=0 n=0
  while read -r sum path; do
    n=$((n + 1))
    [ "$(md5sum <$MNT/"$path" | cut -d' ' -f1)" = "$sum" ] || { echo "bad: $path"; bad=$((bad + 1)); }
  done <$S/written
  echo "$n files checked"
  [ "$bad" -eq 0 ]
}
check_stats() {
  local out
  out=$(df filter status vol stats --control "$CTL" --json) || return 1
  echo "$out" | node -e '
    const s = JSON.parse(require("fs").readFileSync(0, "utf8")).status;
    const ops = s.ops ?? s.operations ?? s;
    const count = (k) => Number((ops[k] ?? {}).count ?? (ops[k] ?? {}).requests ?? 0);
    console.log(`reads ${count("read")} writes ${count("write")} flushes ${count("flush")}`);
    if (!(count("read") > 0 && count("write") > 0)) process.exit(1);
  ' || { echo "$out"; return 1; }
}
snapshot() {
  fsfreeze --freeze $MNT || return 1
  df snapshot create s1 --export vol --control "$CTL"
  local rc=$?
  fsfreeze --unfreeze $MNT
  return $rc
}
fsck_snapshot() {
  nbd-client -u -N vol@s1 "$STATE/nbd.sock" /dev/nbd1 -R -b 512 || return 1
  local i=0
  while [ "$(cat /sys/block/nbd1/size)" = 0 ]; do
    i=$((i + 1))
    [ "$i" -gt 200 ] && { echo "nbd1 has no size"; return 1; }
    sleep 0.1
  done
  e2fsck -fn /dev/nbd1
  local rc=$?
  nbd-client -d /dev/nbd1
  return $rc
}
attach_must_fail() {
  local out rc
  out=$(DEVFILTER_INTERPOSE_FAIL=after-suspend df interpose attach /dev/mapper/vol --filter stats 2>&1)
  rc=$?
  echo "$out"
  [ "$rc" -ne 0 ] || { echo "attach succeeded despite the injected failure"; return 1; }
  echo "$out" | grep -q 'original table of vol is back' || return 1
  [ ! -e "$STATE" ] || { echo "state left behind"; return 1; }
  [ ! -e /sys/block/nbd0/pid ] || { echo "nbd0 still attached"; return 1; }
}

mark "INFO node $(node --version)"
step volume make_volume
step prepare prepare
step load start_load
sleep 1
if [ "$MODE" = fail ]; then
  VERBOSE_STEP=1 step attach-fails attach_must_fail
  sleep 1
  step table-restored same_table
  step still-mounted still_mounted
else
  mkdir -p $S/snap
  VERBOSE_STEP=1 step attach df interpose attach /dev/mapper/vol --filter stats --filter snapshot:store=$S/snap
  sleep 2
  VERBOSE_STEP=1 step snapshot snapshot
  VERBOSE_STEP=1 step fsck-snapshot fsck_snapshot
  sleep 1
  VERBOSE_STEP=1 step stats check_stats
  VERBOSE_STEP=1 step detach df interpose detach /dev/mapper/vol
  step table-restored same_table
  step still-mounted still_mounted
  sleep 1
fi
step stop-load stop_load
VERBOSE_STEP=1 step no-errors no_errors
VERBOSE_STEP=1 step verify verify_written
step umount umount $MNT
VERBOSE_STEP=1 step fsck e2fsck -fn /dev/mapper/vol
step remove-volume dmsetup remove vol
exit 0
