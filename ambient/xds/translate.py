"""The mesh as xDS resources and back: what ``ambient control-plane`` would push to a ztunnel
(Istio's or ambient's) and what a ztunnel makes of what istiod pushes.

Resources are named as istiod names them: a workload by its ``uid``, a service by
``namespace/hostname``, an authorization by ``namespace/name``. A workload lists the services
it backs (``services``: ``namespace/hostname`` → its service-port → target-port pairs) and the
selector policies that select it (``authorization_policies``): istiod resolves selectors, so a
``WORKLOAD_SELECTOR`` authorization carries none. A waypoint is referred to as Istio does, by
the hostname of its Service (``name.namespace.svc.cluster.local``) and port 15008.

What xDS does not carry stays behind: pod labels and container ports (istiod has already used
them), ambient's loopback-mode ``app_address`` and ``waypoint_only``, and AUDIT policies (which
ztunnel never gets). :func:`mesh_from_resources` builds a mesh without them.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

from ..config.translate import CLUSTER_DOMAIN
from ..mesh import Endpoint, HealthStatus, Mesh, Protocol, Service, Waypoint, Workload
from ..policy.engine import applies_to
from ..policy.model import (
    Action,
    Match,
    MatchKind,
    Policy,
    Scope,
    ServiceAccountMatch,
    StringMatch,
)
from . import messages as m

WAYPOINT_HBONE_PORT = 15008

_WORKLOAD_TYPES = {"deployment": 0, "cronjob": 1, "pod": 2, "job": 3}
_APP_PROTOCOLS = {"http": 1, "http1": 1, "http2": 2, "h2c": 2, "grpc": 3, "tcp": 4, "tls": 5}
_SCOPES = {Scope.GLOBAL: 0, Scope.NAMESPACE: 1, Scope.WORKLOAD_SELECTOR: 2}
_ACTIONS = {Action.ALLOW: 0, Action.DENY: 1}


def _waypoint_address(key: str | None) -> Any:
    if key is None:
        return None
    namespace, _, name = key.partition("/")
    return m.GatewayAddress(
        hostname=m.NamespacedHostname(
            namespace=namespace, hostname=f"{name}.{namespace}.svc.{CLUSTER_DOMAIN}"
        ),
        hbone_mtls_port=WAYPOINT_HBONE_PORT,
    )


def selected_policies(w: Workload, policies: Iterable[Policy]) -> tuple[str, ...]:
    """The policies ``w`` lists: its own, and the selector policies that select it (istiod
    resolves selectors; the Authorization carries none)."""
    selected = [
        p.key
        for p in policies
        if p.scope is Scope.WORKLOAD_SELECTOR
        and p.action in _ACTIONS
        and p.key not in w.authorization_policies
        and applies_to(p, w)
    ]
    return (*w.authorization_policies, *selected)


def _backed(services: Iterable[Service]) -> dict[str, dict[str, Any]]:
    """Per workload uid, the services it backs and its ports in each (one pass over them)."""
    out: dict[str, dict[str, Any]] = {}
    for s in services:
        for e in s.endpoints:
            out.setdefault(e.workload_uid, {})[s.key] = m.PortList(
                ports=[
                    m.Port(service_port=sp, target_port=tp) for sp, tp in sorted(e.ports.items())
                ]
            )
    return out


def workload_resource(
    w: Workload,
    services: Iterable[Service],
    policies: Iterable[Policy] = (),
    backed: Mapping[str, dict[str, Any]] | None = None,
) -> Any:
    """``w`` as an ``istio.workload.Address`` (its ``workload``). ``backed``: :func:`_backed`
    of ``services``, when many workloads are made at once."""
    backs = (backed if backed is not None else _backed(services)).get(w.uid, {})
    workload = m.Workload(
        uid=w.uid,
        name=w.name,
        namespace=w.namespace,
        addresses=[ip.packed for ip in w.ips],
        network=w.network,
        tunnel_protocol=1 if w.protocol is Protocol.HBONE else 0,
        trust_domain=w.trust_domain,
        service_account=w.service_account,
        node=w.node,
        canonical_name=w.canonical_name,
        canonical_revision=w.canonical_revision,
        workload_type=_WORKLOAD_TYPES.get(w.workload_type.lower(), 2),
        workload_name=w.workload_name,
        authorization_policies=list(selected_policies(w, policies)),
        status=0 if w.status is HealthStatus.HEALTHY else 1,
        cluster_id=w.cluster_id,
        services=backs,
    )
    if w.waypoint is not None:
        workload.waypoint.CopyFrom(_waypoint_address(w.waypoint))
    if w.capacity != 1:
        workload.capacity.value = w.capacity
    return m.Address(workload=workload)


def service_resource(s: Service) -> Any:
    """``s`` as an ``istio.workload.Address`` (its ``service``)."""
    service = m.Service(
        name=s.name,
        namespace=s.namespace,
        hostname=s.hostname,
        addresses=[m.NetworkAddress(network=net, address=ip.packed) for net, ip in s.vips],
        ports=[
            m.Port(
                service_port=sp,
                target_port=tp,
                app_protocol=_APP_PROTOCOLS.get(s.app_protocols.get(sp, ""), 0),
            )
            for sp, tp in sorted(s.ports.items())
        ],
        subject_alt_names=list(s.subject_alt_names),
    )
    if s.waypoint is not None:
        service.waypoint.CopyFrom(_waypoint_address(s.waypoint))
    return m.Address(service=service)


def _string_match(s: StringMatch) -> Any:
    if s.kind is MatchKind.PRESENCE:
        out = m.StringMatch()
        out.presence.SetInParent()
        return out
    return m.StringMatch(**{s.kind.value.lower(): s.value})


def _ips(networks: Iterable[Any]) -> list[Any]:
    return [m.IpAddress(address=n.network_address.packed, length=n.prefixlen) for n in networks]


def _match(x: Match) -> Any:
    def accounts(items: Iterable[ServiceAccountMatch]) -> list[Any]:
        return [
            m.ServiceAccountMatch(namespace=a.namespace, serviceAccount=a.service_account)
            for a in items
        ]

    return m.Match(
        namespaces=[_string_match(s) for s in x.namespaces],
        not_namespaces=[_string_match(s) for s in x.not_namespaces],
        principals=[_string_match(s) for s in x.principals],
        not_principals=[_string_match(s) for s in x.not_principals],
        service_accounts=accounts(x.service_accounts),
        not_service_accounts=accounts(x.not_service_accounts),
        source_ips=_ips(x.source_ips),
        not_source_ips=_ips(x.not_source_ips),
        destination_ips=_ips(x.destination_ips),
        not_destination_ips=_ips(x.not_destination_ips),
        destination_ports=list(x.destination_ports),
        not_destination_ports=list(x.not_destination_ports),
    )


def authorization_resource(p: Policy) -> Any | None:
    """``p`` as an ``istio.security.Authorization``; None for AUDIT (ztunnel never gets one)."""
    if p.action not in _ACTIONS:
        return None
    return m.Authorization(
        name=p.name,
        namespace=p.namespace,
        scope=_SCOPES[p.scope],
        action=_ACTIONS[p.action],
        rules=[
            m.Rule(clauses=[m.Clause(matches=[_match(x) for x in clause]) for clause in rule])
            for rule in p.rules
        ],
        dry_run=p.dry_run,
    )


def waypoint_services(mesh: Mesh) -> list[Service]:
    """A Service per waypoint the mesh has none for (Istio makes one per waypoint Gateway): what
    a ztunnel looks the waypoint's hostname up in, its pods as endpoints on 15008."""
    known = {(s.namespace, s.name) for s in mesh.services}
    hbone = MappingProxyType({WAYPOINT_HBONE_PORT: WAYPOINT_HBONE_PORT})
    return [
        Service(
            name=wp.name,
            namespace=wp.namespace,
            hostname=f"{wp.name}.{wp.namespace}.svc.{CLUSTER_DOMAIN}",
            vips=(),
            ports=hbone,
            endpoints=tuple(Endpoint(uid, hbone) for uid in wp.workload_uids),
        )
        for wp in mesh.waypoints
        if (wp.namespace, wp.name) not in known
    ]


def resources(mesh: Mesh) -> tuple[dict[str, Any], dict[str, Any]]:
    """The mesh's xDS resources by name: ``(addresses, authorizations)``."""
    addresses: dict[str, Any] = {}
    services = [*mesh.services, *waypoint_services(mesh)]
    backed = _backed(services)
    # A selector selects in its own namespace only: each workload is checked against those.
    selectors: dict[str, list[Policy]] = {}
    for p in mesh.policies:
        if p.scope is Scope.WORKLOAD_SELECTOR:
            selectors.setdefault(p.namespace, []).append(p)
    for w in mesh.workloads:
        addresses[w.uid] = workload_resource(w, services, selectors.get(w.namespace, ()), backed)
    for s in services:
        addresses[s.key] = service_resource(s)
    authorizations = {}
    for p in mesh.policies:
        resource = authorization_resource(p)
        if resource is not None:
            authorizations[p.key] = resource
    return addresses, authorizations


# --- back: what a ztunnel makes of pushed resources -----------------------------------------


class ResourceError(ValueError):
    """A resource ambient cannot take (NACKed with this text)."""


def _ip(raw: bytes, what: str) -> Any:
    try:
        return ipaddress.ip_address(raw)
    except ValueError:
        raise ResourceError(f"{what}: {len(raw)} bytes are not an IPv4 or IPv6 address") from None


def _waypoint_key(g: Any, what: str) -> str | None:
    if not g.HasField("hostname"):
        if g.HasField("address"):
            raise ResourceError(f"{what}: a waypoint by address is not supported; by hostname")
        return None
    name = g.hostname.hostname.split(".", 1)[0]
    return f"{g.hostname.namespace}/{name}"


def workload_from_resource(name: str, w: Any) -> Workload:
    what = f"workload {name}"
    types = {v: k for k, v in _WORKLOAD_TYPES.items()}
    return Workload(
        uid=w.uid or name,
        name=w.name,
        namespace=w.namespace,
        ips=tuple(_ip(a, f"{what}: addresses") for a in w.addresses),
        service_account=w.service_account or "default",
        trust_domain=w.trust_domain or "cluster.local",
        protocol=Protocol.HBONE if w.tunnel_protocol == 1 else Protocol.TCP,
        node=w.node,
        network=w.network,
        cluster_id=w.cluster_id,
        canonical_name=w.canonical_name or w.name,
        canonical_revision=w.canonical_revision or "latest",
        workload_name=w.workload_name or w.name,
        workload_type=types.get(w.workload_type, "pod"),
        status=HealthStatus.HEALTHY if w.status == 0 else HealthStatus.UNHEALTHY,
        capacity=w.capacity.value if w.HasField("capacity") else 1,
        authorization_policies=tuple(w.authorization_policies),
        waypoint=_waypoint_key(w.waypoint, what) if w.HasField("waypoint") else None,
    )


def _string_match_back(s: Any) -> StringMatch:
    kind = s.WhichOneof("match_type")
    if kind == "presence":
        return StringMatch(MatchKind.PRESENCE)
    if kind is None:
        raise ResourceError("a string match with no exact, prefix, suffix or presence")
    return StringMatch(MatchKind(kind.capitalize()), getattr(s, kind))


def _network(a: Any) -> Any:
    ip = _ip(a.address, "an IP of a policy")
    return ipaddress.ip_network(f"{ip}/{a.length or ip.max_prefixlen}", strict=False)


def _match_back(x: Any) -> Match:
    def accounts(items: Iterable[Any]) -> tuple[ServiceAccountMatch, ...]:
        return tuple(ServiceAccountMatch(a.namespace, a.serviceAccount) for a in items)

    return Match(
        namespaces=tuple(map(_string_match_back, x.namespaces)),
        not_namespaces=tuple(map(_string_match_back, x.not_namespaces)),
        service_accounts=accounts(x.service_accounts),
        not_service_accounts=accounts(x.not_service_accounts),
        principals=tuple(map(_string_match_back, x.principals)),
        not_principals=tuple(map(_string_match_back, x.not_principals)),
        source_ips=tuple(map(_network, x.source_ips)),
        not_source_ips=tuple(map(_network, x.not_source_ips)),
        destination_ips=tuple(map(_network, x.destination_ips)),
        not_destination_ips=tuple(map(_network, x.not_destination_ips)),
        destination_ports=tuple(x.destination_ports),
        not_destination_ports=tuple(x.not_destination_ports),
    )


def policy_from_resource(name: str, a: Any) -> Policy:
    scopes = {v: k for k, v in _SCOPES.items()}
    actions = {v: k for k, v in _ACTIONS.items()}
    try:
        return Policy(
            name=a.name,
            namespace=a.namespace,
            scope=scopes[a.scope],
            action=actions[a.action],
            rules=tuple(
                tuple(tuple(_match_back(x) for x in c.matches) for c in r.clauses) for r in a.rules
            ),
            dry_run=a.dry_run,
        )
    except ResourceError as e:
        raise ResourceError(f"authorization {name}: {e}") from None
    except KeyError as e:
        raise ResourceError(f"authorization {name}: unknown scope or action {e}") from None


def mesh_from_resources(
    addresses: Mapping[str, Any], authorizations: Mapping[str, Any], sources: tuple[str, ...] = ()
) -> Mesh:
    """The mesh a ztunnel serves from pushed resources; :class:`ResourceError` names the first
    resource it cannot take."""
    workloads = []
    raw_services = []
    for name, address in sorted(addresses.items()):
        kind = address.WhichOneof("type")
        if kind == "workload":
            workloads.append(workload_from_resource(name, address.workload))
        elif kind == "service":
            raw_services.append((name, address.service))
        else:
            raise ResourceError(f"address {name}: neither a workload nor a service")
    backing: dict[str, list[Endpoint]] = {}
    for name, address in addresses.items():
        if address.WhichOneof("type") == "workload":
            uid = address.workload.uid or name
            for key, port_list in address.workload.services.items():
                ports = {p.service_port: p.target_port for p in port_list.ports}
                backing.setdefault(key, []).append(Endpoint(uid, MappingProxyType(ports)))
    apps = {v: k for k, v in _APP_PROTOCOLS.items() if k not in ("http1", "h2c")}
    services = []
    for name, s in raw_services:
        key = f"{s.namespace}/{s.hostname}"
        services.append(
            Service(
                name=s.name,
                namespace=s.namespace,
                hostname=s.hostname,
                vips=tuple(
                    (a.network, _ip(a.address, f"service {name}: addresses")) for a in s.addresses
                ),
                ports=MappingProxyType({p.service_port: p.target_port for p in s.ports}),
                endpoints=tuple(sorted(backing.get(key, []), key=lambda e: e.workload_uid)),
                subject_alt_names=tuple(s.subject_alt_names),
                waypoint=_waypoint_key(s.waypoint, f"service {name}")
                if s.HasField("waypoint")
                else None,
                app_protocols=MappingProxyType(
                    {p.service_port: apps[p.app_protocol] for p in s.ports if p.app_protocol}
                ),
            )
        )
    policies = [policy_from_resource(n, a) for n, a in sorted(authorizations.items())]
    # A waypoint named by a workload or service: its Service's endpoints serve HBONE.
    waypoints = {}
    keys = [w.waypoint for w in workloads] + [s.waypoint for s in services]
    for key in keys:
        if key is None or key in waypoints:
            continue
        namespace, _, wp_name = key.partition("/")
        service = next(
            (x for x in services if x.namespace == namespace and x.name == wp_name), None
        )
        uids = tuple(e.workload_uid for e in service.endpoints) if service else ()
        waypoints[key] = Waypoint(wp_name, namespace, "all", uids)
    return Mesh(
        workloads=tuple(workloads),
        services=tuple(services),
        policies=tuple(policies),
        waypoints=tuple(waypoints.values()),
        sources=sources,
    )
