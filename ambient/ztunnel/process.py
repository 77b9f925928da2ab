"""Run ``ambient ztunnel`` as a separate process (one per node) and read its access log: what the
demo and the integration tests use to stand up a mesh on one machine."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, Self

import orjson

# Lines of the process's own output kept for diagnostics once it runs (its logs; the access log
# goes to a file).
OUTPUT_LINES = 2000


class ProxyProcess:
    """``ambient COMMAND...`` (a ztunnel or a waypoint) with its access log in ``workdir``,
    its admin, metrics and readiness endpoints on ports it picks, read from its ready line."""

    def __init__(
        self,
        label: str,
        command: list[str],
        mesh_files: list[Path],
        ca_dir: Path,
        workdir: Path,
        *extra: str,
        netns: str | None = None,
        access_log: bool = True,
    ) -> None:
        """``netns``: run inside that network namespace (the testbed's node namespaces);
        ``access_log=False``: no access log (``--access-log off``; the file stays empty)."""
        self.label = label
        self.log_path = workdir / f"{label}.log"
        self.log_path.touch()
        argv = [
            *(["ip", "netns", "exec", netns] if netns else []),
            sys.executable,
            "-P",
            "-m",
            "ambient",
            *command,
            "--ca-dir",
            str(ca_dir),
            "--admin-address",
            "127.0.0.1:0",
            "--metrics-address",
            "127.0.0.1:0",
            "--readiness-address",
            "127.0.0.1:0",
            "--access-log",
            str(self.log_path) if access_log else "off",
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
        # The proxy appends to its log: a process started again on the same workdir (the
        # testbed's start_proxies) reads only its own lines, not its predecessor's.
        self._offset = self.log_path.stat().st_size
        # Access-log entries read but not yet claimed by a caller looking for others.
        self._unclaimed: list[dict[str, Any]] = []
        self._output: deque[str] = deque(maxlen=OUTPUT_LINES)
        self._readers: list[threading.Thread] = []

    def wait_ready(self) -> Self:
        """Block until the process prints its ``ready`` line; raise with its stderr if it died."""
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.startswith("ready "):
            self.process.kill()
            err = self.process.stderr.read() if self.process.stderr else ""
            raise RuntimeError(f"{self.label} did not start: {line.strip()} {err.strip()}")
        fields = dict(part.split("=", 1) for part in line.split()[1:])
        self.admin = fields["admin"]
        self.metrics = fields["metrics"]
        self.readiness = fields["readiness"]
        # From now on nobody reads the pipes: drain them, or a chatty process would block on a
        # full one. The last lines are kept (:meth:`output`).
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                reader = threading.Thread(target=self._collect, args=(stream,), daemon=True)
                reader.start()
                self._readers.append(reader)
        return self

    def _collect(self, stream: IO[str]) -> None:
        with contextlib.suppress(OSError, ValueError):
            for line in stream:
                self._output.append(line.rstrip("\n"))

    def output(self) -> str:
        """What the process wrote on stdout and stderr since its ready line (the last
        ``OUTPUT_LINES`` lines): its logs."""
        return "\n".join(self._output)

    def new_entries(self) -> list[dict[str, Any]]:
        """Access log lines written since the last call."""
        with open(self.log_path, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]
        self._offset += len(complete)
        return [orjson.loads(line) for line in complete.splitlines() if line.strip()]

    def claim_entries(
        self, match: Callable[[dict[str, Any]], bool], timeout: float = 5.0
    ) -> list[dict[str, Any]]:
        """Wait up to ``timeout`` for access-log entries matching ``match``; return them. Entries
        read on the way that do not match stay for a later call (connections end in any order)."""
        deadline = time.monotonic() + timeout
        while True:
            self._unclaimed.extend(self.new_entries())
            found = [e for e in self._unclaimed if match(e)]
            if found or time.monotonic() >= deadline:
                self._unclaimed = [e for e in self._unclaimed if not match(e)]
                return found
            time.sleep(0.05)

    def forget_entries(self) -> None:
        """Drop what was logged so far: later claims see only newer connections."""
        self.new_entries()
        self._unclaimed = []

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
        for reader in self._readers:  # the pipes end with the process: take its last words
            reader.join(5.0)
        return self.process.returncode


class ZtunnelProcess(ProxyProcess):
    """``ambient ztunnel --node NODE``."""

    def __init__(
        self,
        node: str,
        mesh_files: list[Path],
        ca_dir: Path,
        workdir: Path,
        *extra: str,
        netns: str | None = None,
    ) -> None:
        self.node = node
        command = ["ztunnel", "--node", node]
        super().__init__(
            f"ztunnel-{node}", command, mesh_files, ca_dir, workdir, *extra, netns=netns
        )
