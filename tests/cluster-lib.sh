# Shared by tests/demo.sh and tests/bench.sh. Source this file.

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
