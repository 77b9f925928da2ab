"""L4 authorization as Istio's ztunnel evaluates it, over one mesh snapshot.

Which policies apply to a destination workload: the mesh-wide ones (root namespace, no selector),
those of its namespace, and those that select it (labels, or named in its
``authorization_policies`` in ztunnel's local config). Order: any DENY matches → deny; no ALLOW
applies → allow; an ALLOW matches → allow; else deny. Dry-run policies and AUDIT only log.

Matching: rules OR; clauses of a rule AND; matches of a clause OR; within a match, the field kinds
AND and their values OR; a ``not…`` field requires that none of its values match; an empty match
never matches; a policy without rules never matches. A connection without an identity (plaintext)
matches no principal, namespace or service account.

Per connection only a few rules are evaluated: each policy set is compiled once per workload and
snapshot, with rules indexed by the exact principal, namespace, destination port or source
network they require, so 1,000 policies on a pod cost what the handful relevant to a connection
cost.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ..identity.spiffe import SpiffeId
from ..mesh import IPAddress, Mesh, Workload
from .model import (
    Action,
    Clause,
    Match,
    MatchKind,
    Policy,
    Rule,
    Scope,
    StringMatch,
)

ROOT_NAMESPACE = "istio-system"


@dataclass(frozen=True, slots=True)
class Connection:
    """What L4 authorization sees of a connection. Build it with :func:`connection`, which
    derives ``principal`` and ``namespace`` once rather than on every rule."""

    source_ip: IPAddress
    destination_ip: IPAddress
    destination_port: int
    identity: SpiffeId | None = None  # the peer's, proven by mutual TLS; None for plaintext
    principal: str = ""  # the identity as policies write it, without "spiffe://"; "" if none
    namespace: str = ""  # the identity's namespace; "" if none


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    reason: str
    policy: str | None = None  # the policy that decided, ``namespace/name``
    logged: tuple[str, ...] = ()  # what dry-run and AUDIT policies would have done


# --- matching --------------------------------------------------------------------------------


def _string(m: StringMatch, value: str) -> bool:
    if m.kind is MatchKind.EXACT:
        return value == m.value
    if m.kind is MatchKind.PREFIX:
        return value.startswith(m.value)
    if m.kind is MatchKind.SUFFIX:
        return value.endswith(m.value)
    return value != ""  # PRESENCE


def _strings(positive: Sequence[StringMatch], negative: Sequence[StringMatch], value: str) -> bool:
    if positive and not any(_string(m, value) for m in positive):
        return False
    return not (negative and any(_string(m, value) for m in negative))


def _principal_value(m: StringMatch) -> StringMatch:
    # Policies name principals without "spiffe://"; tolerate it being written anyway.
    if m.value.startswith("spiffe://"):
        return StringMatch(m.kind, m.value[len("spiffe://") :])
    return m


def match_matches(m: Match, conn: Connection) -> bool:
    if m == _EMPTY:
        return False
    identity = conn.identity
    if not _strings(m.principals, m.not_principals, conn.principal):
        return False
    if not _strings(m.namespaces, m.not_namespaces, conn.namespace):
        return False
    if m.service_accounts or m.not_service_accounts:
        account = (identity.namespace, identity.service_account) if identity else None

        def is_account(a: object) -> bool:
            return account is not None and (a.namespace, a.service_account) == account  # type: ignore[attr-defined]

        if m.service_accounts and not any(map(is_account, m.service_accounts)):
            return False
        if any(map(is_account, m.not_service_accounts)):
            return False
    if m.source_ips and not any(conn.source_ip in n for n in m.source_ips):
        return False
    if any(conn.source_ip in n for n in m.not_source_ips):
        return False
    if m.destination_ips and not any(conn.destination_ip in n for n in m.destination_ips):
        return False
    if any(conn.destination_ip in n for n in m.not_destination_ips):
        return False
    if m.destination_ports and conn.destination_port not in m.destination_ports:
        return False
    return conn.destination_port not in m.not_destination_ports


_EMPTY = Match()


def rule_matches(rule: Rule, conn: Connection) -> bool:
    return all(any(match_matches(m, conn) for m in clause) for clause in rule)


def policy_matches(policy: Policy, conn: Connection) -> bool:
    return any(rule_matches(rule, conn) for rule in policy.rules)


def _normalise(policy: Policy) -> Policy:
    """Principals without ``spiffe://``, once, at compile time."""

    def fix(m: Match) -> Match:
        if not any(s.value.startswith("spiffe://") for s in m.principals + m.not_principals):
            return m
        return Match(
            **{
                **{f: getattr(m, f) for f in m.__dataclass_fields__},
                "principals": tuple(map(_principal_value, m.principals)),
                "not_principals": tuple(map(_principal_value, m.not_principals)),
            }
        )

    rules = tuple(tuple(tuple(fix(m) for m in clause) for clause in rule) for rule in policy.rules)
    if rules == policy.rules:
        return policy
    return Policy(
        policy.name,
        policy.namespace,
        policy.scope,
        policy.action,
        rules,
        policy.dry_run,
        policy.selector,
    )


# --- which policies apply --------------------------------------------------------------------


def applies_to(policy: Policy, workload: Workload) -> bool:
    if policy.scope is Scope.GLOBAL:
        return True
    if policy.namespace != workload.namespace:
        return policy.key in workload.authorization_policies
    if policy.scope is Scope.NAMESPACE:
        return True
    if policy.key in workload.authorization_policies:
        return True
    return bool(policy.selector) and all(workload.labels.get(k) == v for k, v in policy.selector)


# --- the compiled, indexed policy set of one workload ---------------------------------------


@dataclass
class _Index:
    """Rules of one action, each filed under the one constraint it cannot match without."""

    by_principal: dict[str, list[tuple[int, Rule]]] = field(default_factory=dict)
    # Principal prefixes and suffixes, by length: principal[:n] / principal[-n:] -> rules.
    by_principal_prefix: dict[int, dict[str, list[tuple[int, Rule]]]] = field(default_factory=dict)
    by_principal_suffix: dict[int, dict[str, list[tuple[int, Rule]]]] = field(default_factory=dict)
    by_namespace: dict[str, list[tuple[int, Rule]]] = field(default_factory=dict)
    by_port: dict[int, list[tuple[int, Rule]]] = field(default_factory=dict)
    # (ip version, netmask as int) -> network address as int -> rules
    by_network: dict[tuple[int, int], dict[int, list[tuple[int, Rule]]]] = field(
        default_factory=dict
    )
    rest: list[tuple[int, Rule]] = field(default_factory=list)

    def add(self, n: int, rule: Rule) -> None:
        entry = (n, rule)
        for clause in rule:
            keys = _exact_keys(clause, "principals")
            if keys is not None:
                for k in keys:
                    self.by_principal.setdefault(k, []).append(entry)
                return
        for clause in rule:
            affixes = _affix_keys(clause)
            if affixes is not None:
                for kind, value in affixes:
                    table = (
                        self.by_principal_prefix
                        if kind is MatchKind.PREFIX
                        else self.by_principal_suffix
                    )
                    table.setdefault(len(value), {}).setdefault(value, []).append(entry)
                return
        for clause in rule:
            keys = _exact_keys(clause, "namespaces")
            if keys is not None:
                for k in keys:
                    self.by_namespace.setdefault(k, []).append(entry)
                return
        for clause in rule:
            if clause and all(m.destination_ports for m in clause):
                for port in {p for m in clause for p in m.destination_ports}:
                    self.by_port.setdefault(port, []).append(entry)
                return
        for clause in rule:
            if clause and all(m.source_ips for m in clause):
                for net in {n for m in clause for n in m.source_ips}:
                    bucket = self.by_network.setdefault((net.version, int(net.netmask)), {})
                    bucket.setdefault(int(net.network_address), []).append(entry)
                return
        self.rest.append(entry)

    def candidates(self, conn: Connection) -> list[tuple[int, Rule]]:
        """The rules that could match ``conn``; every other rule certainly does not."""
        found: list[tuple[int, Rule]] = []
        principal = conn.principal
        if principal:
            found += self.by_principal.get(principal, ())
            for length, table in self.by_principal_prefix.items():
                found += table.get(principal[:length], ())
            for length, table in self.by_principal_suffix.items():
                found += table.get(principal[-length:], ())
            found += self.by_namespace.get(conn.namespace, ())
        found += self.by_port.get(conn.destination_port, ())
        if self.by_network:
            ip = int(conn.source_ip)
            version = conn.source_ip.version
            for (net_version, mask), bucket in self.by_network.items():
                if net_version == version:
                    found += bucket.get(ip & mask, ())
        found += self.rest
        return found


def _affix_keys(clause: Clause) -> set[tuple[MatchKind, str]] | None:
    """The principal prefixes/suffixes a clause requires, if every match requires one (and
    exact values count as both: they are filed as prefixes of their full length)."""
    if not clause:
        return None
    keys: set[tuple[MatchKind, str]] = set()
    for m in clause:
        if not m.principals:
            return None
        for v in m.principals:
            if v.kind is MatchKind.PRESENCE or not v.value:
                return None
            kind = MatchKind.SUFFIX if v.kind is MatchKind.SUFFIX else MatchKind.PREFIX
            keys.add((kind, v.value))
    return keys


def _exact_keys(clause: Clause, field_name: str) -> set[str] | None:
    """The exact values a clause requires for ``field_name`` if every match requires one."""
    if not clause:
        return None
    keys: set[str] = set()
    for m in clause:
        values = getattr(m, field_name)
        if not values or any(v.kind is not MatchKind.EXACT for v in values):
            return None
        keys.update(v.value for v in values)
    return keys


class PolicySet:
    """The policies that apply to one workload, compiled for per-connection evaluation."""

    def __init__(self, policies: Sequence[Policy]) -> None:
        self.policies = [_normalise(p) for p in policies]
        self._deny = _Index()
        self._allow = _Index()
        self._logged = _Index()  # dry-run and AUDIT: evaluated only to be logged
        self.has_allow = False
        self.has_logged = False
        for n, p in enumerate(self.policies):
            if p.dry_run or p.action is Action.AUDIT:
                index = self._logged
                self.has_logged = True
            else:
                index = self._deny if p.action is Action.DENY else self._allow
                self.has_allow |= p.action is Action.ALLOW
            for rule in p.rules:
                index.add(n, rule)

    def _first_match(self, index: _Index, conn: Connection) -> Policy | None:
        best: int | None = None
        for n, rule in index.candidates(conn):
            if (best is None or n < best) and rule_matches(rule, conn):
                best = n
        return None if best is None else self.policies[best]

    def evaluate(self, conn: Connection) -> Decision:
        logged = tuple(self._log(conn)) if self.has_logged else ()
        denied = self._first_match(self._deny, conn)
        if denied is not None:
            return Decision(False, f"denied by policy {denied.key}", denied.key, logged)
        if not self.has_allow:
            return Decision(True, "no ALLOW policy applies", None, logged)
        allowed = self._first_match(self._allow, conn)
        if allowed is not None:
            return Decision(True, f"allowed by policy {allowed.key}", allowed.key, logged)
        return Decision(False, "no ALLOW policy matched", None, logged)

    def _log(self, conn: Connection) -> Iterable[str]:
        matched = sorted(
            {n for n, rule in self._logged.candidates(conn) if rule_matches(rule, conn)}
        )
        for n in matched:
            p = self.policies[n]
            kind = "dry-run" if p.dry_run else "audit"
            yield f"{kind} {p.action.value} policy {p.key} matched"

    def explain(self, conn: Connection) -> list[tuple[str, str]]:
        """Every applicable policy's verdict on ``conn``, for ``ambient explain``."""
        out = []
        for p in self.policies:
            matched = policy_matches(p, conn)
            if p.dry_run:
                verdict = (
                    f"dry-run: would {'deny' if p.action is Action.DENY else 'allow'}"
                    if matched
                    else "dry-run: no match"
                )
            elif p.action is Action.AUDIT:
                verdict = "audit: matched" if matched else "audit: no match"
            elif p.action is Action.DENY:
                verdict = "deny" if matched else "no match"
            else:
                verdict = "allow" if matched else "no match"
            out.append((p.key, verdict))
        return out


class Authorizer:
    """L4 authorization over one snapshot; compiled policy sets are cached per workload."""

    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh
        self._sets: dict[str, PolicySet] = {}

    def policy_set(self, workload: Workload) -> PolicySet:
        found = self._sets.get(workload.uid)
        if found is None:
            found = PolicySet([p for p in self.mesh.policies if applies_to(p, workload)])
            self._sets[workload.uid] = found
        return found

    def authorize(self, workload: Workload, conn: Connection) -> Decision:
        return self.policy_set(workload).evaluate(conn)


def connection(
    source_ip: str | IPAddress,
    destination_ip: str | IPAddress,
    destination_port: int,
    identity: str | SpiffeId | None = None,
) -> Connection:
    """Build a :class:`Connection` from text (tests, explain)."""
    if isinstance(identity, str):
        identity = SpiffeId.parse(identity)
    return Connection(
        ipaddress.ip_address(source_ip) if isinstance(source_ip, str) else source_ip,
        ipaddress.ip_address(destination_ip) if isinstance(destination_ip, str) else destination_ip,
        destination_port,
        identity,
        identity.principal if identity else "",
        identity.namespace if identity else "",
    )
