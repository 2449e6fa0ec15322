#!/usr/bin/env bash
# POSIX conformance of a mounted filesystem with pjdfstest (the Rust rewrite on crates.io).
#   bash tests/pjdfstest.sh MOUNTPOINT          (as root; MOUNTPOINT already mounted)
# Prints "pjdfstest: PASSED/TOTAL (xx.x%)" where TOTAL = tests that ran (skipped ones are
# left out; on ext4 13 EROFS/remount tests are skipped) and fails below PJDFSTEST_MIN_RATE %.
set -euo pipefail

MNT=${1:?usage: $0 MOUNTPOINT}
MIN_RATE=${PJDFSTEST_MIN_RATE:-97}
CONFIG=$(cd "$(dirname "$0")" && pwd)/pjdfstest.toml
# PJDFSTEST_REMOUNT=1: also run the 13 EROFS tests, which remount MOUNTPOINT read-only and
# back with `mount -o remount,ro|rw` (for a Shoal mount, /sbin/mount.fuse.shoal must be
# installed). They run in a pjdfstest process of their own: the `open` tests leave files
# open for writing in the process that ran them, and the kernel refuses a read-only
# remount while any are (seen on ext4 as on Shoal).
if [[ ${PJDFSTEST_REMOUNT:-0} == 1 ]]; then
    remount_config=$(mktemp /tmp/pjdfstest-config.XXXXXX.toml)
    sed -E 's/^allow_remount = false/allow_remount = true/' "$CONFIG" >"$remount_config"
fi
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH" NO_COLOR=1

mountpoint -q "$MNT" || { echo "pjdfstest: $MNT is not a mount point" >&2; exit 2; }
if ! command -v pjdfstest >/dev/null; then
    echo "installing pjdfstest (cargo install, about 2 min)..." >&2
    # Run from / with a throw-away target dir so a surrounding workspace is not touched.
    build=$(mktemp -d)
    (cd / && CARGO_TARGET_DIR=$build cargo install --locked pjdfstest >&2)
    rm -rf "$build"
fi

work=$(mktemp -d "$MNT/pjdfstest.XXXXXX")                    # tests run here (on MNT)
second=$(mktemp -d "${PJDFSTEST_SECONDARY:-/dev/shm}/pjdfstest-2nd.XXXXXX")  # another fs, for EXDEV
log=$(mktemp /tmp/pjdfstest.XXXXXX.log)
trap 'rm -rf "$work" "$second" ${remount_config:-}' EXIT
chmod 0755 "$work" "$second"     # mktemp makes 0700; tests run as nobody/daemon must get in

(cd "$work" && pjdfstest -c "$CONFIG" -s "$second" -p "$work") >"$log" 2>&1 || true

# "Summary: F failed, S skipped, P passed, X expected failures, T total" -> "F S P X"
counts() {
    local summary
    summary=$(grep -E '^Summary: ' "$1" || true)
    if [[ -z $summary ]]; then
        tail -20 "$1" >&2; echo "pjdfstest: no summary (log: $1)" >&2; exit 2
    fi
    sed -E 's/.* ([0-9]+) failed, ([0-9]+) skipped, ([0-9]+) passed, ([0-9]+) expected.*/\1 \2 \3 \4/' <<<"$summary"
}
read -r failed skipped passed xfail < <(counts "$log")
summary=$(grep -E '^Summary: ' "$log")
if [[ -n ${remount_config:-} ]]; then
    log2=$(mktemp /tmp/pjdfstest-erofs.XXXXXX.log)
    (cd "$work" && pjdfstest -c "$remount_config" -s "$second" -p "$work" erofs) >"$log2" 2>&1 || true
    read -r f2 _ p2 x2 < <(counts "$log2")
    cat "$log2" >>"$log"; rm -f "$log2"
    failed=$((failed + f2)); passed=$((passed + p2)); xfail=$((xfail + x2))
    skipped=$((skipped - f2 - p2 - x2))
    summary="Summary: $failed failed, $skipped skipped, $passed passed, $xfail expected failures ($((f2 + p2 + x2)) EROFS tests in a second run)"
fi
total=$((passed + failed + xfail))
((failed > 0)) || rm -f "$log"

if ((failed > 0)); then
    echo "failing tests (full log: $log):"
    grep -E -A1 ' (FAILED|PASSED UNEXPECTEDLY)$' "$log" | grep -v '^--$' | sed 's/^/  /'
fi
echo "$summary"
rate=$(awk -v p="$passed" -v t="$total" 'BEGIN { printf "%.1f", t ? 100 * p / t : 0 }')
echo "pjdfstest: $passed/$total ($rate%)"
awk -v r="$rate" -v m="$MIN_RATE" 'BEGIN { exit !(r + 0 >= m + 0) }' || {
    echo "pjdfstest: pass rate $rate% is below PJDFSTEST_MIN_RATE=$MIN_RATE%" >&2; exit 1; }
