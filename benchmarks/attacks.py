"""Attacks on an HBONE server, measured: what each costs the server (descriptors, threads,
memory, log lines) and a well-behaved client on the same server (its exchange latency), beside
the same figures with no attack in the same run. docs/hardening.md reports them.

    python benchmarks/attacks.py --json benchmarks/results/attacks.json
    python benchmarks/attacks.py --python /path/to/other/venv/bin/python   # another build

Each attack runs against a fresh ``ambient hbone serve`` (release build, started with the given
Python), which sends every stream to its CONNECT authority. The attacker is python-hyper h2 over
the standard ssl module with a certificate of the server's trust domain: an authenticated peer
gone bad, the worst case. Attacks:

- ``rapid_reset``: 2,000 CONNECTs to an upstream that never answers (a listener whose backlog is
  full), each reset 100 ms later — the server must stop each upstream connect;
- ``rapid_reset_sustained``: for 8 s, CONNECT and reset at once, as fast as possible, reconnecting
  whenever the server closes the connection — counted: resets sent, upstream connections the
  server made;
- ``garbage_handshakes``: 5 s of connections sending garbage instead of a TLS ClientHello —
  counted: log lines the server wrote;
- ``idle_sockets``: 2,000 TCP connections that never start TLS.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import resource
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events

from ambient.hbone import DataPlane, HboneTarget
from ambient.identity import CertificateAuthority
from ambient.testing import App, exchange

SERVER_ID = "spiffe://cluster.local/ns/bench/sa/server"
ATTACKER_ID = "spiffe://cluster.local/ns/bench/sa/attacker"
GOOD_ID = "spiffe://cluster.local/ns/bench/sa/good"


def proc(pid: int) -> dict[str, int]:
    rss = next(
        int(line.split()[1])
        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if line.startswith("VmRSS:")
    )
    return {
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "threads": len(os.listdir(f"/proc/{pid}/task")),
        "rss_kib": rss,
    }


class Server:
    """``ambient hbone serve`` in a subprocess, its stderr counted."""

    def __init__(self, python: str, ca_dir: Path, extra: list[str]) -> None:
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        self.process = subprocess.Popen(
            # -P: the ambient of that Python, not the one in the current directory.
            [python, "-P", "-m", "ambient", "hbone", "serve", "--listen", "127.0.0.1:0",
             "--ca-dir", str(ca_dir), "--identity", SERVER_ID, *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard)),
        )  # fmt: skip
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        host, _, port = line.split()[1].rpartition(":")
        self.address = (host, int(port))
        self.log_lines = 0
        self.log_bytes = 0
        threading.Thread(target=self._count, daemon=True).start()

    def _count(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.log_lines += 1
            self.log_bytes += len(line)

    def stats(self) -> dict[str, int]:
        return proc(self.process.pid)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class GoodClient:
    """Exchanges 1 KiB with an echo app through the server, back to back, timing each."""

    def __init__(self, dp: DataPlane, server: tuple[str, int], echo: str) -> None:
        self.target = HboneTarget("{}:{}".format(*server), echo, [SERVER_ID], GOOD_ID)
        self.dp = dp
        self.latencies: list[float] = []
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.perf_counter()
            try:
                sock = self.dp.connect(self.target, timeout=10)
                sock.settimeout(10)
                assert exchange(sock, b"x" * 1024) == b"x" * 1024
                self.latencies.append(time.perf_counter() - started)
            except (OSError, AssertionError):
                self.failures += 1
            time.sleep(0.02)

    def __enter__(self) -> GoodClient:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(15)

    def summary(self) -> dict[str, Any]:
        ms = sorted(x * 1000 for x in self.latencies)
        return {
            "exchanges": len(ms),
            "failures": self.failures,
            "p50_ms": round(statistics.median(ms), 2) if ms else None,
            "p99_ms": round(ms[int(len(ms) * 0.99)], 2) if ms else None,
        }


def tls_client(work: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.load_verify_locations(work / "roots.pem")
    ctx.load_cert_chain(work / "attacker.pem", work / "attacker.key")
    ctx.set_alpn_protocols(["h2"])
    return ctx


async def h2_connection(server: tuple[str, int], ctx: ssl.SSLContext):
    reader, writer = await asyncio.open_connection(*server, ssl=ctx, server_hostname="")
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    writer.write(conn.data_to_send())
    await writer.drain()
    return reader, writer, conn


async def rapid_reset(server, ctx, target: str, count: int, delay: float) -> dict[str, Any]:
    """``count`` CONNECTs to ``target``, each reset ``delay`` s later; returns what came back."""
    reader, writer, conn = await h2_connection(server, ctx)
    goaway = None
    sent = 0
    closed = False

    async def read() -> None:
        nonlocal goaway, closed
        while data := await reader.read(65536):
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ConnectionTerminated):
                    goaway = event.error_code.name if event.error_code else "NO_ERROR"
            writer.write(conn.data_to_send())
        closed = True

    reading = asyncio.create_task(read())
    try:
        for _ in range(count):
            if goaway or closed:
                break
            stream = conn.get_next_available_stream_id()
            conn.send_headers(stream, [(":method", "CONNECT"), (":authority", target)])
            writer.write(conn.data_to_send())
            sent += 1
            asyncio.get_running_loop().call_later(delay, reset, conn, writer, stream)
            if sent % 150 == 0:  # stay under the server's 200 concurrent streams
                await asyncio.sleep(delay * 1.5)
            else:
                await asyncio.sleep(0)
        await asyncio.sleep(delay * 2)
    except (ConnectionError, h2.exceptions.ProtocolError):
        pass
    reading.cancel()
    writer.transport.abort()
    return {"sent": sent, "goaway": goaway}


def reset(conn: h2.connection.H2Connection, writer: asyncio.StreamWriter, stream: int) -> None:
    try:
        conn.reset_stream(stream, h2.errors.ErrorCodes.CANCEL)
        writer.write(conn.data_to_send())
    except (h2.exceptions.ProtocolError, h2.exceptions.StreamClosedError, RuntimeError):
        pass


class Upstreams:
    """An upstream that never answers (its accept queue is full: SYNs are dropped) and one that
    accepts and counts."""

    def __init__(self) -> None:
        self.silent = socket.socket()
        self.silent.bind(("127.0.0.1", 0))
        self.silent.listen(0)
        # Fill its accept queue so later SYNs go unanswered.
        self._fillers = []
        for _ in range(4):
            s = socket.socket()
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect(self.silent.getsockname())
            self._fillers.append(s)
        self.silent_address = "{}:{}".format(*self.silent.getsockname())
        self.counting = socket.create_server(("127.0.0.1", 0), backlog=4096)
        self.counting_address = "{}:{}".format(*self.counting.getsockname())
        self.accepted = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.counting.accept()
            except OSError:
                return
            self.accepted += 1
            conn.close()


def measure(
    name: str,
    attack: Callable[[Server], dict[str, Any]],
    python: str,
    work: Path,
    dp: DataPlane,
    echo: App,
    settle: float = 12.0,
) -> dict[str, Any]:
    server = Server(python, work / "ca", [])
    try:
        time.sleep(0.5)
        before = server.stats()
        with GoodClient(dp, server.address, echo.address) as quiet:
            time.sleep(3)
        peak: dict[str, int] = dict(before)
        stop = threading.Event()

        def watch() -> None:
            while not stop.wait(0.1):
                now = server.stats()
                for k, v in now.items():
                    peak[k] = max(peak[k], v)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        lines_before = server.log_lines
        with GoodClient(dp, server.address, echo.address) as during:
            result = attack(server)
        stop.set()
        watcher.join()
        time.sleep(settle)
        after = server.stats()
        return {
            "attack": name,
            **result,
            "server_before": before,
            "server_peak": peak,
            "server_after": after,
            "log_lines": server.log_lines - lines_before,
            "good_client_quiet": quiet.summary(),
            "good_client_during": during.summary(),
        }
    finally:
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=sys.executable, help="the Python whose ambient runs")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--only", nargs="*", help="attack names to run")
    args = parser.parse_args()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ca = CertificateAuthority.create()
        ca.save(work / "ca")
        attacker = ca.issue(ATTACKER_ID)
        (work / "roots.pem").write_bytes(attacker.roots_pem)
        (work / "attacker.pem").write_bytes(attacker.chain_pem)
        (work / "attacker.key").write_bytes(attacker.key_pem)
        ctx = tls_client(work)
        upstreams = Upstreams()
        echo = App("echo")
        with DataPlane(1) as dp:
            dp.load_identity(ca.issue(GOOD_ID))

            def one_shot(server: Server) -> dict[str, Any]:
                result = asyncio.run(
                    rapid_reset(server.address, ctx, upstreams.silent_address, 2000, 0.1)
                )
                return {"resets_sent": result["sent"], "goaway": result["goaway"]}

            def sustained(server: Server) -> dict[str, Any]:
                upstreams.accepted = 0
                sent, goaways, refused = 0, 0, 0
                deadline = time.monotonic() + 8
                while time.monotonic() < deadline:
                    try:
                        r = asyncio.run(
                            rapid_reset(server.address, ctx, upstreams.counting_address, 400, 0.0)
                        )
                    except (OSError, ssl.SSLError):
                        refused += 1
                        time.sleep(0.01)
                        continue
                    sent += r["sent"]
                    goaways += r["goaway"] is not None
                return {
                    "resets_sent": sent,
                    "goaways": goaways,
                    "connections_refused": refused,
                    "upstream_connections": upstreams.accepted,
                }

            def garbage(server: Server) -> dict[str, Any]:
                n = 0
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline:
                    try:
                        with socket.create_connection(server.address, timeout=2) as s:
                            s.sendall(b"GET / HTTP/1.1\r\n\r\n" * 4)
                            s.recv(100)
                    except OSError:
                        pass
                    n += 1
                return {"garbage_connections": n}

            def idle(server: Server) -> dict[str, Any]:
                socks = []
                for _ in range(2000):
                    try:
                        socks.append(socket.create_connection(server.address, timeout=5))
                    except OSError:
                        break
                time.sleep(3)
                held = server.stats()
                for s in socks:
                    s.close()
                return {"idle_sockets": len(socks), "server_held": held}

            attacks = {
                "rapid_reset": one_shot,
                "rapid_reset_sustained": sustained,
                "garbage_handshakes": garbage,
                "idle_sockets": idle,
            }
            for name, attack in attacks.items():
                if args.only and name not in args.only:
                    continue
                row = measure(name, attack, args.python, work, dp, echo)
                print(json.dumps(row), flush=True)
                rows.append(row)
        echo.close()
    if args.json:
        machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
        args.json.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
