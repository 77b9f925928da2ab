"""The waypoint end to end, in loopback mode: client pod → its ztunnel → HBONE → ``ambient
waypoint`` (HTTPRoute routing, load balancing) → a second HBONE tunnel → the destination pod's
ztunnel → the pod. The client is the standard library's ``http.client`` (or curl) through the
client pod's SOCKS5 port; the pods are the standard library's HTTP server. Each case names the
rule it shows (Gateway API HTTPRoute, GAMMA; the seed's "In Mesh routing with Waypoint enabled")."""

from __future__ import annotations

import http.client
import json
import re
import textwrap
import threading
import urllib.request
from collections import Counter
from typing import Any

import pytest

from ambient import socks5
from ambient.hbone import DataPlane, HboneTarget, TunnelError
from ambient.identity import CertificateAuthority
from ambient.testing import App, HttpEcho, exchange, wait_until
from ambient.waypoint.process import WaypointProcess
from ambient.ztunnel.process import ZtunnelProcess

WAYPOINT_ID = "spiffe://cluster.local/ns/default/sa/waypoint"
CLIENT_ID = "spiffe://cluster.local/ns/default/sa/client"
ECHO_ID = "spiffe://cluster.local/ns/default/sa/echo"
UUID4 = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"


def pod(name: str, node: str, ip: str, app_ip: str, labels: str, namespace: str = "default") -> str:
    return f"""
apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: {namespace}
  labels: {labels}
  annotations: {{ambient.dev/app-address: {app_ip}}}
spec:
  nodeName: {node}
  serviceAccountName: echo
  containers: [{{name: c, ports: [{{containerPort: 8080}}, {{containerPort: 9000}}]}}]
status: {{podIP: {ip}}}
---"""


def service(name: str, ip: str, selector: str, *, bound: bool = True, ports: str = "") -> str:
    labels = "{istio.io/use-waypoint: waypoint}" if bound else "{}"
    ports = ports or "[{name: http, port: 80, targetPort: 8080}]"
    return f"""
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default, labels: {labels}}}
spec: {{clusterIP: {ip}, selector: {selector}, ports: {ports}}}
---"""


def route(name: str, parent: str, rules: str, namespace: str = "default") -> str:
    return f"""
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  parentRefs: [{{group: "", kind: Service, name: {parent}, namespace: default}}]
  rules: {rules}
---"""


MESH = (
    """
apiVersion: v1
kind: Namespace
metadata: {name: default, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: other, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: default, labels: {istio.io/waypoint-for: all}}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: v1
kind: Pod
metadata:
  name: waypoint-1
  namespace: default
  labels: {gateway.networking.k8s.io/gateway-name: waypoint, istio.io/dataplane-mode: none}
spec: {nodeName: n3, serviceAccountName: waypoint}
status: {podIP: 127.60.3.1}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: default}
spec: {nodeName: n1, serviceAccountName: client}
status: {podIP: 127.60.1.1}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: other}
spec: {nodeName: n1, serviceAccountName: client}
status: {podIP: 127.60.1.2}
---"""
    + pod("echo-v1-a", "n2", "127.60.2.1", "127.61.2.1", "{app: echo, version: v1}")
    + pod("echo-v1-b", "n1", "127.60.1.3", "127.61.1.3", "{app: echo, version: v1}")
    + pod(
        "echo-v2-a",
        "n2",
        "127.60.2.2",
        "127.61.2.2",
        "{app: echo, version: v2, istio.io/use-waypoint: waypoint}",
    )
    + pod("flaky-bad", "n2", "127.60.2.10", "127.61.2.10", "{app: flaky}")
    + pod("flaky-good", "n2", "127.60.2.11", "127.61.2.11", "{app: flaky}")
    + pod("down-1", "n2", "127.60.2.12", "127.61.2.12", "{app: down}")
    + pod("deadish-dead", "n2", "127.60.2.13", "127.61.2.13", "{app: deadish}")
    + pod("deadish-good", "n2", "127.60.2.14", "127.61.2.14", "{app: deadish}")
    + pod("strict-1", "n2", "127.60.2.15", "127.61.2.15", "{app: strict}").replace(
        "annotations: {", "annotations: {ambient.dev/waypoint-only: 'true', "
    )
    + service("strict", "127.60.100.15", "{app: strict}")
    + service("flaky", "127.60.100.11", "{app: flaky}")
    + service("down", "127.60.100.12", "{app: down}")
    + service("deadish", "127.60.100.13", "{app: deadish}")
    + service("mirrored", "127.60.100.14", "{app: echo, version: v1}")
    + service("echo", "127.60.100.1", "{app: echo}")
    + service("plain", "127.60.100.2", "{app: echo}")
    + service("echo-v1", "127.60.100.3", "{app: echo, version: v1}", bound=False)
    + service("echo-v2", "127.60.100.4", "{app: echo, version: v2}", bound=False)
    + service("split", "127.60.100.5", "{app: echo}")
    + service("rules", "127.60.100.6", "{app: echo}")
    + service("broken", "127.60.100.7", "{app: echo}")
    + service("nobody", "127.60.100.8", "{app: nobody}", bound=False)
    + service(
        "raw",
        "127.60.100.9",
        "{app: echo, version: v1}",
        ports="[{name: tcp-raw, port: 9000, targetPort: 9000}]",
    )
    + service("unbound", "127.60.100.10", "{app: echo}", bound=False)
    # The seed's example, as written there.
    + """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: echo
spec:
  parentRefs:
  - group: ""
    kind: Service
    name: echo
  rules:
  - backendRefs:
    - name: echo-v1
      port: 80
---"""
    + route(
        "split",
        "split",
        """
  - backendRefs:
    - {name: echo-v1, port: 80, weight: 80}
    - {name: echo-v2, port: 80, weight: 20}""",
    )
    + route(
        "rules",
        "rules",
        """
  - matches: [{path: {type: Exact, value: /exact}}]
    backendRefs: [{name: echo-v2, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /v2}}]
    backendRefs: [{name: echo-v2, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /}, headers: [{name: X-Version, value: v2}]}]
    backendRefs: [{name: echo-v2, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /q}, queryParams: [{name: v, value: "2"}]}]
    backendRefs: [{name: echo-v2, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /m}, method: DELETE}]
    backendRefs: [{name: echo-v2, port: 80}]
  - matches: [{path: {type: RegularExpression, value: "/re/[0-9]+"}}]
    backendRefs: [{name: echo-v2, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /old}}]
    filters:
    - type: RequestRedirect
      requestRedirect:
        path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}
        statusCode: 301
  - matches: [{path: {type: PathPrefix, value: /api}}]
    filters:
    - type: URLRewrite
      urlRewrite:
        hostname: api.internal
        path: {type: ReplacePrefixMatch, replacePrefixMatch: /v1}
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{name: x-set, value: s}]
        add: [{name: x-add, value: a}]
        remove: [x-drop]
    - type: ResponseHeaderModifier
      responseHeaderModifier: {add: [{name: x-resp, value: r}], remove: [x-echo-pod]}
    backendRefs: [{name: echo-v1, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /full}}]
    filters:
    - {type: URLRewrite, urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: /replaced}}}
    backendRefs: [{name: echo-v1, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /slow}}]
    timeouts: {request: 500ms}
    backendRefs: [{name: echo-v1, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /v1}}]
    backendRefs: [{name: echo-v1, port: 80}]""",
    )
    + route(
        "broken",
        "broken",
        """
  - matches: [{path: {type: PathPrefix, value: /missing}}]
    backendRefs: [{name: no-such-service, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /empty}}]
    backendRefs: [{name: nobody, port: 80}]""",
    )
    + route(
        "mirrored",
        "mirrored",
        """
  - filters:
    - type: RequestMirror
      requestMirror: {backendRef: {name: echo-v2, port: 80}}
    backendRefs: [{name: echo-v1, port: 80}]""",
    )
    # A consumer route: only clients in `other` take it.
    + route(
        "from-other",
        "plain",
        "[{backendRefs: [{name: echo-v2, namespace: default, port: 80}]}]",
        namespace="other",
    )
)


class Env:
    def __init__(self, tmp) -> None:
        (tmp / "mesh.yaml").write_text(textwrap.dedent(MESH))
        self.mesh_file = tmp / "mesh.yaml"
        self.ca = CertificateAuthority.create()
        self.ca.save(tmp / "ca")
        self.http = {
            name: HttpEcho(name, (ip, 8080))
            for name, ip in [
                ("echo-v1-a", "127.61.2.1"),
                ("echo-v1-b", "127.61.1.3"),
                ("echo-v2-a", "127.61.2.2"),
                ("flaky-good", "127.61.2.11"),
                ("deadish-good", "127.61.2.14"),
                ("strict-1", "127.61.2.15"),
            ]
        }
        # Pods that always answer 503 (deadish-dead has no app at all: its connect fails).
        for name, ip in [("flaky-bad", "127.61.2.10"), ("down-1", "127.61.2.12")]:
            self.http[name] = HttpEcho(name, (ip, 8080), status=503)
        self.tcp = [
            App(f"name:{name}", (ip, 9000))
            for name, ip in [("echo-v1-a", "127.61.2.1"), ("echo-v1-b", "127.61.1.3")]
        ]
        self.nodes = {
            n: ZtunnelProcess(n, [self.mesh_file], tmp / "ca", tmp).wait_ready()
            for n in ("n1", "n2")
        }
        self.waypoint = WaypointProcess(
            "default/waypoint", [self.mesh_file], tmp / "ca", tmp
        ).wait_ready()

    def close(self) -> None:
        for proc in [*self.nodes.values(), self.waypoint]:
            proc.stop()
        for app in [*self.http.values(), *self.tcp]:
            app.close()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = Env(tmp_path_factory.mktemp("waypoint"))
    yield e
    e.close()


class Client:
    """``http.client`` on a connection from a client pod (its SOCKS5 port, its own IP)."""

    def __init__(self, vip: str, port: int = 80, source: str = "127.60.1.1") -> None:
        self.conn = http.client.HTTPConnection(vip, port, timeout=10)
        self.conn.sock = socks5.connect((source, 15080), (vip, port), source=source)

    def request(
        self,
        path: str,
        method: str = "GET",
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        self.conn.request(method, path, body=body, headers=headers or {})
        response = self.conn.getresponse()
        body = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, body

    def echo(self, path: str, **kw: Any) -> dict[str, Any]:
        status, _, body = self.request(path, **kw)
        assert status == 200, body
        return json.loads(body)

    def close(self) -> None:
        self.conn.close()


def get(vip: str, path: str = "/", **kw: Any) -> tuple[int, dict[str, str], bytes]:
    client = Client(vip, source=kw.pop("source", "127.60.1.1"))
    try:
        return client.request(path, **kw)
    finally:
        client.close()


def pods_answering(vip: str, path: str, n: int, **kw: Any) -> Counter[str]:
    client = Client(vip, source=kw.pop("source", "127.60.1.1"))
    try:
        return Counter(client.echo(path, **kw)["pod"] for _ in range(n))
    finally:
        client.close()


# --- the seed's example and the default route --------------------------------------------------


def test_the_seeds_route_sends_every_request_for_echo_to_echo_v1(env):
    # "the below policy will ensure that requests to the echo service are forwarded to echo-v1"
    answered = pods_answering("127.60.100.1", "/", 40)
    assert set(answered) == {"echo-v1-a", "echo-v1-b"}


def test_without_routes_a_service_routes_to_itself_balancing_per_request(env):
    # "By default, a Service will simply route to itself, performing L7 load balancing across its
    # endpoints" — per request, on one client connection, so every endpoint (on two nodes) is hit.
    answered = pods_answering("127.60.100.2", "/", 60)
    assert set(answered) == {"echo-v1-a", "echo-v1-b", "echo-v2-a"}


def opened_at(node: ZtunnelProcess) -> dict[str, float]:
    """n's inbound (``reporter="destination"``) connections opened, by source principal."""
    text = urllib.request.urlopen(f"http://{node.metrics}/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if (
            line.startswith("istio_tcp_connections_opened_total{")
            and 'reporter="destination"' in line
        ):
            principal = line.split('source_principal="', 1)[1].split('"', 1)[0]
            out[principal] = out.get(principal, 0) + float(line.rsplit(" ", 1)[1])
    return out


def test_the_destination_ztunnel_sees_the_waypoints_identity(env):
    # The second tunnel is the waypoint's, with its own certificate: the destination ztunnel
    # counts the connection under the waypoint's principal, never the client's.
    for _ in range(8):
        get("127.60.100.2", "/")
    opened = opened_at(env.nodes["n2"])
    assert opened.get(WAYPOINT_ID, 0) >= 1
    assert CLIENT_ID not in opened


def test_the_client_ztunnel_tunnels_to_the_waypoint_with_the_client_identity(env):
    env.nodes["n1"].forget_entries()
    get("127.60.100.2", "/")
    entries = env.nodes["n1"].claim_entries(lambda e: e.get("dst.waypoint") == "default/waypoint")
    assert entries and entries[0]["dst.addr"] == "127.60.3.1:15008"
    assert entries[0]["src.identity"] == CLIENT_ID


def test_hop_by_hop_headers_are_not_forwarded(env):
    """RFC 9110 §7.6.1: Connection, the headers it names, Keep-Alive, Proxy-Connection and TE
    belong to one hop; `TE: trailers` goes on (gRPC needs it), the rest of the head is kept."""
    seen = Client("127.60.100.2").echo(
        "/",
        headers={
            "Connection": "keep-alive, x-hop",
            "X-Hop": "1",
            "Keep-Alive": "timeout=5",
            "Proxy-Connection": "keep-alive",
            "TE": "trailers, deflate",
            "X-Kept": "2",
        },
    )["headers"]
    for name in ("connection", "x-hop", "keep-alive", "proxy-connection"):
        assert name not in seen, name
    assert seen["te"] == "trailers"
    assert seen["x-kept"] == "2"


def test_headers_the_waypoint_adds_and_keeps(env):
    seen = Client("127.60.100.2").echo(
        "/", headers={"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}
    )
    # Generated when absent: a version 4 UUID, as Envoy makes them.
    assert re.fullmatch(UUID4, seen["headers"]["x-request-id"])
    assert seen["headers"]["traceparent"] == "00-" + "1" * 32 + "-" + "2" * 16 + "-01"
    fresh = Client("127.60.100.2").echo("/")
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-00", fresh["headers"]["traceparent"])
    assert fresh["headers"]["x-request-id"] != seen["headers"]["x-request-id"]
    assert "x-forwarded-for" not in seen["headers"]
    kept = Client("127.60.100.2").echo("/", headers={"x-request-id": "mine"})
    assert kept["headers"]["x-request-id"] == "mine"
    assert kept["headers"]["host"] == "127.60.100.2"


# --- weights ------------------------------------------------------------------------------------


def test_weighted_backends_share_1000_requests_by_weight(env):
    answered = pods_answering("127.60.100.5", "/", 1000)
    v2 = answered["echo-v2-a"]
    v1 = answered["echo-v1-a"] + answered["echo-v1-b"]
    assert v1 + v2 == 1000
    assert abs(v2 / 1000 - 0.20) <= 0.05, answered
    assert abs(v1 / 1000 - 0.80) <= 0.05, answered


# --- matches and precedence ---------------------------------------------------------------------

MATCHES = [
    # (rule of the spec, method, path, headers, expected version; None: no rule matches, 404)
    ("Exact path", "GET", "/exact", {}, "v2"),
    ("Exact is not a prefix", "GET", "/exact/more", {}, None),
    ("PathPrefix element-wise", "GET", "/v2/x", {}, "v2"),
    ("PathPrefix is not a string prefix", "GET", "/v2x", {}, None),
    ("header match, name case-insensitive", "GET", "/h", {"x-version": "v2"}, "v2"),
    ("a longer prefix beats a header match", "GET", "/v1", {"x-version": "v2"}, "v1"),
    ("a longer prefix beats a header match, either way", "GET", "/v2", {"x-version": "v1"}, "v2"),
    ("query parameter", "GET", "/q?v=2", {}, "v2"),
    ("query parameter mismatch", "GET", "/q?v=3", {}, None),
    ("method", "DELETE", "/m", {}, "v2"),
    ("method mismatch", "GET", "/m", {}, None),
    ("RegularExpression over the whole path", "GET", "/re/42", {}, "v2"),
    ("RegularExpression is anchored", "GET", "/re/42x", {}, None),
]


@pytest.mark.parametrize("rule,method,path,headers,version", MATCHES, ids=[m[0] for m in MATCHES])
def test_matches_and_precedence(env, rule, method, path, headers, version):
    status, _, body = Client("127.60.100.6").request(path, method=method, headers=headers)
    if version is None:
        assert status == 404, rule
    else:
        assert status == 200, body
        assert json.loads(body)["pod"].split("-")[1] == version, rule


def test_no_matching_rule_is_a_404_once_routes_are_attached(env):
    status, _, body = get("127.60.100.6", "/nothing-matches")
    assert status == 404
    assert b"no rule" in body


def test_a_consumer_route_applies_only_to_clients_in_its_namespace(env):
    from_other = pods_answering("127.60.100.2", "/", 10, source="127.60.1.2")
    assert set(from_other) == {"echo-v2-a"}
    from_default = pods_answering("127.60.100.2", "/", 30)
    assert len(from_default) > 1


# --- filters ------------------------------------------------------------------------------------


def test_request_redirect(env):
    status, headers, _ = get("127.60.100.6", "/old/page?x=1")
    assert status == 301
    assert headers["location"] == "http://127.60.100.6/new/page?x=1"


def test_url_rewrite_and_header_modifiers(env):
    client = Client("127.60.100.6")
    status, headers, body = client.request(
        "/api/items?id=7", headers={"x-drop": "1", "x-add": "mine", "x-set": "mine"}
    )
    seen = json.loads(body)
    assert status == 200
    assert seen["path"] == "/v1/items?id=7"  # ReplacePrefixMatch /api -> /v1
    assert seen["headers"]["host"] == "api.internal"
    assert seen["headers"]["x-set"] == "s"
    assert seen["headers"]["x-add"] == "mine,a"
    assert "x-drop" not in seen["headers"]
    assert headers["x-resp"] == "r"
    assert "x-echo-pod" not in headers


def test_url_rewrite_full_path(env):
    assert Client("127.60.100.6").echo("/full/anything?k=v")["path"] == "/replaced?k=v"


def test_request_timeout_is_a_504(env):
    status, _, body = get("127.60.100.6", "/slow", headers={"x-echo-delay": "2"})
    assert status == 504
    assert b"did not answer within" in body
    # The same route answers a fast request.
    assert get("127.60.100.6", "/slow")[0] == 200


# --- refusals -----------------------------------------------------------------------------------


def test_a_backend_that_is_not_a_service_of_the_mesh_is_a_500(env):
    status, _, body = get("127.60.100.7", "/missing")
    assert status == 500
    assert b"no such Service" in body


def test_a_backend_without_ready_endpoints_is_a_503(env):
    status, _, body = get("127.60.100.7", "/empty")
    assert status == 503
    assert b"no ready endpoint" in body


def test_a_connect_to_a_target_not_bound_to_the_waypoint_is_refused(env):
    # A client that speaks HBONE to the waypoint itself, for a Service that does not use it.
    dp = DataPlane(1)
    try:
        dp.load_identity(env.ca.issue(CLIENT_ID))
        plan = HboneTarget("127.60.3.1:15008", "127.60.100.10:80", [WAYPOINT_ID], CLIENT_ID)
        with pytest.raises(TunnelError, match="421"):
            dp.connect(plan)
        # ...and the waypoint still serves everyone else.
        assert get("127.60.100.2", "/")[0] == 200
    finally:
        dp.close()


# --- direct to a pod, and TCP -------------------------------------------------------------------


def test_pod_traffic_through_the_waypoint_is_forwarded_to_that_pod(env):
    client = http.client.HTTPConnection("127.60.2.2", 8080, timeout=10)
    client.sock = socks5.connect(("127.60.1.1", 15080), ("127.60.2.2", 8080), source="127.60.1.1")
    client.request("GET", "/direct")
    seen = json.loads(client.getresponse().read())
    client.close()
    assert seen["pod"] == "echo-v2-a"
    assert seen["path"] == "/direct"


def test_a_tcp_port_is_carried_as_a_stream_through_the_waypoint(env):
    names = set()
    for _ in range(12):
        sock = socks5.connect(("127.60.1.1", 15080), ("127.60.100.9", 9000), source="127.60.1.1")
        reply = exchange(sock, b"raw bytes\n")
        name, _, echoed = reply.partition(b"\n")
        assert echoed == b"raw bytes\n"
        names.add(name.decode())
    assert names == {"echo-v1-a", "echo-v1-b"}
    # L4 at the waypoint, with ztunnel's TCP metrics (reporter="waypoint").
    families = scrape(env.waypoint)

    def total(family: str) -> float:
        return sum(
            s.value
            for s in families[family].samples
            if s.labels["reporter"] == "waypoint"
            and s.labels["destination_service_name"] == "raw"
            and s.labels["source_principal"] == CLIENT_ID
            and s.name.endswith("_total")
        )

    assert total("istio_tcp_connections_opened") >= 12
    assert total("istio_tcp_received_bytes") >= 12 * len(b"raw bytes\n")


def test_curl_through_the_waypoint(env):
    # An unmodified client, start to end.
    import subprocess

    out = subprocess.run(
        [
            "curl", "-sS", "-m", "10", "--socks5", "127.60.1.1:15080",
            "--interface", "127.60.1.1", "http://127.60.100.1/from-curl",
        ],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert json.loads(out)["path"] == "/from-curl"


def test_a_plain_socket_speaking_no_http_to_an_http_port_gets_an_http_error(env):
    sock = socks5.connect(("127.60.1.1", 15080), ("127.60.100.2", 80), source="127.60.1.1")
    sock.settimeout(10)
    sock.sendall(b"\x00\x01garbage that is not HTTP\r\n\r\n")
    reply = b""
    try:
        while chunk := sock.recv(4096):
            reply += chunk
    finally:
        sock.close()
    assert reply.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert get("127.60.100.2", "/")[0] == 200


# --- telemetry ----------------------------------------------------------------------------------


def test_each_request_gets_one_access_log_line(env):
    seen = Client("127.60.100.1").echo("/logged?q=1", headers={"user-agent": "tester"})
    entries = env.waypoint.claim_entries(lambda e: e.get("path") == "/logged?q=1")
    assert len(entries) == 1
    e = entries[0]
    assert e["method"] == "GET" and e["response_code"] == 200 and e["response_flags"] == "-"
    assert e["route_name"] == "default/echo#0"
    assert e["destination_service"] == "default/echo"
    assert e["upstream_workload"] == f"default/{seen['pod']}"
    assert e["upstream_peer_uri_san"] == ECHO_ID
    assert e["downstream_peer_uri_san"] == CLIENT_ID
    assert e["downstream_remote_address"].startswith("127.60.1.1:")  # the client, not its ztunnel
    assert e["x_request_id"] == seen["headers"]["x-request-id"]
    assert e["user_agent"] == "tester"
    assert e["bytes_sent"] > 0 and e["duration"] >= 0


@pytest.mark.parametrize(
    "vip,path,headers,code,flags",
    [
        ("127.60.100.6", "/nothing-matches", {}, 404, "NR"),
        ("127.60.100.7", "/empty", {}, 503, "UH"),
        ("127.60.100.6", "/slow", {"x-echo-delay": "2"}, 504, "UT"),
    ],
    ids=["no route", "no healthy upstream", "upstream timeout"],
)
def test_refusals_are_logged_with_their_response_flags(env, vip, path, headers, code, flags):
    env.waypoint.forget_entries()
    assert get(vip, path, headers=headers)[0] == code
    entries = env.waypoint.claim_entries(lambda e: e.get("path") == path)
    assert [(e["response_code"], e["response_flags"]) for e in entries] == [(code, flags)]
    assert entries[0]["response_code_details"]


def scrape(process: WaypointProcess) -> dict[str, Any]:
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://{process.metrics}/metrics", timeout=5).read()
    return {f.name: f for f in text_string_to_metric_families(text.decode())}


def test_request_metrics_with_reporter_waypoint(env):
    for _ in range(5):
        Client("127.60.100.1").echo("/metered")
    get("127.60.100.6", "/nothing-matches")
    families = scrape(env.waypoint)
    requests = [s for s in families["istio_requests"].samples if s.labels["reporter"] == "waypoint"]
    ok = [
        s
        for s in requests
        if s.labels["destination_service_name"] == "echo" and s.labels["response_code"] == "200"
    ]
    assert sum(s.value for s in ok) >= 5
    sample = ok[0].labels
    assert sample["source_workload"] == "client" and sample["source_principal"] == CLIENT_ID
    assert sample["destination_workload"] == "echo" and sample["destination_version"] == "v1"
    assert sample["destination_principal"] == ECHO_ID
    assert sample["request_protocol"] == "http" and sample["response_flags"] == "-"
    assert any(
        s.labels["response_code"] == "404" and s.labels["response_flags"] == "NR" for s in requests
    )
    duration = families["istio_request_duration_milliseconds"]
    assert duration.type == "histogram"
    counts = [s for s in duration.samples if s.name.endswith("_count")]
    assert sum(s.value for s in counts) == sum(s.value for s in requests)
    assert "istio_response_bytes" in families and "istio_request_bytes" in families


# --- retries and mirrors ------------------------------------------------------------------------


def test_a_503_is_retried_on_another_endpoint(env):
    # Istio's default retry policy (no `retry` on the Service's default route): a 503 is tried
    # again on an endpoint not tried yet; the client never sees the bad pod's answer.
    before = env.http["flaky-bad"].requests
    answered = pods_answering("127.60.100.11", "/", 30)
    assert answered == Counter({"flaky-good": 30})
    assert env.http["flaky-bad"].requests > before  # it was tried, and retried away from


def test_a_failed_connect_is_retried_on_another_endpoint(env):
    answered = pods_answering("127.60.100.13", "/", 20)
    assert answered == Counter({"deadish-good": 20})


def test_retries_exhausted_return_the_last_answer_flagged_urx(env):
    env.waypoint.forget_entries()
    before = env.http["down-1"].requests
    status, _, _ = get("127.60.100.12", "/exhausted")
    assert status == 503
    assert env.http["down-1"].requests - before == 3  # the request and Istio's two retries
    (entry,) = env.waypoint.claim_entries(lambda e: e.get("path") == "/exhausted")
    assert entry["response_flags"] == "URX"


def test_a_request_with_a_body_is_not_replayed(env):
    before = env.http["down-1"].requests
    status, _, _ = get("127.60.100.12", "/posted", method="POST", body=b"hello")
    assert status == 503
    assert env.http["down-1"].requests - before == 1


def test_request_mirror_sends_a_copy_and_ignores_its_answer(env):
    mirror = env.http["echo-v2-a"]
    before = mirror.requests
    answered = pods_answering("127.60.100.14", "/mirrored", 5)
    assert set(answered) <= {"echo-v1-a", "echo-v1-b"}
    wait_until(lambda: mirror.requests - before >= 5, what="5 mirrored requests")
    shadows = [s for s in list(mirror.seen) if s["path"] == "/mirrored"]
    assert shadows and all(s["headers"]["host"] == "127.60.100.14-shadow" for s in shadows)


def test_top_shows_the_waypoints_request_rate_and_codes(env, capsys):
    from ambient.cli import main

    get("127.60.100.6", "/nothing-matches")
    client = Client("127.60.100.1")
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            client.echo("/topped")

    sender = threading.Thread(target=load)
    sender.start()
    try:
        view = ["top", "--metrics", env.waypoint.metrics, "--admin", env.waypoint.admin]
        assert main([*view, "--once", "--interval", "0.5"]) == 0
    finally:
        stop.set()
        sender.join(10)
        client.close()
    out = capsys.readouterr().out
    assert "waypoint default/waypoint — 1 pods served" in out
    echo = next(line for line in out.splitlines() if "default/echo " in line and " 200 " in line)
    assert float(echo.split("│")[-2].strip().removesuffix("/s")) > 0  # requests flowing now
    assert any(
        "default/rules" in line and " 404 " in line and "NR" in line for line in out.splitlines()
    )


def test_a_waypoint_only_pod_accepts_the_real_waypoint_and_refuses_a_client_skipping_it(env):
    # ambient.dev/waypoint-only: its ztunnel takes traffic only from its Service's waypoint.
    assert pods_answering("127.60.100.15", "/", 3) == Counter({"strict-1": 3})
    dp = DataPlane(1)
    try:
        dp.load_identity(env.ca.issue(CLIENT_ID))
        plan = HboneTarget("127.60.2.15:15008", "127.60.2.15:8080", [ECHO_ID], CLIENT_ID)
        with pytest.raises(TunnelError, match="401"):
            dp.connect(plan)
    finally:
        dp.close()
