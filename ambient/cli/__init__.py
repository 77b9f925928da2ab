"""The ``ambient`` command.

ambient demo                     the main job on its embedded default
ambient ca init --dir DIR        create a root CA for standalone use
ambient config check FILE...     validate mesh files and summarise them
ambient explain --config F SRC DST:PORT   the path and policy verdicts of a connection
ambient hbone serve|forward|probe   HBONE endpoints and checks from the command line
ambient ztunnel --config F --node N --ca-dir D   the node proxy for one node
ambient testbed up|down            nodes and pods as network namespaces, in-pod ztunnels (root)
ambient top --metrics ADDR [--admin ADDR]   a live view of a running ztunnel
ambient version                  versions and build profile
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from . import ca, config, demo, explain, hbone, testbed, top, ztunnel


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ambient",
        description="An ambient service-mesh data plane (ztunnel, waypoint) with a compiled core.",
    )
    parser.add_argument(
        "--log-level",
        default="warning",
        choices=["debug", "info", "warning", "error"],
        help="log level for ambient and its core (default: warning)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo.register(commands)
    ca.register(commands)
    config.register(commands)
    explain.register(commands)
    hbone.register(commands)
    ztunnel.register(commands)
    testbed.register(commands)
    top.register(commands)
    version = commands.add_parser("version", help="print versions and the core's build profile")
    version.set_defaults(run=_version)
    return parser


def _version(_args: argparse.Namespace) -> int:
    from .. import __version__, _core

    print(f"ambient {__version__} (core {_core.__version__}, {_core.build_profile()} build)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from .. import _core

    _core.sync_level()  # the core drops records below this level where they happen
    return int(args.run(args))
