"""The waypoint's routing table: the mesh snapshot, compiled for one waypoint into what the core
reads per request with no Python call (``ambient._core.WaypointTable``).

Semantics stay in :mod:`ambient.waypoint.routes`: this module only lays them out for fast
evaluation, and a differential test checks that the core's choice equals
:func:`~ambient.waypoint.routes.select` on generated routes and requests.

- ``targets``: every IP a client may CONNECT to at this waypoint — the VIPs of the Services bound
  to it (``kind: service``) and, for a waypoint taking workload traffic, the IPs of the pods bound
  to it (``kind: workload``). Anything else is refused.
- ``services[i].ports[port]``: the port's protocol (``http``, ``http2``, ``tcp`` or ``detect``),
  the route matches of every HTTPRoute attached to it **sorted by precedence** (so the first that
  matches is the one :func:`~ambient.waypoint.routes.select` would take; a consumer route's
  matches carry ``only_namespace``), the rules they lead to, and ``default``: the Service itself,
  where a request goes when no route is attached for its client.
- ``endpoints``: every pod a request may be sent to, with its ztunnel's HBONE address and the
  identity its certificate must carry; backends refer to them by index with their target port.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence
from typing import Any

import orjson

from ..config import kubernetes as k8s
from ..mesh import HealthStatus, Mesh, Service, Workload
from . import authn, authz, extauthz, plugins, telemetry_api
from .routes import Backend, HttpRoute, precedence

# ztunnel's HBONE port on every in-mesh pod (Istio's).
HBONE_PORT = 15008

# Istio's protocol selection (appProtocol or the port name's prefix) → how the waypoint reads a
# port. Anything not named here is detected from the first bytes.
PROTOCOLS = {
    "http": "http",
    "http1": "http",
    "http2": "http2",
    "h2c": "http2",
    "kubernetes.io/h2c": "http2",
    "grpc": "http2",
    "grpc-web": "http",
    "tcp": "tcp",
    "tls": "tcp",
    "https": "tcp",
    "mongo": "tcp",
    "mysql": "tcp",
    "redis": "tcp",
}

# Istio's default retry policy for HTTP (a route's `retry` replaces it): two retries, on a
# failed connection or a 503, 25 ms apart (Envoy's base interval).
DEFAULT_RETRY = {"attempts": 2, "codes": [503], "backoff": 0.025}

_DURATION_PART = re.compile(r"([0-9]+)(h|ms|m|s)")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def seconds(duration: str | None) -> float | None:
    """A Gateway API duration (``1m30s``, validated when loaded) in seconds; ``0s`` is 0."""
    if duration is None:
        return None
    return sum(int(n) * _UNIT_SECONDS[unit] for n, unit in _DURATION_PART.findall(duration))


def port_protocol(service: Service, port: int) -> str:
    return PROTOCOLS.get(service.app_protocols.get(port, ""), "detect")


class _Compiler:
    def __init__(self, mesh: Mesh, waypoint: str) -> None:
        self.mesh = mesh
        self.waypoint = waypoint
        self.endpoints: list[dict[str, Any]] = []
        self._endpoint_index: dict[str, int] = {}
        self._services = {(s.namespace, s.name): s for s in mesh.services}

    def endpoint(self, workload: Workload) -> int:
        index = self._endpoint_index.get(workload.uid)
        if index is None:
            ip = workload.ips[0]
            hbone = f"[{ip}]:{HBONE_PORT}" if ip.version == 6 else f"{ip}:{HBONE_PORT}"
            self.endpoints.append(
                {
                    "name": workload.key,
                    "ip": str(ip),
                    "hbone": hbone if workload.in_mesh else None,
                    "identity": str(workload.identity),
                }
            )
            index = self._endpoint_index[workload.uid] = len(self.endpoints) - 1
        return index

    def backend(self, namespace: str, name: str, port: int | None, weight: int) -> dict[str, Any]:
        out: dict[str, Any] = {
            "service": f"{namespace}/{name}",
            "weight": weight,
            "endpoints": [],
            "invalid": None,
            "protocol": "http",
        }
        service = self._services.get((namespace, name))
        if service is None:
            out["invalid"] = "no such Service in the mesh"
        elif port is None:
            out["invalid"] = "a Service backend needs a port"
        elif port not in service.ports:
            out["invalid"] = f"the Service has no port {port}"
        else:
            protocol = port_protocol(service, port)
            out["protocol"] = "http2" if protocol == "http2" else "http"
            for workload, endpoint in self.mesh.endpoints_of(service):
                target = endpoint.ports.get(port)
                if target is None or not workload.ips:
                    continue
                if workload.status is not HealthStatus.HEALTHY:
                    continue
                out["endpoints"].append((self.endpoint(workload), target))
        return out

    def rule(self, route: HttpRoute, index: int) -> dict[str, Any]:
        rule = route.rules[index]
        out: dict[str, Any] = {
            "route": f"{route.namespace}/{route.name}#{index}",
            "backends": [self.backend_of(b) for b in rule.backends],
            "request_headers": None,
            "response_headers": None,
            "redirect": None,
            "rewrite": None,
            "request_timeout": seconds(rule.timeouts.request) if rule.timeouts else None,
            "backend_timeout": seconds(rule.timeouts.backendRequest) if rule.timeouts else None,
            "retry": _retry(rule.retry),
            "mirrors": [],
        }
        for f in rule.filters:
            if f.requestHeaderModifier is not None:
                out["request_headers"] = _modifier(f.requestHeaderModifier)
            elif f.responseHeaderModifier is not None:
                out["response_headers"] = _modifier(f.responseHeaderModifier)
            elif f.requestRedirect is not None:
                r = f.requestRedirect
                out["redirect"] = {
                    "scheme": r.scheme,
                    "hostname": r.hostname,
                    "path": _path_modifier(r.path),
                    "port": r.port,
                    "status": r.statusCode,
                }
            elif f.urlRewrite is not None:
                out["rewrite"] = {
                    "hostname": f.urlRewrite.hostname,
                    "path": _path_modifier(f.urlRewrite.path),
                }
            elif f.requestMirror is not None:
                out["mirrors"].append(self.mirror(f.requestMirror, route.namespace))
        return out

    def mirror(self, m: k8s.HTTPRequestMirrorFilter, namespace: str) -> dict[str, Any]:
        ref = m.backendRef
        if m.fraction is not None:
            percent = 100.0 * m.fraction.numerator / m.fraction.denominator
        else:
            percent = float(100 if m.percent is None else m.percent)
        backend = self.backend(ref.namespace or namespace, ref.name, ref.port, 1)
        return {"backend": backend, "percent": percent}

    def backend_of(self, b: Backend) -> dict[str, Any]:
        return self.backend(b.namespace, b.name, b.port, b.weight)

    def port(self, service: Service, port: int, routes: Sequence[HttpRoute]) -> dict[str, Any]:
        attached = [
            r
            for r in routes
            if any(
                p.name == service.name
                and p.namespace == service.namespace
                and p.port in (None, port)
                for p in r.parents
            )
        ]
        candidates = sorted(
            (
                (precedence(route, r, i), route, r, i)
                for route in attached
                for r, rule in enumerate(route.rules)
                for i in range(len(rule.matches))
            ),
            key=lambda c: c[0],
        )
        rules: list[dict[str, Any]] = []
        rule_index: dict[tuple[int, int], int] = {}
        matches = []
        for _, route, r, i in candidates:
            key = (id(route), r)
            if key not in rule_index:
                rule_index[key] = len(rules)
                rules.append(self.rule(route, r))
            m = route.rules[r].matches[i]
            matches.append(
                {
                    "only_namespace": None
                    if route.namespace == service.namespace
                    else route.namespace,
                    "path_kind": m.path.kind,
                    "path": m.path.value,
                    "headers": [
                        {"name": h.name, "value": h.value, "regex": h.pattern is not None}
                        for h in m.headers
                    ],
                    "query": [
                        {"name": q.name, "value": q.value, "regex": q.pattern is not None}
                        for q in m.query
                    ],
                    "method": m.method,
                    "rule": rule_index[key],
                }
            )
        default = {
            "route": f"{service.namespace}/{service.name} (the Service itself)",
            "backends": [self.backend(service.namespace, service.name, port, 1)],
            "retry": DEFAULT_RETRY,
        }
        return {
            "protocol": port_protocol(service, port),
            "matches": matches,
            "rules": rules,
            "producer_routes": any(r.namespace == service.namespace for r in attached),
            "consumer_namespaces": sorted(
                {r.namespace for r in attached if r.namespace != service.namespace}
            ),
            "default": default,
        }


def _retry(retry: k8s.HTTPRouteRetry | None) -> dict[str, Any]:
    if retry is None:
        return DEFAULT_RETRY
    return {
        "attempts": DEFAULT_RETRY["attempts"] if retry.attempts is None else retry.attempts,
        "codes": list(retry.codes),
        "backoff": DEFAULT_RETRY["backoff"] if retry.backoff is None else seconds(retry.backoff),
    }


def _modifier(m: k8s.HTTPHeaderFilter) -> dict[str, Any]:
    return {
        "set": [(h.name, h.value) for h in m.set],
        "add": [(h.name, h.value) for h in m.add],
        "remove": list(m.remove),
    }


def _path_modifier(m: k8s.HTTPPathModifier | None) -> dict[str, Any] | None:
    if m is None:
        return None
    value = m.replaceFullPath if m.type == "ReplaceFullPath" else m.replacePrefixMatch
    return {"type": m.type, "value": value}


def bound_services(mesh: Mesh, waypoint: str) -> Iterable[Service]:
    return (s for s in mesh.services if s.waypoint == waypoint)


def bound_workloads(mesh: Mesh, waypoint: str) -> Iterable[Workload]:
    return (w for w in mesh.workloads if w.waypoint == waypoint)


def compile_table(
    mesh: Mesh,
    waypoint: str,
    *,
    trusted_proxies: int = 0,
    jwks: authn.JwksCache | None = None,
    filters: plugins.PluginHost | None = None,
) -> dict[str, Any]:
    """The table of waypoint ``namespace/name`` in ``mesh`` (a JSON-ready dict).
    ``trusted_proxies``: hops of ``x-forwarded-for`` trusted for ``remote.ip``; ``jwks``: where
    remote JWT key sets come from (None: a rule with a ``jwksUri`` refuses its tokens);
    ``filters``: the loaded Python filters (whether each reads responses or bodies)."""
    c = _Compiler(mesh, waypoint)
    targets: dict[str, dict[str, Any]] = {}
    services = []
    policies = _Policies(mesh, waypoint)
    filter_json = plugins.PluginsJson()
    for service in bound_services(mesh, waypoint):
        ports = {str(port): c.port(service, port, mesh.http_routes) for port in service.ports}
        name = f"{service.namespace}/{service.name}"
        services.append(
            {
                "name": name,
                "ports": ports,
                "policies": policies.of(name),
                "jwt_rules": _jwt_rules(mesh, waypoint, name, jwks),
                "plugins": plugins.plugins_of(mesh.plugins, waypoint, name, filter_json, filters),
                "access_log": _access_log(mesh, waypoint, name),
            }
        )
        for _, vip in service.vips:
            targets[str(vip)] = {"kind": "service", "service": len(services) - 1}
    for workload in bound_workloads(mesh, waypoint):
        for ip in workload.ips:
            targets[str(ip)] = {"kind": "workload", "endpoint": c.endpoint(workload)}
    return {
        "targets": targets,
        "services": services,
        "endpoints": c.endpoints,
        "workload_policies": policies.of(None),
        "workload_jwt_rules": _jwt_rules(mesh, waypoint, None, jwks),
        "workload_plugins": plugins.plugins_of(mesh.plugins, waypoint, None, filter_json, filters),
        "workload_access_log": _access_log(mesh, waypoint, None),
        "plugins": filter_json.compiled,
        "policies": policies.compiled,
        "providers": _providers(c, mesh, policies.compiled),
        "trusted_proxies": trusted_proxies,
    }


def _access_log(mesh: Mesh, waypoint: str, service: str | None) -> dict[str, Any] | None:
    rule = telemetry_api.access_log_for(mesh.telemetry, waypoint, service)
    return None if rule is None else rule.json()


def _providers(
    c: _Compiler, mesh: Mesh, policies: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The ext_authz providers the CUSTOM policies here name, each with its Service as a
    backend (invalid when the mesh has no such Service or port)."""
    named = {p["provider"] for p in policies if p.get("provider")}
    out = []
    for provider in mesh.ext_authz:
        if provider.name not in named:
            continue
        service = provider.resolve(mesh.services)
        if service is None:
            backend = c.backend("", provider.service, None, 1)
            backend["invalid"] = "no such Service in the mesh"
        else:
            backend = c.backend(service.namespace, service.name, provider.port, 1)
        out.append(extauthz.provider_json(provider, backend))
    return out


def _jwt_rules(
    mesh: Mesh, waypoint: str, service: str | None, jwks: authn.JwksCache | None
) -> list[dict[str, Any]]:
    applying = (a for a in mesh.request_authentications if authz.applies(a, waypoint, service))
    return authn.rules_json(applying, jwks)


class _Policies:
    """The AuthorizationPolicies that apply at this waypoint, each compiled once; a Service (or
    traffic to pods) refers to its own by index, in the mesh's order."""

    def __init__(self, mesh: Mesh, waypoint: str) -> None:
        self.mesh = mesh
        self.waypoint = waypoint
        self.compiled: list[dict[str, Any]] = []
        self._index: dict[str, int] = {}

    def of(self, service: str | None) -> list[int]:
        out = []
        for p in self.mesh.waypoint_policies:
            if not authz.applies(p, self.waypoint, service):
                continue
            if p.key not in self._index:
                self._index[p.key] = len(self.compiled)
                self.compiled.append(authz.policy_json(p))
            out.append(self._index[p.key])
        return out


def table_json(
    mesh: Mesh,
    waypoint: str,
    *,
    trusted_proxies: int = 0,
    jwks: authn.JwksCache | None = None,
    filters: plugins.PluginHost | None = None,
) -> str:
    table = compile_table(
        mesh, waypoint, trusted_proxies=trusted_proxies, jwks=jwks, filters=filters
    )
    return orjson.dumps(table).decode()


def explain_route(
    mesh: Mesh,
    waypoint: str,
    target: str,
    method: str,
    path: str,
    headers: list[tuple[str, str]],
    client_namespace: str,
) -> str:
    """What waypoint ``waypoint`` does with ``method path`` sent to ``target`` (``ip:port``) by a
    client in ``client_namespace``, in words: the rule the core's table takes (the same matcher
    the waypoint runs per request) and where its backends are."""
    from .._core import WaypointTable  # the compiled matcher; config tools need no core otherwise

    compiled = compile_table(mesh, waypoint)
    table = WaypointTable(orjson.dumps(compiled).decode())
    ip, _, _ = target.rpartition(":")
    found = compiled["targets"].get(ip.strip("[]"))
    if found is None:
        return f"refused with 421: {target} is not bound to waypoint {waypoint}"
    if found["kind"] == "workload":
        endpoint = compiled["endpoints"][found["endpoint"]]
        return f"{method} {path}: to pod {endpoint['name']} itself (direct to a pod: no routing)"
    route_path, _, query = path.partition("?")
    try:
        name = table.route(target, method, route_path, query or None, headers, client_namespace)
    except ValueError as e:
        return f"refused with 421: {e}"
    if name is None:
        return f"{method} {path}: 404, no rule of the routes attached to the Service matches"
    service = compiled["services"][found["service"]]
    port = service["ports"][target.rpartition(":")[2]]
    rule = next(r for r in [*port["rules"], port["default"]] if r["route"] == name)
    if rule.get("redirect"):
        return (
            f"{method} {path}: takes {name}, answered with a {rule['redirect']['status']} redirect"
        )
    backends = []
    for b in rule["backends"]:
        pods = sorted({compiled["endpoints"][i]["name"] for i, _ in b["endpoints"]})
        if b["invalid"]:
            state = f"invalid: {b['invalid']} (500)"
        else:
            state = ", ".join(pods) if pods else "no ready endpoint (503)"
        backends.append(f"{b['service']} weight {b['weight']}: {state}")
    return f"{method} {path}: takes {name} -> " + "; ".join(backends or ["no backend (500)"])


def explain_authorization(
    mesh: Mesh,
    waypoint: str,
    target: str,
    request: authz.Request,
    raw_path: str,
    jwt: str | None = None,
) -> tuple[authz.Decision, list[tuple[str, str]]]:
    """What waypoint ``waypoint``'s AuthorizationPolicies decide on ``request`` sent to ``target``
    (``ip:port``): the decision of the core's check (the one the waypoint runs per request),
    and each applying policy's own verdict from the reference, for ``ambient explain``. ``jwt``:
    a token the request carries, checked first by the core's RequestAuthentication check
    (remote key sets are not fetched here: their tokens are refused)."""
    from .._core import WaypointTable  # the compiled matcher; config tools need no core otherwise

    compiled = compile_table(mesh, waypoint)
    ip = target.rpartition(":")[0].strip("[]")
    found = compiled["targets"].get(ip)
    if found is None:
        return authz.Decision(True, "not bound to this waypoint"), []
    service = compiled["services"][found["service"]]["name"] if found["kind"] == "service" else None
    table = WaypointTable(orjson.dumps(compiled).decode())
    if jwt is not None:
        headers = [("authorization", f"Bearer {jwt}")]
        refused, found = table.authenticate(target, headers, raw_path or "/")
        if refused is not None:
            return authz.Decision(False, f"401: the JWT is refused: {refused}"), []
        if found is not None:
            principal, audiences, presenter, claims = found
            verified = authz.RequestAuth(
                principal, tuple(audiences), presenter, orjson.loads(claims)
            )
            request = dataclasses.replace(request, auth=verified)
    policies = [p for p in mesh.waypoint_policies if authz.applies(p, waypoint, service)]
    if not policies:
        return authz.Decision(True, "no AuthorizationPolicy applies at the waypoint"), []
    auth = request.auth
    allowed, policy, _ = table.authorize(
        target,
        request.method,
        raw_path,
        host=request.host,
        headers=[(k, v) for k, vs in request.headers.items() for v in vs],
        source_principal=request.source_principal,
        source_ip=str(request.source_ip),
        auth=None
        if auth is None
        else (
            auth.principal,
            list(auth.audiences),
            auth.presenter,
            orjson.dumps(auth.claims).decode(),
        ),
    )
    verdicts = []
    for p in policies:
        kind = f"{p.action}{' (dry-run)' if p.dry_run else ''}"
        matches = authz.policy_matches(p, request)
        verdict = f"{kind}: {'matches' if matches else 'does not match'}"
        if p.provider is not None and matches:
            # What the external authorizer answers is known only when it is asked.
            verdict += f" (the waypoint asks ext_authz provider {p.provider} first)"
        verdicts.append((p.key, verdict))
    if allowed:
        why = f"allowed by policy {policy}" if policy else "no ALLOW policy applies"
    else:
        why = f"denied by policy {policy}" if policy else "no ALLOW policy matched"
    return authz.Decision(allowed, why, policy), verdicts
