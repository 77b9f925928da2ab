"""Tests that build network namespaces: they need root, ``ip`` and ``iptables-restore``.

Without them every test here is skipped — unless ``AMBIENT_REQUIRE_NETNS=1`` (CI sets it), which
makes them fail instead, so a runner that lost its privileges cannot pass by skipping them all.
"""

from __future__ import annotations

import os
import shutil

import pytest

NEEDS_ROOT = "needs root (network namespaces)"
REQUIRE_ENV = "AMBIENT_REQUIRE_NETNS"
TOOLS = ("ip", "iptables-restore", "ss", "tcpdump", "curl", "iperf3")


def _missing() -> str | None:
    """Why these tests cannot run here, or None."""
    if os.geteuid() != 0:
        return NEEDS_ROOT
    absent = [tool for tool in TOOLS if shutil.which(tool) is None]
    if absent:
        return f"{NEEDS_ROOT}: {', '.join(absent)} not installed"
    return None


# Session scope: it is set up before any module- or function-scoped fixture of these tests, so
# none of them (building namespaces, say) runs first and fails with a permission error instead.
@pytest.fixture(scope="session", autouse=True)
def _netns_capable() -> None:
    missing = _missing()
    if missing is None:
        return
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{missing} ({REQUIRE_ENV}=1: these tests must run here)", pytrace=False)
    pytest.skip(missing)
