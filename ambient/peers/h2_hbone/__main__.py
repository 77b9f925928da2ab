"""Run the pure-Python HBONE peer as a process:
``python -m ambient.peers.h2_hbone server|client``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from ambient.identity import CertificateAuthority

from .client import (
    HboneClient,
    forward,
)
from .common import (
    HboneError,
    _parse_hostport,
    format_hostport,
)
from .server import (
    HboneServer,
)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ambient.peers.h2_hbone",
        description="Pure-Python HBONE (HTTP/2 CONNECT over mutual TLS 1.3) server or client.",
    )
    parser.add_argument("--log-level", default="WARNING", help="logging level (default WARNING)")
    sub = parser.add_subparsers(dest="mode", required=True)

    server = sub.add_parser("server", help="terminate HBONE and relay each stream to TCP")
    server.add_argument("--listen", type=_parse_hostport, default=("127.0.0.1", 15008))
    server.add_argument(
        "--upstream",
        type=_parse_hostport,
        default=None,
        help="connect every stream here (default: the CONNECT authority)",
    )
    server.add_argument(
        "--ca-dir", required=True, help="directory written by CertificateAuthority.save"
    )
    server.add_argument("--identity", required=True, help="this server's SPIFFE ID")

    client = sub.add_parser(
        "client", help="accept TCP locally and tunnel each connection over HBONE"
    )
    client.add_argument("--listen", type=_parse_hostport, default=("127.0.0.1", 9000))
    client.add_argument(
        "--server", type=_parse_hostport, required=True, help="HBONE server host:port"
    )
    client.add_argument("--authority", required=True, help="CONNECT :authority (ip:port)")
    client.add_argument(
        "--ca-dir", required=True, help="directory written by CertificateAuthority.save"
    )
    client.add_argument("--identity", required=True, help="this client's SPIFFE ID")
    client.add_argument(
        "--expect",
        action="append",
        required=True,
        help="an acceptable server SPIFFE ID (repeatable)",
    )
    return parser


async def _run(args: argparse.Namespace) -> None:
    cert = CertificateAuthority.load(args.ca_dir).issue(args.identity)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    if args.mode == "server":
        server = HboneServer(cert, upstream=args.upstream)
        host, port = await server.start(*args.listen)
        print(f"ready {format_hostport(host, port)}", flush=True)
        try:
            await stop.wait()
        finally:
            await server.close()
    else:
        client = HboneClient(cert, args.server, args.expect)
        await client.connect()
        listener = await forward(args.listen, client, args.authority)
        sockname = listener.sockets[0].getsockname()
        print(f"ready {format_hostport(str(sockname[0]), int(sockname[1]))}", flush=True)
        try:
            await stop.wait()
        finally:
            listener.close()
            await client.close()
            await listener.wait_closed()


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    args = _build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        asyncio.run(_run(args))
    except HboneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
