"""``ambient waypoint``: the L7 proxy of one waypoint Gateway of a mesh file. HBONE in on each of
its pods' ``podIP:15008``; HTTP routed per request (HTTPRoute, load balancing); a second HBONE
tunnel to the chosen endpoint's ztunnel."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import orjson

from ..config import MeshCache
from ..hbone import DataPlane
from ..identity.ca import WORKLOAD_CERT_TTL
from ..identity.spiffe import DEFAULT_TRUST_DOMAIN
from ..waypoint.proxy import Waypoint
from ..waypoint.telemetry import RequestExposition
from ..waypoint.telemetry_api import metric_overrides
from ..ztunnel.reload import ConfigWatcher
from . import proxy
from .common import (
    add_ca_client_arguments,
    add_limit_arguments,
    limit_options,
    raise_fd_limit,
    socket_address,
)

log = logging.getLogger(__name__)


def _gateway(text: str) -> str:
    namespace, _, name = text.partition("/")
    if not namespace or not name or "/" in name:
        raise argparse.ArgumentTypeError(f"expected NAMESPACE/NAME of a Gateway, got {text!r}")
    return text


def register(commands: Any) -> None:
    w = commands.add_parser(
        "waypoint",
        help="run the waypoint (L7 proxy) of one Gateway of a mesh file",
        description="Serve the waypoint Gateway NAMESPACE/NAME (class istio-waypoint): HBONE in "
        "on each of its pods' IP:15008, every HTTP request routed by the HTTPRoutes attached to "
        "the Service it was sent to (else to the Service itself) and load balanced to an "
        "endpoint, through a second HBONE tunnel with the waypoint's own identity. Reloads the "
        "config on SIGHUP and when a file changes; drains on SIGTERM.",
    )
    w.add_argument(
        "--config", required=True, action="append", type=Path, metavar="FILE",
        help="mesh file (repeatable)",
    )  # fmt: skip
    w.add_argument(
        "--gateway",
        required=True,
        type=_gateway,
        metavar="NAMESPACE/NAME",
        help="the waypoint: a Gateway of the mesh file with gatewayClassName istio-waypoint",
    )
    w.add_argument(
        "--pod",
        action="append",
        default=None,
        metavar="NAMESPACE/NAME",
        help="serve only this pod of the Gateway (repeatable; default: every pod, loopback mode)",
    )
    w.add_argument(
        "--ca-dir",
        type=Path,
        help="CA made by `ambient ca init`; the waypoint's certificate is issued from it (or "
        "give --ca-address)",
    )
    add_ca_client_arguments(w)
    w.add_argument(
        "--admin-address",
        type=socket_address,
        default="127.0.0.1:15000",
        help="admin endpoint, localhost only: /config_dump (the routing table, request counts, "
        "certificates), /logging, /quitquitquit (default 127.0.0.1:15000; port 0 picks one)",
    )
    w.add_argument(
        "--metrics-address",
        type=socket_address,
        default="127.0.0.1:15020",
        help="Prometheus metrics, reporter=waypoint: /metrics and /stats/prometheus "
        "(default 127.0.0.1:15020)",
    )
    w.add_argument(
        "--readiness-address",
        type=socket_address,
        default="127.0.0.1:15021",
        help="readiness: /healthz/ready (default 127.0.0.1:15021)",
    )
    w.add_argument(
        "--access-log",
        default="-",
        help="where to write one JSON line per request: a file, '-' for stdout, 'off' for none",
    )
    w.add_argument(
        "--trust-domain",
        default=DEFAULT_TRUST_DOMAIN,
        help=f"SPIFFE trust domain of the identities (default {DEFAULT_TRUST_DOMAIN})",
    )
    w.add_argument(
        "--certificate-ttl",
        type=float,
        default=WORKLOAD_CERT_TTL.total_seconds(),
        metavar="SECONDS",
        help="lifetime of the waypoint's certificate, renewed at half of it (default 86400)",
    )
    w.add_argument(
        "--workers",
        type=int,
        default=None,
        help="core worker threads (default: one per CPU; 1 runs tokio's current-thread "
        "scheduler, the cheapest per request; the benchmark runs 1, as HAProxy's one thread)",
    )
    w.add_argument(
        "--trusted-proxies",
        type=int,
        default=0,
        metavar="N",
        help="addresses of x-forwarded-for trusted from its right for AuthorizationPolicy "
        "remoteIpBlocks / remote.ip (Istio's numTrustedProxies; default 0: the source IP)",
    )
    w.add_argument(
        "--jwks-refresh",
        type=float,
        default=1200.0,
        metavar="SECONDS",
        help="how often remote JWT key sets (RequestAuthentication jwksUri) are fetched again "
        "(default 1200, Istio's 20 minutes; every 10 s while a fetch fails)",
    )
    add_limit_arguments(w)
    w.add_argument(
        "--drain-deadline",
        type=float,
        default=5.0,
        help="seconds live requests get to finish on SIGTERM (default 5)",
    )
    w.add_argument(
        "--watch-interval",
        type=float,
        default=1.0,
        help="seconds between checks of the config files for changes (default 1)",
    )
    w.set_defaults(run=run)


def _config_dump(waypoint: Waypoint, reload: dict[str, object]) -> dict[str, Any]:
    return {
        "reload": reload,
        "waypoint": waypoint.key,
        "servedPods": sorted(p.workload.key for p in waypoint.listeners.values()),
        "table": orjson.loads(waypoint.table.json),
        "requests": waypoint.table.counts(),
        "jwks": waypoint.jwks.status(),
        "filters": waypoint.filters.status(),
        "filterFailures": [
            {"filter": name, "reason": reason, "count": count}
            for (name, reason), count in sorted(waypoint.table.plugin_failures().items())
        ],
        "certificates": waypoint.certificates.status(),
        "sources": list(waypoint.mesh.sources),
    }


def run(args: argparse.Namespace) -> int:
    cache = MeshCache()  # kept for the reloads
    mesh = proxy.load(args.config, args.trust_domain, cache)
    if mesh is None:
        return 2
    if mesh.waypoint(args.gateway) is None:
        print(
            f"ambient waypoint: {args.gateway} is not a waypoint of the mesh (a Gateway with "
            "gatewayClassName istio-waypoint)",
            file=sys.stderr,
        )
        return 2
    access_log = proxy.open_access_log(args.access_log)
    stop = threading.Event()
    raise_fd_limit()
    with DataPlane(args.workers, **limit_options(args)) as dp:
        certificates = proxy.certificates(args, dp)
        pods = frozenset(args.pod) if args.pod else None
        core_log = access_log.core() if access_log is not None else None
        waypoint = Waypoint(
            args.gateway,
            dp,
            certificates,
            pods=pods,
            access_log=core_log,
            trusted_proxies=args.trusted_proxies,
            jwks_refresh=args.jwks_refresh,
        )
        waypoint.jwks.start()
        waypoint.apply(mesh)
        watcher = ConfigWatcher(
            args.config,
            waypoint.apply,
            interval=args.watch_interval,
            trust_domain=args.trust_domain,
            current=mesh,
            cache=cache,
        )
        try:
            endpoints = proxy.endpoints(
                args,
                config_dump=lambda: _config_dump(waypoint, watcher.status()),
                quit=stop.set,
                exposition=RequestExposition(
                    waypoint.table,
                    lambda: waypoint.mesh,
                    dp.stats,
                    overrides=lambda: metric_overrides(waypoint.mesh.telemetry, waypoint.key),
                ),
                pending=lambda: waypoint.pending + certificates.pending(),
                draining=stop.is_set,
            )
        except (OSError, ValueError) as e:
            print(f"ambient waypoint: {e}", file=sys.stderr)
            certificates.stop()
            return 2
        for endpoint in endpoints:
            endpoint.start()
        watcher.start()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        signal.signal(signal.SIGHUP, lambda *_: threading.Thread(target=watcher.reload).start())
        print(
            f"ready waypoint={args.gateway} admin={endpoints[0].address} "
            f"metrics={endpoints[1].address} readiness={endpoints[2].address} "
            f"pods={len(waypoint.listeners)}",
            flush=True,
        )
        while not stop.wait(1.0):
            if waypoint.pending:
                waypoint.retry()
        log.info("draining for up to %s s", args.drain_deadline)
        watcher.stop()
        finished = waypoint.close(args.drain_deadline)
        log.info("drained%s", "" if finished else " (connections past the deadline were cut)")
        for endpoint in endpoints:
            endpoint.stop()
        certificates.stop()
        if access_log is not None:
            access_log.close()
    return 0
