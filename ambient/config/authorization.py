"""AuthorizationPolicy → the policy model ztunnel enforces at L4, as istiod converts it.

- Scope: ``selector.matchLabels`` selects pods of the policy's namespace; no selector applies to
  the whole namespace, or to the mesh when the namespace is the root namespace (``istio-system``);
  ``targetRefs`` policies are for waypoints, not ztunnel, and are skipped here.
- A rule becomes clauses that must all match: its ``from`` entries (any), its ``to`` entries (any),
  and one clause per ``when`` condition.
- L7 fields (request principals, hosts, methods, paths, headers...) cannot be seen at L4: an ALLOW
  rule using one never matches; a DENY (or AUDIT) rule keeps its L4 part, so it denies more, never
  less.
- Strings: ``exact``, ``prefix*``, ``*suffix``, ``*`` (any value present).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

from ..policy.model import (
    Action,
    Clause,
    Match,
    MatchKind,
    Policy,
    Rule,
    Scope,
    ServiceAccountMatch,
    StringMatch,
)
from . import kubernetes as k8s

ROOT_NAMESPACE = "istio-system"
DRY_RUN_ANNOTATION = "istio.io/dry-run"

# `when` keys ztunnel can evaluate, and the Match field each fills (the `not` twin for notValues).
L4_CONDITIONS = {
    "source.ip": "source_ips",
    "source.namespace": "namespaces",
    "source.principal": "principals",
    "destination.ip": "destination_ips",
    "destination.port": "destination_ports",
}
L7_CONDITION_PREFIXES = ("request.", "remote.ip", "connection.sni", "experimental.")


class PolicyError(ValueError):
    """A policy ambient cannot enforce as written; ``field`` names where."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass
class Converted:
    policy: Policy | None
    warnings: list[str] = field(default_factory=list)


def string_match(text: str) -> StringMatch:
    if text == "*":
        return StringMatch(MatchKind.PRESENCE)
    if text.endswith("*"):
        return StringMatch(MatchKind.PREFIX, text[:-1])
    if text.startswith("*"):
        return StringMatch(MatchKind.SUFFIX, text[1:])
    return StringMatch(MatchKind.EXACT, text)


def _network(text: str, where: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise PolicyError(where, f"expected an IP address or CIDR block, got {text!r}") from None


def _port(text: str, where: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise PolicyError(where, f"expected a port number 1-65535, got {text!r}")
    return int(text)


def _service_account(text: str, namespace: str) -> ServiceAccountMatch:
    ns, sep, sa = text.rpartition("/")
    return ServiceAccountMatch(ns if sep else namespace, sa)


def _source(src: k8s.Source, namespace: str, where: str) -> tuple[Match, bool]:
    """The L4 part of a source, and whether it had L7 fields."""
    l7 = bool(
        src.requestPrincipals
        or src.notRequestPrincipals
        or src.remoteIpBlocks
        or src.notRemoteIpBlocks
    )
    return Match(
        principals=tuple(map(string_match, src.principals)),
        not_principals=tuple(map(string_match, src.notPrincipals)),
        namespaces=tuple(map(string_match, src.namespaces)),
        not_namespaces=tuple(map(string_match, src.notNamespaces)),
        service_accounts=tuple(_service_account(s, namespace) for s in src.serviceAccounts),
        not_service_accounts=tuple(_service_account(s, namespace) for s in src.notServiceAccounts),
        source_ips=tuple(_network(b, f"{where}.ipBlocks") for b in src.ipBlocks),
        not_source_ips=tuple(_network(b, f"{where}.notIpBlocks") for b in src.notIpBlocks),
    ), l7


def _operation(op: k8s.Operation, where: str) -> tuple[Match, bool]:
    l7 = bool(op.hosts or op.notHosts or op.methods or op.notMethods or op.paths or op.notPaths)
    return Match(
        destination_ports=tuple(_port(p, f"{where}.ports") for p in op.ports),
        not_destination_ports=tuple(_port(p, f"{where}.notPorts") for p in op.notPorts),
    ), l7


def _condition(cond: k8s.Condition, where: str) -> tuple[Match | None, bool]:
    """A `when` condition as a match, or (None, True) when it is L7."""
    if cond.key.startswith(L7_CONDITION_PREFIXES):
        return None, True
    field_name = L4_CONDITIONS.get(cond.key)
    if field_name is None:
        raise PolicyError(f"{where}.key", f"unknown condition key {cond.key!r}")

    def values(items: list[str], suffix: str) -> tuple[object, ...]:
        if field_name in ("source_ips", "destination_ips"):
            return tuple(_network(v, f"{where}.{suffix}") for v in items)
        if field_name == "destination_ports":
            return tuple(_port(v, f"{where}.{suffix}") for v in items)
        return tuple(map(string_match, items))

    fields: dict[str, Any] = {
        field_name: values(cond.values, "values"),
        f"not_{field_name}": values(cond.notValues, "notValues"),
    }
    return Match(**fields), False


def _empty(match: Match) -> bool:
    return match == Match()


def _rule(rule: k8s.Rule, namespace: str, where: str) -> tuple[Rule, bool]:
    """A rule's clauses (L4 only), and whether L7 fields were dropped from it."""
    clauses: list[Clause] = []
    l7_any = False
    sources = []
    for i, entry in enumerate(rule.from_):
        match, l7 = _source(entry.source, namespace, f"{where}.from[{i}].source")
        l7_any |= l7
        if not _empty(match):
            sources.append(match)
    if sources:
        clauses.append(tuple(sources))
    operations = []
    for i, target in enumerate(rule.to):
        match, l7 = _operation(target.operation, f"{where}.to[{i}].operation")
        l7_any |= l7
        if not _empty(match):
            operations.append(match)
    if operations:
        clauses.append(tuple(operations))
    for i, cond in enumerate(rule.when):
        cond_match, l7 = _condition(cond, f"{where}.when[{i}]")
        l7_any |= l7
        if cond_match is not None and not _empty(cond_match):
            clauses.append((cond_match,))
    return tuple(clauses), l7_any


def convert(resource: k8s.AuthorizationPolicy) -> Converted:
    """Raises :class:`PolicyError` for what ambient must refuse (CUSTOM, bad values)."""
    meta, spec = resource.metadata, resource.spec
    namespace = meta.namespace
    key = f"{namespace}/{meta.name}"
    out = Converted(None)
    if spec.targetRefs or spec.targetRef:
        out.warnings.append(
            f"AuthorizationPolicy {key} targets a waypoint (targetRefs): enforced by the "
            "waypoint, not by ztunnel"
        )
        return out
    if spec.action == "CUSTOM":
        raise PolicyError(
            "spec.action",
            "CUSTOM delegates to an external authorizer (ext_authz provider), which ztunnel "
            "does not call; use ALLOW or DENY",
        )
    if spec.selector is not None and spec.selector.matchLabels:
        scope = Scope.WORKLOAD_SELECTOR
    elif namespace == ROOT_NAMESPACE:
        scope = Scope.GLOBAL
    else:
        scope = Scope.NAMESPACE
    action = {"ALLOW": Action.ALLOW, "DENY": Action.DENY, "AUDIT": Action.AUDIT}[spec.action]
    rules: list[Rule] = []
    for i, rule in enumerate(spec.rules):
        clauses, l7 = _rule(rule, namespace, f"spec.rules[{i}]")
        if l7 and action is Action.ALLOW:
            out.warnings.append(
                f"AuthorizationPolicy {key}: spec.rules[{i}] uses HTTP (L7) fields, which "
                "ztunnel cannot see: this ALLOW rule never matches at L4 (bind a waypoint "
                "to enforce it)"
            )
            continue
        if l7:
            out.warnings.append(
                f"AuthorizationPolicy {key}: spec.rules[{i}] uses HTTP (L7) fields, which "
                f"ztunnel cannot see: this {spec.action} rule is enforced on its L4 part only"
            )
        rules.append(clauses)
    out.policy = Policy(
        name=meta.name,
        namespace=namespace,
        scope=scope,
        action=action,
        rules=tuple(rules),
        dry_run=meta.annotations.get(DRY_RUN_ANNOTATION, "").lower() == "true",
        selector=tuple(sorted((spec.selector.matchLabels if spec.selector else {}).items())),
    )
    return out
