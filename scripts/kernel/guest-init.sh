#!/bin/sh
# /init of the kernel-client test guest (built into the initramfs by build-guest.sh).
#
# Runs one scenario against devfilter through the guest kernel's own NBD driver (/dev/nbd0) and
# reports on the serial console, one marker line per step, which the host test parses:
#
#   DEVFILTER-TEST: BEGIN <scenario> ...
#   DEVFILTER-TEST: PASS <step> <seconds>
#   DEVFILTER-TEST: FAIL <step> rc=<n>         (followed by the step's output, then cleanup)
#   DEVFILTER-TEST: MD5 <md5> <path>           (what was written, for the host to compare)
#   DEVFILTER-TEST: INFO <key> <value>
#   DEVFILTER-TEST: DONE pass|fail
#
# then powers off. Parameters come from the kernel command line:
#   devfilter.export=NAME        export to connect (default: disk)
#   devfilter.ports=P1,P2        ports at 10.0.2.100 (QEMU guestfwd rules to devfilter): P1 for
#                                the first attach, P2 for the later ones; the same port twice
#                                where a rule takes any number of connections (the node bridge)
#                                (default: 10809,10810)
#   devfilter.bs=N               nbd-client block size, 512..4096 (default: 512)
#   devfilter.conns=N            connections per attach (nbd-client -C N; needs the export to
#                                advertise multi-conn) (default: 1)
#   devfilter.scenario=NAME      ext4 (default), snapshot or interpose (see scenario_* below)
#   devfilter.repo=PATH          interpose: the repository's path on the host, whose root file
#                                system QEMU shares read-only (9p tag hostroot)
#   devfilter.args=A,B,...       interpose: arguments for scripts/kernel/interpose-scenario.sh
#   devfilter.hook=PORT          port of the host hook (host-hook.mjs), for the snapshot scenario
#                                (default: 10900)
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run

SERVER=10.0.2.100
EXPORT=disk
PORTS=10809,10810
BS=512
CONNS=1
HOOK_PORT=10900
SCENARIO=ext4
REPO=
SCENARIO_ARGS=
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    devfilter.export=*) EXPORT=${arg#*=} ;;
    devfilter.ports=*) PORTS=${arg#*=} ;;
    devfilter.bs=*) BS=${arg#*=} ;;
    devfilter.conns=*) CONNS=${arg#*=} ;;
    devfilter.scenario=*) SCENARIO=${arg#*=} ;;
    devfilter.hook=*) HOOK_PORT=${arg#*=} ;;
    devfilter.repo=*) REPO=${arg#*=} ;;
    devfilter.args=*) SCENARIO_ARGS=$(echo "${arg#*=}" | tr ',' ' ') ;;
  esac
done
PORT1=${PORTS%%,*}
PORT2=${PORTS#*,}
PORT2=${PORT2%%,*}

mark() { echo "DEVFILTER-TEST: $*"; }
now() { cut -d' ' -f1 /proc/uptime; }

finish() {
  mark "INFO uptime $(now)"
  mark "DONE $1"
  sync
  poweroff -f
  # Should poweroff fail, init exiting panics the kernel; with panic=-1 and QEMU's -no-reboot
  # that ends QEMU as well.
  exit 1
}

# step NAME COMMAND...: runs COMMAND, prints PASS or FAIL with its output, and stops the scenario
# (after cleanup) on failure.
step() {
  name=$1
  shift
  t0=$(now)
  out=$("$@" 2>&1)
  rc=$?
  t1=$(now)
  if [ "$rc" -eq 0 ]; then
    mark "PASS $name $(awk "BEGIN { printf \"%.2f\", $t1 - $t0 }")"
    [ -n "$VERBOSE_STEP" ] && [ -n "$out" ] && echo "$out" | sed 's/^/  | /'
    return 0
  fi
  mark "FAIL $name rc=$rc"
  [ -n "$out" ] && echo "$out" | sed 's/^/  | /'
  fail_cleanup
}

fail_cleanup() {
  echo "--- kernel log (tail) ---"
  dmesg | tail -n 60
  [ -e /tmp/writer.pid ] && kill "$(cat /tmp/writer.pid)" 2>/dev/null
  fsfreeze --unfreeze /mnt 2>/dev/null
  umount /mnt 2>/dev/null
  nbd-client -d /dev/nbd1 >/dev/null 2>&1
  nbd-client -d /dev/nbd0 >/dev/null 2>&1
  finish fail
}

load_modules() {
  while read -r m; do
    insmod "/lib/modules/$m.ko" || return 1
  done </etc/modules.order
}

network() {
  i=0
  while [ ! -e /sys/class/net/eth0 ]; do
    i=$((i + 1))
    [ "$i" -gt 100 ] && { echo "no eth0 after 10 s"; ls /sys/class/net; return 1; }
    sleep 0.1
  done
  ip link set lo up &&
    ip addr add 10.0.2.15/24 dev eth0 &&
    ip link set eth0 up
}

# attach DEV PORT EXPORT [nbd-client options...]: attaches DEV (nbd0, nbd1...) to EXPORT and
# waits until the kernel sees its size.
attach() {
  dev=$1 port=$2 name=$3
  shift 3
  if [ "$CONNS" -gt 1 ]; then set -- -C "$CONNS" "$@"; fi
  # (timeout: nbd-client waits for the server's greeting for ever)
  timeout 60 nbd-client "$SERVER" "$port" "/dev/$dev" -N "$name" -b "$BS" -t 60 "$@" || return 1
  i=0
  while [ "$(cat "/sys/block/$dev/size" 2>/dev/null || echo 0)" = 0 ]; do
    i=$((i + 1))
    [ "$i" -gt 100 ] && { echo "/dev/$dev still has size 0 after 10 s"; return 1; }
    sleep 0.1
  done
  echo "$dev: $(cat "/sys/block/$dev/size") sectors"
}
connect() { attach nbd0 "$1" "$EXPORT"; }

# detach [DEV]: disconnects DEV (default nbd0) and waits until the kernel has let go.
detach() {
  dev=${1:-nbd0}
  nbd-client -d "/dev/$dev" || return 1
  i=0
  while [ -e "/sys/block/$dev/pid" ]; do
    i=$((i + 1))
    [ "$i" -gt 100 ] && { echo "/dev/$dev still connected 10 s after nbd-client -d"; return 1; }
    sleep 0.1
  done
}
disconnect() { detach nbd0; }

# Raw device I/O with O_DIRECT before there is a filesystem: one 16 MiB request (the queue
# limit raised so that the kernel does not split it), four writers at once (requests in flight
# together on the one socket), and a few blocks at an offset that is not a multiple of 4 KiB
# when the block size is 512. Each region is read back (O_DIRECT again) and compared.
region_sum() { # region_sum FILE BS COUNT SKIP [iflag]
  dd if="$1" bs="$2" count="$3" skip="$4" ${5:+iflag=$5} 2>/dev/null | md5sum | cut -d' ' -f1
}
raw_io() {
  echo 16384 >/sys/block/nbd0/queue/max_sectors_kb || return 1
  echo "max_sectors_kb $(cat /sys/block/nbd0/queue/max_sectors_kb) (max_hw_sectors_kb $(cat /sys/block/nbd0/queue/max_hw_sectors_kb))"
  dd if=/dev/urandom of=/tmp/raw bs=1M count=16 2>/dev/null || return 1
  dd if=/tmp/raw of=/dev/nbd0 bs=16M count=1 seek=1 oflag=direct 2>/dev/null || return 1
  for i in 0 1 2 3; do
    dd if=/tmp/raw of=/dev/nbd0 bs=64k count=16 skip=$((i * 16)) seek=$((512 + i * 16)) oflag=direct 2>/dev/null &
  done
  wait || return 1
  dd if=/tmp/raw of=/dev/nbd0 bs="$BS" count=3 seek=7 oflag=direct conv=notrunc 2>/dev/null || return 1
  [ "$(region_sum /tmp/raw 16M 1 0)" = "$(region_sum /dev/nbd0 16M 1 1 direct)" ] || { echo "16 MiB region differs"; return 1; }
  [ "$(region_sum /tmp/raw 64k 64 0)" = "$(region_sum /dev/nbd0 64k 64 512 direct)" ] || { echo "parallel region differs"; return 1; }
  [ "$(region_sum /tmp/raw "$BS" 3 0)" = "$(region_sum /dev/nbd0 "$BS" 3 7 direct)" ] || { echo "small region differs"; return 1; }
  rm /tmp/raw
}

# The files: sizes chosen to cover whole blocks, a partial last block, a multi-extent file and
# many small files (inline in inode tables, directory blocks).
write_files() {
  dd if=/dev/urandom of=/mnt/big bs=1M count=8 2>/dev/null &&
    dd if=/dev/urandom of=/mnt/odd bs=1000 count=777 2>/dev/null &&
    dd if=/dev/urandom of=/mnt/synced bs=64k count=16 conv=fsync 2>/dev/null &&
    mkdir /mnt/dir &&
    for i in $(seq 1 64); do
      dd if=/dev/urandom of=/mnt/dir/f$i bs=$((i * 97)) count=1 2>/dev/null || return 1
    done &&
    dd if=/dev/urandom of=/mnt/junk bs=1M count=4 2>/dev/null &&
    sync &&
    rm /mnt/junk
}

checksums() { (cd /mnt && md5sum big odd synced dir/*) >/tmp/md5sums; }
print_checksums() {
  while read -r sum path; do mark "MD5 $sum /$path"; done </tmp/md5sums
}

verify() { (cd /mnt && md5sum -c -s /tmp/md5sums); }

drop_caches() {
  sync
  echo 3 >/proc/sys/vm/drop_caches
  blockdev --flushbufs /dev/nbd0 2>/dev/null
  return 0
}

# Kernel messages that mean the block layer or ext4 saw an error.
kernel_log_clean() {
  bad=$(dmesg | grep -E 'I/O error|nbd[0-9]+: (Other side returned error|Unexpected reply|Receive control failed|Dead connection|Connection timed out)|EXT4-fs error|EXT4-fs warning|Buffer I/O error|blk_update_request')
  [ -z "$bad" ] && return 0
  echo "$bad"
  return 1
}

# hook ARGS...: runs `devfilter ARGS --control SOCKET` on the host (scripts/kernel/host-hook.mjs
# behind a guestfwd rule) and prints its output; fails unless it exited 0.
hook() {
  reply=$(echo "$*" | timeout 60 nc "$SERVER" "$HOOK_PORT")
  echo "$reply"
  echo "$reply" | grep -qx 'HOOK rc=0'
}

# A writer that keeps creating files under /mnt/live until /tmp/stop exists: the snapshots are
# taken while its writes are in flight.
# (step runs commands in a subshell, so the writer is no child of the shell that stops it: it
# reports through files.)
start_writer() {
  mkdir -p /mnt/live || return 1
  (
    i=0
    while [ ! -e /tmp/stop ]; do
      dd if=/dev/urandom of=/mnt/live/f$i bs=64k count=4 2>/dev/null || { echo "fail $i" >/tmp/writer.done; exit 1; }
      i=$((i + 1))
    done
    echo "ok $i" >/tmp/writer.done
  ) </dev/null >/dev/null 2>&1 &
  echo $! >/tmp/writer.pid
  sleep 1
  [ -n "$(ls /mnt/live)" ] || { echo "the writer wrote nothing in 1 s"; return 1; }
}
stop_writer() {
  touch /tmp/stop
  i=0
  while [ ! -s /tmp/writer.done ]; do
    i=$((i + 1))
    [ "$i" -gt 300 ] && { echo "the writer did not stop within 30 s"; return 1; }
    sleep 0.1
  done
  rm -f /tmp/writer.pid
  set -- $(cat /tmp/writer.done)
  echo "the writer created $2 files"
  [ "$1" = ok ]
}

scenario_ext4() {
  VERBOSE_STEP=1 step connect connect "$PORT1"
  VERBOSE_STEP=1 step raw-io raw_io
  step mkfs mkfs.ext4 -F -q /dev/nbd0
  step mount mount -t ext4 /dev/nbd0 /mnt
  step write write_files
  step checksums checksums
  print_checksums
  # fstrim sends TRIMs for the free space (the freed junk file among it), if the export takes them.
  VERBOSE_STEP=1 step fstrim fstrim -v /mnt
  step umount umount /mnt
  step disconnect disconnect
  # A fresh connection and no caches: what is read back now came from devfilter.
  step drop-caches drop_caches
  VERBOSE_STEP=1 step reconnect connect "$PORT2"
  step mount-again mount -t ext4 -o ro /dev/nbd0 /mnt
  step verify verify
  step umount-again umount /mnt
  VERBOSE_STEP=1 step fsck e2fsck -fn /dev/nbd0
  step disconnect-again disconnect
}

# Snapshots of the export taken through the host's control socket while ext4 is being written:
# "frozen" with the filesystem frozen (fsfreeze: the image must fsck clean as it is), "live"
# in the middle of the writes (crash-consistent: the host replays its journal, then fscks it).
# The guest checks "frozen" itself by attaching EXPORT@frozen read-only as /dev/nbd1.
scenario_snapshot() {
  VERBOSE_STEP=1 step connect connect "$PORT1"
  step mkfs mkfs.ext4 -F -q /dev/nbd0
  step mount mount -t ext4 /dev/nbd0 /mnt
  step write write_files
  step checksums checksums
  print_checksums
  step sync sync
  step start-writer start_writer
  step freeze fsfreeze --freeze /mnt
  VERBOSE_STEP=1 step snapshot-frozen hook filter control "$EXPORT" snapshot take name=frozen
  step thaw fsfreeze --unfreeze /mnt
  sleep 1
  VERBOSE_STEP=1 step snapshot-live hook filter control "$EXPORT" snapshot take name=live
  sleep 1
  VERBOSE_STEP=1 step stop-writer stop_writer
  step umount umount /mnt
  VERBOSE_STEP=1 step fsck e2fsck -fn /dev/nbd0
  # The snapshots are served read-only as EXPORT@NAME, once the daemon publishes such images:
  # does the NBD server list it (NBD_OPT_LIST)?
  timeout 60 nbd-client -l "$SERVER" "$PORT2" >/tmp/exports 2>&1
  sed 's/^/  | /' /tmp/exports
  if grep -q "^$EXPORT@frozen\(:\|\$\)" /tmp/exports; then
    mark "INFO snapshot-images published"
    VERBOSE_STEP=1 step attach-frozen attach nbd1 "$PORT2" "$EXPORT@frozen" -R
    VERBOSE_STEP=1 step fsck-frozen e2fsck -fn /dev/nbd1
    step mount-frozen mount -t ext4 -o ro /dev/nbd1 /mnt
    step verify-frozen verify
    step umount-frozen umount /mnt
    step detach-frozen detach nbd1
  else
    mark "INFO snapshot-images unpublished"
  fi
  step disconnect disconnect
}

# The host's root file system, read-only over 9p, with this guest's kernel interfaces mounted
# into it: the interpose scenario runs the host's own programs (node, devfilter, dmsetup,
# nbd-client, e2fsprogs) on the guest's kernel, where device-mapper and nbd exist.
host_root() {
  mkdir -p /host &&
    mount -t 9p -o ro,trans=virtio,version=9p2000.L,msize=512000,cache=loose hostroot /host &&
    mount -t proc proc /host/proc &&
    mount -t sysfs sysfs /host/sys &&
    mount -t devtmpfs devtmpfs /host/dev &&
    mount -t tmpfs tmpfs /host/run
}

# interpose: everything happens in scripts/kernel/interpose-scenario.sh, run by the host's bash
# in the host's root: it prints its own DEVFILTER-TEST lines (without DONE).
scenario_interpose() {
  step host-root host_root
  chroot /host /bin/bash "$REPO/scripts/kernel/interpose-scenario.sh" $SCENARIO_ARGS ||
    fail_cleanup
}

case "$SCENARIO" in
  ext4 | snapshot | interpose) ;;
  *)
    mark "FAIL scenario unknown: $SCENARIO"
    finish fail
    ;;
esac

mark "BEGIN $SCENARIO export=$EXPORT ports=$PORT1,$PORT2 bs=$BS conns=$CONNS kernel=$(uname -r) uptime=$(now)"
step modules load_modules
step network network
"scenario_$SCENARIO"
step kernel-log kernel_log_clean
finish pass
