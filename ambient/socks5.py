"""Connect through a ztunnel's SOCKS5 port (RFC 1928): how an application in loopback mode, where
nothing captures its traffic, sends it into the mesh."""

from __future__ import annotations

import ipaddress
import socket
import struct

REPLIES = {
    1: "general failure",
    2: "not allowed by the mesh",
    3: "network unreachable",
    4: "host unreachable",
    5: "connection refused",
    7: "command not supported",
    8: "address type not supported",
}


class Socks5Error(ConnectionError):
    def __init__(self, code: int) -> None:
        self.code = code
        super().__init__(f"SOCKS5 proxy refused: {REPLIES.get(code, f'code {code}')}")


def connect(
    proxy: tuple[str, int],
    destination: tuple[str, int],
    *,
    source: str | None = None,
    timeout: float | None = 10.0,
) -> socket.socket:
    """A socket connected to ``destination`` (an IP or a name) through ``proxy``; ``source`` binds
    the client side (in loopback mode, the pod's own IP). Raises :class:`Socks5Error`."""
    host, port = destination
    try:
        address = ipaddress.ip_address(host)
        packed = (b"\x01" if address.version == 4 else b"\x04") + address.packed
    except ValueError:
        name = host.encode()
        packed = b"\x03" + bytes([len(name)]) + name
    sock = socket.socket(socket.AF_INET6 if ":" in proxy[0] else socket.AF_INET)
    try:
        sock.settimeout(timeout)
        if source is not None:
            sock.bind((source, 0))
        sock.connect(proxy)
        sock.sendall(b"\x05\x01\x00")
        if _read(sock, 2) != b"\x05\x00":
            raise Socks5Error(1)
        sock.sendall(b"\x05\x01\x00" + packed + struct.pack("!H", port))
        reply = _read(sock, 10)
        if reply[1] != 0:
            raise Socks5Error(reply[1])
    except BaseException:
        sock.close()
        raise
    return sock


def _read(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("SOCKS5 proxy closed the connection")
        data += chunk
    return data
