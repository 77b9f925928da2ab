"""``ambient demo``: run the embedded demo (see ambient/demo.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def register(commands: Any) -> None:
    demo = commands.add_parser(
        "demo", help="run the data plane on its embedded default and show every flow"
    )
    demo.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="run on this mesh file instead of the embedded one",
    )
    demo.add_argument(
        "--keep",
        action="store_true",
        help="leave the mesh running (until Ctrl-C) to send your own traffic",
    )
    demo.add_argument(
        "--show-config", action="store_true", help="print the embedded mesh file and exit"
    )
    demo.add_argument(
        "--netns",
        action="store_true",
        help="run on network namespaces with in-pod capture, transparent (root): the "
        "`ambient testbed` of the embedded testbed-mesh.yaml",
    )
    demo.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from .. import demo, demo_netns, examples

    if args.show_config:
        sys.stdout.write(examples.read("testbed-mesh.yaml" if args.netns else "demo-mesh.yaml"))
        return 0
    if args.netns:
        return demo_netns.run(args.config, keep=args.keep, out=_print_now)
    return demo.run(args.config, keep=args.keep, out=_print_now)


def _print_now(line: str) -> None:
    # Each line as it comes, also into a pipe: with --keep the demo then waits, and whoever reads
    # it (a script, `| tee`) needs the addresses before Ctrl-C, not at exit.
    print(line, flush=True)
