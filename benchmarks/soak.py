"""Soak: mixed traffic through two in-pod ztunnels on the testbed while the config reloads,
certificates rotate, a pod is deleted and added back and the ztunnels get SIGHUP, every few
seconds. Checks that every byte sent on a connection that was not meant to be cut came back
intact, that the ztunnels' descriptors, threads and memory do not grow, and that their access
logs account for every connection.

    sudo python benchmarks/soak.py --duration 600 --json benchmarks/results/soak.json

Flows (the testbed's default mesh): C1 -> S1 across nodes and C3 -> S1 on one node, both over
HBONE; OUTSIDE -> S1 in plaintext into the mesh; C1 -> LEGACY out of the mesh. S1 is never
churned: none of these may fail. C2 -> S2, on the pod that is deleted and added back, may be
cut while S2 is away; its failures are counted, not held against the run. Besides the
back-to-back short connections, one long-lived connection per steady flow exchanges a message
every second for the whole run: reloads, rotations and the other pod's churn must not cut it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import signal
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ambient.examples import read as example
from ambient.testbed import netns
from ambient.testbed.pods import APP_PORT, serve_app
from ambient.testbed.testbed import Testbed

# (source pod, destination pod, destination IP, whether it may be cut by the churn)
FLOWS = (
    ("c1", "s1", "10.40.2.1", False),
    ("c3", "s1", "10.40.2.1", False),
    ("outside", "s1", "10.40.2.1", False),
    ("c1", "legacy", "10.40.2.9", False),
    ("c2", "s2", "10.40.1.5", True),
)
CHURNED_POD = "s2"
# Payload sizes of the short connections: mostly small requests, some bulk.
SIZES = (1_000, 1_000, 16_000, 200_000, 2_000_000)
EVENT_EVERY = 3.0  # seconds between disturbances
SAMPLE_EVERY = 10.0  # seconds between resource samples
CERT_TTL = 20  # seconds: certificates are renewed every 10 s
SOCKET_TIMEOUT = 15.0


@dataclass
class FlowStats:
    source: str
    destination: str
    may_be_cut: bool
    ok: int = 0
    failed: int = 0
    corrupted: int = 0
    bytes: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    # (source address, bytes sent, bytes answered) of answers that differ from what was sent.
    corruptions: list[tuple[str, int, int]] = field(default_factory=list)
    # Every source address the flow used (the access log names each): address -> connections.
    source_addresses: Counter[str] = field(default_factory=Counter)


def _exchange(sock: socket.socket, payload: bytes) -> bytes:
    """Send ``payload`` and half-close while reading the answer to its end."""
    failed: list[OSError] = []

    def send() -> None:
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
        except OSError as e:
            failed.append(e)

    sender = threading.Thread(target=send)
    sender.start()
    chunks = []
    try:
        while data := sock.recv(1 << 16):
            chunks.append(data)
    finally:
        sender.join()
    if failed:
        raise failed[0]
    return b"".join(chunks)


def short_connections(stats: FlowStats, ip: str, stop: threading.Event, seed: int) -> None:
    """Back-to-back connections from inside the source pod (this thread is in its netns)."""
    rng = random.Random(seed)
    while not stop.is_set():
        payload = rng.randbytes(rng.choice(SIZES))
        try:
            with socket.create_connection((ip, APP_PORT), timeout=SOCKET_TIMEOUT) as sock:
                address = "{}:{}".format(*sock.getsockname())
                stats.source_addresses[address] += 1
                answer = _exchange(sock, payload)
        except OSError as e:
            stats.failed += 1
            stats.errors[f"{type(e).__name__} ({len(payload)} bytes): {e}"] += 1
            time.sleep(0.05)
            continue
        if hashlib.sha256(answer).digest() == hashlib.sha256(payload).digest():
            stats.ok += 1
            stats.bytes += len(payload)
        elif not answer and stats.may_be_cut:
            stats.failed += 1
            stats.errors["closed without an answer"] += 1
        else:
            stats.corrupted += 1
            stats.corruptions.append((address, len(payload), len(answer)))


def long_connection(stats: FlowStats, ip: str, stop: threading.Event) -> None:
    """One connection for the whole run, a numbered message a second, each echoed intact."""
    try:
        sock = socket.create_connection((ip, APP_PORT), timeout=SOCKET_TIMEOUT)
    except OSError as e:
        stats.failed += 1
        stats.errors[f"long-lived connect: {type(e).__name__}"] += 1
        return
    with sock:
        stats.source_addresses["{}:{}".format(*sock.getsockname())] += 1
        n = 0
        while not stop.wait(1.0):
            message = f"message {n} ".encode() * 100
            try:
                sock.sendall(message)
                got = b""
                while len(got) < len(message):
                    data = sock.recv(len(message) - len(got))
                    if not data:
                        raise ConnectionError("closed by the mesh")
                    got += data
            except OSError as e:
                stats.failed += 1
                stats.errors[f"long-lived: {e}"] += 1
                return
            if got != message:
                stats.corrupted += 1
                return
            stats.ok += 1
            n += 1


def _in_pod(pod: str, fn: Any, *args: Any) -> threading.Thread:
    thread = threading.Thread(target=netns.in_netns, args=(pod, lambda: fn(*args)), daemon=True)
    thread.start()
    return thread


def _proc(pid: int) -> dict[str, int]:
    rss = next(
        int(line.split()[1])
        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if line.startswith("VmRSS:")
    )
    return {
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "threads": len(os.listdir(f"/proc/{pid}/task")),
        "rss_kib": rss,
    }


def _rewrite_mesh(template: str, mesh: Path, tick: int) -> None:
    """A config change that touches no listener: a label on a pod."""
    changed = template.replace("labels: {app: c1}", f"labels: {{app: c1, soak-tick: 't{tick}'}}")
    tmp = mesh.with_suffix(".tmp")
    tmp.write_text(changed)
    tmp.replace(mesh)


def disturb(bed: Testbed, template: str, mesh: Path, stop: threading.Event, log: Counter[str]):
    """Every EVENT_EVERY seconds, one of: a config reload, a SIGHUP to each ztunnel, the churned
    pod deleted (ZDS del), then added back (ZDS add). Certificates rotate on their own."""
    tick = 0
    while not stop.wait(EVENT_EVERY):
        tick += 1
        match tick % 4:
            case 0:
                _rewrite_mesh(template, mesh, tick)
                log["config rewritten"] += 1
            case 1:
                for node in bed.nodes:
                    bed.proxy(node).signal(signal.SIGHUP)
                log["SIGHUP"] += 1
            case 2:
                bed.remove_pod(CHURNED_POD)
                log["pod deleted"] += 1
            case 3:
                bed.add_pod(CHURNED_POD)
                log["pod added"] += 1
    if tick % 4 == 3:  # leave the churned pod served
        bed.add_pod(CHURNED_POD)


def access_log_counts(bed: Testbed) -> Counter[tuple[str, str, str, str]]:
    """Access-log lines per (node, direction, source workload, destination workload)."""
    counts: Counter[tuple[str, str, str, str]] = Counter()
    for node in bed.nodes:
        for line in bed.proxy(node).log_path.read_text().splitlines():
            e = json.loads(line)
            counts[(node, e.get("direction"), e.get("src.workload"), e.get("dst.workload"))] += 1
    return counts


def run(duration: float, workdir: Path, seed: int = 1) -> dict[str, Any]:
    template = example("testbed-mesh.yaml")
    mesh = workdir / "mesh.yaml"
    mesh.write_text(template)
    bed = Testbed(
        [mesh],
        workdir,
        underlay_netns="ambient-soak",
        ztunnel_args=("--certificate-ttl", str(CERT_TTL), "--watch-interval", "0.5"),
    ).up()
    try:
        return _soak(bed, template, mesh, duration, seed)
    finally:
        bed.down()


def _soak(bed: Testbed, template: str, mesh: Path, duration: float, seed: int):
    apps = [serve_app(pod, "echo") for pod in ("s1", "s2", "legacy")]
    pids = {node: bed.proxy(node).process.pid for node in bed.nodes}
    flows = [FlowStats(src, dst, cut) for src, dst, _, cut in FLOWS]
    longs = [FlowStats(src, dst, cut) for src, dst, _, cut in FLOWS if not cut]
    stop = threading.Event()
    events: Counter[str] = Counter()
    threads = [
        _in_pod(src, short_connections, stats, ip, stop, seed + i)
        for i, ((src, _, ip, _), stats) in enumerate(zip(FLOWS, flows, strict=True))
    ]
    threads += [
        _in_pod(stats.source, long_connection, stats, ip, stop)
        for stats, ip in zip(longs, [ip for *_, ip, cut in FLOWS if not cut], strict=True)
    ]
    disturber = threading.Thread(target=disturb, args=(bed, template, mesh, stop, events))
    samples: list[dict[str, Any]] = []
    started = time.monotonic()

    def sample() -> None:
        samples.append(
            {"t": round(time.monotonic() - started), **{n: _proc(p) for n, p in pids.items()}}
        )

    disturber.start()
    while (elapsed := time.monotonic() - started) < duration:
        sample()
        time.sleep(min(SAMPLE_EVERY, max(0.1, duration - elapsed)))
    stop.set()
    disturber.join(30)
    for thread in threads:
        thread.join(SOCKET_TIMEOUT + 5)
    for app in apps:
        app.close()
    time.sleep(2.0)  # the last connections' lines
    samples.append(
        {"t": round(time.monotonic() - started), **{n: _proc(p) for n, p in pids.items()}}
    )
    return report(bed, flows, longs, events, samples)


def report(bed, flows, longs, events, samples) -> dict[str, Any]:
    logged = access_log_counts(bed)
    node_of = {p.name: p.node for p in bed.topology.pods} if bed.topology else {}
    made: Counter[tuple[str, str, str, str]] = Counter()
    for stats in [*flows, *longs]:
        # The source's ztunnel logs each connection it carried (outbound); a pod outside the
        # mesh has none, its connection is logged inbound by the destination's.
        if stats.source == "outside":
            key = (node_of[stats.destination], "inbound", stats.source, stats.destination)
        else:
            key = (node_of[stats.source], "outbound", stats.source, stats.destination)
        made[key] += sum(stats.source_addresses.values())
    unaccounted = [
        f"{key}: {n} connections, {logged[key]} lines" for key, n in made.items() if logged[key] < n
    ]
    warm = samples[min(2, len(samples) - 1)]  # after 20 s: pools and caches are warm
    last = samples[-1]
    growth = {
        node: {k: last[node][k] - warm[node][k] for k in ("fds", "threads", "rss_kib")}
        for node in bed.nodes
    }
    return {
        "flows": [_flow(s) for s in flows],
        "long_lived": [_flow(s) for s in longs],
        "events": dict(events),
        "unaccounted": unaccounted,
        "growth_after_warmup": growth,
        "samples": samples,
    }


def _flow(stats: FlowStats) -> dict[str, Any]:
    out = asdict(stats)
    out["errors"] = dict(stats.errors)
    out["connections"] = sum(stats.source_addresses.values())
    del out["source_addresses"]
    return out


def problems(result: dict[str, Any], *, max_rss_growth_kib: int = 32 * 1024) -> list[str]:
    """What the run must not show."""
    found = []
    for flow in [*result["flows"], *result["long_lived"]]:
        name = f"{flow['source']}->{flow['destination']}"
        if flow["corrupted"]:
            found.append(f"{name}: {flow['corrupted']} answers differ from what was sent")
        if not flow["may_be_cut"] and flow["failed"]:
            found.append(f"{name}: {flow['failed']} failures on a flow never cut: {flow['errors']}")
        if flow["ok"] == 0:
            found.append(f"{name}: nothing got through")
    for line in result["unaccounted"]:
        found.append(f"missing from the access logs: {line}")
    for node, growth in result["growth_after_warmup"].items():
        if growth["fds"] > 20 or growth["threads"] > 5 or growth["rss_kib"] > max_rss_growth_kib:
            found.append(f"ztunnel {node} grew after warm-up: {growth}")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds (default 600)")
    parser.add_argument("--json", type=Path, help="write the result here")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--workdir", type=Path, help="keep the testbed's files (access logs) here; default a temp"
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("soak: needs root (network namespaces)", file=sys.stderr)
        return 2
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        result = run(args.duration, args.workdir, args.seed)
    else:
        with tempfile.TemporaryDirectory(prefix="ambient-soak-") as tmp:
            result = run(args.duration, Path(tmp), args.seed)
    result["machine"] = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    result["duration_s"] = args.duration
    found = problems(result)
    result["problems"] = found
    text = json.dumps(result, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    summary = {k: v for k, v in result.items() if k != "samples"}
    print(json.dumps(summary, indent=2))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
