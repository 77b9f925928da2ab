"""ambient's ztunnel beside Istio's, carrying the same two pods on the netns testbed.

    python benchmarks/compare_istio.py --rounds 5 --out benchmarks/results/istio.json \\
        [--istio-ztunnel PATH] [--pin]

Needs root (network namespaces), Go (it builds ``loadgen.go`` and ``upstream.go``), ``ip``,
``iptables-restore``, ``iperf3`` (and ``taskset`` for ``--pin``). One testbed
(``ambient.testbed``) is up for the whole run: nodes ``cmp-a`` and ``cmp-b`` (namespaces
``node-cmp-a``, ``node-cmp-b``) on a bridge in ``cmp-underlay``, pod ``cmp-client`` on cmp-a and
pod ``cmp-server`` on cmp-b, both in the mesh with istio-cni's in-pod rules, each node's CNI side
of ZDS on its socket. The mesh is ONE file in Istio ztunnel's local config format
(``workloads:``/``services:``), read by the testbed, by ``ambient ztunnel`` and, as
``LOCAL_XDS_PATH``, by Istio's ztunnel. The systems, measured between the same two pods:

- ``capture-off``: the pods' redirection rules removed; plain TCP, routed by the two nodes.
- ``ambient``: one ``ambient ztunnel`` per node in in-pod mode, as the testbed starts them.
- ``istio``: (``--istio-ztunnel PATH``) Istio's own ztunnel, one per node, in the node's
  namespace, on the same ZDS sockets: ``FAKE_CA=true XDS_ADDRESS="" LOCAL_XDS_PATH=<mesh>
  PROXY_MODE=shared INPOD_UDS=<node socket> NODE_NAME=<node> CLUSTER_ID=Kubernetes
  ISTIO_META_DNS_CAPTURE=false``; ready when ``127.0.0.1:15021/healthz/ready`` in the node's
  namespace says 200 and the CNI side has its snapshot acked. FAKE_CA (certificates from a test
  root compiled in, so the two trust each other) needs a build with ``--features testing``:
  ``cargo build --release --features testing`` in a checkout of github.com/istio/ztunnel (its
  ``.cargo/config.toml`` puts the binary in ``out/rust/release/ztunnel``). This project never
  downloads or builds it. Without it, ambient is compared with capture-off only.

Each round measures every system once, the order rotated by one per round. A proxied system
gets a fresh pair of proxies at the start of its reading (the other pair is stopped; the CNI
socket hands the pods to whichever connects). Its figures, in this order: RSS of each proxy
idle; RSS after 10,000 connections (one 1 KB request each); the RSS one idle connection costs
with 5,000 held open; one ``iperf3`` stream (Gbit/s); 1 KB request/response at a fixed 1,000 req/s
over 16 keep-alive connections (p50/p99 from when each request was due); the most req/s over 16
keep-alive connections; new connections/s with 16 in flight, one 1 KB request each (the
headline), with the CPU seconds both proxies spend per 1,000. ``capture-off`` has the traffic
figures only. Every figure records the CPU seconds both proxies used during it
(``/proc/<pid>/stat``, all threads) and the cores that makes.

A figure counts only if it went the way it claims: through a pair, both proxies'
``istio_tcp_connections_opened_total`` (mutual TLS; ``reporter="source"`` on the client's node,
``"destination"`` on the server's) must have grown by at least the connections made, and for
iperf3 their byte counters by at least what iperf3 received; with capture off, no ``istio_tcp_*``
counter of the running pair may move. Others are reported as invalid and left out. Benchmarks
never fail on a figure: the exit status is 0 unless nothing at all could be measured.

Fairness: both proxies run their default worker threads; ambient's connection caps are off
(``--max-connections 0 --max-connections-per-source 0``: Istio's ztunnel has none, and 5,000
held connections from one pod exceed ambient's default 1,000 per source); access logs are off for
both (ambient ``--access-log off``, Istio ``RUST_LOG=error``), or with ``--access-log file`` one
line per connection to a file for both (Istio ``RUST_LOG=error,access=info``, stdout to a file).
Both pods get ``tcp_tw_reuse=1`` and source ports 1024-65535, so tens of thousands of short
connections from one address do not run out of ports (TIME_WAIT), whichever system runs.

``--pin``: every load tool (iperf3 both ends, loadgen, the echo upstream) on CPU 0, both
proxies (all their threads) on CPU 1.

The JSON report (``--out``) holds the command line, the machine, the versions (ambient's git
revision and core's sha256, the Istio binary's ``ztunnel version`` and sha256), per system and
figure the median, min-max and spread over the rounds, the same-round ratios ambient/Istio and
ambient/capture-off, and per round each figure with what its check counted (no raw samples).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from ambient.config import load_mesh  # noqa: E402
from ambient.config.ztunnel_local import istio_differences  # noqa: E402
from ambient.testbed import TestbedError, netns, network  # noqa: E402
from ambient.testbed.testbed import Testbed  # noqa: E402
from benchmarks import harness  # noqa: E402
from benchmarks.compare_testbed import (  # noqa: E402
    LOAD_CPU,
    PROXY_CPU,
    _sigterm,
    link_mtu,
    machine_busy_seconds,
    pin_ztunnels,
    signals_deferred,
)
from benchmarks.compare_throughput import first_line, machine_info  # noqa: E402
from benchmarks.compare_ztunnel import go_build  # noqa: E402

HERE = Path(__file__).resolve().parent
CLIENT_POD, SERVER_POD = "cmp-client", "cmp-server"
CLIENT_NODE, SERVER_NODE = "cmp-a", "cmp-b"
CLIENT_IP, SERVER_IP = "10.78.1.1", "10.78.2.1"
NAMESPACE = "bench"
UNDERLAY, UNDERLAY_NETNS = "10.253.0.0/24", "cmp-underlay"
APP_PORT, IPERF3_PORT = 8080, 5201
# Everything the testbed creates; other testbeds on this machine must use none of these names.
NETNS_NAMES = (UNDERLAY_NETNS, f"node-{CLIENT_NODE}", f"node-{SERVER_NODE}", CLIENT_POD, SERVER_POD)

BASELINE = "capture-off"
DESCRIPTIONS = {
    "capture-off": (
        "cmp-client -> node cmp-a -> underlay bridge -> node cmp-b -> cmp-server (plain TCP, "
        "redirection rules removed, no proxy)"
    ),
    "ambient": (
        "cmp-client (captured) -> ambient ztunnel cmp-a -> HBONE (h2 CONNECT over mTLS 1.3) -> "
        "ambient ztunnel cmp-b -> cmp-server (captured)"
    ),
    "istio": (
        "cmp-client (captured) -> Istio ztunnel cmp-a -> HBONE (h2 CONNECT over mTLS 1.3) -> "
        "Istio ztunnel cmp-b -> cmp-server (captured)"
    ),
}

# Istio's fixed ports inside the node's namespace (ambient's are in its ready line).
ISTIO_METRICS, ISTIO_READINESS = "127.0.0.1:15020", "127.0.0.1:15021"
# How long a pair gets to start, and the counters to show a reading's connections.
START_TIMEOUT = 30.0
METRICS_WAIT = 5.0
# With capture off nothing is expected: a stray count gets this long to show up.
BYPASS_WAIT = 0.5
# Before reading a proxy's RSS: let it settle after starting, or after the last connection.
SETTLE = 1.0
OPENED = "istio_tcp_connections_opened"
BYTES = ("istio_tcp_received_bytes", "istio_tcp_sent_bytes")
# What the pods get so that tens of thousands of short connections from one IP to one port do
# not run out of source ports (TIME_WAIT) within a run; the same for every system.
POD_SYSCTLS = {"net.ipv4.tcp_tw_reuse": "1", "net.ipv4.ip_local_port_range": "1024 65535"}
# ambient's bounds off, as Istio's ztunnel has none (5,000 held connections from one pod exceed
# the default 1,000 per source); the access log as --access-log says.
AMBIENT_ARGS = ("--max-connections", "0", "--max-connections-per-source", "0")


def mesh_yaml() -> str:
    """The mesh in Istio ztunnel's local config format (what ``LOCAL_XDS_PATH`` reads)."""

    def workload(pod: str, ip: str, node: str) -> str:
        return f"""\
- uid: Kubernetes//Pod/{NAMESPACE}/{pod}
  name: {pod}
  namespace: {NAMESPACE}
  serviceAccount: {pod}
  trustDomain: cluster.local
  workloadIps: ["{ip}"]
  protocol: HBONE
  node: {node}
  network: ""
  services: {{}}
"""

    return (
        "# Written by benchmarks/compare_istio.py: Istio ztunnel's local config format, read by\n"
        "# the testbed, by ambient ztunnel and by Istio's ztunnel (LOCAL_XDS_PATH).\n"
        "workloads:\n"
        + workload(CLIENT_POD, CLIENT_IP, CLIENT_NODE)
        + workload(SERVER_POD, SERVER_IP, SERVER_NODE)
        + "services: []\n"
    )


# --------------------------------------------------------------------------------------------
# preflight, versions


def preflight(args: argparse.Namespace) -> str | None:
    """Why the benchmark cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (it builds network namespaces)"
    tools = ["go", "ip", "iptables-restore", "iptables-save", "iperf3", "sysctl"]
    absent = [t for t in [*tools, *(["taskset"] if args.pin else [])] if shutil.which(t) is None]
    if absent:
        return f"not installed: {', '.join(absent)}"
    if args.pin and (os.cpu_count() or 1) < 2:
        return "--pin needs at least 2 CPUs"
    if args.istio_ztunnel is not None:
        path = args.istio_ztunnel
        if not path.is_file() or not os.access(path, os.X_OK):
            return f"--istio-ztunnel {path}: not an executable file"
    left = [n for n in NETNS_NAMES if netns.exists(n)]
    if left:
        return (
            f"netns {', '.join(left)} already exist(s) (another run of this benchmark, or one "
            "that was killed?); if none is running: `ip netns delete <name>` for each"
        )
    return None


def ambient_revision() -> dict[str, Any]:
    """The git revision of this checkout, and whether it has uncommitted changes."""

    def git(*argv: str) -> str:
        return subprocess.run(
            ["git", "-C", str(REPO), *argv], capture_output=True, text=True, timeout=10
        ).stdout.strip()

    try:
        return {
            "git_revision": git("rev-parse", "HEAD") or "unknown",
            "uncommitted_changes": bool(git("status", "--porcelain", "--untracked-files=no")),
        }
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"git_revision": f"unknown ({e})"}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def core_sha256() -> str | None:
    """The sha256 of the ``ambient._core`` every new ambient ztunnel loads (each ambient reading
    starts a fresh pair, so a core rebuilt during the run would change what is measured)."""
    import importlib.util

    with contextlib.suppress(ImportError, ValueError, OSError):
        spec = importlib.util.find_spec("ambient._core")
        if spec is not None and spec.origin:
            return sha256(Path(spec.origin))
    return None


def istio_version(path: Path) -> dict[str, Any]:
    """What Istio's binary says it is (``ztunnel version``; it has no ``--version``) and its
    sha256."""
    try:
        said = subprocess.run(
            [str(path), "version"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        said = f"unavailable ({e})"
    return {"binary": harness.portable_path(path), "version": said, "sha256": sha256(path)}


# --------------------------------------------------------------------------------------------
# the proxies' counters and memory


def http_get(netns_name: str, url: str, timeout: float = 5.0) -> tuple[int, str]:
    """GET ``url`` from inside ``netns_name``: (status, body); no proxy from the environment."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def fetch() -> tuple[int, str]:
        try:
            with opener.open(url, timeout=timeout) as response:
                return int(response.status), response.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as e:
            return int(e.code), e.read().decode("utf-8", "replace")

    return netns.in_netns(netns_name, fetch)


_SAMPLE = re.compile(r"^(istio_tcp_[a-z_]+?)(?:_total)?\{(.*)\}\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')

# (metric without _total, reporter, connection_security_policy) -> value
Counts = dict[tuple[str, str, str], float]


def tcp_counts(text: str) -> Counts:
    """The ``istio_tcp_*`` counters of a Prometheus (or OpenMetrics) text, summed by metric,
    reporter and security policy."""
    counts: Counts = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m is None:
            continue
        labels = dict(_LABEL.findall(m.group(2)))
        key = (m.group(1), labels.get("reporter", ""), labels.get("connection_security_policy", ""))
        counts[key] = counts.get(key, 0.0) + float(m.group(3))
    return counts


def rss_kib(pid: int) -> int:
    """The resident set of process ``pid`` in KiB (``VmRSS``)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise ValueError(f"no VmRSS for pid {pid}")


def istio_ztunnel_env(
    mesh: Path, zds_socket: Path, node: str, *, access_log: bool = False
) -> dict[str, str]:
    """The environment Istio's ztunnel runs in here: its local config file ``mesh`` instead of
    istiod, a fake CA, in-pod mode with pods from the CNI socket ``zds_socket``, serving
    ``node``."""
    return {
        "FAKE_CA": "true",
        "XDS_ADDRESS": "",
        "LOCAL_XDS_PATH": str(mesh),
        "PROXY_MODE": "shared",
        "INPOD_UDS": str(zds_socket),
        "NODE_NAME": node,
        "CLUSTER_ID": "Kubernetes",
        "ISTIO_META_DNS_CAPTURE": "false",
        # As the testbed's ambient ztunnels (--drain-deadline 1).
        "CONNECTION_TERMINATION_DEADLINE": "1s",
        # Errors only; with access_log, also its access log (one line per connection).
        "RUST_LOG": "error,access=info" if access_log else "error",
    }


@dataclass
class Pair:
    """The node proxies running now: ambient's (the testbed's) or Istio's (ours)."""

    system: str
    pids: dict[str, int]
    metrics: dict[str, str]  # node -> host:port of /metrics inside the node's namespace
    netns: dict[str, str]  # node -> its namespace
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)  # Istio's
    logs: dict[str, Path] = field(default_factory=dict)
    start_s: float = 0.0

    def counts(self) -> dict[str, Counts]:
        return {
            node: tcp_counts(http_get(self.netns[node], f"http://{addr}/metrics")[1])
            for node, addr in self.metrics.items()
        }

    def cpu(self) -> dict[str, float] | None:
        try:
            return {node: harness.cpu_seconds(pid) for node, pid in self.pids.items()}
        except (OSError, ValueError):
            return None

    def rss(self) -> dict[str, int]:
        return {node: rss_kib(pid) for node, pid in self.pids.items()}

    def alive(self) -> None:
        for node, pid in self.pids.items():
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                raise RuntimeError(f"{self.system} proxy of {node} has exited") from None
            proc = self.processes.get(node)
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(
                    f"{self.system} proxy of {node} exited (status {proc.returncode}): "
                    + log_tail(self.logs.get(node))
                )


def log_tail(path: Path | None, limit: int = 2000) -> str:
    if path is None:
        return ""
    try:
        return path.read_bytes()[-limit:].decode("utf-8", "replace").strip()
    except OSError:
        return ""


def delta(after: Counts, before: Counts) -> Counts:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}


def proxied_check(d: dict[str, Counts], connections: int, min_bytes: int) -> dict[str, Any]:
    """Did ``connections`` (carrying ``min_bytes``) go client node -> mTLS -> server node?"""

    def total(node: str, metric: str, reporter: str) -> float:
        return sum(
            v
            for (m, rep, policy), v in d[node].items()
            if m == metric and rep == reporter and policy == "mutual_tls"
        )

    out: dict[str, Any] = {"expected_connections": connections}
    problems = []
    for node, reporter in ((CLIENT_NODE, "source"), (SERVER_NODE, "destination")):
        opened = out[f"opened_{reporter}"] = int(total(node, OPENED, reporter))
        if opened < connections:
            problems.append(
                f"{node} reporter={reporter}: {opened} mTLS connections opened, expected at "
                f"least {connections}"
            )
        if min_bytes:
            carried = out[f"bytes_{reporter}"] = int(max(total(node, m, reporter) for m in BYTES))
            if carried < min_bytes:
                problems.append(
                    f"{node} reporter={reporter}: {carried} bytes counted, iperf3 received "
                    f"{min_bytes}"
                )
    if min_bytes:
        out["expected_bytes"] = min_bytes
    out["problems"] = problems
    out["ok"] = not problems
    return out


def bypass_check(d: dict[str, Counts]) -> dict[str, Any]:
    """With capture off, no counter of the running pair may have moved."""
    moved = {node: {"/".join(k): int(v) for k, v in c.items()} for node, c in d.items() if c}
    problems = [
        f"{node}: {', '.join(f'{k} +{v}' for k, v in c.items())}" for node, c in moved.items()
    ]
    return {"ok": not problems, "moved": moved, "problems": problems}


# --------------------------------------------------------------------------------------------
# the run


class Bench:
    """The testbed, the tools inside it, the pair of proxies running now, and the figures."""

    def __init__(self, args: argparse.Namespace, bed: Testbed, workdir: Path, mesh: Path) -> None:
        self.args = args
        self.bed = bed
        self.workdir = workdir
        self.mesh = mesh
        self.loadgen = workdir / "loadgen"
        self.pair: Pair | None = None
        self.load_pin = harness.taskset_prefix(LOAD_CPU if args.pin else None)

    # --- pairs ----------------------------------------------------------------------------

    def ambient_pair(self) -> Pair:
        bed = self.bed
        return Pair(
            "ambient",
            {node: bed.proxy(node).process.pid for node in bed.nodes},
            {node: bed.proxy(node).metrics for node in bed.nodes},
            {node: p.node.netns for node, p in bed.nodes.items()},
            logs={node: bed.proxy(node).log_path for node in bed.nodes},
        )

    def use(self, system: str) -> Pair:
        """A fresh pair of ``system`` ("ambient" or "istio"), the previous one stopped."""
        self.stop_pair()
        t0 = time.monotonic()
        if system == "ambient":
            self.bed.start_proxies()
            pair = self.ambient_pair()
        else:
            pair = self.start_istio()
        pair.start_s = round(time.monotonic() - t0, 2)
        self.pair = pair
        if self.args.pin:
            pin_ztunnels(pair.pids)
        return pair

    def stop_pair(self) -> None:
        pair, self.pair = self.pair, None
        if pair is not None and pair.system == "istio":
            for proc in pair.processes.values():
                harness.stop_process(proc, timeout=10)
        self.bed.stop_proxies()  # ambient's, if they run
        # The CNI side notices the disconnect a moment later; the next pair must not take the
        # old connection's state for its own.
        deadline = time.monotonic() + 10
        while any(p.zds.connected for p in self.bed.nodes.values()):
            if time.monotonic() > deadline:
                raise RuntimeError("the ZDS sockets still show a connected proxy")
            time.sleep(0.02)

    def istio_env(self, node: str) -> dict[str, str]:
        return istio_ztunnel_env(
            self.mesh,
            self.bed.nodes[node].zds.path,
            node,
            access_log=self.args.access_log == "file",
        )

    def start_istio(self) -> Pair:
        binary = self.args.istio_ztunnel.resolve()
        pair = Pair("istio", {}, {}, {})
        try:
            for node, proxy in self.bed.nodes.items():
                log = self.workdir / f"istio-{node}.log"
                with open(log, "ab") as out:
                    proc = subprocess.Popen(
                        [harness.IP, "netns", "exec", proxy.node.netns, str(binary)],
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        env={**os.environ, **self.istio_env(node)},
                        # In our session, as the testbed starts ambient's: with the scheduler's
                        # autogroups a session of its own gets a CPU share of its own when the
                        # cores are contended, and would favour one pair over the other.
                        start_new_session=False,
                    )
                pair.processes[node], pair.pids[node], pair.logs[node] = proc, proc.pid, log
                pair.metrics[node] = ISTIO_METRICS
                pair.netns[node] = proxy.node.netns
            self.pair = pair  # stopped by stop_pair() from now on, whatever happens
            deadline = time.monotonic() + START_TIMEOUT
            for node, proxy in self.bed.nodes.items():
                while True:
                    pair.alive()
                    ready = proxy.zds.connected and self._istio_ready(pair.netns[node])
                    if ready:
                        break
                    if time.monotonic() > deadline:
                        raise RuntimeError(
                            f"Istio ztunnel {node} not ready after {START_TIMEOUT:g} s "
                            f"(ZDS snapshot acked: {proxy.zds.connected}): "
                            + log_tail(pair.logs[node])
                        )
                    time.sleep(0.05)
        except BaseException:
            for proc in pair.processes.values():
                harness.stop_process(proc, timeout=10)
            self.pair = None
            raise
        return pair

    @staticmethod
    def _istio_ready(netns_name: str) -> bool:
        try:
            return http_get(netns_name, f"http://{ISTIO_READINESS}/healthz/ready", 1.0)[0] == 200
        except OSError:
            return False

    # --- tools ----------------------------------------------------------------------------

    def run_loadgen(self, mode: str, *flags: str, timeout: float) -> dict[str, Any]:
        argv = [
            *harness.netns_prefix(CLIENT_POD),
            *self.load_pin,
            str(self.loadgen),
            mode,
            "-target",
            f"{SERVER_IP}:{APP_PORT}",
            "-size",
            str(self.args.size),
            *flags,
        ]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise RuntimeError(f"loadgen {mode} timed out after {timeout:g} s") from e
        if done.returncode != 0:
            raise RuntimeError(f"loadgen {mode}: {done.stderr.strip()[-1000:]}")
        result: dict[str, Any] = json.loads(done.stdout)
        return result

    @contextlib.contextmanager
    def holding(self, n: int) -> Iterator[dict[str, Any]]:
        """``loadgen hold``: n connections open (each after one request) for the block."""
        argv = [
            *harness.netns_prefix(CLIENT_POD),
            *self.load_pin,
            str(self.loadgen),
            "hold",
            "-target",
            f"{SERVER_IP}:{APP_PORT}",
            "-size",
            str(self.args.size),
            "-n",
            str(n),
            "-c",
            str(self.args.connections),
        ]
        proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        try:
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], 60 + n / 100)
            line = proc.stdout.readline() if ready else b""
            if not line:
                proc.kill()
                _, err = proc.communicate(timeout=10)
                raise RuntimeError(f"loadgen hold: no answer: {err.decode().strip()[-1000:]}")
            yield json.loads(line)
        finally:
            if proc.poll() is None:
                with contextlib.suppress(OSError):
                    assert proc.stdin is not None
                    proc.stdin.close()  # loadgen closes its connections and exits
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    # --- one observed piece of traffic ----------------------------------------------------

    def observed(
        self,
        system: str,
        work: Callable[[], dict[str, Any]],
        expect: Callable[[Any], tuple[int, int]],
    ) -> dict[str, Any]:
        """Run ``work`` (it returns its figures) with the proxies' CPU and counters around it;
        ``expect(figures)`` says (connections, bytes) the pair must have carried."""
        pair = self.pair
        assert pair is not None
        pair.alive()
        before = pair.counts()
        cpu0, busy0, t0 = pair.cpu(), machine_busy_seconds(), time.monotonic()
        figures = work()
        wall = time.monotonic() - t0
        cpu1, busy1 = pair.cpu(), machine_busy_seconds()
        out: dict[str, Any] = {**figures, "wall_s": round(wall, 3)}
        if cpu0 is not None and cpu1 is not None:
            used = sum(cpu1[n] - cpu0[n] for n in cpu0)
            out["proxy_cpu_s"] = round(used, 3)
            out["proxy_cores"] = round(used / wall, 3)
        if busy0 is not None and busy1 is not None:
            out["machine_busy_cores"] = round((busy1 - busy0) / wall, 3)
        if system == BASELINE:
            time.sleep(BYPASS_WAIT)
            check = bypass_check({n: delta(c, before[n]) for n, c in pair.counts().items()})
        else:
            connections, min_bytes = expect(figures)
            deadline = time.monotonic() + METRICS_WAIT
            while True:  # counts land a moment after the connections
                after = pair.counts()
                check = proxied_check(
                    {n: delta(c, before[n]) for n, c in after.items()}, connections, min_bytes
                )
                if check["ok"] or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
        out["check"] = check
        out["valid"] = check["ok"]
        return out

    # --- the figures ----------------------------------------------------------------------

    def iperf3(self, system: str) -> dict[str, Any]:
        def work() -> dict[str, Any]:
            r = harness.iperf3_run(
                SERVER_IP,
                IPERF3_PORT,
                self.args.seconds,
                taskset=LOAD_CPU if self.args.pin else None,
                netns=CLIENT_POD,
            )
            return {
                "gbps": round(r.receiver_gbps, 4),
                "retransmits": r.retransmits,
                "received_bytes": int(r.end.get("sum_received", {}).get("bytes", 0)),
            }

        return self.observed(system, work, lambda f: (1, f["received_bytes"]))

    def keepalive(self, system: str, rate: float) -> dict[str, Any]:
        flags = ["-c", str(self.args.connections), "-seconds", f"{self.args.seconds:g}"]
        if rate:
            flags += ["-rate", f"{rate:g}"]

        def work() -> dict[str, Any]:
            r = self.run_loadgen("load", *flags, timeout=self.args.seconds + 60)
            keep = ("requests", "failed", "requests_per_second", "p50_us", "p90_us", "p99_us")
            return {k: r[k] for k in (*keep, "max_us", "first_error") if k in r}

        out = self.observed(system, work, lambda f: (self.args.connections, 0))
        if rate and out.get("requests_per_second") and "proxy_cores" in out:
            out["proxy_cores_per_1k_rps"] = round(
                out["proxy_cores"] / (out["requests_per_second"] / 1000), 4
            )
        return out

    def new_connections(self, system: str, count: int = 0) -> dict[str, Any]:
        flags = ["-c", str(self.args.connections)]
        if count:  # a number of connections, however long they take
            flags += ["-count", str(count), "-seconds", "600"]
        else:
            flags += ["-seconds", f"{self.args.seconds:g}"]

        def work() -> dict[str, Any]:
            r = self.run_loadgen("conn", *flags, timeout=(660 if count else self.args.seconds + 60))
            keep = ("connections", "failed", "connections_per_second", "first_error")
            return {k: r[k] for k in keep if k in r}

        out = self.observed(system, work, lambda f: (int(f["connections"]), 0))
        if out.get("connections") and "proxy_cpu_s" in out:
            out["proxy_cpu_s_per_1k"] = round(out["proxy_cpu_s"] / (out["connections"] / 1000), 4)
        return out

    def memory(self, system: str) -> dict[str, Any]:
        """Idle RSS, RSS after ``--mem-connections`` connections, and the RSS held connections
        cost (the pair is fresh: no traffic has gone through it yet)."""
        pair = self.pair
        assert pair is not None
        time.sleep(SETTLE)
        out: dict[str, Any] = {"rss_idle_kib": pair.rss()}
        conns = self.new_connections(system, self.args.mem_connections)
        time.sleep(SETTLE)
        out["rss_after_conns_kib"] = pair.rss()
        out["after_conns"] = conns
        before = pair.rss()

        def work() -> dict[str, Any]:
            with self.holding(self.args.hold) as held:
                time.sleep(SETTLE)
                rss = pair.rss()
            return {**held, "rss_held_kib": rss}

        hold = self.observed(system, work, lambda f: (int(f["held"]), 0))
        hold["rss_before_kib"] = before
        held = int(hold.get("held", 0))
        if held:
            grown = sum(hold["rss_held_kib"][n] - before[n] for n in before)
            hold["kib_per_conn"] = round(grown / held, 3)
        if hold.get("failed"):
            hold["valid"] = False
            hold["check"]["problems"].append(
                f"{hold['failed']} of {self.args.hold} connections failed: "
                f"{hold.get('first_error', '?')}"
            )
        out["hold"] = hold
        return out

    # --- one reading ------------------------------------------------------------------------

    def reading(self, system: str) -> dict[str, Any]:
        """Every figure of ``system`` once."""
        out: dict[str, Any] = {}
        if system == BASELINE:
            if self.pair is None:  # something whose counters must stay still
                self.use("ambient")
            assert self.pair is not None
            out["pair_running"] = self.pair.system
        else:
            self.use(system)
        on = system != BASELINE
        for pod in (CLIENT_POD, SERVER_POD):
            self.bed.set_capture(pod, on)
        assert self.pair is not None
        out["pair_start_s"] = self.pair.start_s if on else None
        steps: list[tuple[str, Callable[[], dict[str, Any]]]] = []
        if on:
            steps.append(("memory", lambda: self.memory(system)))
        steps += [
            ("iperf3", lambda: self.iperf3(system)),
            ("fixed_rate", lambda: self.keepalive(system, self.args.rate)),
            ("max_rps", lambda: self.keepalive(system, 0)),
            ("new_connections", lambda: self.new_connections(system)),
        ]
        for name, step in steps:
            try:
                out[name] = step()
            except (RuntimeError, OSError, ValueError, KeyError, TestbedError) as e:
                detail = f"{type(e).__name__}: {e}"
                out[name] = {"error": detail}
                print(f"  {system} {name} failed: {first_line(detail)}", flush=True)
                if os.environ.get("BENCH_DEBUG"):
                    traceback.print_exc()
                if self.pair is not None:
                    try:
                        self.pair.alive()
                    except RuntimeError:
                        break  # the pair is gone: nothing else of this reading can work
        return out


# --------------------------------------------------------------------------------------------
# figures


def mean_mib(by_node: dict[str, int]) -> float:
    return statistics.fmean(by_node.values()) / 1024


def figures_of(r: dict[str, Any]) -> tuple[dict[str, float], list[str]]:
    """The figures of one reading that passed their check, and the problems of those that did
    not (a figure that failed its check or could not be measured is left out)."""
    fig: dict[str, float] = {}
    problems: list[str] = []

    def part(name: str) -> dict[str, Any] | None:
        p = r.get(name)
        if not isinstance(p, dict):
            return None
        if "error" in p:
            problems.append(f"{name}: {first_line(p['error'])}")
            return None
        if not p.get("valid"):
            problems.append(f"{name}: INVALID: " + "; ".join(p["check"].get("problems", [])))
            return None
        return p

    def cores(prefix: str, p: dict[str, Any]) -> None:
        """The proxies' cores during the figure, and how busy the whole machine was."""
        for k in ("proxy_cores", "machine_busy_cores"):
            if k in p:
                fig[f"{prefix}_{k}"] = p[k]

    if (p := part("iperf3")) is not None:
        fig["iperf3_gbps"] = p["gbps"]
        cores("iperf3", p)
    if (p := part("fixed_rate")) is not None:
        if p.get("failed"):
            problems.append(f"fixed_rate: {p['failed']} requests failed: {p.get('first_error')}")
        else:
            fig["rate_p50_us"], fig["rate_p99_us"] = p["p50_us"], p["p99_us"]
            fig["rate_achieved_rps"] = p["requests_per_second"]
            if "proxy_cores_per_1k_rps" in p:
                fig["rate_proxy_cores_per_1k_rps"] = p["proxy_cores_per_1k_rps"]
            cores("rate", p)
    if (p := part("max_rps")) is not None:
        fig["max_rps"] = p["requests_per_second"]
        cores("max_rps", p)
    if (p := part("new_connections")) is not None:
        fig["conn_per_s"] = p["connections_per_second"]
        cores("conn", p)
        if "proxy_cpu_s_per_1k" in p:
            fig["conn_cpu_s_per_1k"] = p["proxy_cpu_s_per_1k"]
        if p.get("failed"):
            problems.append(f"new_connections: {p['failed']} failed: {p.get('first_error')}")
    if r.get("pair_start_s"):  # from starting the pair to both proxies ready
        fig["pair_start_s"] = r["pair_start_s"]
    mem = r.get("memory")
    if isinstance(mem, dict):
        if "error" in mem:
            problems.append(f"memory: {first_line(mem['error'])}")
        else:
            fig["rss_idle_mib"] = mean_mib(mem["rss_idle_kib"])
            after = mem["after_conns"]
            if after.get("valid") and not after.get("failed"):
                fig["rss_after_conns_mib"] = mean_mib(mem["rss_after_conns_kib"])
            else:
                problems.append(
                    "memory (connections): "
                    + "; ".join(
                        after["check"].get("problems", []) or [str(after.get("first_error"))]
                    )
                )
            hold = mem["hold"]
            if hold.get("valid") and "kib_per_conn" in hold:
                fig["held_kib_per_conn"] = hold["kib_per_conn"]
            else:
                problems.append("memory (held): " + "; ".join(hold["check"].get("problems", [])))
    return fig, problems


def checks_of(r: dict[str, Any]) -> dict[str, Any]:
    """What each figure's check found: the connections (and bytes) the source and destination
    proxies counted, and the least expected; or, with capture off, whether any counter moved."""
    parts = {k: r.get(k) for k in ("iperf3", "fixed_rate", "max_rps", "new_connections")}
    mem = r.get("memory")
    if isinstance(mem, dict) and "error" not in mem:
        parts["after_conns"], parts["held"] = mem["after_conns"], mem["hold"]
    out = {}
    for name, p in parts.items():
        if not isinstance(p, dict) or "check" not in p:
            continue
        c = p["check"]
        if "moved" in c:  # capture-off
            out[name] = "moved: " + json.dumps(c["moved"]) if c["moved"] else "no counter moved"
            continue
        opened = f"{c['opened_source']}/{c['opened_destination']}"
        text = f"opened {opened} (>= {c['expected_connections']})"
        if "expected_bytes" in c:
            text += (
                f", bytes {c['bytes_source']}/{c['bytes_destination']} (>= {c['expected_bytes']})"
            )
        out[name] = text
    return out


def ratio_of(key: str, other: str) -> bool:
    """Whether the same-round ratio of ``key`` to ``other`` means something: not for how busy the
    machine was, nor for the proxies' cost beside capture-off (the pair only idles then)."""
    if key.endswith("_machine_busy_cores") or key == "rate_achieved_rps":
        return False
    return other != BASELINE or not ("proxy_cores" in key or key == "conn_cpu_s_per_1k")


def stats(values: list[float]) -> dict[str, Any]:
    s = harness.spread_stats(values)

    def r(v: float | None) -> float | None:
        return None if v is None else round(v, 4 if abs(v) < 10 else 1)

    return {
        "median": r(s["median"]),
        "min": r(s["min"]),
        "max": r(s["max"]),
        "spread_pct": None if s["spread_pct"] is None else round(s["spread_pct"], 1),
        "n": len(values),
    }


def summarise(
    rounds: list[dict[str, Any]], systems: tuple[str, ...]
) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """Per system and figure the median, min, max and spread over the valid readings; the
    same-round ratios ambient/Istio and ambient/capture-off per figure; and the per-round
    figures (compact)."""
    flat: list[dict[str, Any]] = []
    for r in rounds:
        fig, problems = figures_of(r["reading"])
        flat.append(
            {
                "round": r["round"],
                "position": r["position"],
                "system": r["system"],
                **{k: round(v, 4) for k, v in fig.items()},
                **({"problems": problems} if problems else {}),
                "checks": checks_of(r["reading"]),
            }
        )
    keys = sorted(
        {k for f in flat for k in f} - {"round", "position", "system", "problems", "checks"}
    )
    summary: dict[str, Any] = {}
    for system in systems:
        mine = [f for f in flat if f["system"] == system]
        summary[system] = {
            k: stats([float(f[k]) for f in mine if k in f])
            for k in keys
            if any(k in f for f in mine)
        }
        problems = [f"round {f['round']}: {p}" for f in mine for p in f.get("problems", [])]
        if problems:
            summary[system]["problems"] = problems
    ratios: dict[str, Any] = {}
    for other in [s for s in ("istio", BASELINE) if s in systems]:
        per_key = {}
        # With capture off the proxies only idle: no ratio to their cost then.
        for k in [k for k in keys if ratio_of(k, other)]:
            by_round = harness.same_round_ratios(flat, "ambient", other, key=k)
            if by_round:
                per_key[k] = {
                    "median": round(statistics.median(by_round.values()), 4),
                    "min": round(min(by_round.values()), 4),
                    "max": round(max(by_round.values()), 4),
                    "rounds": len(by_round),
                }
        ratios[f"ambient/{other}"] = per_key
    return summary, ratios, flat


# label, figure keys (shown "a / b"), format, shown for capture-off
ROWS: list[tuple[str, tuple[str, ...], str, bool]] = [
    ("one iperf3 stream, Gbit/s", ("iperf3_gbps",), "{:.2f}", True),
    (
        "1 KB at {rate} req/s, {c} keep-alive: p50 / p99 µs",
        ("rate_p50_us", "rate_p99_us"),
        "{:,.0f}",
        True,
    ),
    ("proxy cores per 1,000 req/s (both)", ("rate_proxy_cores_per_1k_rps",), "{:.3f}", False),
    ("max req/s, {c} keep-alive connections (1 KB)", ("max_rps",), "{:,.0f}", True),
    ("**new connections/s, {c} in flight (1 KB each)**", ("conn_per_s",), "{:,.0f}", True),
    ("**proxy CPU-s per 1,000 new connections (both)**", ("conn_cpu_s_per_1k",), "{:.3f}", False),
    ("RSS per proxy, idle, MiB", ("rss_idle_mib",), "{:.1f}", False),
    ("RSS per proxy after {mem} connections, MiB", ("rss_after_conns_mib",), "{:.1f}", False),
    ("KiB per idle held connection (both, {hold} held)", ("held_kib_per_conn",), "{:.1f}", False),
]


def markdown_table(
    summary: dict[str, Any],
    ratios: dict[str, Any],
    systems: tuple[str, ...],
    args: argparse.Namespace,
) -> str:
    istio = "istio" in systems
    other = "istio" if istio else BASELINE
    head = ["figure", "capture off", "ambient pair", *(["Istio pair"] if istio else [])]
    head.append(f"ambient / {'Istio' if istio else 'capture off'} (same round)")
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    names = {
        "rate": f"{args.rate:,.0f}",
        "c": str(args.connections),
        "mem": f"{args.mem_connections:,}",
        "hold": f"{args.hold:,}",
    }
    for label, keys, fmt, for_baseline in ROWS:

        def cell(
            system: str, keys: tuple[str, ...] = keys, fmt: str = fmt, base: bool = for_baseline
        ) -> str:
            if system == BASELINE and not base:
                return "-"
            got = [summary.get(system, {}).get(k, {}).get("median") for k in keys]
            return " / ".join("n/a" if v is None else fmt.format(v) for v in got)

        ratio = [ratios.get(f"ambient/{other}", {}).get(k, {}).get("median") for k in keys]
        ratio_text = " / ".join("-" if v is None else f"{v:.2f}" for v in ratio)
        row = [
            label.format(**names),
            *(cell(s) for s in (BASELINE, "ambient", *(["istio"] if istio else []))),
        ]
        lines.append("| " + " | ".join([*row, ratio_text]) + " |")
    notes = []
    for system in systems:
        for problem in summary.get(system, {}).get("problems", []):
            notes.append(f"- {system}: {first_line(problem, 300)}")
    pin = (
        f"load tools on CPU {LOAD_CPU}, both proxies on CPU {PROXY_CPU}" if args.pin else "unpinned"
    )
    footer = [
        "",
        f"Medians of {args.rounds} round(s), {args.seconds:g} s per timed figure, {pin}; "
        f"access logs {'to a file' if args.access_log == 'file' else 'off'} for both proxies.",
    ]
    if notes:
        footer += ["", "Left out (failed or did not go the way it claims):", *notes]
    return "\n".join([*lines, *footer])


# --------------------------------------------------------------------------------------------


def set_pod_sysctls() -> None:
    for pod in (CLIENT_POD, SERVER_POD):
        netns.run(["sysctl", "-q", "-w", *(f"{k}={v}" for k, v in POD_SYSCTLS.items())], netns=pod)


@contextlib.contextmanager
def testbed(workdir: Path, mesh: Path, ambient_args: list[str]) -> Iterator[Testbed]:
    """The benchmark's testbed, torn down whatever happens (Ctrl-C included, also half-way up)."""
    bed = Testbed(
        [mesh],
        workdir / "bed",
        underlay=UNDERLAY,
        underlay_netns=UNDERLAY_NETNS,
        ztunnel_args=ambient_args,
    )
    try:
        yield bed.up()
    finally:
        with signals_deferred():
            problems = bed.down()
            problems += network.teardown([n for n in NETNS_NAMES if netns.exists(n)])
            if problems:
                print("WARNING: testbed teardown left: " + "; ".join(problems), file=sys.stderr)


def show(system: str, rnd: int, reading: dict[str, Any]) -> None:
    fig, problems = figures_of(reading)

    def g(k: str, fmt: str) -> str:
        return fmt.format(fig[k]) if k in fig else "-"

    parts = [
        f"{g('iperf3_gbps', '{:.2f}')} Gbit/s",
        f"p50/p99 {g('rate_p50_us', '{:.0f}')}/{g('rate_p99_us', '{:.0f}')} µs",
        f"max {g('max_rps', '{:.0f}')} req/s",
        f"{g('conn_per_s', '{:.0f}')} conn/s",
        f"machine busy {g('conn_machine_busy_cores', '{:.2f}')} cores",
    ]
    if system != BASELINE:
        parts += [
            f"{g('conn_cpu_s_per_1k', '{:.3f}')} CPU-s/1k conn",
            f"RSS {g('rss_idle_mib', '{:.1f}')}/{g('rss_after_conns_mib', '{:.1f}')} MiB",
            f"{g('held_kib_per_conn', '{:.1f}')} KiB/held conn",
        ]
    print(f"round {rnd}: {system:11s} " + ", ".join(parts), flush=True)
    for problem in problems:
        print(f"WARNING: round {rnd}: {system}: does not count: {first_line(problem, 300)}")


def run_rounds(bench: Bench, systems: tuple[str, ...], rounds: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for rnd in range(rounds):
        shift = rnd % len(systems)
        order = systems[shift:] + systems[:shift]
        for position, system in enumerate(order):
            base = {"round": rnd + 1, "position": position + 1, "system": system}
            try:
                reading = bench.reading(system)
            except (
                RuntimeError,
                OSError,
                ValueError,
                TestbedError,
                harness.ProcessStartError,
            ) as e:
                detail = f"{type(e).__name__}: {e}"
                print(f"round {rnd + 1}: {system} failed: {first_line(detail, 300)}", flush=True)
                if os.environ.get("BENCH_DEBUG"):
                    traceback.print_exc()
                reading = {"error": detail}
                with contextlib.suppress(Exception):
                    bench.stop_pair()
            out.append({**base, "reading": reading})
            if "error" not in reading:
                show(system, rnd + 1, reading)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
    parser.add_argument(
        "--istio-ztunnel",
        type=Path,
        metavar="PATH",
        help="Istio's ztunnel binary (built with --features testing); without it, ambient is "
        "compared with capture-off only",
    )
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    parser.add_argument(
        "--seconds", type=float, default=5, help="length of each timed figure (default 5)"
    )
    parser.add_argument(
        "--rate", type=float, default=1000, help="the fixed request rate, req/s (default 1000)"
    )
    parser.add_argument(
        "--connections",
        type=int,
        default=16,
        help="keep-alive connections, and new connections in flight (default 16)",
    )
    parser.add_argument("--size", type=int, default=1024, help="request and response bytes (1024)")
    parser.add_argument(
        "--mem-connections",
        type=int,
        default=10000,
        help="connections before the second RSS reading (default 10000)",
    )
    parser.add_argument(
        "--hold", type=int, default=5000, help="connections held open for the per-connection RSS"
    )
    parser.add_argument(
        "--access-log",
        choices=("off", "file"),
        default="off",
        help="both proxies' access logs: off (default), or one line per connection to a file",
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help=f"taskset: load tools on CPU {LOAD_CPU}, both proxies on CPU {PROXY_CPU}",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    why = preflight(args)
    if why:
        print(f"compare_istio.py: {why}", file=sys.stderr)
        return 2
    systems: tuple[str, ...] = (BASELINE, "ambient", *(("istio",) if args.istio_ztunnel else ()))
    machine = machine_info(argparse.Namespace(python=sys.executable))
    machine.pop("haproxy", None)
    core = machine.get("ambient_core")
    profile = core.get("build_profile") if isinstance(core, dict) else None
    release = profile == "release"
    if not release:
        print(
            f"WARNING: ambient._core build profile is {profile!r}, not 'release': the figures "
            "will be meaningless and no report will be written",
            file=sys.stderr,
        )
    versions: dict[str, Any] = {"ambient": {**ambient_revision(), "core_sha256": core_sha256()}}
    if args.istio_ztunnel:
        versions["istio_ztunnel"] = istio_version(args.istio_ztunnel)
    ambient_args = [*AMBIENT_ARGS]
    ambient_args += ["--access-log", "off"] if args.access_log == "off" else []
    signal.signal(signal.SIGTERM, _sigterm)  # like Ctrl-C: unwind, so the testbed comes down
    rounds: list[dict[str, Any]] = []
    testbed_info: dict[str, Any] = {}
    istio_env: dict[str, str] | None = None
    started = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-istio-") as tmp:
            work = Path(tmp)
            mesh = work / "mesh.yaml"
            mesh.write_text(mesh_yaml())
            load_mesh([mesh])  # the file is one ambient reads...
            doc = yaml.safe_load(mesh.read_text())
            if notes := istio_differences(doc):  # ...and one Istio reads the same way
                raise RuntimeError(
                    "the mesh file means something else to Istio: " + "; ".join(notes)
                )
            go_build(HERE / "loadgen.go", work / "loadgen")
            go_build(HERE / "upstream.go", work / "upstream")
            with testbed(work, mesh, ambient_args) as bed:
                set_pod_sysctls()
                bench = Bench(args, bed, work, mesh)
                if args.istio_ztunnel:
                    placeholders = {"LOCAL_XDS_PATH": "<mesh file>", "INPOD_UDS": "<ZDS socket>"}
                    istio_env = {
                        k: placeholders.get(k, v) for k, v in bench.istio_env(CLIENT_NODE).items()
                    }
                bench.pair = bench.ambient_pair()
                if args.pin:
                    pin_ztunnels(bench.pair.pids)
                topology = bed.topology
                assert topology is not None
                testbed_info = {
                    "nodes": {n.name: str(n.underlay_ip) for n in topology.nodes},
                    "pods": {p.name: {"ip": str(p.ip), "node": p.node} for p in topology.pods},
                    "underlay": UNDERLAY,
                    "pod_mtu": link_mtu(CLIENT_POD),
                    "pod_sysctls": POD_SYSCTLS,
                    "mesh_yaml": mesh_yaml(),
                }
                pin = LOAD_CPU if args.pin else None
                upstream = [
                    *harness.netns_prefix(SERVER_POD),
                    *harness.taskset_prefix(pin),
                    str(work / "upstream"),
                    "-address",
                    f"0.0.0.0:{APP_PORT}",
                ]
                with (
                    harness.running(upstream),
                    harness.iperf3_server(IPERF3_PORT, SERVER_IP, taskset=pin, netns=SERVER_POD),
                ):
                    try:
                        rounds = run_rounds(bench, systems, args.rounds)
                    finally:
                        with signals_deferred():
                            bench.stop_pair()
    except KeyboardInterrupt:
        print("\ninterrupted; the testbed has been taken down", file=sys.stderr)
        return 130
    except (
        TestbedError,
        harness.ProcessStartError,
        RuntimeError,
        OSError,
        subprocess.SubprocessError,
    ) as e:
        print(f"compare_istio.py: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    elapsed = time.monotonic() - started
    core_changed = core_sha256() != versions["ambient"]["core_sha256"]
    if core_changed:
        versions["ambient"]["core_sha256_at_end"] = core_sha256()

    summary, ratios, per_round = summarise(rounds, systems)
    table = markdown_table(summary, ratios, systems, args)
    if core_changed:
        table += (
            "\n\nWARNING: ambient._core was replaced during the run: later ambient readings "
            "ran another core than earlier ones."
        )
    if not release:
        table += (
            f"\n\nWARNING: ambient._core build profile is {profile!r}, not 'release': "
            "these figures are meaningless and are not written anywhere."
        )
    print()
    print(table)
    print(f"\n({elapsed:.0f} s)")
    report = {
        "benchmark": (
            "two pods on two nodes of the netns testbed, carried by nothing (capture off), by a "
            "pair of ambient ztunnels"
            + (" and by a pair of Istio's ztunnels" if args.istio_ztunnel else "")
        ),
        "command": harness.command_line(),
        "settings": {
            "rounds": args.rounds,
            "seconds": args.seconds,
            "rate": args.rate,
            "connections": args.connections,
            "size": args.size,
            "mem_connections": args.mem_connections,
            "hold": args.hold,
            "systems": list(systems),
            "order": "rotated by one system per round; a proxied system starts a fresh pair",
            "pinned": args.pin,
            "descriptions": {s: DESCRIPTIONS[s] for s in systems},
            "access_logs": (
                "off for both: ambient --access-log off, Istio RUST_LOG=error"
                if args.access_log == "off"
                else "to a file for both: ambient --access-log <file> (JSON lines), Istio "
                "RUST_LOG=error,access=info with its stdout to a file"
            ),
            "ambient_args": [*AMBIENT_ARGS, "--drain-deadline", "1"]
            + (["--access-log", "off"] if args.access_log == "off" else []),
            "istio_env": istio_env,
            "validity": (
                "through a pair: both proxies' istio_tcp_connections_opened_total "
                "(connection_security_policy=mutual_tls; reporter=source on the client's node, "
                "destination on the server's) grew by at least the connections made, and for "
                "iperf3 their bytes by at least what iperf3 received; capture-off: no istio_tcp_* "
                "counter of the running pair moved"
            ),
            "figures": {
                "iperf3_gbps": "iperf3 -c, one stream, 128 KiB writes, receiver side",
                "rate_p50_us/rate_p99_us": "loadgen load -rate: latency from when it was due",
                "rate_proxy_cores_per_1k_rps": "both proxies' cores / (achieved req/s / 1000)",
                "max_rps": "loadgen load: request/responses back to back on each connection",
                "conn_per_s": "loadgen conn: one 1 KB request/response per new connection",
                "conn_cpu_s_per_1k": "both proxies' CPU seconds / (connections / 1000)",
                "rss_*_mib": "VmRSS, mean of the two proxies",
                "held_kib_per_conn": "both proxies' VmRSS growth with the connections held / held",
            },
        },
        "versions": versions,
        "testbed": testbed_info,
        "machine": machine,
        "elapsed_s": round(elapsed),
        "summary": summary,
        "same_round_ratios": ratios,
        "rounds": per_round,
        "markdown": table,
    }
    if args.out:
        if release:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=1) + "\n")
            print(f"\nwrote {args.out}")
        else:
            print(f"\nWARNING: NOT writing {args.out}: not a release build of ambient._core")
    measured = any(k != "problems" for figures in summary.values() for k in figures)
    return 0 if measured else 1


if __name__ == "__main__":
    sys.exit(main())
