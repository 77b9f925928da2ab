"""``ambient demo --netns``: the seed's figure on the testbed, transparent (root).

The embedded ``ambient/examples/testbed-mesh.yaml`` (or ``--config``) becomes network namespaces:
nodes W1 and W2, pods C1 and C2 on W1, C3 and S1 on W2, plus S2 (a second replica of Service
``echo``), ``outside`` (a client outside the mesh) and ``legacy`` (a server outside the mesh).
Every pod that declares a container port runs a plain TCP server that answers with its name; every
other pod is a client and dials every server with a plain socket — a Service's cluster IP when the
server backs one and the client is in the mesh, the pod IP otherwise. Nothing in the pods knows
about the mesh: istio-cni's rules hand their connections to the node's in-pod ztunnel.

For each flow the demo prints which replica answered, the path and transport the ztunnels logged,
the identity the server side saw and the source address the application saw. Then the seed's
second figure, as in loopback mode (``ambient.demo_waypoint``): HTTP requests from the in-mesh
clients to Service ``web``, bound to a waypoint whose pod runs its own ``ambient waypoint``, and
one from outside the mesh straight to a pod IP. It exits 0 only when every flow and request took
the path the seed says it must.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import demo_waypoint
from .demo import load_demo_mesh
from .mesh import Mesh, Service, Workload
from .testbed import TestbedError, netns
from .testbed.pods import ask, connect, inbound_entries, outbound_entries, serve_app
from .testbed.testbed import Testbed
from .testing import App, HttpEcho

APP_PORT = 8080
PAYLOAD = b"hello through the mesh, transparently\n" * 512


@dataclass
class Flow:
    client: Workload
    server: Workload
    service: Service | None
    target: tuple[str, int]
    answered_by: str = ""
    transport: str = ""
    seen_identity: str | None = None
    seen_source: str = ""
    problem: str = ""

    @property
    def label(self) -> str:
        address = f"{self.target[0]}:{self.target[1]}"
        if self.service is not None:
            return f"{self.client.name} -> Service {self.service.name} {address}"
        return f"{self.client.name} -> {self.server.name} via pod IP {address}"


def http_servers(mesh: Mesh) -> set[str]:
    """Pods behind a waypoint: they answer HTTP (demo_waypoint's requests), not the TCP flows."""
    return {e.workload_uid for s in mesh.services if s.waypoint is not None for e in s.endpoints}


def plan_flows(mesh: Mesh) -> list[Flow]:
    """Every client pod (one without container ports) to every server pod's IP, and every
    in-mesh client once to each Service (which endpoint answers is ztunnel's choice). There is
    no kube-proxy on the testbed: outside the mesh, Services are not reachable."""
    http = http_servers(mesh)
    proxies = demo_waypoint.waypoint_pods(mesh)
    servers = [w for w in mesh.workloads if w.container_ports and w.ips and w.uid not in http]
    clients = [
        w for w in mesh.workloads if not w.container_ports and w.ips and w.uid not in proxies
    ]
    flows = [
        Flow(client, server, None, (str(server.ips[0]), APP_PORT))
        for server in servers
        for client in clients
    ]
    for service in mesh.services:
        backends = [w for w in servers if any(e.workload_uid == w.uid for e in service.endpoints)]
        if not service.vips or not backends:
            continue
        target = (str(service.vips[0][1]), next(iter(service.ports)))
        flows += [Flow(c, backends[0], service, target) for c in clients if c.in_mesh]
    return flows


def expected(flow: Flow, server: Workload) -> tuple[str, str | None]:
    """(transport the server side must see, identity it must see): the seed's rules."""
    if flow.client.in_mesh and server.in_mesh:
        return "HBONE", str(flow.client.identity)
    return "TCP", None


def run_flow(bed: Testbed, mesh: Mesh, flow: Flow, apps: dict[str, App]) -> None:
    try:
        answer = ask(flow.client.name, *flow.target, payload=PAYLOAD)
    except OSError as e:
        flow.problem = f"failed: {e}"
        return
    name, _, echoed = answer.partition("\n")
    flow.answered_by = name
    server = next((w for w in mesh.workloads if w.name == name), None)
    if flow.service is None and name != flow.server.name:
        flow.problem = f"a request to {flow.server.name}'s IP was answered by {name}"
        return
    if server is None or echoed.encode() != PAYLOAD:
        flow.problem = f"unexpected answer {answer[:40]!r}"
        return
    flow.seen_source = apps[name].peers[-1][0]
    want_transport, want_identity = expected(flow, server)
    if server.in_mesh:
        entries = inbound_entries(
            bed.proxy(server.node), server.name, source=str(flow.client.ips[0])
        )
        if not entries:
            flow.problem = f"{server.name}'s ztunnel logged no inbound connection"
            return
        flow.transport = entries[-1]["transport"]
        flow.seen_identity = entries[-1].get("src.identity")
    elif flow.client.in_mesh:
        target = f"{flow.target[0]}:{flow.target[1]}"
        entries = outbound_entries(
            bed.proxy(flow.client.node), flow.client.name, destination=target
        )
        flow.transport = entries[-1]["transport"] if entries else "(not logged)"
    else:
        flow.transport = "TCP"  # neither end in the mesh: no ztunnel involved
    if flow.transport != want_transport or flow.seen_identity != want_identity:
        flow.problem = f"expected {want_transport} with identity {want_identity}"
    elif flow.seen_source != str(flow.client.ips[0]):
        flow.problem = f"the app saw {flow.seen_source}, not the client's IP"


def hops(flow: Flow, server: Workload | None) -> str:
    client = flow.client
    if server is None:
        return "?"
    arrive = f"ztunnel {server.node} -> {server.name}" if server.in_mesh else server.name
    if not client.in_mesh:
        return f"{client.name} -> (no capture) -> plaintext -> {arrive}"
    local = " (same node)" if client.node == server.node else ""
    tunnel = "HBONE mTLS" + local if server.in_mesh else "plain TCP"
    return f"{client.name} -> ztunnel {client.node} -> {tunnel} -> {arrive}"


def run(
    config: Path | None = None, *, keep: bool = False, out: Callable[[str], None] = print
) -> int:
    if os.geteuid() != 0:
        out("ambient demo --netns: needs root (network namespaces, iptables); try `sudo`")
        return 2
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ambient-demo-netns-") as tmp:
        workdir = Path(tmp)
        mesh_file = workdir / "mesh.yaml"
        mesh = load_demo_mesh(config, "testbed-mesh.yaml", mesh_file, out)
        if mesh is None:
            return 2
        bed = Testbed([mesh_file], workdir)
        try:
            bed.up()
        except TestbedError as e:
            out(f"ambient demo --netns: {e}")
            return 2
        apps: dict[str, App] = {}
        web: list[HttpEcho] = []
        requests: list[demo_waypoint.HttpRequest] = []
        http = http_servers(mesh)
        try:
            for w in mesh.workloads:
                if w.container_ports and w.uid in http:
                    web.append(serve_http(w.name))
                elif w.container_ports:
                    apps[w.name] = serve_app(w.name, f"name:{w.name}")
            flows = plan_flows(mesh)
            for flow in flows:
                run_flow(bed, mesh, flow, apps)
            requests = demo_waypoint.plan_requests(mesh, lambda w: not w.container_ports)
            for request in requests:
                demo_waypoint.send(request, _from_pod)
            if requests:
                proxies = {node: bed.proxy(node) for node in bed.nodes}
                demo_waypoint.settle(requests, bed.waypoints, proxies, mesh)
            _print(out, mesh, flows, config, time.monotonic() - started)
            demo_waypoint.print_requests(out, requests)
            if requests:
                good = sum(r.ok for r in requests)
                out(f"  {good}/{len(requests)} HTTP requests took the expected path")
            if keep:
                _keep_running(out, bed)
        finally:
            for app in apps.values():
                app.close()
            for server in web:
                server.close()
            problems = bed.down()
            for problem in problems:
                out(f"teardown: {problem}")
    ok = all(not f.problem for f in flows) and all(r.ok for r in requests)
    return 0 if flows and ok else 1


def _from_pod(request: demo_waypoint.HttpRequest) -> socket.socket:
    """A connection made inside the client pod: its capture rules (if any) apply."""
    return connect(request.client.name, *request.target)


def serve_http(pod: str) -> HttpEcho:
    """An HTTP server that answers with its pod's name, on 0.0.0.0:8080 in ``pod``'s namespace."""
    return netns.in_netns(pod, lambda: HttpEcho(pod, ("0.0.0.0", APP_PORT)))


def _print(
    out: Callable[[str], None], mesh: Mesh, flows: list[Flow], config: Path | None, seconds: float
) -> None:
    nodes = sorted({w.node for w in mesh.workloads})
    source = config or "embedded testbed-mesh.yaml"
    out(
        f"ambient demo --netns: {len(mesh.workloads)} pods as network namespaces on "
        f"{len(nodes)} nodes, one in-pod ztunnel per node ({source})"
    )
    for flow in flows:
        server = next((w for w in mesh.workloads if w.name == flow.answered_by), None)
        mark = "BAD" if flow.problem else "ok "
        out(f"  [{mark}] {flow.label}: answered by {flow.answered_by or '-'}")
        out(f"        path: {hops(flow, server)}")
        identity = flow.seen_identity or "none"
        out(
            f"        {flow.transport or '-'}; peer identity seen: {identity}; "
            f"app saw source {flow.seen_source or '-'}"
            + (f"; {flow.problem}" if flow.problem else "")
        )
    good = sum(not f.problem for f in flows)
    out(f"  {good}/{len(flows)} flows took the expected path ({seconds:.1f} s)")


def _keep_running(out: Callable[[str], None], bed: Testbed) -> None:
    import signal
    import threading

    out("the testbed keeps running (Ctrl-C to stop); try, in another shell:")
    out("  ip netns exec c1 curl -s telnet://10.96.0.10:80 <<< hello   (C1 to Service echo)")
    out("  ip netns exec c1 curl -s http://10.96.0.20/   (C1 to Service web, via the waypoint)")
    for node in bed.nodes:
        proxy = bed.proxy(node)
        out(f"  ztunnel {node}: access log {proxy.log_path}")
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
