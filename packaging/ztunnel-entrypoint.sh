#!/bin/sh
# Start `ambient ztunnel` from the environment Istio's ztunnel DaemonSet gives its container,
# under the same names: XDS_ADDRESS, CA_ADDRESS, the root and the token at Istio's mounts,
# NODE_NAME, the CNI's socket (in-pod mode), CLUSTER_ID. Extra arguments are passed on.
set -eu
root="${XDS_ROOT_CA:-/var/run/secrets/istio/root-cert.pem}"
token="${AUTH_TOKEN:-/var/run/secrets/tokens/istio-token}"
istiod="istiod.istio-system.svc:15012"
set -- \
    --node "${NODE_NAME:?NODE_NAME is required (the downward API's spec.nodeName)}" \
    --xds-address "${XDS_ADDRESS:-$istiod}" \
    --xds-root-cert "$root" \
    --ca-address "${CA_ADDRESS:-$istiod}" \
    --ca-root-cert "${CA_ROOT_CA:-$root}" \
    --ca-hostname "${ALT_CA_HOSTNAME:-istiod.istio-system.svc}" \
    --token-file "$token" \
    --cluster-id "${CLUSTER_ID:-${ISTIO_META_CLUSTER_ID:-Kubernetes}}" \
    --zds-socket "${INPOD_UDS:-/var/run/ztunnel/ztunnel.sock}" \
    --admin-address 127.0.0.1:15000 \
    --metrics-address 0.0.0.0:15020 \
    --readiness-address 0.0.0.0:15021 \
    --access-log - \
    "$@"
exec ambient --log-level "${AMBIENT_LOG_LEVEL:-info}" ztunnel "$@"
