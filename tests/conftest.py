"""Fixtures shared by the test suites: a CA, workload certificates, upstream applications that
know nothing of the mesh, and data planes that are always closed."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator

import pytest

from ambient.hbone import DataPlane
from ambient.identity import CertificateAuthority, WorkloadCertificate
from ambient.testing import App

TRUST_DOMAIN = "cluster.local"

# Tests marked ``requires_tool("haproxy", ...)`` need a program that is not a Python package. On a
# machine without it they are skipped, saying which and why; with AMBIENT_REQUIRE_TOOLS=1 (CI sets
# it, after installing them) they fail instead, so CI cannot pass by skipping them. The
# network-namespace tests have their own switch, AMBIENT_REQUIRE_NETNS (tests/netns/conftest.py).
REQUIRE_TOOLS_ENV = "AMBIENT_REQUIRE_TOOLS"
# Debian keeps daemons such as haproxy in sbin, which a non-root user's PATH often lacks.
_SEARCH_PATH = os.pathsep.join(
    [os.environ.get("PATH", os.defpath), "/usr/local/sbin", "/usr/sbin", "/sbin"]
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "requires_tool(name, package): needs the program `name` (Debian package `package`); "
        f"skipped without it unless {REQUIRE_TOOLS_ENV}=1",
    )


def pytest_runtest_setup(item: pytest.Item) -> None:
    for marker in item.iter_markers("requires_tool"):
        name = marker.args[0]
        package = marker.args[1] if len(marker.args) > 1 else name
        if shutil.which(name, path=_SEARCH_PATH):
            continue
        missing = f"{name} is not installed (Debian package {package})"
        if os.environ.get(REQUIRE_TOOLS_ENV) == "1":
            pytest.fail(f"{missing}; {REQUIRE_TOOLS_ENV}=1: this test must run here", pytrace=False)
        pytest.skip(f"{missing}; {REQUIRE_TOOLS_ENV}=1 makes this a failure")


def spiffe(namespace: str, account: str, trust_domain: str = TRUST_DOMAIN) -> str:
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{account}"


@pytest.fixture(scope="session")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create(TRUST_DOMAIN)


@pytest.fixture(scope="session")
def server_cert(ca: CertificateAuthority) -> WorkloadCertificate:
    return ca.issue(spiffe("default", "server"))


@pytest.fixture(scope="session")
def client_cert(ca: CertificateAuthority) -> WorkloadCertificate:
    return ca.issue(spiffe("default", "client"))


@pytest.fixture
def app_factory() -> Iterator[Callable[..., App]]:
    apps: list[App] = []

    def make(mode: str = "echo") -> App:
        app = App(mode)
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.close()


@pytest.fixture
def echo(app_factory: Callable[..., App]) -> App:
    return app_factory("echo")


@pytest.fixture
def dataplane_factory() -> Iterator[Callable[..., DataPlane]]:
    planes: list[DataPlane] = []

    def make(*args: object, **kwargs: object) -> DataPlane:
        dp = DataPlane(*args, **kwargs)  # type: ignore[arg-type]
        planes.append(dp)
        return dp

    yield make
    for dp in planes:
        dp.close()
