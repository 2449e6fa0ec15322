#!/usr/bin/env bash
# Worst case for the activity log (blockd/src/activity.rs): 2 GiB written with O_DIRECT
# into the never-written extents of a fresh raw repl-2 volume, three volumes in turn.
# Compare two builds, alternated:  sudo bash tests/bench-cold.sh /path/to/shoal
# (MIB=64 for a quick look).
set -euo pipefail
cd "$(dirname "$0")/.."
SHOAL=${1:?usage: bench-cold.sh SHOAL_BINARY}; B=/var/tmp/shoal-cold
MIB=${MIB:-2048}
source tests/cluster-lib.sh
stop_cluster bench "$B" 2>/dev/null || true; rm -rf "$B"; mkdir -p "$B"
start_etcd "$B" 23990
for i in 2 3; do start_node "$SHOAL" bench "$B" 127.0.9 "$i" 23990 --replica-timeout 2; done
export SHOAL_ENDPOINT=127.0.9.2:9710 SHOAL_CREDENTIALS="$B/node2/admin.pem"
wait_online "$SHOAL" 2
n2=$(cat "$B/node2/node-id"); n3=$(cat "$B/node3/node-id")
for r in 1 2 3; do
  "$SHOAL" volume create cold$r --size 4G --fs none --repl 2 --nodes "$n2,$n3" >/dev/null
  dev=$("$SHOAL" volume attach cold$r --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["device_path"])')
  s=$(date +%s.%N)
  dd if=/dev/zero bs=1M count=$MIB 2>/dev/null | tr '\0' 'x' | dd of="$dev" bs=1M oflag=direct iflag=fullblock conv=fsync status=none
  e=$(date +%s.%N)
  echo "run $r: $MIB MiB into cold extents: $(echo "$MIB / ($e - $s)" | bc -l | cut -c1-6) MiB/s"
  "$SHOAL" volume detach cold$r >/dev/null
done
stop_cluster bench "$B"
