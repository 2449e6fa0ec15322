#!/usr/bin/env bash
# Where a small shared-volume operation's time goes (issue 16, point 5): creates, 4 KiB
# overwrites and 4 KiB overwrites + fdatasync (in a file written once before), N of each, on a mount on the coordinator's node (A)
# and on a mount of a node without a replica (B). The nodes log one `shoal::timing` line
# per namespace operation (sharedfs/src/timing.rs); this prints medians of: the wall time
# one operation takes for the application, the mount's round trips to the coordinator per
# operation and their time, and on the coordinator the operation's time in the service
# and the replicated volume writes and flushes inside it. The call and coordinator
# columns are those of the operation's main call (create, write; for write + fdatasync,
# the fsync: its write is the row above).
#
#   sudo bash tests/bench-timing.sh          # N=300, about 1 minute
#   N=1000 SHOAL_BIN=/path/to/shoal sudo bash tests/bench-timing.sh
set -euo pipefail
cd "$(dirname "$0")/.."
B=${BENCH_DIR:-/var/tmp/shoal-bench-timing}
N=${N:-300}
SHOAL=${SHOAL_BIN:-$PWD/target/release/shoal}
log() { echo "[$(date +%H:%M:%S)] $*" >&2; }

source tests/cluster-lib.sh
cleanup() { stop_cluster bench-timing "$B"; }
trap cleanup EXIT
bash tests/setup.sh >/dev/null
[ -n "${SHOAL_BIN:-}" ] || cargo build --release -p shoal 2>&1 | tail -1 >&2
cleanup; rm -rf "$B"; mkdir -p "$B"

log "starting etcd and three nodes"
start_etcd "$B" 23790
for i in 2 3 4; do
  RUST_LOG=info,shoal::timing=debug start_node "$SHOAL" bench-timing "$B" 127.0.7 "$i" 23790
done
export SHOAL_ENDPOINT=127.0.7.2:9710
export SHOAL_CREDENTIALS="$B/node2/admin.pem"  # written by the node at start
wait_online "$SHOAL" 3
n2=$(cat "$B/node2/node-id"); n3=$(cat "$B/node3/node-id")
"$SHOAL" volume create bench --size 4G --repl 2 --shared --nodes "$n2,$n3" >/dev/null
"$SHOAL" volume mount bench "$B/mnt-a" >/dev/null
SHOAL_ENDPOINT=127.0.7.4:9710 "$SHOAL" volume mount bench "$B/mnt-b" >/dev/null

log "running $N of each operation on both mounts"
python3 - "$B" "$N" <<'PY'
import os, re, statistics, sys, time
B, N = sys.argv[1], int(sys.argv[2])
logs = {"A": f"{B}/node2.log", "B": f"{B}/node4.log"}
coord = f"{B}/node2.log"
size = lambda p: os.path.getsize(p)
field = re.compile(r'(\w+)=("[^"]*"|\S+)')

def lines(path, start, end):
    with open(path, "rb") as f:
        f.seek(start)
        text = f.read(end - start).decode(errors="replace")
    for l in text.splitlines():
        if "shoal::timing" in l:
            yield {k: v.strip('"') for k, v in field.findall(l)}

def create(d, i):
    os.close(os.open(f"{d}/f{i}", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))

def writer(sync):
    def run(d, i, fd=[None]):
        if fd[0] is None:
            # The file's first MiB is written once: the timed writes overwrite it.
            fd[0] = os.open(f"{d}/w{int(sync)}", os.O_CREAT | os.O_WRONLY, 0o644)
            os.pwrite(fd[0], b"y" * (1 << 20), 0)
            os.fsync(fd[0])
        os.pwrite(fd[0], b"x" * 4096, (i % 256) * 4096)
        if sync:
            os.fdatasync(fd[0])
    return run

def med(xs):
    return round(statistics.median(xs)) if xs else "-"

rows = []
for mount in ("A", "B"):
    d = f"{B}/mnt-{mount.lower()}/{mount}"
    os.makedirs(d, exist_ok=True)
    for name, fn, main in (("create", create, "create"), ("4 KiB overwrite", writer(False), "write"),
                           ("4 KiB overwrite + fdatasync", writer(True), "fsync")):
        fn(d, -1)  # warm up (opens the file of the write jobs)
        s_mount, s_coord = size(logs[mount]), size(coord)
        walls = []
        for i in range(N):
            t = time.perf_counter_ns()
            fn(d, i)
            walls.append((time.perf_counter_ns() - t) / 1000)
        time.sleep(0.5)
        m = [l for l in lines(logs[mount], s_mount, size(logs[mount])) if l.get("side") == "mount"]
        c = [l for l in lines(coord, s_coord, size(coord)) if l.get("side") == "coordinator"]
        ours = [l for l in c if l.get("op") == main] or [l for l in c if l.get("op") == "write"]
        rpc = [int(l["rpc_us"]) for l in m if l.get("op") == main]
        rows.append((mount, name, med(walls), round(len(m) / N, 1), med(rpc),
                     med([int(l["total_us"]) for l in ours]),
                     med([int(l["writes"]) for l in ours]),
                     med([int(l["write_us"]) for l in ours]),
                     med([int(l["flush_us"]) for l in ours]),
                     ", ".join(sorted({l["op"] for l in c}))))
print("| mount | operation | wall µs | calls / op | call µs | coordinator µs | volume writes | their µs | flush µs | calls seen |")
print("|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    print("| " + " | ".join(str(x) for x in r) + " |")
PY
