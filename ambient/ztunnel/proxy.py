"""ztunnel, the node proxy: listeners for every in-mesh pod of its node, per-connection decisions
from the routing functions over the current mesh snapshot, and the compiled core moving the bytes.

Per in-mesh pod, on the pod's IP (Istio's ports):

- 15008: HBONE in (mutual TLS as the pod's identity, CONNECT per connection);
- 15006: plaintext in (after in-pod redirection; the original destination via SO_ORIGINAL_DST);
- 15001: captured outbound (same);
- 15080: SOCKS5 outbound, the entry of loopback mode where nothing captures.

In in-pod mode (``inpod=True``, pods handed over by istio-cni's ZDS protocol with their network
namespace) the same listeners are opened inside each pod's namespace on the wildcard address (the
rules REDIRECT to them), connections leave from the pod's own namespace with its IP, and the
connection to the app comes from the client's IP (``IP_TRANSPARENT``).

In loopback mode a pod with an app address (``ambient.dev/app-address``) also has its app ports
on its pod IP owned by ztunnel, as the capture would: a client outside the mesh reaches them in
plaintext, and ztunnel forwards to the app address.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import logging
import random
import threading
from collections.abc import Callable
from typing import Any

from .. import routing
from .._core import Counters, LogTemplate, RememberedDecisions
from .._fast.hbone_request import InboundDispatcher
from ..hbone import (
    Allow,
    DataPlane,
    Deny,
    HboneTarget,
    Listener,
    Netns,
    Reporter,
    Routes,
    StreamRequest,
    TcpTarget,
)
from ..identity.manager import CertificateManager
from ..mesh import IPAddress, Mesh, Service, Workload
from ..policy.engine import Authorizer, Decision, connection
from ..routing import Transport
from ..telemetry.metrics import UNKNOWN, ConnectionMetrics, Labels
from .connection import (
    AccessLog,
    ConnectionInfo,
    access_log_entry,
    early_access_log_entry,
    early_line_template,
    line_template,
)
from .listeners import ListenerKey, PodListeners

log = logging.getLogger(__name__)

# Istio's ztunnel marks its own sockets with 0x539 so the in-pod rules let them through.
PROXY_MARK = 0x539

Plan = HboneTarget | TcpTarget | Deny


def baggage(workload: Workload) -> str:
    """The W3C baggage Istio's ztunnel sends with a CONNECT: who the source is."""
    items = {
        "k8s.cluster.name": workload.cluster_id or "Kubernetes",
        "k8s.namespace.name": workload.namespace,
        "k8s.deployment.name": workload.workload_name or workload.name,
        "service.name": workload.canonical_name or workload.name,
        "service.version": workload.canonical_revision or "latest",
    }
    return ",".join(f"{k}={v}" for k, v in items.items() if v)


def inbound_app_ports(mesh: Mesh, workload: Workload) -> set[int]:
    """The ports the workload's application serves: its Services' target ports and its
    container ports."""
    ports = set(workload.container_ports)
    for _, endpoint in mesh.services_backed_by(workload):
        ports.update(p for p in endpoint.ports.values() if p)
    return ports - routing.PROXY_PORTS


class Ztunnel:
    """The node proxy for ``node``: call :meth:`apply` with each new snapshot."""

    def __init__(
        self,
        node: str,
        dataplane: DataPlane,
        certificates: CertificateManager,
        *,
        loopback: bool = True,
        inpod: bool = False,
        access_log: Callable[[dict[str, Any]], None] | None = None,
        metrics: ConnectionMetrics | None = None,
        rng: random.Random | None = None,
        retry_delays: tuple[float, float] = (1.0, 60.0),
    ) -> None:
        self.node = node
        self.dataplane = dataplane
        self.certificates = certificates
        self.inpod = inpod
        self.loopback = loopback and not inpod
        self.access_log = access_log
        # Lines the core writes itself (no Python per connection), where the log is a file.
        self.core_log = access_log.core() if isinstance(access_log, AccessLog) else None
        self.metrics = metrics if metrics is not None else ConnectionMetrics()
        self.rng = rng or random.Random()
        # The snapshot and its compiled policies, swapped together: decisions read it once.
        self.authorizer = Authorizer(Mesh())
        self.pods: dict[str, PodListeners] = {}
        self.proxy_addresses: frozenset[IPAddress] = frozenset()
        # In-pod mode: the network namespace of each pod the CNI handed over (workload uid).
        self.pod_netns: dict[str, Netns] = {}
        self._apply_lock = threading.RLock()
        # Listeners that failed to open are retried after a delay that doubles up to a maximum.
        self._retry_delays = retry_delays
        self._retry_delay = retry_delays[0]
        self._retry: threading.Timer | None = None
        self._closed = False

    @property
    def mesh(self) -> Mesh:
        return self.authorizer.mesh

    # --- lifecycle ---------------------------------------------------------------------------

    def local_workloads(self, mesh: Mesh) -> dict[str, Workload]:
        """The pods to serve: in-mesh pods of the node (in-pod mode: those the CNI handed over)."""
        return {
            w.uid: w
            for w in mesh.workloads_on(self.node)
            if w.in_mesh and w.ips and (not self.inpod or w.uid in self.pod_netns)
        }

    def add_pod_netns(self, uid: str, netns: Netns) -> list[str]:
        """In-pod mode: serve pod ``uid`` inside ``netns`` (replacing an earlier namespace of
        the same pod); returns the errors that keep it from being served."""
        with self._apply_lock:
            known = self.pod_netns.get(uid)
            if known is None or known.inode != netns.inode:
                # The same namespace sent again (a CNI reconnecting) keeps the pod's listeners.
                self.pod_netns[uid] = netns
            self.apply(self.mesh)
            pod = self.pods.get(uid)
            if pod is None:
                return [f"pod {uid} is not an in-mesh pod of node {self.node} in the mesh config"]
            return pod.errors

    def remove_pod_netns(self, uid: str) -> bool:
        """In-pod mode: stop serving pod ``uid``; its connections are closed and its sockets and
        namespace released. False when it was not known."""
        with self._apply_lock:
            if self.pod_netns.pop(uid, None) is None:
                return False
            self.apply(self.mesh)
            return True

    def apply(self, mesh: Mesh) -> None:
        """Serve ``mesh`` from now on: new connections decide on it; pods that left the node or
        the mesh lose their listeners; new pods get theirs; a pod's listeners change only where
        what they depend on changed, so live connections continue."""
        with self._apply_lock:
            desired = self.local_workloads(mesh)
            self.decide_on(mesh)
            pods = dict(self.pods)
            for uid in [u for u in pods if u not in desired]:
                self._stop_pod(pods.pop(uid), "is no longer served by")
            for uid, workload in desired.items():
                netns = self.pod_netns.get(uid) if self.inpod else None
                pod = pods.get(uid)
                if pod is not None and _inode(pod.netns) != _inode(netns):
                    self._stop_pod(pods.pop(uid), "moved to a new network namespace on")
                    pod = None
                if pod is None:
                    pod = pods[uid] = PodListeners(workload, netns)
                    log.info(
                        "pod %s served by ztunnel %s on %s%s",
                        workload.key,
                        self.node,
                        workload.ips[0],
                        f" in {netns.name}" if netns is not None else "",
                    )
                pod.workload = workload
                # A CA that fails is reported (readiness) and tried again; the pod is served.
                self.certificates.want(str(workload.identity))
                pod.sync(
                    self._listener_specs(workload, netns, mesh),
                    f"cut: a listener of pod {workload.key} changed with the config",
                )
            self.pods = pods  # readers (admin, readiness) see the old set or the new one
            self._forget_departed(mesh)
            # Every answer the listeners remember came from the old snapshot (or the old pods,
            # addresses): forgotten only now, after everything decisions read was swapped.
            self.dataplane.snapshot_changed()
            self._schedule_retry()
        self.recheck_live_connections()

    def _proxy_addresses(self, mesh: Mesh) -> frozenset[IPAddress]:
        """The addresses this proxy serves, for the no-loop check of every outbound connection."""
        addresses = {ip for w in self.local_workloads(mesh).values() for ip in w.ips}
        if self.inpod:
            # In a pod's namespace the proxy also listens on localhost (REDIRECT delivers
            # there): a pod dialing 127.0.0.1:15001 itself must not start a loop.
            addresses |= {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")}
        return frozenset(addresses)

    def decide_on(self, mesh: Mesh) -> None:
        """Make decisions read ``mesh`` (its compiled policies, the addresses served), without
        opening or closing any listener: :meth:`apply` starts with it; tests drive decisions
        this way."""
        with self._apply_lock:
            self.authorizer = Authorizer(mesh)  # decisions read this on every connection
            self.proxy_addresses = self._proxy_addresses(mesh)

    def _stop_pod(self, pod: PodListeners, what: str) -> None:
        pod.close(f"cut: pod {pod.workload.key} {what} ztunnel {self.node}")
        if pod.netns is not None:
            # Pooled HBONE connections dialed from the pod's namespace would keep it alive.
            self.dataplane.core.forget_netns(pod.netns)
        log.info("pod %s removed from ztunnel %s", pod.workload.key, self.node)

    def _forget_departed(self, mesh: Mesh) -> None:
        """Certificates of identities no served pod has any more are dropped (no longer renewed,
        no longer in the data plane); metric label sets of workloads that left the mesh go once
        their connections are closed."""
        needed = {str(p.workload.identity) for p in self.pods.values()}
        for cert in self.certificates.certificates():
            if cert.identity not in needed:
                self.certificates.forget(cert.identity)
        present = {(w.workload_name or w.name, w.namespace) for w in mesh.workloads}
        unknown = (UNKNOWN, UNKNOWN)
        self.metrics.forget(
            lambda labels: all(side == unknown or side in present for side in labels.workloads)
        )

    def _listener_specs(
        self, workload: Workload, netns: Netns | None, mesh: Mesh
    ) -> dict[ListenerKey, Callable[[], Listener]]:
        """Every listener the pod needs, by what it depends on (see :mod:`.listeners`)."""
        uid = workload.uid
        identity = str(workload.identity)
        inode = _inode(netns)
        ip = workload.ips[0]
        at = routing.format_address
        # In-pod mode listens on the wildcard inside the pod (the REDIRECT rules deliver to the
        # address of the interface the packet came in on, 127.0.0.1 for the pod's own
        # connections); SOCKS5 stays on localhost, as in Istio.
        wildcard = ipaddress.ip_address("::" if ip.version == 6 else "0.0.0.0")
        localhost = ipaddress.ip_address("::1" if ip.version == 6 else "127.0.0.1")
        listen_ip = wildcard if netns is not None else ip
        socks_ip = localhost if netns is not None else ip
        hbone = at(listen_ip, routing.HBONE_PORT)
        specs: dict[ListenerKey, Callable[[], Listener]] = {
            ("hbone", hbone, inode, identity): functools.partial(
                self.dataplane.serve,
                hbone,
                identity,
                self._inbound_hbone(uid),
                report=self._reporter(uid, "inbound", "HBONE"),
                netns=netns,
                remember=True,
            )
        }
        outbound = self._outbound(uid)
        # Plain TCP in: where each learns the destination (SO_ORIGINAL_DST after the in-pod
        # REDIRECT, or the SOCKS5 request).
        plain = (
            ("inbound", at(listen_ip, routing.INBOUND_PLAINTEXT_PORT), "original_dst"),
            ("outbound", at(listen_ip, routing.OUTBOUND_CAPTURE_PORT), "original_dst"),
            ("socks5", at(socks_ip, routing.SOCKS5_PORT), "socks5"),
        )
        for role, address, mode in plain:
            inbound = role == "inbound"
            specs[(role, address, inode, None)] = functools.partial(
                self.dataplane.forward,
                address,
                self._inbound_plaintext(uid) if inbound else outbound,
                mode=mode,
                report=self._reporter(uid, "inbound" if inbound else "outbound", "TCP"),
                netns=netns,
                remember=True,
            )
        if self.loopback and workload.app_address is not None:
            # Loopback mode: own the pod's app ports, as the in-pod capture would.
            for port in sorted(inbound_app_ports(mesh, workload)):
                address = at(ip, port)
                specs[("app", address, None, None)] = functools.partial(
                    self.dataplane.forward,
                    address,
                    self._inbound_plaintext(uid),
                    report=self._reporter(uid, "inbound", "TCP"),
                    remember=True,
                )
        return specs

    def _schedule_retry(self) -> None:
        """Retry listeners that failed to open, after a delay doubling up to the maximum."""
        if self._closed or not any(p.failed for p in self.pods.values()):
            self._retry_delay = self._retry_delays[0]
            return
        if self._retry is not None and self._retry.is_alive():
            return
        self._retry = threading.Timer(self._retry_delay, self._retry_failed)
        self._retry.daemon = True
        self._retry.start()
        self._retry_delay = min(self._retry_delay * 2, self._retry_delays[1])

    def _retry_failed(self) -> None:
        with self._apply_lock:
            self._retry = None
            if self._closed:
                return
            for pod in self.pods.values():
                pod.retry()
            self._schedule_retry()

    def close(self, deadline: float = 0.0) -> bool:
        """Drain: every listener stops accepting at once (HBONE connections get GOAWAY), live
        connections get until ``deadline`` seconds to finish, then are closed. True when
        nothing had to be cut."""
        with self._apply_lock:
            self._closed = True
            if self._retry is not None:
                self._retry.cancel()
            self.pods = {}
        drained = self.dataplane.drain(deadline)
        if self.core_log is not None:
            self.core_log.close()  # the last lines (cut connections') reach the file
        return drained

    @property
    def pending(self) -> list[str]:
        """What keeps this proxy from being ready (empty when ready)."""
        return [f"{p.workload.key}: {e}" for p in self.pods.values() for e in p.errors]

    def remembered_decisions(self, uid: str) -> RememberedDecisions:
        """Pod ``uid``'s outbound and inbound HBONE decisions behind the core's per-snapshot
        tables, driven from Python: what its listeners would answer each connection (the
        differential test holds these to the decisions asked afresh)."""
        return RememberedDecisions(self._outbound(uid), InboundDispatcher(self._inbound_hbone(uid)))

    def _about(self, info: ConnectionInfo) -> dict[str, Any]:
        """A plan's ``tag`` (what the connection is) and ``log`` (its access-log line, which the
        core writes when the log is a file)."""
        line = line_template(self.core_log, info) if self.core_log is not None else None
        return {"tag": info, "log": line}

    def _reporter(self, uid: str, direction: str, transport: str) -> Reporter | LogTemplate | None:
        """What one listener of pod ``uid`` reports with: the core's access log (decided
        connections carry their own line; this is the line of one refused before any decision),
        or a Python callback writing a line per connection (``subject`` None for an early one)."""
        if self.access_log is None:
            return None  # nothing to report: the core hands nothing to Python
        if self.core_log is not None:
            workload = self.mesh.workload_by_uid(uid)
            return early_line_template(self.core_log, direction, transport, workload)

        def report(
            subject: Any,
            source: str,
            destination: str,
            sent: int,
            received: int,
            seconds: float,
            error: str | None,
        ) -> None:
            if self.access_log is None:
                return
            if subject is None:
                pod = self.pods.get(uid)
                workload = pod.workload if pod is not None else None
                self.access_log(
                    early_access_log_entry(
                        direction, transport, workload, source, destination, seconds, error
                    )
                )
                return
            info = subject.tag
            if isinstance(info, ConnectionInfo):
                self.access_log(
                    access_log_entry(info, source, destination, sent, received, seconds, error)
                )

        return report

    # --- decisions ---------------------------------------------------------------------------

    def _source_ip(self, workload: Workload) -> str | None:
        # In loopback mode connections leave from the pod's own IP, as they would from its netns.
        return str(workload.ips[0]) if self.loopback else None

    def _outbound(self, uid: str) -> Callable[[str, str], Plan | Routes]:
        """The outbound decision of pod ``uid``: every route to the destination, by weight; the
        core picks one per connection and keeps the answer until the snapshot changes (it
        depends on nothing else)."""

        def route(source: str, destination: str) -> Plan | Routes:
            mesh = self.mesh
            workload = mesh.workload_by_uid(uid)
            if workload is None:
                return Deny("source pod is no longer served by this ztunnel")
            try:
                dst_ip, dst_port = routing.resolve(mesh, destination)
            except ValueError as e:
                info = ConnectionInfo("outbound", "DENY", workload, reason=str(e))
                return Deny(str(e), **self._about(info))
            choices = routing.outbound_choices(
                mesh, workload, dst_ip, dst_port, proxy_addresses=self.proxy_addresses
            )
            if len(choices) == 1:
                return self._plan(workload, choices[0][0])
            return Routes([self._plan(workload, r) for r, _ in choices], [w for _, w in choices])

        return route

    def _plan(self, source: Workload, route: routing.OutboundRoute) -> Plan:
        info = ConnectionInfo(
            direction="outbound",
            transport=route.transport.value,
            source_workload=source,
            source_identity=str(source.identity),
            destination_workload=route.destination,
            destination_service=route.service,
            destination_identity=route.identities[0] if route.identities else None,
            hbone_address=route.dial if route.transport is Transport.HBONE else None,
            hbone_target=route.authority if route.transport is Transport.HBONE else None,
            reason=route.reason,
            waypoint=route.waypoint.key if route.waypoint else None,
        )
        if route.transport is Transport.DENY:
            # Refused before a connection is made (no endpoint, a loop...): as Istio's ztunnel,
            # logged but not counted in the connection metrics.
            return Deny(route.reason, **self._about(info))
        counters = self.metrics.counters(
            Labels.of(
                reporter="source",
                source=source,
                source_principal=str(source.identity),
                destination=route.destination,
                destination_principal=route.identities[0] if route.identities else None,
                service=route.service,
                mutual_tls=route.transport is Transport.HBONE,
            )
        )
        if route.transport is Transport.HBONE:
            assert route.authority is not None
            return HboneTarget(
                route.dial,
                route.authority,
                list(route.identities),
                str(source.identity),
                source_ip=self._source_ip(source),
                headers=[("baggage", baggage(source))],
                forwarded_host=route.service.hostname if route.service else None,
                **self._about(info),
                counters=counters,
            )
        return TcpTarget(
            route.dial,
            source_ip=self._source_ip(source),
            **self._about(info),
            counters=counters,
        )

    def _client_source_ip(self, address: str) -> str | None:
        """Connect to the app from the client's IP where the platform allows it: in-pod mode
        (transparent sockets, the rules route the replies back) and loopback mode (every 127/8
        address is local)."""
        ip = _ip_of(address)
        if ip is None:
            return None
        if self.inpod or (self.loopback and ip.is_loopback):
            return str(ip)
        return None

    def _inbound_hbone(self, uid: str) -> Callable[[StreamRequest], Allow | Deny]:
        def decide(request: StreamRequest) -> Allow | Deny:
            authorizer = self.authorizer
            mesh = authorizer.mesh
            workload = mesh.workload_by_uid(uid)
            if workload is None:
                return Deny("pod is no longer served by this ztunnel", status=503)
            peer_ip = _ip_of(request.peer_address)
            source = mesh.workload_by_ip(peer_ip) if peer_ip is not None else None
            check = routing.inbound_hbone(workload, request.authority)
            service = routing.guess_inbound_service(
                mesh, workload, _port_of(request.authority), _forwarded_host(request.headers)
            )
            info = ConnectionInfo(
                direction="inbound",
                transport="HBONE",
                source_workload=source,
                source_identity=request.peer_identity,
                destination_workload=workload,
                destination_service=service,
                destination_identity=str(workload.identity),
                hbone_address=routing.format_address(workload.ips[0], routing.HBONE_PORT),
                reason=check.reason,
            )

            def counted() -> Counters:
                return self._inbound_counters(
                    source, request.peer_identity, workload, service=service
                )

            if not check.allowed or check.upstream is None or peer_ip is None:
                # A malformed or misdirected request: refused before it is a connection, as
                # Istio's ztunnel, logged but not counted.
                return Deny(
                    check.reason,
                    status=check.status,
                    **self._about(info),
                )
            refusal = routing.waypoint_only_refusal(mesh, workload, request.peer_identity)
            if refusal:
                return Deny(refusal, status=401, **self._about(info), counters=counted())
            decision = self._authorize(
                authorizer, workload, peer_ip, request.authority, request.peer_identity
            )
            info = _with_policy(info, decision)
            if not decision.allowed:
                return Deny(
                    decision.reason,
                    status=401,
                    **self._about(info),
                    counters=counted(),
                )
            return Allow(
                routing.format_address(*check.upstream),
                source_ip=self._client_source_ip(request.peer_address),
                **self._about(info),
                counters=counted(),
            )

        return decide

    def _inbound_plaintext(self, uid: str) -> Callable[[str, str], Plan]:
        def route(source: str, destination: str) -> Plan:
            authorizer = self.authorizer
            mesh = authorizer.mesh
            workload = mesh.workload_by_uid(uid)
            if workload is None:
                return Deny("pod is no longer served by this ztunnel")
            dst_ip, dst_port = routing.resolve(mesh, destination)
            src_ip = _ip_of(source)
            service = routing.guess_inbound_service(mesh, workload, dst_port)
            info = ConnectionInfo(
                direction="inbound",
                transport="TCP",
                source_workload=mesh.workload_by_ip(src_ip) if src_ip is not None else None,
                source_identity=None,  # plaintext carries no identity
                destination_workload=workload,
                destination_service=service,
                destination_identity=str(workload.identity),
            )
            check = routing.inbound_plaintext(workload, dst_ip, dst_port)
            if not check.allowed or check.upstream is None or src_ip is None:
                return Deny(check.reason, **self._about(info))  # logged, not counted (see above)
            counters = self._inbound_counters(
                info.source_workload, None, workload, mutual_tls=False, service=service
            )
            refusal = routing.waypoint_only_refusal(mesh, workload, None)
            if refusal:
                return Deny(refusal, **self._about(info), counters=counters)
            decision = self._authorize(authorizer, workload, src_ip, destination, None)
            info = _with_policy(info, decision)
            if not decision.allowed:
                return Deny(decision.reason, **self._about(info), counters=counters)
            return TcpTarget(
                routing.format_address(*check.upstream),
                source_ip=self._client_source_ip(source),
                **self._about(info),
                counters=counters,
            )

        return route

    def _inbound_counters(
        self,
        source: Workload | None,
        peer: str | None,
        workload: Workload,
        *,
        mutual_tls: bool = True,
        service: Service | None = None,
    ) -> Counters:
        return self.metrics.counters(
            Labels.of(
                reporter="destination",
                source=source,
                source_principal=peer,
                destination=workload,
                destination_principal=str(workload.identity),
                service=service,
                mutual_tls=mutual_tls,
            )
        )

    def _authorize(
        self,
        authorizer: Authorizer,
        workload: Workload,
        source_ip: IPAddress,
        destination: str,
        peer_identity: str | None,
    ) -> Decision:
        dst_ip, dst_port = routing.resolve(authorizer.mesh, destination)
        decision = authorizer.authorize(
            workload, connection(source_ip, dst_ip, dst_port, peer_identity)
        )
        for note in decision.logged:
            log.info("%s -> %s (%s): %s", source_ip, destination, workload.key, note)
        if not decision.allowed:
            log.info(
                "%s -> %s (%s) refused: %s",
                peer_identity or source_ip,
                destination,
                workload.key,
                decision.reason,
            )
        return decision

    def recheck_live_connections(self) -> int:
        """Authorize every live inbound connection again under the current policies and close
        those no longer allowed; returns how many were closed."""
        authorizer = self.authorizer
        closed = 0
        for conn_id, subject, source, destination in self.dataplane.core.connections():
            info = getattr(subject, "tag", None)
            if not isinstance(info, ConnectionInfo) or info.direction != "inbound":
                continue
            workload = info.destination_workload
            current = authorizer.mesh.workload_by_uid(workload.uid) if workload else None
            source_ip = _ip_of(source)
            if current is None or source_ip is None:
                continue
            decision = self._authorize(
                authorizer, current, source_ip, destination, info.source_identity
            )
            if not decision.allowed and self.dataplane.core.close_connection(
                conn_id, f"no longer allowed: {decision.reason}"
            ):
                closed += 1
        return closed


def _with_policy(info: ConnectionInfo, decision: Decision) -> ConnectionInfo:
    if decision.policy is None:
        return info
    return dataclasses.replace(info, policy=decision.policy)


def _inode(netns: Netns | None) -> int | None:
    return netns.inode if netns is not None else None


def _forwarded_host(headers: tuple[tuple[str, str], ...]) -> str | None:
    for name, value in headers:
        if name.lower() == "forwarded":
            return routing.forwarded_host(value)
    return None


def _port_of(address: str) -> int:
    port = address.rpartition(":")[2]
    return int(port) if port.isdigit() else 0


def _ip_of(address: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(address.rpartition(":")[0].strip("[]"))
    except ValueError:
        return None
