"""From what users write to the mesh model, the way Istio's control plane builds it for ztunnel.

- A Pod is in the mesh when its own ``istio.io/dataplane-mode`` label is ``ambient``, or its
  namespace's is and the pod's is not ``none``; in-mesh pods receive HBONE, others plain TCP.
- A Service's endpoints are the pods of its namespace that match its selector and have an IP; a
  named ``targetPort`` is resolved per pod from its container ports.
- ztunnel's local config already is this model; it is only re-shaped.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType

from ..mesh import Endpoint, HealthStatus, IPAddress, Protocol, Service, Workload
from ..policy.model import (
    Action,
    Match,
    MatchKind,
    Policy,
    Scope,
    ServiceAccountMatch,
    StringMatch,
)
from . import kubernetes as k8s
from . import waypoints
from . import ztunnel_local as local

DATAPLANE_MODE_LABEL = "istio.io/dataplane-mode"
AMBIENT = "ambient"
NONE = "none"
APP_ADDRESS_ANNOTATION = "ambient.dev/app-address"
CLUSTER_ID = "Kubernetes"  # istiod's default cluster ID
CLUSTER_DOMAIN = "cluster.local"


def pod_in_mesh(pod: k8s.Pod, namespace_labels: Mapping[str, str]) -> bool:
    own = pod.metadata.labels.get(DATAPLANE_MODE_LABEL)
    if own is not None:
        return own == AMBIENT
    if pod.spec.hostNetwork:
        return False  # host-network pods share the node's namespace: nothing to capture
    return namespace_labels.get(DATAPLANE_MODE_LABEL) == AMBIENT


def _canonical(labels: Mapping[str, str], name: str) -> tuple[str, str]:
    """Istio's canonical service name and revision, from the usual labels."""
    service = (
        labels.get("service.istio.io/canonical-name")
        or labels.get("app.kubernetes.io/name")
        or labels.get("app")
        or name
    )
    revision = (
        labels.get("service.istio.io/canonical-revision")
        or labels.get("app.kubernetes.io/version")
        or labels.get("version")
        or "latest"
    )
    return service, revision


def pod_ips(pod: k8s.Pod) -> tuple[IPAddress, ...]:
    ips = [p.ip for p in pod.status.podIPs]
    if pod.status.podIP is not None and pod.status.podIP not in ips:
        ips.insert(0, pod.status.podIP)
    return tuple(ips)


def workload_from_pod(
    pod: k8s.Pod, namespace_labels: Mapping[str, str], trust_domain: str
) -> Workload:
    meta = pod.metadata
    canonical_name, canonical_revision = _canonical(meta.labels, meta.name)
    ready = next((c.status for c in pod.status.conditions if c.type == "Ready"), "True")
    app_address = meta.annotations.get(APP_ADDRESS_ANNOTATION)
    return Workload(
        uid=f"{CLUSTER_ID}//Pod/{meta.namespace}/{meta.name}",
        name=meta.name,
        namespace=meta.namespace or "default",
        ips=pod_ips(pod),
        service_account=pod.spec.serviceAccountName or pod.spec.serviceAccount or "default",
        trust_domain=trust_domain,
        protocol=Protocol.HBONE if pod_in_mesh(pod, namespace_labels) else Protocol.TCP,
        node=pod.spec.nodeName or "",
        cluster_id=CLUSTER_ID,
        canonical_name=canonical_name,
        canonical_revision=canonical_revision,
        workload_name=meta.labels.get("app", meta.name),
        status=HealthStatus.HEALTHY if ready == "True" else HealthStatus.UNHEALTHY,
        labels=MappingProxyType(dict(meta.labels)),
        named_ports=MappingProxyType(
            {p.name: p.containerPort for c in pod.spec.containers for p in c.ports if p.name}
        ),
        container_ports=tuple(
            sorted(
                {
                    p.containerPort
                    for c in pod.spec.containers
                    for p in c.ports
                    if p.protocol == "TCP"
                }
            )
        ),
        app_address=ipaddress.ip_address(app_address) if app_address else None,
        waypoint=waypoints.binding(meta.labels, namespace_labels, meta.namespace or "default"),
        waypoint_only=meta.annotations.get(waypoints.WAYPOINT_ONLY_ANNOTATION, "").lower()
        == "true",
    )


def _selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def service_from_k8s(
    svc: k8s.Service, workloads: Iterable[Workload], namespace_labels: Mapping[str, str]
) -> Service:
    meta, spec = svc.metadata, svc.spec
    namespace = meta.namespace or "default"
    vips: list[IPAddress] = []
    for text in [spec.clusterIP, *spec.clusterIPs]:
        if text is None or text in k8s.CLUSTER_IP_KEYWORDS:
            continue  # headless
        ip = ipaddress.ip_address(text)  # validated: ClusterIP
        if ip not in vips:
            vips.append(ip)
    ports: dict[int, int] = {}
    app_protocols: dict[int, str] = {}
    for p in spec.ports:
        if p.protocol != "TCP":
            continue  # the data plane carries TCP only
        target = p.targetPort
        ports[p.port] = target if isinstance(target, int) else (p.port if target is None else 0)
        # Istio's protocol selection: appProtocol, else the name's prefix before "-".
        declared = p.appProtocol or (p.name.partition("-")[0] if p.name else "")
        if declared:
            app_protocols[p.port] = declared.lower()
    endpoints = []
    if spec.selector:
        for w in workloads:
            if w.namespace != namespace or not w.ips or not _selects(spec.selector, w.labels):
                continue
            mapping = {}
            for p in spec.ports:
                if p.protocol != "TCP":
                    continue
                target = p.targetPort
                if target is None:
                    mapping[p.port] = p.port
                elif isinstance(target, int):
                    mapping[p.port] = target
                elif target in w.named_ports:
                    mapping[p.port] = w.named_ports[target]
            endpoints.append(Endpoint(w.uid, MappingProxyType(mapping)))
    return Service(
        name=meta.name,
        namespace=namespace,
        hostname=f"{meta.name}.{namespace}.svc.{CLUSTER_DOMAIN}",
        vips=tuple(("", ip) for ip in vips),
        ports=MappingProxyType(ports),
        endpoints=tuple(endpoints),
        waypoint=waypoints.binding(meta.labels, namespace_labels, namespace),
        app_protocols=MappingProxyType(app_protocols),
    )


# --- ztunnel's local config ----------------------------------------------------------------


def workload_from_local(w: local.LocalWorkload) -> Workload:
    return Workload(
        uid=w.uid or f"{w.cluster_id or CLUSTER_ID}//Pod/{w.namespace}/{w.name}",
        name=w.name,
        namespace=w.namespace,
        ips=tuple(w.workload_ips),
        service_account=w.service_account,
        trust_domain=w.trust_domain,
        protocol=Protocol(w.protocol),
        node=w.node,
        network=w.network,
        cluster_id=w.cluster_id,
        canonical_name=w.canonical_name or w.name,
        canonical_revision=w.canonical_revision or "latest",
        workload_name=w.workload_name or w.name,
        workload_type=w.workload_type or "pod",
        status=HealthStatus(w.status),
        capacity=w.capacity,
        authorization_policies=tuple(w.authorization_policies),
        # ztunnel's file names the waypoint by address or Service; the loader resolves it.
        waypoint=w.waypoint.destination if w.waypoint else None,
    )


def services_from_local(
    services: Sequence[local.LocalService], workloads: Sequence[local.LocalWorkload]
) -> list[Service]:
    out = []
    for s in services:
        key = local.NamespacedHostname(f"{s.namespace}/{s.hostname}")
        endpoints = tuple(
            Endpoint(workload_from_local(w).uid, MappingProxyType(dict(w.services[key])))
            for w in workloads
            if key in w.services
        )
        vips = []
        for text in s.vips:
            network, _, ip = text.partition("/")
            vips.append((network, ipaddress.ip_address(ip)))
        out.append(
            Service(
                name=s.name,
                namespace=s.namespace,
                hostname=s.hostname,
                vips=tuple(vips),
                ports=MappingProxyType(dict(s.ports)),
                endpoints=endpoints,
                subject_alt_names=tuple(s.subject_alt_names),
                waypoint=s.waypoint.destination if s.waypoint else None,
            )
        )
    return out


def _string_match(m: local.StringMatch) -> StringMatch:
    return StringMatch(MatchKind(m.kind), m.value)


def _match(m: local.RbacMatch) -> Match:
    return Match(
        namespaces=tuple(map(_string_match, m.namespaces)),
        not_namespaces=tuple(map(_string_match, m.not_namespaces)),
        service_accounts=tuple(
            ServiceAccountMatch(a.namespace, a.service_account) for a in m.service_accounts
        ),
        not_service_accounts=tuple(
            ServiceAccountMatch(a.namespace, a.service_account) for a in m.not_service_accounts
        ),
        principals=tuple(map(_string_match, m.principals)),
        not_principals=tuple(map(_string_match, m.not_principals)),
        source_ips=tuple(m.source_ips),
        not_source_ips=tuple(m.not_source_ips),
        destination_ips=tuple(m.destination_ips),
        not_destination_ips=tuple(m.not_destination_ips),
        destination_ports=tuple(m.destination_ports),
        not_destination_ports=tuple(m.not_destination_ports),
    )


def policy_from_local(p: local.LocalPolicy) -> Policy:
    return Policy(
        name=p.name,
        namespace=p.namespace,
        scope=Scope(p.scope),
        action=Action(p.action),
        rules=tuple(tuple(tuple(_match(m) for m in clause) for clause in rule) for rule in p.rules),
        dry_run=p.dry_run,
    )
