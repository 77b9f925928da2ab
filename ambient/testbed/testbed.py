"""The testbed: a mesh file's nodes and pods as network namespaces on this machine, istio-cni's
in-pod rules in every in-mesh pod, one ``ambient ztunnel`` per node (running in the node's
namespace, in in-pod mode), and the CNI side of the ZDS protocol handing each ztunnel its pods.

Everything it makes is recorded in a state file before it is made, so :func:`down` (and
``ambient testbed down``) removes it all even after a crash half-way through ``up``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..config import load_mesh
from ..identity import CertificateAuthority
from ..identity.ca import ROOT_CERT_FILE
from ..mesh import Mesh, Workload
from ..waypoint.process import WaypointProcess
from ..zds import ZdsServer
from ..ztunnel.process import ZtunnelProcess
from . import netns, network, redirect
from .control_plane import PORT as CONTROL_PLANE_PORT
from .control_plane import ControlPlaneProcess
from .errors import TestbedError
from .topology import NodeNet, PodNet, Topology, plan

log = logging.getLogger(__name__)

STATE_FILE = "testbed.json"
# Seconds a ztunnel gets to drain when the testbed goes down: test connections are short.
DRAIN_DEADLINE = 1.0
# How long `down` waits for the process that owns the testbed to take it down itself.
OWNER_STOP_TIMEOUT = 20.0


@dataclass
class NodeProxy:
    """One node's ztunnel and the CNI socket it takes its pods from."""

    node: NodeNet
    zds: ZdsServer
    process: ZtunnelProcess | None = None


@dataclass
class Testbed:
    """``Testbed(files, workdir).up()`` … ``.down()``; or ``with Testbed(...) as bed:``.

    ``node_args``: extra ``ambient ztunnel`` arguments per node (e.g. ``--trust-domain``);
    ``waypoint_args``: extra ``ambient waypoint`` arguments (e.g. ``--workers``);
    ``waypoint_access_log=False``: waypoints write no access log (a benchmark's choice).
    """

    __test__ = False  # not a pytest test class, despite its name

    mesh_files: Sequence[Path]
    workdir: Path
    underlay: str = "10.255.0.0/24"
    # Another name lets a second testbed (a benchmark's) exist beside this one.
    underlay_netns: str = "ambient-underlay"
    ztunnel_args: Sequence[str] = ()
    waypoint_args: Sequence[str] = ()
    waypoint_access_log: bool = True
    node_args: Mapping[str, Sequence[str]] = field(default_factory=dict)
    # The ztunnels take the mesh over xDS and their certificates over Istio's CA API from an
    # `ambient control-plane` (in the first node's namespace) instead of the files and the CA.
    xds: bool = False
    mesh: Mesh = field(init=False, default_factory=Mesh)
    control_plane: ControlPlaneProcess | None = field(init=False, default=None)
    topology: Topology | None = field(init=False, default=None)
    nodes: dict[str, NodeProxy] = field(init=False, default_factory=dict)
    # The waypoints the mesh declares: one `ambient waypoint` per waypoint pod, in its namespace.
    waypoints: dict[str, WaypointProcess] = field(init=False, default_factory=dict)

    # --- lifecycle ---------------------------------------------------------------------------

    def up(self) -> Testbed:
        """Build the namespaces, install the rules, start the ztunnels; return once every
        ztunnel has served the CNI's snapshot of its pods. On failure, undo everything."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.mesh = load_mesh(list(self.mesh_files))
        self.topology = topology = plan(
            self.mesh, underlay=self.underlay, underlay_netns=self.underlay_netns
        )
        self._write_state("starting")
        try:
            network.build(topology)
            for pod in topology.pods:
                if pod.in_mesh:
                    redirect.install(pod.netns)
            ca_dir = self.workdir / "ca"
            if not (ca_dir / ROOT_CERT_FILE).exists():
                CertificateAuthority.create().save(ca_dir)
            if self.xds:
                first = topology.nodes[0]
                self.control_plane = ControlPlaneProcess(
                    list(self.mesh_files),
                    ca_dir,
                    f"{first.underlay_ip}:{CONTROL_PLANE_PORT}",
                    netns=first.netns,
                ).wait_ready()
            self._start_proxies(ca_dir)
        except BaseException:
            self.down()
            raise
        self._write_state("ready")
        return self

    def _start_proxies(self, ca_dir: Path) -> None:
        assert self.topology is not None
        for node in self.topology.nodes:
            zds = ZdsServer(self.workdir / "zds" / f"{node.name}.sock")
            zds.start()
            self.nodes[node.name] = NodeProxy(node, zds)
            for pod in node.pods:
                if pod.in_mesh:
                    self._hand_over(zds, pod)
        self._start_ztunnels(ca_dir)
        self._start_waypoints(ca_dir)

    def _start_waypoints(self, ca_dir: Path) -> None:
        """Each pod of each waypoint Gateway runs its own ``ambient waypoint`` inside its network
        namespace (the pod is outside the mesh's capture: it speaks HBONE itself)."""
        for waypoint in self.mesh.waypoints:
            for uid in waypoint.workload_uids:
                workload = self.mesh.workload_by_uid(uid)
                if workload is None or workload.name in self.waypoints:
                    continue
                self.waypoints[workload.name] = WaypointProcess(
                    waypoint.key,
                    list(self.mesh_files),
                    ca_dir,
                    self.workdir,
                    "--drain-deadline",
                    str(DRAIN_DEADLINE),
                    *self.waypoint_args,
                    pod=workload.key,
                    netns=self.pod(workload.name).netns,
                    access_log=self.waypoint_access_log,
                )
                self._write_state("starting")
        for process in self.waypoints.values():
            process.wait_ready()

    def _start_ztunnels(self, ca_dir: Path) -> None:
        for proxy in self.nodes.values():
            if proxy.process is not None:
                continue
            from_control_plane: list[str] = []
            if self.control_plane is not None:
                address = self.control_plane.address
                from_control_plane = [
                    *("--xds-address", address, "--ca-address", address),
                    *("--ca-root-cert", str(ca_dir / ROOT_CERT_FILE)),
                ]
            proxy.process = ZtunnelProcess(
                proxy.node.name,
                [] if self.control_plane is not None else list(self.mesh_files),
                ca_dir,
                self.workdir,
                *from_control_plane,
                "--zds-socket",
                str(proxy.zds.path),
                "--drain-deadline",
                str(DRAIN_DEADLINE),
                *self.ztunnel_args,
                *self.node_args.get(proxy.node.name, ()),
                netns=proxy.node.netns,
            )
            self._write_state("starting")
        for proxy in self.nodes.values():
            assert proxy.process is not None
            proxy.process.wait_ready()

    def stop_proxies(self) -> None:
        """Stop every node's ``ambient ztunnel`` and leave the rest up: the namespaces, the pods'
        rules and each node's CNI socket (``nodes[name].zds.path``), which takes the next node
        proxy that connects and hands it the node's pods. A benchmark runs another ztunnel
        (Istio's) on the same pods this way; :meth:`start_proxies` brings ambient's back."""
        for proxy in self.nodes.values():
            if proxy.process is not None:
                proxy.process.stop()
                proxy.process = None
        self._write_state("ready")

    def start_proxies(self) -> None:
        """Start an ``ambient ztunnel`` on every node that has none (after :meth:`stop_proxies`,
        and once any other proxy on the CNI sockets has gone); return once each has served its
        node's pods."""
        self._start_ztunnels(self.workdir / "ca")
        self._write_state("ready")

    def _hand_over(self, zds: ZdsServer, pod: PodNet) -> None:
        workload = self.workload(pod.name)
        zds.add_pod(
            workload.uid,
            workload.name,
            workload.namespace,
            workload.service_account,
            str(netns.NETNS_DIR / pod.netns),
        )

    def down(self) -> list[str]:
        """Stop the ztunnels and the CNI sockets, remove every namespace; returns what could not
        be removed (empty when all went)."""
        for waypoint in self.waypoints.values():
            waypoint.stop()
        self.waypoints = {}
        for proxy in self.nodes.values():
            if proxy.process is not None:
                proxy.process.stop()
            proxy.zds.close()
        self.nodes = {}
        if self.control_plane is not None:
            self.control_plane.stop()
            self.control_plane = None
        problems = network.teardown(self._netns_names())
        with contextlib.suppress(FileNotFoundError):
            (self.workdir / STATE_FILE).unlink()
        return problems

    def __enter__(self) -> Testbed:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        problems = self.down()
        if problems:
            log.error("testbed teardown left: %s", "; ".join(problems))

    def _netns_names(self) -> list[str]:
        return network.netns_names(self.topology) if self.topology is not None else []

    def _write_state(self, status: str) -> None:
        pids = [p.process.process.pid for p in self.nodes.values() if p.process is not None]
        pids += [w.process.pid for w in self.waypoints.values()]
        if self.control_plane is not None:
            pids.append(self.control_plane.process.pid)
        state = {
            "status": status,
            "netns": self._netns_names(),
            "proxy_pids": pids,  # the ztunnels' and the waypoints'
            "pid": os.getpid(),
        }
        (self.workdir / STATE_FILE).write_text(json.dumps(state, indent=2))

    # --- what tests and the demo use --------------------------------------------------------

    def workload(self, pod: str) -> Workload:
        for w in self.mesh.workloads:
            if w.name == pod:
                return w
        raise TestbedError(f"no pod named {pod!r} in the testbed's mesh")

    def pod(self, name: str) -> PodNet:
        assert self.topology is not None
        for pod in self.topology.pods:
            if pod.name == name:
                return pod
        raise TestbedError(f"no pod named {name!r} in the testbed")

    def waypoint(self, pod: str) -> WaypointProcess:
        """The ``ambient waypoint`` of waypoint pod ``pod``."""
        return self.waypoints[pod]

    def proxy(self, node: str) -> ZtunnelProcess:
        process = self.nodes[node].process
        assert process is not None
        return process

    def remove_pod(self, name: str) -> None:
        """The CNI deletes the pod from its node's ztunnel (ZDS ``del``), as when Kubernetes
        deletes the pod; its namespace stays so the test can look inside."""
        pod = self.pod(name)
        self.nodes[pod.node].zds.del_pod(self.workload(name).uid)

    def add_pod(self, name: str) -> None:
        """The CNI hands the pod (again) to its node's ztunnel (ZDS ``add``)."""
        pod = self.pod(name)
        self._hand_over(self.nodes[pod.node].zds, pod)

    def set_capture(self, name: str, on: bool) -> None:
        """Install or remove the pod's redirection rules (off: the pod talks past ztunnel)."""
        pod = self.pod(name)
        if on and not redirect.installed(pod.netns):
            redirect.install(pod.netns)
        elif not on and redirect.installed(pod.netns):
            redirect.remove(pod.netns)


def down(workdir: Path) -> list[str]:
    """Remove what the testbed recorded in ``workdir`` (``ambient testbed down``, or cleanup
    after a crash): stop its ztunnels and delete its namespaces."""
    state_path = workdir / STATE_FILE
    try:
        state = json.loads(state_path.read_text())
    except FileNotFoundError:
        return []
    owner = state.get("pid")
    if isinstance(owner, int) and owner != os.getpid() and _signal(owner, signal.SIGTERM):
        # The owner (`ambient testbed serve`) takes its testbed down itself; give it the time.
        deadline = time.monotonic() + OWNER_STOP_TIMEOUT
        while time.monotonic() < deadline and _signal(owner, 0):
            time.sleep(0.05)
    for pid in state.get("proxy_pids", state.get("ztunnel_pids", [])):
        _signal(pid, signal.SIGKILL)
    problems = network.teardown(state.get("netns", []))
    state_path.unlink(missing_ok=True)
    return problems


def _signal(pid: int, sig: int) -> bool:
    """Send ``sig`` to ``pid``; False when there is no such process (any more)."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


@contextlib.contextmanager
def running(
    mesh_files: Sequence[Path],
    workdir: Path,
    *,
    ztunnel_args: Sequence[str] = (),
    xds: bool = False,
) -> Iterator[Testbed]:
    """A testbed that always comes down, also when the body fails."""
    bed = Testbed(list(mesh_files), workdir, ztunnel_args=ztunnel_args, xds=xds)
    try:
        yield bed.up()
    finally:
        problems = bed.down()
        if problems:
            raise TestbedError("testbed teardown left: " + "; ".join(problems))


__all__ = ["Testbed", "down", "running"]
