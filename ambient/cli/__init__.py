"""The ``ambient`` command.

ambient demo                     the main job on its embedded default
ambient ca init --dir DIR        create a root CA for standalone use
ambient config check FILE...     validate mesh files and summarise them
ambient explain --config F SRC DST:PORT   the path and policy verdicts of a connection
ambient hbone serve|forward|probe   HBONE endpoints and checks from the command line
ambient ztunnel --config F --node N --ca-dir D   the node proxy for one node
ambient waypoint --config F --gateway NS/NAME --ca-dir D   the L7 proxy of one waypoint
ambient testbed up|down            nodes and pods as network namespaces, in-pod ztunnels (root)
ambient top --metrics ADDR [--admin ADDR]   a live view of a running ztunnel
ambient control-plane --ca-dir D [--config F]   Istio's CA API and xDS from a local CA and files
ambient version                  versions and build profile
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

# Each command's module, imported only when that command runs (or for the full help): a
# running ztunnel imports what it needs and none of the testbed's, the demo's or explain's.
COMMANDS = (
    "demo", "ca", "config", "explain", "hbone", "ztunnel", "waypoint", "testbed", "top",
    "control-plane",
)  # fmt: skip


class _Formatter(argparse.HelpFormatter):
    """argparse's help formatter, told the terminal's width: left to itself it imports shutil
    to find it (and shutil imports bz2 and lzma), 0.6 MiB a running proxy would keep."""

    def __init__(self, prog: str, **kwargs: Any) -> None:
        if kwargs.get("width") is None:
            try:
                columns = os.get_terminal_size(sys.stderr.fileno()).columns
            except (OSError, ValueError):
                columns = int(os.environ.get("COLUMNS", "80") or 80)
            kwargs["width"] = max(columns - 2, 20)  # as argparse sizes it
        super().__init__(prog, **kwargs)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose help (and its subcommands') uses :class:`_Formatter`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or of ``only`` (the command being run)."""
    parser = _Parser(
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
    for name in COMMANDS:
        if only is None or name == only:
            importlib.import_module(f"{__name__}.{name.replace('-', '_')}").register(commands)
    version = commands.add_parser("version", help="print versions and the core's build profile")
    version.set_defaults(run=_version)
    return parser


def _version(_args: argparse.Namespace) -> int:
    from .. import __version__, _core

    print(f"ambient {__version__} (core {_core.__version__}, {_core.build_profile()} build)")
    return 0


def _without_openssl() -> None:
    """Import asyncio with Python's ``ssl`` module hidden from it, so that it does without
    (it treats ssl as optional) instead of mapping OpenSSL into the process: 5 MiB resident, a
    third of what Istio's ztunnel holds in all. A ztunnel's TLS is the core's (rustls); its
    asyncio serves plain HTTP endpoints. ``ssl`` itself stays importable for anything that asks
    for it later. Done only for a fresh ``ambient ztunnel`` or ``ambient waypoint`` process."""
    if "ssl" in sys.modules or "asyncio" in sys.modules:
        return
    sys.modules["ssl"] = None  # type: ignore[assignment]  # import ssl -> ImportError
    try:
        import asyncio  # noqa: F401
    finally:
        del sys.modules["ssl"]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    only = next((a for a in argv if a in COMMANDS or a == "version"), None)
    if only in ("ztunnel", "waypoint"):
        _without_openssl()
    args = build_parser(only).parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from .. import _core

    _core.sync_level()  # the core drops records below this level where they happen
    return int(args.run(args))
