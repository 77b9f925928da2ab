"""``ambient explain``: the path a connection would take and each policy's verdict, without
sending anything — computed by the same routing and authorization functions the proxy runs.

A Service with several endpoints is explained for every healthy endpoint (the proxy picks one at
random per connection); the connection counts as allowed only if every endpoint would allow it.
"""

from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass, field
from typing import Any

from . import routing
from .mesh import HealthStatus, IPAddress, Mesh, Workload
from .policy.engine import Authorizer, connection
from .routing import Transport
from .waypoint import authz
from .waypoint.table import explain_authorization, explain_route


class ExplainError(ValueError):
    """SOURCE or DEST cannot be understood; the message says what was expected."""


@dataclass
class Leg:
    """The connection as it reaches one destination workload."""

    hops: list[str]
    transport: str
    allowed: bool
    reason: str
    destination: Workload | None = None
    policies: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Explanation:
    source: str
    destination: str
    legs: list[Leg]
    waypoint: str | None = None
    expected_identities: list[str] = field(default_factory=list)

    @property
    def allowed(self) -> bool:
        return all(leg.allowed for leg in self.legs)

    def as_json(self) -> dict[str, Any]:
        first = self.legs[0]
        return {
            "allowed": self.allowed,
            "source": self.source,
            "destination": self.destination,
            "transport": first.transport,
            "waypoint": self.waypoint,
            "expected_identities": self.expected_identities,
            "hops": first.hops,
            "reason": "; ".join(dict.fromkeys(leg.reason for leg in self.legs)),
            "policies": [
                {
                    "name": name,
                    "verdict": verdict,
                    "workload": leg.destination.key if leg.destination else None,
                }
                for leg in self.legs
                for name, verdict in leg.policies
            ],
            "endpoints": [
                {
                    "workload": leg.destination.key if leg.destination else None,
                    "allowed": leg.allowed,
                    "reason": leg.reason,
                    "hops": leg.hops,
                }
                for leg in self.legs
            ],
        }


def _source(mesh: Mesh, text: str) -> tuple[Workload | None, IPAddress]:
    if "/" in text:
        namespace, _, name = text.partition("/")
        found = next(
            (w for w in mesh.workloads if w.namespace == namespace and w.name == name), None
        )
        if found is None or not found.ips:
            raise ExplainError(
                f"SOURCE {text!r}: no pod {namespace}/{name} (with an IP) in the configuration"
            )
        return found, found.ips[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise ExplainError(
            f"SOURCE {text!r}: expected a pod as namespace/name, or an IP address"
        ) from None
    return mesh.workload_by_ip(ip), ip


def _describe(w: Workload | None, ip: IPAddress) -> str:
    if w is None:
        return f"{ip} (not a known workload)"
    where = "in the mesh" if w.in_mesh else "outside the mesh"
    node = f", node {w.node}" if w.node else ""
    return f"{w.key} {ip} ({where}{node})"


def _inbound(
    authorizer: Authorizer,
    dst: Workload,
    src_ip: IPAddress,
    dst_ip: IPAddress,
    port: int,
    identity: str | None,
    hops: list[str],
    transport: str,
) -> Leg:
    """What the destination's ztunnel does with the connection."""
    mesh = authorizer.mesh
    node = f"ztunnel {dst.node}" if dst.node else "ztunnel"
    refusal = routing.waypoint_only_refusal(mesh, dst, identity)
    if refusal:
        hops.append(f"{node}: refused (ambient.dev/waypoint-only): {refusal}")
        return Leg(hops, transport, False, refusal, dst)
    policies = authorizer.policy_set(dst)
    conn = connection(src_ip, dst_ip, port, identity)
    decision = policies.evaluate(conn)
    peer = identity or "no identity (plaintext)"
    hops.append(
        f"{node}: L4 authorization of {peer}: "
        f"{'allowed' if decision.allowed else 'DENIED'} ({decision.reason})"
    )
    if decision.allowed:
        app = routing.app_address(dst, dst_ip, port)
        hops.append(f"{dst.key} app at {routing.format_address(*app)}")
    return Leg(hops, transport, decision.allowed, decision.reason, dst, policies.explain(conn))


@dataclass(frozen=True)
class HttpRequest:
    """An HTTP request to explain at a waypoint (``ambient explain --method --path --header``)."""

    method: str = "GET"
    path: str = "/"
    headers: tuple[tuple[str, str], ...] = ()
    # A verified JWT's principal (iss/sub), as RequestAuthentication would give it; None: none.
    request_principal: str | None = None
    # A JWT the request carries (checked as the waypoint checks it); None: none.
    jwt: str | None = None


def _normalized(path_and_query: str) -> str:
    """The path as the waypoint routes and authorizes it (normalized), with its query."""
    path, sep, query = path_and_query.partition("?")
    return authz.normalize_path(path) + sep + query


def _waypoint_authorization(
    mesh: Mesh,
    waypoint: str,
    target: str,
    request: HttpRequest,
    src: Workload,
    src_ip: IPAddress,
) -> tuple[authz.Decision, list[tuple[str, str]]]:
    path, _, _ = request.path.partition("?")
    ip, _, port = target.rpartition(":")
    headers: dict[str, list[str]] = {}
    for name, value in request.headers:
        headers.setdefault(name.lower(), []).append(value)
    auth = None
    if request.request_principal:
        auth = authz.RequestAuth(request.request_principal)
    seen = authz.Request(
        method=request.method,
        host=headers.get("host", [target])[0],
        path=authz.normalize_path(path),
        headers=headers,
        source_principal=str(src.identity).removeprefix("spiffe://") if src.in_mesh else "",
        source_ip=src_ip,
        destination_ip=ipaddress.ip_address(ip.strip("[]")),
        destination_port=int(port),
        auth=auth,
    )
    return explain_authorization(mesh, waypoint, target, seen, path, request.jwt)


def explain(
    mesh: Mesh, source: str, destination: str, request: HttpRequest | None = None
) -> Explanation:
    request = request or HttpRequest()
    src, src_ip = _source(mesh, source)
    try:
        dst_ip, port = routing.resolve(mesh, destination)
    except ValueError as e:
        raise ExplainError(f"DEST: {e}") from None
    authorizer = Authorizer(mesh)
    out = Explanation(source, f"{destination} ({routing.format_address(dst_ip, port)})", [])
    start = [_describe(src, src_ip)]
    service = mesh.service_by_vip(dst_ip)

    if src is None or not src.in_mesh:
        # No ztunnel on the source side: kube-proxy picks an endpoint, waypoints are bypassed.
        start.append(
            "no ztunnel on the source side: plaintext"
            + (", any waypoint bypassed" if service or mesh.workload_by_ip(dst_ip) else "")
        )
        targets: list[tuple[Workload, int]] = []
        if service is not None:
            targets = [
                (w, ep.ports[port])
                for w, ep in mesh.endpoints_of(service)
                if ep.ports.get(port) and w.status is HealthStatus.HEALTHY
            ]
            if not targets:
                out.legs.append(
                    Leg(
                        [*start, f"{service.hostname}: no ready endpoint"],
                        "TCP",
                        False,
                        "no ready endpoint",
                    )
                )
                return out
        elif (w := mesh.workload_by_ip(dst_ip)) is not None:
            targets = [(w, port)]
        if not targets:
            out.legs.append(
                Leg(
                    [*start, f"{routing.format_address(dst_ip, port)}: not in the mesh"],
                    "TCP",
                    True,
                    "nothing in the mesh is involved",
                )
            )
            return out
        for dst, target_port in targets:
            hops = [*start, f"-> {dst.key} {routing.format_address(dst.ips[0], target_port)}"]
            if not dst.in_mesh:
                out.legs.append(
                    Leg(
                        [*hops, "outside the mesh: no policy"],
                        "TCP",
                        True,
                        "neither side is in the mesh",
                        dst,
                    )
                )
                continue
            out.legs.append(
                _inbound(authorizer, dst, src_ip, dst.ips[0], target_port, None, hops, "TCP")
            )
        return out

    node = f"ztunnel {src.node}" if src.node else "ztunnel"
    candidates: list[routing.OutboundRoute] = []
    if service is not None and service.waypoint is None and port in service.ports:
        # One leg per healthy endpoint the proxy may pick.
        for w, endpoint in mesh.endpoints_of(service):
            target = endpoint.ports.get(port)
            if target and w.status is HealthStatus.HEALTHY and w.capacity > 0:
                candidates.append(routing.to_workload(w, target, dst_ip, service))
    if not candidates:
        candidates = [
            routing.outbound(mesh, src, dst_ip, port, rng=random.Random(0), proxy_addresses=src.ips)
        ]
    for route in candidates:
        hops = [*start]
        via = f" (Service {route.service.hostname})" if route.service else ""
        if route.transport is Transport.DENY:
            hops.append(f"{node}: refused{via}: {route.reason}")
            out.legs.append(Leg(hops, "DENY", False, route.reason, route.destination))
            continue
        if route.transport is Transport.TCP:
            hops.append(f"{node}{via}: plain TCP to {route.dial} ({route.reason})")
            out.legs.append(Leg(hops, "TCP", True, route.reason, route.destination))
            continue
        out.expected_identities = list(route.identities)
        if route.waypoint is not None:
            out.waypoint = route.waypoint.key
            hops.append(
                f"{node}{via}: HBONE (mTLS) to waypoint {route.waypoint.key} at "
                f"{route.dial}, authority {route.authority}, expecting "
                f"{', '.join(route.identities)}"
            )
            decided = explain_route(
                mesh,
                route.waypoint.key,
                route.authority or routing.format_address(dst_ip, port),
                request.method,
                _normalized(request.path),
                list(request.headers),
                src.namespace,
            )
            authority = route.authority or routing.format_address(dst_ip, port)
            decision, verdicts = _waypoint_authorization(
                mesh, route.waypoint.key, authority, request, src, src_ip
            )
            key = route.waypoint.key
            if not decision.allowed:
                if decision.reason.startswith("401"):
                    hops.append(f"waypoint {key}: {decision.reason}")
                else:
                    hops.append(f"waypoint {key}: 403 RBAC: access denied ({decision.reason})")
                out.legs.append(
                    Leg(hops, "HBONE", False, decision.reason, route.destination, verdicts)
                )
                continue
            hops.append(f"waypoint {key}: authorization: {decision.reason}")
            hops.append(f"waypoint {key}: {decided}")
            hops.append(
                f"waypoint {key}: a second HBONE tunnel, as the waypoint's own identity, to the "
                "chosen pod's ztunnel"
            )
            out.legs.append(
                Leg(hops, "HBONE", True, f"through waypoint {key}", route.destination, verdicts)
            )
            continue
        reached = route.destination
        assert reached is not None and route.address is not None and route.authority is not None
        hops.append(
            f"{node}{via}: HBONE (mTLS) to {route.dial}, authority {route.authority}, "
            f"expecting {', '.join(route.identities)}"
        )
        check = routing.inbound_hbone(reached, route.authority)
        if not check.allowed:
            hops.append(f"ztunnel {reached.node}: refused with {check.status}: {check.reason}")
            out.legs.append(Leg(hops, "HBONE", False, check.reason, reached))
            continue
        target_ip, target_port = routing.resolve(mesh, route.authority)
        out.legs.append(
            _inbound(
                authorizer,
                reached,
                src_ip,
                target_ip,
                target_port,
                str(src.identity),
                hops,
                "HBONE",
            )
        )
    return out


def render(explanation: Explanation) -> list[str]:
    lines = [f"{explanation.source} -> {explanation.destination}"]
    several = len(explanation.legs) > 1
    for n, leg in enumerate(explanation.legs, 1):
        title = f"endpoint {n}: {leg.destination.key}" if several and leg.destination else "path"
        lines.append(f"{title}:")
        lines += [f"  {i}. {hop}" for i, hop in enumerate(leg.hops, 1)]
        if leg.policies:
            lines.append("  policies:")
            lines += [f"    {name}: {verdict}" for name, verdict in leg.policies]
    verdict = "ALLOWED" if explanation.allowed else "DENIED"
    reasons = "; ".join(dict.fromkeys(leg.reason for leg in explanation.legs))
    lines.append(f"verdict: {verdict} ({reasons})")
    return lines
