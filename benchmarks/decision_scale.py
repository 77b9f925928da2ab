"""What a ztunnel's per-connection decision costs at 100 and at 5,000 pods.

    python benchmarks/decision_scale.py [--connections 20000]

For each size a mesh is generated (``generate_mesh.py``: pods, Services, AuthorizationPolicies in
the same proportions) and a ztunnel's decisions for one local pod are driven without sockets:

- *asked*: Python's decision for the connection, as the core asks it on a table miss (outbound
  to a Service VIP: every endpoint by weight; inbound HBONE: the pod's policies);
- *remembered*: the same connection answered from the core's table (``RememberedDecisions``,
  the listeners' keys, tables and picks; the figure includes the call from Python into the
  core, which a real connection does not pay).

Median of 5 runs, microseconds per connection; the machine is written beside.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ambient.config import load_mesh
from ambient.hbone import StreamRequest
from ambient.ztunnel.proxy import Ztunnel
from benchmarks.generate_mesh import write


def per_connection(call, n: int) -> float:
    runs = []
    for _ in range(5):
        started = time.perf_counter()
        for i in range(n):
            call(i)
        runs.append((time.perf_counter() - started) / n * 1e6)
    return statistics.median(runs)


def measure(pods: int, n: int) -> dict[str, float]:
    text = io.StringIO()
    write(text, pods, max(pods // 5, 1), max(pods // 5, 1), 1)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mesh.yaml"
        path.write_text(text.getvalue())
        mesh = load_mesh([path])
    source = next(w for w in mesh.workloads if w.in_mesh)
    target = next(w for w in mesh.workloads if w.in_mesh and w.node == source.node)
    service = next(s for s in mesh.services if s.vips)
    ztunnel = Ztunnel(source.node, None, None)  # type: ignore[arg-type]  # decisions only
    ztunnel.decide_on(mesh)
    vip = f"{service.vips[0][1]}:{min(service.ports)}"
    client = str(source.ips[0])
    peer = str(source.identity)
    authority = f"{target.ips[0]}:8080"
    route = ztunnel._outbound(source.uid)
    decide = ztunnel._inbound_hbone(target.uid)
    outbound_table = ztunnel.remembered_decisions(source.uid)
    inbound_table = ztunnel.remembered_decisions(target.uid)
    return {
        "outbound asked": per_connection(lambda i: route(f"{client}:{1024 + i % 60000}", vip), n),
        "outbound remembered": per_connection(
            lambda i: outbound_table.outbound(f"{client}:{1024 + i % 60000}", vip), n
        ),
        "inbound asked": per_connection(
            lambda i: decide(StreamRequest(peer, authority, f"{client}:{1024 + i % 60000}", ())),
            n,
        ),
        "inbound remembered": per_connection(
            lambda i: inbound_table.inbound(peer, authority, f"{client}:{1024 + i % 60000}", []),
            n,
        ),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=20_000)
    args = parser.parse_args()
    sizes = (100, 5000)
    results = {pods: measure(pods, args.connections) for pods in sizes}
    print("| µs per connection | " + " | ".join(f"{p:,} pods" for p in sizes) + " |")
    print("|---|" + "---:|" * len(sizes))
    for figure in results[sizes[0]]:
        print(f"| {figure} | " + " | ".join(f"{results[p][figure]:.2f}" for p in sizes) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
