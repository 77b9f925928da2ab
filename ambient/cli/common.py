"""Helpers shared by the subcommands: address parsing, certificate loading, waiting for a signal."""

from __future__ import annotations

import argparse
import ipaddress
import signal
import threading
from pathlib import Path
from typing import Any, TypedDict

from ..identity import CertificateAuthority, SpiffeId, WorkloadCertificate


def socket_address(text: str) -> str:
    """argparse type: ``ip:port`` (IPv6 as ``[ip]:port``), returned normalised."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r}: expected ip:port")
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: {host!r} is not an IP address") from None
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def spiffe_id(text: str) -> str:
    """argparse type: an Istio SPIFFE ID."""
    try:
        return str(SpiffeId.parse(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_identity_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ca-dir",
        required=True,
        type=Path,
        help="directory of a CA made by `ambient ca init`; this process issues its own certificate",
    )
    parser.add_argument(
        "--identity", required=True, type=spiffe_id, help="SPIFFE ID this process speaks as"
    )


def add_ca_client_arguments(parser: argparse.ArgumentParser) -> None:
    """Istio's CA API in place of ``--ca-dir`` (Istio's ztunnel: CA_ADDRESS, the root it trusts
    for it, the token it presents)."""
    parser.add_argument(
        "--ca-address",
        metavar="HOST:PORT",
        help="a CA speaking Istio's certificate API (istiod, `ambient control-plane`): the "
        "certificates come from it instead of --ca-dir",
    )
    parser.add_argument(
        "--ca-root-cert",
        type=Path,
        metavar="FILE",
        help="PEM root the CA's serving certificate must chain to (with --ca-address)",
    )
    parser.add_argument(
        "--ca-hostname",
        default=None,
        help="the name the CA's certificate must carry (default: the host of --ca-address; "
        "istiod's is istiod.istio-system.svc)",
    )
    parser.add_argument(
        "--token-file",
        type=Path,
        metavar="FILE",
        help="the token presented to the CA (a service-account token), read at each call",
    )
    parser.add_argument(
        "--cluster-id", default="Kubernetes", help="ClusterID sent to the CA (Istio's default)"
    )


def certificate_issuer(args: argparse.Namespace) -> Any:
    """Where this process's certificates come from: ``--ca-address`` (Istio's CA API) or
    ``--ca-dir``; exits saying what is missing."""
    if args.ca_address:
        from ..identity.istio_ca import IstioCaClient
        from ..istiod import token_from

        if args.ca_root_cert is None:
            raise SystemExit("ambient: --ca-address needs --ca-root-cert (the CA's TLS root)")
        try:
            root = args.ca_root_cert.read_bytes()
        except OSError as e:
            raise SystemExit(f"ambient: --ca-root-cert {args.ca_root_cert}: {e.strerror}") from None
        return IstioCaClient(
            args.ca_address,
            root,
            token=token_from(args.token_file),
            cluster_id=args.cluster_id,
            hostname=args.ca_hostname,
        )
    if args.ca_dir is None:
        raise SystemExit("ambient: give --ca-dir (a local CA) or --ca-address (Istio's CA API)")
    return load_ca(args.ca_dir)


def load_ca(directory: Path) -> CertificateAuthority:
    """The CA of ``--ca-dir``; exits naming the missing file if there is none."""
    try:
        return CertificateAuthority.load(directory)
    except FileNotFoundError as e:
        raise SystemExit(
            f"ambient: --ca-dir {directory}: {e.filename} not found (run `ambient ca init`)"
        ) from None


def issue_certificate(args: argparse.Namespace) -> WorkloadCertificate:
    """The process's own certificate, issued from ``--ca-dir`` for ``--identity``."""
    return load_ca(args.ca_dir).issue(args.identity)


def wait_for_termination() -> str:
    """Block until SIGTERM or SIGINT; returns the signal's name."""
    received: list[str] = []
    done = threading.Event()

    def handler(signum: int, _frame: object) -> None:
        received.append(signal.Signals(signum).name)
        done.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    while not done.wait(1.0):
        pass
    return received[0]


def add_limit_arguments(parser: argparse.ArgumentParser) -> None:
    """The data plane's bounds, as flags (see DataPlane)."""
    group = parser.add_argument_group("bounds")
    group.add_argument(
        "--max-connections",
        type=int,
        default=10_000,
        metavar="N",
        help="connections one listener holds at most; more are closed at accept (0: no cap; "
        "default 10000)",
    )
    group.add_argument(
        "--max-connections-per-source",
        type=int,
        default=1_000,
        metavar="N",
        help="connections one source IP holds on one listener at most (0: no cap; default 1000)",
    )
    group.add_argument(
        "--max-pending-decisions",
        type=int,
        default=1024,
        metavar="N",
        help="connections waiting for a Python decision at most; more are refused at once "
        "(default 1024)",
    )
    group.add_argument(
        "--hbone-idle-timeout",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="an HBONE connection with no stream for this long is closed by the server "
        "(default 600)",
    )


class Limits(TypedDict):
    max_connections: int
    max_connections_per_source: int
    max_pending_decisions: int
    hbone_idle_timeout: float


def limit_options(args: argparse.Namespace) -> Limits:
    """DataPlane keyword arguments from :func:`add_limit_arguments`' flags."""
    for name in ("max_connections", "max_connections_per_source", "max_pending_decisions"):
        if getattr(args, name) < 0:
            raise SystemExit(f"--{name.replace('_', '-')}: expected 0 or more")
    return Limits(
        {
            "max_connections": args.max_connections,
            "max_connections_per_source": args.max_connections_per_source,
            "max_pending_decisions": args.max_pending_decisions,
            "hbone_idle_timeout": args.hbone_idle_timeout,
        }
    )


def raise_fd_limit() -> int:
    """Raise this process's open-file limit to its hard limit, as Istio's ztunnel does at start:
    every proxied connection takes two or three descriptors. Returns the limit now in force."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft
