"""Delta ADS, the client side: ztunnel's mesh from istiod (or ``ambient control-plane``) instead
of mesh files, as Istio's ztunnel takes it (``XDS_ADDRESS``).

One stream over gRPC with TLS, the token as ``authorization: Bearer …``; a wildcard subscription
to ``istio.workload.Address`` and ``istio.security.Authorization``, with the versions already
held (``initial_resource_versions``) when it reconnects. Each response is applied to a copy of
the resources held; the copy is turned into a snapshot (:func:`~ambient.xds.translate.
mesh_from_resources`). If that works the response is ACKed and the snapshot applied (the same
path a reloaded file takes: new connections see it, live ones are checked again); if not, it
is NACKed with the reason (``error_detail``) and the last good resources are kept. The first
snapshot is applied once both types have answered. A stream that fails is opened again after
1 s, doubling up to 30 s, and resubscribes.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

from .. import istiod
from ..mesh import Mesh
from . import messages as m
from .server import METHOD
from .translate import ResourceError, mesh_from_resources

log = logging.getLogger(__name__)

INITIAL_BACKOFF = 1.0
MAX_BACKOFF = 30.0
TYPES = (m.ADDRESS_TYPE, m.AUTHORIZATION_TYPE)
INVALID_ARGUMENT = 3  # google.rpc.Code, for a NACK


class XdsClient:
    """Keeps ``apply`` fed with the mesh served at ``address``."""

    def __init__(
        self,
        address: str,
        root_cert: bytes,
        apply: Callable[[Mesh], object],
        *,
        node: str,
        token: Callable[[], str | None] = lambda: None,
        cluster_id: str = "Kubernetes",
        hostname: str | None = None,
    ) -> None:
        import grpc

        self.address = address
        self._apply = apply
        self._token = token
        self._grpc = grpc
        self._channel = istiod.channel(address, root_cert, hostname)
        self._call = self._channel.stream_stream(
            METHOD,
            request_serializer=m.DeltaDiscoveryRequest.SerializeToString,
            response_deserializer=m.DeltaDiscoveryResponse.FromString,
        )
        metadata = m.Struct()
        metadata.update({"NODE_NAME": node, "CLUSTER_ID": cluster_id, "NAMESPACE": "istio-system"})
        self._node = m.Node(
            id=f"ztunnel~0.0.0.0~ztunnel-{node}.istio-system~istio-system.svc.cluster.local",
            cluster=cluster_id,
            metadata=metadata,
        )
        # The resources held (the last good state), per type: name -> (version, resource).
        self._held: dict[str, dict[str, tuple[str, Any]]] = {t: {} for t in TYPES}
        self._answered: set[str] = set()
        self.first_snapshot = threading.Event()
        self.connected = False
        self.error: str | None = None
        self.acks = 0
        self.nacks = 0
        self.applied = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="xds-client", daemon=True)
        self._stream: Any = None

    def start(self) -> XdsClient:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._stream is not None:
            self._stream.cancel()
        self._channel.close()
        self._thread.join(timeout=5)

    def status(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "connected": self.connected,
            "error": self.error,
            "resources": {t.rsplit(".", 1)[-1]: len(h) for t, h in self._held.items()},
            "acks": self.acks,
            "nacks": self.nacks,
            "applied": self.applied,
        }

    def pending(self) -> list[str]:
        if self.first_snapshot.is_set():
            return []
        why = f": {self.error}" if self.error else ""
        return [f"xDS: waiting for the first snapshot from {self.address}{why}"]

    def _run(self) -> None:
        backoff = INITIAL_BACKOFF
        while not self._stop.is_set():
            try:
                self._serve_stream()
                backoff = INITIAL_BACKOFF  # the stream ended cleanly: the server closed it
            except self._grpc.RpcError as e:
                if self._stop.is_set():
                    return
                self.error = f"{e.code().name}: {e.details()}"
                log.warning(
                    "xDS stream to %s failed (%s); again in %.0f s",
                    self.address,
                    self.error,
                    backoff,
                )
            self.connected = False
            if self._stop.wait(backoff):
                return
            backoff = min(backoff * 2, MAX_BACKOFF)

    def _requests(self, outgoing: queue.Queue[Any]) -> Iterator[Any]:
        while True:
            request = outgoing.get()
            if request is None:
                return
            yield request

    def _serve_stream(self) -> None:
        outgoing: queue.Queue[Any] = queue.Queue()
        for type_url in TYPES:
            outgoing.put(
                m.DeltaDiscoveryRequest(
                    node=self._node,
                    type_url=type_url,
                    resource_names_subscribe=["*"],
                    initial_resource_versions={n: v for n, (v, _) in self._held[type_url].items()},
                )
            )
        token = self._token()
        metadata = [("authorization", f"Bearer {token}")] if token else []
        self._stream = self._call(self._requests(outgoing), metadata=metadata)
        try:
            for response in self._stream:
                self.connected, self.error = True, None
                outgoing.put(self._answer(response))
        finally:
            outgoing.put(None)

    def _answer(self, response: Any) -> Any:
        """Apply one response (or refuse it): the ACK or NACK to send."""
        type_url = response.type_url
        reply = m.DeltaDiscoveryRequest(type_url=type_url, response_nonce=response.nonce)
        if type_url not in self._held:
            reply.error_detail.CopyFrom(
                m.Status(code=INVALID_ARGUMENT, message=f"unknown type {type_url}")
            )
            self.nacks += 1
            return reply
        held = dict(self._held[type_url])
        try:
            for r in response.resources:
                if r.resource.type_url != type_url:
                    raise ResourceError(f"resource {r.name}: a {r.resource.type_url} in {type_url}")
                message = m.Address if type_url == m.ADDRESS_TYPE else m.Authorization
                held[r.name] = (r.version, message.FromString(r.resource.value))
            for name in response.removed_resources:
                held.pop(name, None)
            candidate = {**self._held, type_url: held}
            mesh = mesh_from_resources(
                {n: r for n, (_, r) in candidate[m.ADDRESS_TYPE].items()},
                {n: r for n, (_, r) in candidate[m.AUTHORIZATION_TYPE].items()},
                sources=(f"xds://{self.address}",),
            )
        except (ResourceError, ValueError) as e:
            self.nacks += 1
            log.error("xDS: refused a %s update from %s: %s", type_url, self.address, e)
            reply.error_detail.CopyFrom(m.Status(code=INVALID_ARGUMENT, message=str(e)))
            return reply
        self._held[type_url] = held
        self._answered.add(type_url)
        self.acks += 1
        if self._answered == set(TYPES):
            self._apply(mesh)
            self.applied += 1
            self.first_snapshot.set()
        return reply
