"""L7 authorization at a waypoint, as Istio's waypoint enforces ``AuthorizationPolicy``: the
readable reference the core's per-request check is held to (a differential test compares them),
and the compilation of policies into the waypoint's table.

Which policies: those whose ``targetRefs`` (or ``targetRef``) name this waypoint's Gateway (every
request it takes), a Service (requests sent to that Service), or the ``istio-waypoint``
GatewayClass from the root namespace (every waypoint). A targetRef names an object of the
policy's own namespace. Selector and namespace-wide policies are ztunnel's; the waypoint ignores
them, as ztunnel ignores these.

Order (Istio's): a matching DENY denies; else, when no ALLOW policy applies, the request is
allowed; else a matching ALLOW allows; else it is denied. AUDIT policies and dry-run ones
(``istio.io/dry-run: "true"``) are evaluated only to be logged. A denied request is answered
``403`` with the body ``RBAC: access denied``.

Matching: a policy's rules OR; a rule is its ``from`` (any source), its ``to`` (any operation)
and each ``when`` condition, all of which must hold (an absent part holds); in a source or an
operation the fields AND and their values OR; a ``not…`` field holds when none of its values
match. A source or operation with no field never matches, a rule with no part always does, a
policy with no rule never does (so ``spec: {}`` as the only ALLOW denies everything).

Values: strings match exactly, by prefix ``x*``, by suffix ``*x``, or ``*`` for any value
present; ``hosts`` ignore case, and a host written without a port matches any port; ``paths``
are matched on the normalized path without its query, and may be templates (``{*}`` one
segment, ``{**}`` any remainder, last); IPs and blocks in CIDR; ports as numbers. An attribute
the request does not have (no JWT: no request principal, no claims; a header not sent) matches
no value and so passes every ``not…`` field.

``remote.ip`` / ``remoteIpBlocks``: the client as the ``x-forwarded-for`` header names it,
counting ``trusted_proxies`` addresses from its right (Envoy's ``xff_num_trusted_hops``);
with no trusted proxy, or fewer addresses than that, it is the source IP.

Paths are normalized before authorization and routing, and the normalized path is the one sent
upstream (Istio's ``pathNormalization`` ``MERGE_SLASHES``): percent-encoded unreserved characters
(``A-Z a-z 0-9 - . _ ~``) decoded, runs of ``/`` merged, ``.`` and ``..`` segments removed
(RFC 3986 5.2.4); ``%2F`` and other reserved encodings are left as they are. This closes
``/admin/../admin``, ``//admin`` and ``/%61dmin`` bypasses of a rule on ``/admin``.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..config import kubernetes as k8s

ROOT_NAMESPACE = "istio-system"
DRY_RUN_ANNOTATION = "istio.io/dry-run"
WAYPOINT_CLASS = "istio-waypoint"
DENIED_BODY = "RBAC: access denied"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# The attributes a test reads, and how its values are written.
STRING, HOST, PATH, IP, PORT = "string", "host", "path", "ip", "port"
ATTRIBUTES = {
    "source.principal": STRING,
    "source.namespace": STRING,
    "source.service_account": STRING,
    "source.ip": IP,
    "remote.ip": IP,
    "request.auth.principal": STRING,
    "request.auth.audiences": STRING,
    "request.auth.presenter": STRING,
    "request.auth.claims": STRING,
    "request.headers": STRING,
    "request.host": HOST,
    "request.method": STRING,
    "request.path": PATH,
    "destination.ip": IP,
    "destination.port": PORT,
    "connection.sni": STRING,
}
# `when` keys → attributes; `request.headers[...]` and `request.auth.claims[...]` take a key.
CONDITION_KEYS = {
    "source.ip": "source.ip",
    "remote.ip": "remote.ip",
    "source.namespace": "source.namespace",
    "source.principal": "source.principal",
    "request.auth.principal": "request.auth.principal",
    "request.auth.audiences": "request.auth.audiences",
    "request.auth.presenter": "request.auth.presenter",
    "destination.ip": "destination.ip",
    "destination.port": "destination.port",
    "connection.sni": "connection.sni",
}
_KEYED = re.compile(r"^(request\.headers|request\.auth\.claims)((?:\[[^\[\]]+\])+)$")


class AuthzError(ValueError):
    """A policy the waypoint cannot enforce as written; ``field`` names where."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Check:
    """One attribute against values (any matches) and not-values (none may match)."""

    attribute: str
    values: tuple[str, ...] = ()
    not_values: tuple[str, ...] = ()
    # A header name (lower case), or the path of a claim (`[a][b]` → ("a", "b")).
    key: tuple[str, ...] = ()


Match = tuple[Check, ...]  # all hold
Clause = tuple[Match, ...]  # any holds
Rule = tuple[Clause, ...]  # all hold


@dataclass(frozen=True)
class Target:
    kind: str  # Gateway | Service | GatewayClass
    namespace: str
    name: str


@dataclass(frozen=True)
class WaypointPolicy:
    namespace: str
    name: str
    action: str  # ALLOW | DENY | AUDIT | CUSTOM
    targets: tuple[Target, ...]
    rules: tuple[Rule, ...] = ()
    dry_run: bool = False
    provider: str | None = None  # CUSTOM: the mesh config's ext_authz provider

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class RequestAuth:
    """What a verified JWT says (RequestAuthentication); no token, no RequestAuth."""

    principal: str  # iss/sub
    audiences: tuple[str, ...] = ()
    presenter: str = ""  # azp
    claims: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Request:
    """A request as authorization sees it; ``path`` normalized, without its query."""

    method: str
    host: str
    path: str
    headers: Mapping[str, Sequence[str]]  # names in lower case
    source_principal: str  # without spiffe://
    source_ip: IPAddress
    destination_ip: IPAddress
    destination_port: int
    remote_ip: IPAddress | None = None  # None: the source IP
    auth: RequestAuth | None = None

    @property
    def source_namespace(self) -> str:
        _, _, rest = self.source_principal.partition("/ns/")
        return rest.split("/", 1)[0] if rest else ""

    @property
    def source_service_account(self) -> str:
        _, _, rest = self.source_principal.partition("/ns/")
        namespace, _, account = rest.partition("/sa/")
        return f"{namespace}/{account}" if rest and account else ""


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str
    policy: str | None = None  # namespace/name of the deciding policy
    logged: tuple[str, ...] = ()  # what AUDIT and dry-run policies matched


# --- compiling an AuthorizationPolicy --------------------------------------------------------


def targets_of(
    resource: k8s.AuthorizationPolicy | k8s.RequestAuthentication | k8s.WasmPlugin | k8s.Telemetry,
) -> tuple[Target, ...]:
    spec, namespace = resource.spec, resource.metadata.namespace
    refs = list(spec.targetRefs) + ([spec.targetRef] if spec.targetRef else [])
    out = []
    for i, ref in enumerate(refs):
        where = f"spec.targetRefs[{i}]"
        if ref.namespace not in (None, "", namespace):
            raise AuthzError(
                f"{where}.namespace",
                f"a targetRef names an object of the policy's namespace {namespace!r}, "
                f"not {ref.namespace!r}",
            )
        if ref.kind == "Gateway" and ref.group in ("", "gateway.networking.k8s.io"):
            out.append(Target("Gateway", namespace, ref.name))
        elif ref.kind == "Service" and ref.group in ("", "core"):
            out.append(Target("Service", namespace, ref.name))
        elif ref.kind == "GatewayClass" and ref.group in ("", "gateway.networking.k8s.io"):
            if namespace != ROOT_NAMESPACE or ref.name != WAYPOINT_CLASS:
                raise AuthzError(
                    where,
                    f"a GatewayClass target must be {WAYPOINT_CLASS!r}, from the root "
                    f"namespace {ROOT_NAMESPACE!r}",
                )
            out.append(Target("GatewayClass", namespace, ref.name))
        else:
            raise AuthzError(
                f"{where}.kind",
                f"expected a Gateway, a Service or the {WAYPOINT_CLASS} GatewayClass, got "
                f"{ref.group or 'core'}/{ref.kind}",
            )
    return tuple(out)


def _check_values(attribute: str, values: Sequence[str], where: str) -> tuple[str, ...]:
    kind = ATTRIBUTES[attribute]
    for i, v in enumerate(values):
        at = f"{where}[{i}]"
        if kind == IP:
            try:
                ipaddress.ip_network(v, strict=False)
            except ValueError:
                raise AuthzError(at, f"expected an IP address or CIDR block, got {v!r}") from None
        elif kind == PORT:
            if not v.isdigit() or not 0 < int(v) < 65536:
                raise AuthzError(at, f"expected a port number 1-65535, got {v!r}")
        elif kind == PATH and ("{" in v or "}" in v):
            _template(v, at)
        elif v == "":
            raise AuthzError(at, "an empty value matches nothing; use '*' for any value")
    return tuple(values)


def _test(
    attribute: str,
    values: Sequence[str],
    not_values: Sequence[str],
    where: tuple[str, str],
    key: tuple[str, ...] = (),
) -> Check | None:
    if not values and not not_values:
        return None
    if attribute == "source.principal":
        # Policies name principals without "spiffe://"; tolerate it being written anyway.
        values = [v.removeprefix("spiffe://") for v in values]
        not_values = [v.removeprefix("spiffe://") for v in not_values]
    return Check(
        attribute,
        _check_values(attribute, values, where[0]),
        _check_values(attribute, not_values, where[1]),
        key,
    )


def _service_accounts(items: Sequence[str], namespace: str) -> list[str]:
    return [s if "/" in s else f"{namespace}/{s}" for s in items]


def _source(src: k8s.Source, namespace: str, where: str) -> Match:
    fields = (
        ("source.principal", src.principals, src.notPrincipals, "principals"),
        ("request.auth.principal", src.requestPrincipals, src.notRequestPrincipals,
         "requestPrincipals"),
        ("source.namespace", src.namespaces, src.notNamespaces, "namespaces"),
        ("source.service_account", _service_accounts(src.serviceAccounts, namespace),
         _service_accounts(src.notServiceAccounts, namespace), "serviceAccounts"),
        ("source.ip", src.ipBlocks, src.notIpBlocks, "ipBlocks"),
        ("remote.ip", src.remoteIpBlocks, src.notRemoteIpBlocks, "remoteIpBlocks"),
    )  # fmt: skip
    return _checks(fields, where)


def _checks(fields: Sequence[tuple[str, Sequence[str], Sequence[str], str]], where: str) -> Match:
    """A source's or an operation's fields (attribute, values, not-values, field name) as the
    checks of one match; a field given neither values nor not-values is no check."""
    tests = []
    for attribute, values, not_values, name in fields:
        not_name = "not" + name[0].upper() + name[1:]
        t = _test(attribute, values, not_values, (f"{where}.{name}", f"{where}.{not_name}"))
        if t is not None:
            tests.append(t)
    return tuple(tests)


def _operation(op: k8s.Operation, where: str) -> Match:
    fields = (
        ("request.host", op.hosts, op.notHosts, "hosts"),
        ("destination.port", op.ports, op.notPorts, "ports"),
        ("request.method", op.methods, op.notMethods, "methods"),
        ("request.path", op.paths, op.notPaths, "paths"),
    )
    return _checks(fields, where)


def _condition(cond: k8s.Condition, where: str) -> Check:
    keyed = _KEYED.match(cond.key)
    if keyed:
        attribute = keyed.group(1)
        key = tuple(re.findall(r"\[([^\[\]]+)\]", keyed.group(2)))
        if attribute == "request.headers":
            if len(key) != 1:
                raise AuthzError(f"{where}.key", f"expected request.headers[name], got {cond.key}")
            key = (key[0].lower(),)
    elif cond.key in CONDITION_KEYS:
        attribute, key = CONDITION_KEYS[cond.key], ()
    else:
        raise AuthzError(f"{where}.key", f"unknown condition key {cond.key!r}")
    if not cond.values and not cond.notValues:
        raise AuthzError(where, "a condition needs values or notValues")
    test = _test(
        attribute, cond.values, cond.notValues, (f"{where}.values", f"{where}.notValues"), key
    )
    assert test is not None
    return test


def _rule(rule: k8s.Rule, namespace: str, where: str) -> Rule:
    clauses: list[Clause] = []
    if rule.from_:
        clauses.append(
            tuple(
                _source(f.source, namespace, f"{where}.from[{i}].source")
                for i, f in enumerate(rule.from_)
            )
        )
    if rule.to:
        clauses.append(
            tuple(
                _operation(t.operation, f"{where}.to[{i}].operation") for i, t in enumerate(rule.to)
            )
        )
    for i, cond in enumerate(rule.when):
        clauses.append(((_condition(cond, f"{where}.when[{i}]"),),))
    return tuple(clauses)


def compile_policy(resource: k8s.AuthorizationPolicy) -> WaypointPolicy:
    """An AuthorizationPolicy with targetRefs, as the waypoint enforces it; :class:`AuthzError`
    names the field it cannot take."""
    meta, spec = resource.metadata, resource.spec
    provider = None
    if spec.action == "CUSTOM":
        name = (spec.provider or {}).get("name")
        if not isinstance(name, str) or not name:
            raise AuthzError(
                "spec.provider.name",
                "a CUSTOM policy names its external authorizer: an extensionProviders entry of "
                "the mesh config",
            )
        provider = name
    elif spec.provider is not None:
        raise AuthzError("spec.provider", "only a CUSTOM policy names a provider")
    return WaypointPolicy(
        provider=provider,
        namespace=meta.namespace,
        name=meta.name,
        action=spec.action,
        targets=targets_of(resource),
        rules=tuple(_rule(r, meta.namespace, f"spec.rules[{i}]") for i, r in enumerate(spec.rules)),
        dry_run=meta.annotations.get(DRY_RUN_ANNOTATION, "").lower() == "true",
    )


# --- which policies apply --------------------------------------------------------------------


class Targeted(Protocol):
    @property
    def targets(self) -> tuple[Target, ...]: ...


def applies(policy: Targeted, waypoint: str, service: str | None) -> bool:
    """Does ``policy`` (an AuthorizationPolicy or a RequestAuthentication) apply at waypoint
    ``namespace/name`` to a request for ``service`` (``namespace/name``; None for traffic sent
    to a pod)?"""
    for t in policy.targets:
        if t.kind == "GatewayClass":
            return True
        if t.kind == "Gateway" and f"{t.namespace}/{t.name}" == waypoint:
            return True
        if t.kind == "Service" and f"{t.namespace}/{t.name}" == service:
            return True
    return False


# --- paths -----------------------------------------------------------------------------------

_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def normalize_path(path: str) -> str:
    """``path`` (without its query) as MERGE_SLASHES normalizes it; see the module's doc."""
    decoded = []
    i = 0
    while i < len(path):
        c = path[i]
        if c == "%" and _is_hex(path[i + 1 : i + 3]):
            char = chr(int(path[i + 1 : i + 3], 16))
            if char in _UNRESERVED:
                decoded.append(char)
                i += 3
                continue
        decoded.append(c)
        i += 1
    merged = re.sub(r"/{2,}", "/", "".join(decoded))
    return _remove_dot_segments(merged)


def _is_hex(text: str) -> bool:
    return len(text) == 2 and all(c in "0123456789abcdefABCDEF" for c in text)


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 5.2.4, over a path whose slashes are already merged."""
    absolute = path.startswith("/")
    segments = path.split("/")[1:] if absolute else path.split("/")
    out: list[str] = []
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        if seg == ".":
            if last:
                out.append("")
        elif seg == "..":
            if out:
                out.pop()
            if last:
                out.append("")
        else:
            out.append(seg)
    return ("/" if absolute else "") + "/".join(out)


def _template(value: str, where: str) -> re.Pattern[str]:
    """A path template (``/a/{*}/b/{**}``) as a regular expression on the whole path."""
    parts = re.split(r"(\{\*\*\}|\{\*\})", value)
    if any(("{" in p or "}" in p or "*" in p) for p in parts[::2]):
        raise AuthzError(
            where,
            f"{value!r}: a path template may hold only the operators {{*}} and {{**}}, each a "
            "whole path segment, and no other '*', '{' or '}'",
        )
    operators = parts[1::2]
    if "{**}" in operators[:-1]:
        raise AuthzError(where, f"{value!r}: {{**}} must be the template's last operator")
    out = []
    for p in parts:
        if p == "{*}":
            out.append("[^/]+")
        elif p == "{**}":
            out.append(".*")
        else:
            out.append(re.escape(p))
    return re.compile("".join(out))


# --- matching --------------------------------------------------------------------------------


def string_matches(pattern: str, value: str) -> bool:
    if pattern == "*":
        return True
    if pattern.endswith("*"):
        return value.startswith(pattern[:-1])
    if pattern.startswith("*"):
        return value.endswith(pattern[1:])
    return value == pattern


def _host_matches(pattern: str, host: str) -> bool:
    pattern, host = pattern.lower(), host.lower()
    if string_matches(pattern, host):
        return True
    # A host written without a port matches the request's host on any port.
    name, sep, port = host.rpartition(":")
    return bool(sep) and port.isdigit() and ":" not in pattern and string_matches(pattern, name)


def _path_matches(pattern: str, path: str) -> bool:
    if "{" in pattern:
        return _template(pattern, "").fullmatch(path) is not None
    return string_matches(pattern, path)


def _value_matches(kind: str, pattern: str, value: Any) -> bool:
    if kind == IP:
        return bool(value in ipaddress.ip_network(pattern, strict=False))
    if kind == PORT:
        return bool(int(pattern) == value)
    if kind == HOST:
        return _host_matches(pattern, value)
    if kind == PATH:
        return _path_matches(pattern, value)
    return string_matches(pattern, value)


def _claim(claims: Mapping[str, Any], key: Sequence[str]) -> list[str]:
    """A claim's values as strings: a list claim gives each element, a nested one walks `key`."""
    value: Any = claims
    for k in key:
        if not isinstance(value, Mapping) or k not in value:
            return []
        value = value[k]
    items = value if isinstance(value, list) else [value]
    return [_claim_text(v) for v in items if v is not None and not isinstance(v, (Mapping, list))]


def _claim_text(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def actual(test: Check, request: Request) -> list[Any]:
    """The request's values of ``test.attribute`` (none: the attribute is absent)."""
    a = test.attribute
    auth = request.auth
    if a == "source.principal":
        return [request.source_principal] if request.source_principal else []
    if a == "source.namespace":
        return [request.source_namespace] if request.source_namespace else []
    if a == "source.service_account":
        account = request.source_service_account
        return [account] if account else []
    if a == "source.ip":
        return [request.source_ip]
    if a == "remote.ip":
        return [request.remote_ip or request.source_ip]
    if a == "request.auth.principal":
        return [auth.principal] if auth else []
    if a == "request.auth.audiences":
        return list(auth.audiences) if auth else []
    if a == "request.auth.presenter":
        return [auth.presenter] if auth and auth.presenter else []
    if a == "request.auth.claims":
        return _claim(auth.claims, test.key) if auth else []
    if a == "request.headers":
        return list(request.headers.get(test.key[0], ()))
    if a == "request.host":
        return [request.host] if request.host else []
    if a == "request.method":
        return [request.method]
    if a == "request.path":
        return [request.path]
    if a == "destination.ip":
        return [request.destination_ip]
    if a == "destination.port":
        return [request.destination_port]
    return []  # connection.sni: the waypoint sees no inner TLS


def check_holds(test: Check, request: Request) -> bool:
    kind = ATTRIBUTES[test.attribute]
    values = actual(test, request)
    if test.values and not any(_value_matches(kind, p, v) for p in test.values for v in values):
        return False
    return not any(_value_matches(kind, p, v) for p in test.not_values for v in values)


def match_holds(match: Match, request: Request) -> bool:
    return bool(match) and all(check_holds(t, request) for t in match)


def rule_matches(rule: Rule, request: Request) -> bool:
    return all(any(match_holds(m, request) for m in clause) for clause in rule)


def policy_matches(policy: WaypointPolicy, request: Request) -> bool:
    return any(rule_matches(r, request) for r in policy.rules)


def evaluate(policies: Sequence[WaypointPolicy], request: Request) -> Decision:
    """Istio's order over the policies that apply to ``request`` (see :func:`applies`)."""
    logged = tuple(
        f"{'dry-run' if p.dry_run else 'audit'} {p.action} policy {p.key} matched"
        for p in policies
        if (p.dry_run or p.action == "AUDIT") and policy_matches(p, request)
    )
    # CUSTOM policies ask their provider before these run (see ambient.waypoint.extauthz).
    enforced = [p for p in policies if not p.dry_run and p.action not in ("AUDIT", "CUSTOM")]
    for p in enforced:
        if p.action == "DENY" and policy_matches(p, request):
            return Decision(False, f"denied by policy {p.key}", p.key, logged)
    allows = [p for p in enforced if p.action == "ALLOW"]
    if not allows:
        return Decision(True, "no ALLOW policy applies", None, logged)
    for p in allows:
        if policy_matches(p, request):
            return Decision(True, f"allowed by policy {p.key}", p.key, logged)
    return Decision(False, "no ALLOW policy matched", None, logged)


def remote_ip(forwarded_for: str | None, source_ip: IPAddress, trusted_proxies: int) -> IPAddress:
    """The client per ``x-forwarded-for`` with ``trusted_proxies`` trusted hops (see above)."""
    if trusted_proxies <= 0 or not forwarded_for:
        return source_ip
    hops = [h.strip() for h in forwarded_for.split(",")]
    if len(hops) < trusted_proxies:
        return source_ip
    try:
        return ipaddress.ip_address(hops[-trusted_proxies])
    except ValueError:
        return source_ip


# --- into the waypoint's table ---------------------------------------------------------------


def policy_json(policy: WaypointPolicy) -> dict[str, Any]:
    return {
        "key": policy.key,
        "action": policy.action,
        "provider": policy.provider,
        "dry_run": policy.dry_run,
        "rules": [
            [
                [
                    [
                        {
                            "attribute": t.attribute,
                            "key": list(t.key),
                            "values": list(t.values),
                            "not_values": list(t.not_values),
                        }
                        for t in match
                    ]
                    for match in clause
                ]
                for clause in rule
            ]
            for rule in policy.rules
        ],
    }
