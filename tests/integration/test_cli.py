"""The ``ambient`` command as a user runs it: real processes, readiness lines, signals."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from ambient.testing import exchange

# -P: never import the source tree's uncompiled `ambient/` from the working directory.
PYTHON_FLAGS = ["-P"]
SERVER = "spiffe://cluster.local/ns/bench/sa/server"
CLIENT = "spiffe://cluster.local/ns/bench/sa/client"


def ambient(*args: str, **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *PYTHON_FLAGS, "-m", "ambient", *args],
        capture_output=True,
        text=True,
        timeout=60,
        **kwargs,
    )


def start(*args: str) -> tuple[subprocess.Popen[str], str]:
    """Start an ambient process and wait for its `ready <address>` line."""
    proc = subprocess.Popen(
        [sys.executable, *PYTHON_FLAGS, "-m", "ambient", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    if not line.startswith("ready "):
        proc.kill()
        raise AssertionError(f"{args} did not become ready: {line!r} {proc.stderr.read()}")
    return proc, line.split()[1]


def stop(proc: subprocess.Popen[str]) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(30)


def test_demo_shows_every_flow_and_exits_0():
    started = time.monotonic()
    result = ambient("demo")
    assert result.returncode == 0, result.stdout + result.stderr
    # L4 flows, then HTTP through the waypoint: 10 routed, one denied by an AuthorizationPolicy,
    # one refused for its JWT.
    assert result.stdout.count("[ok ]") == 4 + 12
    assert "BAD" not in result.stdout
    assert "s1's ztunnel saw peer: spiffe://cluster.local/ns/default/sa/c1" in result.stdout
    assert "s1's ztunnel saw peer: none (no identity)" in result.stdout  # from outside the mesh
    assert "c3 -> ztunnel w2 -> HBONE mTLS (same node)" in result.stdout
    # The seed's second figure: the route to echo-v1, each hop's view of who is calling.
    assert (
        "c1 -> ztunnel w1 -> HBONE -> waypoint default/waypoint on w1 (route default/echo#0) "
        "-> HBONE -> ztunnel w2 -> echo-v1" in result.stdout
    )
    assert "the waypoint saw spiffe://cluster.local/ns/default/sa/c1" in result.stdout
    # L7 security at the waypoint: the 403 names the policy, the 401 says why.
    assert (
        "403 from the waypoint (expected 403): "
        "rbac_access_denied_matched_policy[default/echo-no-admin]" in result.stdout
    )
    assert (
        "401 from the waypoint (expected 401): jwt_authn_access_denied{Jwt verification fails}"
        in result.stdout
    )
    assert "echo-v1's ztunnel saw spiffe://cluster.local/ns/default/sa/waypoint" in result.stdout
    assert "from echo-v2" not in result.stdout  # the seed's route: every request to echo-v1
    assert "bypassed the waypoint; echo-v1's ztunnel saw no identity (plaintext)" in result.stdout
    assert time.monotonic() - started < 30


def test_version_reports_a_release_core():
    result = ambient("version")
    assert result.returncode == 0
    assert "release build" in result.stdout


def test_ca_init_writes_a_private_key_and_refuses_to_overwrite(tmp_path):
    assert ambient("ca", "init", "--dir", str(tmp_path)).returncode == 0
    assert oct(os.stat(tmp_path / "root-key.pem").st_mode & 0o777) == "0o600"
    again = ambient("ca", "init", "--dir", str(tmp_path))
    assert again.returncode == 1 and "--force" in again.stdout


def test_hbone_serve_and_forward_processes_carry_a_connection(tmp_path, echo):
    assert ambient("ca", "init", "--dir", str(tmp_path)).returncode == 0
    server, hbone = start(
        "hbone",
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--ca-dir",
        str(tmp_path),
        "--identity",
        SERVER,
        "--upstream",
        echo.address,
    )
    forwarder, entry = start(
        "hbone",
        "forward",
        "--listen",
        "127.0.0.1:0",
        "--server",
        hbone,
        "--authority",
        echo.address,
        "--ca-dir",
        str(tmp_path),
        "--identity",
        CLIENT,
        "--expect",
        SERVER,
    )
    try:
        host, port = entry.rsplit(":", 1)
        payload = b"through two processes" * 10_000
        assert exchange(socket.create_connection((host, int(port))), payload) == payload
        probe = ambient(
            "hbone",
            "probe",
            "--server",
            hbone,
            "--authority",
            echo.address,
            "--ca-dir",
            str(tmp_path),
            "--identity",
            CLIENT,
            "--expect",
            SERVER,
            "--count",
            "50",
            "--concurrency",
            "5",
            "--payload",
            "100",
        )
        assert probe.returncode == 0, probe.stderr
        assert '"ok": 50' in probe.stdout and '"bytes_received": 5000' in probe.stdout
    finally:
        assert stop(forwarder) == 0
        assert stop(server) == 0


def test_probe_against_the_wrong_identity_fails_with_the_reason(tmp_path, echo):
    assert ambient("ca", "init", "--dir", str(tmp_path)).returncode == 0
    server, hbone = start(
        "hbone", "serve", "--listen", "127.0.0.1:0", "--ca-dir", str(tmp_path), "--identity", SERVER
    )
    try:
        probe = ambient(
            "hbone",
            "probe",
            "--server",
            hbone,
            "--authority",
            echo.address,
            "--ca-dir",
            str(tmp_path),
            "--identity",
            CLIENT,
            "--expect",
            "spiffe://cluster.local/ns/bench/sa/impostor",
        )
        assert probe.returncode == 1
        assert "server identity mismatch" in probe.stdout
    finally:
        assert stop(server) == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["hbone", "serve", "--listen", "nowhere", "--ca-dir", ".", "--identity", SERVER],
            "expected ip:port",
        ),
        (
            ["hbone", "serve", "--listen", "127.0.0.1:0", "--ca-dir", ".", "--identity", "bob"],
            "starting with 'spiffe://'",
        ),
        (
            [
                "hbone",
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--ca-dir",
                "/nonexistent",
                "--identity",
                SERVER,
            ],
            "not found (run `ambient ca init`)",
        ),
    ],
)
def test_bad_arguments_are_refused_with_what_was_expected(args, message):
    result = ambient(*args)
    assert result.returncode != 0
    assert message in result.stderr + result.stdout


def test_demo_keep_leaves_the_mesh_running_for_your_own_traffic(tmp_path):
    from ambient import socks5

    proc = subprocess.Popen(
        [sys.executable, *PYTHON_FLAGS, "-m", "ambient", "demo", "--keep"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    try:
        lines = []
        while not any("mesh file:" in line for line in lines):
            line = proc.stdout.readline()
            assert line, f"demo exited early: {''.join(lines)} {proc.stderr.read()}"
            lines.append(line)
        text = "".join(lines)
        assert "the mesh keeps running" in text and "/config_dump" in text
        assert "/metrics" in text and "/healthz/ready" in text
        # Our own traffic, as C1 through its ztunnel to Service s1.
        sock = socks5.connect(("127.10.1.1", 15080), ("127.10.100.1", 80), source="127.10.1.1")
        assert exchange(sock, b"my own bytes") == b"my own bytes"
        assert (tmp_path / "ambient-demo-mesh.yaml").read_text().startswith("# The seed's figure")
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0


def test_demo_runs_an_edited_mesh_file_and_refuses_a_broken_one(tmp_path):
    shown = ambient("demo", "--show-config")
    assert shown.returncode == 0 and "kind: Service" in shown.stdout
    edited = tmp_path / "mesh.yaml"
    # Move C3 to node w1: it now crosses nodes too.
    edited.write_text(
        shown.stdout.replace(
            "  name: c3\n  namespace: default\n  labels: {app: c3}\nspec:\n  nodeName: w2",
            "  name: c3\n  namespace: default\n  labels: {app: c3}\nspec:\n  nodeName: w1",
        )
    )
    result = ambient("demo", "--config", str(edited))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "c3 -> ztunnel w1 -> HBONE mTLS -> ztunnel w2 -> s1" in result.stdout
    broken = tmp_path / "broken.yaml"
    broken.write_text(shown.stdout.replace("podIP: 127.10.2.1", "podIP: 127.10.2.1000"))
    result = ambient("demo", "--config", str(broken))
    assert result.returncode == 2
    assert "broken.yaml" in result.stdout and "status.podIP" in result.stdout
