#!/usr/bin/env bash
# Installs what fleet mode (issue 15) needs on Debian/Ubuntu, once:
#   etcd-server        the etcd (3.4) the fleet tests start as a 3-member cluster on loopback
#   protobuf-compiler  protoc, which the etcd-client crate's build script runs
#   libprotobuf-dev    protobuf's well-known types (google/protobuf/*.proto) that protoc imports
#   openssl            makes the throwaway CA and certificates of the etcd-over-TLS test
# Idempotent: when all are present it prints nothing and exits 0. Runs apt-get as root (as CI
# does) or through sudo; `apt-get update` only when a first install attempt fails.
# LLMVISOR_SKIP_FLEET=1 skips it (the fleet tests then skip themselves).
set -euo pipefail
[ "${LLMVISOR_SKIP_FLEET:-0}" = 1 ] && exit 0

missing=()
command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
command -v protoc >/dev/null 2>&1 || missing+=(protobuf-compiler)
[ -f /usr/include/google/protobuf/descriptor.proto ] || missing+=(libprotobuf-dev)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
[ "${#missing[@]}" -eq 0 ] && exit 0

if [ "$(id -u)" -eq 0 ]; then sudo=(); else sudo=(sudo -n); fi
install() {
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >"$log" 2>&1 || { cat "$log" >&2; return 1; }
}
log=$(mktemp)
trap 'rm -f "$log"' EXIT
echo "setup-fleet: installing ${missing[*]}" >&2
if ! install; then
  echo "setup-fleet: install failed; running apt-get update and retrying" >&2
  "${sudo[@]}" apt-get update -qq >&2
  install
fi
# Debian's package starts an etcd service where an init system runs; the tests start their own.
command -v etcd >/dev/null && command -v protoc >/dev/null && command -v openssl >/dev/null &&
  [ -f /usr/include/google/protobuf/descriptor.proto ]
