"""The per-stream request an HBONE server's decision sees — pure-Python reference implementation.

The compiled twin, :mod:`ambient._fast.hbone_request`, is what the data plane uses; both pass the
same test suite (``tests/unit/test_hbone_request.py``), and ``benchmarks/bench_decision.py`` shows
what the compiled one gains. Keep them in step: same names, same results, same errors.

Header formats parsed here:

- ``forwarded`` (RFC 7239): ``for="10.0.0.1:4567";host=svc.ns.svc.cluster.local, for=...``
- ``baggage`` (W3C Baggage): ``k8s.namespace.name=default,service.name=echo;prop=1``
- SPIFFE IDs ``spiffe://<trust domain>/ns/<namespace>/sa/<service account>``
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple
from urllib.parse import unquote

from ._core import Allow, Deny


class SpiffeParts(NamedTuple):
    trust_domain: str
    namespace: str
    service_account: str


def split_spiffe(identity: str | None) -> SpiffeParts | None:
    """The parts of an Istio-shaped SPIFFE ID, or None when it is not one."""
    if not identity or not identity.startswith("spiffe://"):
        return None
    parts = identity[9:].split("/")
    if len(parts) != 5 or parts[1] != "ns" or parts[3] != "sa":
        return None
    if not parts[0] or not parts[2] or not parts[4]:
        return None
    return SpiffeParts(parts[0], parts[2], parts[4])


def split_host_port(authority: str) -> tuple[str, int]:
    """``ip:port`` or ``[ipv6]:port`` → (host, port); ValueError naming the authority otherwise."""
    host, sep, port = authority.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"authority {authority!r}: expected host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    number = int(port)
    if not 0 < number < 65536:
        raise ValueError(f"authority {authority!r}: port out of range 1-65535")
    return host, number


def _unquote_value(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        return value[1:-1].replace('\\"', '"').replace("\\\\", "\\")
    return value


def parse_forwarded(value: str) -> list[dict[str, str]]:
    """RFC 7239 ``Forwarded``: one dict per hop, parameter names lower-cased, quotes removed.

    Malformed pairs (no ``=``) are skipped rather than failing the whole header: the header comes
    from a peer and only informs the decision.
    """
    hops: list[dict[str, str]] = []
    for element in _split_outside_quotes(value, ","):
        hop: dict[str, str] = {}
        for pair in _split_outside_quotes(element, ";"):
            name, eq, raw = pair.partition("=")
            name = name.strip().lower()
            if eq and name:
                hop[name] = _unquote_value(raw)
        if hop:
            hops.append(hop)
    return hops


def _split_outside_quotes(text: str, sep: str) -> list[str]:
    out: list[str] = []
    start = 0
    quoted = False
    i = 0
    n = len(text)
    while i < n:
        c = text[i]
        if c == "\\" and quoted:
            i += 2
            continue
        if c == '"':
            quoted = not quoted
        elif c == sep and not quoted:
            out.append(text[start:i])
            start = i + 1
        i += 1
    out.append(text[start:])
    return [part for part in out if part.strip()]


def parse_baggage(value: str) -> dict[str, str]:
    """W3C ``baggage``: ``key=value`` members separated by commas; properties after ``;`` are
    dropped; values are percent-decoded; members without ``=`` are skipped."""
    out: dict[str, str] = {}
    for member in value.split(","):
        entry = member.split(";", 1)[0]
        key, eq, raw = entry.partition("=")
        key = key.strip()
        if eq and key:
            out[key] = unquote(raw.strip())
    return out


class StreamRequest:
    """One CONNECT stream as the decision sees it: who is asking (``peer_identity``, None for no
    identity), for what (``authority``), from where (``peer_address``), with which headers."""

    __slots__ = ("_baggage", "authority", "headers", "peer_address", "peer_identity")

    def __init__(
        self,
        peer_identity: str | None,
        authority: str,
        peer_address: str,
        headers: tuple[tuple[str, str], ...],
    ) -> None:
        self.peer_identity = peer_identity
        self.authority = authority
        self.peer_address = peer_address
        self.headers = headers
        self._baggage: dict[str, str] | None = None

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (HTTP/2 header names are lower case)."""
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value
        return None

    @property
    def destination(self) -> tuple[str, int]:
        return split_host_port(self.authority)

    @property
    def peer(self) -> SpiffeParts | None:
        return split_spiffe(self.peer_identity)

    @property
    def forwarded_for(self) -> str | None:
        """The original client address the sending proxy declared (first hop's ``for``)."""
        value = self.header("forwarded")
        if value is None:
            return None
        for hop in parse_forwarded(value):
            if "for" in hop:
                return hop["for"]
        return None

    @property
    def baggage(self) -> dict[str, str]:
        if self._baggage is None:
            value = self.header("baggage")
            self._baggage = parse_baggage(value) if value else {}
        return self._baggage

    def __repr__(self) -> str:
        return (
            f"StreamRequest(peer_identity={self.peer_identity!r}, authority={self.authority!r}, "
            f"peer_address={self.peer_address!r})"
        )


Decision = Callable[[StreamRequest], "Allow | Deny"]


class InboundDispatcher:
    """Adapts a decision function over :class:`StreamRequest` to the core's per-stream callback
    ``(peer_identity, authority, peer_address, headers) -> Allow | Deny``."""

    __slots__ = ("decide",)

    def __init__(self, decide: Decision) -> None:
        self.decide = decide

    def __call__(
        self,
        peer_identity: str | None,
        authority: str,
        peer_address: str,
        headers: tuple[tuple[str, str], ...],
    ) -> Allow | Deny:
        verdict = self.decide(StreamRequest(peer_identity, authority, peer_address, headers))
        if type(verdict) is Allow or type(verdict) is Deny:
            return verdict
        raise TypeError(
            f"decision {self.decide!r} returned {type(verdict).__name__}; expected Allow or Deny"
        )
