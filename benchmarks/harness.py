"""Pieces for the throughput benchmarks: processes, iperf3, an HAProxy mTLS pair, HBONE pairs.

Everything here starts real processes on loopback and stops them again, whatever happens in
between. Readiness is always observed (a ``ready host:port`` line, a port that accepts
connections), never assumed after a sleep.

This is benchmark tooling, not product code, imported as ``benchmarks.harness`` (with the
repository root on ``sys.path``) by ``benchmarks/compare_throughput.py`` and
``tests/unit/test_bench_harness.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

IPERF3 = shutil.which("iperf3") or "/usr/bin/iperf3"
IP = shutil.which("ip") or "/usr/sbin/ip"
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
TASKSET = shutil.which("taskset") or "/usr/bin/taskset"

# The TLS 1.3 suites Istio's ztunnel offers, in its order (rustls default order minus ChaCha20).
TLS13_CIPHERSUITES = "TLS_AES_256_GCM_SHA384:TLS_AES_128_GCM_SHA256"

BENCH_CLIENT_ID = "spiffe://cluster.local/ns/bench/sa/client"
BENCH_SERVER_ID = "spiffe://cluster.local/ns/bench/sa/server"

Address = tuple[str, int]


class ProcessStartError(RuntimeError):
    """A process exited or did not become ready in time; the message carries its stderr tail."""


# --------------------------------------------------------------------------------------------
# ports and addresses


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free on ``host`` a moment ago (the OS picks it).

    There is an unavoidable race between closing the probe socket and the real owner binding the
    port; on a benchmark machine that is acceptable.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def parse_host_port(text: str) -> Address:
    """Parse ``host:port`` or ``[v6]:port`` into a tuple."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"not a host:port address: {text!r}")
    return host.strip("[]"), int(port)


def taskset_prefix(cpus: str | None) -> list[str]:
    """``[taskset, "-c", cpus]`` when ``cpus`` is given (e.g. ``"0"``, ``"0,1"``), else ``[]``."""
    return [TASKSET, "-c", cpus] if cpus else []


def netns_prefix(netns: str | None) -> list[str]:
    """``[ip, "netns", "exec", netns]`` when ``netns`` is given, else ``[]``.

    ``ip netns exec`` execs the command (no fork), so the pid of the process started with this
    prefix is the command's own.
    """
    return [IP, "netns", "exec", netns] if netns else []


# --------------------------------------------------------------------------------------------
# processes


class ReadyProcess(subprocess.Popen):  # type: ignore[type-arg]
    """A :class:`subprocess.Popen` that also remembers its readiness line and its stderr file.

    After readiness, a daemon thread keeps draining stdout (into :attr:`stdout_tail`) so that a
    chatty process never blocks on a full pipe.
    """

    ready_line: str = ""
    stderr_path: Path | None = None
    stdout_tail: deque[str]

    def stderr_text(self, limit: int = 4000) -> str:
        """The last ``limit`` characters the process wrote to stderr."""
        if self.stderr_path is None:
            return ""
        try:
            data = self.stderr_path.read_bytes()
        except OSError:
            return ""
        return data[-limit:].decode("utf-8", "replace")

    def describe_failure(self, what: str) -> str:
        """A one-paragraph explanation with the exit status and the stderr/stdout tails."""
        rc = self.poll()
        status = "still running" if rc is None else f"exit status {rc}"
        parts = [f"{what}: {self.args!r} ({status})"]
        err = self.stderr_text().strip()
        if err:
            parts.append("stderr:\n" + err)
        out = "".join(self.stdout_tail).strip()
        if out:
            parts.append("stdout:\n" + out[-2000:])
        return "\n".join(parts)


def _drain(stream: object, sink: deque[str]) -> None:
    try:
        for raw in iter(stream.readline, b""):  # type: ignore[attr-defined]
            sink.append(raw.decode("utf-8", "replace"))
    except (OSError, ValueError):
        pass


def start_process(
    argv: Sequence[str],
    *,
    ready_prefix: str | None = "ready ",
    timeout: float = 30,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> ReadyProcess:
    """Start ``argv`` with stdout piped; wait until it prints a line starting with ``ready_prefix``.

    ``env`` entries are added to (not substituted for) the current environment, and
    ``PYTHONUNBUFFERED=1`` is set so that a Python child's ``print`` reaches us at once.
    With ``ready_prefix=None`` the process is returned as soon as it has been spawned (the caller
    checks readiness another way, e.g. :func:`wait_for_port`).

    Raises :class:`ProcessStartError` with the process's stderr if it exits first or times out;
    the process is stopped in that case.
    """
    full_env = dict(os.environ)
    full_env["PYTHONUNBUFFERED"] = "1"
    if env:
        full_env.update(env)
    fd, err_name = tempfile.mkstemp(prefix="bench-stderr-", suffix=".log")
    err_file = os.fdopen(fd, "wb")
    try:
        proc = ReadyProcess(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err_file,
            env=full_env,
            cwd=cwd,
            start_new_session=True,  # a Ctrl-C on the terminal reaches us, and we stop the children
        )
    except OSError as e:
        err_file.close()
        os.unlink(err_name)
        raise ProcessStartError(f"cannot start {list(argv)!r}: {e}") from e
    finally:
        if not err_file.closed:
            err_file.close()  # the child has its own copy of the descriptor
    proc.stderr_path = Path(err_name)
    proc.stdout_tail = deque(maxlen=200)

    if ready_prefix is not None:
        lines: queue.Queue[str | None] = queue.Queue()

        def read_until_ready() -> None:
            assert proc.stdout is not None
            for raw in iter(proc.stdout.readline, b""):
                line = raw.decode("utf-8", "replace")
                lines.put(line)
                if line.startswith(ready_prefix):
                    return  # the drain thread takes the pipe over from here
            lines.put(None)  # end of stdout: the process is exiting

        reader = threading.Thread(target=read_until_ready, daemon=True)
        reader.start()
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                msg = proc.describe_failure(f"not ready after {timeout:g} s")
                stop_process(proc)
                raise ProcessStartError(msg) from None
            if line is None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)
                msg = proc.describe_failure("exited before printing a ready line")
                stop_process(proc)
                raise ProcessStartError(msg)
            proc.stdout_tail.append(line)
            if line.startswith(ready_prefix):
                proc.ready_line = line.rstrip("\r\n")
                break
        reader.join()

    assert proc.stdout is not None
    threading.Thread(target=_drain, args=(proc.stdout, proc.stdout_tail), daemon=True).start()
    return proc


def stop_process(
    proc: subprocess.Popen,  # type: ignore[type-arg]
    timeout: float = 5,
) -> int | None:
    """Stop one process: SIGTERM, wait up to ``timeout`` s, then SIGKILL. Returns its exit status.

    Only this process's own id is signalled. The stderr temp file of a :class:`ReadyProcess` is
    removed.
    """
    try:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(timeout=timeout)
        return proc.returncode
    finally:
        if proc.stdout is not None:
            with contextlib.suppress(OSError):
                proc.stdout.close()
        path = getattr(proc, "stderr_path", None)
        if path is not None:
            with contextlib.suppress(OSError):
                path.unlink()


@contextlib.contextmanager
def running(
    argv: Sequence[str],
    *,
    ready_prefix: str | None = "ready ",
    timeout: float = 30,
    env: Mapping[str, str] | None = None,
) -> Iterator[ReadyProcess]:
    """Context-manager form of :func:`start_process` / :func:`stop_process`."""
    proc = start_process(argv, ready_prefix=ready_prefix, timeout=timeout, env=env)
    try:
        yield proc
    finally:
        stop_process(proc)


def _proc_net_address(host: str) -> tuple[str, str] | None:
    """``host`` as /proc/net/tcp{,6} spell it: (table, hex) — 32-bit words in host byte order."""
    for family, table in ((socket.AF_INET, "tcp"), (socket.AF_INET6, "tcp6")):
        try:
            packed = socket.inet_pton(family, host)
        except OSError:
            continue
        words = [packed[i : i + 4] for i in range(0, len(packed), 4)]
        return table, "".join(w[:: -1 if sys.byteorder == "little" else 1].hex() for w in words)
    return None


def is_listening(host: str, port: int, *, pid: int | None = None) -> bool | None:
    """Whether a socket is listening on ``host:port`` (or on the wildcard), read from /proc/net.

    With ``pid``, the tables of the network namespace process ``pid`` is in are read
    (``/proc/<pid>/net``) instead of our own: a listener inside another netns.
    Returns None when /proc/net cannot answer (not Linux, or ``host`` is a name, not an address).
    Unlike a probe connection this has no side effect on the listener.
    """
    own = _proc_net_address(host)
    if own is None:
        return None
    table, own_hex = own
    wildcard = "0" * len(own_hex)
    candidates = {f"{own_hex}:{port:04X}".upper(), f"{wildcard}:{port:04X}"}
    if table == "tcp":  # a dual-stack [::] listener also takes IPv4 connections
        tables = ("tcp", "tcp6")
        candidates.add(f"{'0' * 32}:{port:04X}")
    else:
        tables = ("tcp6",)
    try:
        for name in tables:
            with open(f"/proc/{pid}/net/{name}" if pid else f"/proc/net/{name}") as f:
                next(f, None)  # header
                for line in f:
                    fields = line.split()
                    if len(fields) > 3 and fields[3] == "0A" and fields[1].upper() in candidates:
                        return True
    except OSError:
        return None
    return False


def wait_for_port(
    host: str,
    port: int,
    *,
    timeout: float = 15,
    proc: ReadyProcess | None = None,
    probe: bool = True,
    listener_pid: int | None = None,
) -> None:
    """Wait until ``host:port`` accepts TCP connections.

    With ``probe=True`` a connection is made and closed at once. With ``probe=False`` no
    connection is made: the port is ready when the kernel shows a listening socket on it (it
    then accepts connections into its backlog), which matters when even an empty connection
    would travel on to something else (HAProxy A's probe would reach the upstream);
    ``listener_pid`` then says whose network namespace to look in (default: ours). If ``proc``
    exits meanwhile, fail at once with its stderr.
    """
    deadline = time.monotonic() + timeout
    delay = 0.005
    last: OSError | str | None = None
    while True:
        if proc is not None and proc.poll() is not None:
            raise ProcessStartError(proc.describe_failure(f"exited before {host}:{port} opened"))
        listening = None if probe else is_listening(host, port, pid=listener_pid)
        if listening:
            return
        if listening is False:
            last = "no listening socket in /proc/net"
        else:
            try:
                with socket.create_connection((host, port), timeout=1):
                    return
            except OSError as e:
                last = e
        if time.monotonic() >= deadline:
            what = f"{host}:{port} not accepting connections after {timeout:g} s ({last})"
            raise ProcessStartError(proc.describe_failure(what) if proc else what)
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by process ``pid`` (all its threads), from /proc."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read().decode()
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------------------------
# iperf3


@dataclass
class Iperf3Server:
    """A long-lived ``iperf3 -s`` (serves one test at a time, many tests in a row).

    ``netns``: run it inside that named network namespace (``ip netns exec``).
    """

    host: str
    port: int
    taskset: str | None = None
    proc: ReadyProcess | None = None
    netns: str | None = None

    @property
    def address(self) -> Address:
        return self.host, self.port

    def start(self) -> None:
        """Start it; ready when it prints ``Server listening on`` (printed after listen()).

        No probe connection: iperf3 would take it for an aborted test and, while it recycles
        its listening socket, reset the connection of the next real client.
        """
        argv = [
            *netns_prefix(self.netns),
            *taskset_prefix(self.taskset),
            IPERF3, "-s", "-B", self.host, "-p", str(self.port), "--forceflush",
        ]  # fmt: skip
        self.proc = start_process(argv, ready_prefix="Server listening on")
        wait_for_port(
            self.host,
            self.port,
            proc=self.proc,
            probe=False,
            listener_pid=self.proc.pid if self.netns else None,
        )

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None

    def restart(self) -> None:
        """Restart after a failed test: a stuck iperf3 server would refuse the next one as busy."""
        self.stop()
        self.start()


@contextlib.contextmanager
def iperf3_server(
    port: int, host: str = "127.0.0.1", *, taskset: str | None = None, netns: str | None = None
) -> Iterator[Iperf3Server]:
    """Run ``iperf3 -s -p PORT`` for the duration of the block, ready when its port accepts."""
    server = Iperf3Server(host, port, taskset, netns=netns)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class Iperf3Result:
    """One iperf3 run: receiver and sender Gbit/s and the raw ``end`` section."""

    receiver_gbps: float
    sender_gbps: float
    retransmits: int | None
    end: dict = field(repr=False)  # type: ignore[type-arg]


def iperf3_run(
    host: str,
    port: int,
    seconds: float = 5,
    *,
    taskset: str | None = None,
    extra_args: Sequence[str] = (),
    timeout: float | None = None,
    netns: str | None = None,
) -> Iperf3Result:
    """Run ``iperf3 -c HOST -p PORT -t SECONDS -J`` (one TCP stream, 128 KiB writes by default);
    inside the named network namespace ``netns`` when given."""
    argv = [
        *netns_prefix(netns),
        *taskset_prefix(taskset),
        IPERF3,
        "-c",
        host,
        "-p",
        str(port),
        "-t",
        f"{seconds:g}",
        "-J",
        "--connect-timeout",
        "5000",
        *extra_args,
    ]
    try:
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout if timeout is not None else seconds + 30,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"iperf3 client timed out: {argv!r}") from e
    return parse_iperf3_json(done.stdout, exit_status=done.returncode, stderr=done.stderr)


def parse_iperf3_json(
    text: str, *, exit_status: int | None = None, stderr: str = ""
) -> Iperf3Result:
    """The result in the ``-J`` report of an iperf3 client: receiver side
    ``end.sum_received.bits_per_second`` (and the sender's) in Gbit/s.

    Raises RuntimeError when there is no JSON, the report holds an ``error``, has no sums, or the
    receiver got nothing; ``exit_status`` and ``stderr`` only go into those messages.
    """
    try:
        report = json.loads(text)
    except json.JSONDecodeError as e:
        raise RuntimeError(
            f"iperf3 client gave no JSON (exit {exit_status}): {stderr.strip()[-1000:]}"
        ) from e
    if not isinstance(report, dict):
        raise RuntimeError(f"iperf3 report is not a JSON object (exit {exit_status})")
    if "error" in report:
        raise RuntimeError(f"iperf3 client: {report['error']}")
    end = report.get("end", {})
    try:
        received = float(end["sum_received"]["bits_per_second"])
        sent = float(end["sum_sent"]["bits_per_second"])
    except (KeyError, TypeError, ValueError) as e:
        raise RuntimeError(f"iperf3 report has no sums (exit {exit_status})") from e
    if received <= 0:
        raise RuntimeError("iperf3 receiver got no data")
    retransmits = end.get("sum_sent", {}).get("retransmits")
    return Iperf3Result(received / 1e9, sent / 1e9, retransmits, end)


def iperf3_throughput(
    host: str, port: int, seconds: float = 5, *, taskset: str | None = None
) -> float:
    """Receiver-side Gbit/s of one iperf3 TCP stream to ``host:port`` (default 128 KiB writes)."""
    return iperf3_run(host, port, seconds, taskset=taskset).receiver_gbps


# --------------------------------------------------------------------------------------------
# figures


def spread_stats(values: Sequence[float]) -> dict[str, float | None]:
    """Median, min, max and spread (``(max - min) / median`` in %) of one system's readings.

    The spread is None when the median is 0. Raises ValueError when there is no reading.
    """
    if not values:
        raise ValueError("no readings")
    median = statistics.median(values)
    low, high = min(values), max(values)
    spread = 100 * (high - low) / median if median else None
    return {"median": median, "min": low, "max": high, "spread_pct": spread}


def same_round_ratios(
    readings: Sequence[Mapping[str, object]], system: str, baseline: str, *, key: str = "gbps"
) -> dict[int, float]:
    """``{round: system's key / baseline's key}`` over the rounds where both have a reading.

    Readings are dicts with ``round``, ``system`` and ``key`` (one per system and round); those
    without ``key``, or marked ``"valid": False``, are left out, as is a baseline of 0.
    """

    def by_round(name: str) -> dict[int, float]:
        return {
            int(r["round"]): float(r[key])  # type: ignore[call-overload, arg-type]
            for r in readings
            if r.get("system") == name and key in r and r.get("valid", True) is not False
        }

    ours, base = by_round(system), by_round(baseline)
    return {rnd: ours[rnd] / base[rnd] for rnd in sorted(ours) if base.get(rnd)}


# --------------------------------------------------------------------------------------------
# HAProxy pair doing mutual TLS 1.3


_HAPROXY_GLOBAL = """\
global
    nbthread {nbthread}
    maxconn 1000
    # TLS 1.3 only, with the suites ztunnel offers, on both the listening and the connecting side.
    ssl-default-bind-ciphersuites {suites}
    ssl-default-bind-options ssl-min-ver TLSv1.3 ssl-max-ver TLSv1.3
    ssl-default-server-ciphersuites {suites}
    ssl-default-server-options ssl-min-ver TLSv1.3 ssl-max-ver TLSv1.3

defaults
    mode tcp
    timeout connect 5s
    timeout client 10m
    timeout server 10m
"""

# A: plain TCP in, mutual TLS out. Client certificate; the server's certificate is checked against
# our root; no `sni` (so no SNI is sent), no `alpn` (plain TCP inside TLS) and no `verifyhost`
# (our workload certificates have an empty subject and only a URI SAN).
_HAPROXY_TLS_CLIENT = """
frontend plain_in
    bind {listen_host}:{listen_port}
    default_backend mtls_out

backend mtls_out
    server b {target_host}:{target_port} ssl crt {crt} ca-file {ca} verify required \
ciphersuites {suites} ssl-min-ver TLSv1.3 ssl-max-ver TLSv1.3
"""

# B: mutual TLS in (a client certificate from our root is required), plain TCP out.
_HAPROXY_TLS_SERVER = """
frontend mtls_in
    bind {listen_host}:{listen_port} ssl crt {crt} ca-file {ca} verify required \
ciphersuites {suites} ssl-min-ver TLSv1.3 ssl-max-ver TLSv1.3
    default_backend plain_out

backend plain_out
    server upstream {up_host}:{up_port}
"""


def haproxy_tls_client_config(
    listen: Address, target: Address, client_pem: Path, roots_pem: Path, *, nbthread: int = 2
) -> str:
    """Config of HAProxy A: plain TCP on ``listen``, mutual TLS 1.3 to ``target``."""
    head = _HAPROXY_GLOBAL.format(nbthread=nbthread, suites=TLS13_CIPHERSUITES)
    return head + _HAPROXY_TLS_CLIENT.format(
        listen_host=listen[0],
        listen_port=listen[1],
        target_host=target[0],
        target_port=target[1],
        crt=client_pem,
        ca=roots_pem,
        suites=TLS13_CIPHERSUITES,
    )


def haproxy_tls_server_config(
    listen: Address, upstream: Address, server_pem: Path, roots_pem: Path, *, nbthread: int = 2
) -> str:
    """Config of HAProxy B: mutual TLS 1.3 on ``listen``, plain TCP to ``upstream``."""
    head = _HAPROXY_GLOBAL.format(nbthread=nbthread, suites=TLS13_CIPHERSUITES)
    return head + _HAPROXY_TLS_SERVER.format(
        listen_host=listen[0],
        listen_port=listen[1],
        up_host=upstream[0],
        up_port=upstream[1],
        crt=server_pem,
        ca=roots_pem,
        suites=TLS13_CIPHERSUITES,
    )


@dataclass(frozen=True)
class BenchCerts:
    """PEM files for the HAProxy pair: each of client/server holds chain + key, as HAProxy wants."""

    client_pem: Path
    server_pem: Path
    roots_pem: Path
    client_id: str
    server_id: str


def write_bench_certs(
    ca_dir: str | os.PathLike[str],
    directory: str | os.PathLike[str],
    *,
    client_id: str = BENCH_CLIENT_ID,
    server_id: str = BENCH_SERVER_ID,
) -> BenchCerts:
    """Issue a client and a server certificate from the CA saved in ``ca_dir``; write them 0600."""
    from ambient.identity import CertificateAuthority

    ca = CertificateAuthority.load(ca_dir)
    client = ca.issue(client_id)
    server = ca.issue(server_id)
    work = Path(directory)
    certs = BenchCerts(
        work / "client.pem", work / "server.pem", work / "root.pem", client_id, server_id
    )
    for path, data in (
        (certs.client_pem, client.chain_pem + client.key_pem),
        (certs.server_pem, server.chain_pem + server.key_pem),
        (certs.roots_pem, client.roots_pem),
    ):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    return certs


@contextlib.contextmanager
def haproxy_process(
    config: str,
    listen: Address,
    *,
    workdir: str | os.PathLike[str],
    name: str = "haproxy",
    taskset: str | None = None,
    timeout: float = 15,
    probe: bool = True,
) -> Iterator[ReadyProcess]:
    """Run one foreground HAProxy (``-db``) with ``config``; ready when ``listen`` accepts.

    ``probe`` as in :func:`wait_for_port`.
    """
    cfg = Path(workdir) / f"{name}.cfg"
    cfg.write_text(config)
    argv = [*taskset_prefix(taskset), HAPROXY, "-db", "-f", str(cfg)]
    proc = start_process(argv, ready_prefix=None)
    try:
        wait_for_port(*listen, proc=proc, timeout=timeout, probe=probe)
        yield proc
    finally:
        stop_process(proc)


@dataclass
class HaproxyMtlsPair:
    """The running pair: ``entry`` is plain TCP into A, ``tls`` is B's mutual-TLS port."""

    entry: Address
    tls: Address
    upstream: Address
    certs: BenchCerts
    a: ReadyProcess
    b: ReadyProcess

    @property
    def pids(self) -> list[int]:
        return [self.a.pid, self.b.pid]


def haproxy_version() -> str:
    """First line of ``haproxy -v``, or an explanation."""
    try:
        out = subprocess.run(
            [HAPROXY, "-v"], check=False, capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unavailable ({e})"
    return out.splitlines()[0].strip() if out else "unknown"


@contextlib.contextmanager
def haproxy_mtls_servers(
    ca_dir: str | os.PathLike[str],
    upstream: Address,
    *,
    host: str = "127.0.0.1",
    nbthread: int = 2,
    taskset: str | None = None,
    client_id: str = BENCH_CLIENT_ID,
    server_id: str = BENCH_SERVER_ID,
    timeout: float = 15,
) -> Iterator[HaproxyMtlsPair]:
    """Run client → HAProxy A (plain) → mutual TLS 1.3 → HAProxy B → ``upstream``; yield it.

    Certificates come from the CA saved in ``ca_dir`` (``CertificateAuthority.save``). Configs
    and PEM files live in a temporary directory that is removed afterwards. B starts first;
    each is ready when its port accepts connections. B is probed with a connection (it fails
    its TLS handshake and never reaches the upstream); A is not, since an empty connection
    through A would reach the upstream (iperf3 takes it for an aborted test and resets the next
    client): A's listening socket is looked up in /proc/net instead.
    """
    with tempfile.TemporaryDirectory(prefix="bench-haproxy-") as tmp:
        certs = write_bench_certs(ca_dir, tmp, client_id=client_id, server_id=server_id)
        b_addr = (host, free_port(host))
        a_addr = (host, free_port(host))
        b_cfg = haproxy_tls_server_config(
            b_addr, upstream, certs.server_pem, certs.roots_pem, nbthread=nbthread
        )
        a_cfg = haproxy_tls_client_config(
            a_addr, b_addr, certs.client_pem, certs.roots_pem, nbthread=nbthread
        )
        with (
            haproxy_process(
                b_cfg, b_addr, workdir=tmp, name="b", taskset=taskset, timeout=timeout
            ) as b,
            haproxy_process(
                a_cfg, a_addr, workdir=tmp, name="a", taskset=taskset, timeout=timeout, probe=False
            ) as a,
        ):
            yield HaproxyMtlsPair(
                entry=a_addr, tls=b_addr, upstream=upstream, certs=certs, a=a, b=b
            )


@contextlib.contextmanager
def haproxy_mtls_pair(
    ca_dir: str | os.PathLike[str],
    upstream: Address,
    *,
    host: str = "127.0.0.1",
    nbthread: int = 2,
    taskset: str | None = None,
) -> Iterator[Address]:
    """Like :func:`haproxy_mtls_servers` but yield only the plain-TCP entry ``(host, port)``."""
    with haproxy_mtls_servers(
        ca_dir, upstream, host=host, nbthread=nbthread, taskset=taskset
    ) as pair:
        yield pair.entry


# --------------------------------------------------------------------------------------------
# HBONE process pairs


@dataclass
class ProxyPair:
    """A running server/client pair of HBONE processes; ``entry`` is where plain TCP goes in."""

    entry: Address
    server_address: Address
    server: ReadyProcess
    client: ReadyProcess

    @property
    def pids(self) -> list[int]:
        return [self.server.pid, self.client.pid]


@contextlib.contextmanager
def proxy_pair(
    server_argv: Sequence[str],
    client_argv: Sequence[str],
    *,
    taskset: str | None = None,
    timeout: float = 30,
    env: Mapping[str, str] | None = None,
) -> Iterator[ProxyPair]:
    """Start an HBONE server, then its client; each must print ``ready host:port`` on stdout.

    The client's ready address is the entry point (plain TCP in, HBONE out). Both are stopped on
    exit, the client first.
    """
    prefix = taskset_prefix(taskset)
    server = start_process([*prefix, *server_argv], timeout=timeout, env=env)
    client: ReadyProcess | None = None
    try:
        server_address = parse_host_port(server.ready_line[len("ready ") :])
        client = start_process([*prefix, *client_argv], timeout=timeout, env=env)
        entry = parse_host_port(client.ready_line[len("ready ") :])
        yield ProxyPair(entry=entry, server_address=server_address, server=server, client=client)
    finally:
        if client is not None:
            stop_process(client)
        stop_process(server)


def hbone_argvs(
    module: str,
    server_verb: str,
    client_verb: str,
    *,
    python: str,
    ca_dir: str | os.PathLike[str],
    upstream: Address,
    host: str = "127.0.0.1",
    server_id: str = BENCH_SERVER_ID,
    client_id: str = BENCH_CLIENT_ID,
) -> tuple[list[str], list[str]]:
    """The (server, client) argv of an HBONE pair in front of ``upstream``, on fresh ports.

    ``module="ambient", server_verb="hbone serve"`` gives the Rust-core pair;
    ``module="ambient.peers.h2_hbone", server_verb="server"`` the pure-Python peer.
    """
    port_s = free_port(host)
    port_c = free_port(host)
    up = f"{upstream[0]}:{upstream[1]}"
    server = [
        python, "-P", "-m", module, *server_verb.split(),
        "--listen", f"{host}:{port_s}",
        "--ca-dir", str(ca_dir),
        "--identity", server_id,
        "--upstream", up,
    ]  # fmt: skip
    client = [
        python, "-P", "-m", module, *client_verb.split(),
        "--listen", f"{host}:{port_c}",
        "--server", f"{host}:{port_s}",
        "--authority", up,
        "--ca-dir", str(ca_dir),
        "--identity", client_id,
        "--expect", server_id,
    ]  # fmt: skip
    return server, client


def iperf3_version() -> str:
    """First line of ``iperf3 --version``, or an explanation."""
    try:
        out = subprocess.run(
            [IPERF3, "--version"], check=False, capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unavailable ({e})"
    return out.splitlines()[0].strip() if out else "unknown"


# --- what a committed report may say about paths ----------------------------------------------

REPO = Path(__file__).resolve().parents[1]


def portable_path(path: str | os.PathLike[str]) -> str:
    """``path`` as a report committed to the repository may record it: relative to the
    repository when inside it, else only its last part (``python3.11``), so that no report names
    someone's home directory or checkout."""
    p = Path(path)
    if not p.is_absolute():
        return str(p)
    for candidate in (p, p.resolve()):
        with contextlib.suppress(ValueError):
            return str(candidate.relative_to(REPO))
    return p.name


def command_line(argv: Sequence[str] | None = None) -> list[str]:
    """The command that ran (the interpreter, then ``argv``, default ``sys.argv``) with every
    absolute path in it made portable, including the value of an ``--option=/path``."""
    out = [portable_path(sys.executable)]
    for arg in sys.argv if argv is None else argv:
        option, sep, value = arg.partition("=")
        if sep and option.startswith("-") and os.path.isabs(value):
            out.append(f"{option}={portable_path(value)}")
        else:
            out.append(portable_path(arg) if os.path.isabs(arg) else arg)
    return out
