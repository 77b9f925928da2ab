"""What ``ambient ztunnel`` and ``ambient waypoint`` share: loading the mesh files (errors
printed, warnings logged), the access log, the workload certificates, and the three operational
endpoints (admin, metrics, readiness)."""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import ConfigError, MeshCache, load_mesh
from ..hbone import DataPlane
from ..identity.manager import CertificateManager
from ..mesh import Mesh
from ..telemetry.metrics import Exposition
from ..ztunnel import admin
from ..ztunnel.admin import Endpoint
from ..ztunnel.connection import AccessLog
from .common import certificate_issuer

log = logging.getLogger(__name__)


def load(paths: list[Path], trust_domain: str, cache: MeshCache) -> Mesh | None:
    """The mesh of ``paths``; None (every error printed, naming its file) when it is refused."""
    try:
        mesh = load_mesh(paths, trust_domain=trust_domain, cache=cache)
    except ConfigError as e:
        for issue in e.issues:
            print(f"error: {issue}", file=sys.stderr)
        return None
    for warning in mesh.warnings:
        log.warning("%s", warning)
    return mesh


def open_access_log(where: str, *, text: bool = False) -> AccessLog | None:
    """``--access-log``: a file (appended to), ``-`` for stdout, ``off`` for none."""
    if where == "off":
        return None
    stream = sys.stdout if where == "-" else open(where, "a", buffering=1)  # noqa: SIM115
    return AccessLog(stream, text=text)


def certificates(args: argparse.Namespace, dp: DataPlane) -> CertificateManager:
    """Workload certificates from ``--ca-dir`` or ``--ca-address``, installed in ``dp``, renewed
    at half of ``--certificate-ttl``."""
    return CertificateManager(
        certificate_issuer(args),
        dp.load_identity,
        uninstall=dp.core.remove_identity,
        ttl=dt.timedelta(seconds=args.certificate_ttl),
    )


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def endpoints(
    args: argparse.Namespace,
    *,
    config_dump: Callable[[], dict[str, Any]],
    quit: Callable[[], None],
    exposition: Exposition,
    pending: Callable[[], list[str]],
    draining: Callable[[], bool],
) -> list[Endpoint]:
    """Admin (localhost only), metrics and readiness, on ``--admin-address``,
    ``--metrics-address`` and ``--readiness-address``, not started yet; OSError or ValueError
    when an address cannot be bound."""
    return [
        Endpoint(
            _address(args.admin_address),
            admin.admin(config_dump, quit),
            localhost_only=True,
        ),
        Endpoint(_address(args.metrics_address), admin.metrics(exposition)),
        Endpoint(_address(args.readiness_address), admin.readiness(pending, draining)),
    ]
