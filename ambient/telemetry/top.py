"""``ambient top``: a live view of a running ztunnel or waypoint from its metrics and admin
endpoints — connections, byte rates and errors per peer workload, and a waypoint's requests per
Service and response code (rate, flags), refreshed in place."""

from __future__ import annotations

import sys
import time
import urllib.request
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import orjson
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

COUNTERS = {
    "istio_tcp_connections_opened_total": "opened",
    "istio_tcp_connections_closed_total": "closed",
    "istio_tcp_connections_failed_total": "failed",
    "istio_tcp_received_bytes_total": "to_server",
    "istio_tcp_sent_bytes_total": "to_client",
}


@dataclass
class Row:
    opened: float = 0
    closed: float = 0
    failed: float = 0
    to_server: float = 0
    to_client: float = 0
    denied: float = 0


@dataclass
class Sample:
    at: float
    rows: dict[tuple[str, str, str], Row] = field(default_factory=dict)  # (direction, peer, mtls)
    node: str = "?"
    pods: list[str] = field(default_factory=list)
    # A waypoint's requests: (destination service, response code, response flags) -> total.
    requests: dict[tuple[str, str, str], float] = field(default_factory=dict)
    waypoint: str | None = None


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as response:
        body: bytes = response.read()
        return body


def sample(metrics: str, admin: str | None, now: Callable[[], float] = time.monotonic) -> Sample:
    """Read both endpoints once; ConnectionError names the one that failed."""
    try:
        text = _get(f"http://{metrics}/metrics").decode()
    except OSError as e:
        raise ConnectionError(f"metrics endpoint {metrics}: {e}") from None
    out = Sample(now())
    rows: dict[tuple[str, str, str], Row] = defaultdict(Row)
    requests: dict[tuple[str, str, str], float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "istio_requests_total" and s.labels.get("reporter") == "waypoint":
                labels = s.labels
                service = (
                    f"{labels.get('destination_service_namespace', '?')}/"
                    f"{labels.get('destination_service_name', '?')}"
                )
                key3 = (
                    service,
                    labels.get("response_code", "?"),
                    labels.get("response_flags", "-"),
                )
                requests[key3] += s.value
                continue
            kind = COUNTERS.get(s.name)
            if kind is None:
                continue
            labels = s.labels
            inbound = labels.get("reporter") == "destination"
            side = "source" if inbound else "destination"
            peer = (
                f"{labels.get(f'{side}_workload_namespace', '?')}/"
                f"{labels.get(f'{side}_workload', '?')}"
            )
            key = ("in" if inbound else "out", peer, labels.get("connection_security_policy", "?"))
            row = rows[key]
            setattr(row, kind, getattr(row, kind) + s.value)
            if kind == "closed" and labels.get("response_flags") == "DENY":
                row.denied += s.value
    out.rows = dict(rows)
    out.requests = dict(requests)
    if admin:
        try:
            dump = orjson.loads(_get(f"http://{admin}/config_dump"))
            out.node = dump.get("node", "?")
            out.waypoint = dump.get("waypoint")
            out.pods = list(dump.get("servedPods", []))
        except OSError as e:
            raise ConnectionError(f"admin endpoint {admin}: {e}") from None
    return out


def _rate(now: float, then: float, seconds: float) -> str:
    per_second = max(0.0, now - then) / seconds if seconds > 0 else 0.0
    for unit in ("B/s", "KB/s", "MB/s", "GB/s"):
        if per_second < 1024:
            return f"{per_second:.0f} {unit}" if unit == "B/s" else f"{per_second:.1f} {unit}"
        per_second /= 1024
    return f"{per_second:.1f} TB/s"


def _requests(current: Sample, previous: Sample | None, seconds: float) -> Table:
    table = Table(title="requests through the waypoint", title_justify="left")
    for column in ("service", "code", "flags", "total", "rate"):
        table.add_column(column, justify="right" if column in ("total", "rate") else "left")
    for key in sorted(current.requests):
        total = current.requests[key]
        before = previous.requests.get(key, 0.0) if previous else total
        rate = max(0.0, total - before) / seconds if seconds > 0 else 0.0
        table.add_row(key[0], key[1], key[2], f"{total:.0f}", f"{rate:.1f}/s")
    return table


def render(current: Sample, previous: Sample | None) -> Group:
    seconds = current.at - previous.at if previous else 0.0
    who = f"waypoint {current.waypoint}" if current.waypoint else f"ztunnel {current.node}"
    table = Table(title=f"{who} — {len(current.pods)} pods served", title_justify="left")
    for column in (
        "dir",
        "peer workload",
        "security",
        "open",
        "total",
        "denied",
        "failed",
        "in (to server)",
        "out (to client)",
    ):
        table.add_column(
            column, justify="left" if column in ("dir", "peer workload", "security") else "right"
        )
    for key in sorted(current.rows):
        row = current.rows[key]
        before = previous.rows.get(key, Row()) if previous else row
        table.add_row(
            key[0],
            key[1],
            "mTLS" if key[2] == "mutual_tls" else "plaintext",
            f"{row.opened - row.closed:.0f}",
            f"{row.opened:.0f}",
            f"{row.denied:.0f}",
            f"{row.failed:.0f}",
            _rate(row.to_server, before.to_server, seconds),
            _rate(row.to_client, before.to_client, seconds),
        )
    note = Text(
        "rates need two samples" if previous is None else f"every {seconds:.1f} s", style="dim"
    )
    if current.waypoint is not None or current.requests:
        return Group(table, _requests(current, previous, seconds), note)
    return Group(table, note)


def run(
    metrics: str,
    admin: str | None,
    *,
    interval: float = 1.0,
    once: bool = False,
    console: Console | None = None,
) -> int:
    # Piped output (a file, a test) gets a wide table rather than 80 truncated columns.
    console = console or Console(width=None if sys.stdout.isatty() else 160)
    try:
        first = sample(metrics, admin)
        if once:
            time.sleep(interval)
            console.print(render(sample(metrics, admin), first))
            return 0
    except ConnectionError as e:
        console.print(f"ambient top: {e}")
        return 1
    previous = first
    with Live(render(first, None), console=console, refresh_per_second=4) as live:
        try:
            while True:
                time.sleep(interval)
                try:
                    current = sample(metrics, admin)
                except ConnectionError as e:
                    live.update(Text(f"ambient top: {e} (retrying)", style="red"))
                    continue
                live.update(render(current, previous))
                previous = current
        except KeyboardInterrupt:
            return 0
