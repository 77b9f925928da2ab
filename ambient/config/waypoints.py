"""Waypoints and who uses them, from the labels Istio users write.

- A waypoint is a Gateway of class ``istio-waypoint``; its pods are those labelled
  ``gateway.networking.k8s.io/gateway-name: <gateway>`` in its namespace. ``istio.io/waypoint-for``
  says which traffic it takes: ``service`` (default), ``workload``, ``all`` or ``none``.
- ``istio.io/use-waypoint: <gateway>`` on a Namespace, Service or Pod binds it; the object's own
  label beats its namespace's; ``none`` opts out; ``istio.io/use-waypoint-namespace`` names the
  Gateway's namespace when it is another one. A Service binds only to a waypoint taking service
  traffic, a Pod only to one taking workload traffic.
- In ztunnel's local config a workload's or service's ``waypoint.destination`` names the waypoint
  by address (``network/ip``) or Service (``namespace/hostname``) directly.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ..mesh import Service, Waypoint, Workload
from . import kubernetes as k8s

WAYPOINT_CLASS = "istio-waypoint"
WAYPOINT_FOR = "istio.io/waypoint-for"
USE_WAYPOINT = "istio.io/use-waypoint"
USE_WAYPOINT_NAMESPACE = "istio.io/use-waypoint-namespace"
GATEWAY_NAME_LABEL = "gateway.networking.k8s.io/gateway-name"
WAYPOINT_ONLY_ANNOTATION = "ambient.dev/waypoint-only"
TRAFFIC_TYPES = ("service", "workload", "all", "none")


@dataclass
class Bindings:
    waypoints: list[Waypoint] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    errors: list[tuple[k8s.Gateway, str, str]] = field(default_factory=list)  # (gw, field, msg)


def waypoints_from_gateways(
    gateways: Sequence[k8s.Gateway], workloads: Sequence[Workload]
) -> Bindings:
    out = Bindings()
    for gw in gateways:
        if gw.spec.gatewayClassName != WAYPOINT_CLASS:
            continue  # an ingress or other gateway: not the data plane's business
        meta = gw.metadata
        traffic = meta.labels.get(WAYPOINT_FOR, "service")
        if traffic not in TRAFFIC_TYPES:
            out.errors.append(
                (
                    gw,
                    f"metadata.labels[{WAYPOINT_FOR}]",
                    f"expected one of {', '.join(TRAFFIC_TYPES)}, got {traffic!r}",
                )
            )
            continue
        pods = tuple(
            w.uid
            for w in workloads
            if w.namespace == meta.namespace and w.labels.get(GATEWAY_NAME_LABEL) == meta.name
        )
        if not pods:
            out.warnings.append(
                f"waypoint {meta.namespace}/{meta.name} has no pods (labelled "
                f"{GATEWAY_NAME_LABEL}={meta.name}): traffic bound to it will be refused"
            )
        out.waypoints.append(Waypoint(meta.name, meta.namespace, traffic, pods))
    return out


def binding(
    labels: Mapping[str, str], namespace_labels: Mapping[str, str], namespace: str
) -> str | None:
    """The waypoint (``ns/name``) an object binds to by its labels, or its namespace's."""
    source = labels if USE_WAYPOINT in labels else namespace_labels
    name = source.get(USE_WAYPOINT)
    if not name or name == "none":
        return None
    return f"{source.get(USE_WAYPOINT_NAMESPACE, namespace)}/{name}"


def bind(
    key: str | None, kind: str, subject: str, waypoints: Mapping[str, Waypoint], out: Bindings
) -> str | None:
    """Check a binding: the waypoint must exist and take ``kind`` traffic."""
    if key is None:
        return None
    waypoint = waypoints.get(key)
    if waypoint is None:
        out.warnings.append(f"{subject} uses waypoint {key}, which is not declared: not bound")
        return None
    if not waypoint.serves(kind):
        out.warnings.append(
            f"{subject} uses waypoint {key}, which takes {waypoint.traffic} traffic, not "
            f"{kind} traffic: not bound"
        )
        return None
    return key


def local_waypoint(
    destination: str, workloads: Sequence[Workload], services: Sequence[Service]
) -> Waypoint | None:
    """A waypoint named by address or Service in ztunnel's local config."""
    _, _, rest = destination.partition("/")
    try:
        ip = ipaddress.ip_address(rest)
    except ValueError:
        namespace, _, hostname = destination.partition("/")
        service = next(
            (s for s in services if s.namespace == namespace and s.hostname == hostname), None
        )
        if service is None:
            return None
        uids = tuple(e.workload_uid for e in service.endpoints)
        return Waypoint(service.name, service.namespace, "all", uids)
    pod = next((w for w in workloads if ip in w.ips), None)
    if pod is not None:
        return Waypoint(pod.name, pod.namespace, "all", (pod.uid,))
    for service in services:
        if any(vip == ip for _, vip in service.vips):
            uids = tuple(e.workload_uid for e in service.endpoints)
            return Waypoint(service.name, service.namespace, "all", uids)
    return None
