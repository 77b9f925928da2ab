"""Istio's request metrics at a waypoint, with ``reporter="waypoint"``: ``istio_requests_total``,
``istio_request_duration_milliseconds``, ``istio_request_bytes`` and ``istio_response_bytes``;
and, for the streams of its TCP ports, ztunnel's TCP metrics (``istio_tcp_*``).

The core counts each request into a series keyed by what its labels are made of (the client's
principal and address, the Service, the pod that answered, the code, gRPC or not, the response
flags; ``WaypointTable.request_series``); at scrape time this module turns each key into Istio's
labels from the current snapshot — the same label values ztunnel's TCP metrics use for the same
workloads — and the core writes the text.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .._core import WaypointTable
from ..mesh import Mesh, Workload
from ..telemetry.metrics import LABELS, ConnectionMetrics, Exposition, Labels

if TYPE_CHECKING:
    from ..telemetry.metrics import Family

HistogramSample = tuple[list[tuple[str, str]], float, int, list[tuple[float, int]]]
HistogramFamily = tuple[str, str, list[HistogramSample]]

_TCP_LABELS = tuple(name for name in LABELS if name != "response_flags")
# ztunnel's TCP families (written by the core for ztunnel; the waypoint's join them by name).
TCP_FAMILIES = {
    "istio_tcp_connections_opened": "TCP connections opened",
    "istio_tcp_connections_closed": "TCP connections closed",
    "istio_tcp_connections_failed": "TCP connections that could not be made",
    "istio_tcp_received_bytes": "Bytes received from the client side",
    "istio_tcp_sent_bytes": "Bytes sent to the client side",
}


def with_flag(values: tuple[str, ...], flag: str) -> list[str]:
    return list(Labels(values).with_flag(flag))


def _tcp_labels(
    mesh: Mesh,
    source_principal: str,
    source_ip: str | None,
    service_key: str,
    endpoint: str,
    endpoint_principal: str,
) -> Labels:
    """ztunnel's TCP label set for a client, a Service and the pod that answered, as the
    waypoint reports them."""
    source: Workload | None = None
    if source_ip:
        source = mesh.workload_by_ip(ipaddress.ip_address(source_ip))
    namespace, _, name = endpoint.partition("/")
    destination = next(
        (w for w in mesh.workloads if w.namespace == namespace and w.name == name), None
    )
    s_namespace, _, s_name = service_key.partition("/")
    service = next(
        (s for s in mesh.services if s.namespace == s_namespace and s.name == s_name), None
    )
    return Labels.of(
        reporter="waypoint",
        source=source,
        source_principal=source_principal or None,
        destination=destination,
        destination_principal=endpoint_principal or None,
        service=service,
        mutual_tls=True,
    )


def request_labels(mesh: Mesh, key: tuple[Any, ...]) -> list[tuple[str, str]]:
    """Istio's labels of one request series (see ``WaypointTable.request_series``)."""
    *who, code, grpc, flags = key
    tcp = _tcp_labels(mesh, *who)
    labels = dict(zip(_TCP_LABELS, tcp.values, strict=True))
    labels["request_protocol"] = "grpc" if grpc else "http"
    labels["response_code"] = str(code)
    labels["grpc_response_status"] = ""
    labels["response_flags"] = flags
    return list(labels.items())


Histogram = tuple[float, int, list[tuple[float, int]]]


def _merged(a: Histogram, b: Histogram) -> Histogram:
    return (
        a[0] + b[0],
        a[1] + b[1],
        [(le, x + y) for (le, x), (_, y) in zip(a[2], b[2], strict=True)],
    )


class RequestExposition(Exposition):
    """The waypoint's metrics endpoint: the core's statistics and the process metrics (as a
    ztunnel's) and the request metrics of ``table``, labelled from ``mesh()``. Series whose
    labels come out equal (two pods of one Deployment, two addresses of one client) are one."""

    def __init__(
        self,
        table: WaypointTable,
        mesh: Any,
        core_stats: Any = None,
        overrides: Callable[[], Overrides] | None = None,
    ) -> None:
        super().__init__(ConnectionMetrics(component="waypoint"), core_stats)
        self.table = table
        self.mesh = mesh
        # Telemetry's metrics overrides (ambient.waypoint.telemetry_api.metric_overrides).
        self.overrides = overrides or dict

    def _series(self) -> dict[tuple[tuple[str, str], ...], tuple[Histogram, Histogram, Histogram]]:
        mesh: Mesh = self.mesh()
        out: dict[tuple[tuple[str, str], ...], tuple[Histogram, Histogram, Histogram]] = {}
        for key, *histograms in self.table.request_series():
            labels = tuple(request_labels(mesh, key))
            known = out.get(labels)
            values = (histograms[0], histograms[1], histograms[2])
            if known is not None:
                values = (
                    _merged(known[0], values[0]),
                    _merged(known[1], values[1]),
                    _merged(known[2], values[2]),
                )
            out[labels] = values
        return out

    def _tcp_families(self) -> list[Family]:
        """ztunnel's TCP families for the streams of the waypoint's TCP ports, each label set's
        counters summed (two pods of one Deployment have the same labels)."""
        mesh: Mesh = self.mesh()
        sums: dict[str, dict[tuple[tuple[str, str], ...], float]] = {
            name: {} for name in TCP_FAMILIES
        }

        def add(family: str, values: tuple[str, ...], flag: str, n: float) -> None:
            labels = tuple(zip(LABELS, with_flag(values, flag), strict=True))
            sums[family][labels] = sums[family].get(labels, 0.0) + n

        for key, counters in self.table.stream_series():
            values = _tcp_labels(mesh, *key).values
            snap = counters.snapshot()
            add("istio_tcp_connections_opened", values, "-", snap["opened"])
            for flag, n in snap["closed"].items():
                add("istio_tcp_connections_closed", values, flag, n)
            for flag, n in snap["failed"].items():
                add("istio_tcp_connections_failed", values, flag, n)
            add("istio_tcp_received_bytes", values, "-", snap["sent"])  # client to server
            add("istio_tcp_sent_bytes", values, "-", snap["received"])
        return [
            (name, TCP_FAMILIES[name], True, [(list(k), v) for k, v in samples.items()])
            for name, samples in sums.items()
        ]

    def families(self) -> list[Family]:
        out = super().families()
        totals = [(list(labels), float(h[0][1])) for labels, h in self._series().items()]
        ours = [("istio_requests", "Requests through the waypoint", True, totals)]
        overrides = self.overrides()
        for name, text, counter, samples in ours + self._tcp_families():
            disabled, removed = overrides.get(name, (False, ()))
            if not disabled:
                out.append((name, text, counter, _without_labels(samples, removed)))
        return out

    def histograms(self) -> list[HistogramFamily]:
        names = (
            ("istio_request_duration_milliseconds", "Request duration, milliseconds"),
            ("istio_request_bytes", "Request body size, bytes"),
            ("istio_response_bytes", "Response body size, bytes"),
        )
        series = self._series()
        overrides = self.overrides()
        out = []
        for i, (name, text) in enumerate(names):
            disabled, removed = overrides.get(name, (False, ()))
            if disabled:
                continue
            merged: dict[tuple[tuple[str, str], ...], Histogram] = {}
            for labels, h in series.items():
                kept = tuple(kv for kv in labels if kv[0] not in removed)
                merged[kept] = _merged(merged[kept], h[i]) if kept in merged else h[i]
            out.append((name, text, [(list(labels), *h) for labels, h in merged.items()]))
        return out


Overrides = dict[str, tuple[bool, tuple[str, ...]]]


def _without_labels(samples: list[Any], removed: tuple[str, ...]) -> list[Any]:
    """``samples`` without the ``removed`` labels, those that became equal summed."""
    if not removed:
        return samples
    sums: dict[tuple[tuple[str, str], ...], float] = {}
    for labels, value in samples:
        kept = tuple((k, v) for k, v in labels if k not in removed)
        sums[kept] = sums.get(kept, 0.0) + value
    return [(list(k), v) for k, v in sums.items()]
