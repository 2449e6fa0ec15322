#!/usr/bin/env bash
# Installs what building and testing Shoal needs on a fresh Debian machine (as root).
# Safe to run again: it only installs what is missing.
set -euo pipefail

need_apt=()
have() { command -v "$1" >/dev/null 2>&1; }
have protoc || need_apt+=(protobuf-compiler)
[ -f /usr/include/google/protobuf/descriptor.proto ] || need_apt+=(libprotobuf-dev)
have etcd || need_apt+=(etcd-server)
have etcdctl || need_apt+=(etcd-client)
# Certificates for the etcd-over-TLS test.
have openssl || need_apt+=(openssl)
have fusermount3 || need_apt+=(fuse3)
have mkfs.ext4 || need_apt+=(e2fsprogs)
have losetup || need_apt+=(util-linux)
have fio || need_apt+=(fio)
have ip || need_apt+=(iproute2)
have bc || need_apt+=(bc)
have sqlite3 || need_apt+=(sqlite3)
# The Docker plugin tests: a real engine, a busybox to build a tiny image from, a registry.
have dockerd || need_apt+=(docker.io)
[ -x /usr/bin/busybox ] || need_apt+=(busybox-static)
have docker-registry || need_apt+=(docker-registry)

if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if ! have cargo; then
  echo "setup: cargo not found; install Rust (rustup) first" >&2
  exit 1
fi
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "setup: installing cargo-nextest"
  cargo install --locked cargo-nextest
fi
if ! have pjdfstest && ! [ -x "${CARGO_HOME:-$HOME/.cargo}/bin/pjdfstest" ]; then
  echo "setup: installing pjdfstest (POSIX suite for shared mounts)"
  build=$(mktemp -d)
  (cd / && CARGO_TARGET_DIR=$build cargo install --locked pjdfstest)
  rm -rf "$build"
fi
# Loop devices for ext4 volumes.
modprobe loop 2>/dev/null || true
[ -e /dev/fuse ] || { echo "setup: /dev/fuse is missing: FUSE is required" >&2; exit 1; }
echo "setup: ok"
