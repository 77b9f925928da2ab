"""Helpers for testing with ambient: applications that know nothing of the mesh, and waiting on
conditions instead of sleeping. ambient's own tests and ``ambient demo`` use them; so can tests of
code built on it."""

from __future__ import annotations

import collections
import contextlib
import socket
import threading
import time
from collections.abc import Callable


class App:
    """A TCP application on loopback, one thread per connection, that records what it saw.

    ``mode``: "echo" echoes and half-closes after the client did; "count" reads to EOF then
    answers with the byte count; "greet" sends a greeting and half-closes at once, then reads
    to EOF (so the server side finishes first); "name:<text>" sends ``<text>\n`` first, then
    echoes (so a client learns which replica answered).
    """

    def __init__(
        self,
        mode: str = "echo",
        address: tuple[str, int] = ("127.0.0.1", 0),
        *,
        sock: socket.socket | None = None,
    ) -> None:
        """``sock``: serve this listening socket instead (one made in a pod's network namespace,
        say) — ``address`` is then ignored."""
        self.mode = mode
        self.sock = sock if sock is not None else socket.create_server(address, backlog=512)
        host, port = self.sock.getsockname()[:2]
        # Where a local client reaches it: the bound address, or loopback for a wildcard.
        host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.peers: list[tuple[str, int]] = []
        self.received: list[int] = []
        self.closed = threading.Event()
        self.connections_ended = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            with self._lock:
                self.peers.append(peer)
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        total = 0
        try:
            with conn:
                if self.mode == "greet":
                    conn.sendall(b"hello from the app\n")
                    conn.shutdown(socket.SHUT_WR)
                elif self.mode.startswith("name:"):
                    conn.sendall(self.mode[5:].encode() + b"\n")
                while data := conn.recv(1 << 18):
                    total += len(data)
                    if self.mode == "echo" or self.mode.startswith("name:"):
                        conn.sendall(data)
                if self.mode == "count":
                    conn.sendall(str(total).encode())
                if self.mode != "greet":
                    conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        finally:
            with self._lock:
                self.received.append(total)
                self.connections_ended += 1

    def close(self) -> None:
        # shutdown() wakes the thread blocked in accept(); close() alone would leave the socket
        # listening until that accept returns, and the address busy.
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def wait_until(condition: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    """Poll ``condition`` until true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or condition}")
        time.sleep(0.01)


def refused_port() -> str:
    """A loopback address where nothing listens (bound then closed, so the port is free)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"127.0.0.1:{port}"


def exchange(sock: socket.socket, payload: bytes) -> bytes:
    """Send ``payload``, half-close, read the answer to its end."""
    with sock:
        sock.settimeout(30)
        sender = threading.Thread(target=_send_and_shut, args=(sock, payload))
        sender.start()
        chunks = []
        while data := sock.recv(1 << 18):
            chunks.append(data)
        sender.join()
        return b"".join(chunks)


def _send_and_shut(sock: socket.socket, payload: bytes) -> None:
    try:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # the far side closed first: the reader sees how


class HttpEcho:
    """An HTTP/1.1 server on loopback (the standard library's, which knows nothing of the mesh)
    that answers every request with JSON saying who answered and what arrived: ``pod`` (its
    name), ``method``, ``path`` (with the query), ``headers`` (names lower-cased, a repeated
    header's values joined by ``,``) and ``body_bytes``. Keep-alive; a ``Content-Length`` body
    is read. Request headers steer it: ``x-echo-status`` answers with that code (else
    ``status``), ``x-echo-delay`` (seconds) waits that long first. ``seen`` keeps what the last
    requests were (the JSON answered)."""

    def __init__(
        self, name: str, address: tuple[str, int] = ("127.0.0.1", 0), *, status: int = 200
    ) -> None:
        import http.server
        import json

        echo = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                headers: dict[str, str] = {}
                for key, value in self.headers.items():
                    k = key.lower()
                    headers[k] = f"{headers[k]},{value}" if k in headers else value
                with echo._lock:
                    echo.requests += 1
                time.sleep(float(headers.get("x-echo-delay", "0")))
                summary = {
                    "pod": echo.name,
                    "method": self.command,
                    "path": self.path,
                    "headers": headers,
                    "body_bytes": len(body),
                }
                with echo._lock:
                    echo.seen.append(summary)
                out = json.dumps(summary).encode()
                self.send_response(int(headers.get("x-echo-status", echo.status)))
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.send_header("x-echo-pod", echo.name)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(out)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _answer

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.name = name
        self.status = status
        self.requests = 0
        self.seen: collections.deque[dict[str, object]] = collections.deque(maxlen=100)
        self._lock = threading.Lock()

        class Server(http.server.ThreadingHTTPServer):
            def handle_error(self, request: object, client_address: object) -> None:
                pass  # a client (the proxy) going away mid-request is not the server's error

        self.server = Server(address, Handler)
        self.server.daemon_threads = True
        host, port = self.server.server_address[:2]
        assert isinstance(host, str)  # an IPv4 server's address
        self.address = f"{host}:{port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# --- mesh files and requests for the waypoint's tests ----------------------------------------


def pod_yaml(
    name: str, node: str, ip: str, account: str, extra: str = "", namespace: str = "default"
) -> str:
    """A Pod document (``extra``: more of its metadata, e.g. ``", labels: {app: x}"``)."""
    return f"""
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {namespace}{extra}}}
spec: {{nodeName: {node}, serviceAccountName: {account}}}
status: {{podIP: {ip}}}
---"""


def service_yaml(
    name: str,
    vip: str,
    *,
    app: str = "echo",
    ports: str = "[{name: http, port: 80, targetPort: 8080}]",
    waypoint: str | None = "waypoint",
) -> str:
    """A Service document in ``default``, bound to ``waypoint`` (None: to none)."""
    labels = f", labels: {{istio.io/use-waypoint: {waypoint}}}" if waypoint else ""
    return f"""
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default{labels}}}
spec:
  clusterIP: {vip}
  selector: {{app: {app}}}
  ports: {ports}
---"""


def http_via_ztunnel(
    client: str,
    target: str,
    port: int = 80,
    path: str = "/",
    headers: dict[str, str] | None = None,
    method: str = "GET",
    body: bytes | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """An HTTP/1.1 request from pod ``client`` through its ztunnel's SOCKS5 port (loopback
    mode): the status, the headers (names lower-cased) and the body."""
    import http.client

    from . import socks5

    conn = http.client.HTTPConnection(target, port, timeout=10)
    conn.sock = socks5.connect((client, 15080), (target, port), source=client)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()
