"""Run ``ambient waypoint`` as a separate process: what the demo and the integration tests use to
stand a waypoint beside the ztunnels of a mesh on one machine."""

from __future__ import annotations

from pathlib import Path

from ..ztunnel.process import ProxyProcess


class WaypointProcess(ProxyProcess):
    """``ambient waypoint --gateway NAMESPACE/NAME [--pod NAMESPACE/POD]``: with ``pod`` (and
    ``netns``, the pod's network namespace) one pod of the Gateway, as on the testbed."""

    def __init__(
        self,
        gateway: str,
        mesh_files: list[Path],
        ca_dir: Path,
        workdir: Path,
        *extra: str,
        pod: str | None = None,
        netns: str | None = None,
        access_log: bool = True,
    ) -> None:
        self.gateway = gateway
        self.pod = pod
        label = "waypoint-" + (pod or gateway).replace("/", "-")
        command = ["waypoint", "--gateway", gateway, *(["--pod", pod] if pod else [])]
        super().__init__(
            label, command, mesh_files, ca_dir, workdir, *extra, netns=netns, access_log=access_log
        )
