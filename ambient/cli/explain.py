"""``ambient explain``: the path a connection would take and each policy's verdict, without
sending traffic. Exit 0 when it would be allowed, 1 when denied, 2 on bad input."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import orjson

from ..config import ConfigError, load_mesh
from ..explain import ExplainError, HttpRequest, explain, render


def register(commands: Any) -> None:
    e = commands.add_parser(
        "explain",
        help="show the path and policy verdicts of a connection, without sending it",
        description="SOURCE is a pod (namespace/name) or an IP; DEST is IP:PORT or a Service "
        "hostname:PORT. Through a waypoint, the route an HTTP request (--method, --path, "
        "--header, --jwt, --request-principal) takes there and the verdicts of the waypoint's "
        "AuthorizationPolicies are shown too. Exit status: 0 allowed, 1 denied, 2 bad input.",
    )
    e.add_argument("--config", required=True, action="append", type=Path, metavar="FILE")
    e.add_argument("source", metavar="SOURCE")
    e.add_argument("destination", metavar="DEST:PORT")
    e.add_argument("--json", action="store_true", help="print JSON (allowed, hops, policies...)")
    e.add_argument(
        "--method", default="GET", help="through a waypoint: the HTTP request's method (GET)"
    )
    e.add_argument(
        "--path", default="/", help="through a waypoint: the request's path and query (/)"
    )
    e.add_argument(
        "--header",
        action="append",
        default=[],
        type=_header,
        metavar="NAME:VALUE",
        help="through a waypoint: a request header (repeatable)",
    )
    e.add_argument(
        "--request-principal",
        default=None,
        metavar="ISS/SUB",
        help="through a waypoint: the request carries a valid JWT of this principal (as "
        "RequestAuthentication gives it); without it, none",
    )
    e.add_argument(
        "--jwt",
        default=None,
        metavar="TOKEN",
        help="through a waypoint: the request carries this JWT (Authorization: Bearer), checked "
        "as the waypoint checks it (inline key sets; remote ones are not fetched by explain)",
    )
    e.set_defaults(run=run)


def _header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME:VALUE, got {text!r}")
    return name.strip().lower(), value.strip()


def run(args: argparse.Namespace) -> int:
    try:
        mesh = load_mesh(args.config)
        request = HttpRequest(
            args.method.upper(), args.path, tuple(args.header), args.request_principal, args.jwt
        )
        result = explain(mesh, args.source, args.destination, request)
    except ConfigError as err:
        for issue in err.issues:
            print(f"error: {issue}", file=sys.stderr)
        return 2
    except ExplainError as err:
        print(f"ambient explain: {err}", file=sys.stderr)
        return 2
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(result.as_json(), option=orjson.OPT_INDENT_2) + b"\n")
    else:
        print("\n".join(render(result)))
    return 0 if result.allowed else 1
