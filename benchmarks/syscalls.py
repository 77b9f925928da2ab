"""Where a request's or a connection's cost goes in the kernel: syscalls, futex calls and context
switches of both proxies of a pair, per request (keep-alive at a fixed rate) and per new
connection, for ambient's ztunnels and Istio's on the same testbed pods.

    python benchmarks/syscalls.py --istio-ztunnel PATH [--rounds 2] [--out results/syscalls.json]

compare_istio.py measures CPU; this says what the CPU was spent on, as counts that are far
steadier than timings on a small VM: ``perf stat`` (syscalls entered, context switches) over
the proxies' pids, and ``perf trace -s`` (syscalls by name) over a shorter window, while
compare_istio's load generator runs the same figures. ``perf stat`` counts are divided by the
requests or connections the load generator completed in the window; ``perf trace`` counts by
the requests at the fixed rate, or by the connect() calls it saw (one per new connection).
Needs root, perf and Go (as compare_istio.py). How this found a self-wake in the HBONE write
path: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

from benchmarks import compare_istio as ci  # noqa: E402
from benchmarks import harness  # noqa: E402
from benchmarks.compare_throughput import machine_info  # noqa: E402
from benchmarks.compare_ztunnel import go_build  # noqa: E402

WINDOW = 8  # seconds counted, inside a 10 s run
TRACE_WINDOW = 4  # perf trace slows a proxy down more: a shorter window of its own


def perf_stat(pids: str, out: Path) -> subprocess.Popen[bytes]:
    events = "context-switches,raw_syscalls:sys_enter"
    argv = ["perf", "stat", "-e", events, "-p", pids, "-o", str(out), "--", "sleep", str(WINDOW)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def perf_trace(pids: str, out: Path) -> subprocess.Popen[bytes]:
    argv = ["perf", "trace", "-s", "-p", pids, "-o", str(out), "--", "sleep", str(TRACE_WINDOW)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stat_count(text: str, event: str) -> float:
    m = re.search(r"([\d,.]+)\s+" + re.escape(event), text)
    if m is None:
        raise ValueError(f"perf stat printed no {event}: {text[-500:]}")
    return float(m.group(1).replace(",", ""))


def trace_counts(text: str) -> dict[str, int]:
    """Calls per syscall name, summed over the threads ``perf trace -s`` lists."""
    counts: dict[str, int] = {}
    for m in re.finditer(r"^\s+(\w+)\s+(\d+)\s+\d+", text, re.MULTILINE):
        counts[m.group(1)] = counts.get(m.group(1), 0) + int(m.group(2))
    return counts


def measure(bench: ci.Bench, pair: ci.Pair, figure: str, work: Path) -> dict[str, Any]:
    pids = ",".join(str(p) for p in pair.pids.values())
    stat_out, trace_out = work / "perf.stat", work / "perf.trace"
    stat, trace = perf_stat(pids, stat_out), perf_trace(pids, trace_out)
    if figure == "keepalive":
        r = bench.run_loadgen("load", "-c", "16", "-seconds", "10", "-rate", "1000", timeout=60)
        rate = r["requests_per_second"]
    else:
        r = bench.run_loadgen("conn", "-c", "16", "-seconds", "10", timeout=60)
        rate = r["connections_per_second"]
    stat.wait()
    trace.wait()
    text = stat_out.read_text()
    syscalls = stat_count(text, "raw_syscalls:sys_enter")
    switches = stat_count(text, "context-switches")
    by_name = trace_counts(trace_out.read_text())
    per = rate * WINDOW
    # perf trace slows the proxies: at a fixed request rate the requests still come, but new
    # connections come slower while it runs. Each new connection makes exactly one connect()
    # (the server side's, to the app; HBONE connections are pooled), so that count is the
    # number of connections the trace saw.
    traced = rate * TRACE_WINDOW if figure == "keepalive" else by_name.get("connect", 0)
    if not traced:
        raise RuntimeError(f"perf trace saw no {figure} traffic: {sorted(by_name)}")
    return {
        "per_second": round(rate, 1),
        "syscalls": round(syscalls / per, 2),
        "context_switches": round(switches / per, 2),
        "futex": round(by_name.get("futex", 0) / traced, 2),
        "by_name": {k: round(v / traced, 2) for k, v in sorted(by_name.items()) if v},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--istio-ztunnel", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    cargs = ci.build_parser().parse_args(["--istio-ztunnel", str(args.istio_ztunnel)])
    readings: dict[str, dict[str, list[dict[str, Any]]]] = {}
    with tempfile.TemporaryDirectory(prefix="syscalls-") as tmp:
        work = Path(tmp)
        mesh = work / "mesh.yaml"
        mesh.write_text(ci.mesh_yaml())
        go_build(ci.HERE / "loadgen.go", work / "loadgen")
        go_build(ci.HERE / "upstream.go", work / "upstream")
        with ci.testbed(work, mesh, [*ci.AMBIENT_ARGS, "--access-log", "off"]) as bed:
            ci.set_pod_sysctls()
            bench = ci.Bench(cargs, bed, work, mesh)
            bench.pair = bench.ambient_pair()
            upstream = [
                *harness.netns_prefix(ci.SERVER_POD),
                str(work / "upstream"),
                *("-address", f"0.0.0.0:{ci.APP_PORT}"),
            ]
            with harness.running(upstream):
                try:
                    for rnd in range(args.rounds):
                        for system in ("ambient", "istio"):
                            pair = bench.use(system)
                            time.sleep(1)
                            for figure in ("keepalive", "conn"):
                                r = measure(bench, pair, figure, work)
                                readings.setdefault(system, {}).setdefault(figure, []).append(r)
                                print(f"round {rnd + 1} {system} {figure}: {r}", flush=True)
                finally:
                    bench.stop_pair()
    summary = {
        system: {
            figure: {
                key: statistics.median(r[key] for r in rs)
                for key in ("per_second", "syscalls", "context_switches", "futex")
            }
            for figure, rs in by.items()
        }
        for system, by in readings.items()
    }
    result = {
        "benchmark": "syscalls, futex calls and context switches of both proxies of a pair, "
        "per request (16 keep-alive connections at 1,000 req/s) and per new connection "
        "(16 in flight, one 1 KB request each)",
        "command": harness.command_line(),
        "machine": machine_info(argparse.Namespace(python=sys.executable)),
        "summary": summary,
        "rounds": readings,
    }
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
