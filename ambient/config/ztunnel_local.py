"""Istio ztunnel's local config file (what it reads from ``LOCAL_XDS_PATH``): ``workloads``,
``services`` and ``policies``, camelCase, unknown fields refused; a file ztunnel accepts, we do.

Field names and shapes follow ztunnel's own (de)serialisation (serde_yaml): addresses as
``network/ip`` strings, services of a workload as ``{"ns/hostname": {servicePort: targetPort}}``,
policy rules as rules → clauses → matches, and string matches as YAML tags on their value
(``!Exact s``, ``!Prefix s``, ``!Suffix s``, ``!Presence``), the only tags the file may hold.
"""

from __future__ import annotations

import ipaddress
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    model_validator,
)
from pydantic.alias_generators import to_camel

from . import tags
from .types import IPAddress, IPNetwork

Port = Annotated[StrictInt, Field(ge=0, le=65535)]
# Empty defaults from a factory: pydantic deep-copies a literal `[]`/`{}` for every object.


def _network_address(text: str) -> str:
    _, sep, ip = text.partition("/")
    if not sep:
        raise ValueError(f"expected 'network/ip' (the network may be empty), got {text!r}")
    ipaddress.ip_address(ip)  # raises with the offending value
    return text


def _namespaced_hostname(text: str) -> str:
    namespace, sep, hostname = text.partition("/")
    if not sep or not namespace or not hostname:
        raise ValueError(f"expected 'namespace/hostname', got {text!r}")
    return text


def _destination(text: str) -> str:
    """A waypoint or gateway: ``network/ip`` or ``namespace/hostname``."""
    _, _, rest = text.partition("/")
    try:
        ipaddress.ip_address(rest)
    except ValueError:
        return _namespaced_hostname(text)
    return text


NetworkAddress = Annotated[str, AfterValidator(_network_address)]
NamespacedHostname = Annotated[str, AfterValidator(_namespaced_hostname)]
Destination = Annotated[str, AfterValidator(_destination)]


class Model(BaseModel):
    model_config = ConfigDict(
        extra="forbid", frozen=True, alias_generator=to_camel, populate_by_name=True
    )


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
    namespace: str = Field(min_length=1)
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
    capacity: Annotated[StrictInt, Field(ge=0)] = 1
    locality: Locality = Locality()
    waypoint: GatewayAddress | None = None
    network_gateway: GatewayAddress | None = None
    native_tunnel: StrictBool = False
    application_tunnel: ApplicationTunnel | None = None
    authorization_policies: list[NamespacedHostname] = Field(default_factory=list)
    services: dict[NamespacedHostname, dict[Port, Port]] = Field(default_factory=dict)


class LocalService(Model):
    name: str = Field(min_length=1)
    namespace: str = Field(min_length=1)
    hostname: str = Field(min_length=1)
    vips: list[NetworkAddress]
    ports: dict[Port, Port]
    subject_alt_names: list[str] = Field(default_factory=list)
    waypoint: GatewayAddress | None = None
    canonical: StrictBool = False
    # Accepted for compatibility with files written for ztunnel; not used yet.
    endpoints: dict[str, object] = Field(default_factory=dict)
    cidr_vips: list[str] = Field(default_factory=list)
    weighted_waypoints: list[dict[str, object]] = Field(default_factory=list)
    load_balancer: dict[str, object] | None = None
    load_balancing: dict[str, object] | None = None
    ip_families: str | None = None
    visibility: str | None = None


class StringMatch(BaseModel):
    """A string match, written as Istio's ztunnel reads it: ``!Exact s``, ``!Prefix s``,
    ``!Suffix s`` or ``!Presence`` (see :mod:`ambient.config.tags`)."""

    model_config = ConfigDict(frozen=True)
    kind: Literal["Exact", "Prefix", "Suffix", "Presence"]
    value: str = ""

    @model_validator(mode="before")
    @classmethod
    def _from_tag(cls, data: object) -> dict[str, str]:
        kind, value = tags.string_match(data)
        return {"kind": kind, "value": value}


class ServiceAccountMatch(Model):
    namespace: str
    service_account: str


class RbacMatch(Model):
    namespaces: list[StringMatch] = Field(default_factory=list)
    not_namespaces: list[StringMatch] = Field(default_factory=list)
    service_accounts: list[ServiceAccountMatch] = Field(default_factory=list)
    not_service_accounts: list[ServiceAccountMatch] = Field(default_factory=list)
    principals: list[StringMatch] = Field(default_factory=list)
    not_principals: list[StringMatch] = Field(default_factory=list)
    source_ips: list[IPNetwork] = Field(default_factory=list)
    not_source_ips: list[IPNetwork] = Field(default_factory=list)
    destination_ips: list[IPNetwork] = Field(default_factory=list)
    not_destination_ips: list[IPNetwork] = Field(default_factory=list)
    destination_ports: list[Port] = Field(default_factory=list)
    not_destination_ports: list[Port] = Field(default_factory=list)


# The fields of a policy's match that hold string matches, as written (camelCase; the snake_case
# names are accepted too): the only places of ztunnel's local config where a YAML tag belongs.
STRING_MATCH_FIELDS = frozenset(
    name
    for field_name, info in RbacMatch.model_fields.items()
    if info.annotation == list[StringMatch]
    for name in (field_name, info.alias)
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
    name: str = Field(min_length=1)
    namespace: str
    scope: Literal["Global", "Namespace", "WorkloadSelector"]
    action: Literal["Allow", "Deny"]
    rules: list[list[list[RbacMatch]]]
    dry_run: StrictBool


class LocalConfig(Model):
    workloads: list[LocalWorkload] = Field(default_factory=list)
    services: list[LocalService] = Field(default_factory=list)
    policies: list[LocalPolicy] = Field(default_factory=list)


def istio_differences(doc: dict[str, object]) -> list[str]:
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
