"""The waypoint proxy for one waypoint Gateway: call :meth:`Waypoint.apply` with each new snapshot.

Each pod of the Gateway (labelled ``gateway.networking.k8s.io/gateway-name``) gets an HBONE
listener on ``podIP:15008`` speaking as the pod's own identity; the core routes every request by
the table compiled from the snapshot (:mod:`ambient.waypoint.table`) and opens the second tunnel
as that identity too. A new snapshot swaps the table: requests already started finish on the old
one, and listeners stay up unless the pods themselves changed.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from .._core import AccessLog, Listener, WaypointTable
from ..hbone import DataPlane, format_address
from ..identity.manager import CertificateManager
from ..mesh import Mesh, Workload
from . import authn, plugins
from .authz import applies
from .table import HBONE_PORT, bound_services, table_json

log = logging.getLogger(__name__)


@dataclass
class PodListener:
    workload: Workload
    identity: str
    listener: Listener | None = None
    error: str | None = None


class Waypoint:
    """Waypoint ``namespace/name`` of the mesh, served by ``dataplane``.

    ``pods``: serve only these pods of the Gateway (``namespace/name``; default all of them — in
    loopback mode one process stands for every pod, in a pod's network namespace it is one pod).
    ``access_log``: where the core writes a JSON line per request.
    ``trusted_proxies``: addresses of ``x-forwarded-for`` trusted (from its right) for a
    policy's ``remoteIpBlocks`` and ``remote.ip`` (Envoy's ``xff_num_trusted_hops``).
    """

    def __init__(
        self,
        key: str,
        dataplane: DataPlane,
        certificates: CertificateManager,
        *,
        pods: frozenset[str] | None = None,
        access_log: AccessLog | None = None,
        trusted_proxies: int = 0,
        jwks_refresh: float = authn.DEFAULT_REFRESH,
        filter_poll: float = plugins.DEFAULT_POLL,
    ) -> None:
        self.key = key
        self.trusted_proxies = trusted_proxies
        # Remote JWT key sets; a change recompiles the table (`refresh_jwks`).
        self.jwks = authn.JwksCache(jwks_refresh, changed=self.refresh_jwks)
        # Python filters (WasmPlugins): reloaded when their files change.
        self.filters = plugins.PluginHost(changed=self.refresh_jwks, poll=filter_poll)
        self.dataplane = dataplane
        self.certificates = certificates
        self.only_pods = pods
        self.access_log = access_log
        self.table = WaypointTable(table_json(Mesh(), key))
        self.table.set_plugin_runner(self.filters)
        self.mesh = Mesh()
        self.listeners: dict[str, PodListener] = {}
        self._lock = threading.RLock()

    def _table_json(self, mesh: Mesh) -> str:
        return table_json(
            mesh,
            self.key,
            trusted_proxies=self.trusted_proxies,
            jwks=self.jwks,
            filters=self.filters,
        )

    def refresh_jwks(self) -> None:
        """A remote key set (or a filter's file) changed: the same snapshot, recompiled."""
        with self._lock:
            self.table.update(self._table_json(self.mesh))

    def own_pods(self, mesh: Mesh) -> dict[str, Workload]:
        waypoint = mesh.waypoint(self.key)
        if waypoint is None:
            return {}
        pods = {}
        for uid in waypoint.workload_uids:
            workload = mesh.workload_by_uid(uid)
            if workload is None or not workload.ips:
                continue
            if self.only_pods is not None and workload.key not in self.only_pods:
                continue
            pods[uid] = workload
        return pods

    def apply(self, mesh: Mesh) -> None:
        """Route by ``mesh`` from now on; open listeners for new pods, close departed ones'."""
        with self._lock:
            if mesh.waypoint(self.key) is None:
                log.warning(
                    "waypoint %s is not declared in the mesh: it takes no traffic", self.key
                )
            self.filters.update([p for p in mesh.plugins if _serves(p, self.key, mesh)])
            self.table.update(self._table_json(mesh))
            self.mesh = mesh
            desired = self.own_pods(mesh)
            for uid in [u for u in self.listeners if u not in desired]:
                self._close(self.listeners.pop(uid), "the pod left the waypoint")
            for uid, workload in desired.items():
                identity = str(workload.identity)
                current = self.listeners.get(uid)
                if current is not None and (
                    current.identity != identity or current.workload.ips != workload.ips
                ):
                    self._close(self.listeners.pop(uid), "the pod's address or identity changed")
                    current = None
                if current is None:
                    current = self.listeners[uid] = PodListener(workload, identity)
                current.workload = workload
                if current.listener is None:
                    self._open(current)

    def _open(self, pod: PodListener) -> None:
        address = format_address((str(pod.workload.ips[0]), HBONE_PORT))
        try:
            self.certificates.ensure(pod.identity)
            pod.listener = self.dataplane.core.serve_waypoint(
                address, pod.identity, self.table, access_log=self.access_log
            )
            pod.error = None
            log.info("waypoint %s serving pod %s on %s", self.key, pod.workload.key, address)
        except (OSError, ValueError) as e:
            pod.error = f"pod {pod.workload.key}: cannot serve HBONE on {address}: {e}"
            log.error("%s", pod.error)

    def _close(self, pod: PodListener, why: str) -> None:
        if pod.listener is not None:
            log.info("waypoint %s stops serving pod %s: %s", self.key, pod.workload.key, why)
            pod.listener.close(0.0, f"cut: {why}")
            pod.listener = None

    @property
    def pending(self) -> list[str]:
        """Why the waypoint is not ready: pods without a listener."""
        if not self.listeners:
            return [f"waypoint {self.key} has no pod to serve"]
        return [p.error for p in self.listeners.values() if p.error]

    def retry(self) -> None:
        with self._lock:
            for pod in self.listeners.values():
                if pod.listener is None:
                    self._open(pod)

    def close(self, deadline: float = 0.0) -> bool:
        self.jwks.stop()
        self.filters.stop()
        with self._lock:
            return self.dataplane.drain(deadline)


def _serves(plugin: plugins.WaypointPlugin, waypoint: str, mesh: Mesh) -> bool:
    """Does waypoint ``waypoint`` run ``plugin`` (for itself or a Service bound to it)?"""
    return applies(plugin, waypoint, None) or any(
        applies(plugin, waypoint, f"{s.namespace}/{s.name}") for s in bound_services(mesh, waypoint)
    )
