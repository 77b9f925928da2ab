"""``ambient hbone``: HBONE endpoints from the command line, on the compiled core.

- ``serve``: an HBONE server (mutual TLS, CONNECT) that connects each allowed stream upstream.
- ``forward``: a local TCP port whose every connection is carried through HBONE to a server.
- ``probe``: open HBONE streams to a server and report how many succeeded, and how fast.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import orjson

from ..hbone import Allow, DataPlane, HboneTarget, StreamRequest
from .common import (
    add_identity_arguments,
    add_limit_arguments,
    issue_certificate,
    limit_options,
    raise_fd_limit,
    socket_address,
    spiffe_id,
    wait_for_termination,
)


def register(commands: Any) -> None:
    hbone = commands.add_parser("hbone", help="HBONE server, forwarder and probe")
    sub = hbone.add_subparsers(dest="hbone_command", required=True, metavar="SUBCOMMAND")

    serve = sub.add_parser("serve", help="serve HBONE and connect allowed streams upstream")
    serve.add_argument("--listen", required=True, type=socket_address, help="ip:port to serve on")
    serve.add_argument(
        "--upstream",
        type=socket_address,
        help="connect every stream here (default: the CONNECT authority itself)",
    )
    add_identity_arguments(serve)
    _add_runtime_arguments(serve)
    serve.set_defaults(run=run_serve)

    forward = sub.add_parser("forward", help="carry a local TCP port through HBONE")
    forward.add_argument("--listen", required=True, type=socket_address)
    _add_target_arguments(forward)
    add_identity_arguments(forward)
    _add_runtime_arguments(forward)
    forward.set_defaults(run=run_forward)

    probe = sub.add_parser("probe", help="open HBONE streams to a server; print a JSON report")
    _add_target_arguments(probe)
    add_identity_arguments(probe)
    probe.add_argument("--count", type=int, default=1, help="streams to open (default 1)")
    probe.add_argument("--concurrency", type=int, default=1)
    probe.add_argument("--payload", type=int, default=0, help="bytes each stream sends")
    probe.add_argument(
        "--fresh", action="store_true", help="a new mutual-TLS connection per stream (no pooling)"
    )
    _add_runtime_arguments(probe)
    probe.set_defaults(run=run_probe)


def _add_target_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", required=True, type=socket_address, help="HBONE peer ip:port")
    parser.add_argument("--authority", required=True, help="CONNECT authority (final ip:port)")
    parser.add_argument(
        "--expect",
        required=True,
        action="append",
        type=spiffe_id,
        help="SPIFFE ID the server must hold (repeatable: any of them)",
    )


def _add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, default=None, help="core worker threads")
    add_limit_arguments(parser)
    parser.add_argument(
        "--drain-deadline",
        type=float,
        default=5.0,
        help="seconds live connections get to finish on SIGTERM (default 5)",
    )


def _target(args: argparse.Namespace) -> HboneTarget:
    return HboneTarget(args.server, args.authority, args.expect, args.identity)


def _serve_until_signal(dp: DataPlane, address: str, deadline: float) -> int:
    print(f"ready {address}", flush=True)
    signame = wait_for_termination()
    print(f"{signame}: draining for up to {deadline} s", file=sys.stderr, flush=True)
    dp.close(deadline)
    return 0


def _to_authority(request: StreamRequest) -> Allow:
    return Allow(request.authority)


def run_serve(args: argparse.Namespace) -> int:
    cert = issue_certificate(args)
    raise_fd_limit()
    with DataPlane(args.workers, **limit_options(args)) as dp:
        dp.load_identity(cert)
        decide = Allow(args.upstream) if args.upstream else _to_authority
        listener = dp.serve(args.listen, cert.identity, decide)
        return _serve_until_signal(dp, listener.local_address, args.drain_deadline)


def run_forward(args: argparse.Namespace) -> int:
    cert = issue_certificate(args)
    raise_fd_limit()
    with DataPlane(args.workers, **limit_options(args)) as dp:
        dp.load_identity(cert)
        listener = dp.forward(args.listen, _target(args))
        return _serve_until_signal(dp, listener.local_address, args.drain_deadline)


def run_probe(args: argparse.Namespace) -> int:
    cert = issue_certificate(args)
    with DataPlane(args.workers) as dp:
        dp.load_identity(cert)
        report = dp.probe(
            _target(args),
            args.count,
            concurrency=args.concurrency,
            payload=args.payload,
            fresh_connections=args.fresh,
        )
    report["streams_per_second"] = report["ok"] / report["seconds"] if report["seconds"] else 0.0
    sys.stdout.buffer.write(orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")
    return 0 if report["failed"] == 0 else 1
