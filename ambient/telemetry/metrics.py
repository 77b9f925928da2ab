"""Istio's L4 metrics, with Istio's names and labels, counted by the compiled core.

Each decision attaches the :class:`~ambient._core.Counters` of its label set to the plan it gives
the core; the core counts connections and bytes into it with atomics as they happen. At scrape
time a ``prometheus_client`` collector reads every label set — so dashboards and alerts written
for Istio's ztunnel work unchanged:

- ``istio_tcp_connections_opened_total``, ``istio_tcp_connections_closed_total``,
  ``istio_tcp_connections_failed_total``;
- ``istio_tcp_received_bytes_total`` (client to server) and ``istio_tcp_sent_bytes_total`` (server
  to client);
- ``istio_build``; and the process metrics of ``prometheus_client``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .. import __version__
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


@dataclass(frozen=True, slots=True)
class Labels:
    """One label set of the TCP metrics (the values, in :data:`LABELS` order)."""

    values: tuple[str, ...]

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
        response_flags: str = "-",
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
                response_flags,
                "mutual_tls" if mutual_tls else UNKNOWN,
            )
        )


class ConnectionMetrics(Collector):
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

    def collect(self) -> Iterator[Metric]:
        families = {
            "opened": CounterMetricFamily(
                "istio_tcp_connections_opened", "TCP connections opened", labels=LABELS
            ),
            "closed": CounterMetricFamily(
                "istio_tcp_connections_closed", "TCP connections closed", labels=LABELS
            ),
            "failed": CounterMetricFamily(
                "istio_tcp_connections_failed",
                "TCP connections that could not be made",
                labels=LABELS,
            ),
            "received": CounterMetricFamily(
                "istio_tcp_received_bytes", "Bytes received from the client side", labels=LABELS
            ),
            "sent": CounterMetricFamily(
                "istio_tcp_sent_bytes", "Bytes sent to the client side", labels=LABELS
            ),
        }
        with self._lock:
            items = list(self._counters.items())
        for labels, counters in items:
            opened, closed, failed, to_server, to_client = counters.snapshot()
            values = list(labels.values)
            families["opened"].add_metric(values, opened)
            families["closed"].add_metric(values, closed)
            families["failed"].add_metric(values, failed)
            # Istio's names take the server's view: it *receives* what the client sends.
            families["received"].add_metric(values, to_server)
            families["sent"].add_metric(values, to_client)
        yield from families.values()
        build = GaugeMetricFamily(
            "istio_build", "Build of the data plane", labels=["component", "tag"]
        )
        build.add_metric([self.component, __version__], 1)
        yield build


def registry(metrics: ConnectionMetrics) -> CollectorRegistry:
    """A registry with the connection metrics and the process and platform metrics."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(metrics)
    ProcessCollector(registry=reg)
    PlatformCollector(registry=reg)
    return reg
