#!/usr/bin/env bash
# The main job on a fresh Debian machine (as root): installs what is missing, builds
# Shoal, starts etcd and three nodes on 127.0.0.2-4, creates a replicated ext4 volume,
# mounts it on a node that holds no replica, writes a file, shows `shoal status` and
# the volume, then moves the volume to another node and reads the file back.
# Leaves the cluster running; `bash tests/demo.sh stop` stops it and cleans up.
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO=${SHOAL_DEMO_DIR:-/tmp/shoal-demo}
# SHOAL_BIN runs an already-built binary (the test suite runs this script that way).
SHOAL=${SHOAL_BIN:-$PWD/target/release/shoal}

source tests/cluster-lib.sh
stop() { stop_cluster demo "$DEMO"; }
if [ "${1:-}" = stop ]; then stop; rm -rf "$DEMO"; echo "demo stopped"; exit 0; fi

bash tests/setup.sh
if [ -z "${SHOAL_BIN:-}" ]; then
  echo "== building (release)"
  cargo build --release -p shoal
fi
stop; rm -rf "$DEMO"; mkdir -p "$DEMO"

echo "== starting etcd on 127.0.0.1:23790"
etcd --data-dir "$DEMO/etcd" --listen-client-urls http://127.0.0.1:23790 \
  --advertise-client-urls http://127.0.0.1:23790 --listen-peer-urls http://127.0.0.1:23800 \
  --initial-advertise-peer-urls http://127.0.0.1:23800 \
  --initial-cluster default=http://127.0.0.1:23800 >"$DEMO/etcd.log" 2>&1 &
echo $! >"$DEMO/etcd.pid"
for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/23790) 2>/dev/null && break; sleep 0.2; done

# Node 2 serves the Docker volume plugin (driver "shoal"); one socket per host.
docker_socket() { if [ "$1" = 2 ]; then echo "${SHOAL_DEMO_DOCKER_SOCKET-/run/docker/plugins/shoal.sock}"; fi; }
# The cluster secret lives in a file only root can read (never on the command line).
(umask 077; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$DEMO/secret")
for i in 2 3 4; do
  echo "== starting node on 127.0.0.$i"
  "$SHOAL" node start --cluster-id demo --secret-file "$DEMO/secret" --data-dir "$DEMO/node$i" \
    --listen 127.0.0.$i:9710 --gossip 127.0.0.$i:9711 --kvdb http://127.0.0.1:23790 \
    --zone zone$(( i % 2 )) --capacity 8G --docker-socket "$(docker_socket $i)" \
    >"$DEMO/node$i.log" 2>&1 &
done
export SHOAL_ENDPOINT=127.0.0.2:9710
# Every node writes an admin credential (mode 0600) for the CLI to its data dir.
export SHOAL_CREDENTIALS="$DEMO/node2/admin.pem"
for _ in $(seq 100); do
  n=$("$SHOAL" status --json 2>/dev/null | grep -c '"online"' || true)
  [ "$n" = 3 ] && break; sleep 0.2
done

ids=($(for i in 2 3; do cat "$DEMO/node$i/node-id"; done))
echo "== shoal volume create web --size 10G --repl 2 --fs ext4 (replicas on 127.0.0.2 and .3)"
"$SHOAL" volume create web --size 10G --repl 2 --fs ext4 --nodes "${ids[0]},${ids[1]}"
echo "== mounting it on node 127.0.0.4, which holds no replica (remote data access)"
SHOAL_ENDPOINT=127.0.0.4:9710 "$SHOAL" volume mount web "$DEMO/mnt-node4"
dd if=/dev/urandom of="$DEMO/mnt-node4/hello.bin" bs=1M count=64 conv=fsync status=none
echo "hello from Shoal" >"$DEMO/mnt-node4/hello.txt"; sync
sum=$(sha256sum <"$DEMO/mnt-node4/hello.bin")
echo "== shoal status"
"$SHOAL" status
echo "== shoal volume inspect web"
"$SHOAL" volume inspect web
echo "== moving the volume: unmount + detach on node 4, mount on node 3"
SHOAL_ENDPOINT=127.0.0.4:9710 "$SHOAL" volume unmount "$DEMO/mnt-node4"
"$SHOAL" volume detach web
SHOAL_ENDPOINT=127.0.0.3:9710 "$SHOAL" volume mount web "$DEMO/mnt-node3"
cat "$DEMO/mnt-node3/hello.txt"
if [ "$(sha256sum <"$DEMO/mnt-node3/hello.bin")" = "$sum" ]; then
  echo "== the 64 MiB file read back on node 3 has the same SHA-256: ok"
else
  echo "== checksum mismatch after moving the volume" >&2; exit 1
fi

echo "== shoal volume create site --size 5G --repl 2 --shared (one namespace, many hosts)"
"$SHOAL" volume create site --size 5G --repl 2 --shared
echo "== mounting it on node 127.0.0.2 and on node 127.0.0.4 at once"
SHOAL_ENDPOINT=127.0.0.2:9710 "$SHOAL" volume mount site "$DEMO/site-node2"
SHOAL_ENDPOINT=127.0.0.4:9710 "$SHOAL" volume mount site "$DEMO/site-node4"
mkdir -p "$DEMO/site-node4/uploads"
echo "written on node 4, read on node 2" >"$DEMO/site-node4/uploads/note.txt"
echo "== reading it on node 2 right after:"
cat "$DEMO/site-node2/uploads/note.txt"
df -h "$DEMO/site-node2" | tail -1
echo "== shoal volume inspect site (replicas and the two mounts)"
"$SHOAL" volume inspect site

# Docker, when an engine runs on this host: a container reads the shared volume by name
# through node 2's plugin (driver "shoal"). No image can be pulled here, so a tiny one
# is built from the host's static busybox.
if [ -n "$(docker_socket 2)" ] && docker info >/dev/null 2>&1 && [ -x /usr/bin/busybox ]; then
  echo "== docker run -v site:/site (the Docker engine on this host, driver shoal)"
  img="$DEMO/image"; mkdir -p "$img/root/bin"; cp /usr/bin/busybox "$img/root/bin/"
  printf 'FROM scratch\nCOPY root /\nENTRYPOINT ["/bin/busybox"]\n' >"$img/Dockerfile"
  DOCKER_BUILDKIT=0 docker build -q -t shoal-demo-busybox "$img" >/dev/null 2>&1
  docker run --rm --network none -v site:/site shoal-demo-busybox cat /site/uploads/note.txt
  docker volume inspect site --format '{{.Driver}} {{.Scope}} repl={{index .Status "repl"}}'
else
  echo "== (no Docker engine answering here: skipped docker run -v site:/site; see docs/docker.md)"
fi
echo
echo "The cluster is still running (logs in $DEMO). Try: SHOAL_ENDPOINT=127.0.0.2:9710 SHOAL_CREDENTIALS=$DEMO/node2/admin.pem $SHOAL status"
echo "Stop it with: bash tests/demo.sh stop"
