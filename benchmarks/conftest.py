"""Fixtures for the pytest-benchmark suites: a CA, certificates, an echo app, data planes.

Run: ``pytest benchmarks --benchmark-enable`` (the project's default options disable benchmarks
so the test suite stays fast). Only meaningful on a release build: every suite checks it.
``--benchmark-json FILE`` writes a summary (benchmarks/summarise.py), not every timing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ambient import _core
from ambient.hbone import DataPlane
from ambient.identity import CertificateAuthority, WorkloadCertificate

from .summarise import summarise

SERVER = "spiffe://cluster.local/ns/bench/sa/server"
CLIENT = "spiffe://cluster.local/ns/bench/sa/client"


def pytest_benchmark_update_json(
    config: pytest.Config, benchmarks: Any, output_json: dict[str, Any]
) -> None:
    """The file ``--benchmark-json`` writes is the summary committed under results/.

    pytest-benchmark calls this for that file, always generated with every timing, and for a
    run saved with ``--benchmark-save``/``--benchmark-autosave``, without timings unless
    ``--benchmark-save-data``. So timings present and not asked to be saved means the JSON file.
    (With ``--benchmark-save-data`` nothing is summarised: run benchmarks/summarise.py on it.)"""
    with_timings = any("data" in b.get("stats", {}) for b in output_json.get("benchmarks", []))
    saving_timings = config.getoption("benchmark_save_data")
    if config.getoption("benchmark_json") and with_timings and not saving_timings:
        summary = summarise(output_json)
        output_json.clear()
        output_json.update(summary)


@pytest.fixture(scope="session", autouse=True)
def _release_build_only() -> None:
    if _core.build_profile() != "release":
        pytest.exit("benchmarks need a release build of ambient._core", returncode=2)


@pytest.fixture(scope="session")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create("cluster.local")


@pytest.fixture(scope="session")
def certs(ca: CertificateAuthority) -> tuple[WorkloadCertificate, WorkloadCertificate]:
    return ca.issue(SERVER), ca.issue(CLIENT)


def upstream_command(workdir: Path) -> tuple[list[str], str]:
    """The compiled echo upstream (benchmarks/upstream.go) when Go is installed, else the asyncio
    one (benchmarks/upstream.py); returns the command and which it is."""
    here = Path(__file__).parent
    if shutil.which("go"):
        binary = workdir / "upstream"
        build = subprocess.run(
            ["go", "build", "-o", str(binary), str(here / "upstream.go")],
            capture_output=True,
            text=True,
            env={**os.environ, "GO111MODULE": "off"},
        )
        if build.returncode == 0:
            return [str(binary)], "go"
    return [sys.executable, str(here / "upstream.py")], "python-asyncio"


class Upstream:
    """The benchmark upstream running in its own process."""

    def __init__(self, argv: list[str], kind: str) -> None:
        self.kind = kind
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.startswith("ready "):
            self.process.kill()
            raise RuntimeError(f"benchmark upstream did not start: {line!r}")
        self.address = line.split()[1]

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(10)


@pytest.fixture(scope="session")
def echo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    upstream = Upstream(*upstream_command(tmp_path_factory.mktemp("upstream")))
    yield upstream
    upstream.close()


@pytest.fixture(autouse=True)
def _record_upstream(benchmark: Any, echo: Upstream) -> None:
    benchmark.extra_info["upstream"] = echo.kind


@pytest.fixture
def planes(certs) -> Iterator[tuple[DataPlane, DataPlane]]:
    """A server and a client data plane, one worker thread each (2 cores on the reference box)."""
    server_cert, client_cert = certs
    server, client = DataPlane(1), DataPlane(1)
    server.load_identity(server_cert)
    client.load_identity(client_cert)
    yield server, client
    client.close()
    server.close()
