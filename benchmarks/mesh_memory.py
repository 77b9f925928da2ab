"""What holding a large mesh costs a node proxy: resident memory of an ambient ztunnel and of
Istio's ztunnel given the same 5,000 workloads and 1,000 Services, and no pods to serve.

    python benchmarks/mesh_memory.py --istio-ztunnel PATH [--pods 5000 --services 1000]

The mesh is generate_mesh.py's, translated by ambient and written in Istio ztunnel's local
config format (what its ``LOCAL_XDS_PATH`` reads; ambient reads the same file): both proxies
load the very same file; ambient is also given the Kubernetes YAML it was made from. Each runs
in a network namespace of its own, in-pod mode, with a CNI socket (ambient's ZDS server) that
hands it no pod, so what it holds is the mesh alone. The baseline in the same run is each proxy
holding an empty mesh (no workloads); RSS is read from /proc once the proxy is ready and has
settled, median of ``--runs`` starts. Without ``--istio-ztunnel`` only ambient is measured.
Needs root (network namespaces).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

from ambient.config import load_mesh  # noqa: E402
from ambient.identity import CertificateAuthority  # noqa: E402
from ambient.mesh import Mesh  # noqa: E402
from ambient.testbed import netns  # noqa: E402
from ambient.zds import ZdsServer  # noqa: E402
from benchmarks import compare_istio as ci  # noqa: E402
from benchmarks import generate_mesh, harness  # noqa: E402
from benchmarks.compare_throughput import machine_info  # noqa: E402

NODE = "node-none"  # no workload is on it: nothing to serve, only the mesh to hold
SETTLE = 3.0  # seconds between ready and reading RSS
START_TIMEOUT = 120.0


def local_config(mesh: Mesh) -> dict[str, Any]:
    """``mesh`` in Istio ztunnel's local config shape (camelCase, VIPs as network/ip, each
    workload's Services as {"ns/hostname": {port: targetPort}})."""
    backing: dict[str, dict[str, dict[int, int]]] = {}
    for svc in mesh.services:
        for ep in svc.endpoints:
            ports = {p: t for p, t in ep.ports.items()}
            backing.setdefault(ep.workload_uid, {})[f"{svc.namespace}/{svc.hostname}"] = ports
    workloads = [
        {
            "uid": w.uid,
            "name": w.name,
            "namespace": w.namespace,
            "serviceAccount": w.service_account,
            "trustDomain": w.trust_domain,
            "workloadIps": [str(ip) for ip in w.ips],
            "protocol": w.protocol.value,
            "node": w.node,
            "network": w.network,
            "canonicalName": w.canonical_name,
            "canonicalRevision": w.canonical_revision,
            "services": backing.get(w.uid, {}),
        }
        for w in mesh.workloads
    ]
    services = [
        {
            "name": s.name,
            "namespace": s.namespace,
            "hostname": s.hostname,
            "vips": [f"{net}/{ip}" for net, ip in s.vips],
            "ports": dict(s.ports),
        }
        for s in mesh.services
    ]
    return {"workloads": workloads, "services": services}


@contextmanager
def own_netns(name: str) -> Iterator[str]:
    """A network namespace of its own for one proxy (each binds the same ports)."""
    netns.create(name)
    try:
        netns.run(["ip", "link", "set", "lo", "up"], netns=name)
        yield name
    finally:
        netns.delete(name)


def answers_ready(ns: str) -> bool:
    """Both proxies answer readiness on 15021 once their CNI snapshot is acknowledged."""
    try:
        return ci.http_get(ns, "http://127.0.0.1:15021/healthz/ready", 1.0)[0] == 200
    except OSError:
        return False


def wait_until(ready: Any, proc: subprocess.Popen[bytes], what: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not ready():
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited {proc.returncode}: {log.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready after {START_TIMEOUT:g} s")
        time.sleep(0.1)


def measure(system: str, config: Path, work: Path, istio: Path | None) -> dict[str, Any]:
    """Start ``system`` on ``config`` once, return its RSS and how long it took to be ready."""
    zds = ZdsServer(work / f"zds-{system}.sock")
    zds.start()
    log = work / f"{system}.log"
    try:
        with own_netns(f"mm-{system}-{os.getpid()}") as ns, open(log, "wb") as out:
            if system == "ambient":
                argv = [
                    *("ip", "netns", "exec", ns, sys.executable, "-m", "ambient", "ztunnel"),
                    *("--config", str(config), "--node", NODE, "--ca-dir", str(work / "ca")),
                    *("--zds-socket", str(zds.path), "--access-log", "off"),
                    *("--admin-address", "127.0.0.1:15000"),
                    *("--readiness-address", "127.0.0.1:15021"),
                    *("--metrics-address", "127.0.0.1:15020"),
                ]
                env = dict(os.environ)
            else:
                assert istio is not None
                argv = ["ip", "netns", "exec", ns, str(istio)]
                env = {**os.environ, **ci.istio_ztunnel_env(config, zds.path, NODE)}
            started = time.monotonic()
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
            try:
                wait_until(lambda: zds.connected and answers_ready(ns), proc, system, log)
                ready_s = time.monotonic() - started
                time.sleep(SETTLE)
                # `ip netns exec` execs the proxy: the pid is the proxy's own.
                return {"rss_kib": ci.rss_kib(proc.pid), "ready_s": round(ready_s, 3)}
            finally:
                harness.stop_process(proc, timeout=10)
    finally:
        zds.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--istio-ztunnel", type=Path, help="a ztunnel binary built from Istio")
    parser.add_argument("--pods", type=int, default=5000)
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    systems = ["ambient"] + (["istio"] if args.istio_ztunnel else [])
    with tempfile.TemporaryDirectory(prefix="mesh-memory-") as tmp:
        work = Path(tmp)
        CertificateAuthority.create().save(work / "ca")
        text = io.StringIO()
        generate_mesh.write(text, args.pods, args.services, 0, seed=1)
        (work / "k8s.yaml").write_text(text.getvalue())
        mesh = load_mesh([work / "k8s.yaml"])
        configs = {"empty": work / "empty.yaml", "mesh": work / "mesh.yaml"}
        # YAML with integer port keys, as ztunnel's serde_yaml wants them.
        dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
        configs["empty"].write_text(yaml.dump({"workloads": [], "services": []}, Dumper=dumper))
        configs["mesh"].write_text(yaml.dump(local_config(mesh), Dumper=dumper))
        # ambient also holds the mesh as its users write it (Kubernetes YAML, what the local
        # config was made from); Istio's ztunnel reads only its local config.
        configs_of = {
            "ambient": {**configs, "kubernetes": work / "k8s.yaml"},
            "istio": configs,
        }
        readings: dict[str, dict[str, list[dict[str, Any]]]] = {s: {} for s in systems}
        for run in range(args.runs):
            for system in systems:
                for name, config in configs_of[system].items():
                    r = measure(system, config, work, args.istio_ztunnel)
                    readings[system].setdefault(name, []).append(r)
                    print(f"run {run + 1} {system} {name}: {r}", flush=True)
    summary: dict[str, Any] = {}
    for system, by in readings.items():
        empty = statistics.median(r["rss_kib"] for r in by["empty"]) / 1024
        full = statistics.median(r["rss_kib"] for r in by["mesh"]) / 1024
        summary[system] = {
            "rss_empty_mib": round(empty, 1),
            "rss_mesh_mib": round(full, 1),
            "growth_mib": round(full - empty, 1),
            "ready_empty_s": statistics.median(r["ready_s"] for r in by["empty"]),
            "ready_mesh_s": statistics.median(r["ready_s"] for r in by["mesh"]),
        }
        if "kubernetes" in by:
            k8s = statistics.median(r["rss_kib"] for r in by["kubernetes"]) / 1024
            summary[system]["rss_kubernetes_mib"] = round(k8s, 1)
            summary[system]["ready_kubernetes_s"] = statistics.median(
                r["ready_s"] for r in by["kubernetes"]
            )
    if "istio" in summary:
        summary["ambient/istio"] = {
            "rss_mesh": round(
                summary["ambient"]["rss_mesh_mib"] / summary["istio"]["rss_mesh_mib"], 2
            ),
            "growth": round(summary["ambient"]["growth_mib"] / summary["istio"]["growth_mib"], 2),
            "rss_kubernetes": round(
                summary["ambient"]["rss_kubernetes_mib"] / summary["istio"]["rss_mesh_mib"], 2
            ),
        }
    result = {
        "benchmark": "RSS of a node proxy holding a generated mesh and serving no pod",
        "command": harness.command_line(),
        "machine": machine_info(argparse.Namespace(python=sys.executable)),
        "mesh": {"workloads": len(mesh.workloads), "services": len(mesh.services)},
        "runs": args.runs,
        "summary": summary,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
