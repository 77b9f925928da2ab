"""What the benchmark scripts commit under benchmarks/results/: summaries, not every timing, and
no machine's directories."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import harness, summarise  # noqa: E402

RESULTS = sorted((REPO / "benchmarks" / "results").glob("*.json"))

# The shape of pytest-benchmark 5's --benchmark-json output, cut down to one benchmark.
RAW = {
    "machine_info": {
        "node": "build-host-17",
        "machine": "x86_64",
        "python_version": "3.11.7",
        "cpu": {"brand_raw": "AMD EPYC", "count": 2, "flags": ["aes", "avx2", "sse4_2"]},
    },
    "commit_info": {
        "id": "4e2335c5",
        "time": "2026-11-27T15:01:35+00:00",
        "dirty": False,
        "project": "main",
        "branch": "main",
    },
    "benchmarks": [
        {
            "group": None,
            "name": "test_dispatch[cython]",
            "fullname": "benchmarks/bench_decision.py::test_dispatch[cython]",
            "params": {"impl": "cython"},
            "param": "cython",
            "extra_info": {"upstream": "go"},
            "options": {"timer": "perf_counter"},
            "stats": {
                "min": 3.0e-06,
                "max": 9.0e-06,
                "mean": 3.5e-06,
                "stddev": 0.5e-06,
                "rounds": 3,
                "median": 3.26e-06,
                "iqr": 0.2e-06,
                "q1": 3.1e-06,
                "q3": 3.3e-06,
                "iqr_outliers": 0,
                "stddev_outliers": 1,
                "outliers": "1;0",
                "ld15iqr": 3.0e-06,
                "hd15iqr": 9.0e-06,
                "ops": 285714.28,
                "total": 1.05e-05,
                "data": [3.0e-06, 3.26e-06, 9.0e-06],
                "iterations": 1,
            },
        }
    ],
    "datetime": "2026-11-27T15:10:07.038869+00:00",
    "version": "5.3.1",
}


def test_a_summary_keeps_the_figures_and_the_machine_not_the_timings():
    summary = summarise.summarise(RAW)
    assert summary == {
        "format": "ambient benchmark summary 1",
        "source": "pytest-benchmark 5.3.1 --benchmark-json, summarised",
        "datetime": "2026-11-27T15:10:07.038869+00:00",
        "machine": {
            "machine": "x86_64",
            "python_version": "3.11.7",
            "cpu": {"brand_raw": "AMD EPYC", "count": 2},
        },
        "commit": {
            "id": "4e2335c5",
            "time": "2026-11-27T15:01:35+00:00",
            "dirty": False,
            "branch": "main",
        },
        "unit": "seconds",
        "benchmarks": [
            {
                "name": "benchmarks/bench_decision.py::test_dispatch[cython]",
                "group": None,
                "params": {"impl": "cython"},
                "rounds": 3,
                "iterations": 1,
                "median": 3.26e-06,
                "iqr": 0.2e-06,
                "q1": 3.1e-06,
                "q3": 3.3e-06,
                "stddev": 0.5e-06,
                "mean": 3.5e-06,
                "min": 3.0e-06,
                "max": 9.0e-06,
                "ops": 285714.28,
                "outliers": "1;0",
                "extra_info": {"upstream": "go"},
            }
        ],
    }
    assert summarise.summarise(summary) is summary  # a summary is left as it is


def test_the_summariser_command_writes_the_summary(tmp_path):
    raw, out = tmp_path / "raw.json", tmp_path / "summary.json"
    raw.write_text(json.dumps(RAW))
    assert summarise.main([str(raw), "--out", str(out)]) == 0
    assert json.loads(out.read_text()) == summarise.summarise(RAW)


@pytest.mark.parametrize("path", RESULTS, ids=[p.name for p in RESULTS])
def test_committed_results_name_no_machines_directories(path):
    def strings(value):
        if isinstance(value, dict):
            for k, v in value.items():
                yield from strings(k)
                yield from strings(v)
        elif isinstance(value, list):
            for v in value:
                yield from strings(v)
        elif isinstance(value, str):
            yield value

    text = path.read_text()
    assert str(REPO) not in text and str(Path.home()) + "/" not in text
    assert [s for s in strings(json.loads(text)) if s.startswith("/")] == []


def test_pytest_benchmark_results_are_committed_as_summaries():
    report = json.loads((REPO / "benchmarks" / "results" / "core-and-decision.json").read_text())
    assert summarise.is_summary(report)
    assert all("data" not in b for b in report["benchmarks"])


@pytest.mark.parametrize(
    ("path", "recorded"),
    [
        (
            REPO / "ambient" / "_core.cpython-311-x86_64-linux-gnu.so",
            "ambient/_core.cpython-311-x86_64-linux-gnu.so",
        ),
        ("{outside}/pyenv/versions/3.11.7/bin/python", "python"),
        ("{outside}/usr/bin/python3.11", "python3.11"),
        ("benchmarks/results/throughput.json", "benchmarks/results/throughput.json"),
    ],
)
def test_a_report_records_paths_relative_to_the_repository_or_by_name(tmp_path, path, recorded):
    # {outside}: an absolute directory outside the repository, as another machine's would be.
    assert harness.portable_path(str(path).format(outside=tmp_path)) == recorded


def test_a_report_records_the_command_line_without_absolute_paths(tmp_path):
    argv = [
        str(REPO / "benchmarks" / "compare_throughput.py"),
        "--out",
        str(tmp_path / "results" / "throughput.json"),
        f"--ca-dir={REPO}/ca",
        "--rounds",
        "5",
    ]
    assert harness.command_line(argv)[1:] == [
        "benchmarks/compare_throughput.py",
        "--out",
        "throughput.json",
        "--ca-dir=ca",
        "--rounds",
        "5",
    ]
    assert not harness.command_line(argv)[0].startswith("/")
