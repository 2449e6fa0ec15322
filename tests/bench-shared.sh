#!/usr/bin/env bash
# Benchmark of shared volumes beside a local directory and bindfs (FUSE alone), in one run,
# with the peers' workload scripts (../shared/bench/peers): fio (seq 1 MiB write and cold
# read, 4 KiB random write/read, 4 KiB write + fdatasync), metadata (create / stat / unlink
# of META_N files), untar of about 5 000 files, cross-mount visibility (write on mount A,
# poll on mount B) and a two-mount lock counter.
#
#   sudo bash tests/bench-shared.sh                        # full run, about 15 minutes
#   SEQ_RUNTIME=10 RAND_RUNTIME=5 DSYNC_RUNTIME=5 META_N=2000 sudo bash tests/bench-shared.sh
#   PEERS="ext4" sudo bash tests/bench-shared.sh           # skip bindfs
#
# The Shoal target: three nodes on 127.0.8.2-4 with etcd, a shared volume with repl 2 on
# nodes 2 and 3, mounted on node 2 (its coordinator) as A and on node 4 (no replica) as B.
# The table goes to $PEERS_DIR/RESULTS-table.md (default /tmp/peers) and to stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
B=${BENCH_DIR:-/var/tmp/shoal-bench-shared}
PEERS=${PEERS:-ext4 bindfs}
PEERS_SCRIPTS=${PEERS_SCRIPTS:-$(cd .. && pwd)/shared/bench/peers}
# SHOAL_BIN: an already-built binary to measure (another commit's, say); else a release build.
SHOAL=${SHOAL_BIN:-$PWD/target/release/shoal}
export PEERS_DIR=${PEERS_DIR:-/tmp/peers}
log() { echo "[$(date +%H:%M:%S)] $*" >&2; }

[ -x "$PEERS_SCRIPTS/run-all.sh" ] || { echo "no peers scripts at $PEERS_SCRIPTS" >&2; exit 2; }
source tests/cluster-lib.sh
cleanup() { stop_cluster bench-shared "$B"; }
trap cleanup EXIT

bash tests/setup.sh >/dev/null
command -v bindfs >/dev/null || { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bindfs >/dev/null || true; }
log "building (release)"
[ -n "${SHOAL_BIN:-}" ] || cargo build --release -p shoal 2>&1 | tail -1 >&2
cleanup; rm -rf "$B"; mkdir -p "$B"

log "starting etcd and three nodes"
etcd --data-dir "$B/etcd" --listen-client-urls http://127.0.0.1:23890 \
  --advertise-client-urls http://127.0.0.1:23890 --listen-peer-urls http://127.0.0.1:23891 \
  --initial-advertise-peer-urls http://127.0.0.1:23891 \
  --initial-cluster default=http://127.0.0.1:23891 >"$B/etcd.log" 2>&1 &
echo $! >"$B/etcd.pid"
for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/23890) 2>/dev/null && break; sleep 0.2; done
(umask 077; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$B/secret")
for i in 2 3 4; do
  setsid "$SHOAL" node start --cluster-id bench-shared --secret-file "$B/secret" --data-dir "$B/node$i" \
    --listen 127.0.8.$i:9710 --gossip 127.0.8.$i:9711 --kvdb http://127.0.0.1:23890 --docker-socket "" \
    >>"$B/node$i.log" 2>&1 &
  echo $! >"$B/node$i.pid"
done
export SHOAL_ENDPOINT=127.0.8.2:9710
export SHOAL_CREDENTIALS="$B/node2/admin.pem"  # written by the node at start
online() { "$SHOAL" status --json 2>/dev/null | grep -c '"online"' || true; }
for _ in $(seq 100); do [ "$(online)" = 3 ] && break; sleep 0.2; done
n2=$(cat "$B/node2/node-id"); n3=$(cat "$B/node3/node-id")
"$SHOAL" volume create bench --size 8G --repl 2 --shared --nodes "$n2,$n3" >/dev/null
"$SHOAL" volume mount bench "$B/mnt-a" >/dev/null
SHOAL_ENDPOINT=127.0.8.4:9710 "$SHOAL" volume mount bench "$B/mnt-b" >/dev/null

log "running the peers' workloads: $PEERS and shoal-r2"
# shellcheck disable=SC2086
bash "$PEERS_SCRIPTS/run-all.sh" $PEERS "$B/mnt-a,$B/mnt-b" shoal-r2
cat "$PEERS_DIR/RESULTS-table.md"
