"""Reaching istiod (or ``ambient control-plane``) as Istio's ztunnel does: a gRPC channel over TLS
that verifies the server with a given root (and, as ``ALT_XDS_HOSTNAME`` / ``ALT_CA_HOSTNAME``,
optionally another name than the address's host), and the caller's token, read from its file
at each call because Kubernetes rotates projected tokens. Used by the CA client
(:mod:`ambient.identity.istio_ca`) and the xDS client (:mod:`ambient.xds.client`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

Token = Callable[[], str | None]


def channel(address: str, root_cert: bytes, hostname: str | None = None) -> Any:
    """A TLS gRPC channel to ``address`` whose certificate must chain to ``root_cert`` and name
    ``hostname`` (default: the address's host)."""
    import grpc  # only a process that talks to a control plane needs grpcio

    options = [("grpc.ssl_target_name_override", hostname)] if hostname else []
    credentials = grpc.ssl_channel_credentials(root_certificates=root_cert)
    return grpc.secure_channel(address, credentials, options=options)


def token_from(path: Path | None) -> Token:
    """The token in ``path``, read at each call; no token without a path."""
    if path is None:
        return lambda: None
    file = path

    def token() -> str | None:
        try:
            return file.read_text().strip() or None
        except OSError as e:
            raise OSError(f"cannot read the token {file}: {e.strerror or e}") from None

    return token
