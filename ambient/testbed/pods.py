"""Programs that know nothing of the mesh, run inside the testbed's pods — plain TCP servers and
clients — and what tests look at from outside: access logs, metrics, listening sockets, a packet
capture on the link between the nodes. ambient's tests and ``ambient demo --netns`` use them."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

from ..testing import App
from ..ztunnel.process import ZtunnelProcess
from . import netns
from .testbed import Testbed

APP_PORT = 8080
TIMEOUT = 5.0


def serve_app(pod: str, mode: str = "echo") -> App:
    """A plain TCP server in ``pod``'s namespace on 0.0.0.0:8080."""

    def listen() -> socket.socket:
        return socket.create_server(("0.0.0.0", APP_PORT), backlog=128)

    return App(mode, sock=netns.in_netns(pod, listen))


def connect(pod: str, ip: str, port: int) -> socket.socket:
    """A plain TCP connection made inside ``pod`` (so the pod's rules apply to it)."""

    def dial() -> socket.socket:
        sock = socket.socket()
        sock.settimeout(TIMEOUT)
        sock.connect((ip, port))
        return sock

    return netns.in_netns(pod, dial)


def ask(pod: str, ip: str, port: int = APP_PORT, payload: bytes = b"ping\n") -> str:
    """Connect from ``pod``, send ``payload``, half-close, return the whole answer as text
    (a ``name:<pod>`` app answers with its name first)."""
    with connect(pod, ip, port) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while data := sock.recv(65536):
            chunks.append(data)
    return b"".join(chunks).decode(errors="replace")


def refused(pod: str, ip: str, port: int) -> str:
    """What happens to a connection from ``pod`` that the mesh must not carry: '' when it was
    closed without an answer (or never established); the answer otherwise."""
    try:
        return ask(pod, ip, port)
    except OSError:
        return ""


def inbound_entries(
    proxy: ZtunnelProcess,
    pod: str,
    timeout: float = TIMEOUT,
    *,
    source: str | None = None,
    destination: str | None = None,
) -> list[dict[str, Any]]:
    """Access-log entries of ``proxy`` for connections into ``pod`` (from the IP ``source``, to
    ``destination`` ``ip:port``, when given), waiting for one. Narrow it down when earlier
    connections to the pod may still be ending: their lines come when they do."""
    return proxy.claim_entries(
        lambda e: (
            e.get("direction") == "inbound"
            and e.get("dst.workload") == pod
            and (source is None or str(e.get("src.addr", "")).startswith(f"{source}:"))
            and destination in (None, e.get("dst.addr"), e.get("dst.hbone_addr"))
        ),
        timeout,
    )


def outbound_entries(
    proxy: ZtunnelProcess, pod: str, timeout: float = TIMEOUT, *, destination: str | None = None
) -> list[dict[str, Any]]:
    """Access-log entries of ``proxy`` for connections out of ``pod`` (to ``destination``,
    ``ip:port``, when given), waiting for one."""
    return proxy.claim_entries(
        lambda e: (
            e.get("direction") == "outbound"
            and e.get("src.workload") == pod
            and destination in (None, e.get("dst.addr"), e.get("dst.hbone_addr"))
        ),
        timeout,
    )


def metrics(bed: Testbed, node: str) -> str:
    """The node's ztunnel's Prometheus text, fetched inside the node's namespace."""
    proxy = bed.proxy(node)
    url = f"http://{proxy.metrics}/metrics"

    def fetch() -> str:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
            return str(response.read().decode())

    return netns.in_netns(bed.nodes[node].node.netns, fetch)


def listening_ports(pod: str) -> set[int]:
    """TCP ports something listens on inside ``pod``."""
    out = netns.run(["ss", "-Htln"], netns=pod)
    return {int(m.group(1)) for m in re.finditer(r":(\d+)\s", out)}


def namespaces_held(pid: int) -> set[str]:
    """Network namespaces any thread of ``pid`` is in or holds a descriptor of (one opened
    through a ``/run/netns/<name>`` bind mount reads as that path: it is known by its inode)."""
    held = set()
    for link in [*Path(f"/proc/{pid}/task").glob("*/ns/net"), *Path(f"/proc/{pid}/fd").iterdir()]:
        try:
            target = str(link.readlink())
            if "/netns/" in target:
                target = f"net:[{link.stat().st_ino}]"
        except OSError:
            continue
        held.add(target)
    return {h for h in held if h.startswith("net:[")}


def netns_inode(name: str) -> str:
    return f"net:[{(netns.NETNS_DIR / name).stat().st_ino}]"


def capture(bed: Testbed, path: Path) -> subprocess.Popen[bytes]:
    """tcpdump on the links between the nodes (in the underlay namespace), writing ``path``."""
    assert bed.topology is not None
    process = subprocess.Popen(
        [
            *("ip", "netns", "exec", bed.topology.underlay_netns),
            # Every port of the bridge: the bridge's own device sees only what is delivered to
            # it, not the frames it forwards between the nodes. Immediate mode: packets still in
            # the kernel ring when tcpdump is stopped would otherwise never reach the file.
            *("tcpdump", "-i", "any", "--immediate-mode", "-U", "-w", str(path), "tcp"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert process.stderr is not None
    # tcpdump says "listening on ..." once the capture runs (after a note or two).
    said = []
    while line := process.stderr.readline().decode():
        said.append(line)
        if "listening on" in line:
            return process
    process.kill()
    raise RuntimeError(f"tcpdump did not start: {''.join(said)}")


def packets(path: Path, bpf: str) -> list[str]:
    """The packets of a capture matching ``bpf``, one summary line each."""
    out = subprocess.run(
        ["tcpdump", "-nn", "-r", str(path), bpf],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [line for line in out.splitlines() if line.strip()]


def dump(entries: list[dict[str, Any]]) -> str:
    return json.dumps(entries, indent=1)
