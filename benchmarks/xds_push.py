"""What delta xDS costs: the push of a 1,000-workload mesh (its size on the wire, the time to make
it and to apply it), and the time a change in a mesh file takes to reach every ztunnel of two
nodes.

    python benchmarks/xds_push.py --out benchmarks/results/xds-push.json

1. **A large push**, in process: ``benchmarks/generate_mesh.py`` (1,000 pods, 200 Services, 200
   AuthorizationPolicies), turned into resources (:func:`ambient.xds.translate.resources`), the
   two first ``DeltaDiscoveryResponse`` a subscribing ztunnel gets (bytes, serialized), and the
   client's side: parsing them and building the snapshot (``mesh_from_resources``). Medians of
   ``--repeat`` runs.
2. **A change reaching every ztunnel**, as processes on loopback: ``ambient control-plane
   --config`` (watching the file every 0.1 s) and two ``ambient ztunnel --xds-address``. A pod is
   appended to the mesh file; the clock runs from the write until both ztunnels' ``config_dump``
   list it (polled every 10 ms). Medians of ``--changes`` changes. The watch interval is part of
   the figure (on average half of it).
3. **The same on the netns testbed** (``--testbed``, root): ``ambient testbed`` with ``xds``,
   two nodes whose in-pod ztunnels are fed by the control plane on the first node (watching
   every 0.2 s); each node's ``config_dump`` is read inside its namespace (``curl``, so a
   poll takes some milliseconds more).

Benchmarks never fail on a figure: the exit status is 0 unless nothing could be measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from ambient.config import load_mesh  # noqa: E402
from ambient.identity import CertificateAuthority  # noqa: E402
from ambient.testbed.control_plane import ControlPlaneProcess  # noqa: E402
from ambient.xds import messages as m  # noqa: E402
from ambient.xds.translate import mesh_from_resources, resources  # noqa: E402
from ambient.ztunnel.process import ZtunnelProcess  # noqa: E402
from benchmarks import harness  # noqa: E402
from benchmarks.generate_mesh import write  # noqa: E402

WATCH_INTERVAL = 0.1


def large_push(work: Path, pods: int, repeat: int) -> dict[str, Any]:
    path = work / "large.yaml"
    with open(path, "w") as f:
        write(f, pods, pods // 5, pods // 5, seed=1)
    mesh = load_mesh([path])
    make, parse, apply = [], [], []
    sizes: dict[str, int] = {}
    for _ in range(repeat):
        started = time.perf_counter()
        addresses, authorizations = resources(mesh)
        responses = {
            m.ADDRESS_TYPE: m.DeltaDiscoveryResponse(
                type_url=m.ADDRESS_TYPE,
                resources=[
                    m.Resource(
                        name=n,
                        resource=m.AnyMessage(type_url=m.ADDRESS_TYPE, value=r.SerializeToString()),
                    )
                    for n, r in addresses.items()
                ],
            ),
            m.AUTHORIZATION_TYPE: m.DeltaDiscoveryResponse(
                type_url=m.AUTHORIZATION_TYPE,
                resources=[
                    m.Resource(
                        name=n,
                        resource=m.AnyMessage(
                            type_url=m.AUTHORIZATION_TYPE, value=r.SerializeToString()
                        ),
                    )
                    for n, r in authorizations.items()
                ],
            ),
        }
        wire = {t: r.SerializeToString() for t, r in responses.items()}
        make.append(time.perf_counter() - started)
        sizes = {t.rsplit(".", 1)[-1]: len(b) for t, b in wire.items()}
        started = time.perf_counter()
        parsed = {t: m.DeltaDiscoveryResponse.FromString(b) for t, b in wire.items()}
        got_addresses = {
            r.name: m.Address.FromString(r.resource.value) for r in parsed[m.ADDRESS_TYPE].resources
        }
        got_authz = {
            r.name: m.Authorization.FromString(r.resource.value)
            for r in parsed[m.AUTHORIZATION_TYPE].resources
        }
        parse.append(time.perf_counter() - started)
        started = time.perf_counter()
        back = mesh_from_resources(got_addresses, got_authz)
        apply.append(time.perf_counter() - started)
    return {
        "pods": len(mesh.workloads),
        "services": len(mesh.services),
        "policies": len(mesh.policies),
        "address_resources": len(addresses),
        "authorization_resources": len(authorizations),
        "push_bytes": sizes,
        "push_bytes_per_workload": round(sizes["Address"] / len(mesh.workloads), 1),
        "server_make_ms": round(statistics.median(make) * 1000, 2),
        "client_parse_ms": round(statistics.median(parse) * 1000, 2),
        "client_snapshot_ms": round(statistics.median(apply) * 1000, 2),
        "round_trip_workloads": len(back.workloads),
    }


MESH = """
apiVersion: v1
kind: Namespace
metadata: {name: default, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: default}
spec: {nodeName: n1, serviceAccountName: client}
status: {podIP: 127.75.1.1}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: default}
spec: {nodeName: n2, serviceAccountName: web}
status: {podIP: 127.75.2.1}
"""


def pod(i: int) -> str:
    return f"""
---
apiVersion: v1
kind: Pod
metadata: {{name: extra-{i}, namespace: default}}
spec: {{nodeName: n{1 + i % 2}, serviceAccountName: extra}}
status: {{podIP: 127.75.3.{i + 1}}}
"""


def pods_of(node: ZtunnelProcess) -> set[str]:
    dump = json.loads(urllib.request.urlopen(f"http://{node.admin}/config_dump", timeout=5).read())
    return {w["name"] for w in dump["workloads"]}


def change_latency(work: Path, changes: int) -> dict[str, Any]:
    ca = CertificateAuthority.create("cluster.local")
    ca.save(work / "ca")
    mesh_file = work / "mesh.yaml"
    mesh_file.write_text(MESH)
    control = ControlPlaneProcess(
        [mesh_file], work / "ca", "127.0.0.1:0", watch_interval=WATCH_INTERVAL
    ).wait_ready()
    address = control.address
    nodes = []
    latencies = []
    try:
        for name in ("n1", "n2"):
            nodes.append(
                ZtunnelProcess(
                    name,
                    [],
                    work / "ca",
                    work,
                    "--xds-address", address,
                    "--ca-address", address,
                    "--ca-root-cert", str(work / "ca" / "root-cert.pem"),
                ).wait_ready()
            )  # fmt: skip
        text = MESH
        for i in range(changes):
            text += pod(i)
            time.sleep(0.3)  # not in the same watch tick as the last change
            started = time.perf_counter()
            tmp = mesh_file.with_suffix(".tmp")
            tmp.write_text(text)
            os.replace(tmp, mesh_file)
            want = f"extra-{i}"
            deadline = started + 30
            while not all(want in pods_of(n) for n in nodes):
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"{want} did not reach both ztunnels in 30 s")
                time.sleep(0.01)
            latencies.append(time.perf_counter() - started)
    finally:
        for n in nodes:
            n.stop()
        control.stop()
    return {
        "changes": len(latencies),
        "watch_interval_s": WATCH_INTERVAL,
        "median_ms": round(statistics.median(latencies) * 1000, 1),
        "max_ms": round(max(latencies) * 1000, 1),
        "min_ms": round(min(latencies) * 1000, 1),
    }


def testbed_change_latency(work: Path, changes: int) -> dict[str, Any]:
    from ambient import examples
    from ambient.testbed import netns
    from ambient.testbed.testbed import running

    mesh_file = work / "testbed" / "mesh.yaml"
    mesh_file.parent.mkdir(parents=True)
    text = examples.read("testbed-mesh.yaml")
    mesh_file.write_text(text)
    latencies = []
    with running([mesh_file], mesh_file.parent, xds=True) as bed:

        def pods_on(node: str) -> set[str]:
            proxy = bed.proxy(node)
            out = netns.run(
                ["curl", "-s", f"http://{proxy.admin}/config_dump"],
                netns=bed.nodes[node].node.netns,
            )
            return {w["name"] for w in json.loads(out)["workloads"]}

        for i in range(changes):
            text += f"""
---
apiVersion: v1
kind: Pod
metadata: {{name: extra-{i}, namespace: default}}
spec: {{nodeName: w1, serviceAccountName: extra}}
status: {{podIP: 10.40.1.{100 + i}}}
"""
            time.sleep(0.5)
            started = time.perf_counter()
            tmp = mesh_file.with_suffix(".tmp")
            tmp.write_text(text)
            os.replace(tmp, mesh_file)
            want = f"extra-{i}"
            deadline = started + 30
            while not all(want in pods_on(n) for n in bed.nodes):
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"{want} did not reach every ztunnel in 30 s")
            latencies.append(time.perf_counter() - started)
    return {
        "nodes": 2,
        "changes": len(latencies),
        "watch_interval_s": 0.2,
        "median_ms": round(statistics.median(latencies) * 1000, 1),
        "max_ms": round(max(latencies) * 1000, 1),
        "min_ms": round(min(latencies) * 1000, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pods", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--changes", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--testbed", action="store_true", help="also on the netns testbed (needs root)"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-xds-") as tmp:
        work = Path(tmp)
        push = large_push(work, args.pods, args.repeat)
        print(json.dumps(push), flush=True)
        latency = change_latency(work, args.changes)
        print(json.dumps(latency), flush=True)
        on_testbed = testbed_change_latency(work, args.changes) if args.testbed else None
        if on_testbed:
            print(json.dumps(on_testbed), flush=True)
    report = {
        "benchmark": "xds_push",
        "command": harness.command_line(),
        "machine": {
            "cores": os.cpu_count(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "python": sys.version.split()[0],
        },
        "large_push": push,
        "change_to_every_ztunnel": latency,
        "change_to_every_ztunnel_netns_testbed": on_testbed,
    }
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
