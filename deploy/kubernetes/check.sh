#!/usr/bin/env bash
# Offline checks of the manifests in this directory (no cluster needed):
#  1. every document parses as a Kubernetes object kubectl knows (`kubectl label --local`);
#     this does NOT validate fields against the API schema: on a cluster, also run
#     `kubectl apply --dry-run=server -f deploy/kubernetes/`;
#  2. the llmvisor config in the ConfigMap, with its placeholders filled in, passes
#     `llmvisor check`.
set -euo pipefail
cd "$(dirname "$0")"
llmvisor=${LLMVISOR:-../../target/debug/llmvisor}
kubectl label --local --dry-run=client -o name -f etcd.yaml -f llmvisor.yaml checked=yes >/dev/null
rendered=$(mktemp --suffix .toml)
trap 'rm -f "$rendered"' EXIT
python3 - "$rendered" <<'PY'
import sys, yaml
docs = list(yaml.safe_load_all(open("llmvisor.yaml")))
text = next(d for d in docs if d["kind"] == "ConfigMap")["data"]["llmvisor.toml.in"]
for k, v in {"@POD@": "llmvisor-0", "@CLIENT_KEY@": "client-key-0123456789abcdef",
             "@CLUSTER_KEY@": "cluster-key-0123456789abcdef",
             "/var/lib/llmvisor": "/tmp/llmvisor-k8s-check"}.items():
    text = text.replace(k, v)
open(sys.argv[1], "w").write(text)
PY
"$llmvisor" check --config "$rendered"
echo "manifests: ok (parsed by kubectl; config checked by llmvisor)"
