#!/usr/bin/env bash
# Deploys Weft to a real cluster and checks that meshed traffic goes through the node proxy.
# Not run in CI (no cluster there); needs docker, kubectl, and either kind or a kubeconfig
# whose cluster can pull or already has the image.
#
#   deploy/kind.sh                # creates (or reuses) the kind cluster "weft"
#   KIND_CLUSTER= deploy/kind.sh  # uses the current kubeconfig context; push IMAGE yourself
#
# Environment: KIND_CLUSTER (default weft; empty = no kind), IMAGE (default weft/mesh-node:dev).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cluster=${KIND_CLUSTER-weft}
image=${IMAGE:-weft/mesh-node:dev}
ns=weft-demo

step() { printf '\n==> %s\n' "$*"; }

step "building mesh-node and weft-demo (release)"
cargo build --release -p mesh-node --manifest-path "$root/Cargo.toml"

step "building the image $image"
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
cp "$root/target/release/mesh-node" "$root/target/release/weft-cni" "$root/target/release/weft-demo" "$ctx/"
docker build -t "$image" -f "$root/deploy/Dockerfile" "$ctx"

if [[ -n $cluster ]]; then
    if ! kind get clusters | grep -qx "$cluster"; then
        step "creating the kind cluster $cluster (two nodes)"
        kind create cluster --name "$cluster" --config - <<KIND
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
nodes:
  - role: control-plane
  - role: worker
KIND
    fi
    kubectl config use-context "kind-$cluster"
    step "loading $image into the nodes"
    kind load docker-image --name "$cluster" "$image"
fi

step "applying deploy/ (CRDs, RBAC, DaemonSet, CA)"
kubectl create namespace weft-system --dry-run=client -o yaml | kubectl apply -f -
if ! kubectl -n weft-system get secret cacerts >/dev/null 2>&1; then
    step "creating the mesh's root CA (Secret cacerts, Istio's shape)"
    pki=$(mktemp -d)
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
        -keyout "$pki/ca-key.pem" -out "$pki/ca-cert.pem" \
        -subj "/O=cluster.local/CN=Weft root CA for cluster.local" \
        -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
    kubectl -n weft-system create secret generic cacerts \
        --from-file=ca-cert.pem="$pki/ca-cert.pem" --from-file=ca-key.pem="$pki/ca-key.pem" \
        --from-file=root-cert.pem="$pki/ca-cert.pem" --from-file=cert-chain.pem="$pki/ca-cert.pem"
    rm -rf "$pki"
fi
kubectl apply -k "$root/deploy"
kubectl -n weft-system set image daemonset/mesh-node prepare-node="$image" mesh-node="$image"
kubectl -n weft-system set image deployment/weft-ca ca="$image"
kubectl -n weft-system rollout status daemonset/mesh-node --timeout=180s

step "meshing the namespace $ns and deploying two demo pods"
kubectl create namespace "$ns" --dry-run=client -o yaml | kubectl apply -f -
kubectl label namespace "$ns" weft.io/mesh=enabled --overwrite
kubectl -n "$ns" apply -f - <<DEMO
apiVersion: v1
kind: Pod
metadata:
  name: ratings
  labels: {app: ratings}
spec:
  containers:
    - name: app
      image: $image
      imagePullPolicy: IfNotPresent
      command: [weft-demo]
      args: [serve, --service, ratings, --port, "9080"]
      ports: [{name: http, containerPort: 9080}]
---
apiVersion: v1
kind: Service
metadata:
  name: ratings
spec:
  selector: {app: ratings}
  ports: [{name: http, port: 9080, targetPort: http}]
---
apiVersion: v1
kind: Pod
metadata:
  name: client
  labels: {app: client}
spec:
  containers:
    - name: app
      image: $image
      imagePullPolicy: IfNotPresent
      command: [weft-demo]
      # Any long-running role; the test execs its client tools.
      args: [serve, --service, details, --port, "9080"]
DEMO
kubectl -n "$ns" wait --for=condition=Ready pod/ratings pod/client --timeout=120s

node=$(kubectl -n "$ns" get pod client -o jsonpath='{.spec.nodeName}')
agent=$(kubectl -n weft-system get pod -l app.kubernetes.io/name=mesh-node \
    --field-selector "spec.nodeName=$node" -o jsonpath='{.items[0].metadata.name}')
metric() {
    kubectl -n weft-system exec "$agent" -c mesh-node -- \
        bash -c 'exec 3<>/dev/tcp/127.0.0.1/15020 && printf "GET /metrics HTTP/1.0\r\n\r\n" >&3 && cat <&3' \
        | awk -v m="$1" '$1 ~ "^"m {s += $NF} END {print s + 0}'
}

step "sending requests from client to ratings"
before=$(metric weft_ebpf_captured_total)
kubectl -n "$ns" exec client -- weft-demo get --count 5 "http://ratings.$ns:9080/ratings/0"
after=$(metric weft_ebpf_captured_total)
opened=$(metric istio_tcp_connections_opened_total)
echo "captured connections on $node: $before -> $after; proxy connections opened: $opened"
if (( after > before )) && (( opened > 0 )); then
    echo "ok: the client's traffic went through mesh-node on $node"
else
    echo "FAILED: no capture seen in $agent's metrics" >&2
    kubectl -n weft-system logs "$agent" -c mesh-node --tail=50 >&2
    exit 1
fi
