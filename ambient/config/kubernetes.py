"""The Kubernetes objects ambient reads, as pydantic models.

Only the fields the data plane uses are typed; the rest of a real manifest (volumes, probes,
resources...) is accepted and ignored where Kubernetes has many fields (specs, containers), while
small, closed structures (metadata, ports, IPs) and the top level of every object refuse unknown
fields, so a typo like ``lables:`` or ``specs:`` is an error rather than a silent no-op —
``kubectl``'s strict field validation does the same.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StringConstraints

from .types import IPAddress

# RFC 1123 names, as Kubernetes requires them.
DnsLabel = Annotated[
    str, StringConstraints(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63)
]
DnsSubdomain = Annotated[
    str,
    StringConstraints(
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$", max_length=253
    ),
]
PortNumber = Annotated[StrictInt, Field(ge=1, le=65535)]
PortName = Annotated[
    str, StringConstraints(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=15)
]
TransportProtocol = Literal["TCP", "UDP", "SCTP"]

# Empty defaults come from a factory (`Field(default_factory=list)`), never a literal `[]` or
# `{}`: pydantic deep-copies a mutable default for every object it validates, and on a
# 5,000-pod mesh those copies were a third of the validation time.


class Closed(BaseModel):
    """A structure whose every field we know: unknown fields are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Open(BaseModel):
    """A structure with many fields ambient does not use: unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore", frozen=True)


class ObjectMeta(Closed):
    name: DnsSubdomain
    namespace: DnsLabel | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    uid: str | None = None
    creationTimestamp: str | None = None
    # Present in manifests exported from a cluster; not used.
    generateName: str | None = None
    resourceVersion: str | None = None
    generation: int | None = None
    deletionTimestamp: str | None = None
    deletionGracePeriodSeconds: int | None = None
    ownerReferences: list[dict[str, object]] = Field(default_factory=list)
    finalizers: list[str] = Field(default_factory=list)
    managedFields: list[dict[str, object]] = Field(default_factory=list)
    selfLink: str | None = None


class Resource(Closed):
    apiVersion: str
    kind: str
    metadata: ObjectMeta


# --- Namespace ------------------------------------------------------------------------------


class NamespaceMeta(ObjectMeta):
    name: DnsLabel


class Namespace(Resource):
    apiVersion: Literal["v1"]
    kind: Literal["Namespace"]
    metadata: NamespaceMeta
    spec: dict[str, object] = Field(default_factory=dict)
    status: dict[str, object] = Field(default_factory=dict)


# --- Pod ------------------------------------------------------------------------------------


class NamespacedMeta(ObjectMeta):
    namespace: DnsLabel  # required: ambient does not guess which namespace an object is in


class ContainerPort(Closed):
    containerPort: PortNumber
    name: PortName | None = None
    protocol: TransportProtocol = "TCP"
    hostPort: PortNumber | None = None
    hostIP: str | None = None


class Container(Open):
    name: DnsLabel
    ports: list[ContainerPort] = Field(default_factory=list)


class PodSpec(Open):
    nodeName: str | None = None
    serviceAccountName: DnsSubdomain | None = None
    serviceAccount: DnsSubdomain | None = None  # deprecated alias Kubernetes still honours
    containers: list[Container] = Field(default_factory=list)
    hostNetwork: bool = False


class PodIP(Closed):
    ip: IPAddress


class PodCondition(Open):
    type: str
    status: Literal["True", "False", "Unknown"]


class PodStatus(Open):
    podIP: IPAddress | None = None
    podIPs: list[PodIP] = Field(default_factory=list)
    phase: str | None = None
    conditions: list[PodCondition] = Field(default_factory=list)


class Pod(Resource):
    apiVersion: Literal["v1"]
    kind: Literal["Pod"]
    metadata: NamespacedMeta
    spec: PodSpec = PodSpec()
    status: PodStatus = PodStatus()


# --- Service --------------------------------------------------------------------------------


class ServicePort(Closed):
    port: PortNumber
    targetPort: PortNumber | PortName | None = None
    name: PortName | None = None
    protocol: TransportProtocol = "TCP"
    appProtocol: str | None = None
    nodePort: PortNumber | None = None


class ServiceSpec(Open):
    clusterIP: IPAddress | Literal["None", ""] | None = None
    clusterIPs: list[IPAddress | Literal["None"]] = Field(default_factory=list)
    selector: dict[str, str] | None = None
    ports: list[ServicePort] = Field(default_factory=list)
    type: Literal["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"] = "ClusterIP"


class Service(Resource):
    apiVersion: Literal["v1"]
    kind: Literal["Service"]
    metadata: NamespacedMeta
    spec: ServiceSpec = ServiceSpec()
    status: dict[str, object] = Field(default_factory=dict)


MODELS: dict[str, type[Resource]] = {
    "Namespace": Namespace,
    "Pod": Pod,
    "Service": Service,
}


# --- AuthorizationPolicy (security.istio.io) ------------------------------------------------


class Source(Closed):
    principals: list[str] = Field(default_factory=list)
    notPrincipals: list[str] = Field(default_factory=list)
    requestPrincipals: list[str] = Field(default_factory=list)
    notRequestPrincipals: list[str] = Field(default_factory=list)
    namespaces: list[str] = Field(default_factory=list)
    notNamespaces: list[str] = Field(default_factory=list)
    serviceAccounts: list[str] = Field(default_factory=list)
    notServiceAccounts: list[str] = Field(default_factory=list)
    ipBlocks: list[str] = Field(default_factory=list)
    notIpBlocks: list[str] = Field(default_factory=list)
    remoteIpBlocks: list[str] = Field(default_factory=list)
    notRemoteIpBlocks: list[str] = Field(default_factory=list)


class From(Closed):
    source: Source


class Operation(Closed):
    hosts: list[str] = Field(default_factory=list)
    notHosts: list[str] = Field(default_factory=list)
    ports: list[str] = Field(default_factory=list)
    notPorts: list[str] = Field(default_factory=list)
    methods: list[str] = Field(default_factory=list)
    notMethods: list[str] = Field(default_factory=list)
    paths: list[str] = Field(default_factory=list)
    notPaths: list[str] = Field(default_factory=list)


class To(Closed):
    operation: Operation


class Condition(Closed):
    key: str
    values: list[str] = Field(default_factory=list)
    notValues: list[str] = Field(default_factory=list)


class Rule(Closed):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    from_: list[From] = Field(default=[], alias="from")
    to: list[To] = Field(default_factory=list)
    when: list[Condition] = Field(default_factory=list)


class WorkloadSelector(Closed):
    matchLabels: dict[str, str] = Field(default_factory=dict)


class PolicyTargetReference(Closed):
    group: str = ""
    kind: str
    name: str
    namespace: str | None = None


class AuthorizationPolicySpec(Closed):
    selector: WorkloadSelector | None = None
    targetRef: PolicyTargetReference | None = None
    targetRefs: list[PolicyTargetReference] = Field(default_factory=list)
    action: Literal["ALLOW", "DENY", "AUDIT", "CUSTOM"] = "ALLOW"
    provider: dict[str, object] | None = None
    rules: list[Rule] = Field(default_factory=list)


class AuthorizationPolicy(Resource):
    apiVersion: Literal["security.istio.io/v1", "security.istio.io/v1beta1"]
    kind: Literal["AuthorizationPolicy"]
    metadata: NamespacedMeta
    spec: AuthorizationPolicySpec = AuthorizationPolicySpec()


MODELS["AuthorizationPolicy"] = AuthorizationPolicy


# --- Gateway (gateway.networking.k8s.io): a waypoint when its class is istio-waypoint --------


class GatewayListener(Open):
    name: str
    port: PortNumber
    protocol: str


class GatewaySpec(Open):
    gatewayClassName: str
    listeners: list[GatewayListener] = Field(default_factory=list)


class GatewayAddress(Open):
    type: str = "IPAddress"
    value: str


class GatewayStatus(Open):
    addresses: list[GatewayAddress] = Field(default_factory=list)


class Gateway(Resource):
    apiVersion: Literal["gateway.networking.k8s.io/v1", "gateway.networking.k8s.io/v1beta1"]
    kind: Literal["Gateway"]
    metadata: NamespacedMeta
    spec: GatewaySpec
    status: GatewayStatus = GatewayStatus()


MODELS["Gateway"] = Gateway
