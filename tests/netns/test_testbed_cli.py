"""``ambient testbed up|down`` from the command line, with programs that know nothing of the
mesh run the way a user runs them: ``ip netns exec <pod> curl ...``, ``iperf3``."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ambient.testbed import netns
from ambient.testing import wait_until

S1, S2, C1 = "10.40.2.1", "10.40.1.5", "10.40.1.1"
ECHO_VIP = "10.96.0.10"
TESTBED_NAMESPACES = ("c1", "c2", "c3", "s1", "s2", "outside", "legacy", "node-w1", "node-w2")


def ambient(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-P", "-m", "ambient", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def in_pod(pod: str, *command: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", pod, *command], capture_output=True, text=True, timeout=timeout
    )


@contextlib.contextmanager
def background(pod: str, *command: str, port: int) -> Iterator[subprocess.Popen[str]]:
    """A server started in ``pod`` with ``ip netns exec``; yields once it listens on ``port``."""
    process = subprocess.Popen(
        ["ip", "netns", "exec", pod, *command],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        deadline = time.monotonic() + 10
        while f":{port} " not in netns.run(["ss", "-Htln"], netns=pod):
            assert process.poll() is None, f"{command} exited in {pod}"
            assert time.monotonic() < deadline, f"{command} did not listen in {pod}"
            time.sleep(0.05)
        yield process
    finally:
        process.terminate()
        process.wait(10)


@pytest.fixture(scope="module")
def testbed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    workdir = tmp_path_factory.mktemp("cli-testbed")
    up = ambient("testbed", "up", "--workdir", str(workdir))
    try:
        assert up.returncode == 0, up.stderr + up.stdout
        assert "testbed ready" in up.stdout
        yield workdir
    finally:
        down = ambient("testbed", "down", "--workdir", str(workdir))
        assert down.returncode == 0, down.stderr
        left = [name for name in TESTBED_NAMESPACES if netns.exists(name)]
        assert not left, f"left behind: {left}"


def test_curl_from_a_pod_reaches_a_pod_and_a_service(testbed: Path) -> None:
    """curl, unmodified, in C1: its connections are captured and carried by the mesh."""
    with (
        background("s1", sys.executable, "-m", "http.server", "8080", port=8080),
        background("s2", sys.executable, "-m", "http.server", "8080", port=8080),
    ):
        pod = in_pod(
            "c1", "curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", f"http://{S1}:8080/"
        )
        assert pod.stdout == "200", pod.stderr
        service = in_pod(
            "c1", "curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", f"http://{ECHO_VIP}/"
        )
        assert service.stdout == "200", service.stderr
    log = (testbed / "ztunnel-w1.log").read_text()
    assert '"src.workload":"c1"' in log and '"transport":"HBONE"' in log


def test_iperf3_between_pods_through_the_mesh(testbed: Path) -> None:
    with background("s1", "iperf3", "-s", "-p", "5201", port=5201):
        result = in_pod("c1", "iperf3", "-c", S1, "-p", "5201", "-t", "1", "-J")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
    assert '"bits_per_second"' in result.stdout
    # The test pods' ports are not declared: iperf3's connections still go through ztunnel.
    log = (testbed / "ztunnel-w2.log").read_text()
    assert '"dst.workload":"s1"' in log and f"{S1}:5201" in log


def test_a_second_up_is_refused_while_one_runs(testbed: Path) -> None:
    again = ambient("testbed", "up", "--workdir", str(testbed))
    assert again.returncode == 2
    assert "holds a testbed already" in again.stderr


def test_a_mesh_the_testbed_cannot_build_is_refused_with_the_pod_named(tmp_path: Path) -> None:
    mesh = tmp_path / "bad.yaml"
    mesh.write_text(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: nowhere, namespace: default}\n"
        "spec: {}\nstatus: {podIP: 10.41.0.1}\n"
    )
    up = ambient("testbed", "up", "--config", str(mesh), "--workdir", str(tmp_path / "w"))
    assert up.returncode == 1
    assert "nowhere" in up.stderr and "node" in up.stderr
    assert not netns.exists("nowhere")


def test_pods_are_taken_back_and_handed_over_again_at_runtime(testbed: Path) -> None:
    """`ambient testbed pod del|add` speak ZDS del/add to the pod's ztunnel through the owner."""
    assert ":15001 " in netns.run(["ss", "-Htln"], netns="c2")
    removed = ambient("testbed", "pod", "del", "c2", "--workdir", str(testbed))
    assert removed.returncode == 0, removed.stderr
    assert ":15001 " not in netns.run(["ss", "-Htln"], netns="c2")
    added = ambient("testbed", "pod", "add", "c2", "--workdir", str(testbed))
    assert added.returncode == 0, added.stderr
    assert ":15001 " in netns.run(["ss", "-Htln"], netns="c2")
    unknown = ambient("testbed", "pod", "del", "nobody", "--workdir", str(testbed))
    assert unknown.returncode == 1
    assert "no pod named 'nobody'" in unknown.stderr


def test_capture_can_be_turned_off_and_on_for_a_pod(testbed: Path) -> None:
    """Capture off: C3's connections go past its ztunnel (S1's still captures what arrives: that
    is S1's choice). Back on, they go through it again — and since lines are written in order,
    once the second run's lines are there the first run's would have been too."""
    with (
        background("s1", "iperf3", "-s", "-p", "5202", port=5202),
        background("s1", "iperf3", "-s", "-p", "5203", port=5203),
    ):
        off = ambient("testbed", "capture", "off", "c3", "--workdir", str(testbed))
        assert off.returncode == 0, off.stderr
        try:
            result = in_pod("c3", "iperf3", "-c", S1, "-p", "5202", "-t", "1")
            assert result.returncode == 0, result.stderr
        finally:
            on = ambient("testbed", "capture", "on", "c3", "--workdir", str(testbed))
            assert on.returncode == 0, on.stderr
        result = in_pod("c3", "iperf3", "-c", S1, "-p", "5203", "-t", "1")
        assert result.returncode == 0, result.stderr
    wait_until(
        lambda: _outbound_lines(testbed, "w2", "c3", f"{S1}:5203") == 2,
        what="C3's two iperf3 connections (control, data) logged by its ztunnel",
    )
    assert _outbound_lines(testbed, "w2", "c3", f"{S1}:5202") == 0


def _outbound_lines(workdir: Path, node: str, pod: str, destination: str) -> int:
    """Outbound access-log lines of ``pod`` to ``destination`` in ``node``'s ztunnel."""
    entries = [json.loads(x) for x in (workdir / f"ztunnel-{node}.log").read_text().splitlines()]
    return sum(
        e["direction"] == "outbound"
        and e.get("src.workload") == pod
        and destination in (e.get("dst.addr"), e.get("dst.hbone_addr"))
        for e in entries
    )
