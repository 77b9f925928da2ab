"""Operating ztunnel: Prometheus metrics checked against known traffic for both reporters,
admin and readiness endpoints, graceful drain on SIGTERM."""

from __future__ import annotations

import signal
import socket
import textwrap
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import orjson
import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from ambient import __version__, socks5
from ambient.identity import CertificateAuthority
from ambient.testing import App, exchange, wait_until
from ambient.ztunnel.process import ZtunnelProcess

MESH = """
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: frontend, namespace: shop, labels: {app: frontend, version: v2}}
spec: {nodeName: n1, serviceAccountName: frontend}
status: {podIP: 127.28.1.1}
---
apiVersion: v1
kind: Pod
metadata: {name: outsider, namespace: shop, labels: {istio.io/dataplane-mode: none}}
spec: {nodeName: n1}
status: {podIP: 127.28.1.9}
---
apiVersion: v1
kind: Pod
metadata:
  name: cart
  namespace: shop
  labels: {app: cart, version: v1}
  annotations: {ambient.dev/app-address: 127.29.2.1}
spec:
  nodeName: n2
  serviceAccountName: cart
  containers: [{name: app, ports: [{containerPort: 8080}]}]
status: {podIP: 127.28.2.1}
---
apiVersion: v1
kind: Service
metadata: {name: cart, namespace: shop}
spec: {clusterIP: 127.28.100.1, selector: {app: cart}, ports: [{port: 80, targetPort: 8080}]}
"""
FRONTEND_ID = "spiffe://cluster.local/ns/shop/sa/frontend"
CART_ID = "spiffe://cluster.local/ns/shop/sa/cart"


@pytest.fixture
def mesh(tmp_path):
    (tmp_path / "mesh.yaml").write_text(textwrap.dedent(MESH))
    CertificateAuthority.create().save(tmp_path / "ca")
    app = App("count", ("127.29.2.1", 8080))
    nodes = [
        ZtunnelProcess(
            n, [tmp_path / "mesh.yaml"], tmp_path / "ca", tmp_path, "--drain-deadline", "3"
        ).wait_ready()
        for n in ("n1", "n2")
    ]
    yield nodes
    for node in nodes:
        node.stop()
    app.close()


def scrape(address: str, path: str = "/metrics") -> dict:
    """{(metric name, frozenset(labels)): value} for the istio_ samples."""
    with urllib.request.urlopen(f"http://{address}{path}", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("istio_"):
                out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def find(samples: dict, name: str, **labels: str) -> float:
    matches = [
        v
        for (n, ls), v in samples.items()
        if n == name and all((k, v2) in ls for k, v2 in labels.items())
    ]
    assert len(matches) == 1, (name, labels, [k for k in samples if k[0] == name])
    return matches[0]


def absent(samples: dict, name: str, **labels: str) -> bool:
    return not any(
        n == name and all((k, v) in ls for k, v in labels.items()) for (n, ls) in samples
    )


def test_metrics_count_connections_and_bytes_for_both_reporters(mesh):
    n1, n2 = mesh
    payloads = [b"a" * 1000, b"b" * 20_000, b"c" * 300_000]
    for payload in payloads:  # the count app answers with the number of bytes it got
        sock = socks5.connect(("127.28.1.1", 15080), ("127.28.100.1", 80), source="127.28.1.1")
        assert exchange(sock, payload) == str(len(payload)).encode()
    sent = sum(len(p) for p in payloads)
    answered = sum(len(str(len(p))) for p in payloads)

    source = {
        "reporter": "source",
        "source_workload": "frontend",
        "source_workload_namespace": "shop",
        "source_principal": FRONTEND_ID,
        "source_app": "frontend",
        "source_version": "v2",
        "destination_workload": "cart",
        "destination_principal": CART_ID,
        "destination_service": "cart.shop.svc.cluster.local",
        "destination_service_name": "cart",
        "destination_service_namespace": "shop",
        "connection_security_policy": "mutual_tls",
        "request_protocol": "tcp",
        "response_flags": "-",
    }
    destination = {
        "reporter": "destination",
        "source_workload": "frontend",
        "source_principal": FRONTEND_ID,
        "destination_workload": "cart",
        "destination_workload_namespace": "shop",
        "destination_app": "cart",
        "destination_version": "v1",
        "destination_principal": CART_ID,
        # Named by the source's Forwarded host, as Istio's ztunnel does on the destination side.
        "destination_service": "cart.shop.svc.cluster.local",
        "destination_service_name": "cart",
        "connection_security_policy": "mutual_tls",
        "response_flags": "-",
    }

    def settled() -> bool:
        a, b = scrape(n1.metrics), scrape(n2.metrics)
        return (
            find(a, "istio_tcp_connections_closed_total", **source) == 3
            and find(b, "istio_tcp_connections_closed_total", **destination) == 3
        )

    wait_until(settled, what="both reporters to count 3 closed connections")
    for samples, labels in (
        (scrape(n1.metrics), source),
        (scrape(n2.metrics, "/stats/prometheus"), destination),
    ):
        assert find(samples, "istio_tcp_connections_opened_total", **labels) == 3
        assert find(samples, "istio_tcp_connections_closed_total", **labels) == 3
        # As Istio's ztunnel: a connection that ended well is never counted as failed, so there
        # is no failed series with response_flags "-".
        assert absent(samples, "istio_tcp_connections_failed_total", **labels)
        assert find(samples, "istio_tcp_received_bytes_total", **labels) == sent
        assert find(samples, "istio_tcp_sent_bytes_total", **labels) == answered
        assert find(samples, "istio_build", component="ztunnel") == 1


def test_plaintext_and_denied_connections_are_labelled(mesh, tmp_path):
    _, n2 = mesh
    sock = socket.create_connection(
        ("127.28.2.1", 8080), timeout=5, source_address=("127.28.1.9", 0)
    )
    assert exchange(sock, b"xyz") == b"3"
    labels = {
        "reporter": "destination",
        "source_workload": "outsider",
        "source_principal": "unknown",
        "connection_security_policy": "unknown",
    }
    wait_until(
        lambda: find(scrape(n2.metrics), "istio_tcp_connections_closed_total", **labels) == 1,
        what="the plaintext connection to be counted",
    )
    assert find(scrape(n2.metrics), "istio_tcp_received_bytes_total", **labels) == 3


def test_bytes_are_counted_while_a_connection_is_open(mesh):
    n1, _ = mesh
    sock = socks5.connect(("127.28.1.1", 15080), ("127.28.2.1", 8080), source="127.28.1.1")
    sock.sendall(b"z" * 50_000)
    labels = {"reporter": "source", "destination_workload": "cart"}
    wait_until(
        lambda: find(scrape(n1.metrics), "istio_tcp_received_bytes_total", **labels) == 50_000,
        what="bytes of a live connection",
    )
    assert find(scrape(n1.metrics), "istio_tcp_connections_closed_total", **labels) == 0
    sock.close()


def test_metrics_are_openmetrics_text_with_process_metrics_and_no_openssl_in_the_process(mesh):
    n1, _ = mesh
    with urllib.request.urlopen(f"http://{n1.metrics}/stats/prometheus", timeout=5) as r:
        text, content_type = r.read().decode(), r.headers["Content-Type"]
    assert content_type == "text/plain; charset=utf-8"  # Istio's ztunnel's default
    families = {f.name: f for f in openmetrics_families(text)}  # strict: `# EOF`, `_total`
    build = families["istio_build"].samples[0]
    assert build.labels == {"component": "ztunnel", "tag": __version__}
    rss = families["process_resident_memory_bytes"].samples[0].value
    assert 10 * 2**20 < rss < 1 << 30
    assert families["process_open_fds"].samples[0].value > 3
    assert families["ambient_core_live_connections"].type == "gauge"
    # The proxy's TLS is the core's: Python's ssl (OpenSSL, 5 MiB) is never mapped in.
    maps = Path(f"/proc/{n1.process.pid}/maps").read_text()
    assert "libssl" not in maps and "_ssl." not in maps


def get(address: str, path: str, method: str = "GET") -> tuple[int, bytes]:
    request = urllib.request.Request(f"http://{address}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_config_dump_holds_every_workload_and_no_key_material(mesh):
    status, body = get(mesh[1].admin, "/config_dump")
    assert status == 200
    dump = orjson.loads(body)
    assert {w["name"] for w in dump["workloads"]} == {"frontend", "outsider", "cart"}
    assert [c["identity"] for c in dump["certificates"]] == [CART_ID]
    assert b"PRIVATE KEY" not in body and b"BEGIN" not in body


def test_admin_answers_only_on_localhost(mesh, tmp_path):
    host, port = mesh[0].admin.rsplit(":", 1)
    assert host == "127.0.0.1"
    with pytest.raises(OSError):  # not bound anywhere else, not even another loopback address
        socket.create_connection(("127.28.1.1", int(port)), timeout=2)
    bad = ZtunnelProcess(
        "n1", [tmp_path / "mesh.yaml"], tmp_path / "ca", tmp_path, "--admin-address", "127.28.1.1:0"
    )
    # The last --admin-address wins; a non-loopback one is refused at start.
    bad.process.wait(30)
    assert bad.process.returncode == 2
    assert "answers only on localhost" in bad.process.stderr.read()


def test_log_level_can_be_changed_and_bad_levels_are_refused(mesh):
    assert get(mesh[0].admin, "/logging?level=debug", "POST")[0] == 200
    status, body = get(mesh[0].admin, "/logging?level=chatty", "POST")
    assert status == 400 and b"expected one of" in body


def test_quitquitquit_drains_and_exits_0(mesh):
    n1, _ = mesh
    assert get(n1.admin, "/quitquitquit", "POST")[0] == 200
    assert n1.process.wait(15) == 0


def test_readiness_reports_what_is_pending(tmp_path):
    mesh_file = tmp_path / "mesh.yaml"
    mesh_file.write_text(
        textwrap.dedent(MESH)
        .replace("podIP: 127.28.2.1", "podIP: 192.0.2.1")
        .replace("clusterIP: 127.28.100.1", "clusterIP: 127.28.100.9")
    )
    CertificateAuthority.create().save(tmp_path / "ca")
    node = ZtunnelProcess("n2", [mesh_file], tmp_path / "ca", tmp_path).wait_ready()
    try:
        status, body = get(node.readiness, "/healthz/ready")
        assert status == 500  # 192.0.2.1 is not an address of this machine
        assert b"not ready" in body and b"shop/cart" in body and b"192.0.2.1" in body
    finally:
        node.stop()


def test_sigterm_lets_a_transfer_finish_within_the_deadline_and_refuses_new_ones(mesh):
    n1, _ = mesh
    sock = socks5.connect(("127.28.1.1", 15080), ("127.28.2.1", 8080), source="127.28.1.1")
    answer: list[bytes] = []

    def upload() -> None:
        for _ in range(10):  # ~1 s of sending
            sock.sendall(b"u" * 10_000)
            time.sleep(0.1)
        sock.shutdown(socket.SHUT_WR)
        answer.append(sock.recv(100))

    t = threading.Thread(target=upload)
    t.start()
    time.sleep(0.2)
    n1.signal(signal.SIGTERM)
    time.sleep(0.2)
    with pytest.raises((ConnectionRefusedError, socks5.Socks5Error)):  # no longer accepting
        socks5.connect(("127.28.1.1", 15080), ("127.28.2.1", 8080), source="127.28.1.1")
    t.join(10)
    assert answer == [b"100000"]  # the transfer finished
    assert n1.process.wait(10) == 0


def test_sigterm_cuts_a_transfer_longer_than_the_deadline(mesh):
    n1, _ = mesh  # started with --drain-deadline 3
    sock = socks5.connect(("127.28.1.1", 15080), ("127.28.2.1", 8080), source="127.28.1.1")
    sock.settimeout(20)
    started = time.monotonic()
    n1.signal(signal.SIGTERM)
    cut: list[float] = []

    def endless() -> None:
        try:
            while True:
                sock.sendall(b"e" * 10_000)
                time.sleep(0.05)
        except OSError:
            cut.append(time.monotonic() - started)

    t = threading.Thread(target=endless)
    t.start()
    assert n1.process.wait(15) == 0
    t.join(10)
    assert cut and 2.5 <= cut[0] <= 8


def test_top_shows_connections_bytes_and_peers_of_a_running_ztunnel(mesh, capsys):
    from ambient.cli import main

    _, n2 = mesh
    live = socks5.connect(("127.28.1.1", 15080), ("127.28.2.1", 8080), source="127.28.1.1")
    live.sendall(b"q" * 4096)
    wait_until(
        lambda: (
            find(scrape(n2.metrics), "istio_tcp_received_bytes_total", reporter="destination")
            == 4096
        ),
        what="the bytes to be counted",
    )
    assert (
        main(["top", "--metrics", n2.metrics, "--admin", n2.admin, "--once", "--interval", "0.2"])
        == 0
    )
    out = capsys.readouterr().out
    assert "ztunnel n2" in out and "1 pods served" in out
    assert "shop/frontend" in out and "mTLS" in out
    row = next(line for line in out.splitlines() if "shop/frontend" in line)
    assert row.split("│")[4].strip() == "1"  # one connection open right now
    live.close()


def test_top_names_an_unreachable_endpoint(capsys):
    from ambient.cli import main

    assert main(["top", "--metrics", "127.0.0.1:1", "--once"]) == 1
    assert "metrics endpoint 127.0.0.1:1" in capsys.readouterr().out
