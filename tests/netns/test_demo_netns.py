"""``ambient demo --netns``: the seed's figure on the testbed, run as a user runs it."""

from __future__ import annotations

import subprocess
import sys

from ambient.testbed import netns


def test_demo_netns_shows_every_flow_on_its_expected_path() -> None:
    result = subprocess.run(
        [sys.executable, "-P", "-m", "ambient", "demo", "--netns"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "15/15 flows took the expected path" in out
    # The seed's figure: C1 and C2 across nodes, C3 on S1's node, all through HBONE with their
    # own identity; the pod outside the mesh arrives in plaintext without one.
    assert "c1 -> ztunnel w1 -> HBONE mTLS -> ztunnel w2" in out
    assert "c3 -> ztunnel w2 -> HBONE mTLS (same node) -> ztunnel w2" in out
    assert "peer identity seen: spiffe://cluster.local/ns/default/sa/c2" in out
    assert "outside -> (no capture) -> plaintext -> ztunnel w2 -> s1" in out
    assert out.count("c1 -> Service echo 10.96.0.10:80: answered by s") == 1
    # The seed's second figure: HTTP through the waypoint pod, routed to web-v1.
    assert "12/12 HTTP requests took the expected path" in out
    assert "rbac_access_denied_matched_policy[default/web-no-admin]" in out
    assert "jwt_authn_access_denied{Jwt verification fails}" in out
    assert (
        "c3 -> ztunnel w2 -> HBONE -> waypoint default/waypoint on w1 (route default/web#0) "
        "-> HBONE -> ztunnel w2 -> web-v1" in out
    )
    assert "web-v1's ztunnel saw spiffe://cluster.local/ns/default/sa/waypoint" in out
    assert "bypassed the waypoint; web-v1's ztunnel saw no identity (plaintext)" in out
    left = ("c1", "s1", "waypoint", "node-w1", "ambient-underlay")
    assert not any(netns.exists(n) for n in left)
