"""``ambient control-plane`` as a process: in the testbed (``ambient testbed up --xds``) it serves
the mesh files over delta xDS and certificates over Istio's CA API from the first node's network
namespace, on that node's underlay address, where every node's ztunnel reaches it; tests and
benchmarks run it on loopback."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
from collections import deque
from pathlib import Path

# istiod's port for both APIs.
PORT = 15012


class ControlPlaneProcess:
    def __init__(
        self,
        mesh_files: list[Path],
        ca_dir: Path,
        listen: str,
        *extra: str,
        netns: str | None = None,
        watch_interval: float = 0.2,
    ) -> None:
        """``extra``: more ``ambient control-plane`` arguments (``--tokens F``)."""
        argv = [
            *(["ip", "netns", "exec", netns] if netns else []),
            sys.executable,
            "-P",
            "-m",
            "ambient",
            "--log-level",
            "info",
            "control-plane",
            "--ca-dir",
            str(ca_dir),
            "--listen",
            listen,
            "--watch-interval",
            str(watch_interval),
            *[arg for f in mesh_files for arg in ("--config", str(f))],
            *extra,
        ]
        self.process = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.address = ""
        self._output: deque[str] = deque(maxlen=2000)
        self._readers: list[threading.Thread] = []

    def wait_ready(self) -> ControlPlaneProcess:
        assert self.process.stdout is not None and self.process.stderr is not None
        line = self.process.stdout.readline()
        if not line.startswith("ready "):
            self.process.kill()
            raise RuntimeError(f"control plane did not start: {line} {self.process.stderr.read()}")
        self.address = line.split()[1].removeprefix("ca=")
        for stream in (self.process.stdout, self.process.stderr):
            reader = threading.Thread(target=self._collect, args=(stream,), daemon=True)
            reader.start()
            self._readers.append(reader)
        return self

    def _collect(self, stream: object) -> None:
        with contextlib.suppress(OSError, ValueError):
            for line in stream:  # type: ignore[attr-defined]
                self._output.append(line.rstrip("\n"))

    def output(self) -> str:
        return "\n".join(self._output)

    def stop(self, timeout: float = 10.0) -> str:
        """SIGTERM (then SIGKILL); returns what it wrote, its last words included."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for reader in self._readers:
            reader.join(timeout)
        return self.output()
