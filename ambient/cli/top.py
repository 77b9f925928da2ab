"""``ambient top``: a live view of a running ztunnel or waypoint (its metrics and admin
endpoints)."""

from __future__ import annotations

import argparse
from typing import Any

from .common import socket_address


def register(commands: Any) -> None:
    top = commands.add_parser(
        "top",
        help="live view of a ztunnel or waypoint: connections, byte rates, errors per peer "
        "workload; a waypoint's request rates and codes",
    )
    top.add_argument(
        "--metrics",
        required=True,
        type=socket_address,
        help="the ztunnel's or waypoint's metrics address (see its `ready` line)",
    )
    top.add_argument("--admin", type=socket_address, help="its admin address (node, pods)")
    top.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    top.add_argument(
        "--once", action="store_true", help="print one view (two samples --interval apart) and exit"
    )
    top.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..telemetry import top

    return top.run(args.metrics, args.admin, interval=args.interval, once=args.once)
