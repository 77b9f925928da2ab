"""``ambient control-plane``: Istio's control-plane APIs served from local files, for a small mesh
with no Kubernetes and no istiod, on one port as istiod serves them: the CA API
(``IstioCertificateService``), which ambient's ztunnel and waypoint (``--ca-address``) and
Istio's own ztunnel (``CA_ADDRESS``) take their workload certificates from, and, with
``--config``, the mesh files as delta xDS (``XDS_ADDRESS``; ``ambient ztunnel --xds-address``),
each change pushed as a delta."""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path
from typing import Any

from ..identity.ca import WORKLOAD_CERT_TTL
from .common import load_ca, wait_for_termination

# istiod's port for xDS and the CA API over TLS.
DEFAULT_LISTEN = "127.0.0.1:15012"


def register(commands: Any) -> None:
    cp = commands.add_parser(
        "control-plane",
        help="serve Istio's CA API from a local CA and, with --config, the mesh over xDS",
    )
    cp.add_argument("--ca-dir", required=True, type=Path, help="CA made by `ambient ca init`")
    cp.add_argument(
        "--config",
        action="append",
        type=Path,
        metavar="FILE",
        help="mesh file served over xDS (repeatable); watched, a change is pushed as a delta",
    )
    cp.add_argument(
        "--watch-interval",
        type=float,
        default=1.0,
        help="seconds between checks of the mesh files for changes (default 1)",
    )
    cp.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        metavar="HOST:PORT",
        help=f"where to serve gRPC over TLS (default {DEFAULT_LISTEN}, istiod's port; 0 picks one)",
    )
    cp.add_argument(
        "--tokens",
        type=Path,
        metavar="FILE",
        help="accept only callers presenting one of these bearer tokens (one per line, "
        "optionally followed by a space and who it is); default: any caller that reaches it",
    )
    cp.add_argument(
        "--max-certificate-ttl",
        type=float,
        default=WORKLOAD_CERT_TTL.total_seconds(),
        metavar="SECONDS",
        help="the longest certificate it signs (Istio's default: 24 h)",
    )
    cp.add_argument(
        "--hostname",
        action="append",
        default=None,
        help="a DNS name of its serving certificate (repeatable; default istiod.istio-system.svc "
        "and localhost, plus the --listen host)",
    )
    cp.set_defaults(run=run)


def read_tokens(path: Path) -> dict[str, str]:
    tokens = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        token, _, who = line.strip().partition(" ")
        if token:
            tokens[token] = who.strip() or f"{path.name} line {number}"
    return tokens


def run(args: argparse.Namespace) -> int:
    from ..config import MeshCache
    from ..identity.istio_ca import ISTIOD_HOSTNAME, IstioCaServer
    from ..xds.server import XdsServer
    from ..ztunnel.reload import ConfigWatcher
    from . import proxy

    ca = load_ca(args.ca_dir)
    xds = watcher = None
    if args.config:
        cache = MeshCache()
        mesh = proxy.load(args.config, ca.trust_domain, cache)
        if mesh is None:
            return 2
        xds = XdsServer(mesh)
        watcher = ConfigWatcher(
            args.config,
            xds.update,
            interval=args.watch_interval,
            trust_domain=ca.trust_domain,
            current=mesh,
            cache=cache,
        )
    try:
        tokens = read_tokens(args.tokens) if args.tokens else None
    except OSError as e:
        print(f"ambient control-plane: --tokens {args.tokens}: {e.strerror}", file=sys.stderr)
        return 2
    try:
        server = IstioCaServer(
            ca,
            args.listen,
            tokens=tokens,
            max_ttl=dt.timedelta(seconds=args.max_certificate_ttl),
            serve_hostnames=tuple(args.hostname or (ISTIOD_HOSTNAME, "localhost")),
            handlers=(xds.handler(),) if xds else (),
        ).start()
    except (OSError, RuntimeError) as e:
        print(f"ambient control-plane: cannot serve on {args.listen}: {e}", file=sys.stderr)
        return 2
    if watcher is not None:
        watcher.start()
    served = f" xds={server.address}" if xds else ""
    print(f"ready ca={server.address}{served} trust_domain={ca.trust_domain}", flush=True)
    why = wait_for_termination()
    xds_said = f", xDS pushes {xds.pushes}, NACKs {len(xds.nacks)}" if xds else ""
    print(
        f"stopping ({why}): issued {server.issued}, refused {server.refused}{xds_said}",
        file=sys.stderr,
    )
    if watcher is not None:
        watcher.stop()
    server.stop(grace=1.0)
    return 0
