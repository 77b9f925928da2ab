"""A large mesh file, to measure what loading, validating and applying a mesh costs as it grows
(issue: ztunnel beside Istio's ztunnel, item 4).

    python benchmarks/generate_mesh.py --pods 5000 --services 1000 --policies 1000 > /tmp/big.yaml
    ambient config check /tmp/big.yaml

The shape of a real cluster, scaled: namespaces of 50 pods each, all in the mesh, on 50 nodes;
each Service selects the pods of one app (5 replicas) and exposes one or two ports; each
AuthorizationPolicy selects an app and allows a few principals on a port, some with a DENY for
a path-free L4 rule (namespaces, IP blocks). The same arguments give the same file.
"""

from __future__ import annotations

import argparse
import ipaddress
import random
import sys
from typing import TextIO

PODS_PER_NAMESPACE = 50
REPLICAS = 5
NODES = 50


def pod_ip(i: int) -> str:
    return str(ipaddress.IPv4Address("10.64.0.1") + i)


def write(out: TextIO, pods: int, services: int, policies: int, seed: int) -> None:
    rng = random.Random(seed)
    namespaces = max(1, pods // PODS_PER_NAMESPACE)
    apps = max(1, pods // REPLICAS)
    for n in range(namespaces):
        out.write(
            f"apiVersion: v1\nkind: Namespace\nmetadata:\n  name: ns{n}\n"
            f"  labels: {{istio.io/dataplane-mode: ambient}}\n---\n"
        )
    for i in range(pods):
        app = i // REPLICAS
        ns = app * REPLICAS // PODS_PER_NAMESPACE % namespaces
        out.write(
            f"apiVersion: v1\nkind: Pod\n"
            f"metadata: {{name: app{app}-{i % REPLICAS}, namespace: ns{ns}, "
            f"labels: {{app: app{app}, version: v{i % 2 + 1}}}}}\n"
            f"spec:\n  nodeName: node{i % NODES}\n  serviceAccountName: app{app}\n"
            f"  containers:\n  - name: app\n    ports:\n"
            f"    - {{name: http, containerPort: 8080}}\n"
            f"    - {{name: grpc, containerPort: 9090}}\n"
            f"status: {{podIP: {pod_ip(i)}}}\n---\n"
        )
    for s in range(services):
        app = s % apps
        ns = app * REPLICAS // PODS_PER_NAMESPACE % namespaces
        ports = "  - {name: http, port: 80, targetPort: http}\n"
        if s % 3 == 0:
            ports += "  - {name: grpc, port: 9090, targetPort: 9090}\n"
        out.write(
            f"apiVersion: v1\nkind: Service\nmetadata: {{name: svc{s}, namespace: ns{ns}}}\n"
            f"spec:\n  clusterIP: {ipaddress.IPv4Address('10.96.0.1') + s}\n"
            f"  selector: {{app: app{app}}}\n"
            f"  ports:\n{ports}---\n"
        )
    for p in range(policies):
        app = p % apps
        ns = app * REPLICAS // PODS_PER_NAMESPACE % namespaces
        callers = rng.sample(range(apps), 3)
        principals = ", ".join(
            f"cluster.local/ns/ns{c * REPLICAS // PODS_PER_NAMESPACE % namespaces}/sa/app{c}"
            for c in callers
        )
        if p % 4 == 3:
            spec = (
                "  action: DENY\n  rules:\n"
                f"  - from:\n    - source: {{namespaces: [ns{rng.randrange(namespaces)}]}}\n"
                f"  - from:\n    - source: {{ipBlocks: [10.{64 + rng.randrange(2)}.0.0/16]}}\n"
                "    to:\n    - operation: {ports: ['9090']}\n"
            )
        else:
            spec = (
                "  action: ALLOW\n  rules:\n"
                f"  - from:\n    - source: {{principals: [{principals}]}}\n"
                "    to:\n    - operation: {ports: ['8080']}\n"
            )
        out.write(
            f"apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
            f"metadata: {{name: policy{p}, namespace: ns{ns}}}\n"
            f"spec:\n  selector: {{matchLabels: {{app: app{app}}}}}\n{spec}---\n"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pods", type=int, default=5000)
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--policies", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    write(sys.stdout, args.pods, args.services, args.policies, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
