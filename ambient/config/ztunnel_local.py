"""Istio ztunnel's local config file (what it reads from ``LOCAL_XDS_PATH``): ``workloads``,
``services`` and ``policies``, camelCase, unknown fields refused; a file ztunnel accepts, we do.

Field names and shapes follow ztunnel's own (de)serialisation (serde_yaml): addresses as
``network/ip`` strings, services of a workload as ``{"ns/hostname": {servicePort: targetPort}}``,
policy rules as rules → clauses → matches, and string matches as YAML tags on their value
(``!Exact s``, ``!Prefix s``, ``!Suffix s``, ``!Presence``), the only tags the file may hold.
"""

# mypy reads a msgspec struct that inherits `frozen=True` without restating it as not frozen
# ("non-frozen dataclass cannot inherit from a frozen dataclass"); at runtime it is frozen.
# mypy: disable-error-code="misc"

from __future__ import annotations

import ipaddress
from typing import Annotated, Any, Literal

from msgspec import Meta, Struct, field, structs

from . import tags
from .types import IPAddress, IPNetwork, decoder

Port = Annotated[int, Meta(ge=0, le=65535)]
NonEmpty = Annotated[str, Meta(min_length=1)]


class NetworkAddress(str):
    """``network/ip`` (the network may be empty)."""

    __slots__ = ()


class NamespacedHostname(str):
    """``namespace/hostname``."""

    __slots__ = ()


class Destination(str):
    """A waypoint or gateway: ``network/ip`` or ``namespace/hostname``."""

    __slots__ = ()


@decoder(NetworkAddress)
def _network_address(text: object) -> NetworkAddress:
    _, sep, ip = text.partition("/") if isinstance(text, str) else ("", "", "")
    if not sep:
        raise ValueError(f"expected 'network/ip' (the network may be empty), got {text!r}")
    try:
        ipaddress.ip_address(ip)
    except ValueError:
        raise ValueError(f"expected 'network/ip' with an IP address, got {text!r}") from None
    return NetworkAddress(text)


@decoder(NamespacedHostname)
def _namespaced_hostname(text: object) -> NamespacedHostname:
    namespace, sep, hostname = text.partition("/") if isinstance(text, str) else ("", "", "")
    if not sep or not namespace or not hostname:
        raise ValueError(f"expected 'namespace/hostname', got {text!r}")
    return NamespacedHostname(text)


@decoder(Destination)
def _destination(text: object) -> Destination:
    if isinstance(text, str):
        try:
            ipaddress.ip_address(text.partition("/")[2])
        except ValueError:
            pass
        else:
            return Destination(text)
    return Destination(_namespaced_hostname(text))


class Model(Struct, forbid_unknown_fields=True, frozen=True, rename="camel"):
    """A structure of the file: camelCase names (as serde's ``rename_all``), unknown fields
    refused (as ``deny_unknown_fields``)."""


class GatewayAddress(Model):
    destination: Destination
    hbone_mtls_port: Port = 15008


class Locality(Model):
    region: str = ""
    zone: str = ""
    subzone: str = ""


class ApplicationTunnel(Model):
    protocol: Literal["NONE", "PROXY"]
    port: Port | None = None


class LocalWorkload(Model):
    workload_ips: list[IPAddress]
    namespace: NonEmpty
    uid: str = ""
    name: str = ""
    service_account: str = "default"
    trust_domain: str = "cluster.local"
    protocol: Literal["HBONE", "TCP"] = "TCP"
    network_mode: Literal["Standard", "HostNetwork"] = "Standard"
    node: str = ""
    network: str = ""
    hostname: str = ""
    canonical_name: str = ""
    canonical_revision: str = ""
    workload_name: str = ""
    workload_type: str = ""
    cluster_id: str = ""
    status: Literal["Healthy", "Unhealthy"] = "Healthy"
    capacity: Annotated[int, Meta(ge=0)] = 1
    locality: Locality = field(default_factory=Locality)
    waypoint: GatewayAddress | None = None
    network_gateway: GatewayAddress | None = None
    native_tunnel: bool = False
    application_tunnel: ApplicationTunnel | None = None
    authorization_policies: list[NamespacedHostname] = field(default_factory=list)
    services: dict[NamespacedHostname, dict[Port, Port]] = field(default_factory=dict)


class LocalService(Model):
    name: NonEmpty
    namespace: NonEmpty
    hostname: NonEmpty
    vips: list[NetworkAddress]
    ports: dict[Port, Port]
    subject_alt_names: list[str] = field(default_factory=list)
    waypoint: GatewayAddress | None = None
    canonical: bool = False
    # Accepted for compatibility with files written for ztunnel; not used yet.
    endpoints: dict[str, Any] = field(default_factory=dict)
    cidr_vips: list[str] = field(default_factory=list)
    weighted_waypoints: list[dict[str, Any]] = field(default_factory=list)
    load_balancer: dict[str, Any] | None = None
    load_balancing: dict[str, Any] | None = None
    ip_families: str | None = None
    visibility: str | None = None


class StringMatch:
    """A string match, written as Istio's ztunnel reads it: ``!Exact s``, ``!Prefix s``,
    ``!Suffix s`` or ``!Presence`` (see :mod:`ambient.config.tags`)."""

    __slots__ = ("kind", "value")

    def __init__(self, kind: Literal["Exact", "Prefix", "Suffix", "Presence"], value: str = ""):
        self.kind = kind
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StringMatch) and (self.kind, self.value) == (
            other.kind,
            other.value,
        )

    def __hash__(self) -> int:
        return hash((self.kind, self.value))

    def __repr__(self) -> str:
        return f"StringMatch({self.kind!r}, {self.value!r})"


@decoder(StringMatch)
def _string_match(data: object) -> StringMatch:
    return StringMatch(*tags.string_match(data))  # type: ignore[arg-type]


class ServiceAccountMatch(Model):
    namespace: str
    service_account: str


class RbacMatch(Model):
    namespaces: list[StringMatch] = field(default_factory=list)
    not_namespaces: list[StringMatch] = field(default_factory=list)
    service_accounts: list[ServiceAccountMatch] = field(default_factory=list)
    not_service_accounts: list[ServiceAccountMatch] = field(default_factory=list)
    principals: list[StringMatch] = field(default_factory=list)
    not_principals: list[StringMatch] = field(default_factory=list)
    source_ips: list[IPNetwork] = field(default_factory=list)
    not_source_ips: list[IPNetwork] = field(default_factory=list)
    destination_ips: list[IPNetwork] = field(default_factory=list)
    not_destination_ips: list[IPNetwork] = field(default_factory=list)
    destination_ports: list[Port] = field(default_factory=list)
    not_destination_ports: list[Port] = field(default_factory=list)


# The fields of a policy's match that hold string matches, as written (camelCase): the only
# places of ztunnel's local config where a YAML tag belongs.
STRING_MATCH_FIELDS = frozenset(
    f.encode_name for f in structs.fields(RbacMatch) if f.type == list[StringMatch]
)


def is_string_match(path: tags.Path) -> bool:
    """Whether ``path`` (keys and indexes from the top of the document) is a string match:
    ``policies[i].rules[j][k][m].<field>[n]``."""
    return (
        len(path) == 8
        and path[0] == "policies"
        and path[2] == "rules"
        and path[6] in STRING_MATCH_FIELDS
        and all(type(path[i]) is int for i in (1, 3, 4, 5, 7))
    )


class LocalPolicy(Model):
    name: NonEmpty
    namespace: str
    scope: Literal["Global", "Namespace", "WorkloadSelector"]
    action: Literal["Allow", "Deny"]
    rules: list[list[list[RbacMatch]]]
    dry_run: bool


class LocalConfig(Model):
    workloads: list[LocalWorkload] = field(default_factory=list)
    services: list[LocalService] = field(default_factory=list)
    policies: list[LocalPolicy] = field(default_factory=list)


def istio_differences(doc: dict[str, Any]) -> list[str]:
    """Where a local config file that ambient accepts means something else to Istio's ztunnel
    (found running both on one file): fields Istio requires, and defaults that differ because
    Istio's local-file path leaves a missing field empty (src/state/workload.rs, src/xds.rs)."""
    notes = []
    workloads = doc.get("workloads")
    for i, workload in enumerate(workloads if isinstance(workloads, list) else []):
        if not isinstance(workload, dict):
            continue
        who = f"workloads[{i}] ({workload.get('name') or workload.get('uid') or '?'})"
        if "services" not in workload:
            notes.append(
                f"{who}: no `services`: Istio's ztunnel refuses the file (the field is required "
                "there; write `services: {}`)"
            )
        if "trustDomain" not in workload:
            notes.append(
                f"{who}: no `trustDomain`: ambient uses cluster.local, Istio's ztunnel an empty "
                "trust domain (spiffe:///ns/...), so the two disagree on its identity"
            )
        if "serviceAccount" not in workload:
            notes.append(
                f"{who}: no `serviceAccount`: ambient uses `default`, Istio's ztunnel an empty one"
            )
    return notes
