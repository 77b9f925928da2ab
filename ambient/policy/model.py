"""Authorization policies in the shape Istio's ztunnel evaluates them
(``istio.security.Authorization``).

Both an ``AuthorizationPolicy`` resource and an entry of ztunnel's local config ``policies``
become one of these. Logic: rules OR; clauses within a rule AND; matches within a clause OR;
inside a match, the field kinds AND and the values OR; ``not…`` fields require no value to match.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from enum import Enum

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Scope(Enum):
    GLOBAL = "Global"  # mesh-wide, from the root namespace
    NAMESPACE = "Namespace"
    WORKLOAD_SELECTOR = "WorkloadSelector"


class Action(Enum):
    ALLOW = "Allow"
    DENY = "Deny"
    AUDIT = "Audit"  # matches are only logged (from AuthorizationPolicy; ztunnel's file has none)


class MatchKind(Enum):
    EXACT = "Exact"
    PREFIX = "Prefix"
    SUFFIX = "Suffix"
    PRESENCE = "Presence"


@dataclass(frozen=True, slots=True)
class StringMatch:
    kind: MatchKind
    value: str = ""


@dataclass(frozen=True, slots=True)
class ServiceAccountMatch:
    namespace: str
    service_account: str


@dataclass(frozen=True, slots=True)
class Match:
    namespaces: tuple[StringMatch, ...] = ()
    not_namespaces: tuple[StringMatch, ...] = ()
    service_accounts: tuple[ServiceAccountMatch, ...] = ()
    not_service_accounts: tuple[ServiceAccountMatch, ...] = ()
    principals: tuple[StringMatch, ...] = ()
    not_principals: tuple[StringMatch, ...] = ()
    source_ips: tuple[IPNetwork, ...] = ()
    not_source_ips: tuple[IPNetwork, ...] = ()
    destination_ips: tuple[IPNetwork, ...] = ()
    not_destination_ips: tuple[IPNetwork, ...] = ()
    destination_ports: tuple[int, ...] = ()
    not_destination_ports: tuple[int, ...] = ()


Clause = tuple[Match, ...]
Rule = tuple[Clause, ...]


@dataclass(frozen=True, slots=True)
class Policy:
    name: str
    namespace: str
    scope: Scope
    action: Action
    rules: tuple[Rule, ...] = ()
    dry_run: bool = False
    # Labels a WorkloadSelector policy selects (from an AuthorizationPolicy's selector).
    selector: tuple[tuple[str, str], ...] = ()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"
