"""ZDS, the protocol istio-cni uses to hand a node's pods to ztunnel.

istio-cni listens on a SOCK_SEQPACKET unix socket; ztunnel connects and says hello, then gets
every pod on the node (each ``add`` carrying the pod's network-namespace fd), ``snapshot_sent``,
and from then on an ``add`` or ``del`` per pod change -- each acked before the next is sent.
:class:`ZdsClient` is ztunnel's side, :class:`ZdsServer` istio-cni's (played by the testbed), and
:mod:`ambient.zds.messages` the wire messages, wire-compatible with Istio's ``proto/zds.proto``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .client import PodHandler, ZdsClient
from .protocol import VERSION_V1

if TYPE_CHECKING:
    from .messages import (
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

# The protobuf message classes and istio-cni's side, imported on first use: a ztunnel needs
# neither (its side decodes with the core), and protobuf's runtime is ~4 MiB resident.
_LAZY = {
    **dict.fromkeys(
        [
            "Ack",
            "AddWorkload",
            "DelWorkload",
            "KeepWorkload",
            "SnapshotSent",
            "WorkloadInfo",
            "WorkloadRequest",
            "WorkloadResponse",
            "ZdsHello",
        ],
        "messages",
    ),
    **dict.fromkeys(["RegisteredPod", "ZdsError", "ZdsServer"], "server"),
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


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
