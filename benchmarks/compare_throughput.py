"""Bulk throughput of one TCP stream: direct TCP vs HAProxy mTLS vs ambient HBONE vs Python HBONE.

    python benchmarks/compare_throughput.py --rounds 5 --seconds 5 \\
        --out benchmarks/results/throughput.json [--only direct,haproxy] [--pin]

One ``iperf3 -s`` serves every measurement. Each round measures every selected system once, in
a rotated order (round r starts with the r-th system) so that no system always runs first or
last. Proxies are started fresh for each measurement and stopped afterwards; only the iperf3
transfer is timed. A system that fails to start is reported as failed (with the reason) and is
not retried; the others go on.

Reported per system: median receiver Gbit/s, min-max, and the median over rounds of the ratio
to direct TCP measured in the same round; plus the CPU the proxy processes used (from
/proc/<pid>/stat) during the transfer, in cores. Benchmarks never fail on a figure: the exit
status is 0 unless nothing at all could be measured.

``--pin``: iperf3 client and server on CPU 0, every proxy process on CPU 1 (``taskset``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import harness  # noqa: E402

SYSTEMS = ("direct", "haproxy", "ambient", "python-h2")

DESCRIPTIONS = {
    "direct": "iperf3 client straight to the iperf3 server (loopback TCP)",
    "haproxy": "HAProxy A (plain in) -> mutual TLS 1.3 -> HAProxy B -> server (2 processes)",
    "ambient": "ambient hbone forward -> HBONE (h2 CONNECT over mTLS 1.3) -> ambient hbone serve",
    "python-h2": "ambient.peers.h2_hbone client -> HBONE -> ambient.peers.h2_hbone server",
}

# With --pin: the load generator (both iperf3 ends) shares CPU 0; all proxies share CPU 1.
LOAD_CPU = "0"
PROXY_CPU = "1"


@dataclass
class Running:
    """What a started system gives the measurement: where to connect and which pids to account."""

    entry: harness.Address
    pids: list[int]


SystemFactory = Callable[[], contextlib.AbstractContextManager[Running]]


class StartFailure(Exception):
    """The system under test could not be started (it is then not retried)."""


def child_env() -> dict[str, str]:
    """Make ``python -m ambient...`` importable from the children without installing the project."""
    path = os.environ.get("PYTHONPATH", "")
    return {"PYTHONPATH": os.pathsep.join(p for p in (str(REPO), path) if p)}


def make_factories(
    args: argparse.Namespace, ca_dir: str, upstream: harness.Address
) -> dict[str, SystemFactory]:
    proxy_cpu = PROXY_CPU if args.pin else None

    @contextlib.contextmanager
    def direct() -> Iterator[Running]:
        yield Running(upstream, [])

    @contextlib.contextmanager
    def haproxy() -> Iterator[Running]:
        with contextlib.ExitStack() as stack:
            try:
                pair = stack.enter_context(
                    harness.haproxy_mtls_servers(
                        ca_dir,
                        upstream,
                        host=args.host,
                        taskset=proxy_cpu,
                        timeout=args.start_timeout,
                    )
                )
            except Exception as e:
                raise StartFailure(str(e)) from e
            yield Running(pair.entry, pair.pids)

    def hbone(module: str, server_verb: str, client_verb: str) -> SystemFactory:
        @contextlib.contextmanager
        def factory() -> Iterator[Running]:
            server_argv, client_argv = harness.hbone_argvs(
                module,
                server_verb,
                client_verb,
                python=args.python,
                ca_dir=ca_dir,
                upstream=upstream,
                host=args.host,
            )
            with contextlib.ExitStack() as stack:
                try:
                    pair = stack.enter_context(
                        harness.proxy_pair(
                            server_argv,
                            client_argv,
                            taskset=proxy_cpu,
                            timeout=args.start_timeout,
                            env=child_env(),
                        )
                    )
                except Exception as e:
                    raise StartFailure(str(e)) from e
                yield Running(pair.entry, pair.pids)

        return factory

    return {
        "direct": direct,
        "haproxy": haproxy,
        "ambient": hbone("ambient", "hbone serve", "hbone forward"),
        "python-h2": hbone("ambient.peers.h2_hbone", "server", "client"),
    }


def total_cpu(pids: list[int]) -> float | None:
    try:
        return sum(harness.cpu_seconds(pid) for pid in pids)
    except (OSError, ValueError):
        return None


def measure(factory: SystemFactory, args: argparse.Namespace) -> dict[str, object]:
    """One reading of one system; raises StartFailure if the system would not start."""
    load_cpu = LOAD_CPU if args.pin else None
    t0 = time.monotonic()
    with factory() as running:
        started = time.monotonic()
        cpu_before = total_cpu(running.pids)
        t_run = time.monotonic()
        result = harness.iperf3_run(*running.entry, args.seconds, taskset=load_cpu)
        wall = time.monotonic() - t_run
        cpu_after = total_cpu(running.pids)
    reading: dict[str, object] = {
        "gbps": result.receiver_gbps,
        "sender_gbps": result.sender_gbps,
        "retransmits": result.retransmits,
        "startup_s": round(started - t0, 3),
    }
    if running.pids and cpu_before is not None and cpu_after is not None:
        cores = (cpu_after - cpu_before) / wall
        reading["proxy_cpu_cores"] = round(cores, 3)
    return reading


def ambient_core_info() -> dict[str, object] | None:
    """Which compiled core the ambient pair ran (to tell a fresh release build from a stale one)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("ambient._core")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    path = Path(spec.origin)
    info: dict[str, object] = {"path": harness.portable_path(path)}
    with contextlib.suppress(OSError):
        st = path.stat()
        info["size_bytes"] = st.st_size
        info["modified"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(st.st_mtime))
    try:
        from ambient import _core

        info["build_profile"] = str(_core.build_profile())
    except Exception as e:  # informational only: the core may be missing or lack the call
        info["build_profile"] = f"unknown ({type(e).__name__}: {e})"
    return info


def machine_info(args: argparse.Namespace) -> dict[str, object]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    try:
        affinity = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "cpus_allowed": affinity,
        "kernel": platform.release(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "python_executable": harness.portable_path(args.python),
        "haproxy": harness.haproxy_version(),
        "iperf3": harness.iperf3_version(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "ambient_core": ambient_core_info(),
    }


def summarise(
    systems: list[str], readings: list[dict[str, object]], failures: dict[str, str]
) -> dict[str, dict[str, object]]:
    direct_by_round = {
        r["round"]: r["gbps"] for r in readings if r["system"] == "direct" and "gbps" in r
    }
    for r in readings:  # annotate the raw readings with their same-round ratio
        if "gbps" in r and r["system"] != "direct" and r["round"] in direct_by_round:
            ratio = float(r["gbps"]) / float(direct_by_round[r["round"]])  # type: ignore[arg-type]
            r["ratio_to_direct"] = round(ratio, 4)
    summary: dict[str, dict[str, object]] = {}
    for system in systems:
        ok = [r for r in readings if r["system"] == system and "gbps" in r]
        errors = [str(r["error"]) for r in readings if r["system"] == system and "error" in r]
        values = [float(r["gbps"]) for r in ok]  # type: ignore[arg-type]
        ratios = [
            float(r["ratio_to_direct"])  # type: ignore[arg-type]
            for r in ok
            if "ratio_to_direct" in r
        ]
        cores = [
            float(r["proxy_cpu_cores"])  # type: ignore[arg-type]
            for r in ok
            if "proxy_cpu_cores" in r
        ]
        entry: dict[str, object] = {
            "status": "ok" if values else "failed",
            "rounds_ok": len(values),
            "rounds_failed": len(errors),
        }
        if values:
            median = statistics.median(values)
            entry.update(
                median_gbps=round(median, 3),
                min_gbps=round(min(values), 3),
                max_gbps=round(max(values), 3),
                spread_pct=round(100 * (max(values) - min(values)) / median, 1),
            )
        if ratios:
            entry["median_ratio_to_direct"] = round(statistics.median(ratios), 3)
        if cores:
            entry["median_proxy_cpu_cores"] = round(statistics.median(cores), 2)
        if system in failures:
            entry["failure"] = failures[system]
        elif errors:
            entry["errors"] = errors
        summary[system] = entry
    return summary


def first_line(text: str, limit: int = 160) -> str:
    """The most telling line of an error: the last non-empty line of its stderr, or the first."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return "?"
    line = lines[-1] if len(lines) > 1 else lines[0]
    return line if len(line) <= limit else line[: limit - 1] + "…"


def markdown_table(summary: dict[str, dict[str, object]], pinned: bool) -> str:
    columns = [
        "system",
        "median Gbit/s",
        "min-max Gbit/s",
        "spread",
        "median ratio to direct",
        "proxy CPU (cores)",
        "rounds ok",
    ]
    head = ["| " + " | ".join(columns) + " |", "|---|---:|---:|---:|---:|---:|---:|"]
    rows = []
    notes = []
    for system, s in summary.items():
        if s["status"] != "ok":
            rows.append(f"| {system} | failed | | | | | 0 |")
            reason = first_line(str(s.get("failure") or s.get("errors")))
            notes.append(f"- {system} failed: {reason}")
            continue
        ratio = s.get("median_ratio_to_direct")
        if isinstance(ratio, float):
            ratio_text = f"{ratio:.3f}"
        else:
            ratio_text = "1" if system == "direct" else "-"
        cpu = s.get("median_proxy_cpu_cores")
        rows.append(
            f"| {system} | {s['median_gbps']:.2f} | {s['min_gbps']:.2f}-{s['max_gbps']:.2f} "
            f"| {s['spread_pct']:.0f} % | {ratio_text} | {cpu if cpu is not None else '-'} "
            f"| {s['rounds_ok']} |"
        )
        if s.get("errors"):
            notes.append(f"- {system}: {s['rounds_failed']} round(s) failed: {s['errors']}")
    pin = (
        f"pinned: iperf3 client+server on CPU {LOAD_CPU}, proxies on CPU {PROXY_CPU}"
        if pinned
        else "unpinned"
    )
    return "\n".join([*head, *rows, "", f"Processes {pin}.", *notes])


def parse_only(text: str | None) -> list[str]:
    if not text:
        return list(SYSTEMS)
    chosen = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SYSTEMS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown system(s) {unknown}; choose from {SYSTEMS}")
    return [s for s in SYSTEMS if s in chosen]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
    parser.add_argument("--seconds", type=float, default=5, help="iperf3 -t per reading (5)")
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    parser.add_argument(
        "--only", type=parse_only, default=list(SYSTEMS), help=f"comma list of {','.join(SYSTEMS)}"
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help=f"taskset: iperf3 on CPU {LOAD_CPU}, proxies on CPU {PROXY_CPU}",
    )
    parser.add_argument("--host", default="127.0.0.1", help="loopback address to use")
    parser.add_argument("--python", default=sys.executable, help="interpreter for HBONE peers")
    parser.add_argument("--start-timeout", type=float, default=30, help="per process, seconds")
    parser.add_argument(
        "--ca-dir", help="use this saved CA instead of creating one in a temporary directory"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.pin and (os.cpu_count() or 1) < 2:
        print("--pin needs at least 2 CPUs", file=sys.stderr)
        return 2
    systems: list[str] = args.only
    readings: list[dict[str, object]] = []
    failures: dict[str, str] = {}
    from ambient.identity import CertificateAuthority

    with contextlib.ExitStack() as stack:
        if args.ca_dir:
            ca_dir = args.ca_dir
        else:
            ca_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-ca-"))
            CertificateAuthority.create("cluster.local").save(ca_dir)
        server = stack.enter_context(
            harness.iperf3_server(
                harness.free_port(args.host), args.host, taskset=LOAD_CPU if args.pin else None
            )
        )
        factories = make_factories(args, ca_dir, server.address)
        for rnd in range(args.rounds):
            shift = rnd % len(systems)
            order = systems[shift:] + systems[:shift]
            for position, system in enumerate(order):
                if system in failures:
                    continue
                base = {"round": rnd + 1, "position": position + 1, "system": system}
                if server.proc is None or server.proc.poll() is not None:
                    server.restart()
                try:
                    reading = measure(factories[system], args)
                except StartFailure as e:
                    failures[system] = str(e)
                    readings.append({**base, "error": f"start: {e}"})
                    print(f"round {rnd + 1}: {system} failed to start: {first_line(str(e))}")
                    continue
                except (RuntimeError, OSError, ValueError) as e:  # a bad reading is not fatal
                    detail = f"{type(e).__name__}: {e}"
                    readings.append({**base, "error": detail})
                    print(f"round {rnd + 1}: {system} failed: {first_line(detail)}")
                    if os.environ.get("BENCH_DEBUG"):
                        traceback.print_exc()
                    server.restart()  # a half-finished test leaves iperf3 -s busy
                    continue
                readings.append({**base, **reading})
                cpu = reading.get("proxy_cpu_cores")
                cpu_text = f", proxies {cpu} cores" if cpu is not None else ""
                print(
                    f"round {rnd + 1}/{args.rounds}: {system:9s} {reading['gbps']:7.2f} Gbit/s"
                    f"{cpu_text}",
                    flush=True,
                )

    summary = summarise(systems, readings, failures)
    machine = machine_info(args)
    table = markdown_table(summary, args.pin)
    core = machine.get("ambient_core")
    profile = core.get("build_profile") if isinstance(core, dict) else None
    if "ambient" in systems and profile != "release":
        table += (
            f"\nWARNING: ambient._core build profile is {profile!r}, not 'release': "
            "its figures are meaningless."
        )
    print()
    print(table)
    report = {
        "benchmark": "bulk throughput, one TCP stream (iperf3, 128 KiB writes)",
        "command": harness.command_line(),
        "settings": {
            "rounds": args.rounds,
            "seconds": args.seconds,
            "systems": systems,
            "order": "rotated by one system per round",
            "pinned": args.pin,
            "pinning": (
                {"iperf3_client": LOAD_CPU, "iperf3_server": LOAD_CPU, "proxies": PROXY_CPU}
                if args.pin
                else None
            ),
            "tls13_ciphersuites": harness.TLS13_CIPHERSUITES,
            "descriptions": {s: DESCRIPTIONS[s] for s in systems},
        },
        "machine": machine,
        "summary": summary,
        "readings": readings,
        "markdown": table,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.out}")
    return 0 if any(s["status"] == "ok" for s in summary.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
