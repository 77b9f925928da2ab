"""The Kubernetes objects ambient reads, as msgspec structs.

Only the fields the data plane uses are typed; the rest of a real manifest (volumes, probes,
resources...) is accepted and ignored where Kubernetes has many fields (specs, containers), while
small, closed structures (metadata, ports, IPs) and the top level of every object refuse unknown
fields, so a typo like ``lables:`` or ``specs:`` is an error rather than a silent no-op —
``kubectl``'s strict field validation does the same.
"""

# mypy reads a msgspec struct that inherits `frozen=True` without restating it as not frozen
# ("non-frozen dataclass cannot inherit from a frozen dataclass"); at runtime it is frozen.
# mypy: disable-error-code="misc"

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import Meta, Struct, field

from .types import IPAddress, decoder, ip_address

# RFC 1123 names, as Kubernetes requires them (the description is the refusal's "expected").
_LABEL = "[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_LABEL_RULE = "lowercase letters, digits and '-', starting and ending with a letter or digit"
DnsLabel = Annotated[
    str,
    Meta(
        pattern=f"^{_LABEL}$",
        max_length=63,
        description=f"an RFC 1123 label of at most 63 characters ({_LABEL_RULE})",
    ),
]
DnsSubdomain = Annotated[
    str,
    Meta(
        pattern=rf"^{_LABEL}(\.{_LABEL})*$",
        max_length=253,
        description=f"an RFC 1123 subdomain of at most 253 characters (labels of {_LABEL_RULE}, "
        "joined by '.')",
    ),
]
PortNumber = Annotated[int, Meta(ge=1, le=65535)]
PortName = Annotated[
    str,
    Meta(
        pattern=f"^{_LABEL}$",
        max_length=15,
        description=f"a port name of at most 15 characters ({_LABEL_RULE})",
    ),
]
TransportProtocol = Literal["TCP", "UDP", "SCTP"]


class ClusterIP(str):
    """A Service's cluster IP as written: an address, ``None`` (headless) or empty. Kept as
    text: an address is parsed where it is used (:data:`CLUSTER_IP_KEYWORDS` are not)."""

    __slots__ = ()


CLUSTER_IP_KEYWORDS = ("None", "")


@decoder(ClusterIP)
def _cluster_ip(value: object) -> ClusterIP:
    if isinstance(value, str) and value in CLUSTER_IP_KEYWORDS:
        return ClusterIP(value)
    try:
        return ClusterIP(ip_address(value))
    except ValueError:
        raise ValueError(f"expected an IP address, 'None' or '', got {value!r}") from None


class Closed(Struct, forbid_unknown_fields=True, frozen=True):
    """A structure whose every field we know: unknown fields are errors."""


class Open(Struct, frozen=True):
    """A structure with many fields ambient does not use: unknown fields are ignored."""


class ObjectMeta(Closed):
    name: DnsSubdomain
    namespace: DnsLabel | None = None
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    uid: str | None = None
    creationTimestamp: str | None = None
    # Present in manifests exported from a cluster; not used.
    generateName: str | None = None
    resourceVersion: str | None = None
    generation: int | None = None
    deletionTimestamp: str | None = None
    deletionGracePeriodSeconds: int | None = None
    ownerReferences: list[dict[str, Any]] = field(default_factory=list)
    finalizers: list[str] = field(default_factory=list)
    managedFields: list[dict[str, Any]] = field(default_factory=list)
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
    spec: dict[str, Any] = field(default_factory=dict)
    status: dict[str, Any] = field(default_factory=dict)


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
    ports: list[ContainerPort] = field(default_factory=list)


class PodSpec(Open):
    nodeName: str | None = None
    serviceAccountName: DnsSubdomain | None = None
    serviceAccount: DnsSubdomain | None = None  # deprecated alias Kubernetes still honours
    containers: list[Container] = field(default_factory=list)
    hostNetwork: bool = False


class PodIP(Closed):
    ip: IPAddress


class PodCondition(Open):
    type: str
    status: Literal["True", "False", "Unknown"]


class PodStatus(Open):
    podIP: IPAddress | None = None
    podIPs: list[PodIP] = field(default_factory=list)
    phase: str | None = None
    conditions: list[PodCondition] = field(default_factory=list)


class Pod(Resource):
    apiVersion: Literal["v1"]
    kind: Literal["Pod"]
    metadata: NamespacedMeta
    spec: PodSpec = field(default_factory=PodSpec)
    status: PodStatus = field(default_factory=PodStatus)


# --- Service --------------------------------------------------------------------------------


class ServicePort(Closed):
    port: PortNumber
    targetPort: PortNumber | PortName | None = None
    name: PortName | None = None
    protocol: TransportProtocol = "TCP"
    appProtocol: str | None = None
    nodePort: PortNumber | None = None


class ServiceSpec(Open):
    clusterIP: ClusterIP | None = None
    clusterIPs: list[ClusterIP] = field(default_factory=list)
    selector: dict[str, str] | None = None
    ports: list[ServicePort] = field(default_factory=list)
    type: Literal["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"] = "ClusterIP"


class Service(Resource):
    apiVersion: Literal["v1"]
    kind: Literal["Service"]
    metadata: NamespacedMeta
    spec: ServiceSpec = field(default_factory=ServiceSpec)
    status: dict[str, Any] = field(default_factory=dict)


MODELS: dict[str, type[Resource]] = {
    "Namespace": Namespace,
    "Pod": Pod,
    "Service": Service,
}


# --- AuthorizationPolicy (security.istio.io) ------------------------------------------------


class Source(Closed):
    principals: list[str] = field(default_factory=list)
    notPrincipals: list[str] = field(default_factory=list)
    requestPrincipals: list[str] = field(default_factory=list)
    notRequestPrincipals: list[str] = field(default_factory=list)
    namespaces: list[str] = field(default_factory=list)
    notNamespaces: list[str] = field(default_factory=list)
    serviceAccounts: list[str] = field(default_factory=list)
    notServiceAccounts: list[str] = field(default_factory=list)
    ipBlocks: list[str] = field(default_factory=list)
    notIpBlocks: list[str] = field(default_factory=list)
    remoteIpBlocks: list[str] = field(default_factory=list)
    notRemoteIpBlocks: list[str] = field(default_factory=list)


class From(Closed):
    source: Source


class Operation(Closed):
    hosts: list[str] = field(default_factory=list)
    notHosts: list[str] = field(default_factory=list)
    ports: list[str] = field(default_factory=list)
    notPorts: list[str] = field(default_factory=list)
    methods: list[str] = field(default_factory=list)
    notMethods: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    notPaths: list[str] = field(default_factory=list)


class To(Closed):
    operation: Operation


class Condition(Closed):
    key: str
    values: list[str] = field(default_factory=list)
    notValues: list[str] = field(default_factory=list)


class Rule(Closed):
    from_: list[From] = field(default_factory=list, name="from")
    to: list[To] = field(default_factory=list)
    when: list[Condition] = field(default_factory=list)


class WorkloadSelector(Closed):
    matchLabels: dict[str, str] = field(default_factory=dict)


class PolicyTargetReference(Closed, kw_only=True):
    group: str = ""
    kind: str
    name: str
    namespace: str | None = None


class AuthorizationPolicySpec(Closed):
    selector: WorkloadSelector | None = None
    targetRef: PolicyTargetReference | None = None
    targetRefs: list[PolicyTargetReference] = field(default_factory=list)
    action: Literal["ALLOW", "DENY", "AUDIT", "CUSTOM"] = "ALLOW"
    provider: dict[str, Any] | None = None
    rules: list[Rule] = field(default_factory=list)


class AuthorizationPolicy(Resource):
    apiVersion: Literal["security.istio.io/v1", "security.istio.io/v1beta1"]
    kind: Literal["AuthorizationPolicy"]
    metadata: NamespacedMeta
    spec: AuthorizationPolicySpec = field(default_factory=AuthorizationPolicySpec)


MODELS["AuthorizationPolicy"] = AuthorizationPolicy


# --- RequestAuthentication (security.istio.io): JWT at the waypoint ----------------------------


class JWTHeader(Closed):
    name: str
    prefix: str = ""


class ClaimToHeader(Closed):
    header: str
    claim: str


class JWTRule(Closed):
    issuer: str
    audiences: list[str] = field(default_factory=list)
    jwksUri: str | None = None
    jwks: str | None = None
    fromHeaders: list[JWTHeader] = field(default_factory=list)
    fromParams: list[str] = field(default_factory=list)
    fromCookies: list[str] = field(default_factory=list)
    outputPayloadToHeader: str | None = None
    outputClaimToHeaders: list[ClaimToHeader] = field(default_factory=list)
    forwardOriginalToken: bool = False
    timeout: str | None = None


class RequestAuthenticationSpec(Closed):
    selector: WorkloadSelector | None = None
    targetRef: PolicyTargetReference | None = None
    targetRefs: list[PolicyTargetReference] = field(default_factory=list)
    jwtRules: list[JWTRule] = field(default_factory=list)


class RequestAuthentication(Resource):
    apiVersion: Literal["security.istio.io/v1", "security.istio.io/v1beta1"]
    kind: Literal["RequestAuthentication"]
    metadata: NamespacedMeta
    spec: RequestAuthenticationSpec = field(default_factory=RequestAuthenticationSpec)


MODELS["RequestAuthentication"] = RequestAuthentication


# --- ConfigMap: Istio's mesh config (istio-system/istio) -------------------------------------


class ConfigMap(Resource):
    apiVersion: Literal["v1"]
    kind: Literal["ConfigMap"]
    metadata: NamespacedMeta
    data: dict[str, str] = field(default_factory=dict)
    binaryData: dict[str, str] = field(default_factory=dict)
    immutable: bool | None = None


MODELS["ConfigMap"] = ConfigMap


# --- WasmPlugin (extensions.istio.io): a Python filter at the waypoint --------------------------


class PortSelector(Closed):
    number: PortNumber


class TrafficSelector(Closed):
    mode: Literal["UNDEFINED", "CLIENT", "SERVER", "CLIENT_AND_SERVER"] = "UNDEFINED"
    ports: list[PortSelector] = field(default_factory=list)


class WasmPluginSpec(Closed):
    url: str
    selector: WorkloadSelector | None = None
    targetRef: PolicyTargetReference | None = None
    targetRefs: list[PolicyTargetReference] = field(default_factory=list)
    pluginName: str = ""
    phase: Literal["UNSPECIFIED_PHASE", "AUTHN", "AUTHZ", "STATS"] = "UNSPECIFIED_PHASE"
    priority: int | None = None
    pluginConfig: dict[str, Any] = field(default_factory=dict)
    failStrategy: Literal["FAIL_CLOSE", "FAIL_OPEN"] = "FAIL_CLOSE"
    match: list[TrafficSelector] = field(default_factory=list)
    type: Literal["UNSPECIFIED_PLUGIN_TYPE", "HTTP", "NETWORK"] = "UNSPECIFIED_PLUGIN_TYPE"
    # Fields of Wasm modules fetched from a registry: accepted, meaningless for a Python file.
    sha256: str | None = None
    imagePullPolicy: str | None = None
    imagePullSecret: str | None = None
    verificationKey: str | None = None
    vmConfig: dict[str, Any] | None = None


class WasmPlugin(Resource):
    apiVersion: Literal["extensions.istio.io/v1alpha1"]
    kind: Literal["WasmPlugin"]
    metadata: NamespacedMeta
    spec: WasmPluginSpec


MODELS["WasmPlugin"] = WasmPlugin


# --- Telemetry (telemetry.istio.io): access logging and metrics at the waypoint --------------


class ProviderRef(Closed):
    name: str


class AccessLogFilter(Closed):
    expression: str


class WorkloadModeSelector(Closed):
    mode: Literal["CLIENT", "SERVER", "CLIENT_AND_SERVER"] = "CLIENT_AND_SERVER"


class AccessLogging(Closed):
    providers: list[ProviderRef] = field(default_factory=list)
    disabled: bool | None = None
    filter: AccessLogFilter | None = None
    match: WorkloadModeSelector | None = None


MetricName = Literal[
    "ALL_METRICS",
    "REQUEST_COUNT",
    "REQUEST_DURATION",
    "REQUEST_SIZE",
    "RESPONSE_SIZE",
    "TCP_OPENED_CONNECTIONS",
    "TCP_CLOSED_CONNECTIONS",
    "TCP_SENT_BYTES",
    "TCP_RECEIVED_BYTES",
    "GRPC_REQUEST_MESSAGES",
    "GRPC_RESPONSE_MESSAGES",
]


class MetricSelector(Closed):
    metric: MetricName | None = None
    customMetric: str | None = None
    mode: Literal["CLIENT", "SERVER", "CLIENT_AND_SERVER"] = "CLIENT_AND_SERVER"


class TagOverride(Closed):
    operation: Literal["UPSERT", "REMOVE"] = "UPSERT"
    value: str | None = None


class MetricsOverrides(Closed):
    match: MetricSelector | None = None
    disabled: bool | None = None
    tagOverrides: dict[str, TagOverride] = field(default_factory=dict)


class Metrics(Closed):
    providers: list[ProviderRef] = field(default_factory=list)
    overrides: list[MetricsOverrides] = field(default_factory=list)
    reportingInterval: str | None = None


class TelemetrySpec(Closed):
    selector: WorkloadSelector | None = None
    targetRef: PolicyTargetReference | None = None
    targetRefs: list[PolicyTargetReference] = field(default_factory=list)
    accessLogging: list[AccessLogging] = field(default_factory=list)
    metrics: list[Metrics] = field(default_factory=list)
    tracing: list[dict[str, Any]] = field(default_factory=list)


class Telemetry(Resource):
    apiVersion: Literal["telemetry.istio.io/v1", "telemetry.istio.io/v1alpha1"]
    kind: Literal["Telemetry"]
    metadata: NamespacedMeta
    spec: TelemetrySpec = field(default_factory=TelemetrySpec)


MODELS["Telemetry"] = Telemetry


# --- Gateway (gateway.networking.k8s.io): a waypoint when its class is istio-waypoint --------


class GatewayListener(Open):
    name: str
    port: PortNumber
    protocol: str


class GatewaySpec(Open):
    gatewayClassName: str
    listeners: list[GatewayListener] = field(default_factory=list)


class GatewayAddress(Open, kw_only=True):
    type: str = "IPAddress"
    value: str


class GatewayStatus(Open):
    addresses: list[GatewayAddress] = field(default_factory=list)


class Gateway(Resource):
    apiVersion: Literal["gateway.networking.k8s.io/v1", "gateway.networking.k8s.io/v1beta1"]
    kind: Literal["Gateway"]
    metadata: NamespacedMeta
    spec: GatewaySpec
    status: GatewayStatus = field(default_factory=GatewayStatus)


MODELS["Gateway"] = Gateway


# --- HTTPRoute (gateway.networking.k8s.io): a waypoint's routes, attached to a Service (GAMMA) --

PathMatchType = Literal["Exact", "PathPrefix", "RegularExpression"]
ValueMatchType = Literal["Exact", "RegularExpression"]
HttpMethod = Literal["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"]
# Gateway API durations (GEP-2257): "10s", "1h30m", "500ms", "0s".
Duration = Annotated[
    str,
    Meta(
        pattern=r"^([0-9]{1,5}(h|m|s|ms)){1,4}$",
        description="a duration such as 10s, 1m30s or 500ms (hours h, minutes m, seconds s, "
        "milliseconds ms)",
    ),
]
HeaderName = Annotated[
    str,
    Meta(
        pattern=r"^[A-Za-z0-9!#$%&'*+\-.^_`|~]+$",
        max_length=256,
        description="an HTTP header name (letters, digits and !#$%&'*+-.^_`|~)",
    ),
]
Weight = Annotated[int, Meta(ge=0, le=1_000_000)]


class ParentReference(Closed, kw_only=True):
    group: str = "gateway.networking.k8s.io"
    kind: str = "Gateway"
    namespace: DnsLabel | None = None
    name: DnsSubdomain
    sectionName: str | None = None
    port: PortNumber | None = None


class HTTPPathMatch(Closed):
    type: PathMatchType = "PathPrefix"
    value: Annotated[str, Meta(max_length=1024)] = "/"


class HTTPHeaderMatch(Closed, kw_only=True):
    type: ValueMatchType = "Exact"
    name: HeaderName
    value: Annotated[str, Meta(max_length=4096)]


class HTTPQueryParamMatch(Closed, kw_only=True):
    type: ValueMatchType = "Exact"
    name: Annotated[str, Meta(min_length=1, max_length=256)]
    value: Annotated[str, Meta(max_length=1024)]


class HTTPRouteMatch(Closed):
    path: HTTPPathMatch | None = None
    headers: list[HTTPHeaderMatch] = field(default_factory=list)
    queryParams: list[HTTPQueryParamMatch] = field(default_factory=list)
    method: HttpMethod | None = None


class HTTPHeader(Closed):
    name: HeaderName
    value: Annotated[str, Meta(max_length=4096)]


class HTTPHeaderFilter(Closed):
    set: list[HTTPHeader] = field(default_factory=list)
    add: list[HTTPHeader] = field(default_factory=list)
    remove: list[HeaderName] = field(default_factory=list)


class HTTPPathModifier(Closed, kw_only=True):
    type: Literal["ReplaceFullPath", "ReplacePrefixMatch"]
    replaceFullPath: str | None = None
    replacePrefixMatch: str | None = None


class HTTPRequestRedirectFilter(Closed):
    scheme: Literal["http", "https"] | None = None
    hostname: DnsSubdomain | None = None
    path: HTTPPathModifier | None = None
    port: PortNumber | None = None
    statusCode: Literal[301, 302, 303, 307, 308] = 302


class HTTPURLRewriteFilter(Closed):
    hostname: DnsSubdomain | None = None
    path: HTTPPathModifier | None = None


class BackendObjectReference(Closed, kw_only=True):
    group: str = ""
    kind: str = "Service"
    name: DnsSubdomain
    namespace: DnsLabel | None = None
    port: PortNumber | None = None


class Fraction(Closed, kw_only=True):
    numerator: Annotated[int, Meta(ge=0)]
    denominator: Annotated[int, Meta(ge=1)] = 100


class HTTPRequestMirrorFilter(Closed, kw_only=True):
    backendRef: BackendObjectReference
    percent: Annotated[int, Meta(ge=0, le=100)] | None = None
    fraction: Fraction | None = None


# A filter's type, and the field its configuration is in.
FILTER_FIELDS = {
    "RequestHeaderModifier": "requestHeaderModifier",
    "ResponseHeaderModifier": "responseHeaderModifier",
    "RequestRedirect": "requestRedirect",
    "URLRewrite": "urlRewrite",
    "RequestMirror": "requestMirror",
    "ExtensionRef": "extensionRef",
}


class HTTPRouteFilter(Closed, kw_only=True):
    type: Literal[
        "RequestHeaderModifier",
        "ResponseHeaderModifier",
        "RequestRedirect",
        "URLRewrite",
        "RequestMirror",
        "ExtensionRef",
    ]
    requestHeaderModifier: HTTPHeaderFilter | None = None
    responseHeaderModifier: HTTPHeaderFilter | None = None
    requestRedirect: HTTPRequestRedirectFilter | None = None
    urlRewrite: HTTPURLRewriteFilter | None = None
    requestMirror: HTTPRequestMirrorFilter | None = None
    extensionRef: dict[str, Any] | None = None


class HTTPBackendRef(BackendObjectReference, kw_only=True):
    # Gateway API: a BackendRef is a BackendObjectReference with a weight (and, here, filters).
    weight: Weight = 1
    filters: list[HTTPRouteFilter] = field(default_factory=list)


class HTTPRouteTimeouts(Closed):
    request: Duration | None = None
    backendRequest: Duration | None = None


class HTTPRouteRetry(Closed):
    # Gateway API (GEP-1731): retry on these answers, at most `attempts` more times.
    codes: list[Annotated[int, Meta(ge=400, le=599)]] = field(default_factory=list)
    attempts: Annotated[int, Meta(ge=0)] | None = None
    backoff: Duration | None = None


class HTTPRouteRule(Closed):
    name: str | None = None
    matches: list[HTTPRouteMatch] = field(default_factory=list)
    filters: list[HTTPRouteFilter] = field(default_factory=list)
    backendRefs: list[HTTPBackendRef] = field(default_factory=list)
    timeouts: HTTPRouteTimeouts | None = None
    retry: HTTPRouteRetry | None = None
    sessionPersistence: dict[str, Any] | None = None


class HTTPRouteSpec(Closed):
    parentRefs: list[ParentReference] = field(default_factory=list)
    hostnames: list[str] = field(default_factory=list)
    rules: list[HTTPRouteRule] = field(default_factory=list)


class RouteMeta(ObjectMeta):
    # kubectl applies a route written without a namespace (the seed's example) to `default`.
    namespace: DnsLabel = "default"


class HTTPRoute(Resource):
    apiVersion: Literal["gateway.networking.k8s.io/v1", "gateway.networking.k8s.io/v1beta1"]
    kind: Literal["HTTPRoute"]
    metadata: RouteMeta
    spec: HTTPRouteSpec = field(default_factory=HTTPRouteSpec)
    status: dict[str, Any] = field(default_factory=dict)


MODELS["HTTPRoute"] = HTTPRoute
