"""Istio's CA API (``IstioCertificateService/CreateCertificate``), both sides over real gRPC and
TLS on loopback: ambient's client against ambient's server in process (issue, refusals, rotation
at half-life, an outage and the recovery), then ``ambient control-plane`` as the CA of two
``ambient ztunnel`` processes that have no CA of their own and carry traffic with what it
signed."""

from __future__ import annotations

import datetime as dt
import json
import textwrap
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from google.protobuf import struct_pb2

from ambient import socks5
from ambient.identity import CertificateAuthority
from ambient.identity.istio_ca import (
    METHOD,
    CaError,
    IstioCaClient,
    IstioCaServer,
    IstioCertificateRequest,
    IstioCertificateResponse,
)
from ambient.identity.manager import CertificateManager
from ambient.testbed.control_plane import ControlPlaneProcess
from ambient.testing import App, exchange, wait_until
from ambient.ztunnel.process import ZtunnelProcess

ALICE = "spiffe://cluster.local/ns/default/sa/alice"


@pytest.fixture
def ca() -> CertificateAuthority:
    return CertificateAuthority.create("cluster.local")


@pytest.fixture
def server(ca: CertificateAuthority):
    s = IstioCaServer(ca, "127.0.0.1:0", tokens={"node-a-token": "ztunnel on node-a"}).start()
    yield s
    s.stop()


def client(server: IstioCaServer, token: str | None = "node-a-token", **kw: Any) -> IstioCaClient:
    return IstioCaClient(server.address, server.ca.roots_pem, token=lambda: token, **kw)


def test_a_certificate_from_the_ca_api(server: IstioCaServer) -> None:
    cert = client(server).issue(ALICE, ttl=dt.timedelta(hours=1))
    leaf = x509.load_pem_x509_certificate(cert.chain_pem)
    root = x509.load_pem_x509_certificate(cert.roots_pem)
    leaf.verify_directly_issued_by(root)
    assert root == x509.load_pem_x509_certificate(server.ca.roots_pem)
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [ALICE]
    lifetime = cert.not_after - dt.datetime.now(dt.UTC)
    assert dt.timedelta(minutes=55) < lifetime <= dt.timedelta(hours=1)
    assert b"PRIVATE KEY" in cert.key_pem and server.issued == 1


def test_the_server_caps_the_lifetime(ca: CertificateAuthority) -> None:
    s = IstioCaServer(ca, "127.0.0.1:0", max_ttl=dt.timedelta(minutes=10)).start()
    try:
        cert = IstioCaClient(s.address, ca.roots_pem).issue(ALICE, ttl=dt.timedelta(days=3))
        assert cert.not_after - dt.datetime.now(dt.UTC) <= dt.timedelta(minutes=10)
    finally:
        s.stop()


@pytest.mark.parametrize(
    ("token", "said"),
    [(None, "UNAUTHENTICATED"), ("stolen", "UNAUTHENTICATED")],
    ids=["no token", "an unknown token"],
)
def test_a_caller_without_a_known_token_is_refused(
    server: IstioCaServer, token: str | None, said: str
) -> None:
    with pytest.raises(CaError, match=f"CA {server.address}: CreateCertificate for .*: {said}"):
        client(server, token).issue(ALICE)
    assert server.refused == 1 and server.issued == 0


def test_an_identity_of_another_trust_domain_is_refused(server: IstioCaServer) -> None:
    with pytest.raises(CaError, match="PERMISSION_DENIED: .* not in this CA's trust domain"):
        client(server).issue("spiffe://evil.example/ns/default/sa/alice")


def raw_call(server: IstioCaServer, request: Any) -> Any:
    creds = grpc.ssl_channel_credentials(root_certificates=server.ca.roots_pem)
    with grpc.secure_channel(server.address, creds) as channel:
        call = channel.unary_unary(
            METHOD,
            request_serializer=IstioCertificateRequest.SerializeToString,
            response_deserializer=IstioCertificateResponse.FromString,
        )
        return call(request, metadata=[("authorization", "Bearer node-a-token")], timeout=5)


def test_a_csr_that_is_not_one_or_that_impersonates_another_is_refused(
    server: IstioCaServer,
) -> None:
    with pytest.raises(grpc.RpcError) as e:
        raw_call(server, IstioCertificateRequest(csr="not a csr"))
    assert (
        e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not a PEM CSR" in e.value.details()
    )
    # A real CSR for alice, with metadata saying it is for bob.
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(ALICE)]), True)
        .sign(key, hashes.SHA256())
    )
    metadata = struct_pb2.Struct()
    metadata.update({"ImpersonatedIdentity": "spiffe://cluster.local/ns/default/sa/bob"})
    request = IstioCertificateRequest(
        csr=csr.public_bytes(serialization.Encoding.PEM).decode(), metadata=metadata
    )
    with pytest.raises(grpc.RpcError) as e:
        raw_call(server, request)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "ImpersonatedIdentity" in e.value.details()


def test_a_ca_whose_certificate_we_do_not_trust_is_an_error(server: IstioCaServer) -> None:
    stranger = CertificateAuthority.create("cluster.local")
    c = IstioCaClient(server.address, stranger.roots_pem, token=lambda: "node-a-token", timeout=3)
    with pytest.raises(CaError, match=f"CA {server.address}: .*UNAVAILABLE"):
        c.issue(ALICE)
    assert server.issued == 0


def test_rotation_at_half_life_from_the_ca(server: IstioCaServer) -> None:
    installed: list[Any] = []
    manager = CertificateManager(client(server), installed.append, ttl=dt.timedelta(seconds=4))
    try:
        first = manager.ensure(ALICE)
        wait_until(lambda: len(installed) >= 2, timeout=10, what="a renewal")
        assert installed[1].chain_pem != first.chain_pem and server.issued >= 2
        assert manager.status()[0]["failures"] == 0
    finally:
        manager.stop()


def test_an_outage_keeps_the_certificate_backs_off_and_recovers(ca: CertificateAuthority) -> None:
    first_server = IstioCaServer(ca, "127.0.0.1:0").start()
    address = first_server.address
    installed: list[Any] = []
    c = IstioCaClient(address, ca.roots_pem, timeout=1)
    manager = CertificateManager(c, installed.append, ttl=dt.timedelta(seconds=3))
    try:
        cert = manager.ensure(ALICE)
        first_server.stop()
        # Renewals fail: the certificate stays, the failures are counted and backed off.
        wait_until(lambda: manager.status()[0]["failures"] >= 2, timeout=15, what="failures")
        (status,) = manager.status()
        assert "UNAVAILABLE" in status["error"] and manager.certificates() == [cert]
        # Past its expiry, readiness says so.
        wait_until(lambda: manager.pending(), timeout=10, what="the expiry to be reported")
        assert f"certificate of {ALICE} expired" in manager.pending()[0]
        # The CA comes back on the same address: the next try renews, and all is well again.
        second = IstioCaServer(ca, address).start()
        try:
            wait_until(lambda: second.issued >= 1, timeout=30, what="a renewal after the outage")
            wait_until(lambda: not manager.pending(), timeout=5)
            assert manager.status()[0]["failures"] == 0
        finally:
            second.stop()
    finally:
        manager.stop()


# --- ambient control-plane as the CA of two ztunnels ----------------------------------------

MESH = """
apiVersion: v1
kind: Namespace
metadata: {name: default, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: default}
spec: {nodeName: n1, serviceAccountName: client}
status: {podIP: 127.72.1.1}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: default}
spec: {nodeName: n2, serviceAccountName: web}
status: {podIP: 127.72.2.1}
"""


def control_plane_of(tmp_path: Path) -> ControlPlaneProcess:
    return ControlPlaneProcess(
        [], tmp_path / "ca", "127.0.0.1:0", "--tokens", str(tmp_path / "tokens")
    ).wait_ready()


def test_ztunnels_take_their_certificates_from_ambient_control_plane(tmp_path: Path) -> None:
    ca = CertificateAuthority.create("cluster.local")
    ca.save(tmp_path / "ca")
    (tmp_path / "tokens").write_text("n1-token ztunnel n1\nn2-token ztunnel n2\n")
    (tmp_path / "mesh.yaml").write_text(textwrap.dedent(MESH))
    control_plane = control_plane_of(tmp_path)
    app = App("name:web", ("127.72.2.1", 8080))
    nodes = []
    try:
        for node in ("n1", "n2"):
            (tmp_path / f"{node}.token").write_text(f"{node}-token\n")
            # --ca-dir names nothing: every certificate must come from the control plane.
            nodes.append(
                ZtunnelProcess(
                    node,
                    [tmp_path / "mesh.yaml"],
                    tmp_path / "no-such-ca",
                    tmp_path,
                    "--ca-address", control_plane.address,
                    "--ca-root-cert", str(tmp_path / "ca" / "root-cert.pem"),
                    "--token-file", str(tmp_path / f"{node}.token"),
                ).wait_ready()
            )  # fmt: skip
        sock = socks5.connect(("127.72.1.1", 15080), ("127.72.2.1", 8080), source="127.72.1.1")
        assert exchange(sock, b"hello").endswith(b"hello")
        dump = json.loads(
            urllib.request.urlopen(f"http://{nodes[1].admin}/config_dump", timeout=5).read()
        )
        (web,) = [c for c in dump["certificates"] if c["identity"].endswith("/sa/web")]
        assert web["failures"] == 0 and web["error"] is None
    finally:
        for n in nodes:
            n.stop()
        app.close()
        said = control_plane.stop()
    assert "issued 2" in said or "issued 3" in said, said
    assert "refused 0" in said, said


def test_a_ztunnel_refused_by_the_ca_is_not_ready_and_says_why(tmp_path: Path) -> None:
    ca = CertificateAuthority.create("cluster.local")
    ca.save(tmp_path / "ca")
    (tmp_path / "tokens").write_text("good-token\n")
    (tmp_path / "bad.token").write_text("bad-token\n")
    (tmp_path / "mesh.yaml").write_text(textwrap.dedent(MESH))
    control_plane = control_plane_of(tmp_path)
    node = ZtunnelProcess(
        "n2",
        [tmp_path / "mesh.yaml"],
        tmp_path / "no-such-ca",
        tmp_path,
        "--ca-address", control_plane.address,
        "--ca-root-cert", str(tmp_path / "ca" / "root-cert.pem"),
        "--token-file", str(tmp_path / "bad.token"),
    ).wait_ready()  # fmt: skip
    try:
        ready = f"http://{node.readiness}/healthz/ready"
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(ready, timeout=5)
        said = e.value.read().decode()
        assert e.value.code == 500 and "no certificate for" in said and "/sa/web" in said, said
        assert "UNAUTHENTICATED" in said, said
        # The CA is asked again, backing off: a second refusal comes about a second later.
        wait_until(lambda: "(2 in a row)" in node.output(), timeout=10, what="a retry")
    finally:
        node.stop()
        refused = control_plane.stop()
    assert "refused 0" not in refused, refused
