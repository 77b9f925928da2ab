"""Throughput between two pods on two nodes: through the mesh vs the same pods with capture off.

    python benchmarks/compare_testbed.py --rounds 5 --seconds 5 \\
        --out benchmarks/results/testbed_iperf3.json [--pin]

Needs root (network namespaces), ``ip``, ``iptables-restore``, ``iperf3`` (and ``taskset`` for
``--pin``). One testbed (``ambient.testbed``) is brought up for the whole run: nodes ``bench-a``
and ``bench-b`` (namespaces ``node-bench-a``, ``node-bench-b``) on the underlay bridge in
``bench-underlay``, pod ``bench-client`` on bench-a and pod ``bench-server`` on bench-b, both in
the mesh, one ``ambient ztunnel`` per node in in-pod mode. ``iperf3 -s`` runs inside
bench-server for the whole run; each reading is one ``iperf3 -c`` inside bench-client:

- ``mesh``: both pods captured (istio-cni's in-pod rules): client pod -> ztunnel bench-a (its
  outbound listener in the client pod) -> HBONE (HTTP/2 CONNECT over mutual TLS 1.3) across the
  nodes -> ztunnel bench-b (its HBONE listener in the server pod) -> server pod.
- ``capture-off``: the same pods with the rules removed: plain TCP from pod to pod, routed by
  the two nodes over the same veths and bridge, no proxy.

Each round measures both, in an order rotated by one per round. A mesh reading counts only if
the client node's ztunnel logged the iperf3 connections as outbound HBONE (and the server
node's as inbound HBONE) carrying at least the bytes iperf3 received; a capture-off reading
only if neither ztunnel logged them. The CPU both ztunnel processes used during the transfer
(``/proc/<pid>/stat``) is reported in cores. Benchmarks never fail on a figure: the exit status
is 0 unless nothing at all could be measured.

``--pin``: both iperf3 ends on CPU 0, both ztunnel processes (all their threads) on CPU 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
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

from ambient.testbed import TestbedError, netns, network  # noqa: E402
from ambient.testbed.testbed import Testbed  # noqa: E402
from ambient.ztunnel.process import ZtunnelProcess  # noqa: E402
from benchmarks import harness  # noqa: E402
from benchmarks.compare_throughput import (  # noqa: E402
    ambient_core_info,
    first_line,
    machine_info,
)

CLIENT_POD, SERVER_POD = "bench-client", "bench-server"
CLIENT_NODE, SERVER_NODE = "bench-a", "bench-b"
CLIENT_IP, SERVER_IP = "10.77.1.1", "10.77.2.1"
UNDERLAY, UNDERLAY_NETNS = "10.254.0.0/24", "bench-underlay"
IPERF3_PORT = 5201
# Everything the testbed creates; other testbeds on this machine must use none of these names.
NETNS_NAMES = (UNDERLAY_NETNS, f"node-{CLIENT_NODE}", f"node-{SERVER_NODE}", CLIENT_POD, SERVER_POD)

SYSTEMS = ("mesh", "capture-off")
BASELINE = "capture-off"
DESCRIPTIONS = {
    "mesh": (
        "bench-client (captured) -> ztunnel bench-a -> HBONE (h2 CONNECT over mTLS 1.3) -> "
        "ztunnel bench-b -> bench-server (captured)"
    ),
    "capture-off": (
        "bench-client -> node bench-a -> underlay bridge -> node bench-b -> bench-server "
        "(plain TCP, redirection rules removed, no proxy)"
    ),
}

# With --pin: the load generator (both iperf3 ends) shares CPU 0; both ztunnels share CPU 1.
LOAD_CPU = "0"
PROXY_CPU = "1"
# How long a ztunnel gets to write the access log lines of connections that have just ended.
LOG_WAIT = 5.0
# iperf3 opens a control connection and one data connection (-P 1).
IPERF3_CONNECTIONS = 2

MESH_YAML = f"""\
# Written by benchmarks/compare_testbed.py: two nodes, one client and one iperf3 server pod.
apiVersion: v1
kind: Namespace
metadata:
  name: bench
  labels: {{istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {{name: {CLIENT_POD}, namespace: bench, labels: {{app: {CLIENT_POD}}}}}
spec: {{nodeName: {CLIENT_NODE}, serviceAccountName: {CLIENT_POD}}}
status: {{podIP: {CLIENT_IP}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: {SERVER_POD}, namespace: bench, labels: {{app: {SERVER_POD}}}}}
spec:
  nodeName: {SERVER_NODE}
  serviceAccountName: {SERVER_POD}
  containers:
  - name: iperf3
    ports:
    - {{name: iperf3, containerPort: {IPERF3_PORT}}}
status: {{podIP: {SERVER_IP}}}
"""


# --------------------------------------------------------------------------------------------
# the testbed


def preflight(pin: bool) -> str | None:
    """Why the benchmark cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (it builds network namespaces)"
    tools = ["ip", "iptables-restore", "iptables-save", "iperf3", *(["taskset"] if pin else [])]
    absent = [t for t in tools if shutil.which(t) is None]
    if absent:
        return f"not installed: {', '.join(absent)}"
    if pin and (os.cpu_count() or 1) < 2:
        return "--pin needs at least 2 CPUs"
    left = [n for n in NETNS_NAMES if netns.exists(n)]
    if left:
        verb = "exists" if len(left) == 1 else "exist"
        return (
            f"netns {', '.join(left)} already {verb} (another run of this benchmark, or one that "
            "was killed?); if none is running: `ip netns delete <name>` for each"
        )
    return None


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Ignore Ctrl-C and SIGTERM for the block (the teardown must not be cut short)."""
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def testbed(workdir: Path) -> Iterator[Testbed]:
    """The benchmark's testbed, torn down whatever happens (Ctrl-C included, also half-way up)."""
    mesh_file = workdir / "mesh.yaml"
    mesh_file.write_text(MESH_YAML)
    bed = Testbed([mesh_file], workdir / "bed", underlay=UNDERLAY, underlay_netns=UNDERLAY_NETNS)
    try:
        yield bed.up()
    finally:
        with signals_deferred():
            problems = bed.down()
            # Whatever is left is ours (preflight saw none of these names): remove it by name.
            problems += network.teardown([n for n in NETNS_NAMES if netns.exists(n)])
            if problems:
                print("WARNING: testbed teardown left: " + "; ".join(problems), file=sys.stderr)


def ztunnel_pids(bed: Testbed) -> dict[str, int]:
    """Each node's ztunnel pid (``ip netns exec`` execs, so it is the ztunnel's own)."""
    return {node: bed.proxy(node).process.pid for node in bed.nodes}


def pin_ztunnels(pids: dict[str, int]) -> None:
    """Move every thread of every ztunnel to PROXY_CPU (new threads inherit it)."""
    for pid in pids.values():
        subprocess.run(
            [harness.TASKSET, "-a", "-p", "-c", PROXY_CPU, str(pid)],
            check=True,
            capture_output=True,
            timeout=10,
        )


def link_mtu(pod: str) -> int | None:
    try:
        words = netns.run(["ip", "-o", "link", "show", "eth0"], netns=pod).split()
        return int(words[words.index("mtu") + 1])
    except (TestbedError, ValueError, IndexError):
        return None


def ztunnel_cpu(pids: dict[str, int]) -> dict[str, float] | None:
    """CPU seconds each node's ztunnel has used so far (None if one cannot be read)."""
    try:
        return {node: harness.cpu_seconds(pid) for node, pid in pids.items()}
    except (OSError, ValueError):
        return None


def machine_busy_seconds() -> float | None:
    """CPU seconds the whole machine has spent not idle (all CPUs), from /proc/stat: whether a
    transfer had the machine to itself or ran out of cores."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    # user..steal; guest time is already counted in user.
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------------------------
# was it the mesh?


def _is_ours(entry: dict[str, Any]) -> bool:
    """An access-log entry of an iperf3 connection from the client pod to the server pod."""
    return (
        entry.get("src.workload") == CLIENT_POD
        or entry.get("dst.workload") == SERVER_POD
        or str(entry.get("dst.addr", "")).startswith(f"{SERVER_IP}:")
    )


def _carried(entry: dict[str, Any]) -> int:
    return max(int(entry.get("bytes_sent") or 0), int(entry.get("bytes_recv") or 0))


def collect_entries(bed: Testbed, *, until: int, timeout: float) -> dict[str, list[dict[str, Any]]]:
    """Our entries from both ztunnels' access logs, waiting up to ``timeout`` until each has
    ``until`` of them (a line is written when its connection ends)."""
    found: dict[str, list[dict[str, Any]]] = {node: [] for node in bed.nodes}
    deadline = time.monotonic() + timeout
    while True:
        for node in bed.nodes:
            found[node] += [e for e in bed.proxy(node).new_entries() if _is_ours(e)]
        if all(len(v) >= until for v in found.values()) or time.monotonic() >= deadline:
            return found
        time.sleep(0.05)


def mesh_check(entries: dict[str, list[dict[str, Any]]], received_bytes: int) -> dict[str, Any]:
    """Did the iperf3 connections go client pod -> ztunnel bench-a -> HBONE -> ztunnel bench-b?"""
    out = [e for e in entries[CLIENT_NODE] if e.get("direction") == "outbound"]
    inb = [e for e in entries[SERVER_NODE] if e.get("direction") == "inbound"]
    out_hbone = [
        e
        for e in out
        if e.get("transport") == "HBONE" and e.get("dst.hbone_addr") == f"{SERVER_IP}:{IPERF3_PORT}"
    ]
    in_hbone = [e for e in inb if e.get("transport") == "HBONE"]
    # The data connection carried at least what the iperf3 server received.
    out_bytes = max((_carried(e) for e in out_hbone), default=0)
    in_bytes = max((_carried(e) for e in in_hbone), default=0)
    problems = []
    if len(out_hbone) < IPERF3_CONNECTIONS:
        problems.append(
            f"{CLIENT_NODE}: {len(out_hbone)} outbound HBONE entries, expected "
            f"{IPERF3_CONNECTIONS} (control + data)"
        )
    if len(in_hbone) < IPERF3_CONNECTIONS:
        problems.append(f"{SERVER_NODE}: {len(in_hbone)} inbound HBONE entries")
    others = sorted({str(e.get("transport")) for e in (*out, *inb)} - {"HBONE"})
    if others:
        problems.append(f"entries with another transport: {', '.join(others)}")
    if out_bytes < received_bytes or in_bytes < received_bytes:
        problems.append(
            f"ztunnels carried {out_bytes}/{in_bytes} bytes (out/in), iperf3 received "
            f"{received_bytes}"
        )
    return {
        "ok": not problems,
        "outbound_hbone_entries": len(out_hbone),
        "inbound_hbone_entries": len(in_hbone),
        "outbound_entries": len(out),
        "inbound_entries": len(inb),
        "outbound_max_bytes": out_bytes,
        "inbound_max_bytes": in_bytes,
        "iperf3_received_bytes": received_bytes,
        # The data connection's line (the one that carried the most), to show what was checked.
        "outbound_data_entry": max(out_hbone or out, key=_carried, default=None),
        "problems": problems,
    }


def bypass_check(entries: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """With capture off, neither ztunnel may have seen the iperf3 connections."""
    seen = {node: len(v) for node, v in entries.items()}
    problems = [f"{node}: {n} access-log entries" for node, n in seen.items() if n]
    return {"ok": not problems, "entries": seen, "problems": problems}


# --------------------------------------------------------------------------------------------
# measuring


def measure(
    bed: Testbed, system: str, args: argparse.Namespace, pids: dict[str, int]
) -> dict[str, Any]:
    """One reading of ``system``: capture on or off for both pods, one iperf3 transfer."""
    on = system == "mesh"
    for node in bed.nodes:
        status = bed.proxy(node).process.poll()
        if status is not None:
            raise RuntimeError(f"ztunnel {node} has exited (status {status})")
    for pod in (CLIENT_POD, SERVER_POD):
        bed.set_capture(pod, on)
    for node in bed.nodes:  # only this reading's connections count
        bed.proxy(node).new_entries()
    cpu_before, busy_before = ztunnel_cpu(pids), machine_busy_seconds()
    t_run = time.monotonic()
    result = harness.iperf3_run(
        SERVER_IP,
        IPERF3_PORT,
        args.seconds,
        taskset=LOAD_CPU if args.pin else None,
        netns=CLIENT_POD,
    )
    wall = time.monotonic() - t_run
    cpu_after, busy_after = ztunnel_cpu(pids), machine_busy_seconds()
    received_bytes = int(result.end.get("sum_received", {}).get("bytes", 0))
    reading: dict[str, Any] = {
        "gbps": round(result.receiver_gbps, 4),
        "sender_gbps": round(result.sender_gbps, 4),
        "retransmits": result.retransmits,
        "received_bytes": received_bytes,
        "wall_s": round(wall, 3),
    }
    if cpu_before is not None and cpu_after is not None:
        used = {node: cpu_after[node] - cpu_before[node] for node in pids}
        reading["ztunnel_cpu_s"] = round(sum(used.values()), 3)
        reading["ztunnel_cpu_cores"] = round(sum(used.values()) / wall, 3)
        reading["ztunnel_cpu_cores_by_node"] = {n: round(v / wall, 3) for n, v in used.items()}
    if busy_before is not None and busy_after is not None:
        reading["machine_busy_cores"] = round((busy_after - busy_before) / wall, 3)
    if on:
        check = mesh_check(
            collect_entries(bed, until=IPERF3_CONNECTIONS, timeout=LOG_WAIT), received_bytes
        )
        reading["through_ztunnel"] = check
    else:
        # Nothing is expected; give a stray line a moment to show up.
        check = bypass_check(collect_entries(bed, until=IPERF3_CONNECTIONS, timeout=0.5))
        reading["bypassed_ztunnel"] = check
    reading["valid"] = check["ok"]
    return reading


def summarise(readings: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per system: the figures over its valid readings, and the same-round ratio to BASELINE."""
    ratios = harness.same_round_ratios(readings, "mesh", BASELINE)
    for r in readings:  # annotate the raw readings with their same-round ratio
        if r["system"] == "mesh" and r.get("valid") and r["round"] in ratios:
            r["ratio_to_capture_off"] = round(ratios[r["round"]], 4)
    summary: dict[str, dict[str, Any]] = {}
    for system in SYSTEMS:
        mine = [r for r in readings if r["system"] == system]
        ok = [r for r in mine if "gbps" in r and r.get("valid")]
        entry: dict[str, Any] = {
            "status": "ok" if ok else "failed",
            "rounds_ok": len(ok),
            "rounds_invalid": sum(1 for r in mine if "gbps" in r and not r.get("valid")),
            "rounds_failed": sum(1 for r in mine if "error" in r),
        }
        if ok:
            stats = harness.spread_stats([float(r["gbps"]) for r in ok])
            entry.update(
                median_gbps=round(stats["median"] or 0, 3),
                min_gbps=round(stats["min"] or 0, 3),
                max_gbps=round(stats["max"] or 0, 3),
                spread_pct=None if stats["spread_pct"] is None else round(stats["spread_pct"], 1),
            )
            for key in ("ztunnel_cpu_cores", "machine_busy_cores"):
                values = [float(r[key]) for r in ok if key in r]
                if values:
                    entry[f"median_{key}"] = round(harness.spread_stats(values)["median"] or 0, 2)
        if system == "mesh" and ratios:
            entry["median_ratio_to_capture_off"] = round(
                harness.spread_stats(list(ratios.values()))["median"] or 0, 3
            )
        problems = [str(r["error"]) for r in mine if "error" in r]
        problems += [
            "; ".join(r.get("through_ztunnel", r.get("bypassed_ztunnel", {})).get("problems", []))
            for r in mine
            if "gbps" in r and not r.get("valid")
        ]
        if problems:
            entry["problems"] = problems
        summary[system] = entry
    return summary


def markdown_table(summary: dict[str, dict[str, Any]], pinned: bool) -> str:
    columns = [
        "system",
        "median Gbit/s",
        "min-max Gbit/s",
        "spread",
        "median ratio to capture-off",
        "ztunnel CPU (cores, both)",
        "machine busy (cores)",
        "rounds ok",
    ]
    lines = ["| " + " | ".join(columns) + " |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    notes = []
    for system, s in summary.items():
        if s["status"] != "ok":
            lines.append(f"| {system} | failed | | | | | | 0 |")
        else:
            ratio = s.get("median_ratio_to_capture_off")
            ratio_text = f"{ratio:.3f}" if ratio is not None else "1" if system == BASELINE else "-"
            cpu = s.get("median_ztunnel_cpu_cores")
            busy = s.get("median_machine_busy_cores")
            spread = s.get("spread_pct")
            lines.append(
                f"| {system} | {s['median_gbps']:.2f} | {s['min_gbps']:.2f}-{s['max_gbps']:.2f} "
                f"| {'-' if spread is None else f'{spread:.0f} %'} | {ratio_text} "
                f"| {'-' if cpu is None else f'{cpu:.2f}'} "
                f"| {'-' if busy is None else f'{busy:.2f}'} | {s['rounds_ok']} |"
            )
        for problem in s.get("problems", []):
            notes.append(f"- {system}: {first_line(problem)}")
    pin = (
        f"pinned: iperf3 client+server on CPU {LOAD_CPU}, both ztunnels on CPU {PROXY_CPU}"
        if pinned
        else "unpinned"
    )
    return "\n".join([*lines, "", f"Processes {pin}.", *notes])


def run_rounds(
    bed: Testbed, server: harness.Iperf3Server, args: argparse.Namespace, pids: dict[str, int]
) -> list[dict[str, Any]]:
    readings: list[dict[str, Any]] = []
    for rnd in range(args.rounds):
        shift = rnd % len(SYSTEMS)
        order = SYSTEMS[shift:] + SYSTEMS[:shift]
        for position, system in enumerate(order):
            base = {"round": rnd + 1, "position": position + 1, "system": system}
            if server.proc is None or server.proc.poll() is not None:
                server.restart()
            try:
                reading = measure(bed, system, args, pids)
            except (RuntimeError, OSError, ValueError, TestbedError) as e:  # not fatal
                detail = f"{type(e).__name__}: {e}"
                readings.append({**base, "error": detail})
                print(f"round {rnd + 1}: {system} failed: {first_line(detail)}", flush=True)
                if os.environ.get("BENCH_DEBUG"):
                    traceback.print_exc()
                server.restart()  # a half-finished test leaves iperf3 -s busy
                continue
            readings.append({**base, **reading})
            cpu = reading.get("ztunnel_cpu_cores")
            busy = reading.get("machine_busy_cores")
            print(
                f"round {rnd + 1}/{args.rounds}: {system:11s} {reading['gbps']:7.2f} Gbit/s"
                + (f", ztunnels {cpu:.2f} cores" if cpu is not None else "")
                + (f", machine busy {busy:.2f} cores" if busy is not None else "")
                + ("" if reading["valid"] else "  (INVALID)"),
                flush=True,
            )
            if not reading["valid"]:
                check = reading.get("through_ztunnel") or reading.get("bypassed_ztunnel") or {}
                print(
                    f"WARNING: round {rnd + 1}: the {system} reading does not count: "
                    + "; ".join(check.get("problems", [])),
                    flush=True,
                )
    return readings


# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
    parser.add_argument("--seconds", type=float, default=5, help="iperf3 -t per reading (5)")
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    parser.add_argument(
        "--pin",
        action="store_true",
        help=f"taskset: iperf3 on CPU {LOAD_CPU}, ztunnels on CPU {PROXY_CPU}",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    why = preflight(args.pin)
    if why:
        print(f"compare_testbed.py: {why}", file=sys.stderr)
        return 2
    core = ambient_core_info() or {}
    if core.get("build_profile") != "release":
        print(
            f"WARNING: ambient._core build profile is {core.get('build_profile')!r}, not "
            "'release': the figures will be meaningless and no report will be written",
            file=sys.stderr,
        )
    signal.signal(signal.SIGTERM, _sigterm)  # like Ctrl-C: unwind, so the testbed comes down
    readings: list[dict[str, Any]] = []
    testbed_info: dict[str, Any] = {}
    proxies: dict[str, ZtunnelProcess] = {}
    try:
        with (
            tempfile.TemporaryDirectory(prefix="bench-testbed-") as tmp,
            testbed(Path(tmp)) as bed,
        ):
            # Their logs, to show if the run fails (the testbed is down by then).
            proxies = {node: bed.proxy(node) for node in bed.nodes}
            pids = ztunnel_pids(bed)
            if args.pin:
                pin_ztunnels(pids)
            topology = bed.topology
            assert topology is not None
            testbed_info = {
                "nodes": {n.name: str(n.underlay_ip) for n in topology.nodes},
                "pods": {p.name: {"ip": str(p.ip), "node": p.node} for p in topology.pods},
                "underlay": UNDERLAY,
                "underlay_netns": UNDERLAY_NETNS,
                "pod_mtu": link_mtu(CLIENT_POD),
                "ztunnel_pids": pids,
                "mesh_yaml": MESH_YAML,
            }
            with harness.iperf3_server(
                IPERF3_PORT, SERVER_IP, taskset=LOAD_CPU if args.pin else None, netns=SERVER_POD
            ) as server:
                readings = run_rounds(bed, server, args, pids)
    except KeyboardInterrupt:
        print("\ninterrupted; the testbed has been taken down", file=sys.stderr)
        return 130
    except (TestbedError, harness.ProcessStartError, RuntimeError, OSError) as e:
        print(f"compare_testbed.py: {type(e).__name__}: {e}", file=sys.stderr)
        for node, proxy in proxies.items():
            if said := proxy.output():
                print(f"ztunnel {node} said:\n{said[-5000:]}", file=sys.stderr)
        return 1

    summary = summarise(readings)
    machine = machine_info(argparse.Namespace(python=sys.executable))
    machine.pop("haproxy", None)
    core = machine.get("ambient_core")
    profile = core.get("build_profile") if isinstance(core, dict) else None
    table = markdown_table(summary, args.pin)
    release = profile == "release"
    if not release:
        table += (
            f"\n\nWARNING: ambient._core build profile is {profile!r}, not 'release': "
            "these figures are meaningless and are not written anywhere."
        )
    print()
    print(table)
    report = {
        "benchmark": (
            "iperf3 throughput between two pods on two nodes (network namespaces): "
            "through the mesh vs capture off"
        ),
        "command": harness.command_line(),
        "settings": {
            "rounds": args.rounds,
            "seconds": args.seconds,
            "systems": list(SYSTEMS),
            "baseline": BASELINE,
            "order": "rotated by one system per round",
            "iperf3": f"iperf3 -c {SERVER_IP} -p {IPERF3_PORT} -t {args.seconds:g} -J "
            "(one TCP stream, 128 KiB writes), inside bench-client",
            "pinned": args.pin,
            "pinning": (
                {"iperf3_client": LOAD_CPU, "iperf3_server": LOAD_CPU, "ztunnels": PROXY_CPU}
                if args.pin
                else None
            ),
            "descriptions": DESCRIPTIONS,
            "validity": (
                "mesh: bench-a's access log has outbound HBONE entries for the control and the "
                "data connection and bench-b's inbound HBONE ones, the data connection's "
                "carrying at least the bytes iperf3 received; capture-off: no entries at all"
            ),
        },
        "testbed": testbed_info,
        "machine": machine,
        "summary": summary,
        "readings": readings,
        "markdown": table,
    }
    if args.out:
        if release:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2) + "\n")
            print(f"\nwrote {args.out}")
        else:
            print(f"\nWARNING: NOT writing {args.out}: not a release build of ambient._core")
    return 0 if any(s["status"] == "ok" for s in summary.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
