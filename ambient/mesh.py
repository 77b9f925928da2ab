"""The mesh as the data plane sees it: one immutable snapshot of workloads and services.

The model is Istio's own (what istiod sends ztunnel as `istio.workload.Address`, and what ztunnel's
local config file holds): a *workload* is a pod — its IPs, identity, node, and whether it speaks
HBONE (in the mesh) or plain TCP; a *service* is a set of VIPs and ports whose endpoints are
workloads. Config loading builds a new snapshot and swaps it in whole; nothing reads a half-built
one.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from functools import cached_property
from types import MappingProxyType
from typing import TYPE_CHECKING

from .identity.spiffe import DEFAULT_TRUST_DOMAIN, SpiffeId
from .policy.model import Policy

if TYPE_CHECKING:
    from .waypoint.authn import RequestAuthn
    from .waypoint.authz import WaypointPolicy
    from .waypoint.extauthz import ExtAuthzProvider
    from .waypoint.plugins import WaypointPlugin
    from .waypoint.routes import HttpRoute
    from .waypoint.telemetry_api import TelemetryPolicy

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Protocol(Enum):
    """How a workload receives mesh traffic: HBONE (in the ambient mesh) or plain TCP."""

    HBONE = "HBONE"
    TCP = "TCP"


class HealthStatus(Enum):
    HEALTHY = "Healthy"
    UNHEALTHY = "Unhealthy"


@dataclass(frozen=True, slots=True)
class Workload:
    """A pod (or VM) and what the data plane needs to know about it."""

    uid: str
    name: str
    namespace: str
    ips: tuple[IPAddress, ...]
    service_account: str = "default"
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    protocol: Protocol = Protocol.TCP
    node: str = ""
    network: str = ""
    cluster_id: str = ""
    canonical_name: str = ""
    canonical_revision: str = ""
    workload_name: str = ""
    workload_type: str = "pod"
    status: HealthStatus = HealthStatus.HEALTHY
    capacity: int = 1
    labels: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    # Named container ports, so a Service's `targetPort: http` resolves per endpoint.
    named_ports: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    # Every TCP port its containers declare (named or not).
    container_ports: tuple[int, ...] = ()
    # Which policies select this workload ("ns/name"), as ztunnel's config lists them.
    authorization_policies: tuple[str, ...] = ()
    # Loopback mode only (an ambient extension, annotation `ambient.dev/app-address`): where the
    # pod's application listens, so ztunnel can own the pod IP's ports as a capture would.
    app_address: IPAddress | None = None
    # The waypoint its traffic goes through when addressed to the pod ("ns/name"), if any.
    waypoint: str | None = None
    # An ambient extension (annotation `ambient.dev/waypoint-only`): refuse inbound traffic that
    # did not come through one of its waypoints.
    waypoint_only: bool = False

    @property
    def identity(self) -> SpiffeId:
        return SpiffeId(self.trust_domain, self.namespace, self.service_account)

    @property
    def in_mesh(self) -> bool:
        return self.protocol is Protocol.HBONE

    @property
    def key(self) -> str:
        """``namespace/name``: how people refer to a pod."""
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One workload behind a service, with the service-port → target-port mapping for it."""

    workload_uid: str
    ports: Mapping[int, int]


@dataclass(frozen=True, slots=True)
class Service:
    name: str
    namespace: str
    hostname: str
    vips: tuple[tuple[str, IPAddress], ...]  # (network, ip)
    ports: Mapping[int, int]  # service port -> target port (0: resolved per endpoint)
    endpoints: tuple[Endpoint, ...] = ()
    subject_alt_names: tuple[str, ...] = ()
    waypoint: str | None = None  # the waypoint its traffic goes through ("ns/name"), if any
    # Each port's application protocol as Kubernetes declares it: `appProtocol`, else the port
    # name's prefix (`http-web` → "http"); absent when neither says (a waypoint detects it).
    app_protocols: Mapping[int, str] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def key(self) -> str:
        """``namespace/hostname``: how ztunnel's config refers to a service."""
        return f"{self.namespace}/{self.hostname}"


@dataclass(frozen=True, slots=True)
class Waypoint:
    """An L7 proxy for Services and/or pods: a Gateway of class istio-waypoint and its pods."""

    name: str
    namespace: str
    traffic: str  # istio.io/waypoint-for: "service" | "workload" | "all" | "none"
    workload_uids: tuple[str, ...]  # the waypoint's own pods, which serve HBONE on 15008

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def serves(self, kind: str) -> bool:
        """Whether it takes ``kind`` ("service" or "workload") traffic."""
        return self.traffic in (kind, "all")


@dataclass(frozen=True)
class Mesh:
    """One consistent view of the mesh, indexed for the per-connection lookups."""

    workloads: tuple[Workload, ...] = ()
    services: tuple[Service, ...] = ()
    policies: tuple[Policy, ...] = ()
    waypoints: tuple[Waypoint, ...] = ()
    # Gateway API HTTPRoutes, compiled for a waypoint's routing (ambient.waypoint.routes).
    http_routes: tuple[HttpRoute, ...] = ()
    # AuthorizationPolicies with targetRefs, enforced by waypoints (ambient.waypoint.authz).
    waypoint_policies: tuple[WaypointPolicy, ...] = ()
    # RequestAuthentications with targetRefs: JWT at waypoints (ambient.waypoint.authn).
    request_authentications: tuple[RequestAuthn, ...] = ()
    # WasmPlugins with targetRefs: Python filters at waypoints (ambient.waypoint.plugins).
    plugins: tuple[WaypointPlugin, ...] = ()
    # The mesh config's HTTP external authorizers, for CUSTOM policies (ambient.waypoint.extauthz).
    ext_authz: tuple[ExtAuthzProvider, ...] = ()
    # Telemetry resources: access logging and metrics at waypoints (ambient.waypoint.telemetry_api).
    telemetry: tuple[TelemetryPolicy, ...] = ()
    namespaces: Mapping[str, Mapping[str, str]] = field(
        default_factory=lambda: MappingProxyType({})
    )
    sources: tuple[str, ...] = ()  # the files it was built from
    warnings: tuple[str, ...] = ()

    # Indexes, built on first use; cached_property writes the instance dict directly, so it
    # works on a frozen dataclass and the snapshot stays immutable to its users.
    @cached_property
    def _by_ip(self) -> Mapping[IPAddress, Workload]:
        return MappingProxyType({ip: w for w in self.workloads for ip in w.ips})

    @cached_property
    def _by_uid(self) -> Mapping[str, Workload]:
        return MappingProxyType({w.uid: w for w in self.workloads})

    @cached_property
    def _by_vip(self) -> Mapping[IPAddress, Service]:
        return MappingProxyType({vip: s for s in self.services for _, vip in s.vips})

    @cached_property
    def _by_hostname(self) -> Mapping[str, Service]:
        return MappingProxyType({s.hostname: s for s in self.services})

    @cached_property
    def _backed_by(self) -> Mapping[str, tuple[tuple[Service, Endpoint], ...]]:
        backed: dict[str, list[tuple[Service, Endpoint]]] = {}
        for s in self.services:
            for e in s.endpoints:
                backed.setdefault(e.workload_uid, []).append((s, e))
        return MappingProxyType({uid: tuple(pairs) for uid, pairs in backed.items()})

    @cached_property
    def _waypoints(self) -> Mapping[str, Waypoint]:
        return MappingProxyType({w.key: w for w in self.waypoints})

    def waypoint(self, key: str | None) -> Waypoint | None:
        return self._waypoints.get(key) if key else None

    def workload_by_ip(self, ip: IPAddress) -> Workload | None:
        return self._by_ip.get(ip)

    def workload_by_uid(self, uid: str) -> Workload | None:
        return self._by_uid.get(uid)

    def service_by_vip(self, ip: IPAddress) -> Service | None:
        return self._by_vip.get(ip)

    def service_by_hostname(self, hostname: str) -> Service | None:
        return self._by_hostname.get(hostname)

    def services_backed_by(self, workload: Workload) -> tuple[tuple[Service, Endpoint], ...]:
        """The Services ``workload`` is an endpoint of, each with its endpoint (an index: the
        destination side asks on every inbound connection)."""
        return self._backed_by.get(workload.uid, ())

    def workloads_on(self, node: str) -> Iterable[Workload]:
        return (w for w in self.workloads if w.node == node)

    def endpoints_of(self, service: Service) -> Iterable[tuple[Workload, Endpoint]]:
        for endpoint in service.endpoints:
            workload = self.workload_by_uid(endpoint.workload_uid)
            if workload is not None:
                yield workload, endpoint
