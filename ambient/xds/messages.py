"""The messages of Istio's ztunnel xDS, as protobuf classes built at import time from field lists
(as :mod:`ambient.zds.messages`), not from protoc output:

- ``envoy.service.discovery.v3``: ``DeltaDiscoveryRequest``, ``DeltaDiscoveryResponse``,
  ``Resource``, ``Node``, ``Status`` — delta ADS, the stream istiod serves ztunnel on;
- ``istio.workload``: ``Address`` (a ``Workload`` or a ``Service``) and what they hold;
- ``istio.security``: ``Authorization`` (an AuthorizationPolicy in the shape ztunnel evaluates).

Field numbers and meanings are those of Istio's published API (``pkg/workloadapi/workload.proto``,
``security/authorization.proto``; Envoy's ``discovery.proto``) and matter on the wire: a
renumbered field is another field to istiod or to Istio's ztunnel. Fields ambient does not use
are still declared, so a message from istiod round-trips whole.
"""

from __future__ import annotations

from typing import Any, Final

from ..schema import Message, build, file_descriptor

ADDRESS_TYPE: Final = "type.googleapis.com/istio.workload.Address"
AUTHORIZATION_TYPE: Final = "type.googleapis.com/istio.security.Authorization"

_DISCOVERY = file_descriptor(
    "ambient/xds/discovery.proto",
    "envoy.service.discovery.v3",
    ["google/protobuf/any.proto", "google/protobuf/duration.proto", "google/protobuf/struct.proto"],
    [
        Message(
            "Status",
            [
                ("code", 1, "int32", ""),
                ("message", 2, "string", ""),
                ("details", 3, ".google.protobuf.Any", "repeated"),
            ],
        ),
        Message(
            "Node",
            [
                ("id", 1, "string", ""),
                ("cluster", 2, "string", ""),
                ("metadata", 3, ".google.protobuf.Struct", ""),
                ("build_version", 5, "string", ""),
            ],
        ),
        Message(
            "DeltaDiscoveryRequest",
            [
                ("node", 1, ".envoy.service.discovery.v3.Node", ""),
                ("type_url", 2, "string", ""),
                ("resource_names_subscribe", 3, "string", "repeated"),
                ("resource_names_unsubscribe", 4, "string", "repeated"),
                ("initial_resource_versions", 5, "map<string,string>", ""),
                ("response_nonce", 6, "string", ""),
                ("error_detail", 7, ".envoy.service.discovery.v3.Status", ""),
            ],
        ),
        Message(
            "DeltaDiscoveryResponse",
            [
                ("system_version_info", 1, "string", ""),
                ("resources", 2, ".envoy.service.discovery.v3.Resource", "repeated"),
                ("type_url", 4, "string", ""),
                ("nonce", 5, "string", ""),
                ("removed_resources", 6, "string", "repeated"),
            ],
        ),
        Message(
            "Resource",
            [
                ("version", 1, "string", ""),
                ("resource", 2, ".google.protobuf.Any", ""),
                ("name", 3, "string", ""),
                ("aliases", 4, "string", "repeated"),
                ("ttl", 6, ".google.protobuf.Duration", ""),
                (
                    "cache_control",
                    7,
                    ".envoy.service.discovery.v3.Resource.CacheControl",
                    "",
                ),
            ],
            nested=[Message("CacheControl", [("do_not_cache", 1, "bool", "")])],
        ),
    ],
    {},
)

_W = ".istio.workload"
_WORKLOAD = file_descriptor(
    "ambient/xds/workload.proto",
    "istio.workload",
    ["google/protobuf/wrappers.proto", "google/protobuf/any.proto"],
    [
        Message(
            "Address",
            [
                ("workload", 1, f"{_W}.Workload", "oneof:type"),
                ("service", 2, f"{_W}.Service", "oneof:type"),
            ],
        ),
        Message(
            "Service",
            [
                ("name", 1, "string", ""),
                ("namespace", 2, "string", ""),
                ("hostname", 3, "string", ""),
                ("addresses", 4, f"{_W}.NetworkAddress", "repeated"),
                ("ports", 5, f"{_W}.Port", "repeated"),
                ("subject_alt_names", 6, "string", "repeated"),
                ("waypoint", 7, f"{_W}.GatewayAddress", ""),
                ("load_balancing", 8, f"{_W}.LoadBalancing", ""),
                ("ip_families", 9, f"{_W}.IPFamilies", "enum"),
                ("extensions", 10, f"{_W}.Extension", "repeated"),
                ("canonical", 11, "bool", ""),
                ("ingress_use_waypoint", 12, "bool", ""),
                ("weighted_waypoints", 13, f"{_W}.WeightedWaypoint", "repeated"),
                ("visibility", 14, f"{_W}.Service.Visibility", "enum"),
            ],
            enums={"Visibility": [("PUBLIC", 0), ("NAMESPACE", 1)]},
        ),
        Message(
            "LoadBalancing",
            [
                ("routing_preference", 1, f"{_W}.LoadBalancing.Scope", "repeated enum"),
                ("mode", 2, f"{_W}.LoadBalancing.Mode", "enum"),
                ("health_policy", 3, f"{_W}.LoadBalancing.HealthPolicy", "enum"),
            ],
            enums={
                "Scope": [
                    ("UNSPECIFIED_SCOPE", 0),
                    ("REGION", 1),
                    ("ZONE", 2),
                    ("SUBZONE", 3),
                    ("NODE", 4),
                    ("CLUSTER", 5),
                    ("NETWORK", 6),
                ],
                "Mode": [
                    ("UNSPECIFIED_MODE", 0),
                    ("STRICT", 1),
                    ("FAILOVER", 2),
                    ("PASSTHROUGH", 3),
                ],
                "HealthPolicy": [("ONLY_HEALTHY", 0), ("ALLOW_ALL", 1)],
            },
        ),
        Message(
            "Workload",
            [
                ("name", 1, "string", ""),
                ("namespace", 2, "string", ""),
                ("addresses", 3, "bytes", "repeated"),
                ("network", 4, "string", ""),
                ("tunnel_protocol", 5, f"{_W}.TunnelProtocol", "enum"),
                ("trust_domain", 6, "string", ""),
                ("service_account", 7, "string", ""),
                ("waypoint", 8, f"{_W}.GatewayAddress", ""),
                ("node", 9, "string", ""),
                ("canonical_name", 10, "string", ""),
                ("canonical_revision", 11, "string", ""),
                ("workload_type", 12, f"{_W}.WorkloadType", "enum"),
                ("workload_name", 13, "string", ""),
                ("native_tunnel", 14, "bool", ""),
                ("authorization_policies", 16, "string", "repeated"),
                ("status", 17, f"{_W}.WorkloadStatus", "enum"),
                ("cluster_id", 18, "string", ""),
                ("network_gateway", 19, f"{_W}.GatewayAddress", ""),
                ("uid", 20, "string", ""),
                ("hostname", 21, "string", ""),
                ("services", 22, f"map<string,{_W}.PortList>", ""),
                ("application_tunnel", 23, f"{_W}.ApplicationTunnel", ""),
                ("locality", 24, f"{_W}.Locality", ""),
                ("network_mode", 25, f"{_W}.NetworkMode", "enum"),
                ("extensions", 26, f"{_W}.Extension", "repeated"),
                ("capacity", 27, ".google.protobuf.UInt32Value", ""),
            ],
            reserved=(15,),
        ),
        Message(
            "Locality",
            [
                ("region", 1, "string", ""),
                ("zone", 2, "string", ""),
                ("subzone", 3, "string", ""),
            ],
        ),
        Message("PortList", [("ports", 1, f"{_W}.Port", "repeated")]),
        Message(
            "Port",
            [
                ("service_port", 1, "uint32", ""),
                ("target_port", 2, "uint32", ""),
                ("app_protocol", 3, f"{_W}.AppProtocol", "enum"),
            ],
        ),
        Message(
            "ApplicationTunnel",
            [
                ("protocol", 1, f"{_W}.ApplicationTunnel.Protocol", "enum"),
                ("port", 2, "uint32", ""),
            ],
            enums={"Protocol": [("NONE", 0), ("PROXY", 1)]},
        ),
        Message(
            "GatewayAddress",
            [
                ("hostname", 1, f"{_W}.NamespacedHostname", "oneof:destination"),
                ("address", 2, f"{_W}.NetworkAddress", "oneof:destination"),
                ("hbone_mtls_port", 3, "uint32", ""),
            ],
            reserved=(4,),
        ),
        Message(
            "WeightedWaypoint",
            [
                ("destination", 1, f"{_W}.GatewayAddress", ""),
                ("weight", 2, "uint32", ""),
            ],
        ),
        Message(
            "NetworkAddress",
            [
                ("network", 1, "string", ""),
                ("address", 2, "bytes", ""),
                ("length", 3, "uint32", ""),
            ],
        ),
        Message(
            "NamespacedHostname",
            [("namespace", 1, "string", ""), ("hostname", 2, "string", "")],
        ),
        Message(
            "Extension",
            [("name", 1, "string", ""), ("config", 2, ".google.protobuf.Any", "")],
        ),
    ],
    {
        "IPFamilies": [("AUTOMATIC", 0), ("IPV4_ONLY", 1), ("IPV6_ONLY", 2), ("DUAL", 3)],
        "NetworkMode": [("STANDARD", 0), ("HOST_NETWORK", 1)],
        "WorkloadStatus": [("HEALTHY", 0), ("UNHEALTHY", 1)],
        "WorkloadType": [("DEPLOYMENT", 0), ("CRONJOB", 1), ("POD", 2), ("JOB", 3)],
        "AppProtocol": [
            ("UNKNOWN", 0),
            ("HTTP11", 1),
            ("HTTP2", 2),
            ("GRPC", 3),
            ("TCP", 4),
            ("TLS", 5),
        ],
        "TunnelProtocol": [("NONE", 0), ("HBONE", 1), ("LEGACY_ISTIO_MTLS", 2)],
    },
)

_S = ".istio.security"
_STRING_MATCH = f"{_S}.StringMatch"
_SA_MATCH = f"{_S}.ServiceAccountMatch"
_ADDRESS = f"{_S}.Address"
_AUTHORIZATION = file_descriptor(
    "ambient/xds/authorization.proto",
    "istio.security",
    ["google/protobuf/empty.proto", "ambient/xds/workload.proto"],
    [
        Message(
            "Authorization",
            [
                ("name", 1, "string", ""),
                ("namespace", 2, "string", ""),
                ("scope", 3, f"{_S}.Scope", "enum"),
                ("action", 4, f"{_S}.Action", "enum"),
                ("rules", 5, f"{_S}.Rule", "repeated"),
                ("dry_run", 6, "bool", ""),
                ("extensions", 7, f"{_W}.Extension", "repeated"),
            ],
        ),
        Message("Rule", [("clauses", 1, f"{_S}.Clause", "repeated")]),
        Message("Clause", [("matches", 2, f"{_S}.Match", "repeated")]),
        Message(
            "Match",
            [
                ("namespaces", 1, _STRING_MATCH, "repeated"),
                ("not_namespaces", 2, _STRING_MATCH, "repeated"),
                ("principals", 3, _STRING_MATCH, "repeated"),
                ("not_principals", 4, _STRING_MATCH, "repeated"),
                ("source_ips", 5, _ADDRESS, "repeated"),
                ("not_source_ips", 6, _ADDRESS, "repeated"),
                ("destination_ips", 7, _ADDRESS, "repeated"),
                ("not_destination_ips", 8, _ADDRESS, "repeated"),
                ("destination_ports", 9, "uint32", "repeated"),
                ("not_destination_ports", 10, "uint32", "repeated"),
                ("service_accounts", 11, _SA_MATCH, "repeated"),
                ("not_service_accounts", 12, _SA_MATCH, "repeated"),
                ("extensions", 13, f"{_W}.Extension", "repeated"),
            ],
        ),
        Message("Address", [("address", 1, "bytes", ""), ("length", 2, "uint32", "")]),
        Message(
            "ServiceAccountMatch",
            [("namespace", 1, "string", ""), ("serviceAccount", 2, "string", "")],
        ),
        Message(
            "StringMatch",
            [
                ("exact", 1, "string", "oneof:match_type"),
                ("prefix", 2, "string", "oneof:match_type"),
                ("suffix", 3, "string", "oneof:match_type"),
                ("presence", 4, ".google.protobuf.Empty", "oneof:match_type"),
            ],
        ),
    ],
    {
        "Scope": [("GLOBAL", 0), ("NAMESPACE", 1), ("WORKLOAD_SELECTOR", 2)],
        "Action": [("ALLOW", 0), ("DENY", 1)],
    },
)


_CLASSES: Final = build(
    (_DISCOVERY, _WORKLOAD, _AUTHORIZATION), known=("google.protobuf.Any", "google.protobuf.Struct")
)

AnyMessage: Any = _CLASSES["google.protobuf.Any"]
Struct: Any = _CLASSES["google.protobuf.Struct"]
DeltaDiscoveryRequest: Any = _CLASSES["envoy.service.discovery.v3.DeltaDiscoveryRequest"]
DeltaDiscoveryResponse: Any = _CLASSES["envoy.service.discovery.v3.DeltaDiscoveryResponse"]
Resource: Any = _CLASSES["envoy.service.discovery.v3.Resource"]
Node: Any = _CLASSES["envoy.service.discovery.v3.Node"]
Status: Any = _CLASSES["envoy.service.discovery.v3.Status"]
Address: Any = _CLASSES["istio.workload.Address"]
Workload: Any = _CLASSES["istio.workload.Workload"]
Service: Any = _CLASSES["istio.workload.Service"]
Port: Any = _CLASSES["istio.workload.Port"]
PortList: Any = _CLASSES["istio.workload.PortList"]
NetworkAddress: Any = _CLASSES["istio.workload.NetworkAddress"]
GatewayAddress: Any = _CLASSES["istio.workload.GatewayAddress"]
NamespacedHostname: Any = _CLASSES["istio.workload.NamespacedHostname"]
Authorization: Any = _CLASSES["istio.security.Authorization"]
Rule: Any = _CLASSES["istio.security.Rule"]
Clause: Any = _CLASSES["istio.security.Clause"]
Match: Any = _CLASSES["istio.security.Match"]
StringMatch: Any = _CLASSES["istio.security.StringMatch"]
ServiceAccountMatch: Any = _CLASSES["istio.security.ServiceAccountMatch"]
IpAddress: Any = _CLASSES["istio.security.Address"]
