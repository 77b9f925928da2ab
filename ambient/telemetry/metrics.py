"""Istio's L4 metrics, with Istio's names and labels, counted by the compiled core.

Each decision attaches the :class:`~ambient._core.Counters` of its label set to the plan it gives
the core; the core counts connections and bytes into it with atomics as they happen. At scrape
time the core reads every label set's counters and writes the text with the encoder Istio's
ztunnel uses (``prometheus-client``, OpenMetrics text; ``_core.encode_metrics``) — so dashboards
and alerts written for Istio's ztunnel work unchanged:

- ``istio_tcp_connections_opened_total``, ``istio_tcp_connections_closed_total``,
  ``istio_tcp_connections_failed_total``;
- ``istio_tcp_received_bytes_total`` (client to server) and ``istio_tcp_sent_bytes_total`` (server
  to client);
- ``istio_build``; the core's own statistics (``ambient_core_*``); and the process metrics
  (``process_cpu_seconds_total``, ``process_resident_memory_bytes``, ``process_open_fds``...).

The ``response_flags`` label is not part of a label set Python makes: the core learns how a
connection ended and counts it there (``-``, ``DENY``, ``CONNECT``, ``TLS_FAILURE``,
``H2_HANDSHAKE_FAILURE``), as Istio's ztunnel does: a connection is opened with ``-`` and closed
(and failed) with the flag of its end. Label sets of workloads that left the mesh are dropped
once none of their connections is open (:meth:`ConnectionMetrics.forget`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import __version__, _core
from .._core import Counters

if TYPE_CHECKING:
    from ..mesh import Service, Workload

UNKNOWN = "unknown"

LABELS = (
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "source_canonical_service",
    "source_canonical_revision",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_service_namespace",
    "destination_service_name",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_cluster",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
)


def _side(w: Workload | None, principal: str | None) -> tuple[str, ...]:
    if w is None:
        return (UNKNOWN, UNKNOWN, principal or UNKNOWN, UNKNOWN, UNKNOWN, UNKNOWN, UNKNOWN, UNKNOWN)
    return (
        w.workload_name or w.name,
        w.namespace,
        principal or UNKNOWN,
        w.labels.get("app", w.canonical_name or UNKNOWN),
        w.labels.get("version", w.canonical_revision or UNKNOWN),
        w.cluster_id or "Kubernetes",
        w.canonical_name or w.name,
        w.canonical_revision or "latest",
    )


# Where the core's response flag goes among the label values.
FLAG_INDEX = LABELS.index("response_flags")
NO_FLAG = "-"


@dataclass(frozen=True, slots=True)
class Labels:
    """One label set of the TCP metrics: the values in :data:`LABELS` order, without
    ``response_flags`` (the core adds it)."""

    values: tuple[str, ...]

    def with_flag(self, flag: str) -> list[str]:
        return [*self.values[:FLAG_INDEX], flag, *self.values[FLAG_INDEX:]]

    @property
    def workloads(self) -> tuple[tuple[str, str], tuple[str, str]]:
        """(workload, namespace) of the source and of the destination ("unknown" when not known)."""
        return (self.values[1], self.values[2]), (self.values[9], self.values[10])

    @classmethod
    def of(
        cls,
        *,
        reporter: str,
        source: Workload | None,
        source_principal: str | None,
        destination: Workload | None,
        destination_principal: str | None,
        service: Service | None,
        mutual_tls: bool,
    ) -> Labels:
        src = _side(source, source_principal)
        dst = _side(destination, destination_principal)
        svc = (
            (service.hostname, service.namespace, service.name)
            if service is not None
            else (UNKNOWN, UNKNOWN, UNKNOWN)
        )
        return cls(
            (
                reporter,
                *src,
                dst[0],
                dst[1],
                dst[2],
                dst[3],
                dst[4],
                *svc,
                dst[6],
                dst[7],
                dst[5],
                "tcp",
                "mutual_tls" if mutual_tls else UNKNOWN,
            )
        )


class ConnectionMetrics:
    """Counters per label set, created on first use and read at every scrape."""

    def __init__(self, component: str = "ztunnel") -> None:
        self._counters: dict[Labels, Counters] = {}
        self._lock = threading.Lock()
        self.component = component

    def counters(self, labels: Labels) -> Counters:
        found = self._counters.get(labels)
        if found is None:
            with self._lock:
                found = self._counters.setdefault(labels, Counters())
        return found

    def forget(self, still_here: Callable[[Labels], bool]) -> int:
        """Drop the label sets ``still_here`` rejects (their workloads left the mesh) once no
        connection counted in them is open; returns how many went."""
        with self._lock:
            gone = [
                labels
                for labels, counters in self._counters.items()
                if counters.idle and not still_here(labels)
            ]
            for labels in gone:
                del self._counters[labels]
        return len(gone)

    def __len__(self) -> int:
        return len(self._counters)

    def series(self) -> list[tuple[tuple[str, ...], Counters]]:
        """Every label set's values (without ``response_flags``) and its counters."""
        with self._lock:
            return [(labels.values, counters) for labels, counters in self._counters.items()]


# Core statistics that are levels, not running totals.
CORE_GAUGES = frozenset(
    {"active_tunnels", "pool_connections", "pool_connections_goaway", "live_connections"}
)

# (name, help, is a counter, [(labels, value)]): a family as the core's encoder takes it.
Family = tuple[str, str, bool, list[tuple[list[tuple[str, str]], float]]]


class Exposition:
    """What the metrics endpoint serves: the connection metrics, ``istio_build``, the core's own
    statistics (when given: ``DataPlane.stats()`` as ``ambient_core_*``: handshake failures,
    refusals at a cap, decisions refused for a full queue, connections cut by a drain,
    suppressed log lines... everything Istio's labels have no place for) and the process
    metrics, as text."""

    def __init__(
        self, metrics: ConnectionMetrics, core_stats: Callable[[], dict[str, int]] | None = None
    ) -> None:
        self.metrics = metrics
        self.core_stats = core_stats

    def families(self) -> list[Family]:
        out: list[Family] = [
            (
                "istio_build",
                "Build of the data plane",
                False,
                [([("component", self.metrics.component), ("tag", __version__)], 1.0)],
            )
        ]
        for name, value in sorted((self.core_stats() if self.core_stats else {}).items()):
            counter = name not in CORE_GAUGES
            out.append((f"ambient_core_{name}", f"core: {name}", counter, [([], float(value))]))
        return out

    def histograms(self) -> list[tuple[str, str, list[Any]]]:
        """Histogram families (a waypoint's request metrics); a ztunnel has none."""
        return []

    def text(self) -> str:
        return _core.encode_metrics(
            list(LABELS), FLAG_INDEX, self.metrics.series(), self.families(), self.histograms()
        )
