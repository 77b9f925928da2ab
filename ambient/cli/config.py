"""``ambient config check FILE…``: validate mesh files and summarise what they describe."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..config import ConfigError, load_mesh
from ..mesh import Mesh


def register(commands: Any) -> None:
    config = commands.add_parser("config", help="mesh configuration")
    sub = config.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    check = sub.add_parser(
        "check", help="validate mesh files; print a summary (exit 0) or every error (exit 1)"
    )
    check.add_argument("files", nargs="+", type=Path, metavar="FILE")
    check.add_argument(
        "--all",
        action="store_true",
        help=f"list every workload, service and policy (default: the first {LISTED} of each)",
    )
    check.set_defaults(run=run_check)


# How many of each kind the summary lists by default: a large mesh is summarised, not dumped.
LISTED = 20


def _first(lines: list[str], limit: int | None, what: str) -> list[str]:
    if limit is None or len(lines) <= limit:
        return lines
    return [*lines[:limit], f"  ... and {len(lines) - limit} more {what} (--all lists them)"]


def summary(mesh: Mesh, limit: int | None = LISTED) -> list[str]:
    """What ``mesh`` holds; at most ``limit`` of each kind listed (None: all)."""
    in_mesh = [w for w in mesh.workloads if w.in_mesh]
    outside = [w for w in mesh.workloads if not w.in_mesh]
    names = list(mesh.namespaces)
    shown = names if limit is None or len(names) <= limit else [*names[:limit], "..."]
    lines = [
        f"namespaces: {len(names)} ({', '.join(shown) or '-'})",
        f"workloads: {len(mesh.workloads)} — {len(in_mesh)} in the mesh (HBONE), "
        f"{len(outside)} outside (TCP)",
    ]
    for title, group in (("in the mesh", in_mesh), ("outside", outside)):
        listed = []
        for w in group:
            ips = ", ".join(map(str, w.ips))
            node = f", node {w.node}" if w.node else ""
            listed.append(f"  {title}: {w.key} ({ips}{node}) as {w.identity}")
        lines += _first(listed, limit, f"workloads {title}")
    lines.append(f"services: {len(mesh.services)}")
    listed = []
    for s in mesh.services:
        vips = ", ".join(str(ip) for _, ip in s.vips) or "no VIP"
        ports = ", ".join(f"{p}->{t or 'named'}" for p, t in s.ports.items())
        listed.append(f"  {s.hostname} ({vips}; ports {ports}) with {len(s.endpoints)} endpoint(s)")
    lines += _first(listed, limit, "services")
    lines.append(f"policies: {len(mesh.policies)}")
    listed = [f"  {p.key}: {p.action.value}, scope {p.scope.value}" for p in mesh.policies]
    lines += _first(listed, limit, "policies")
    if mesh.http_routes:
        lines.append(f"HTTP routes: {len(mesh.http_routes)}")
        listed = [
            f"  {r.namespace}/{r.name} -> "
            + (", ".join(f"Service {p.namespace}/{p.name}" for p in r.parents) or "no Service")
            + f": {len(r.rules)} rule(s)"
            for r in mesh.http_routes
        ]
        lines += _first(listed, limit, "HTTP routes")
    lines.extend(f"warning: {w}" for w in mesh.warnings)
    return lines


def run_check(args: argparse.Namespace) -> int:
    try:
        mesh = load_mesh(args.files)
    except ConfigError as e:
        for issue in e.issues:
            print(f"error: {issue}", file=sys.stderr)
        print(f"{len(e.issues)} error(s); configuration refused", file=sys.stderr)
        return 1
    print(f"{', '.join(map(str, args.files))}: valid")
    for line in summary(mesh, None if args.all else LISTED):
        print(f"  {line}")
    return 0
