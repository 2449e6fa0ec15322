# Shared by the demo and bench scripts in tests/. Source this file.

# stop_cluster CLUSTER_ID DIR: stops the nodes of a cluster started by these scripts, its
# etcd (pid in DIR/etcd.pid), and releases every mount and loop device below DIR.
stop_cluster() {
  local id=$1 dir=$2 l loops=()
  pkill -TERM -f " node start --cluster-id $id " 2>/dev/null || true
  sleep 1
  pkill -KILL -f " node start --cluster-id $id " 2>/dev/null || true
  if [ -f "$dir/etcd.pid" ]; then kill "$(cat "$dir/etcd.pid")" 2>/dev/null || true; fi
  # Find the loop devices before unmounting: once the device file's FUSE mount is gone,
  # the kernel shows their backing file as "/disk" and they can no longer be told apart.
  for l in /sys/block/loop*/loop/backing_file; do
    if grep -q "^$dir" "$l" 2>/dev/null; then loops+=("$(basename "$(dirname "$(dirname "$l")")")"); fi
  done
  grep -o " $dir[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
  for l in "${loops[@]}"; do losetup -d "/dev/$l" 2>/dev/null || true; done
}

# start_etcd DIR PORT: an etcd on 127.0.0.1:PORT (peers on PORT+1), data in DIR/etcd, pid in
# DIR/etcd.pid; returns once it answers. Also writes a fresh cluster secret to DIR/secret.
start_etcd() {
  local dir=$1 port=$2
  etcd --data-dir "$dir/etcd" --listen-client-urls "http://127.0.0.1:$port" \
    --advertise-client-urls "http://127.0.0.1:$port" --listen-peer-urls "http://127.0.0.1:$((port + 1))" \
    --initial-advertise-peer-urls "http://127.0.0.1:$((port + 1))" \
    --initial-cluster "default=http://127.0.0.1:$((port + 1))" >"$dir/etcd.log" 2>&1 &
  echo $! >"$dir/etcd.pid"
  for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/"$port") 2>/dev/null && break; sleep 0.2; done
  (umask 077; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$dir/secret")
}

# start_node BIN CLUSTER_ID DIR NET I ETCD_PORT [ARGS...]: node I of a cluster on NET.I
# (gRPC :9710, gossip :9711), data in DIR/nodeI, log DIR/nodeI.log, pid DIR/nodeI.pid.
start_node() {
  local bin=$1 id=$2 dir=$3 net=$4 i=$5 port=$6
  shift 6
  setsid "$bin" node start --cluster-id "$id" --secret-file "$dir/secret" \
    --data-dir "$dir/node$i" --listen "$net.$i:9710" --gossip "$net.$i:9711" \
    --kvdb "http://127.0.0.1:$port" --docker-socket "" "$@" >>"$dir/node$i.log" 2>&1 &
  echo $! >"$dir/node$i.pid"
}

# wait_online BIN N: until N nodes are online (SHOAL_ENDPOINT and SHOAL_CREDENTIALS set).
wait_online() {
  local bin=$1 n=$2
  for _ in $(seq 100); do
    [ "$("$bin" status --json 2>/dev/null | grep -c '"online"' || true)" = "$n" ] && return 0
    sleep 0.2
  done
  echo "fewer than $n nodes online" >&2
  return 1
}
