"""Delta ADS, the server side: the mesh served to ztunnels (Istio's or ambient's) as istiod serves
it, ``envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources``.

Per stream and per type (``istio.workload.Address``, ``istio.security.Authorization``): the
first request (a wildcard subscription: no names, or ``*``; its ``initial_resource_versions``
say what a reconnecting client already has) is answered with every resource it lacks or has in
another version, and the names it has that no longer exist as ``removed_resources``. Then each
new snapshot (:meth:`XdsServer.update`) sends each stream only what changed for it. A client
answers each response with its nonce: an ACK, or a NACK whose ``error_detail`` is logged and
counted — the server keeps the client's versions as they were, so the refused resources are
sent again with the next change. A resource's version is a digest of its bytes.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import queue
import threading
from collections.abc import Iterator
from typing import Any

from ..mesh import Mesh
from . import messages as m
from .translate import resources

log = logging.getLogger(__name__)

SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
METHOD = f"/{SERVICE}/DeltaAggregatedResources"
TYPES = (m.ADDRESS_TYPE, m.AUTHORIZATION_TYPE)
_WAKE = object()  # a new snapshot: sent to each stream's queue


def _version(resource: Any) -> str:
    return hashlib.sha256(resource.SerializeToString(deterministic=True)).hexdigest()[:16]


class _Snapshot:
    """One mesh as resources, by type then name, with their versions."""

    def __init__(self, addresses: dict[str, Any], authorizations: dict[str, Any], number: int):
        self.number = number
        self.by_type: dict[str, dict[str, tuple[str, Any]]] = {
            m.ADDRESS_TYPE: {n: (_version(r), r) for n, r in addresses.items()},
            m.AUTHORIZATION_TYPE: {n: (_version(r), r) for n, r in authorizations.items()},
        }


class XdsServer:
    """The ADS service over the current snapshot; add :meth:`handler` to a gRPC server."""

    def __init__(self, mesh: Mesh) -> None:
        self._numbers = itertools.count(1)
        self._snapshot = _Snapshot(*resources(mesh), next(self._numbers))
        self._lock = threading.Lock()
        self._streams: list[queue.Queue[Any]] = []
        self.acks = 0
        self.nacks: list[str] = []
        self.pushes = 0
        # The last responses sent: (type, resources, removed), newest last (for tests, top).
        self.sent: list[tuple[str, int, int]] = []

    def update(self, mesh: Mesh) -> None:
        """Serve ``mesh`` from now on: every stream gets what changed."""
        self.publish(*resources(mesh))

    def publish(self, addresses: dict[str, Any], authorizations: dict[str, Any]) -> None:
        """Serve these resources (by name) from now on: every stream gets what changed."""
        snapshot = _Snapshot(addresses, authorizations, next(self._numbers))
        with self._lock:
            self._snapshot = snapshot
            streams = list(self._streams)
        for q in streams:
            q.put(_WAKE)

    @property
    def streams(self) -> int:
        with self._lock:
            return len(self._streams)

    def handler(self) -> Any:
        import grpc

        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(
                    self._stream,
                    request_deserializer=m.DeltaDiscoveryRequest.FromString,
                    response_serializer=m.DeltaDiscoveryResponse.SerializeToString,
                )
            },
        )

    def _stream(self, requests: Iterator[Any], context: Any) -> Iterator[Any]:
        events: queue.Queue[Any] = queue.Queue()
        peer = context.peer()
        node = ""

        def read() -> None:
            try:
                for request in requests:
                    events.put(request)
            except Exception as e:  # the stream ended under us: the client went away
                log.debug("xDS stream from %s ended: %s", peer, e)
            events.put(None)

        threading.Thread(target=read, name="xds-read", daemon=True).start()
        with self._lock:
            self._streams.append(events)
        # What this client has, per type: name -> version; None until it subscribed.
        has: dict[str, dict[str, str] | None] = {t: None for t in TYPES}
        # Sent and not yet acknowledged: nonce -> (type, the versions the client would have).
        pending: dict[str, tuple[str, dict[str, str]]] = {}
        nonces = itertools.count(1)
        try:
            while True:
                event = events.get()
                if event is None or not context.is_active():
                    return
                if event is _WAKE:
                    # Policies before the workloads that name them, and a policy's removal after
                    # the workloads stopped naming it: a client never holds a workload whose
                    # policy it does not know (Istio's ztunnel skips such a policy meanwhile).
                    steps = (
                        (m.AUTHORIZATION_TYPE, False),
                        (m.ADDRESS_TYPE, True),
                        (m.AUTHORIZATION_TYPE, True),
                    )
                    # What the client will hold once it ACKs what this wake sends.
                    view = dict(has)
                    for type_url, removals in steps:
                        versions = view[type_url]
                        if versions is None:
                            continue
                        for response in self._push(
                            type_url, versions, pending, nonces, node, removals=removals
                        ):
                            view[type_url] = pending[response.nonce][1]
                            yield response
                    continue
                request = event
                node = request.node.id or node
                type_url = request.type_url
                if type_url not in has:
                    log.warning("xDS: %s (%s) asked for unknown type %s", node, peer, type_url)
                    continue
                if request.response_nonce:
                    sent = pending.pop(request.response_nonce, None)
                    if request.HasField("error_detail"):
                        why = request.error_detail.message
                        self.nacks.append(why)
                        log.warning("xDS: %s NACKed %s: %s", node or peer, type_url, why)
                    elif sent is not None:
                        self.acks += 1
                        has[sent[0]] = sent[1]
                    continue
                # A (re)subscription: the client says what it has.
                names = set(request.resource_names_subscribe)
                if names - {"*"}:
                    log.info(
                        "xDS: %s subscribed to %d names of %s: served as a wildcard",
                        node,
                        len(names),
                        type_url,
                    )
                has[type_url] = dict(request.initial_resource_versions)
                yield from self._push(type_url, has[type_url] or {}, pending, nonces, node, True)
        finally:
            with self._lock:
                self._streams.remove(events)

    def _push(
        self,
        type_url: str,
        versions: dict[str, str],
        pending: dict[str, tuple[str, dict[str, str]]],
        nonces: Iterator[int],
        node: str,
        always: bool = False,
        *,
        removals: bool = True,
    ) -> Iterator[Any]:
        """What the client lacks of the current snapshot, as one response (none if nothing
        changed, unless ``always``: a subscription is answered even when empty); without
        ``removals``, only what is new or changed (the client keeps the rest)."""
        with self._lock:
            snapshot = self._snapshot
        current = snapshot.by_type[type_url]
        changed = [
            m.Resource(name=name, version=version, resource=_any(type_url, resource))
            for name, (version, resource) in sorted(current.items())
            if versions.get(name) != version
        ]
        removed = sorted(name for name in versions if name not in current) if removals else []
        if not changed and not removed and not always:
            return
        nonce = f"{snapshot.number}-{next(nonces)}"
        # What the client holds once it ACKs: the snapshot's, plus, when removals wait, the
        # names it still holds that the snapshot dropped.
        after = {name: version for name, (version, _) in current.items()}
        if not removals:
            after.update({n: v for n, v in versions.items() if n not in current})
        pending[nonce] = (type_url, after)
        self.pushes += 1
        self.sent = [*self.sent[-99:], (type_url, len(changed), len(removed))]
        log.info(
            "xDS: to %s %s: %d resources, %d removed (snapshot %d)",
            node or "a client",
            type_url.rsplit(".", 1)[-1],
            len(changed),
            len(removed),
            snapshot.number,
        )
        yield m.DeltaDiscoveryResponse(
            type_url=type_url,
            resources=changed,
            removed_resources=removed,
            nonce=nonce,
            system_version_info=str(snapshot.number),
        )


def _any(type_url: str, resource: Any) -> Any:
    return m.AnyMessage(type_url=type_url, value=resource.SerializeToString())
