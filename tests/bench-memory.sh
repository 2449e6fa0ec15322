#!/usr/bin/env bash
# Memory of the nodes serving a shared volume after a `find` over many files: etcd and
# two nodes on 127.0.10.2-3; a shared volume coordinated by node 2 (mount A), mounted on
# node 3 as well (mount B). Creates FILES files through A (in directories of 1 000),
# then runs `find -ls` (a lookup and getattr of every file) on B and on A, and prints
# each node's resident memory (VmRSS) and peak (VmHWM) after each step.
#
#   sudo FILES=1000000 bash tests/bench-memory.sh          # the issue's million files
#   sudo FILES=100000 LEASE_LIMIT=100000 bash tests/bench-memory.sh
set -euo pipefail
cd "$(dirname "$0")/.."
B=${BENCH_DIR:-/var/tmp/shoal-bench-memory}
FILES=${FILES:-100000}
LEASE_LIMIT=${LEASE_LIMIT:-100000}
# SHOAL_BIN: an already-built binary to measure (another commit's, say); else a release build.
SHOAL=${SHOAL_BIN:-$PWD/target/release/shoal}
log() { echo "[$(date +%H:%M:%S)] $*" >&2; }

source tests/cluster-lib.sh
cleanup() { stop_cluster bench-memory "$B"; }
trap cleanup EXIT

bash tests/setup.sh >/dev/null
log "building (release)"
[ -n "${SHOAL_BIN:-}" ] || cargo build --release -p shoal 2>&1 | tail -1 >&2
cleanup; rm -rf "$B"; mkdir -p "$B"

etcd --data-dir "$B/etcd" --listen-client-urls http://127.0.0.1:24090 \
  --advertise-client-urls http://127.0.0.1:24090 --listen-peer-urls http://127.0.0.1:24091 \
  --initial-advertise-peer-urls http://127.0.0.1:24091 \
  --initial-cluster default=http://127.0.0.1:24091 >"$B/etcd.log" 2>&1 &
echo $! >"$B/etcd.pid"
for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/24090) 2>/dev/null && break; sleep 0.2; done
(umask 077; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$B/secret")
for i in 2 3; do
  setsid "$SHOAL" node start --cluster-id bench-memory --secret-file "$B/secret" \
    --data-dir "$B/node$i" --listen 127.0.10.$i:9710 --gossip 127.0.10.$i:9711 \
    --kvdb http://127.0.0.1:24090 --docker-socket "" --lease-limit "$LEASE_LIMIT" \
    >>"$B/node$i.log" 2>&1 &
  echo $! >"$B/node$i.pid"
done
export SHOAL_ENDPOINT=127.0.10.2:9710
export SHOAL_CREDENTIALS="$B/node2/admin.pem"  # written by the node at start
online() { "$SHOAL" status --json 2>/dev/null | grep -c '"online"' || true; }
for _ in $(seq 100); do [ "$(online)" = 2 ] && break; sleep 0.2; done
"$SHOAL" volume create mem --size 20G --repl 2 --shared >/dev/null
"$SHOAL" volume mount mem "$B/mnt-a" >/dev/null
SHOAL_ENDPOINT=127.0.10.3:9710 "$SHOAL" volume mount mem "$B/mnt-b" >/dev/null

mem() {
  local i kb
  for i in 2 3; do
    kb=$(awk '/VmRSS/{r=$2} /VmHWM/{h=$2} END{printf "%d MiB (peak %d MiB)", r/1024, h/1024}' \
      "/proc/$(cat "$B/node$i.pid")/status")
    printf '| %s | node %s | %s |\n' "$1" "$i" "$kb"
  done
}
echo "| step | node | resident (peak) |"
echo "|---|---|---|"
mem "mounted, empty"
log "creating $FILES files through mount A"
start=$(date +%s)
python3 - "$B/mnt-a" "$FILES" <<'EOF'
import os, sys
root, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    d = os.path.join(root, "d%d" % (i // 1000))
    if i % 1000 == 0:
        os.mkdir(d)
    os.close(os.open(os.path.join(d, "f%d" % i), os.O_CREAT | os.O_WRONLY, 0o644))
EOF
log "created in $(( $(date +%s) - start )) s"
mem "after creating $FILES files"
log "find -ls on mount B (node 3)"
start=$(date +%s)
n=$(find "$B/mnt-b" -ls | wc -l)
log "find listed $n entries in $(( $(date +%s) - start )) s"
mem "after find on B"
log "find -ls on mount A (node 2, the coordinator)"
find "$B/mnt-a" -ls | wc -l >/dev/null
mem "after find on A too"
"$SHOAL" volume inspect mem --json | python3 -c '
import json, sys
v = json.load(sys.stdin)
for s in v["sessions"]:
    print("| leases held | %s | %d |" % (s["mountpoint"], s["leases"]))'
