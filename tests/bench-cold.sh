#!/usr/bin/env bash
# Worst case for the activity log (blockd/src/activity.rs): 2 GiB written with O_DIRECT
# into the never-written extents of a fresh raw repl-2 volume, three volumes in turn.
# Compare two builds, alternated:  sudo bash tests/bench-cold.sh /path/to/shoal
set -euo pipefail
cd "$(dirname "$0")/.."
SHOAL=${1:?usage: bench-cold.sh SHOAL_BINARY}; B=/var/tmp/shoal-cold
source tests/cluster-lib.sh
stop_cluster bench "$B" 2>/dev/null || true; rm -rf "$B"; mkdir -p "$B"
etcd --data-dir "$B/etcd" --listen-client-urls http://127.0.0.1:23990 \
  --advertise-client-urls http://127.0.0.1:23990 --listen-peer-urls http://127.0.0.1:23991 \
  --initial-advertise-peer-urls http://127.0.0.1:23991 \
  --initial-cluster default=http://127.0.0.1:23991 >"$B/etcd.log" 2>&1 &
echo $! >"$B/etcd.pid"
for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/23990) 2>/dev/null && break; sleep 0.2; done
(umask 077; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$B/secret")
for i in 2 3; do
  setsid "$SHOAL" node start --cluster-id bench --secret-file "$B/secret" --data-dir "$B/node$i" \
    --listen 127.0.9.$i:9710 --gossip 127.0.9.$i:9711 --kvdb http://127.0.0.1:23990 \
    --replica-timeout 2 --docker-socket "" >>"$B/node$i.log" 2>&1 &
  echo $! >"$B/node$i.pid"
done
export SHOAL_ENDPOINT=127.0.9.2:9710 SHOAL_CREDENTIALS="$B/node2/admin.pem"
for _ in $(seq 100); do [ "$("$SHOAL" status --json 2>/dev/null | grep -c '"online"')" = 2 ] && break; sleep 0.2; done
n2=$(cat "$B/node2/node-id"); n3=$(cat "$B/node3/node-id")
for r in 1 2 3; do
  "$SHOAL" volume create cold$r --size 4G --fs none --repl 2 --nodes "$n2,$n3" >/dev/null
  dev=$("$SHOAL" volume attach cold$r --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["device_path"])')
  s=$(date +%s.%N)
  dd if=/dev/zero bs=1M count=2048 2>/dev/null | tr '\0' 'x' | dd of="$dev" bs=1M oflag=direct iflag=fullblock conv=fsync status=none
  e=$(date +%s.%N)
  echo "run $r: 2048 MiB into cold extents: $(echo "2048 / ($e - $s)" | bc -l | cut -c1-6) MiB/s"
  "$SHOAL" volume detach cold$r >/dev/null
done
stop_cluster bench "$B"
