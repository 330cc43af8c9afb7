#!/usr/bin/env bash
# Offline checks of the manifests in this directory (no cluster needed):
#  1. every document parses as a Kubernetes object kubectl knows (`kubectl label --local`);
#     this does NOT validate fields against the API schema: on a cluster, also run
#     `kubectl apply --dry-run=server -f deploy/kubernetes/`; so do the Secrets etcd-certs.sh
#     prints;
#  2. the llmvisor config in the ConfigMap, with its placeholders filled in (generated keys,
#     the etcd TLS files as mode-0600 stand-ins), passes `llmvisor check`;
#  3. with the Secret's placeholder keys as they ship, it does not ("… is a placeholder").
set -euo pipefail
cd "$(dirname "$0")"
llmvisor=${LLMVISOR:-../../target/debug/llmvisor}
kubectl label --local --dry-run=client -o name -f etcd.yaml -f llmvisor.yaml checked=yes >/dev/null
./etcd-certs.sh | kubectl label --local --dry-run=client -o name -f - checked=yes >/dev/null
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -m 700 "$work/etcd-tls"
for f in ca.crt tls.crt tls.key; do install -m 600 /dev/null "$work/etcd-tls/$f"; done
render() { # out client-key cluster-key
  python3 - "$@" "$work" <<'PY'
import sys, yaml
out, client, cluster, work = sys.argv[1:5]
docs = list(yaml.safe_load_all(open("llmvisor.yaml")))
text = next(d for d in docs if d["kind"] == "ConfigMap")["data"]["llmvisor.toml.in"]
keys = next(d for d in docs if d["kind"] == "Secret")["stringData"]
client = client or keys["client-key"]
cluster = cluster or keys["cluster-key"]
for k, v in {"@POD@": "llmvisor-0", "@CLIENT_KEY@": client, "@CLUSTER_KEY@": cluster,
             "/etc/llmvisor/etcd-tls": work + "/etcd-tls",
             "/var/lib/llmvisor": work + "/state"}.items():
    text = text.replace(k, v)
open(out, "w").write(text)
PY
}
render "$work/generated.toml" "$(openssl rand -hex 32)" "$(openssl rand -hex 32)"
"$llmvisor" check --config "$work/generated.toml"
render "$work/shipped.toml" "" ""
if "$llmvisor" check --config "$work/shipped.toml" >"$work/shipped.out" 2>&1; then
  echo "the Secret's placeholder keys passed llmvisor check" >&2
  exit 1
fi
grep -q "is a placeholder" "$work/shipped.out" || { cat "$work/shipped.out" >&2; exit 1; }
echo "manifests: ok (parsed by kubectl; config checked by llmvisor; placeholder keys refused)"
