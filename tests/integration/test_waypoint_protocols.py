"""The waypoint with the protocols a Service port may speak, each end an implementation that is
not ambient's: gRPC (grpcio client and server, HTTP/2 with trailers, by the port name ``grpc``),
cleartext HTTP/2 with prior knowledge on an ``http`` port (python-hyper's h2),
WebSocket (the ``websockets`` package, an HTTP/1.1 Upgrade carried through), protocol detection
on a port that names none (HTTP parsed, anything else carried as TCP); and a route changed by a
config reload while a request is in flight."""

from __future__ import annotations

import contextlib
import http.client
import json
import signal
import socket
import textwrap
import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import h2.config
import h2.connection
import h2.events
import pytest
from websockets.sync.client import connect as ws_connect
from websockets.sync.server import ServerConnection
from websockets.sync.server import serve as ws_serve

from ambient import socks5
from ambient.identity import CertificateAuthority
from ambient.testing import App, HttpEcho, exchange, wait_until
from ambient.waypoint.process import WaypointProcess
from ambient.ztunnel.process import ZtunnelProcess

CLIENT = "127.62.1.1"

MESH = """
apiVersion: v1
kind: Namespace
metadata: {name: default, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: default}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: v1
kind: Pod
metadata:
  name: waypoint-1
  namespace: default
  labels: {gateway.networking.k8s.io/gateway-name: waypoint, istio.io/dataplane-mode: none}
spec: {nodeName: n3, serviceAccountName: waypoint}
status: {podIP: 127.62.3.1}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: default}
spec: {nodeName: n1, serviceAccountName: client}
status: {podIP: 127.62.1.1}
---
apiVersion: v1
kind: Pod
metadata:
  name: grpc-1
  namespace: default
  labels: {app: grpc}
  annotations: {ambient.dev/app-address: 127.63.2.1}
spec: {nodeName: n2, containers: [{name: c, ports: [{containerPort: 50051}]}]}
status: {podIP: 127.62.2.1}
---
apiVersion: v1
kind: Pod
metadata:
  name: web-1
  namespace: default
  labels: {app: web, version: v1}
  annotations: {ambient.dev/app-address: 127.63.2.2}
spec: {nodeName: n2, containers: [{name: c, ports: [{containerPort: 8080}, {containerPort: 9000}]}]}
status: {podIP: 127.62.2.2}
---
apiVersion: v1
kind: Pod
metadata:
  name: web-2
  namespace: default
  labels: {app: web, version: v2}
  annotations: {ambient.dev/app-address: 127.63.2.3}
spec: {nodeName: n2, containers: [{name: c, ports: [{containerPort: 8080}]}]}
status: {podIP: 127.62.2.3}
---
apiVersion: v1
kind: Pod
metadata:
  name: ws-1
  namespace: default
  labels: {app: ws}
  annotations: {ambient.dev/app-address: 127.63.2.4}
spec: {nodeName: n2, containers: [{name: c, ports: [{containerPort: 8765}]}]}
status: {podIP: 127.62.2.4}
---
apiVersion: v1
kind: Service
metadata: {name: grpc, namespace: default, labels: {istio.io/use-waypoint: waypoint}}
spec: {clusterIP: 127.62.100.1, selector: {app: grpc}, ports: [{name: grpc, port: 50051}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default, labels: {istio.io/use-waypoint: waypoint}}
spec:
  clusterIP: 127.62.100.2
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: web-v1, namespace: default}
spec:
  clusterIP: 127.62.100.4
  selector: {app: web, version: v1}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: web-v2, namespace: default}
spec:
  clusterIP: 127.62.100.5
  selector: {app: web, version: v2}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: ws, namespace: default, labels: {istio.io/use-waypoint: waypoint}}
spec:
  clusterIP: 127.62.100.3
  selector: {app: ws}
  ports: [{name: http-ws, port: 80, targetPort: 8765}]
---
apiVersion: v1
kind: Service
metadata: {name: sniff, namespace: default, labels: {istio.io/use-waypoint: waypoint}}
spec:
  clusterIP: 127.62.100.6
  selector: {app: web, version: v1}
  ports: [{name: web, port: 80, targetPort: 8080}, {name: data, port: 9000, targetPort: 9000}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: web}]
  rules: [{backendRefs: [{name: web-v1, port: 80}]}]
"""


class Forwarder:
    """A local port whose connections are carried to ``destination`` through the client pod's
    SOCKS5 port: how a client that cannot speak SOCKS5 (grpcio) starts inside the pod."""

    def __init__(self, destination: tuple[str, int]) -> None:
        self.destination = destination
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            upstream = socks5.connect((CLIENT, 15080), self.destination, source=CLIENT)
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def grpc_server(address: str) -> grpc.Server:
    def say(request: bytes, context: grpc.ServicerContext) -> bytes:
        context.set_trailing_metadata((("x-trailer", "kept"),))
        return request + b"!"

    def fail(request: bytes, context: grpc.ServicerContext) -> bytes:
        context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")

    def count(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        for i in range(int(request)):
            yield str(i).encode()

    handlers = grpc.method_handlers_generic_handler(
        "test.Echo",
        {
            "Say": grpc.unary_unary_rpc_method_handler(say),
            "Fail": grpc.unary_unary_rpc_method_handler(fail),
            "Count": grpc.unary_stream_rpc_method_handler(count),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handlers,))
    server.add_insecure_port(address)
    server.start()
    return server


def ws_echo(connection: ServerConnection) -> None:
    for message in connection:
        connection.send(f"echo:{message}")


class Env:
    def __init__(self, tmp) -> None:
        self.mesh_file = tmp / "mesh.yaml"
        self.mesh_file.write_text(textwrap.dedent(MESH))
        ca = CertificateAuthority.create()
        ca.save(tmp / "ca")
        self.grpc = grpc_server("127.63.2.1:50051")
        self.http = [
            HttpEcho("web-1", ("127.63.2.2", 8080)),
            HttpEcho("web-2", ("127.63.2.3", 8080)),
        ]
        self.tcp = App("name:web-1", ("127.63.2.2", 9000))
        self.ws = ws_serve(ws_echo, "127.63.2.4", 8765)
        threading.Thread(target=self.ws.serve_forever, daemon=True).start()
        self.nodes = [
            ZtunnelProcess(n, [self.mesh_file], tmp / "ca", tmp).wait_ready() for n in ("n1", "n2")
        ]
        self.waypoint = WaypointProcess(
            "default/waypoint", [self.mesh_file], tmp / "ca", tmp
        ).wait_ready()

    def close(self) -> None:
        for proc in [*self.nodes, self.waypoint]:
            proc.stop()
        self.grpc.stop(0)
        self.ws.shutdown()
        self.tcp.close()
        for app in self.http:
            app.close()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = Env(tmp_path_factory.mktemp("waypoint-protocols"))
    yield e
    e.close()


@pytest.fixture
def grpc_channel(env):
    forwarder = Forwarder(("127.62.100.1", 50051))
    channel = grpc.insecure_channel(f"127.0.0.1:{forwarder.port}")
    yield channel
    channel.close()
    forwarder.close()


def test_grpc_through_the_waypoint_with_trailers(env, grpc_channel):
    say = grpc_channel.unary_unary("/test.Echo/Say")
    response, call = say.with_call(b"hello", timeout=10)
    assert response == b"hello!"
    assert ("x-trailer", "kept") in call.trailing_metadata()
    entries = env.waypoint.claim_entries(lambda e: e.get("path") == "/test.Echo/Say")
    assert entries and entries[0]["protocol"] == "HTTP/2"


def test_a_grpc_error_status_arrives_in_the_trailers(env, grpc_channel):
    with pytest.raises(grpc.RpcError) as raised:
        grpc_channel.unary_unary("/test.Echo/Fail")(b"x", timeout=10)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert raised.value.details() == "no such thing"


def test_a_grpc_stream_of_responses(env, grpc_channel):
    replies = list(grpc_channel.unary_stream("/test.Echo/Count")(b"200", timeout=10))
    assert replies == [str(i).encode() for i in range(200)]


def test_websocket_through_the_waypoint(env):
    sock = socks5.connect((CLIENT, 15080), ("127.62.100.3", 80), source=CLIENT)
    with ws_connect("ws://127.62.100.3/chat", sock=sock, open_timeout=10) as ws:
        for i in range(5):
            ws.send(f"m{i}")
            assert ws.recv(timeout=10) == f"echo:m{i}"


def test_a_port_naming_no_protocol_is_parsed_as_http_when_http_arrives(env):
    conn = http.client.HTTPConnection("127.62.100.6", 80, timeout=10)
    conn.sock = socks5.connect((CLIENT, 15080), ("127.62.100.6", 80), source=CLIENT)
    conn.request("GET", "/sniffed")
    seen = json.loads(conn.getresponse().read())
    conn.close()
    assert seen["path"] == "/sniffed"
    assert "x-request-id" in seen["headers"]  # the waypoint read it as HTTP


def h2c_get(vip: str, path: str, first_write: int | None = None) -> tuple[int, dict[str, str]]:
    """One GET over cleartext HTTP/2 with prior knowledge (python-hyper's h2), its preface and
    request written whole or, with ``first_write``, that many bytes first and the rest later."""
    sock = socks5.connect((CLIENT, 15080), (vip, 80), source=CLIENT)
    sock.settimeout(10)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    headers = [(":method", "GET"), (":path", path), (":scheme", "http"), (":authority", vip)]
    conn.send_headers(1, headers, end_stream=True)
    out = conn.data_to_send()
    if first_write is not None:
        sock.sendall(out[:first_write])
        out = out[first_write:]
        time.sleep(0.3)  # the first bytes reach the waypoint on their own
    sock.sendall(out)
    status, body = 0, b""
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                break
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    status = int(dict(event.headers)[b":status"])
                elif isinstance(event, h2.events.DataReceived):
                    body += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, 1)
                elif isinstance(event, h2.events.StreamEnded):
                    return status, json.loads(body)
            sock.sendall(conn.data_to_send())
    finally:
        sock.close()
    raise AssertionError(f"no complete response (status {status})")


def test_http2_with_prior_knowledge_on_an_http_port(env):
    """A port named `http` takes cleartext HTTP/2 too (the preface tells); the request goes on
    to the endpoint as HTTP/1.1, the port's protocol."""
    status, seen = h2c_get("127.62.100.2", "/h2c")
    assert status == 200
    assert seen["path"] == "/h2c"
    assert "x-request-id" in seen["headers"]


def test_a_preface_split_across_writes_is_still_http2(env):
    """The first bytes are only the start of the preface: the waypoint waits for the rest."""
    status, seen = h2c_get("127.62.100.2", "/split", first_write=5)
    assert status == 200
    assert seen["path"] == "/split"


def test_a_port_naming_no_protocol_carries_other_bytes_as_tcp(env):
    sock = socks5.connect((CLIENT, 15080), ("127.62.100.6", 9000), source=CLIENT)
    reply = exchange(sock, b"\x16\x03\x01 not http\n")
    assert reply == b"web-1\n\x16\x03\x01 not http\n"


def test_a_route_change_applies_to_new_requests_and_the_live_one_finishes(env):
    def pod(path: str, delay: str = "0") -> str:
        conn = http.client.HTTPConnection("127.62.100.2", 80, timeout=20)
        conn.sock = socks5.connect((CLIENT, 15080), ("127.62.100.2", 80), source=CLIENT)
        conn.request("GET", path, headers={"x-echo-delay": delay})
        response = conn.getresponse()
        body = response.read()
        conn.close()
        assert response.status == 200, body
        return json.loads(body)["pod"]

    assert pod("/before") == "web-1"
    slow: dict[str, str] = {}
    live = threading.Thread(target=lambda: slow.update(pod=pod("/slow", "2")))
    live.start()
    wait_until(lambda: any(s["path"] == "/slow" for s in env.http[0].seen), what="the slow one")
    text = env.mesh_file.read_text()
    try:
        env.mesh_file.write_text(text.replace("name: web-v1, port: 80", "name: web-v2, port: 80"))
        env.waypoint.signal(signal.SIGHUP)
        wait_until(lambda: pod("/after") == "web-2", what="the new route")
        live.join(10)
        assert slow == {"pod": "web-1"}  # started on the old route, finished there
    finally:
        env.mesh_file.write_text(text)
        env.waypoint.signal(signal.SIGHUP)
        wait_until(lambda: pod("/restored") == "web-1", what="the route restored")


def test_sigterm_drains_a_live_request_then_exits_0(env):
    # Last in this module: it stops the waypoint.
    done: dict[str, object] = {}

    def slow() -> None:
        conn = http.client.HTTPConnection("127.62.100.2", 80, timeout=20)
        conn.sock = socks5.connect((CLIENT, 15080), ("127.62.100.2", 80), source=CLIENT)
        conn.request("GET", "/draining", headers={"x-echo-delay": "1.5"})
        response = conn.getresponse()
        done.update(status=response.status, pod=json.loads(response.read())["pod"])
        conn.close()

    live = threading.Thread(target=slow)
    live.start()
    wait_until(lambda: any(s["path"] == "/draining" for s in env.http[0].seen), what="in flight")
    env.waypoint.signal(signal.SIGTERM)
    live.join(15)
    assert done == {"status": 200, "pod": "web-1"}
    assert env.waypoint.process.wait(15) == 0
