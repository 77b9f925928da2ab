"""Where a connection goes: the routing decisions of ztunnel, as pure functions over a snapshot.

These are the semantics, written once; the proxy calls them per connection, ``ambient explain``
calls them without sending anything, and tests call them without sockets. Nothing here does I/O;
randomness (endpoint choice) is passed in.

Outbound, in order (Istio's ztunnel):
1. a connection aimed at one of the proxy's own ports on an address it serves is refused, so
   nothing loops;
2. to a Service VIP whose Service has a waypoint: HBONE to the waypoint, authority ``VIP:port``;
3. to a Service VIP: an endpoint of that Service — unhealthy ones and ones without the port
   skipped, weighted random by capacity; none left → refused (no fallback);
4. to a known workload's IP: that workload — through its waypoint if it has one (authority the
   original ``ip:port``); a Service's waypoint wins, since Service traffic skips the pod's;
5. to anything else: plain TCP passthrough to the original destination;
6. a destination in the mesh is reached over HBONE at ``podIP:15008`` with authority
   ``podIP:targetPort``, expecting its identity; one outside the mesh over plain TCP.
Traffic from a waypoint itself is never sent back to that waypoint.

Inbound: an HBONE stream must name this pod (``authority`` IP) and not one of the proxy's ports;
plaintext arrives with no peer identity.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Collection
from dataclasses import dataclass
from enum import Enum

from .mesh import HealthStatus, IPAddress, Mesh, Service, Waypoint, Workload

HBONE_PORT = 15008
INBOUND_PLAINTEXT_PORT = 15006
OUTBOUND_CAPTURE_PORT = 15001
SOCKS5_PORT = 15080
# A request for one of these on the proxy itself would loop back into it.
PROXY_PORTS = frozenset({OUTBOUND_CAPTURE_PORT, INBOUND_PLAINTEXT_PORT, HBONE_PORT, SOCKS5_PORT})


class Transport(Enum):
    HBONE = "HBONE"  # mutual TLS + HTTP/2 CONNECT
    TCP = "TCP"  # plain TCP
    DENY = "DENY"


def format_address(ip: IPAddress, port: int) -> str:
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


@dataclass(frozen=True, slots=True)
class OutboundRoute:
    """The plan for one outbound connection, and why."""

    transport: Transport
    address: tuple[IPAddress, int] | None = None  # what to dial: podIP:15008, or ip:port
    authority: str | None = None  # the HBONE CONNECT authority
    identities: tuple[str, ...] = ()  # identities the HBONE server must hold
    destination: Workload | None = None
    service: Service | None = None
    reason: str = ""
    waypoint: Waypoint | None = None  # when the connection goes through one

    @property
    def dial(self) -> str:
        assert self.address is not None
        return format_address(*self.address)


def _family_ip(workload: Workload, like: IPAddress) -> IPAddress | None:
    for ip in workload.ips:
        if ip.version == like.version:
            return ip
    return workload.ips[0] if workload.ips else None


def endpoint_choices(
    mesh: Mesh, service: Service, port: int
) -> list[tuple[tuple[Workload, int], int]]:
    """The healthy endpoints of ``service`` serving ``port`` (workload, target port), each with
    its weight: the workload's capacity."""
    choices: list[tuple[tuple[Workload, int], int]] = []
    for workload, endpoint in mesh.endpoints_of(service):
        target = endpoint.ports.get(port)
        if not target or workload.status is not HealthStatus.HEALTHY or workload.capacity <= 0:
            continue
        choices.append(((workload, target), workload.capacity))
    return choices


def pick_endpoint(
    mesh: Mesh, service: Service, port: int, rng: random.Random
) -> tuple[Workload, int] | None:
    """A healthy endpoint of ``service`` serving ``port``, weighted by capacity."""
    choices = endpoint_choices(mesh, service, port)
    if not choices:
        return None
    return rng.choices([c for c, _ in choices], weights=[w for _, w in choices])[0]


def to_workload(
    destination: Workload, target_port: int, like: IPAddress, service: Service | None
) -> OutboundRoute:
    ip = _family_ip(destination, like)
    if ip is None:
        return OutboundRoute(Transport.DENY, destination=destination, reason="workload has no IP")
    if destination.in_mesh:
        identities: tuple[str, ...] = (str(destination.identity),)
        if service is not None:
            identities += tuple(s for s in service.subject_alt_names if s not in identities)
        return OutboundRoute(
            Transport.HBONE,
            address=(ip, HBONE_PORT),
            authority=format_address(ip, target_port),
            identities=identities,
            destination=destination,
            service=service,
            reason="destination is in the mesh",
        )
    return OutboundRoute(
        Transport.TCP,
        address=(ip, target_port),
        destination=destination,
        service=service,
        reason="destination is outside the mesh",
    )


# A route and its weight: the chance it is taken, among the routes of one connection.
Choice = tuple[OutboundRoute, int]


def _via_waypoint(
    mesh: Mesh,
    key: str | None,
    source: Workload,
    authority: str,
    *,
    service: Service | None = None,
    destination: Workload | None = None,
) -> list[Choice] | None:
    """The routes through waypoint ``key`` (one per ready instance, weighted by capacity), or
    None when there is no waypoint to take."""
    waypoint = mesh.waypoint(key)
    if waypoint is None or source.uid in waypoint.workload_uids:
        return None  # no waypoint, or the traffic comes from the waypoint itself
    instances = [
        w
        for uid in waypoint.workload_uids
        if (w := mesh.workload_by_uid(uid)) is not None
        and w.ips
        and w.status is HealthStatus.HEALTHY
        and w.capacity > 0
    ]
    if not instances:
        refusal = OutboundRoute(
            Transport.DENY,
            service=service,
            destination=destination,
            waypoint=waypoint,
            reason=f"waypoint {waypoint.key} has no ready instance",
        )
        return [(refusal, 1)]
    return [
        (
            OutboundRoute(
                Transport.HBONE,
                address=(chosen.ips[0], HBONE_PORT),
                authority=authority,
                identities=(str(chosen.identity),),
                destination=destination,
                service=service,
                waypoint=waypoint,
                reason=f"through waypoint {waypoint.key}",
            ),
            chosen.capacity,
        )
        for chosen in instances
    ]


def outbound_choices(
    mesh: Mesh,
    source: Workload,
    dst_ip: IPAddress,
    dst_port: int,
    *,
    proxy_addresses: Collection[IPAddress] = (),
) -> list[Choice]:
    """Every route a connection from ``source`` to ``dst_ip:dst_port`` may take, each with its
    weight; one is taken per connection at random by weight (:func:`outbound`). The answer
    depends only on the snapshot, the source workload and the destination, so a proxy may keep
    it until the snapshot changes."""
    if dst_port in PROXY_PORTS and dst_ip in proxy_addresses:
        refusal = f"port {dst_port} is the proxy's own: refusing to loop"
        return [(OutboundRoute(Transport.DENY, reason=refusal), 1)]
    service = mesh.service_by_vip(dst_ip)
    if service is not None:
        if dst_port not in service.ports:
            refusal = f"{service.hostname} has no port {dst_port}"
            return [(OutboundRoute(Transport.DENY, service=service, reason=refusal), 1)]
        authority = format_address(dst_ip, dst_port)
        via = _via_waypoint(mesh, service.waypoint, source, authority, service=service)
        if via is not None:
            return via
        endpoints = endpoint_choices(mesh, service, dst_port)
        if not endpoints:
            refusal = f"{service.hostname}:{dst_port} has no healthy endpoint"
            return [(OutboundRoute(Transport.DENY, service=service, reason=refusal), 1)]
        return [
            (to_workload(chosen, target_port, dst_ip, service), weight)
            for (chosen, target_port), weight in endpoints
        ]
    workload = mesh.workload_by_ip(dst_ip)
    if workload is not None:
        authority = format_address(dst_ip, dst_port)
        via = _via_waypoint(mesh, workload.waypoint, source, authority, destination=workload)
        return via if via is not None else [(to_workload(workload, dst_port, dst_ip, None), 1)]
    passthrough = OutboundRoute(
        Transport.TCP, address=(dst_ip, dst_port), reason="unknown destination: passthrough"
    )
    return [(passthrough, 1)]


def outbound(
    mesh: Mesh,
    source: Workload,
    dst_ip: IPAddress,
    dst_port: int,
    *,
    rng: random.Random,
    proxy_addresses: Collection[IPAddress] = (),
) -> OutboundRoute:
    """Route a connection from ``source`` to ``dst_ip:dst_port``: one of
    :func:`outbound_choices`, picked with ``rng`` by weight."""
    choices = outbound_choices(mesh, source, dst_ip, dst_port, proxy_addresses=proxy_addresses)
    if len(choices) == 1:
        return choices[0][0]
    return rng.choices([r for r, _ in choices], weights=[w for _, w in choices])[0]


def resolve(mesh: Mesh, destination: str) -> tuple[IPAddress, int]:
    """``ip:port``, ``[ip6]:port`` or ``service-hostname:port`` → (ip, port). A hostname may be
    a Service's full name or ``name.namespace``/``name.namespace.svc``. ValueError otherwise."""
    host, sep, port_text = destination.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError(f"{destination!r}: expected host:port")
    port = int(port_text)
    host = host.strip("[]")
    try:
        return ipaddress.ip_address(host), port
    except ValueError:
        pass
    for candidate in (host, f"{host}.svc.cluster.local", f"{host}.cluster.local"):
        service = mesh.service_by_hostname(candidate)
        if service is not None and service.vips:
            return service.vips[0][1], port
    raise ValueError(f"{destination!r}: {host!r} is neither an IP nor a known Service hostname")


@dataclass(frozen=True, slots=True)
class InboundCheck:
    """Whether an inbound connection may reach the local workload, and where its app is."""

    allowed: bool
    status: int = 200  # the HBONE status when refused
    reason: str = ""
    upstream: tuple[IPAddress, int] | None = None


def app_address(workload: Workload, ip: IPAddress, port: int) -> tuple[IPAddress, int]:
    """Where the workload's application listens for ``ip:port``: its app address in loopback
    mode (an ambient extension), else the address itself."""
    return (workload.app_address or ip, port)


def inbound_hbone(workload: Workload, authority: str) -> InboundCheck:
    """An HBONE CONNECT arriving at ``workload``'s 15008: it must name this pod, and not one of
    the proxy's ports."""
    host, _, port_text = authority.rpartition(":")
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
        port = int(port_text)
    except ValueError:
        return InboundCheck(False, 400, f"authority {authority!r} is not ip:port")
    if ip not in workload.ips:
        return InboundCheck(False, 400, f"authority {authority} is not this pod ({workload.key})")
    if port in PROXY_PORTS:
        return InboundCheck(False, 400, f"port {port} is the proxy's own: refusing to loop")
    return InboundCheck(True, upstream=app_address(workload, ip, port))


def waypoint_identities(mesh: Mesh, workload: Workload) -> set[str]:
    """The identities of the waypoints traffic to ``workload`` may come through: its own, and
    those of the Services it backs."""
    keys = {workload.waypoint} | {
        s.waypoint for s, _ in mesh.services_backed_by(workload) if s.waypoint
    }
    identities = set()
    for key in keys:
        waypoint = mesh.waypoint(key)
        for uid in waypoint.workload_uids if waypoint else ():
            instance = mesh.workload_by_uid(uid)
            if instance is not None:
                identities.add(str(instance.identity))
    return identities


def waypoint_only_refusal(mesh: Mesh, workload: Workload, peer: str | None) -> str | None:
    """The ``ambient.dev/waypoint-only`` extension: traffic must come from one of the pod's
    waypoints (Istio itself leaves this to hand-written ALLOW policies)."""
    if not workload.waypoint_only:
        return None
    expected = waypoint_identities(mesh, workload)
    if peer in expected:
        return None
    return (
        f"{workload.key} accepts traffic only through its waypoint "
        f"(peer {peer or 'without identity'}, expected one of {sorted(expected) or 'none'})"
    )


def inbound_plaintext(workload: Workload, dst_ip: IPAddress, dst_port: int) -> InboundCheck:
    """A plaintext connection captured for ``workload`` (15006, or an app port in loopback mode)."""
    if dst_port in PROXY_PORTS:
        return InboundCheck(False, 400, f"port {dst_port} is the proxy's own: refusing to loop")
    if dst_ip not in workload.ips:
        return InboundCheck(False, 400, f"{dst_ip} is not this pod ({workload.key})")
    return InboundCheck(True, upstream=app_address(workload, dst_ip, dst_port))


def forwarded_host(value: str) -> str | None:
    """The ``host=`` parameter of a ``Forwarded`` header (RFC 7239), as Istio's ztunnel reads it:
    the Service the client dialed, sent by the source ztunnel."""
    for part in value.split(";"):
        name, _, host = part.strip().partition("=")
        if name.lower() == "host" and host.strip('"'):
            return host.strip('"')
    return None


def guess_inbound_service(
    mesh: Mesh, workload: Workload, port: int, for_host: str | None = None
) -> Service | None:
    """Which of ``workload``'s Services an inbound connection to ``port`` was for, for the
    destination side's telemetry, as Istio's ztunnel guesses it: the one the client named (only
    among the workload's own Services, so a bogus name is ignored), else the first whose target
    port, or the workload's resolved named port, is ``port``."""
    services = mesh.services_backed_by(workload)
    for service, _ in services:
        if for_host is not None and service.hostname == for_host:
            return service
    for service, endpoint in services:
        for service_port, target in service.ports.items():
            if target == port or endpoint.ports.get(service_port) == port:
                return service
    return None
