"""What a pair of ztunnels costs a connection, beside direct TCP in the same run.

Two ``ambient ztunnel`` processes (nodes n1 and n2, loopback mode), a client pod on n1 and a
server pod on n2 whose application is a compiled echo server (``upstream.go``); a compiled load
generator (``loadgen.go``) plays the client application, through n1's SOCKS5 port (loopback mode
has no capture), so the path is app -> ztunnel n1 -> HBONE (mutual TLS, pooled) -> ztunnel n2 ->
app. Each round measures, interleaved, direct TCP to the app and the same through the mesh:

- latency of 1 KB request/response on one established connection (p50, p90, p99);
- new connections per second (8 in flight), each doing one 1 KB request/response; and the CPU
  the two ztunnels spent per 1,000 connections.

A HAProxy pair doing mutual TLS between the same two addresses is measured beside them as a
peer (it opens a new TLS connection per client connection; ztunnel multiplexes them over one
pooled HBONE connection).

    python benchmarks/compare_ztunnel.py --rounds 5 --out benchmarks/results/ztunnel.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from harness import command_line, cpu_seconds, haproxy_mtls_pair, portable_path

from ambient import _core
from ambient.identity import CertificateAuthority
from ambient.ztunnel.process import ZtunnelProcess

HERE = Path(__file__).parent
CLIENT_IP, SERVER_IP, APP_IP = "127.30.1.1", "127.30.2.1", "127.31.2.1"
MESH = f"""
apiVersion: v1
kind: Namespace
metadata: {{name: bench, labels: {{istio.io/dataplane-mode: ambient}}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: bench}}
spec: {{nodeName: n1, serviceAccountName: client}}
status: {{podIP: {CLIENT_IP}}}
---
apiVersion: v1
kind: Pod
metadata:
  name: server
  namespace: bench
  annotations: {{ambient.dev/app-address: {APP_IP}}}
spec: {{nodeName: n2, serviceAccountName: server,
        containers: [{{name: app, ports: [{{containerPort: 8080}}]}}]}}
status: {{podIP: {SERVER_IP}}}
"""


def go_build(source: Path, out: Path) -> Path:
    if shutil.which("go") is None:
        raise SystemExit("compare_ztunnel.py needs Go to build its load generator and upstream")
    subprocess.run(
        ["go", "build", "-o", str(out), str(source)],
        check=True,
        env={**os.environ, "GO111MODULE": "off"},
    )
    return out


def loadgen(binary: Path, *args: str) -> dict:
    result = subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"loadgen {args}: {result.stderr.strip()}")
    return json.loads(result.stdout)


def machine() -> dict:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "?",
    )
    return {
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "core_build": _core.build_profile(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if _core.build_profile() != "release":
        print("warning: ambient._core is not a release build; figures are meaningless")

    with tempfile.TemporaryDirectory(prefix="ambient-bench-") as tmp:
        work = Path(tmp)
        lg = go_build(HERE / "loadgen.go", work / "loadgen")
        up_bin = go_build(HERE / "upstream.go", work / "upstream")
        (work / "mesh.yaml").write_text(textwrap.dedent(MESH))
        CertificateAuthority.create().save(work / "ca")
        app = subprocess.Popen(
            [str(up_bin), "-address", f"{APP_IP}:8080"], stdout=subprocess.PIPE, text=True
        )
        assert app.stdout is not None and app.stdout.readline().startswith("ready")
        nodes = [
            ZtunnelProcess(n, [work / "mesh.yaml"], work / "ca", work).wait_ready()
            for n in ("n1", "n2")
        ]
        direct = ["-target", f"{APP_IP}:8080", "-source", CLIENT_IP]
        mesh = [
            "-target",
            f"{SERVER_IP}:8080",
            "-socks",
            f"{CLIENT_IP}:15080",
            "-source",
            CLIENT_IP,
        ]
        rounds = []
        haproxy = haproxy_mtls_pair(work / "ca", (APP_IP, 8080))
        entry = haproxy.__enter__()
        peer = ["-target", f"{entry[0]}:{entry[1]}"]
        try:
            for r in range(args.rounds):
                row: dict = {}
                for name, route in (("direct", direct), ("mesh", mesh), ("haproxy", peer)):
                    row[f"{name}_rr"] = loadgen(lg, "rr", *route, "-n", str(args.requests))
                    cpu0 = sum(cpu_seconds(n.process.pid) for n in nodes)
                    row[f"{name}_conn"] = loadgen(
                        lg,
                        "conn",
                        *route,
                        "-seconds",
                        str(args.seconds),
                        "-c",
                        str(args.concurrency),
                    )
                    row[f"{name}_conn"]["ztunnel_cpu_s"] = (
                        sum(cpu_seconds(n.process.pid) for n in nodes) - cpu0
                    )
                rounds.append(row)
                print(
                    f"round {r + 1}/{args.rounds}: "
                    f"p50 direct {row['direct_rr']['p50_us']:.0f} us, "
                    f"mesh {row['mesh_rr']['p50_us']:.0f} us, "
                    f"haproxy {row['haproxy_rr']['p50_us']:.0f} us; conn/s direct "
                    f"{row['direct_conn']['connections_per_second']:.0f}, "
                    f"mesh {row['mesh_conn']['connections_per_second']:.0f}, "
                    f"haproxy {row['haproxy_conn']['connections_per_second']:.0f}",
                    flush=True,
                )
        finally:
            haproxy.__exit__(None, None, None)
            for n in nodes:
                n.stop()
            app.terminate()

    def med(key: str, field: str) -> float:
        return statistics.median(r[key][field] for r in rounds)

    conn_mesh = med("mesh_conn", "connections_per_second")
    conn_direct = med("direct_conn", "connections_per_second")
    cpu_per_k = statistics.median(
        r["mesh_conn"]["ztunnel_cpu_s"] / (r["mesh_conn"]["connections"] / 1000) for r in rounds
    )

    def three(field: str) -> dict:
        return {k: med(f"{k}_rr", field) for k in ("direct", "mesh", "haproxy")}

    summary = {
        "rr_p50_us": three("p50_us"),
        "rr_p90_us": three("p90_us"),
        "rr_p99_us": three("p99_us"),
        "added_p50_us": statistics.median(
            r["mesh_rr"]["p50_us"] - r["direct_rr"]["p50_us"] for r in rounds
        ),
        "conn_per_s": {
            "direct": conn_direct,
            "mesh": conn_mesh,
            "haproxy": med("haproxy_conn", "connections_per_second"),
        },
        "added_p50_us_haproxy": statistics.median(
            r["haproxy_rr"]["p50_us"] - r["direct_rr"]["p50_us"] for r in rounds
        ),
        "conn_ratio": statistics.median(
            r["mesh_conn"]["connections_per_second"] / r["direct_conn"]["connections_per_second"]
            for r in rounds
        ),
        "ztunnel_cpu_s_per_1000_conn": cpu_per_k,
    }
    lat = {k: summary[f"rr_{k}_us"] for k in ("p50", "p90", "p99")}
    table = [
        "| what | direct TCP | two ztunnels (HBONE) | HAProxy mTLS pair | ztunnels vs direct |",
        "|---|---:|---:|---:|---:|",
        *(
            f"| 1 KB request/response {k} | {v['direct']:.0f} µs | {v['mesh']:.0f} µs | "
            f"{v['haproxy']:.0f} µs | +{v['mesh'] - v['direct']:.0f} µs |"
            for k, v in lat.items()
        ),
        f"| new connections/s (1 KB each, {args.concurrency} in flight) | {conn_direct:.0f} | "
        f"{conn_mesh:.0f} | {summary['conn_per_s']['haproxy']:.0f} | "
        f"{summary['conn_ratio']:.3f}x |",
        f"| ztunnel CPU per 1,000 connections (both) | - | {cpu_per_k:.3f} s | - | |",
    ]
    print("\n".join(table))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps(
                {
                    "command": command_line(),
                    "machine": machine(),
                    "settings": vars(args) | {"out": portable_path(args.out)},
                    "summary": summary,
                    "rounds": rounds,
                    "markdown": "\n".join(table),
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
