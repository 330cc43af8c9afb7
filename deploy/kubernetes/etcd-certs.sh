#!/usr/bin/env bash
# Makes the TLS material of etcd.yaml and llmvisor.yaml and prints it as two Secrets:
#   llmvisor-etcd-server-tls  the members' certificate (server and peer; names of every member)
#   llmvisor-etcd-client-tls  the llmvisor nodes' client certificate
# both with the CA's certificate as ca.crt. The CA's key is not kept (make new ones to rotate).
# Usage: deploy/kubernetes/etcd-certs.sh [NAMESPACE] | kubectl apply -f -
# Needs openssl and kubectl (offline: `kubectl create --dry-run=client`).
set -euo pipefail
ns=${1:-default}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
cd "$dir"
ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
openssl req -x509 -days 3650 -subj /CN=llmvisor-etcd-ca "${ec[@]}" -keyout ca.key -out ca.crt \
  -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
san="DNS:localhost,IP:127.0.0.1"
for i in 0 1 2; do
  for d in "llmvisor-etcd-$i.llmvisor-etcd" "llmvisor-etcd-$i.llmvisor-etcd.$ns.svc" \
           "llmvisor-etcd-$i.llmvisor-etcd.$ns.svc.cluster.local"; do
    san="$san,DNS:$d"
  done
done
sign() { # name CN extended-key-usage [SAN]
  openssl req -subj "/CN=$2" "${ec[@]}" -keyout "$1.key" -out "$1.csr" 2>/dev/null
  { echo "extendedKeyUsage=$3"; [ -n "${4:-}" ] && echo "subjectAltName=$4"; } >"$1.ext"
  openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
    -out "$1.crt" -extfile "$1.ext" 2>/dev/null
}
sign server llmvisor-etcd serverAuth,clientAuth "$san"
sign client llmvisor-node clientAuth
for who in server client; do
  kubectl create secret generic "llmvisor-etcd-$who-tls" --namespace "$ns" --dry-run=client -o yaml \
    --from-file=ca.crt=ca.crt --from-file=tls.crt="$who.crt" --from-file=tls.key="$who.key"
  echo ---
done
