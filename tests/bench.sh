#!/usr/bin/env bash
# Benchmark: the same fio jobs on a local directory and on Shoal ext4 volumes, in one run,
# printed side by side with the ratio to the local directory.
#
#   sudo bash tests/bench.sh            # full run (about 6 minutes)
#   SEQ_RUNTIME=10 RAND_RUNTIME=5 sudo bash tests/bench.sh   # quick look
#
# Targets: `local` (a directory on the same disk as the pools), `shoal-r1` (repl 1, attached
# on the node that holds the replica), `shoal-r1-remote` (repl 1, attached on a node with no
# replica: every I/O crosses gRPC). Jobs follow ../shared/bench/peers/fio-suite.sh: psync,
# one job, 512 MiB file; seq 1 MiB write (fsync at end) and cold read, 4 KiB random write
# (fsync at end) and cold read, 4 KiB random write with fdatasync after each.
set -euo pipefail
cd "$(dirname "$0")/.."
B=${BENCH_DIR:-/var/tmp/shoal-bench}
SEQ_SIZE=${SEQ_SIZE:-512M}
SEQ_RUNTIME=${SEQ_RUNTIME:-30}
RAND_RUNTIME=${RAND_RUNTIME:-20}
DSYNC_RUNTIME=${DSYNC_RUNTIME:-10}
SHOAL=$PWD/target/release/shoal
log() { echo "[$(date +%H:%M:%S)] $*" >&2; }

cleanup() {
  pkill -TERM -f "shoal node start --cluster-id bench" 2>/dev/null || true
  sleep 1
  pkill -KILL -f "shoal node start --cluster-id bench" 2>/dev/null || true
  [ -f "$B/etcd.pid" ] && kill "$(cat "$B/etcd.pid")" 2>/dev/null || true
  grep -o " $B[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
  for l in /sys/block/loop*/loop/backing_file; do
    if grep -q "^$B" "$l" 2>/dev/null; then
      d=$(basename "$(dirname "$(dirname "$l")")"); losetup -d "/dev/$d" || true
    fi
  done
}
trap cleanup EXIT

bash tests/setup.sh >/dev/null
log "building (release)"
cargo build --release -p shoal 2>&1 | tail -1 >&2
cleanup; rm -rf "$B"; mkdir -p "$B/local" "$B/out"

log "starting etcd and two nodes"
etcd --data-dir "$B/etcd" --listen-client-urls http://127.0.0.1:23990 \
  --advertise-client-urls http://127.0.0.1:23990 --listen-peer-urls http://127.0.0.1:23991 \
  --initial-advertise-peer-urls http://127.0.0.1:23991 \
  --initial-cluster default=http://127.0.0.1:23991 >"$B/etcd.log" 2>&1 &
echo $! >"$B/etcd.pid"
for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/23990) 2>/dev/null && break; sleep 0.2; done
for i in 2 3; do
  "$SHOAL" node start --cluster-id bench --data-dir "$B/node$i" --listen 127.0.9.$i:9710 \
    --gossip 127.0.9.$i:9711 --kvdb http://127.0.0.1:23990 >"$B/node$i.log" 2>&1 &
done
export SHOAL_ENDPOINT=127.0.9.2:9710
for _ in $(seq 100); do
  [ "$("$SHOAL" status --json 2>/dev/null | grep -c '"online"')" = 2 ] && break; sleep 0.2
done
n2=$(cat "$B/node2/node-id")
"$SHOAL" volume create b-r1 --size 8G --fs ext4 --nodes "$n2" >/dev/null
"$SHOAL" volume create b-remote --size 8G --fs ext4 --nodes "$n2" >/dev/null
"$SHOAL" volume mount b-r1 "$B/shoal-r1" >/dev/null
SHOAL_ENDPOINT=127.0.9.3:9710 "$SHOAL" volume mount b-remote "$B/shoal-r1-remote" >/dev/null

drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; sleep 1; }
# fio NAME DIR ARGS... -> prints MiB/s (bw jobs) or IOPS
run_job() {
  local name=$1 dir=$2; shift 2
  fio --name="$name" --filename="$dir/fio-bench.dat" --size="$SEQ_SIZE" --ioengine=psync \
    --iodepth=1 --numjobs=1 --output-format=json "$@" >"$B/out/$name-$(basename "$dir").json"
}
metric() { # FILE rw field
  python3 -c "import json,sys; j=json.load(open('$1'))['jobs'][0]['$2']; print(round(j['bw']/1024,1) if '$3'=='bw' else round(j['iops']))"
}

targets=(local shoal-r1 shoal-r1-remote)
declare -A R
for t in "${targets[@]}"; do
  d="$B/$t"
  log "target $t: seqwrite";  rm -f "$d/fio-bench.dat"
  run_job seqwrite "$d" --rw=write --bs=1M --end_fsync=1 --runtime="$SEQ_RUNTIME"
  drop_caches; log "target $t: seqread"
  run_job seqread "$d" --rw=read --bs=1M --runtime="$SEQ_RUNTIME"
  drop_caches; log "target $t: randwrite"
  run_job randwrite "$d" --rw=randwrite --bs=4k --end_fsync=1 --runtime="$RAND_RUNTIME" --time_based
  drop_caches; log "target $t: randread"
  run_job randread "$d" --rw=randread --bs=4k --runtime="$RAND_RUNTIME" --time_based
  log "target $t: randwrite-dsync"
  run_job randwrite-dsync "$d" --rw=randwrite --bs=4k --fdatasync=1 --runtime="$DSYNC_RUNTIME" --time_based
  rm -f "$d/fio-bench.dat"
  R[$t,seqwrite]=$(metric "$B/out/seqwrite-$t.json" write bw)
  R[$t,seqread]=$(metric "$B/out/seqread-$t.json" read bw)
  R[$t,randwrite]=$(metric "$B/out/randwrite-$t.json" write iops)
  R[$t,randread]=$(metric "$B/out/randread-$t.json" read iops)
  R[$t,randwrite-dsync]=$(metric "$B/out/randwrite-dsync-$t.json" write iops)
done

ratio() { python3 -c "a,b=float('$1'),float('$2'); print(f'{100*a/b:.0f} %' if b else '-')"; }
echo
echo "| workload | local dir | shoal r1 | % of local | shoal r1 remote | % of local |"
echo "|---|---|---|---|---|---|"
for j in seqwrite seqread randwrite randread randwrite-dsync; do
  case $j in
    seqwrite) label="seq write 1 MiB, fsync at end (MiB/s)";;
    seqread) label="seq read 1 MiB, cold (MiB/s)";;
    randwrite) label="rand write 4 KiB, fsync at end (IOPS)";;
    randread) label="rand read 4 KiB, cold (IOPS)";;
    randwrite-dsync) label="rand write 4 KiB + fdatasync each (IOPS)";;
  esac
  l=${R[local,$j]}; a=${R[shoal-r1,$j]}; r=${R[shoal-r1-remote,$j]}
  echo "| $label | $l | $a | $(ratio "$a" "$l") | $r | $(ratio "$r" "$l") |"
done
