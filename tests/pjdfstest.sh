#!/usr/bin/env bash
# POSIX conformance of a mounted filesystem with pjdfstest (the Rust rewrite on crates.io).
#   bash tests/pjdfstest.sh MOUNTPOINT          (as root; MOUNTPOINT already mounted)
# Prints "pjdfstest: PASSED/TOTAL (xx.x%)" where TOTAL = tests that ran (skipped ones are
# left out; on ext4 13 EROFS/remount tests are skipped) and fails below PJDFSTEST_MIN_RATE %.
set -euo pipefail

MNT=${1:?usage: $0 MOUNTPOINT}
MIN_RATE=${PJDFSTEST_MIN_RATE:-97}
CONFIG=$(cd "$(dirname "$0")" && pwd)/pjdfstest.toml
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
trap 'rm -rf "$work" "$second"' EXIT
chmod 0755 "$work" "$second"     # mktemp makes 0700; tests run as nobody/daemon must get in

(cd "$work" && pjdfstest -c "$CONFIG" -s "$second" -p "$work") >"$log" 2>&1 || true

summary=$(grep -E '^Summary: ' "$log" || true)
if [[ -z $summary ]]; then
    tail -20 "$log" >&2; echo "pjdfstest: no summary (log: $log)" >&2; exit 2
fi
read -r failed _ passed xfail < <(sed -E \
    's/.* ([0-9]+) failed, ([0-9]+) skipped, ([0-9]+) passed, ([0-9]+) expected.*/\1 \2 \3 \4/' <<<"$summary")
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
