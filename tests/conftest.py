"""Fixtures shared by the test suites: a CA, workload certificates, upstream applications that
know nothing of the mesh, and data planes that are always closed."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from ambient.hbone import DataPlane
from ambient.identity import CertificateAuthority, WorkloadCertificate
from ambient.testing import App

TRUST_DOMAIN = "cluster.local"


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
