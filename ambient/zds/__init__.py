"""ZDS, the protocol istio-cni uses to hand a node's pods to ztunnel.

istio-cni listens on a SOCK_SEQPACKET unix socket; ztunnel connects and says hello, then gets
every pod on the node (each ``add`` carrying the pod's network-namespace fd), ``snapshot_sent``,
and from then on an ``add`` or ``del`` per pod change -- each acked before the next is sent.
:class:`ZdsClient` is ztunnel's side, :class:`ZdsServer` istio-cni's (played by the testbed), and
:mod:`ambient.zds.messages` the wire messages, wire-compatible with Istio's ``proto/zds.proto``.
"""

from __future__ import annotations

from .client import PodHandler, ZdsClient
from .messages import (
    VERSION_V1,
    Ack,
    AddWorkload,
    DelWorkload,
    KeepWorkload,
    SnapshotSent,
    WorkloadInfo,
    WorkloadRequest,
    WorkloadResponse,
    ZdsHello,
)
from .server import RegisteredPod, ZdsError, ZdsServer

__all__ = [
    "VERSION_V1",
    "Ack",
    "AddWorkload",
    "DelWorkload",
    "KeepWorkload",
    "PodHandler",
    "RegisteredPod",
    "SnapshotSent",
    "WorkloadInfo",
    "WorkloadRequest",
    "WorkloadResponse",
    "ZdsClient",
    "ZdsError",
    "ZdsHello",
    "ZdsServer",
]
