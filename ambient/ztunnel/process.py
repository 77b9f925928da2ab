"""Run ``ambient ztunnel`` as a separate process (one per node) and read its access log: what the
demo and the integration tests use to stand up a mesh on one machine."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson


class ZtunnelProcess:
    """``ambient ztunnel --node NODE`` with its access log in ``workdir``."""

    def __init__(
        self,
        node: str,
        mesh_files: list[Path],
        ca_dir: Path,
        workdir: Path,
        *extra: str,
        netns: str | None = None,
    ) -> None:
        """``netns``: run inside that network namespace (the testbed's node namespaces)."""
        self.node = node
        self.log_path = workdir / f"ztunnel-{node}.log"
        self.log_path.touch()
        argv = [
            *(["ip", "netns", "exec", netns] if netns else []),
            sys.executable,
            "-P",
            "-m",
            "ambient",
            "ztunnel",
            "--node",
            node,
            "--ca-dir",
            str(ca_dir),
            "--admin-address",
            "127.0.0.1:0",
            "--metrics-address",
            "127.0.0.1:0",
            "--readiness-address",
            "127.0.0.1:0",
            "--access-log",
            str(self.log_path),
            *extra,
        ]
        for f in mesh_files:
            argv += ["--config", str(f)]
        self.process = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.admin = ""
        self.metrics = ""
        self.readiness = ""
        self._offset = 0

    def wait_ready(self) -> ZtunnelProcess:
        """Block until the process prints its ``ready`` line; raise with its stderr if it died."""
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.startswith("ready "):
            self.process.kill()
            err = self.process.stderr.read() if self.process.stderr else ""
            raise RuntimeError(f"ztunnel {self.node} did not start: {line.strip()} {err.strip()}")
        fields = dict(part.split("=", 1) for part in line.split()[1:])
        self.admin = fields["admin"]
        self.metrics = fields["metrics"]
        self.readiness = fields["readiness"]
        return self

    def new_entries(self) -> list[dict[str, Any]]:
        """Access log lines written since the last call."""
        with open(self.log_path, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]
        self._offset += len(complete)
        return [orjson.loads(line) for line in complete.splitlines() if line.strip()]

    def signal(self, sig: signal.Signals) -> None:
        self.process.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM (graceful drain), then SIGKILL if it does not exit; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode
