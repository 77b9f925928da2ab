"""The seed's second figure in ``ambient demo``: HTTP requests from in-mesh client pods to a
Service bound to a waypoint — client → its ztunnel → HBONE → **waypoint** (HTTPRoute, load
balancing) → a second HBONE tunnel → the destination pod's ztunnel → the pod — and one request
from outside the mesh straight to a pod IP, which bypasses the waypoint (as the seed says).

For each request the demo prints the hops, the route the waypoint took, the identity each hop saw
(the waypoint saw the client; the destination's ztunnel saw the waypoint) and who answered; a
request is ok only when it took that path and was answered by a pod its route allows.

L7 security, where the mesh file has it: to a Service with a waypoint AuthorizationPolicy the
demo also asks for ``/admin``, and to one with a RequestAuthentication it sends a forged JWT of
its issuer. What each request must get (200, or 403 naming the policy, or 401) is what the
reference semantics (``ambient.waypoint.authz``) decide; the waypoint must answer it itself.
"""

from __future__ import annotations

import base64
import http.client
import ipaddress
import json
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import routing, socks5
from .mesh import Mesh, Service, Workload
from .waypoint import authz
from .waypoint.process import WaypointProcess
from .waypoint.routes import RequestHead, applies, select
from .ztunnel.process import ZtunnelProcess

PATHS = ("/", "/hello", "/v1/items")
# How long the ztunnels may take to log the connections the waypoints closed.
LOG_SETTLE_TIMEOUT = 5.0


@dataclass
class HttpRequest:
    client: Workload
    service: Service | None  # None: straight to a pod IP
    target: tuple[str, int]
    path: str
    allowed: frozenset[str]  # the pods its route may send it to
    waypoint: str | None  # the waypoint it must cross ("ns/name"), None when it bypasses
    request_id: str = ""
    status: int = 0
    answered_by: str = ""
    route: str = ""
    waypoint_saw: str | None = None
    destination_saw: str | None = None
    failure: str = ""
    ok: bool = False
    hops: list[str] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)
    expected: int = 200  # 403: an AuthorizationPolicy denies it; 401: its JWT is refused
    why: str = ""  # what the demo expects the waypoint to say, for a 401 or 403
    details: str = ""  # what the waypoint said (its access log's response_code_details)

    @property
    def label(self) -> str:
        via = f"Service {self.service.name}" if self.service else "pod IP"
        jwt = " with a forged JWT" if "authorization" in self.headers else ""
        return f"{self.client.name} -> {via} {self.target[0]}:{self.target[1]} GET {self.path}{jwt}"


def _pods_of(mesh: Mesh, namespace: str, name: str) -> set[str]:
    service = next((s for s in mesh.services if s.namespace == namespace and s.name == name), None)
    return {w.name for w, _ in mesh.endpoints_of(service)} if service else set()


def allowed_pods(mesh: Mesh, service: Service, port: int, client: Workload, path: str) -> set[str]:
    """The pods the reference routing sends ``GET path`` from ``client`` to (HTTPRoutes attached
    to the Service, else the Service itself)."""
    routes = [
        r
        for r in mesh.http_routes
        if applies(r, (service.namespace, service.name), port, client.namespace)
    ]
    if not routes:
        return _pods_of(mesh, service.namespace, service.name)
    selected = select(routes, RequestHead("GET", path))
    if selected is None:
        return set()
    pods: set[str] = set()
    for backend in selected.rule.backends:
        if backend.weight:
            pods |= _pods_of(mesh, backend.namespace, backend.name)
    return pods


def plan_requests(
    mesh: Mesh, is_client: Callable[[Workload], bool] = lambda w: w.app_address is None
) -> list[HttpRequest]:
    """GETs from every in-mesh client (``is_client``: in loopback mode, a pod without an app
    address) to each Service bound to a waypoint, and one from outside the mesh to a pod IP."""
    clients = [w for w in mesh.workloads if w.in_mesh and is_client(w) and w.ips]
    proxies = waypoint_pods(mesh)
    outsiders = [
        w for w in mesh.workloads if not w.in_mesh and w.node and w.ips and w.uid not in proxies
    ]
    planned = []
    for service in mesh.services:
        waypoint = mesh.waypoint(service.waypoint)
        if waypoint is None or not service.vips or not waypoint.workload_uids:
            continue
        port = next(iter(service.ports))
        target = (str(service.vips[0][1]), port)
        for client in clients:
            for path in PATHS:
                allowed = allowed_pods(mesh, service, port, client, path)
                planned.append(
                    HttpRequest(client, service, target, path, frozenset(allowed), waypoint.key)
                )
        if clients:
            planned += security_requests(mesh, service, waypoint.key, clients[0], target)
        # From outside the mesh, straight to one of the Service's pods: no waypoint on the way.
        endpoints = list(mesh.endpoints_of(service))
        if outsiders and endpoints:
            pod, endpoint = endpoints[0]
            target_port = endpoint.ports.get(port, port)
            planned.append(
                HttpRequest(
                    outsiders[0],
                    None,
                    (str(pod.ips[0]), target_port),
                    "/direct",
                    frozenset({pod.name}),
                    None,
                )
            )
    for i, request in enumerate(planned):
        request.request_id = f"ambient-demo-{i}"
    return planned


def security_requests(
    mesh: Mesh, service: Service, waypoint: str, client: Workload, target: tuple[str, int]
) -> list[HttpRequest]:
    """``/admin`` where a waypoint AuthorizationPolicy applies (its fate per the reference), and a
    forged JWT where a RequestAuthentication does (a 401)."""
    out = []
    name = f"{service.namespace}/{service.name}"
    policies = [p for p in mesh.waypoint_policies if authz.applies(p, waypoint, name)]
    if policies:
        request = authz.Request(
            method="GET",
            host=target[0],
            path="/admin",
            headers={},
            source_principal=str(client.identity).removeprefix("spiffe://"),
            source_ip=client.ips[0],
            destination_ip=ipaddress.ip_address(target[0]),
            destination_port=target[1],
        )
        decision = authz.evaluate(policies, request)
        port = target[1]
        allowed = allowed_pods(mesh, service, port, client, "/admin") if decision.allowed else set()
        out.append(
            HttpRequest(
                client,
                service,
                target,
                "/admin",
                frozenset(allowed),
                waypoint,
                expected=200 if decision.allowed else 403,
                why=f"rbac_access_denied_matched_policy[{decision.policy or 'none'}]",
            )
        )
    authns = [a for a in mesh.request_authentications if authz.applies(a, waypoint, name)]
    if authns and authns[0].rules:
        out.append(
            HttpRequest(
                client,
                service,
                target,
                "/hello",
                frozenset(),
                waypoint,
                headers={"authorization": f"Bearer {forged_jwt(authns[0].rules[0].issuer)}"},
                expected=401,
                why="jwt_authn_access_denied",
            )
        )
    return out


def forged_jwt(issuer: str) -> str:
    """A well-formed JWT of ``issuer`` whose signature no key of its set made."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = {"alg": "ES256", "typ": "JWT", "kid": "demo-1"}
    payload = {"iss": issuer, "sub": "mallory", "exp": int(time.time()) + 600}
    parts = [b64(json.dumps(header).encode()), b64(json.dumps(payload).encode()), b64(bytes(64))]
    return ".".join(parts)


def through_socks5(request: HttpRequest) -> socket.socket:
    """Loopback mode: an in-mesh client reaches the mesh through its ztunnel's SOCKS5 port, a
    client outside the mesh dials the target itself, from its pod IP."""
    client_ip = str(request.client.ips[0])
    if request.client.in_mesh:
        return socks5.connect((client_ip, routing.SOCKS5_PORT), request.target, source=client_ip)
    return socket.create_connection(request.target, timeout=10, source_address=(client_ip, 0))


def send(
    request: HttpRequest, connect: Callable[[HttpRequest], socket.socket] = through_socks5
) -> None:
    """Send the request with the standard library's HTTP client, on a connection made by
    ``connect`` (the testbed dials from inside the client pod, its capture rules apply)."""
    host, port = request.target
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.sock = connect(request)
        conn.sock.settimeout(10)
        headers = {"x-request-id": request.request_id, **request.headers}
        conn.request("GET", request.path, headers=headers)
        response = conn.getresponse()
        body = response.read()
        request.status = response.status
        if response.status == 200:
            request.answered_by = json.loads(body).get("pod", "")
    except (OSError, ValueError) as e:
        request.failure = f"failed: {e}"
    finally:
        conn.close()


def _saw(entries: list[dict[str, Any]], pod: str, source: Workload | None) -> str | None:
    """The identity ``pod``'s ztunnel logged for connections from ``source``'s IP ("" when it
    logged none: plaintext; None when it logged no such connection)."""
    if source is None:
        return None
    prefix = f"{source.ips[0]}:"
    for e in entries:
        if e.get("dst.workload") == pod and str(e.get("src.addr", "")).startswith(prefix):
            return e.get("src.identity") or ""
    return None


def settle(
    requests: list[HttpRequest],
    waypoints: Mapping[str, WaypointProcess],
    proxies: Mapping[str, ZtunnelProcess],
    mesh: Mesh,
) -> None:
    """Read what each hop logged and judge each request. The waypoints are stopped first: a
    waypoint keeps its connections to pods for the next request, and a ztunnel logs a
    connection when it closes."""
    logged: dict[str, dict[str, Any]] = {}
    for process in waypoints.values():
        process.stop()  # its access log is complete once it has exited
        for entry in process.claim_entries(lambda e: "x_request_id" in e, timeout=0.0):
            logged[entry["x_request_id"]] = entry
    inbound: list[dict[str, Any]] = []
    for proxy in proxies.values():
        # The ztunnels log the waypoints' connections as they close: read until a quiet spell.
        deadline = time.monotonic() + LOG_SETTLE_TIMEOUT
        while time.monotonic() < deadline:
            more = proxy.claim_entries(lambda e: e.get("direction") == "inbound", timeout=0.3)
            if not more:
                break
            inbound += more
    by_name = {w.name: w for w in mesh.workloads}
    for request in requests:
        found = logged.get(request.request_id)
        pod = by_name.get(request.answered_by)
        # The waypoint's own connections come from its pod; a bypass comes from the client.
        source = _waypoint_pod(mesh, request.waypoint) if request.waypoint else request.client
        request.destination_saw = _saw(inbound, request.answered_by, source)
        if request.waypoint is not None:
            request.route = found["route_name"] if found else ""
            request.waypoint_saw = found.get("downstream_peer_uri_san") if found else None
            request.details = str(found.get("response_code_details") or "") if found else ""
        node = pod.node if pod else "?"
        if request.expected != 200:
            # Answered by the waypoint itself: nothing went further.
            request.hops = [
                request.client.name,
                f"ztunnel {request.client.node}",
                "HBONE",
                f"waypoint {request.waypoint} on {source.node if source else '?'}",
                f"answered {request.status or '?'} there",
            ]
            request.ok = (
                request.status == request.expected
                and found is not None
                and request.details.startswith(request.why)
                and request.waypoint_saw == str(request.client.identity)
                and not request.answered_by
            )
        elif request.waypoint is not None:
            request.hops = [
                request.client.name,
                f"ztunnel {request.client.node}",
                "HBONE",
                f"waypoint {request.waypoint} on {source.node if source else '?'} "
                f"(route {request.route or '?'})",
                "HBONE",
                f"ztunnel {node}",
                request.answered_by or "?",
            ]
            waypoint_identity = str(source.identity) if source else None
            request.ok = (
                request.status == 200
                and request.answered_by in request.allowed
                and found is not None
                and request.waypoint_saw == str(request.client.identity)
                and request.destination_saw == waypoint_identity
            )
        else:
            request.hops = [
                request.client.name,
                "(outside the mesh: no ztunnel, no waypoint)",
                "plaintext",
                f"ztunnel {node}",
                request.answered_by or "?",
            ]
            request.ok = (
                request.status == 200
                and request.answered_by in request.allowed
                and found is None
                and request.destination_saw == ""
            )


def _waypoint_pod(mesh: Mesh, key: str) -> Workload | None:
    waypoint = mesh.waypoint(key)
    if waypoint is None or not waypoint.workload_uids:
        return None
    return mesh.workload_by_uid(waypoint.workload_uids[0])


def waypoint_pods(mesh: Mesh) -> set[str]:
    """The uids of every waypoint's own pods (not clients or servers of the demo)."""
    return {uid for w in mesh.waypoints for uid in w.workload_uids}


def print_requests(out: Callable[[str], None], requests: list[HttpRequest]) -> None:
    if not requests:
        return
    out("HTTP through the waypoint (the seed's second figure):")
    for r in requests:
        mark = "ok " if r.ok else "BAD"
        out(f"  [{mark}] {r.label}")
        out(f"        path: {' -> '.join(r.hops)}")
        answered = f"{r.status} from {r.answered_by}" if r.status else r.failure
        if r.expected != 200:
            out(
                f"        {r.status or r.failure} from the waypoint (expected {r.expected}): "
                f"{r.details or 'nothing logged'}; the waypoint saw "
                f"{r.waypoint_saw or 'no identity'}"
            )
        elif r.waypoint is not None:
            out(
                f"        {answered}; the waypoint saw {r.waypoint_saw or 'no identity'}; "
                f"{r.answered_by}'s ztunnel saw {r.destination_saw or 'no identity'}"
            )
        else:
            saw = "no identity (plaintext)" if r.destination_saw == "" else r.destination_saw
            out(f"        {answered}; bypassed the waypoint; {r.answered_by}'s ztunnel saw {saw}")
