"""L4 authorization on the transparent data path: a policy on S1 decides, in S1's node's ztunnel,
which captured connections reach it (Istio: policy), and a changed policy applies to live
connections on reload. Also hostile bytes on a pod's 15008."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from ambient import examples
from ambient.testbed import netns
from ambient.testbed.pods import (
    APP_PORT,
    ask,
    connect,
    inbound_entries,
    refused,
    serve_app,
)
from ambient.testbed.testbed import Testbed, running
from ambient.testing import App, wait_until

S1 = "10.40.2.1"

ONLY_C1 = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: echo-from-c1, namespace: default}
spec:
  selector: {matchLabels: {app: echo}}
  action: ALLOW
  rules:
  - from:
    - source: {principals: [%s]}
"""


@pytest.fixture(scope="module")
def mesh_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("policy") / "mesh.yaml"
    path.write_text(
        examples.read("testbed-mesh.yaml") + "---" + ONLY_C1 % "cluster.local/ns/default/sa/c1"
    )
    return path


@pytest.fixture(scope="module")
def bed(mesh_file: Path) -> Iterator[Testbed]:
    with running(
        [mesh_file], mesh_file.parent, ztunnel_args=("--watch-interval", "0.1")
    ) as testbed:
        yield testbed


@pytest.fixture(scope="module")
def s1(bed: Testbed) -> Iterator[App]:
    app = serve_app("s1", "name:s1")
    yield app
    app.close()


def test_only_the_allowed_identity_reaches_s1(bed: Testbed, s1: App) -> None:
    """Seed: "it will apply Authorization Policies and forward the request only if the request
    passes these checks"; and "a user can set a policy requiring an identity ... to block all
    plaintext traffic"."""
    bed.proxy("w2").forget_entries()
    assert ask("c1", S1) == "s1\nping\n"
    assert refused("c2", S1, APP_PORT) == ""
    assert refused("outside", S1, APP_PORT) == ""  # plaintext: no identity, no match
    entries: list[dict[str, object]] = []

    def both_refusals_logged() -> bool:  # a line is written when its connection ends
        entries.extend(inbound_entries(bed.proxy("w2"), "s1", timeout=0.2))
        return sum("error" in e for e in entries) >= 2

    wait_until(both_refusals_logged, timeout=10, what="the two refusals in w2's access log")
    denied = [e for e in entries if "error" in e]
    assert {e.get("src.identity") for e in denied} == {
        "spiffe://cluster.local/ns/default/sa/c2",
        None,
    }, entries
    assert all("default/echo-from-c1" in e["error"] or "no ALLOW" in e["error"] for e in denied)


def test_a_policy_change_closes_live_connections_it_no_longer_allows(
    bed: Testbed, s1: App, mesh_file: Path
) -> None:
    sock = connect("c1", S1, APP_PORT)
    try:
        assert sock.recv(3) == b"s1\n"
        mesh_file.write_text(
            examples.read("testbed-mesh.yaml") + "---" + ONLY_C1 % "cluster.local/ns/default/sa/c2"
        )
        sock.settimeout(10)

        def closed() -> bool:
            try:
                sock.sendall(b"x")
                return sock.recv(10) == b""
            except OSError:
                return True

        wait_until(closed, timeout=10, what="c1's live connection closed by the new policy")
        wait_until(lambda: ask("c2", S1) == "s1\nping\n", timeout=10, what="c2 allowed")
    finally:
        sock.close()


def test_garbage_on_a_pods_hbone_port_is_dropped_and_others_are_served(
    bed: Testbed, s1: App
) -> None:
    """Hostile bytes on 15008 (not TLS) end that connection only."""
    for payload in (b"GET / HTTP/1.1\r\n\r\n", b"\x16\x03\x01\xff\xff" + b"\x00" * 64):
        sock = netns.in_netns("outside", lambda: socket.create_connection((S1, 15008), 5))
        with sock:
            sock.sendall(payload)
            try:
                answer = sock.recv(100)
            except ConnectionResetError:
                answer = b""
            assert b"s1" not in answer
    assert ask("c2", S1) == "s1\nping\n"
