"""``ambient demo``: run the embedded demo (see ambient/demo.py)."""

from __future__ import annotations

import argparse
from typing import Any


def register(commands: Any) -> None:
    demo = commands.add_parser(
        "demo", help="run the data plane on its embedded default and show every flow"
    )
    demo.set_defaults(run=run)


def run(_args: argparse.Namespace) -> int:
    from .. import demo

    return demo.run()
