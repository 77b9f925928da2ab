"""In-pod mode: the pods istio-cni hands over on the ZDS socket, matched to the mesh config and
served by ztunnel inside their own network namespaces."""

from __future__ import annotations

import logging
import os
import threading

from ..hbone import Netns
from .proxy import Ztunnel

log = logging.getLogger(__name__)


class PodRefused(Exception):
    """Why a pod the CNI handed over cannot be served (the text goes back in the Ack)."""


class InpodPods:
    """The ZDS handler of one ztunnel: each ``add`` becomes a pod served in its namespace, each
    ``del`` a pod whose connections are closed and whose sockets are released."""

    def __init__(self, ztunnel: Ztunnel) -> None:
        self.ztunnel = ztunnel
        self._lock = threading.Lock()
        # ZDS uid (the pod's Kubernetes UID) -> the workload uid of the mesh config.
        self._workload_of: dict[str, str] = {}

    def _workload_uid(self, uid: str, name: str, namespace: str) -> str:
        """The mesh's workload for a ZDS pod: by uid (the testbed sends the mesh's), else by
        namespace and name (istio-cni sends the Kubernetes UID, which mesh files rarely carry);
        raises :class:`PodRefused` saying why there is none to serve."""
        mesh = self.ztunnel.mesh
        node = self.ztunnel.node
        workload = mesh.workload_by_uid(uid) or next(
            (w for w in mesh.workloads if w.name == name and w.namespace == namespace), None
        )
        if workload is None:
            raise PodRefused(
                f"pod {namespace}/{name} (uid {uid}) is not a pod of node {node} in the mesh config"
            )
        if workload.node != node:
            raise PodRefused(
                f"pod {workload.key} runs on node {workload.node or '(none)'} in the mesh "
                f"config, not on {node}"
            )
        if not workload.in_mesh:
            raise PodRefused(f"pod {workload.key} is not in the mesh (istio.io/dataplane-mode)")
        return workload.uid

    def add_pod(
        self, uid: str, name: str, namespace: str, service_account: str, netns_fd: int
    ) -> str | None:
        # The core takes its own duplicate of the descriptor; ours is closed exactly once, here
        # (the ZDS client closes it only when a handler raises, which this one never does).
        try:
            netns = Netns(netns_fd, f"{namespace}/{name}")
        except (OSError, ValueError) as e:
            return f"pod {namespace}/{name}: {e}"
        finally:
            os.close(netns_fd)
        with self._lock:
            try:
                workload_uid = self._workload_uid(uid, name, namespace)
            except PodRefused as e:
                return str(e)
            self._workload_of[uid] = workload_uid
        try:
            errors = self.ztunnel.add_pod_netns(workload_uid, netns)
        except Exception as e:  # a refused pod must not end the ZDS conversation
            log.exception("ZDS: serving pod %s/%s failed", namespace, name)
            errors = [f"{type(e).__name__}: {e}"]
        if errors:
            return f"pod {namespace}/{name}: " + "; ".join(errors)
        log.info("ZDS: serving pod %s/%s in net:[%s]", namespace, name, netns.inode)
        return None

    def keep_pod(self, uid: str) -> str | None:
        with self._lock:
            known = uid in self._workload_of
        return None if known else f"keep for unknown pod uid {uid}"

    def del_pod(self, uid: str) -> str | None:
        with self._lock:
            workload_uid = self._workload_of.pop(uid, None)
        if workload_uid is None or not self.ztunnel.remove_pod_netns(workload_uid):
            return f"del for unknown pod uid {uid}"
        log.info("ZDS: pod %s removed", uid)
        return None

    def snapshot_sent(self, kept: set[str]) -> str | None:
        """The CNI has re-sent every pod it knows: the others are gone."""
        with self._lock:
            gone = [uid for uid in self._workload_of if uid not in kept]
        for uid in gone:
            self.del_pod(uid)
        return None
