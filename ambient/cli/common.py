"""Helpers shared by the subcommands: address parsing, certificate loading, waiting for a signal."""

from __future__ import annotations

import argparse
import ipaddress
import signal
import threading
from pathlib import Path

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
