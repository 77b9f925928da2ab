"""Memory of idle HBONE connections on a server: RSS per connection, and whether it comes back.

Starts ``ambient hbone serve`` (release build) with an upstream that accepts and holds, opens N
mutual-TLS HTTP/2 connections to it from this process (python-hyper h2 over the standard ssl
module: an independent client), either with no stream or with one CONNECT stream each, holds them,
then closes them and waits. Prints (and with ``--json`` writes) the server's RSS at each step:

    python benchmarks/idle_connections.py --connections 1000 2000 --streams 0 1

The figure is (RSS held - RSS before) / N, each row on a fresh server; ``retained`` is what is
still above the baseline ``--settle`` seconds after the connections closed. Run it several
times; the machine is noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h2.config
import h2.connection

from ambient.identity import CertificateAuthority

SERVER_ID = "spiffe://cluster.local/ns/bench/sa/server"
CLIENT_ID = "spiffe://cluster.local/ns/bench/sa/client"


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def client_context(workdir: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.load_verify_locations(workdir / "roots.pem")
    ctx.load_cert_chain(workdir / "client.pem", workdir / "client.key")
    ctx.set_alpn_protocols(["h2"])
    return ctx


class Idle:
    """One client connection: handshake, preface, optionally one CONNECT stream, then silence
    (PINGs from the server are answered)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.task: asyncio.Task[None] | None = None

    async def open(self, stream: str | None) -> None:
        self.h2.initiate_connection()
        if stream:
            self.h2.send_headers(1, [(":method", "CONNECT"), (":authority", stream)])
        self.writer.write(self.h2.data_to_send())
        await self.writer.drain()
        if stream:
            while True:
                data = await self.reader.read(65536)
                if not data:
                    raise ConnectionError("closed before the CONNECT response")
                events = self.h2.receive_data(data)
                self.writer.write(self.h2.data_to_send())
                if any(type(e).__name__ == "ResponseReceived" for e in events):
                    break
        self.task = asyncio.create_task(self.answer())

    async def answer(self) -> None:
        try:
            while data := await self.reader.read(65536):
                self.h2.receive_data(data)
                self.writer.write(self.h2.data_to_send())
        except (ConnectionError, h2.exceptions.ProtocolError):
            pass

    def close(self) -> None:
        if self.task:
            self.task.cancel()
        self.writer.transport.abort()


async def open_many(n: int, server: tuple[str, int], ctx: ssl.SSLContext, stream: str | None):
    conns: list[Idle] = []
    sem = asyncio.Semaphore(64)

    async def one() -> None:
        async with sem:
            r, w = await asyncio.open_connection(*server, ssl=ctx, server_hostname="")
            c = Idle(r, w)
            await c.open(stream)
            conns.append(c)

    await asyncio.gather(*(one() for _ in range(n)))
    return conns


def hold_upstream() -> tuple[socket.socket, list[socket.socket]]:
    """An upstream that accepts and holds every connection (a background thread accepts)."""
    import threading

    lst = socket.create_server(("127.0.0.1", 0), backlog=4096)
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                s, _ = lst.accept()
            except OSError:
                return
            held.append(s)

    threading.Thread(target=accept, daemon=True).start()
    return lst, held


async def measure(n: int, streams: int, pid: int, server, ctx, upstream: str, settle: float):
    before = rss_kib(pid)
    fds_before = fds(pid)
    conns = await open_many(n, server, ctx, upstream if streams else None)
    await asyncio.sleep(settle)
    held = rss_kib(pid)
    row = {
        "connections": n,
        "streams_each": streams,
        "rss_before_kib": before,
        "rss_held_kib": held,
        "kib_per_connection": round((held - before) / n, 1),
        "server_threads_held": threads(pid),
        "server_fds_held": fds(pid) - fds_before,
    }
    for c in conns:
        c.close()
    await asyncio.sleep(settle)
    row["rss_after_close_kib"] = rss_kib(pid)
    row["kib_per_connection_retained"] = round((row["rss_after_close_kib"] - before) / n, 1)
    row["server_fds_after_close"] = fds(pid) - fds_before
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, nargs="+", default=[1000, 3000])
    parser.add_argument("--streams", type=int, nargs="+", default=[0, 1], choices=[0, 1])
    parser.add_argument("--settle", type=float, default=3.0, help="seconds to wait at each step")
    parser.add_argument("--json", type=Path, help="write the rows and the machine here")
    parser.add_argument(
        "--python", default=sys.executable, help="the Python whose ambient serves (another build)"
    )
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ca = CertificateAuthority.create()
        ca.save(work / "ca")
        client = ca.issue(CLIENT_ID)
        (work / "roots.pem").write_bytes(client.roots_pem)
        (work / "client.pem").write_bytes(client.chain_pem)
        (work / "client.key").write_bytes(client.key_pem)
        upstream, _held = hold_upstream()
        up = "{}:{}".format(*upstream.getsockname())
        # One client opens them all: lift the per-source cap this measurement is not about
        # (a build without caps has no such flag).
        help_text = subprocess.run(
            [args.python, "-P", "-m", "ambient", "hbone", "serve", "--help"],
            capture_output=True, text=True,
        ).stdout  # fmt: skip
        caps = ["--max-connections-per-source", "0"] if "--max-connections" in help_text else []
        ctx = client_context(work)
        # A fresh server per row: each figure starts from the same idle process.
        for streams in args.streams:
            for n in args.connections:
                proc = subprocess.Popen(
                    # -P: the ambient of that Python, not the one in the current directory.
                    [args.python, "-P", "-m", "ambient", "hbone", "serve",
                     "--listen", "127.0.0.1:0", "--ca-dir", str(work / "ca"),
                     "--identity", SERVER_ID, "--upstream", up, *caps],
                    stdout=subprocess.PIPE, text=True,
                    preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard)),
                )  # fmt: skip
                try:
                    line = proc.stdout.readline() if proc.stdout else ""
                    host, _, port = line.split()[1].rpartition(":")
                    time.sleep(1.0)
                    row = asyncio.run(
                        measure(n, streams, proc.pid, (host, int(port)), ctx, up, args.settle)
                    )
                finally:
                    proc.terminate()
                    proc.wait(10)
                print(json.dumps(row), flush=True)
                rows.append(row)
    if args.json:
        machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
        args.json.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
