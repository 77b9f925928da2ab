"""The compiled core end to end on loopback: a Rust HBONE client talking to a Rust HBONE server,
with real sockets, real mutual TLS and applications that know nothing of the mesh."""

from __future__ import annotations

import re
import socket
import ssl
import threading

import pytest

from ambient.hbone import Allow, DataPlane, Deny, HboneTarget, StreamRequest, TunnelError
from ambient.identity import CertificateAuthority
from ambient.testing import App, exchange, refused_port, wait_until

SERVER = "spiffe://cluster.local/ns/default/sa/server"
CLIENT = "spiffe://cluster.local/ns/default/sa/client"
MB = 1024 * 1024


@pytest.fixture
def pair(dataplane_factory, server_cert, client_cert):
    """A server data plane and a client data plane (separate runtimes, as two nodes)."""
    server = dataplane_factory(2)
    client = dataplane_factory(2)
    server.load_identity(server_cert)
    client.load_identity(client_cert)
    return server, client


def target(listener, authority: str, *, expect=SERVER, source=CLIENT, headers=None):
    return HboneTarget(listener.local_address, authority, [expect], source, headers=headers or [])


# --- bytes, identities, headers ---------------------------------------------------------------


def test_bytes_flow_both_ways_and_the_server_sees_the_client_identity(pair, echo):
    server, client = pair
    seen: list[StreamRequest] = []

    def decide(request):
        seen.append(request)
        return Allow(echo.address)

    listener = server.serve("127.0.0.1:0", SERVER, decide)
    payload = bytes(range(256)) * (20 * 4096)  # 20 MiB: crosses every window and buffer size
    answer = exchange(client.connect(target(listener, echo.address)), payload)
    assert answer == payload
    (request,) = seen
    assert request.peer_identity == CLIENT
    assert request.peer == ("cluster.local", "default", "client")
    assert request.authority == echo.address
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-00", request.header("traceparent"))
    stats = client.stats()
    assert stats["bytes_sent"] == len(payload) and stats["bytes_received"] == len(payload)
    assert stats["active_tunnels"] == 0


def test_client_sends_forwarded_and_baggage_and_they_reach_the_decision(pair, echo):
    server, client = pair
    seen: list[StreamRequest] = []
    listener = server.serve("127.0.0.1:0", SERVER, lambda r: seen.append(r) or Allow(echo.address))
    baggage = "k8s.namespace.name=default,k8s.deployment.name=client,service.name=client"
    plan = target(listener, echo.address, headers=[("baggage", baggage)])
    forward = client.forward("127.0.0.1:0", plan)
    with socket.create_connection(forward.local_address.rsplit(":", 1)) as raw:
        local = "{}:{}".format(*raw.getsockname())
        assert exchange(raw, b"ping") == b"ping"
    (request,) = seen
    assert request.forwarded_for == local  # the original client, as the forwarder accepted it
    assert request.baggage["k8s.deployment.name"] == "client"
    assert request.header("forwarded") == f'for="{local}"'


def test_half_close_client_first_keeps_the_answer_flowing(pair, app_factory):
    server, client = pair
    counter = app_factory("count")  # answers only after it saw our FIN
    listener = server.serve("127.0.0.1:0", SERVER, Allow(counter.address))
    answer = exchange(client.connect(target(listener, counter.address)), b"x" * 3 * MB)
    assert answer == str(3 * MB).encode()


def test_half_close_server_first_keeps_the_upload_flowing(pair, app_factory):
    server, client = pair
    greeter = app_factory("greet")  # sends and half-closes first, then keeps reading
    listener = server.serve("127.0.0.1:0", SERVER, Allow(greeter.address))
    sock = client.connect(target(listener, greeter.address))
    sock.settimeout(10)
    greeting = b""
    while chunk := sock.recv(1024):  # EOF from the server side arrives first...
        greeting += chunk
    assert greeting == b"hello from the app\n"
    sock.sendall(b"y" * 2 * MB)  # ...and our direction still carries data
    sock.shutdown(socket.SHUT_WR)
    sock.close()
    wait_until(lambda: greeter.received == [2 * MB], what="the app to receive the upload")


def test_asyncio_streams_through_a_tunnel(pair, echo):
    import asyncio

    server, client = pair
    listener = server.serve("127.0.0.1:0", SERVER, Allow(echo.address))

    async def main() -> bytes:
        reader, writer = await client.open_connection(target(listener, echo.address))
        writer.write(b"over asyncio")
        writer.write_eof()
        data = await reader.read()
        writer.close()
        return data

    assert asyncio.run(main()) == b"over asyncio"


# --- refusals: each is answered as documented, and the server keeps serving -------------------


def assert_still_serves(client: DataPlane, listener, app: App) -> None:
    assert exchange(client.connect(target(listener, app.address)), b"still here") == b"still here"


def test_plaintext_bytes_to_the_hbone_port_are_dropped(pair, echo):
    server, client = pair
    listener = server.serve("127.0.0.1:0", SERVER, Allow(echo.address))
    host, port = listener.local_address.rsplit(":", 1)
    with socket.create_connection((host, int(port))) as raw:
        raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        raw.settimeout(10)
        answer = b""
        while chunk := raw.recv(1024):
            answer += chunk
    # A TLS alert record (content type 21), then the connection is closed: no HTTP answer.
    assert answer[:1] == b"\x15" and b"HTTP" not in answer
    wait_until(lambda: server.stats()["tls_handshake_failures"] == 1, what="the failure count")
    assert_still_serves(client, listener, echo)


def test_tls_without_a_client_certificate_is_refused(pair, echo, server_cert):
    server, client = pair
    listener = server.serve("127.0.0.1:0", SERVER, Allow(echo.address))
    host, port = listener.local_address.rsplit(":", 1)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    with (
        socket.create_connection((host, int(port))) as raw,
        ctx.wrap_socket(raw) as tls,  # TLS 1.3: the refusal arrives with the first read
        pytest.raises(ssl.SSLError, match="CERTIFICATE_REQUIRED|certificate required"),
    ):
        tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        tls.recv(1024)
    wait_until(lambda: server.stats()["tls_handshake_failures"] == 1, what="the failure count")
    assert_still_serves(client, listener, echo)


def test_client_certificate_from_another_trust_domain_is_refused(pair, ca, echo):
    server, client = pair
    listener = server.serve("127.0.0.1:0", SERVER, Allow(echo.address))
    # Signed by our own CA, so the chain verifies: only the trust-domain check refuses it.
    foreign = ca.issue("spiffe://other.domain/ns/default/sa/client")
    client.load_identity(foreign)
    plan = HboneTarget(listener.local_address, echo.address, [SERVER], foreign.identity)
    with pytest.raises(TunnelError, match="server refused our certificate"):
        client.connect(plan)
    # Counted once the server's handshake returns, after its alert reached us.
    wait_until(lambda: server.stats()["tls_handshake_failures"] == 1, what="the failure count")
    assert server.stats()["hbone_requests_received"] == 0
    assert_still_serves(client, listener, echo)


def test_client_certificate_from_an_unknown_ca_is_refused(pair, ca, echo):
    server, client = pair
    listener = server.serve("127.0.0.1:0", SERVER, Allow(echo.address))
    stranger = CertificateAuthority.create("cluster.local").issue(
        "spiffe://cluster.local/ns/default/sa/stranger"
    )
    # The stranger trusts our root (so it accepts our server), but nobody trusts its issuer.
    client.core.set_identity(stranger.identity, stranger.chain_pem, stranger.key_pem, ca.roots_pem)
    plan = HboneTarget(listener.local_address, echo.address, [SERVER], stranger.identity)
    with pytest.raises(TunnelError, match="server refused our certificate"):
        client.connect(plan)
    assert_still_serves(client, listener, echo)


def test_server_whose_san_is_not_expected_is_refused_by_the_client(pair, echo):
    server, client = pair
    listener = server.serve("127.0.0.1:0", SERVER, Allow(echo.address))
    plan = target(listener, echo.address, expect="spiffe://cluster.local/ns/default/sa/other")
    with pytest.raises(TunnelError, match="server identity mismatch.*sa/other.*sa/server"):
        client.connect(plan)
    assert server.stats()["hbone_requests_received"] == 0
    assert_still_serves(client, listener, echo)


@pytest.mark.parametrize("authority", ["example.com:80", "10.0.0.1:99999", "[::1]:0x50"])
def test_malformed_authority_is_answered_400(pair, echo, authority):
    server, client = pair
    decided = []
    listener = server.serve(
        "127.0.0.1:0", SERVER, lambda r: decided.append(r) or Allow(echo.address)
    )
    with pytest.raises(TunnelError, match="400"):
        client.connect(target(listener, authority))
    assert decided == []  # refused before any decision
    assert server.stats()["hbone_requests_refused"] == 1
    assert_still_serves(client, listener, echo)


def test_unreachable_upstream_is_answered_503(pair, echo):
    server, client = pair
    dead = refused_port()
    listener = server.serve(
        "127.0.0.1:0", SERVER, lambda r: Allow(dead if r.authority == dead else echo.address)
    )
    with pytest.raises(TunnelError, match="503"):
        client.connect(target(listener, dead))
    assert server.stats()["upstream_connect_failures"] == 1
    assert_still_serves(client, listener, echo)


def test_denied_stream_gets_the_decisions_status(pair, echo):
    server, client = pair

    def decide(request):
        if request.authority == "127.0.0.9:80":
            return Deny("not this one", status=403)
        if request.peer.service_account != "client":
            return Deny("unknown caller")
        return Allow(echo.address)

    listener = server.serve("127.0.0.1:0", SERVER, decide)
    with pytest.raises(TunnelError, match="403"):
        client.connect(target(listener, "127.0.0.9:80"))
    assert server.stats()["decisions_denied"] == 1
    assert_still_serves(client, listener, echo)


def test_a_decision_that_raises_is_answered_500_and_counted(pair, echo):
    server, client = pair

    def decide(request):
        if request.authority.endswith(":1"):
            raise RuntimeError("policy bug")
        return Allow(echo.address)

    listener = server.serve("127.0.0.1:0", SERVER, decide)
    with pytest.raises(TunnelError, match="500"):
        client.connect(target(listener, "127.0.0.1:1"))
    assert server.stats()["decision_errors"] == 1
    assert_still_serves(client, listener, echo)


def test_a_decision_returning_the_wrong_type_is_an_error_not_an_allow(pair, echo):
    server, client = pair
    listener = server.serve("127.0.0.1:0", SERVER, lambda r: echo.address)  # a str, not Allow
    with pytest.raises(TunnelError, match="500"):
        client.connect(target(listener, echo.address))
    assert server.stats()["decision_errors"] == 1
    assert echo.peers == []


def test_a_slow_decision_does_not_stall_other_connections(pair, echo):
    server, client = pair
    release = threading.Event()

    def decide(request):
        if request.authority == "127.0.0.1:7":
            release.wait(20)  # a decision stuck on something slow
            return Deny("slow no")
        return Allow(echo.address)

    listener = server.serve("127.0.0.1:0", SERVER, decide)
    outcome: list[Exception] = []

    def slow_connect() -> None:
        try:
            client.connect(target(listener, "127.0.0.1:7"))
        except TunnelError as e:
            outcome.append(e)

    slow = threading.Thread(target=slow_connect)
    slow.start()
    try:
        payload = b"z" * 8 * MB
        assert exchange(client.connect(target(listener, echo.address)), payload) == payload
        assert slow.is_alive()  # the slow one is still deciding while bytes moved
    finally:
        release.set()
        slow.join()
    assert len(outcome) == 1 and "401" in str(outcome[0])


def test_peer_vanishing_mid_stream_closes_the_upstream_and_others_continue(
    pair, app_factory, dataplane_factory, client_cert
):
    server, client = pair
    sink = app_factory("count")
    listener = server.serve("127.0.0.1:0", SERVER, Allow(sink.address))
    doomed = dataplane_factory(1)
    doomed.load_identity(client_cert)
    victim = doomed.connect(target(listener, sink.address))
    victim.sendall(b"a" * MB)
    wait_until(lambda: server.stats()["active_tunnels"] == 1, what="the tunnel to be up")
    # The client's whole data plane vanishes mid-stream: no END_STREAM, no RST_STREAM, no GOAWAY;
    # its TCP connection just ends.
    doomed.close()
    victim.close()
    wait_until(lambda: sink.connections_ended == 1, what="the upstream to be closed")
    wait_until(lambda: server.stats()["active_tunnels"] == 0, what="the tunnel to be released")
    # The same listener still serves everyone else (the count app answers with a byte count).
    assert exchange(client.connect(target(listener, sink.address)), b"still here") == b"10"


def _rsa_root(directory, trust_domain: str = "cluster.local"):
    """An RSA-2048 root in the CA's file layout, as Istio's test CA and many self-hosted CAs."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        )
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "root-cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "root-key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return key


def test_a_ca_with_an_rsa_root_issues_certificates_the_core_accepts(
    dataplane_factory, echo, tmp_path
):
    """A root shared with another mesh (Istio's test CA is RSA-2048) signs our workloads' ECDSA
    certificates, and HBONE works with them both ways."""
    _rsa_root(tmp_path / "ca")
    ca = CertificateAuthority.load(tmp_path / "ca")
    server, client = dataplane_factory(1), dataplane_factory(1)
    server.load_identity(ca.issue(SERVER))
    client.load_identity(ca.issue(CLIENT))
    listener = server.serve("127.0.0.1:0", SERVER, Allow(echo.address))
    with client.connect(target(listener, echo.address)) as sock:
        assert exchange(sock, b"over an RSA root") == b"over an RSA root"


def test_a_ca_whose_key_does_not_match_its_root_is_refused(tmp_path):
    _rsa_root(tmp_path / "a")
    _rsa_root(tmp_path / "b")
    (tmp_path / "a" / "root-key.pem").write_bytes((tmp_path / "b" / "root-key.pem").read_bytes())
    with pytest.raises(ValueError, match="does not belong to the certificate"):
        CertificateAuthority.load(tmp_path / "a")
