"""What ztunnel knows about one connection, and the access log line written when it ends.

A decision attaches a :class:`ConnectionInfo` to the plan it gives the core (its ``tag``), and the
line every such connection will have (a ``LogTemplate``: the fields below, rendered once, with
holes for the connection's source and destination). When the connection ends the core fills the
holes, adds the bytes, duration and error, and writes the line itself — no Python per
connection. Where the log is not a file (a ``StringIO`` in a test) the core hands the tag back
instead and :class:`AccessLog` writes :func:`access_log_entry`, the reference for those lines.
The fields are Istio ztunnel's.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass
from typing import IO, Any

import orjson

from .._core import AccessLog as CoreAccessLog
from .._core import LogTemplate
from ..mesh import Service, Workload


@dataclass(frozen=True, slots=True)
class ConnectionInfo:
    direction: str  # "inbound" | "outbound"
    transport: str  # "HBONE" | "TCP" | "DENY"
    source_workload: Workload | None = None
    source_identity: str | None = None
    destination_workload: Workload | None = None
    destination_service: Service | None = None
    destination_identity: str | None = None
    hbone_address: str | None = None
    # The CONNECT target when it differs from what the client dialed (a Service VIP's endpoint).
    hbone_target: str | None = None
    reason: str = ""
    policy: str | None = None  # the authorization policy that decided, ``namespace/name``
    waypoint: str | None = None  # the waypoint the connection was sent through


# Holes in a line's fields, filled per connection: what the client's address and what it dialed.
SOURCE: int = LogTemplate.SOURCE
DESTINATION: int = LogTemplate.DESTINATION
Fields = list[tuple[str, str | int]]


def _workload_fields(prefix: str, w: Workload | None) -> Fields:
    if w is None:
        return []
    return [(f"{prefix}.workload", w.name), (f"{prefix}.namespace", w.namespace)]


def entry_fields(info: ConnectionInfo) -> Fields:
    """The fields of a decided connection's line, in order, before its counts: fixed values, and
    the holes ``SOURCE``/``DESTINATION``. They mean what Istio's ztunnel means by them:
    ``dst.addr`` is where the connection went at L4 (a pod's or waypoint's ``:15008`` for HBONE,
    in both directions) and ``dst.hbone_addr`` the CONNECT target."""
    hbone = info.hbone_address
    service = info.destination_service
    fields: list[tuple[str, str | int | None]] = [
        ("direction", info.direction),
        ("transport", info.transport),
        ("src.addr", SOURCE),
        *_workload_fields("src", info.source_workload),
        ("src.identity", info.source_identity),
        ("dst.addr", hbone or DESTINATION),
        ("dst.hbone_addr", (info.hbone_target or DESTINATION) if hbone else None),
        ("dst.service", service.hostname if service else None),
        *_workload_fields("dst", info.destination_workload),
        ("dst.identity", info.destination_identity),
        ("dst.waypoint", info.waypoint),
        ("policy", info.policy),
    ]
    return [(k, v) for k, v in fields if v is not None]


def early_fields(direction: str, transport: str, pod: Workload | None) -> Fields:
    """The fields of the line of a connection refused before any decision (a failed TLS or
    HTTP/2 handshake, a malformed request, a full decision queue, a decision that raised, a
    listener's cap): who tried, which pod's listener — as Istio's ztunnel logs its early
    denials."""
    side = "dst" if direction == "inbound" else "src"
    return [
        ("direction", direction),
        ("transport", transport),
        ("src.addr", SOURCE),
        ("dst.addr", DESTINATION),
        *_workload_fields(side, pod),
    ]


def _filled(fields: Fields, source: str, destination: str) -> dict[str, Any]:
    values = {SOURCE: source, DESTINATION: destination}
    entry: dict[str, Any] = {}
    for key, value in fields:
        if isinstance(value, int):
            if not values[value]:
                continue  # an empty destination (an early refusal) is left out
            value = values[value]
        entry[key] = value
    return entry


def access_log_entry(
    info: ConnectionInfo,
    source: str,
    destination: str,
    sent: int,
    received: int,
    seconds: float,
    error: str | None,
) -> dict[str, Any]:
    """One access-log line (the reference for the lines the core writes from a
    :class:`LogTemplate`): ``bytes_sent`` is what went towards the destination on outbound, and
    back to the peer on inbound (Istio "unflips" its destination-side counters for the log)."""
    if info.direction == "inbound":
        sent, received = received, sent
    entry = _filled(entry_fields(info), source, destination)
    entry.update(bytes_sent=sent, bytes_recv=received, duration_ms=round(seconds * 1000, 3))
    if error is not None:
        entry["error"] = error
    return entry


def early_access_log_entry(
    direction: str,
    transport: str,
    pod: Workload | None,
    source: str,
    destination: str,
    seconds: float,
    error: str | None,
) -> dict[str, Any]:
    """The line of a connection refused before any decision (see :func:`early_fields`)."""
    entry = _filled(early_fields(direction, transport, pod), source, destination)
    entry["duration_ms"] = round(seconds * 1000, 3)
    if error is not None:
        entry["error"] = error
    return entry


def line_template(log: CoreAccessLog, info: ConnectionInfo) -> LogTemplate:
    """The line of every connection ``info`` describes, for the core to write."""
    return LogTemplate(log, entry_fields(info), flip=info.direction == "inbound")


def early_line_template(
    log: CoreAccessLog, direction: str, transport: str, pod: Workload | None
) -> LogTemplate:
    return LogTemplate(log, early_fields(direction, transport, pod), bytes=False)


class AccessLog:
    """One line per finished connection, to a stream; JSON (orjson) or ``key=value`` text."""

    def __init__(self, stream: IO[str] | None = None, *, text: bool = False) -> None:
        self._stream = stream if stream is not None else sys.stdout
        self._text = text
        self._lock = threading.Lock()
        self._core: CoreAccessLog | None = None

    def core(self) -> CoreAccessLog | None:
        """The same log written by the core (lines formatted and written without Python), when
        the stream is a file descriptor; None otherwise (a ``StringIO``...)."""
        if self._core is None:
            try:
                fd = self._stream.fileno()
            except (AttributeError, OSError, ValueError):
                return None
            self._stream.flush()
            self._core = CoreAccessLog(fd, text=self._text)
        return self._core

    def close(self, timeout: float = 5.0) -> None:
        """Write every line the core still holds."""
        if self._core is not None:
            self._core.close(timeout)

    def __call__(self, entry: dict[str, Any]) -> None:
        if self._text:
            line = " ".join(f"{k}={v}" for k, v in entry.items())
        else:
            line = orjson.dumps(entry).decode()
        with self._lock:
            self._stream.write(line + "\n")
            self._stream.flush()
