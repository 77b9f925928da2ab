"""Shared pieces of the pure-Python HBONE peer: wire constants, errors, TLS contexts with
the SPIFFE checks, address helpers."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
import ssl
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import h2.events
import h2.exceptions

from ambient.identity import WorkloadCertificate

log = logging.getLogger(__name__)

ALPN_H2 = "h2"
STREAM_WINDOW = 4 * 1024 * 1024  # SETTINGS_INITIAL_WINDOW_SIZE, as ztunnel
CONNECTION_WINDOW = 16 * 1024 * 1024  # connection window, opened by a WINDOW_UPDATE on stream 0
MAX_FRAME_SIZE = 1024 * 1024  # SETTINGS_MAX_FRAME_SIZE, as ztunnel
DEFAULT_WINDOW = 65_535  # RFC 7540 initial window of every connection
MAX_CONCURRENT_STREAMS = 1000  # what our server advertises (h2's own default is 100)
MAX_HEADER_LIST_SIZE = 64 * 1024
READ_SIZE = 256 * 1024  # socket reads when relaying
TLS_STREAM_LIMIT = 1024 * 1024  # asyncio StreamReader buffer limit on the TLS side
TLS_WRITE_HIGH_WATER = 1024 * 1024  # write buffer size before drain() blocks on the TLS side
CONNECT_TIMEOUT = 10.0  # upstream TCP connect
CLOSE_TIMEOUT = 2.0  # graceful TLS close before aborting


class HboneError(Exception):
    """An HBONE connection or stream failed; ``status`` is the HTTP status if the peer sent one."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ReceivedConnect:
    """What the server saw on one stream: the request line, its regular headers, and who sent it.

    ``headers`` holds the non-pseudo headers only (``forwarded``, ``baggage``, ``traceparent`` ...);
    the pseudo-headers are ``method`` and ``authority``. ``peer_identity``: the client's SPIFFE ID.
    """

    method: str
    authority: str
    headers: dict[str, str]
    peer_identity: str | None


# ----------------------------------------------------------------------------------------------
# TLS


def _load_cert_chain(ctx: ssl.SSLContext, cert: WorkloadCertificate) -> None:
    """Load the chain and key; ``ssl`` only reads files, so use a private, short-lived directory."""
    with tempfile.TemporaryDirectory(prefix="hbone-") as tmp:  # created 0700
        chain_path = os.path.join(tmp, "chain.pem")
        key_path = os.path.join(tmp, "key.pem")
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(cert.key_pem)
        with open(chain_path, "wb") as f:
            f.write(cert.chain_pem)
        ctx.load_cert_chain(chain_path, key_path)


def _tls_context(cert: WorkloadCertificate, *, server_side: bool) -> ssl.SSLContext:
    """A TLS 1.3-only, mutually authenticated context offering only ALPN ``h2``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    if not server_side:
        ctx.check_hostname = False  # identity is checked on the URI SAN, not a host name
    ctx.verify_mode = ssl.CERT_REQUIRED  # server side: client certificate required
    ctx.load_verify_locations(cadata=cert.roots_pem.decode("ascii"))
    _load_cert_chain(ctx, cert)
    ctx.set_alpn_protocols([ALPN_H2])
    if server_side:
        ctx.num_tickets = 0  # no session resumption
    return ctx


def _peer_uri_sans(writer: asyncio.StreamWriter) -> list[str]:
    """The URI SANs of the verified peer certificate (empty if there is none)."""
    ssl_object = writer.get_extra_info("ssl_object")
    if ssl_object is None:
        return []
    peer = ssl_object.getpeercert()
    if not peer:
        return []
    return [str(value) for kind, value in peer.get("subjectAltName", ()) if kind == "URI"]


def _selected_alpn(writer: asyncio.StreamWriter) -> str | None:
    ssl_object = writer.get_extra_info("ssl_object")
    return None if ssl_object is None else ssl_object.selected_alpn_protocol()


def _tune_socket(writer: asyncio.StreamWriter) -> None:
    """TCP keepalive on (asyncio already sets TCP_NODELAY on TCP sockets)."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)


async def _close_writer(writer: asyncio.StreamWriter, *, abort: bool = False) -> None:
    """Close a transport: gracefully (bounded in time) or by abort."""
    if abort:
        _abort(writer.transport)
        return
    writer.close()
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await writer.wait_closed()
    except (OSError, TimeoutError):
        _abort(writer.transport)


def _abort(transport: asyncio.WriteTransport) -> None:
    # The peer's TLS alert (an SSLError, so an OSError) may have torn the TLS transport down
    # already; aborting it then raises AttributeError on some Python 3.11 releases (Debian 12's
    # 3.11.2, not 3.11.7), whose transport has dropped its protocol. Nothing is left to abort.
    with contextlib.suppress(AttributeError):
        transport.abort()


# ----------------------------------------------------------------------------------------------
# Addresses


def parse_authority(authority: str) -> tuple[str, int] | None:
    """Parse a CONNECT ``:authority``: ``ipv4:port`` or ``[ipv6]:port``; None if invalid."""
    host, sep, port_text = authority.rpartition(":")
    if not sep or not (port_text.isascii() and port_text.isdigit()) or len(port_text) > 5:
        return None
    port = int(port_text)
    if not 1 <= port <= 65535:
        return None
    try:
        if host.startswith("[") and host.endswith("]"):
            v6 = ipaddress.IPv6Address(host[1:-1])
            if v6.scope_id is not None:
                return None
            return str(v6), port
        return str(ipaddress.IPv4Address(host)), port
    except ValueError:
        return None


def format_hostport(host: str, port: int) -> str:
    """``host:port``, with IPv6 literals in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _parse_hostport(text: str) -> tuple[str, int]:
    """Parse a command-line ``host:port`` (host may be a name, an IPv4 or a bracketed IPv6)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def _text(value: str | bytes) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


# ----------------------------------------------------------------------------------------------
# One HTTP/2 connection (either side)


@contextlib.contextmanager
def _h2_errors(what: str) -> Iterator[None]:
    """Turn h2 state errors on send into HboneError."""
    try:
        yield
    except h2.exceptions.H2Error as e:
        raise HboneError(f"{what}: {e!r}") from e
