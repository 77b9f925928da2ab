"""Run ``ambient waypoint`` as a separate process: what the demo and the integration tests use to
stand a waypoint beside the ztunnels of a mesh on one machine."""

from __future__ import annotations

from pathlib import Path

from ..ztunnel.process import ProxyProcess


class WaypointProcess(ProxyProcess):
    """``ambient waypoint --gateway NAMESPACE/NAME``."""

    def __init__(
        self,
        gateway: str,
        mesh_files: list[Path],
        ca_dir: Path,
        workdir: Path,
        *extra: str,
        netns: str | None = None,
    ) -> None:
        self.gateway = gateway
        label = "waypoint-" + gateway.replace("/", "-")
        command = ["waypoint", "--gateway", gateway]
        super().__init__(label, command, mesh_files, ca_dir, workdir, *extra, netns=netns)
