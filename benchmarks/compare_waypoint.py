"""HTTP through the waypoint, beside HAProxy doing the same job, on the netns testbed.

    python benchmarks/compare_waypoint.py --rounds 3 --seconds 8 \\
        --out benchmarks/results/waypoint.json

Needs root (network namespaces), ``ip``, ``iptables-restore``, ``haproxy`` and ``fortio``
(``go install fortio.org/fortio@v1.63.3``; looked up on PATH, then in ~/go/bin). One testbed:
nodes ``wpb-a`` and ``wpb-b``; pod ``wpb-client`` (in the mesh) and pod ``wpb-waypoint`` (the
waypoint Gateway's, outside the capture) on wpb-a; pod ``wpb-server`` (in the mesh, ``fortio
server`` on 8080) on wpb-b. ``fortio load`` runs inside wpb-client: HTTP/1.1 keep-alive, 16
connections, 1 KiB POST bodies echoed back, once at a fixed 1,000 requests/s and once as fast as
it goes. Five paths, each measured in every round, in an order rotated by one per round:

- ``direct``: capture off on both pods, fortio to the server pod's IP.
- ``ztunnels``: to a Service without a waypoint: client pod -> ztunnel wpb-a -> HBONE ->
  ztunnel wpb-b -> server (the in-pod capture of istio-cni's rules).
- ``waypoint``: to a Service bound to the waypoint, with an HTTPRoute routing /echo by path:
  client -> ztunnel -> HBONE -> ``ambient waypoint`` (its own pod) -> HBONE -> ztunnel -> server.
- ``haproxy-l4``: capture off; HAProxy in the client pod (plain TCP in, mutual TLS 1.3 out) and
  in the server pod (mutual TLS in, plain out): an L4 pair in the ztunnels' places.
- ``haproxy-waypoint``: that pair with an HAProxy in the waypoint pod between them, in the
  waypoint's role: mutual TLS 1.3 in, HTTP parsed, routed by path, ``x-request-id`` added,
  mutual TLS HTTP/2 out to the server side with connection reuse, one thread.

Before each reading a short run whose errors do not count sets the path's connections up (and
replaces any that died while the pods' rules were switched for the other paths). Reported per
path and mode (medians over rounds): requests/s, p50 and p99 latency; for the two
waypoints, the CPU their process used: cores per 1,000 requests/s at the fixed rate, CPU-ms per
1,000 requests at the maximum rate; the latency each waypoint adds over its own L4 pair; and
ambient's waypoint figures as ratios to HAProxy's, same round. A waypoint reading counts only if
the waypoint counted the requests in its ``istio_requests_total`` (and the ztunnels one only if it
counted none). Neither waypoint writes an access log (Istio's default, and the HAProxy config
here has none); ``--access-log`` turns ambient's JSON log on, to measure what it costs. Benchmarks
never fail on a figure: the exit status is 0 unless nothing at all could be measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from ambient.testbed import netns, network  # noqa: E402
from ambient.testbed.pods import listening_ports  # noqa: E402
from ambient.testbed.testbed import Testbed  # noqa: E402
from benchmarks import harness  # noqa: E402
from benchmarks.compare_testbed import machine_busy_seconds, signals_deferred  # noqa: E402
from benchmarks.compare_throughput import ambient_core_info  # noqa: E402

CLIENT, WAYPOINT, SERVER = "wpb-client", "wpb-waypoint", "wpb-server"
CLIENT_IP, WAYPOINT_IP, SERVER_IP = "10.46.1.1", "10.46.1.10", "10.46.2.1"
PLAIN_VIP, ROUTED_VIP = "10.98.46.10", "10.98.46.11"
UNDERLAY, UNDERLAY_NETNS = "10.255.46.0/24", "wpb-underlay"
NETNS_NAMES = (CLIENT, WAYPOINT, SERVER, "node-wpb-a", "node-wpb-b", UNDERLAY_NETNS)
APP_PORT = 8080
HAPROXY_L4_PORT, HAPROXY_WP_ENTRY = 18080, 18081  # in the client pod, on its loopback
HAPROXY_TLS_PORT, HAPROXY_H2_PORT, HAPROXY_WP_PORT = 16443, 16444, 16445
CONNECTIONS, BODY = 16, 1024
FIXED_RATE = 1000
PATHS = ("direct", "ztunnels", "waypoint", "haproxy-l4", "haproxy-waypoint")

MESH_YAML = f"""
apiVersion: v1
kind: Namespace
metadata: {{name: default, labels: {{istio.io/dataplane-mode: ambient}}}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: waypoint, namespace: default}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]
---
apiVersion: v1
kind: Pod
metadata:
  name: {WAYPOINT}
  namespace: default
  labels: {{gateway.networking.k8s.io/gateway-name: waypoint, istio.io/dataplane-mode: none}}
spec: {{nodeName: wpb-a, serviceAccountName: waypoint}}
status: {{podIP: {WAYPOINT_IP}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: {CLIENT}, namespace: default}}
spec: {{nodeName: wpb-a, serviceAccountName: client}}
status: {{podIP: {CLIENT_IP}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: {SERVER}, namespace: default, labels: {{app: server}}}}
spec:
  nodeName: wpb-b
  serviceAccountName: server
  containers: [{{name: app, ports: [{{name: http, containerPort: {APP_PORT}}}]}}]
status: {{podIP: {SERVER_IP}}}
---
apiVersion: v1
kind: Service
metadata: {{name: plain, namespace: default}}
spec:
  clusterIP: {PLAIN_VIP}
  selector: {{app: server}}
  ports: [{{name: http, port: 80, targetPort: {APP_PORT}}}]
---
apiVersion: v1
kind: Service
metadata: {{name: routed, namespace: default, labels: {{istio.io/use-waypoint: waypoint}}}}
spec:
  clusterIP: {ROUTED_VIP}
  selector: {{app: server}}
  ports: [{{name: http, port: 80, targetPort: {APP_PORT}}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: routed, namespace: default}}
spec:
  parentRefs: [{{group: "", kind: Service, name: routed}}]
  rules:
  - matches: [{{path: {{type: PathPrefix, value: /echo}}}}]
    backendRefs: [{{name: plain, port: 80}}]
  - matches: [{{path: {{type: PathPrefix, value: /other}}}}]
    backendRefs: [{{name: plain, port: 80}}]
"""

_GLOBAL = """\
global
    nbthread {nbthread}
    maxconn 4000
    ssl-default-bind-ciphersuites {suites}
    ssl-default-bind-options ssl-min-ver TLSv1.3 ssl-max-ver TLSv1.3
    ssl-default-server-ciphersuites {suites}
    ssl-default-server-options ssl-min-ver TLSv1.3 ssl-max-ver TLSv1.3

defaults
    timeout connect 5s
    timeout client 1m
    timeout server 1m
"""

# Client side (the client's ztunnel's place): plain TCP in, mutual TLS out, to `target`.
_L4_CLIENT = """
frontend plain_in
    mode tcp
    bind 127.0.0.1:{port}
    default_backend mtls_out

backend mtls_out
    mode tcp
    server next {target} ssl crt {crt} ca-file {ca} verify required
"""

# Server side (the server's ztunnel's place): mutual TLS in, plain TCP to the app; and, for the
# waypoint's second hop, mutual TLS HTTP/2 in (HTTP, as an HBONE server parses CONNECT).
_SERVER = """
frontend mtls_in
    mode tcp
    bind {ip}:{tls_port} ssl crt {crt} ca-file {ca} verify required
    default_backend app_tcp

frontend mtls_h2_in
    mode http
    bind {ip}:{h2_port} ssl crt {crt} ca-file {ca} verify required alpn h2
    default_backend app_http

backend app_tcp
    mode tcp
    server app 127.0.0.1:{app}

backend app_http
    mode http
    http-reuse always
    server app 127.0.0.1:{app}
"""

# The waypoint's role: mutual TLS 1.3 in, HTTP parsed, routed by path, x-request-id added when
# absent, mutual TLS HTTP/2 out with connection reuse; one thread.
_WAYPOINT = """
frontend mtls_http_in
    mode http
    bind {ip}:{port} ssl crt {crt} ca-file {ca} verify required
    http-request set-header x-request-id %[uuid()] unless {{ req.hdr(x-request-id) -m found }}
    http-request deny deny_status 404 unless {{ path_beg /echo }} || {{ path_beg /other }}
    use_backend server if {{ path_beg /echo }}
    use_backend server if {{ path_beg /other }}

backend server
    mode http
    http-reuse always
    server s {server}:{h2_port} ssl crt {crt} ca-file {ca} verify required alpn h2
"""


def fortio_binary() -> str | None:
    found = shutil.which("fortio")
    if found:
        return found
    home = Path.home() / "go" / "bin" / "fortio"
    return str(home) if home.exists() else None


def preflight() -> str | None:
    if os.geteuid() != 0:
        return "needs root (it builds network namespaces)"
    absent = [t for t in ("ip", "iptables-restore", "haproxy") if shutil.which(t) is None]
    if fortio_binary() is None:
        absent.append("fortio (go install fortio.org/fortio@v1.63.3)")
    if absent:
        return f"not installed: {', '.join(absent)}"
    left = [n for n in NETNS_NAMES if netns.exists(n)]
    if left:
        return f"netns {', '.join(left)} already exist (another run?): `ip netns delete` them"
    return None


@contextlib.contextmanager
def testbed(
    workdir: Path,
    waypoint_args: list[str] | None = None,
    access_log: bool = False,
    mesh_yaml: str = MESH_YAML,
) -> Iterator[Testbed]:
    mesh_file = workdir / "mesh.yaml"
    mesh_file.write_text(mesh_yaml)
    bed = Testbed(
        [mesh_file],
        workdir / "bed",
        underlay=UNDERLAY,
        underlay_netns=UNDERLAY_NETNS,
        waypoint_args=waypoint_args or [],
        waypoint_access_log=access_log,
    )
    try:
        yield bed.up()
    finally:
        with signals_deferred():
            problems = bed.down()
            problems += network.teardown([n for n in NETNS_NAMES if netns.exists(n)])
            if problems:
                print("WARNING: testbed teardown left: " + "; ".join(problems), file=sys.stderr)


def in_pod(pod: str, argv: list[str], **kw: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["ip", "netns", "exec", pod, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def wait_listening(pod: str, port: int, proc: subprocess.Popen[str], what: str) -> None:
    deadline = time.monotonic() + 15
    while port not in listening_ports(pod):
        if proc.poll() is not None or time.monotonic() > deadline:
            err = proc.stderr.read() if proc.stderr and proc.poll() is not None else ""
            raise RuntimeError(f"{what} did not start listening on {port} in {pod}: {err}")
        time.sleep(0.05)


@contextlib.contextmanager
def haproxies(bed: Testbed, workdir: Path) -> Iterator[dict[str, subprocess.Popen[str]]]:
    """The HAProxy chain, each in its pod's namespace, configs and PEM files under ``workdir``."""
    certs = harness.write_bench_certs(bed.workdir / "ca", workdir)
    suites = harness.TLS13_CIPHERSUITES
    common = {"crt": certs.client_pem, "ca": certs.roots_pem}
    configs = {
        "server": (
            SERVER,
            HAPROXY_TLS_PORT,
            _GLOBAL.format(nbthread=1, suites=suites)
            + _SERVER.format(
                ip=SERVER_IP,
                tls_port=HAPROXY_TLS_PORT,
                h2_port=HAPROXY_H2_PORT,
                app=APP_PORT,
                crt=certs.server_pem,
                ca=certs.roots_pem,
            ),
        ),
        "waypoint": (
            WAYPOINT,
            HAPROXY_WP_PORT,
            _GLOBAL.format(nbthread=1, suites=suites)
            + _WAYPOINT.format(
                ip=WAYPOINT_IP,
                port=HAPROXY_WP_PORT,
                server=SERVER_IP,
                h2_port=HAPROXY_H2_PORT,
                crt=certs.server_pem,
                ca=certs.roots_pem,
            ),
        ),
        "client-l4": (
            CLIENT,
            HAPROXY_L4_PORT,
            _GLOBAL.format(nbthread=1, suites=suites)
            + _L4_CLIENT.format(
                port=HAPROXY_L4_PORT, target=f"{SERVER_IP}:{HAPROXY_TLS_PORT}", **common
            ),
        ),
        "client-wp": (
            CLIENT,
            HAPROXY_WP_ENTRY,
            _GLOBAL.format(nbthread=1, suites=suites)
            + _L4_CLIENT.format(
                port=HAPROXY_WP_ENTRY, target=f"{WAYPOINT_IP}:{HAPROXY_WP_PORT}", **common
            ),
        ),
    }
    running: dict[str, subprocess.Popen[str]] = {}
    try:
        for name, (pod, port, config) in configs.items():
            path = workdir / f"haproxy-{name}.cfg"
            path.write_text(config)
            running[name] = in_pod(pod, ["haproxy", "-db", "-f", str(path)])
            wait_listening(pod, port, running[name], f"haproxy {name}")
        yield running
    finally:
        for proc in running.values():
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
            if proc.poll() is None:
                proc.kill()


def fortio_load(
    url: str, rate: int, seconds: float, headers: tuple[str, ...] = ()
) -> dict[str, Any]:
    argv = [
        fortio_binary() or "fortio",
        "load",
        "-qps", str(rate),
        "-c", str(CONNECTIONS),
        "-t", f"{seconds}s",
        "-payload-size", str(BODY),
        "-p", "50,99",
        "-a=false",
        "-json", "-",
        *[arg for h in headers for arg in ("-H", h)],
        url,
    ]  # fmt: skip
    out = subprocess.run(
        ["ip", "netns", "exec", CLIENT, *argv],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"fortio failed: {out.stderr.strip()[-400:]}")
    result = json.loads(out.stdout)
    percentiles = {p["Percentile"]: p["Value"] for p in result["DurationHistogram"]["Percentiles"]}
    codes = result.get("RetCodes", {})
    return {
        "requests": int(result["DurationHistogram"]["Count"]),
        "ok": int(codes.get("200", 0)),
        "rps": float(result["ActualQPS"]),
        "p50_ms": percentiles[50] * 1000,
        "p99_ms": percentiles[99] * 1000,
    }


def warm_up(url: str, headers: tuple[str, ...] = ()) -> None:
    """A short run whose errors do not count: connections are set up (TLS, pools) before the
    measured run, and ones that died while the pods' rules were changed are found and replaced
    (the first request on a connection whose peer vanished silently fails)."""
    argv = [fortio_binary() or "fortio", "load", "-qps", "0", "-c", str(CONNECTIONS)]
    argv += ["-n", str(CONNECTIONS * 20), "-payload-size", str(BODY), "-allow-initial-errors"]
    argv += [arg for h in headers for arg in ("-H", h)]
    subprocess.run(
        ["ip", "netns", "exec", CLIENT, *argv, url], capture_output=True, timeout=60, check=False
    )


def target(path: str) -> str:
    return {
        "direct": f"http://{SERVER_IP}:{APP_PORT}/echo",
        "ztunnels": f"http://{PLAIN_VIP}/echo",
        "waypoint": f"http://{ROUTED_VIP}/echo",
        "haproxy-l4": f"http://127.0.0.1:{HAPROXY_L4_PORT}/echo",
        "haproxy-waypoint": f"http://127.0.0.1:{HAPROXY_WP_ENTRY}/echo",
    }[path]


def waypoint_requests(bed: Testbed) -> int:
    """The requests the waypoint has answered: its ``istio_requests_total{reporter="waypoint"}``,
    read from its metrics endpoint inside its pod's namespace (no access log needed)."""
    url = f"http://{bed.waypoint(WAYPOINT).metrics}/metrics"
    fetch = (
        "import sys, urllib.request; "
        f"sys.stdout.write(urllib.request.urlopen({url!r}).read().decode())"
    )
    out = subprocess.run(
        ["ip", "netns", "exec", WAYPOINT, sys.executable, "-c", fetch],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    total = 0.0
    for line in out.splitlines():
        if line.startswith("istio_requests_total{") and 'reporter="waypoint"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def measure(
    bed: Testbed, path: str, mode: str, seconds: float, chain: dict[str, subprocess.Popen[str]]
) -> dict[str, Any]:
    captured = path in ("ztunnels", "waypoint")
    for pod in (CLIENT, SERVER):
        bed.set_capture(pod, captured)
    waypoint = bed.waypoint(WAYPOINT)
    pid = {
        "waypoint": waypoint.process.pid,
        "haproxy-waypoint": chain["waypoint"].pid,
    }.get(path)
    warm_up(target(path))
    answered_before = waypoint_requests(bed)
    cpu_before = harness.cpu_seconds(pid) if pid else None
    busy_before = machine_busy_seconds()
    started = time.monotonic()
    result = fortio_load(target(path), FIXED_RATE if mode == "fixed" else 0, seconds)
    elapsed = time.monotonic() - started
    reading: dict[str, Any] = {"path": path, "mode": mode, **result, "seconds": elapsed}
    busy_after = machine_busy_seconds()
    if busy_before is not None and busy_after is not None:
        reading["machine_cores_busy"] = (busy_after - busy_before) / elapsed
    if pid and cpu_before is not None:
        cpu = harness.cpu_seconds(pid) - cpu_before
        reading["proxy_cpu_seconds"] = cpu
        reading["cores_per_1000_rps"] = (cpu / elapsed) / (result["rps"] / 1000)
        reading["cpu_ms_per_1000_requests"] = cpu * 1000 / (result["requests"] / 1000)
    answered = waypoint_requests(bed) - answered_before
    through_waypoint = answered >= result["requests"] * 0.99
    reading["waypoint_answered"] = answered
    reading["valid"] = result["ok"] == result["requests"] and (
        through_waypoint if path == "waypoint" else answered == 0
    )
    return reading


def machine() -> dict[str, Any]:
    """The machine and build a run is measured on, for the report."""
    return {
        "cpu_model": next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            "unknown",
        ),
        "cores": os.cpu_count(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "ambient_core": ambient_core_info(),
    }


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarise(readings: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode in ("fixed", "max"):
        for path in PATHS:
            rows = [r for r in readings if r["path"] == path and r["mode"] == mode and r["valid"]]
            entry: dict[str, Any] = {"valid_rounds": len(rows)}
            for key in (
                "rps",
                "p50_ms",
                "p99_ms",
                "cores_per_1000_rps",
                "cpu_ms_per_1000_requests",
            ):
                values = [r[key] for r in rows if key in r]
                if values:
                    entry[key] = median(values)
                    entry[f"{key}_spread"] = [min(values), max(values)]
            out[f"{mode}/{path}"] = entry
    ratios: dict[str, Any] = {}
    for mode in ("fixed", "max"):
        by_round: dict[str, list[float]] = {}
        rounds = {r["round"] for r in readings}
        for rnd in rounds:
            got = {
                r["path"]: r
                for r in readings
                if r["round"] == rnd and r["mode"] == mode and r["valid"]
            }
            ours, theirs = got.get("waypoint"), got.get("haproxy-waypoint")
            l4_ours, l4_theirs = got.get("ztunnels"), got.get("haproxy-l4")
            if ours and theirs:
                key = "cores_per_1000_rps" if mode == "fixed" else "cpu_ms_per_1000_requests"
                by_round.setdefault(f"waypoint_cpu_vs_haproxy ({key})", []).append(
                    ours[key] / theirs[key]
                )
            if ours and theirs and l4_ours and l4_theirs:
                for q in ("p50_ms", "p99_ms"):
                    added_ours = ours[q] - l4_ours[q]
                    added_theirs = theirs[q] - l4_theirs[q]
                    by_round.setdefault(f"added_{q}_waypoint", []).append(added_ours)
                    by_round.setdefault(f"added_{q}_haproxy", []).append(added_theirs)
                    # Paired within the round: the machine's drift between rounds cancels.
                    by_round.setdefault(f"added_{q}_waypoint_minus_haproxy", []).append(
                        added_ours - added_theirs
                    )
        ratios[mode] = {k: median(v) for k, v in by_round.items()}
    out["same_round"] = ratios
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--waypoint-workers",
        type=int,
        default=1,
        help="the waypoint's core worker threads (default 1: HAProxy's role runs one thread)",
    )
    parser.add_argument(
        "--access-log",
        action="store_true",
        help="the waypoint writes its JSON access log (off by default, as Istio's default and "
        "the HAProxy chain here run; on, it measures what logging every request costs)",
    )
    args = parser.parse_args(argv)
    why = preflight()
    if why:
        print(f"compare_waypoint: {why}", file=sys.stderr)
        return 2
    readings: list[dict[str, Any]] = []
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-waypoint-") as tmp:
        work = Path(tmp)
        with testbed(
            work, ["--workers", str(args.waypoint_workers)], access_log=args.access_log
        ) as bed:
            server = in_pod(
                SERVER,
                [
                    fortio_binary() or "fortio",
                    "server",
                    "-http-port", f"0.0.0.0:{APP_PORT}",
                    "-grpc-port", "disabled",
                    "-redirect-port", "disabled",
                ],
            )  # fmt: skip
            try:
                wait_listening(SERVER, APP_PORT, server, "fortio server")
                with haproxies(bed, work) as chain:
                    for rnd in range(args.rounds):
                        order = PATHS[rnd % len(PATHS) :] + PATHS[: rnd % len(PATHS)]
                        for mode in ("fixed", "max"):
                            for path in order:
                                try:
                                    reading = measure(bed, path, mode, args.seconds, chain)
                                except Exception as e:  # reported; the run goes on
                                    failures.append(f"round {rnd} {mode} {path}: {e}")
                                    traceback.print_exc()
                                    continue
                                reading["round"] = rnd
                                readings.append(reading)
                                print(json.dumps(reading), flush=True)
            finally:
                server.terminate()
                server.wait(5)
    summary = summarise(readings)
    report = {
        "benchmark": "compare_waypoint",
        "command": harness.command_line(),
        "machine": {
            **machine(),
            "haproxy": harness.haproxy_version(),
            "fortio": subprocess.run(
                [fortio_binary() or "fortio", "version"], capture_output=True, text=True
            ).stdout.strip()
            or "unknown",
        },
        "setup": {
            "connections": CONNECTIONS,
            "body_bytes": BODY,
            "fixed_rate": FIXED_RATE,
            "seconds": args.seconds,
            "rounds": args.rounds,
            "waypoint_workers": args.waypoint_workers,
            "waypoint_access_log": args.access_log,
            "haproxy_threads": 1,
        },
        "summary": summary,
        "readings": readings,
        "failures": failures,
    }
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(json.dumps(summary, indent=2))
    return 0 if readings else 1


if __name__ == "__main__":
    sys.exit(main())
