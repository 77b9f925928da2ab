"""pytest-benchmark's JSON, summarised for ``benchmarks/results/``.

``--benchmark-json`` writes every timing of every round (megabytes for a microbenchmark that ran
100,000 rounds) and the CPU's feature flags. What a committed result needs is, per benchmark, its
name and parameters, how many rounds, the median with its spread (IQR, standard deviation), ops/s
and the benchmark's own extra figures; and, once, the machine, the commit and the date. That is
what :func:`summarise` keeps, figures unchanged; times are in seconds, as pytest-benchmark gives
them.

``benchmarks/conftest.py`` applies it to the file ``--benchmark-json`` writes. By hand, on a raw
file: ``python benchmarks/summarise.py RAW.json --out SUMMARY.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

FORMAT = "ambient benchmark summary 1"
# Per benchmark: pytest-benchmark's statistics kept, in seconds (ops in 1/s).
STATS = ("median", "iqr", "q1", "q3", "stddev", "mean", "min", "max", "ops", "outliers")
# The machine: pytest-benchmark's description without the host name and the CPU's flags.
MACHINE_DROPPED = ("node",)
CPU_DROPPED = ("flags",)
COMMIT_KEPT = ("id", "time", "dirty", "branch")


def is_summary(report: dict[str, Any]) -> bool:
    return report.get("format") == FORMAT


def summarise(raw: dict[str, Any]) -> dict[str, Any]:
    """The summary of one pytest-benchmark JSON report (a summary is returned as it is)."""
    if is_summary(raw):
        return raw
    machine = {k: v for k, v in raw.get("machine_info", {}).items() if k not in MACHINE_DROPPED}
    if isinstance(machine.get("cpu"), dict):
        machine["cpu"] = {k: v for k, v in machine["cpu"].items() if k not in CPU_DROPPED}
    commit = raw.get("commit_info") or {}
    return {
        "format": FORMAT,
        "source": f"pytest-benchmark {raw.get('version', '?')} --benchmark-json, summarised",
        "datetime": raw.get("datetime"),
        "machine": machine,
        "commit": {k: commit[k] for k in COMMIT_KEPT if k in commit},
        "unit": "seconds",
        "benchmarks": [_benchmark(b) for b in raw.get("benchmarks", [])],
    }


def _benchmark(b: dict[str, Any]) -> dict[str, Any]:
    stats = b.get("stats", {})
    return {
        "name": b.get("fullname", b.get("name")),
        "group": b.get("group"),
        "params": b.get("params"),
        "rounds": stats.get("rounds"),
        "iterations": stats.get("iterations"),
        **{k: stats[k] for k in STATS if k in stats},
        "extra_info": b.get("extra_info", {}),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("raw", type=Path, help="a pytest-benchmark --benchmark-json file")
    parser.add_argument("--out", type=Path, help="where to write the summary (default: stdout)")
    args = parser.parse_args(argv)
    text = json.dumps(summarise(json.loads(args.raw.read_text())), indent=2) + "\n"
    if args.out:
        args.out.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
