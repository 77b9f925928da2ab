"""What ztunnel knows about one connection, and the access log line written when it ends.

A decision attaches a :class:`ConnectionInfo` to the plan it gives the core (its ``tag``); the core
hands it back with the bytes, duration and error when the connection ends, and the access log
writes one structured line (JSON by default) — the fields of Istio ztunnel's access log.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass
from typing import IO, Any

import orjson

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


def _workload_fields(prefix: str, w: Workload | None) -> dict[str, Any]:
    if w is None:
        return {}
    return {f"{prefix}.workload": w.name, f"{prefix}.namespace": w.namespace}


def access_log_entry(
    info: ConnectionInfo,
    source: str,
    destination: str,
    sent: int,
    received: int,
    seconds: float,
    error: str | None,
) -> dict[str, Any]:
    """One access-log line, with the meaning Istio's ztunnel gives its fields: ``dst.addr`` is
    where the connection went at L4 (a pod's or waypoint's ``:15008`` for HBONE, in both
    directions) and ``dst.hbone_addr`` the CONNECT target; ``bytes_sent`` is what went towards
    the destination on outbound, and back to the peer on inbound (Istio "unflips" its
    destination-side counters for the log)."""
    l4_destination, hbone_target = (
        (info.hbone_address, info.hbone_target or destination)
        if info.hbone_address
        else (destination, None)
    )
    if info.direction == "inbound":
        sent, received = received, sent
    entry: dict[str, Any] = {
        "direction": info.direction,
        "transport": info.transport,
        "src.addr": source,
        **_workload_fields("src", info.source_workload),
        "src.identity": info.source_identity,
        "dst.addr": l4_destination,
        "dst.hbone_addr": hbone_target,
        "dst.service": info.destination_service.hostname if info.destination_service else None,
        **_workload_fields("dst", info.destination_workload),
        "dst.identity": info.destination_identity,
        "dst.waypoint": info.waypoint,
        "policy": info.policy,
        "bytes_sent": sent,
        "bytes_recv": received,
        "duration_ms": round(seconds * 1000, 3),
        "error": error,
    }
    return {k: v for k, v in entry.items() if v is not None}


def early_access_log_entry(
    direction: str,
    transport: str,
    pod: Workload | None,
    source: str,
    destination: str,
    seconds: float,
    error: str | None,
) -> dict[str, Any]:
    """The line of a connection refused before any decision (a failed TLS or HTTP/2 handshake,
    a malformed request, a full decision queue, a decision that raised, a listener's cap): who
    tried, which pod's listener, and why — as Istio's ztunnel logs its early denials."""
    side = "dst" if direction == "inbound" else "src"
    entry: dict[str, Any] = {
        "direction": direction,
        "transport": transport,
        "src.addr": source,
        "dst.addr": destination or None,
        **_workload_fields(side, pod),
        "duration_ms": round(seconds * 1000, 3),
        "error": error,
    }
    return {k: v for k, v in entry.items() if v is not None}


class AccessLog:
    """One line per finished connection, to a stream; JSON (orjson) or ``key=value`` text."""

    def __init__(self, stream: IO[str] | None = None, *, text: bool = False) -> None:
        self._stream = stream if stream is not None else sys.stdout
        self._text = text
        self._lock = threading.Lock()

    def __call__(self, entry: dict[str, Any]) -> None:
        if self._text:
            line = " ".join(f"{k}={v}" for k, v in entry.items())
        else:
            line = orjson.dumps(entry).decode()
        with self._lock:
            self._stream.write(line + "\n")
            self._stream.flush()
