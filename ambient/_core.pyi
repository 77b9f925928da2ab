"""Stubs of the Rust extension `ambient._core` (rust/src). Addresses are 'ip:port' strings."""

from collections.abc import Callable
from typing import Any, TypedDict

__version__: str

def build_profile() -> str:
    """'release' or 'debug'."""

def encode_metrics(
    label_names: list[str],
    flag_index: int,
    series: list[tuple[tuple[str, ...], Counters]],
    families: list[tuple[str, str, bool, list[tuple[list[tuple[str, str]], float]]]],
    histograms: list[tuple[str, str, list[Any]]] = ...,
) -> str: ...
def zds_hello(version: int) -> bytes:
    """The ZdsHello a ztunnel sends first."""

def zds_ack(error: str) -> bytes:
    """The WorkloadResponse acking one request (`error` empty for success)."""

def zds_request(data: bytes) -> tuple[str | None, str, str, str, str]:
    """A WorkloadRequest: (kind, uid, name, namespace, service account); ValueError when the
    bytes are not one."""

def yaml_documents(text: str, max_depth: int) -> list[Any] | None:
    """The documents of `text` as PyYAML's safe loader reads them, or None where PyYAML must read
    it (tags, anchors, YAML 1.1's other scalars, errors, nesting past `max_depth`)."""

def sync_level() -> None:
    """Make the core log at the level Python's `_core` logger has now (call after changing it)."""

def normalize_path(path: str) -> str:
    """A request path as the waypoint normalizes it before authorization and routing."""

def forwarded_host(value: str) -> str | None:
    """The `host=` of a `Forwarded` header, as the core reads it to key remembered answers."""

def log_stats() -> tuple[int, int]:
    """(lines suppressed by the per-call-site rate limit, lines dropped because Python lagged)."""

class CountersSnapshot(TypedDict):
    opened: int
    sent: int
    received: int
    closed: dict[str, int]
    failed: dict[str, int]

class Counters:
    """Connection and byte counters for one set of metric labels (all but the response flag),
    updated by the core; `closed` and `failed` are kept per response flag."""

    def __init__(self) -> None: ...
    def snapshot(self) -> CountersSnapshot:
        """opened, sent, received; closed and failed per flag ("-", DENY, CONNECT, ...)."""
    @property
    def idle(self) -> bool:
        """No connection counted here is open now."""

class HboneTarget:
    """Carry a connection through an HBONE tunnel to `address` (peer:15008), CONNECT to
    `authority`, accepting only a server holding one of `identities`, presenting
    `source_identity`."""

    tag: object
    counters: Counters | None

    def __init__(
        self,
        address: str,
        authority: str,
        identities: list[str],
        source_identity: str,
        *,
        source_ip: str | None = None,
        headers: list[tuple[str, str]] | None = None,
        forwarded_host: str | None = None,
        tag: object = None,
        counters: Counters | None = None,
        log: LogTemplate | None = None,
    ) -> None: ...
    @property
    def address(self) -> str: ...
    @property
    def forwarded_host(self) -> str | None: ...
    @property
    def authority(self) -> str: ...
    @property
    def identities(self) -> list[str]: ...
    @property
    def source_identity(self) -> str: ...
    @property
    def source_ip(self) -> str | None: ...
    @property
    def headers(self) -> list[tuple[str, str]]: ...

class CertificateSigner:
    """A root CA's signing half (see ambient.identity.ca): rcgen over ring."""

    @staticmethod
    def create(
        trust_domain: str, common_name: str, not_before: int, not_after: int
    ) -> CertificateSigner: ...
    @staticmethod
    def load(cert_pem: bytes, key_pem: bytes) -> CertificateSigner: ...
    def issue(self, identity: str, not_before: int, not_after: int) -> tuple[bytes, bytes]: ...
    @property
    def cert_pem(self) -> bytes: ...
    @property
    def key_pem(self) -> bytes: ...
    @property
    def organization(self) -> str | None: ...

class AccessLog:
    """Access-log lines the core writes to (a duplicate of) ``fd``, JSON or ``key=value`` text,
    from a thread of its own; lines are dropped (counted) rather than queued without bound."""

    def __init__(self, fd: int, *, text: bool = False) -> None: ...
    @property
    def written(self) -> int: ...
    @property
    def dropped(self) -> int: ...
    def close(self, timeout: float = 5.0) -> None: ...

class LogTemplate:
    """A decision's access-log line: ``fields`` in order, each value a string or a hole
    (``SOURCE``, ``DESTINATION``) filled per connection; the core appends the byte counts (when
    ``bytes``; swapped when ``flip``), ``duration_ms`` and ``error``."""

    SOURCE: int
    DESTINATION: int

    def __init__(
        self,
        log: AccessLog,
        fields: list[tuple[str, str | int]],
        *,
        flip: bool = False,
        bytes: bool = True,
    ) -> None: ...
    def render(
        self,
        source: str,
        destination: str,
        sent: int,
        received: int,
        seconds: float,
        error: str | None = None,
    ) -> str: ...

class RememberedDecisions:
    """A listener's remembered-decision path driven from Python (the same keys, tables and
    picks; Python asked inline)."""

    def __init__(self, route: OutboundCallback, decide: InboundCallback) -> None: ...
    def outbound(self, source: str, destination: str) -> Plan: ...
    def inbound(
        self,
        peer_identity: str | None,
        authority: str,
        peer_address: str,
        headers: list[tuple[str, str]],
    ) -> Verdict: ...
    def snapshot_changed(self) -> None: ...
    @property
    def asked(self) -> int: ...

class WaypointTable:
    """A waypoint's routing table (JSON from ``ambient.waypoint.table``), swapped whole."""

    def __init__(self, json: str) -> None: ...
    def update(self, json: str) -> None: ...
    @property
    def json(self) -> str: ...
    def counts(self) -> dict[str, int]: ...
    def set_plugin_runner(self, runner: Any) -> None:
        """The object whose ``on_request`` / ``on_response`` run the table's Python filters
        (``ambient.waypoint.plugins.PluginHost``), called on the core's filter threads."""
    def plugin_failures(self) -> dict[tuple[str, str], int]:
        """Failures per (filter, reason): raised, timeout, busy, invalid."""
    def route(
        self,
        target: str,
        method: str,
        path: str,
        query: str | None = None,
        headers: list[tuple[str, str]] = ...,
        client_namespace: str = "",
    ) -> str | None:
        """The rule a request would take (``ns/name#rule``, or the Service itself); None: 404."""
    def authorize(
        self,
        target: str,
        method: str,
        path: str,
        *,
        host: str = "",
        headers: list[tuple[str, str]] = ...,
        source_principal: str = "",
        source_ip: str = "127.0.0.1",
        auth: tuple[str, list[str], str, str] | None = None,
    ) -> tuple[bool, str | None, list[str]]:
        """The AuthorizationPolicies' verdict on a request (path normalized first): allowed,
        the deciding policy, the AUDIT and dry-run policies that matched. ``auth``: a verified
        JWT's (principal, audiences, presenter, claims JSON)."""
    def authenticate(
        self, target: str, headers: list[tuple[str, str]] = ..., path: str = "/"
    ) -> tuple[str | None, tuple[str, list[str], str, str] | None]:
        """The RequestAuthentications' verdict on a request's JWT: (None, auth) for a valid
        token (principal, audiences, presenter, claims JSON) or none; (reason, None) for a 401."""
    def stream_series(
        self,
    ) -> list[tuple[tuple[str, str | None, str, str, str], Counters]]:
        """The TCP ports' streams per series: (source principal, source IP, Service, endpoint,
        endpoint principal) and the counters ztunnel's TCP metrics are made of."""
    def request_series(
        self,
    ) -> list[
        tuple[
            tuple[str, str | None, str, str, str, int, bool, str],
            tuple[float, int, list[tuple[float, int]]],
            tuple[float, int, list[tuple[float, int]]],
            tuple[float, int, list[tuple[float, int]]],
        ]
    ]:
        """Istio's request metrics per series: the key (source principal, source IP, Service,
        endpoint, endpoint principal, code, gRPC, flags) and the duration, request-bytes and
        response-bytes histograms as (sum, count, per-bucket counts with +Inf last)."""

class Routes:
    """Plans by weight: the core picks one per connection (a Service's endpoints by capacity)."""

    def __init__(self, plans: list[Plan], weights: list[int] | None = None) -> None: ...
    @property
    def plans(self) -> list[Plan]: ...
    @property
    def weights(self) -> list[int]: ...
    def __len__(self) -> int: ...

class TcpTarget:
    """Carry a connection as plain TCP to `address`."""

    tag: object
    counters: Counters | None

    def __init__(
        self,
        address: str,
        *,
        source_ip: str | None = None,
        tag: object = None,
        counters: Counters | None = None,
        log: LogTemplate | None = None,
    ) -> None: ...
    @property
    def address(self) -> str: ...
    @property
    def source_ip(self) -> str | None: ...

class Allow:
    """Let an inbound HBONE stream through to `upstream`."""

    tag: object
    counters: Counters | None

    def __init__(
        self,
        upstream: str,
        *,
        source_ip: str | None = None,
        tag: object = None,
        counters: Counters | None = None,
        log: LogTemplate | None = None,
    ) -> None: ...
    @property
    def upstream(self) -> str: ...
    @property
    def source_ip(self) -> str | None: ...

class Deny:
    """Refuse: HBONE streams get `status` (400-599), plain connections are closed."""

    tag: object
    counters: Counters | None

    def __init__(
        self,
        reason: str,
        *,
        status: int = 401,
        tag: object = None,
        counters: Counters | None = None,
        log: LogTemplate | None = None,
    ) -> None: ...
    @property
    def status(self) -> int: ...
    @property
    def reason(self) -> str: ...

Plan = HboneTarget | TcpTarget | Deny
Verdict = Allow | Deny
InboundCallback = Callable[[str | None, str, str, tuple[tuple[str, str], ...]], Verdict]
OutboundCallback = Callable[[str, str], "Plan | Routes"]
# report(subject, source, destination, bytes_sent, bytes_received, seconds, error); subject is
# None for a connection refused before any decision (a failed handshake, a full decision queue...)
Reporter = Callable[[Plan | Verdict | None, str, str, int, int, float, str | None], object]
# A listener reports with a Python callable, or has the core write its early lines itself.
Report = Reporter | LogTemplate

class Netns:
    """A pod's network namespace the core makes sockets in (in-pod mode). ``fd`` is duplicated:
    the caller may close its own."""

    def __init__(self, fd: int, name: str = "") -> None: ...
    @property
    def inode(self) -> int: ...
    @property
    def name(self) -> str: ...

class Listener:
    @property
    def local_address(self) -> str: ...
    @property
    def active(self) -> int: ...
    @property
    def connections(self) -> int:
        """Accepted connections holding a place under the listener's caps now."""
    def close(self, deadline: float = 0.0, reason: str = "cut: the listener was closed") -> bool:
        """Stop accepting, let connections finish until `deadline`, cut the rest with `reason`."""

class Core:
    def __init__(
        self,
        worker_threads: int | None = None,
        *,
        pool_max_streams: int = 100,
        pool_idle_timeout: float = 300.0,
        mark: int | None = None,
        decision_threads: int = 4,
        max_pending_decisions: int = 1024,
        max_connections: int = 10_000,
        max_connections_per_source: int = 1_000,
        hbone_idle_timeout: float = 600.0,
    ) -> None: ...
    def set_identity(
        self, identity: str, chain_pem: bytes, key_pem: bytes, roots_pem: bytes
    ) -> None: ...
    def remove_identity(self, identity: str) -> bool: ...
    def identities(self) -> list[str]: ...
    def serve_hbone(
        self,
        address: str,
        identity: str,
        decide: Verdict | InboundCallback,
        *,
        report: Report | None = None,
        netns: Netns | None = None,
        remember: bool = False,
    ) -> Listener: ...
    def serve_waypoint(
        self,
        address: str,
        identity: str,
        table: WaypointTable,
        *,
        report: Report | None = None,
        netns: Netns | None = None,
        access_log: AccessLog | None = None,
    ) -> Listener:
        """HBONE in as ``identity``; each stream's target checked against ``table`` (421 when
        not bound), its HTTP routed per request, a second HBONE tunnel to the endpoint."""
    def listen(
        self,
        address: str,
        route: Plan | Routes | OutboundCallback,
        *,
        mode: str = "direct",
        report: Report | None = None,
        netns: Netns | None = None,
        remember: bool = False,
    ) -> Listener: ...
    def snapshot_changed(self) -> None:
        """Forget every remembered answer (the snapshot decisions read has changed)."""
    def tunnel_fd(self, fd: int, plan: Plan, on_ready: Callable[[str | None], object]) -> None: ...
    def probe(
        self,
        target: HboneTarget,
        count: int,
        *,
        concurrency: int = 1,
        payload: int = 0,
        fresh_connections: bool = False,
    ) -> dict[str, int | float | str | None]: ...
    def connections(self) -> list[tuple[int, Plan | Verdict, str, str]]: ...
    def close_connection(self, id: int, reason: str) -> bool: ...
    def forget_netns(self, netns: Netns) -> int: ...
    def stats(self) -> dict[str, int]: ...
    def drain(self, deadline: float = 0.0) -> bool: ...
    def close(self, deadline: float = 0.0) -> bool: ...
    @property
    def closed(self) -> bool: ...
