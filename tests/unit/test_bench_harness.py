"""Fast checks of the benchmark harness pieces that do not need the ambient build.

The HAProxy tests start real HAProxy processes on loopback (about 0.3 s each): without
``haproxy`` they are skipped, saying so, unless ``AMBIENT_REQUIRE_TOOLS=1`` (CI installs Debian's
haproxy and sets it), which makes them fail instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import ssl
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from ambient.identity import CertificateAuthority

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import harness  # noqa: E402

# HAProxy is the peer the benchmarks compare against (tests/conftest.py: requires_tool).
needs_haproxy = pytest.mark.requires_tool("haproxy", "haproxy")

ONE_MIB = 1 << 20


class EchoServer:
    """A threaded TCP echo server on loopback that keeps what each connection sent it."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address: tuple[str, int] = self.sock.getsockname()[:2]
        self.received: list[bytearray] = []
        self._threads: list[threading.Thread] = []
        self._stop = False
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True)
        self._acceptor.start()

    def _accept_loop(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            buf = bytearray()
            self.received.append(buf)
            t = threading.Thread(target=self._echo, args=(conn, buf), daemon=True)
            t.start()
            self._threads.append(t)

    @staticmethod
    def _echo(conn: socket.socket, buf: bytearray) -> None:
        with conn:
            try:
                while data := conn.recv(65536):
                    buf += data
                    conn.sendall(data)
            except OSError:
                pass

    def close(self) -> None:
        self._stop = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() on Linux
        self.sock.close()
        self._acceptor.join(timeout=2)


@pytest.fixture
def echo_server() -> Iterator[EchoServer]:
    server = EchoServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("ca")
    CertificateAuthority.create("cluster.local").save(directory)
    return directory


def roundtrip(sock: socket.socket, payload: bytes, timeout: float = 20) -> bytes:
    """Send ``payload`` from a thread while reading the same number of bytes back."""
    sock.settimeout(timeout)
    errors: list[OSError] = []

    def send() -> None:
        try:
            sock.sendall(payload)
        except OSError as e:  # reported by the reading side
            errors.append(e)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    received = bytearray()
    while len(received) < len(payload):
        chunk = sock.recv(min(65536, len(payload) - len(received)))
        if not chunk:
            break
        received += chunk
    sender.join(timeout)
    assert not errors, errors
    return bytes(received)


def client_context(certs: harness.BenchCerts, *, with_cert: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # URI SAN only; the chain is still verified against our root
    ctx.load_verify_locations(certs.roots_pem)
    if with_cert:
        ctx.load_cert_chain(certs.client_pem)
    return ctx


def uri_sans(cert: dict) -> list[str]:  # type: ignore[type-arg]
    return [value for kind, value in cert.get("subjectAltName", ()) if kind == "URI"]


# ---------------------------------------------------------------------------------------------
# processes


def test_start_process_waits_for_ready_line() -> None:
    code = "import time; print('starting'); print('ready 127.0.0.1:4321'); time.sleep(60)"
    proc = harness.start_process([sys.executable, "-c", code], timeout=10)
    try:
        assert proc.poll() is None
        assert proc.ready_line == "ready 127.0.0.1:4321"
        assert harness.parse_host_port(proc.ready_line[len("ready ") :]) == ("127.0.0.1", 4321)
    finally:
        assert harness.stop_process(proc) is not None
    assert proc.poll() is not None


def test_start_process_reports_stderr_when_the_process_exits() -> None:
    code = "import sys; print('no such flag: --frobnicate', file=sys.stderr); sys.exit(3)"
    with pytest.raises(harness.ProcessStartError, match="--frobnicate") as info:
        harness.start_process([sys.executable, "-c", code], timeout=10)
    assert "exit status 3" in str(info.value)


def test_start_process_times_out_and_stops_the_process() -> None:
    code = "import sys, time; print('warming up', file=sys.stderr, flush=True); time.sleep(60)"
    with pytest.raises(harness.ProcessStartError, match="warming up"):
        harness.start_process([sys.executable, "-c", code], timeout=0.5)


def test_stop_process_kills_a_process_that_ignores_sigterm() -> None:
    code = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('ready x:1'); time.sleep(60)"
    )
    proc = harness.start_process([sys.executable, "-c", code], timeout=10)
    assert harness.stop_process(proc, timeout=0.5) == -9


def test_proxy_pair_yields_the_client_ready_address() -> None:
    def fake(addr: str) -> list[str]:
        return [sys.executable, "-c", f"import time; print('ready {addr}'); time.sleep(60)"]

    with harness.proxy_pair(fake("127.0.0.1:1111"), fake("[::1]:2222")) as pair:
        assert pair.server_address == ("127.0.0.1", 1111)
        assert pair.entry == ("::1", 2222)
        procs = (pair.server, pair.client)
    assert all(p.poll() is not None for p in procs)


def test_hbone_argvs_match_the_documented_command_lines(ca_dir: Path) -> None:
    server, client = harness.hbone_argvs(
        "ambient",
        "hbone serve",
        "hbone forward",
        python="python3",
        ca_dir=ca_dir,
        upstream=("127.0.0.1", 5201),
    )
    assert server[:6] == ["python3", "-P", "-m", "ambient", "hbone", "serve"]
    assert server[server.index("--upstream") + 1] == "127.0.0.1:5201"
    assert server[server.index("--identity") + 1] == harness.BENCH_SERVER_ID
    assert client[:6] == ["python3", "-P", "-m", "ambient", "hbone", "forward"]
    assert client[client.index("--authority") + 1] == "127.0.0.1:5201"
    assert client[client.index("--expect") + 1] == harness.BENCH_SERVER_ID
    assert client[client.index("--server") + 1] == server[server.index("--listen") + 1]


def test_netns_prefix_runs_the_command_inside_the_named_netns() -> None:
    assert harness.netns_prefix(None) == []
    assert harness.netns_prefix("bench-client")[1:] == ["netns", "exec", "bench-client"]


def test_is_listening_reads_the_tables_of_a_process_netns() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        assert harness.is_listening("127.0.0.1", port) is True
        # The same netns, reached through a pid (a process in another netns shows its own).
        assert harness.is_listening("127.0.0.1", port, pid=os.getpid()) is True
    assert harness.is_listening("127.0.0.1", port, pid=os.getpid()) is False


# ---------------------------------------------------------------------------------------------
# iperf3 reports and figures


def iperf3_report(received_bps: float = 4.2e9, sent_bps: float = 4.3e9) -> str:
    return json.dumps(
        {
            "start": {},
            "intervals": [],
            "end": {
                "sum_sent": {"bits_per_second": sent_bps, "bytes": 100, "retransmits": 7},
                "sum_received": {"bits_per_second": received_bps, "bytes": 99},
            },
        }
    )


def test_parse_iperf3_json_takes_the_receiver_side() -> None:
    result = harness.parse_iperf3_json(iperf3_report())
    assert result.receiver_gbps == pytest.approx(4.2)
    assert result.sender_gbps == pytest.approx(4.3)
    assert result.retransmits == 7
    assert result.end["sum_received"]["bytes"] == 99


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "gave no JSON .exit 1.: boom"),
        ('{"error": "unable to connect to server: Connection refused"}', "Connection refused"),
        ('{"end": {}}', "no sums"),
        ("[]", "not a JSON object"),
        (iperf3_report(received_bps=0), "receiver got no data"),
    ],
)
def test_parse_iperf3_json_refuses_a_report_without_a_figure(text: str, message: str) -> None:
    with pytest.raises(RuntimeError, match=message):
        harness.parse_iperf3_json(text, exit_status=1, stderr="boom\n")


def test_spread_stats() -> None:
    stats = harness.spread_stats([4.0, 5.0, 6.0, 5.5])
    assert stats["median"] == pytest.approx(5.25)
    assert (stats["min"], stats["max"]) == (4.0, 6.0)
    assert stats["spread_pct"] == pytest.approx(100 * 2 / 5.25)
    assert harness.spread_stats([0.0])["spread_pct"] is None
    with pytest.raises(ValueError):
        harness.spread_stats([])


def test_same_round_ratios_pair_readings_of_the_same_round() -> None:
    readings = [
        {"round": 1, "system": "mesh", "gbps": 3.0},
        {"round": 1, "system": "plain", "gbps": 10.0},
        {"round": 2, "system": "plain", "gbps": 8.0},
        {"round": 2, "system": "mesh", "gbps": 4.0},
        {"round": 3, "system": "mesh", "gbps": 9.0, "valid": False},  # left out
        {"round": 3, "system": "plain", "gbps": 9.0},
        {"round": 4, "system": "mesh", "gbps": 2.0},  # no baseline in round 4
        {"round": 4, "system": "plain", "error": "iperf3 client: interrupt"},
        {"round": 5, "system": "mesh", "gbps": 2.0},
        {"round": 5, "system": "plain", "gbps": 0.0},  # no ratio to 0
    ]
    ratios = harness.same_round_ratios(readings, "mesh", "plain")
    assert ratios == {1: pytest.approx(0.3), 2: pytest.approx(0.5)}


# ---------------------------------------------------------------------------------------------
# HAProxy mutual-TLS pair


@needs_haproxy
def test_haproxy_pair_carries_bytes_end_to_end(ca_dir: Path, echo_server: EchoServer) -> None:
    payload = os.urandom(ONE_MIB)
    with (
        harness.haproxy_mtls_pair(ca_dir, echo_server.address) as entry,
        socket.create_connection(entry, timeout=10) as sock,
    ):
        assert roundtrip(sock, payload) == payload
    assert payload in [bytes(b) for b in echo_server.received]


@needs_haproxy
def test_haproxy_b_refuses_a_client_without_certificate(
    ca_dir: Path, echo_server: EchoServer
) -> None:
    with harness.haproxy_mtls_servers(ca_dir, echo_server.address) as pair:
        # Positive control: the same kind of client, with the client certificate, is served.
        ctx = client_context(pair.certs, with_cert=True)
        with (
            socket.create_connection(pair.tls, timeout=10) as raw,
            ctx.wrap_socket(raw) as tls,
        ):
            assert tls.version() == "TLSv1.3"
            cipher = tls.cipher()
            assert cipher is not None
            assert cipher[0] in harness.TLS13_CIPHERSUITES.split(":")
            assert tls.selected_alpn_protocol() is None
            assert uri_sans(tls.getpeercert()) == [harness.BENCH_SERVER_ID]
            assert roundtrip(tls, b"mutual" * 1000) == b"mutual" * 1000

        # Without a client certificate: in TLS 1.3 the client's side of the handshake may finish
        # before B checks the (empty) certificate, so the refusal shows up as an alert or EOF.
        ctx = client_context(pair.certs, with_cert=False)
        secret = b"sent without a client certificate"
        got = b""
        with socket.create_connection(pair.tls, timeout=10) as raw:
            try:
                with ctx.wrap_socket(raw) as tls:
                    tls.sendall(secret)
                    got = tls.recv(100)  # an alert (certificate required) or EOF, not an echo
            except (ssl.SSLError, ConnectionError) as e:
                print(f"refused as expected: {e!r}")
        assert got == b"", "B echoed data from a client without a certificate"
        assert not any(secret in b for b in echo_server.received)


class TlsEchoServer:
    """A Python TLS 1.3 echo server that requires a client certificate and records each session."""

    def __init__(self, server_pem: Path, roots_pem: Path) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        self.ctx.verify_mode = ssl.CERT_REQUIRED
        self.ctx.load_verify_locations(roots_pem)
        self.ctx.load_cert_chain(server_pem)
        self.ctx.sni_callback = self._on_sni  # type: ignore[assignment]
        self.sni: list[str | None] = []
        self.sessions: list[dict[str, object]] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address: tuple[str, int] = self.listener.getsockname()[:2]
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def _on_sni(self, sock: ssl.SSLObject, name: str | None, ctx: ssl.SSLContext) -> None:
        self.sni.append(name)

    def _accept_loop(self) -> None:
        while True:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(raw,), daemon=True).start()

    def _handle(self, raw: socket.socket) -> None:
        record: dict[str, object] = {"echoed": 0}
        self.sessions.append(record)
        echoed = 0
        try:
            with self.ctx.wrap_socket(raw, server_side=True) as tls:
                record["version"] = tls.version()
                record["alpn"] = tls.selected_alpn_protocol()
                record["peer"] = uri_sans(tls.getpeercert())
                while data := tls.recv(65536):
                    tls.sendall(data)
                    echoed += len(data)
                    record["echoed"] = echoed
        except (OSError, ssl.SSLError) as e:
            record["error"] = repr(e)  # e.g. the readiness probe, which hangs up at once

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() on Linux
        self.listener.close()


def through_haproxy_a(
    certs: harness.BenchCerts, target: tuple[str, int], workdir: Path, payload: bytes
) -> bytes:
    """Run HAProxy A alone in front of ``target``, send ``payload`` through, return the echo."""
    listen = ("127.0.0.1", harness.free_port())
    config = harness.haproxy_tls_client_config(listen, target, certs.client_pem, certs.roots_pem)
    # No retries: a refused handshake would otherwise be retried 3 times, 1 s apart.
    config = config.replace("    mode tcp\n", "    mode tcp\n    retries 0\n")
    assert "retries 0" in config
    with (
        harness.haproxy_process(config, listen, workdir=workdir, name="a"),
        socket.create_connection(listen, timeout=10) as sock,
    ):
        try:
            return roundtrip(sock, payload)
        except (ConnectionError, TimeoutError):
            return b""


@needs_haproxy
def test_haproxy_a_presents_its_certificate_and_sends_no_sni(ca_dir: Path, tmp_path: Path) -> None:
    """Put a Python TLS server where B would be and look at what HAProxy A sends it."""
    certs = harness.write_bench_certs(ca_dir, tmp_path)
    server = TlsEchoServer(certs.server_pem, certs.roots_pem)
    payload = b"x" * 100_000
    try:
        assert through_haproxy_a(certs, server.address, tmp_path, payload) == payload
    finally:
        server.close()
    carried = [r for r in server.sessions if r["echoed"] == len(payload)]
    assert len(carried) == 1, server.sessions
    assert carried[0]["version"] == "TLSv1.3"
    assert carried[0]["alpn"] is None
    assert carried[0]["peer"] == [harness.BENCH_CLIENT_ID]
    assert server.sni and all(name is None for name in server.sni), server.sni


@needs_haproxy
def test_haproxy_a_refuses_a_server_from_another_ca(ca_dir: Path, tmp_path: Path) -> None:
    """The mutual part on A's side: a server certificate from a foreign root is not accepted."""
    certs = harness.write_bench_certs(ca_dir, tmp_path)
    other_dir = tmp_path / "other-ca"
    CertificateAuthority.create("cluster.local").save(other_dir)
    impostor = harness.write_bench_certs(other_dir, other_dir)
    # The impostor trusts our root (so it would accept A's certificate) but presents its own.
    server = TlsEchoServer(impostor.server_pem, certs.roots_pem)
    try:
        assert through_haproxy_a(certs, server.address, tmp_path, b"secret" * 100) == b""
    finally:
        server.close()
    assert not any(r["echoed"] for r in server.sessions), server.sessions
