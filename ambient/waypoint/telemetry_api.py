"""Istio's Telemetry API at a waypoint: which requests are access-logged, and which metrics (and
labels) its metrics endpoint reports.

Which Telemetry resources apply, least specific first (a more specific one overrides): one in
the root namespace (``istio-system``) without selector or targetRefs (mesh-wide); one in the
waypoint's namespace without them; one whose ``targetRefs`` name the waypoint's Gateway; for
access logging, one whose ``targetRefs`` name a Service it serves (that Service's requests).
A selector is for sidecars: ignored here, with a warning (ztunnel has no Telemetry either).

``accessLogging``: the waypoint's access log (``ambient waypoint --access-log``) is Istio's
``envoy`` provider, as are the mesh config's ``envoyFileAccessLog`` providers; an entry naming no
provider means it too. ``disabled: true`` turns it off, ``false`` on again; ``filter.expression``
is CEL on ``response.code`` (for example ``response.code >= 400``), evaluated once per status
code when the config is loaded — an expression on anything else is refused, saying so.

``metrics[].overrides``: ``match.metric`` (``ALL_METRICS``, ``REQUEST_COUNT``…) or
``match.customMetric`` (a family's name, e.g. ``istio_requests_total``); ``disabled: true``
drops the metric, ``tagOverrides: {label: {operation: REMOVE}}`` drops the label (series that
differed only by it are summed). UPSERT needs a per-request expression and is refused. A waypoint
reports as one proxy: every ``match.mode`` applies.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

from ..config import kubernetes as k8s
from ..config.meshconfig import MeshConfig

# The module, not its names: config imports this module while authz may still be loading.
from . import authz

# The Telemetry API's metric names → the families the waypoint reports (as written, before
# the exposition adds `_total` to counters).
METRICS = {
    "REQUEST_COUNT": ("istio_requests",),
    "REQUEST_DURATION": ("istio_request_duration_milliseconds",),
    "REQUEST_SIZE": ("istio_request_bytes",),
    "RESPONSE_SIZE": ("istio_response_bytes",),
    "TCP_OPENED_CONNECTIONS": ("istio_tcp_connections_opened",),
    "TCP_CLOSED_CONNECTIONS": ("istio_tcp_connections_closed",),
    "TCP_SENT_BYTES": ("istio_tcp_sent_bytes",),
    "TCP_RECEIVED_BYTES": ("istio_tcp_received_bytes",),
    "GRPC_REQUEST_MESSAGES": (),
    "GRPC_RESPONSE_MESSAGES": (),
}
ISTIO_FAMILIES = frozenset(f for names in METRICS.values() for f in names) | {
    "istio_tcp_connections_failed"
}
ACCESS_LOG_PROVIDER = "envoy"
STATUS_CODES = range(100, 600)


@dataclass(frozen=True)
class AccessLogRule:
    disabled: bool = False
    # Inclusive ranges of the response codes logged; None: every one.
    codes: tuple[tuple[int, int], ...] | None = None
    expression: str | None = None

    def json(self) -> dict[str, object]:
        return {
            "disabled": self.disabled,
            "codes": None if self.codes is None else [list(r) for r in self.codes],
        }


@dataclass(frozen=True)
class MetricOverride:
    families: frozenset[str]
    disabled: bool | None = None
    removed_labels: tuple[str, ...] = ()


@dataclass(frozen=True)
class TelemetryPolicy:
    namespace: str
    name: str
    targets: tuple[authz.Target, ...]
    selector: bool
    access_log: AccessLogRule | None = None
    metrics: tuple[MetricOverride, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@functools.lru_cache(maxsize=256)
def codes_logged(expression: str, where: str) -> tuple[tuple[int, int], ...]:
    """The response codes ``expression`` (CEL) is true for, as inclusive ranges."""
    import cel  # the CEL library is needed only when a filter is written

    try:
        program = cel.compile(expression)
    except (ValueError, RuntimeError) as e:
        raise authz.AuthzError(where, f"not a CEL expression: {e}") from e
    ranges: list[list[int]] = []
    for code in STATUS_CODES:
        try:
            result = program.execute({"response": {"code": code}})
        except (ValueError, RuntimeError, TypeError) as e:
            raise authz.AuthzError(
                where,
                "the filter may use response.code only: the waypoint evaluates it once per "
                f"status code when the config is loaded ({e})",
            ) from e
        if not isinstance(result, bool):
            raise authz.AuthzError(
                where, f"expected a true/false expression, got {type(result).__name__}"
            )
        if result:
            if ranges and ranges[-1][1] == code - 1:
                ranges[-1][1] = code
            else:
                ranges.append([code, code])
    return tuple((lo, hi) for lo, hi in ranges)


def _access_log(
    resource: k8s.Telemetry, log_providers: frozenset[str]
) -> tuple[AccessLogRule | None, list[str]]:
    rule: AccessLogRule | None = None
    warnings = []
    for i, entry in enumerate(resource.spec.accessLogging):
        where = f"spec.accessLogging[{i}]"
        names = [p.name for p in entry.providers]
        if names and not any(n in log_providers for n in names):
            warnings.append(
                f"{where}: providers {names} are not the waypoint's access log "
                f"({', '.join(sorted(log_providers))}): ignored"
            )
            continue
        expression = entry.filter.expression if entry.filter else None
        rule = AccessLogRule(
            disabled=bool(entry.disabled),
            codes=codes_logged(expression, f"{where}.filter.expression") if expression else None,
            expression=expression,
        )
    return rule, warnings


def _metrics(resource: k8s.Telemetry) -> tuple[MetricOverride, ...]:
    out = []
    for i, metrics in enumerate(resource.spec.metrics):
        for j, o in enumerate(metrics.overrides):
            where = f"spec.metrics[{i}].overrides[{j}]"
            match = o.match or k8s.MetricSelector(metric="ALL_METRICS")
            if match.customMetric:
                name = match.customMetric.removesuffix("_total")
                families = frozenset({name})
            elif match.metric in (None, "ALL_METRICS"):
                families = ISTIO_FAMILIES
            else:
                families = frozenset(METRICS[match.metric])
            for label, t in o.tagOverrides.items():
                if t.operation != "REMOVE":
                    raise authz.AuthzError(
                        f"{where}.tagOverrides.{label}.operation",
                        "only REMOVE is supported at the waypoint: UPSERT would evaluate an "
                        "expression per request",
                    )
            out.append(
                MetricOverride(
                    families=families,
                    disabled=o.disabled,
                    removed_labels=tuple(sorted(o.tagOverrides)),
                )
            )
    return tuple(out)


def log_providers(config: MeshConfig | None) -> frozenset[str]:
    """The provider names that mean the waypoint's access log."""
    names = {ACCESS_LOG_PROVIDER}
    if config is not None:
        names.update(p.name for p in config.extensionProviders if p.envoyFileAccessLog)
    return frozenset(names)


def compile_telemetry(
    resource: k8s.Telemetry, providers: frozenset[str]
) -> tuple[TelemetryPolicy, list[str]]:
    """A Telemetry resource as the waypoint applies it, and what it ignores of it;
    :class:`AuthzError` names a field it cannot take."""
    meta = resource.metadata
    access_log, warnings = _access_log(resource, providers)
    return (
        TelemetryPolicy(
            namespace=meta.namespace,
            name=meta.name,
            targets=authz.targets_of(resource),
            selector=resource.spec.selector is not None,
            access_log=access_log,
            metrics=_metrics(resource),
        ),
        warnings,
    )


def _level(policy: TelemetryPolicy, waypoint: str, service: str | None) -> int | None:
    """How specific ``policy`` is for this waypoint (and Service); None if it does not apply."""
    namespace = waypoint.partition("/")[0]
    if policy.selector:
        return None
    if not policy.targets:
        if policy.namespace == authz.ROOT_NAMESPACE:
            return 0
        return 1 if policy.namespace == namespace else None
    for t in policy.targets:
        if t.kind == "Gateway" and f"{t.namespace}/{t.name}" == waypoint:
            return 2
        if t.kind == "Service" and service is not None and f"{t.namespace}/{t.name}" == service:
            return 3
    return None


def _applying(
    policies: Sequence[TelemetryPolicy], waypoint: str, service: str | None
) -> list[TelemetryPolicy]:
    found = [(level, p) for p in policies if (level := _level(p, waypoint, service)) is not None]
    return [p for _, p in sorted(found, key=lambda x: (x[0], x[1].key))]


def access_log_for(
    policies: Sequence[TelemetryPolicy], waypoint: str, service: str | None
) -> AccessLogRule | None:
    """The access logging of requests for ``service`` (None: sent to a pod) at ``waypoint``:
    the most specific Telemetry that says anything about it; None: every request is logged."""
    rule = None
    for p in _applying(policies, waypoint, service):
        if p.access_log is not None:
            rule = p.access_log
    return rule


def metric_overrides(
    policies: Sequence[TelemetryPolicy], waypoint: str
) -> dict[str, tuple[bool, tuple[str, ...]]]:
    """Per family the waypoint reports: (disabled, labels removed), from the Telemetry that
    applies to the waypoint itself (a more specific one overrides a family's setting)."""
    out: dict[str, tuple[bool, tuple[str, ...]]] = {}
    for p in _applying(policies, waypoint, None):
        for o in p.metrics:
            for family in o.families:
                disabled, removed = out.get(family, (False, ()))
                if o.disabled is not None:
                    disabled = o.disabled
                if o.removed_labels:
                    removed = tuple(sorted({*removed, *o.removed_labels}))
                out[family] = (disabled, removed)
    return out
