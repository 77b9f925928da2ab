"""``ambient demo``: the seed's figures running on one machine, no root, no files to write.

Nodes W1 and W2, pods C1 and C2 on W1, C3 and S1 on W2, one ztunnel per node (real
``ambient ztunnel`` processes), and a pod outside the mesh — the embedded mesh file
``ambient/examples/demo-mesh.yaml``, or any other given with ``--config``. Every client pod talks to
every server pod (a pod with an app address): an in-mesh client through its ztunnel (SOCKS5, as
loopback mode has no capture) to the server's Service, a client outside the mesh straight to the
server pod's IP. For each flow the demo prints the path, the transport, the identity the server's
ztunnel saw (from its access log) and the bytes each way, and exits 0 only when every flow took
the path the mesh's rules say it must. The seed's second figure follows: HTTP requests through
a waypoint with an HTTPRoute (``ambient.demo_waypoint``).
"""

from __future__ import annotations

import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from . import demo_waypoint, examples, routing, socks5
from .config import ConfigError, load_mesh
from .identity import CertificateAuthority
from .mesh import Mesh, Service, Workload
from .testing import App, HttpEcho, exchange
from .waypoint.process import WaypointProcess
from .ztunnel.process import ZtunnelProcess
from .ztunnel.proxy import inbound_app_ports

PAYLOAD = b"hello through the mesh\n" * 2048  # 47 KiB: several frames each way
READY_TIMEOUT = 20.0
LOG_TIMEOUT = 5.0


@dataclass
class Flow:
    client: Workload
    server: Workload
    service: Service | None
    target: tuple[str, int]  # what the client dials (through SOCKS5 when in the mesh)
    expected_transport: str  # "HBONE" or "TCP"
    result: str = ""
    seen_identity: str | None = None
    sent: int = 0
    received: int = 0
    ok: bool = False

    @property
    def label(self) -> str:
        via = f"Service {self.service.name}" if self.service else "pod IP"
        return (
            f"{self.client.name} -> {self.server.name} via {via} {self.target[0]}:{self.target[1]}"
        )

    def hops(self) -> str:
        client, server = self.client, self.server
        arrival = f"ztunnel {server.node} -> {server.name}"
        if not client.in_mesh:
            return f"{client.name} -> (outside the mesh: no ztunnel) -> plaintext -> {arrival}"
        tunnel = "HBONE mTLS" if self.expected_transport == "HBONE" else "plain TCP"
        local = " (same node)" if client.node == server.node else ""
        return f"{client.name} -> ztunnel {client.node} -> {tunnel}{local} -> {arrival}"


def plan_flows(mesh: Mesh) -> list[Flow]:
    # Pods behind a waypoint answer HTTP: they are the waypoint part's (demo_waypoint).
    behind_waypoint = {
        e.workload_uid for s in mesh.services if s.waypoint is not None for e in s.endpoints
    }
    servers = [
        w
        for w in mesh.workloads
        if w.app_address is not None and w.ips and w.uid not in behind_waypoint
    ]
    proxies = demo_waypoint.waypoint_pods(mesh)
    clients = [
        w
        for w in mesh.workloads
        if w.app_address is None and w.ips and w.node and w.uid not in proxies
    ]
    flows = []
    for server in servers:
        ports = sorted(inbound_app_ports(mesh, server))
        if not ports:
            continue
        service = next(
            (s for s in mesh.services for e in s.endpoints if e.workload_uid == server.uid), None
        )
        for client in clients:
            if client.in_mesh and service is not None and service.vips:
                # Requests to a Service go to one of its endpoints, through the client's ztunnel.
                target = (str(service.vips[0][1]), next(iter(service.ports)))
                flows.append(
                    Flow(client, server, service, target, "HBONE" if server.in_mesh else "TCP")
                )
            else:
                # No kube-proxy in loopback mode: a client outside the mesh dials the pod itself.
                target = (str(server.ips[0]), ports[0])
                flows.append(
                    Flow(
                        client,
                        server,
                        None,
                        target,
                        "HBONE" if client.in_mesh and server.in_mesh else "TCP",
                    )
                )
    return flows


def _inbound_entry(proxy: ZtunnelProcess, flow: Flow) -> dict[str, Any] | None:
    entries = proxy.claim_entries(
        lambda e: e.get("direction") == "inbound" and e.get("dst.workload") == flow.server.name,
        LOG_TIMEOUT,
    )
    return entries[0] if entries else None


def run_flow(flow: Flow, proxies: dict[str, ZtunnelProcess]) -> None:
    client_ip = str(flow.client.ips[0])
    try:
        if flow.client.in_mesh:
            proxy = (client_ip, routing.SOCKS5_PORT)
            sock = socks5.connect(proxy, flow.target, source=client_ip)
        else:
            sock = socket.socket()
            sock.settimeout(10)
            sock.bind((client_ip, 0))
            sock.connect(flow.target)
        flow.received = len(exchange(sock, PAYLOAD))
        flow.sent = len(PAYLOAD)
    except OSError as e:
        flow.result = f"failed: {e}"
        return
    server_proxy = proxies.get(flow.server.node)
    entry = _inbound_entry(server_proxy, flow) if server_proxy else None
    if entry is None:
        flow.result = f"{flow.server.name}'s ztunnel logged no inbound connection"
        return
    transport = entry["transport"]
    flow.seen_identity = entry.get("src.identity")
    expected_identity = str(flow.client.identity) if flow.client.in_mesh else None
    flow.ok = (
        transport == flow.expected_transport
        and flow.seen_identity == expected_identity
        and flow.received == flow.sent
        and entry.get("bytes_recv") == flow.sent  # inbound: what the client sent
    )
    security = "HBONE/mTLS" if transport == "HBONE" else "plaintext"
    flow.result = security


def load_demo_mesh(
    config: Path | None, embedded: str, mesh_file: Path, out: Callable[[str], None]
) -> Mesh | None:
    """Copy ``config`` (or the embedded example ``embedded``) to ``mesh_file`` and load it; on
    errors print each one, naming the user's file, and return None."""
    mesh_file.write_text(config.read_text() if config else examples.read(embedded))
    try:
        return load_mesh([mesh_file])
    except ConfigError as e:
        for issue in e.issues:
            out(f"error: {str(issue).replace(str(mesh_file), str(config or embedded))}")
        return None


def run(
    config: Path | None = None, *, keep: bool = False, out: Callable[[str], None] = print
) -> int:
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ambient-demo-") as tmp:
        workdir = Path(tmp)
        mesh_file = workdir / "mesh.yaml"
        mesh = load_demo_mesh(config, "demo-mesh.yaml", mesh_file, out)
        if mesh is None:
            return 2
        CertificateAuthority.create().save(workdir / "ca")
        nodes = sorted({w.node for w in mesh.workloads if w.in_mesh and w.node})
        flows = plan_flows(mesh)
        requests = demo_waypoint.plan_requests(mesh)
        l4_servers = {f.server.uid for f in flows}
        apps: list[App | HttpEcho] = [
            App("echo", (str(w.app_address), port))
            for w in mesh.workloads
            if w.app_address is not None and w.uid in l4_servers
            for port in inbound_app_ports(mesh, w)
        ]
        apps += [
            HttpEcho(w.name, (str(w.app_address), port))
            for w in mesh.workloads
            if w.app_address is not None and w.uid not in l4_servers
            for port in inbound_app_ports(mesh, w)
        ]
        proxies = {
            node: ZtunnelProcess(node, [mesh_file], workdir / "ca", workdir) for node in nodes
        }
        waypoints = {
            w.key: WaypointProcess(w.key, [mesh_file], workdir / "ca", workdir)
            for w in mesh.waypoints
            if w.workload_uids and any(r.waypoint == w.key for r in requests)
        }
        try:
            for proxy in [*proxies.values(), *waypoints.values()]:
                proxy.wait_ready()
            for flow in flows:
                run_flow(flow, proxies)
            for request in requests:
                demo_waypoint.send(request)
            demo_waypoint.settle(requests, waypoints, proxies, mesh)
            _print(out, mesh, flows, proxies, config, time.monotonic() - started, requests)
            if keep:
                # Judging the requests stopped the waypoints (see settle): start them again.
                waypoints = {
                    key: WaypointProcess(key, [mesh_file], workdir / "ca", workdir).wait_ready()
                    for key in waypoints
                }
                _keep_running(out, proxies, mesh_file, config, waypoints)
        finally:
            for proxy in [*proxies.values(), *waypoints.values()]:
                proxy.stop()
            for app in apps:
                app.close()
    results = [f.ok for f in flows] + [r.ok for r in requests]
    return 0 if results and all(results) else 1


def _print(
    out: Callable[[str], None],
    mesh: Mesh,
    flows: list[Flow],
    proxies: dict[str, ZtunnelProcess],
    config: Path | None,
    seconds: float,
    requests: list[demo_waypoint.HttpRequest],
) -> None:
    source = config or "embedded demo-mesh.yaml (ambient demo --show-config)"
    out(
        f"ambient demo: {len(mesh.workloads)} pods on {len(proxies)} nodes, "
        f"one ztunnel per node ({source})"
    )
    for flow in flows:
        mark = "ok " if flow.ok else "BAD"
        identity = flow.seen_identity or "none (no identity)"
        out(f"  [{mark}] {flow.label}")
        out(f"        path: {flow.hops()}")
        out(
            f"        {flow.result}; {flow.server.name}'s ztunnel saw peer: {identity}; "
            f"{flow.sent} B sent, {flow.received} B back"
        )
    demo_waypoint.print_requests(out, requests)
    good = sum(f.ok for f in flows)
    out(f"  {good}/{len(flows)} flows took the expected path")
    if requests:
        good = sum(r.ok for r in requests)
        out(f"  {good}/{len(requests)} HTTP requests took the expected path")
    out(f"  ({seconds:.1f} s)")


def _keep_running(
    out: Callable[[str], None],
    proxies: dict[str, ZtunnelProcess],
    mesh_file: Path,
    config: Path | None,
    waypoints: dict[str, WaypointProcess],
) -> None:
    kept = Path.cwd() / "ambient-demo-mesh.yaml" if config is None else config
    if config is None and not kept.exists():
        kept.write_text(mesh_file.read_text())
    out("the mesh keeps running (Ctrl-C to stop):")
    for node, proxy in proxies.items():
        out(
            f"  ztunnel {node}: admin http://{proxy.admin}/config_dump, "
            f"metrics http://{proxy.metrics}/metrics, "
            f"readiness http://{proxy.readiness}/healthz/ready, access log {proxy.log_path}"
        )
        out(f"    live view: ambient top --admin {proxy.admin} --metrics {proxy.metrics}")
    for key, waypoint in waypoints.items():
        out(
            f"  waypoint {key}: admin http://{waypoint.admin}/config_dump, "
            f"metrics http://{waypoint.metrics}/metrics, access log {waypoint.log_path}"
        )
    out("  send your own traffic: an in-mesh pod's ztunnel takes SOCKS5 on <pod IP>:15080, e.g.")
    out("    curl --socks5 127.10.1.1:15080 telnet://127.10.100.1:80   (as C1, to Service s1)")
    out("    curl --socks5 127.10.1.1:15080 http://127.10.100.2/   (as C1, through the waypoint)")
    out(f"  mesh file: {kept} (edit it and run `ambient demo --config {kept.name}`)")
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    running = [*proxies.values(), *waypoints.values()]
    while not stop.wait(1.0) and all(p.process.poll() is None for p in running):
        pass


def show_config(stream: IO[str]) -> None:
    stream.write(examples.read("demo-mesh.yaml"))


__all__ = ["plan_flows", "run", "show_config"]
