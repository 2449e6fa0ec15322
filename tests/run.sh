#!/usr/bin/env bash
# The whole test suite: sets up what is missing, checks format and lints, builds the
# `shoal` binary the integration tests run, and runs every test (unit, metadata
# conformance on the embedded store and a real etcd, and the integration tests with
# real node processes, FUSE, loop devices and ext4).
set -euo pipefail
cd "$(dirname "$0")/.."

bash tests/setup.sh
# Tests install /sbin/mount.fuse.shoal (the mount helper) pointing at this build: take it
# away again afterwards.
helper_cleanup() {
  if [[ $(readlink /sbin/mount.fuse.shoal 2>/dev/null) == "$PWD/target/"* ]]; then
    rm -f /sbin/mount.fuse.shoal
  fi
}
trap helper_cleanup EXIT
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo build --workspace
# Two integration tests at a time: each starts etcd and several node processes.
cargo nextest run --workspace --no-fail-fast --test-threads 2 "$@"
