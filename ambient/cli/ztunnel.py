"""``ambient ztunnel``: the node proxy for one node of a mesh file, in loopback mode or (with
``--zds-socket``) in-pod mode, where istio-cni's ZDS protocol hands it the pods."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from ..config import MeshCache
from ..hbone import DataPlane
from ..identity.ca import WORKLOAD_CERT_TTL
from ..identity.spiffe import DEFAULT_TRUST_DOMAIN
from ..mesh import Mesh
from ..telemetry.metrics import ConnectionMetrics, Exposition
from ..zds import ZdsClient
from ..ztunnel import Ztunnel
from ..ztunnel.dump import config_dump
from ..ztunnel.inpod import InpodPods
from ..ztunnel.proxy import PROXY_MARK
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


def register(commands: Any) -> None:
    z = commands.add_parser(
        "ztunnel",
        help="run the node proxy for one node of a mesh file",
        description="Serve every in-mesh pod of NODE: HBONE in (15008), plaintext in (15006), "
        "captured outbound (15001) and SOCKS5 outbound (15080) on each pod's IP. Reloads the "
        "config on SIGHUP and when a file changes; drains on SIGTERM.",
    )
    z.add_argument(
        "--config",
        action="append",
        type=Path,
        metavar="FILE",
        help="mesh file (repeatable); or give --xds-address",
    )
    z.add_argument(
        "--xds-address",
        metavar="HOST:PORT",
        help="take the mesh over delta xDS from istiod or `ambient control-plane --config` "
        "(Istio's XDS_ADDRESS) instead of --config; TLS verified with --xds-root-cert",
    )
    z.add_argument(
        "--xds-root-cert",
        type=Path,
        metavar="FILE",
        help="PEM root the xDS server's certificate must chain to (default: --ca-root-cert)",
    )
    z.add_argument("--node", required=True, help="the node this proxy serves (spec.nodeName)")
    z.add_argument(
        "--ca-dir",
        type=Path,
        help="CA made by `ambient ca init`; certificates of the node's pods are issued from it "
        "(or give --ca-address)",
    )
    add_ca_client_arguments(z)
    z.add_argument(
        "--admin-address",
        type=socket_address,
        default="127.0.0.1:15000",
        help="admin endpoint, localhost only: /config_dump, /logging, /quitquitquit "
        "(default 127.0.0.1:15000; port 0 picks one)",
    )
    z.add_argument(
        "--metrics-address",
        type=socket_address,
        default="127.0.0.1:15020",
        help="Prometheus metrics: /metrics and /stats/prometheus (default 127.0.0.1:15020)",
    )
    z.add_argument(
        "--readiness-address",
        type=socket_address,
        default="127.0.0.1:15021",
        help="readiness: /healthz/ready (default 127.0.0.1:15021)",
    )
    z.add_argument(
        "--access-log",
        default="-",
        help="where to write one JSON line per connection: a file, '-' for stdout, 'off' for none",
    )
    z.add_argument("--access-log-format", choices=["json", "text"], default="json")
    z.add_argument(
        "--zds-socket",
        type=Path,
        default=None,
        metavar="PATH",
        help="in-pod mode: take pods and their network namespaces from istio-cni's ZDS socket "
        "(Istio's default is /var/run/ztunnel/ztunnel.sock) and open each pod's listeners "
        "inside its namespace; ready once the CNI's first snapshot is served. Needs root "
        "(CAP_SYS_ADMIN, CAP_NET_ADMIN).",
    )
    z.add_argument(
        "--trust-domain",
        default=DEFAULT_TRUST_DOMAIN,
        help=f"SPIFFE trust domain of the pods' identities (default {DEFAULT_TRUST_DOMAIN})",
    )
    z.add_argument(
        "--certificate-ttl",
        type=float,
        default=WORKLOAD_CERT_TTL.total_seconds(),
        metavar="SECONDS",
        help="lifetime of the pods' certificates, renewed at half of it (Istio's SECRET_TTL; "
        "default 86400); short ones exercise rotation",
    )
    z.add_argument("--workers", type=int, default=None, help="core worker threads")
    add_limit_arguments(z)
    z.add_argument(
        "--drain-deadline",
        type=float,
        default=5.0,
        help="seconds live connections get to finish on SIGTERM (default 5)",
    )
    z.add_argument(
        "--watch-interval",
        type=float,
        default=1.0,
        help="seconds between checks of the config files for changes (default 1)",
    )
    z.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    cache = MeshCache()  # kept for the reloads
    if args.xds_address:
        mesh = Mesh()  # until the first snapshot arrives
        root = args.xds_root_cert or args.ca_root_cert
        if root is None:
            print("ambient ztunnel: --xds-address needs --xds-root-cert", file=sys.stderr)
            return 2
    elif args.config:
        loaded = proxy.load(args.config, args.trust_domain, cache)
        if loaded is None:
            return 2
        mesh = loaded
    else:
        print("ambient ztunnel: give --config FILE or --xds-address HOST:PORT", file=sys.stderr)
        return 2
    access_log = proxy.open_access_log(args.access_log, text=args.access_log_format == "text")

    stop = threading.Event()
    inpod = args.zds_socket is not None
    # In-pod mode: the proxy's own sockets carry the mark the pods' rules let through untouched.
    raise_fd_limit()
    with DataPlane(args.workers, mark=PROXY_MARK if inpod else None, **limit_options(args)) as dp:
        certificates = proxy.certificates(args, dp)
        connection_metrics = ConnectionMetrics()
        ztunnel = Ztunnel(
            args.node,
            dp,
            certificates,
            inpod=inpod,
            access_log=access_log,
            metrics=connection_metrics,
        )
        ztunnel.apply(mesh)
        if not inpod and not ztunnel.pods:
            log.warning("no in-mesh pod has node %r: nothing to serve yet", args.node)
        watcher = (
            None
            if args.xds_address
            else ConfigWatcher(
                args.config,
                ztunnel.apply,
                interval=args.watch_interval,
                trust_domain=args.trust_domain,
                current=mesh,
                cache=cache,
            )
        )
        xds = None
        if args.xds_address:
            from ..istiod import token_from
            from ..xds.client import XdsClient

            xds = XdsClient(
                args.xds_address,
                root.read_bytes(),
                ztunnel.apply,
                node=args.node,
                token=token_from(args.token_file),
                cluster_id=args.cluster_id,
                hostname=args.ca_hostname,
            )
        zds = ZdsClient(args.zds_socket, InpodPods(ztunnel)) if inpod else None

        def pending() -> list[str]:
            waiting = zds is not None and not zds.snapshot_done.is_set()
            return (
                ztunnel.pending
                + certificates.pending()
                + (xds.pending() if xds else [])
                + (
                    [f"ZDS: waiting for the CNI's pod snapshot on {args.zds_socket}"]
                    if waiting
                    else []
                )
            )

        try:
            endpoints = proxy.endpoints(
                args,
                config_dump=lambda: config_dump(
                    ztunnel, watcher.status() if watcher else {"xds": xds.status() if xds else {}}
                ),
                quit=stop.set,
                exposition=Exposition(connection_metrics, dp.stats),
                pending=pending,
                draining=stop.is_set,
            )
        except (OSError, ValueError) as e:
            print(f"ambient ztunnel: {e}", file=sys.stderr)
            certificates.stop()
            return 2
        for endpoint in endpoints:
            endpoint.start()
        if watcher is not None:
            watcher.start()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        # The mesh first: the CNI's pods are checked against it as they are handed over.
        if xds is not None:
            xds.start()
            log.info("waiting for the mesh from xDS at %s", args.xds_address)
            while not xds.first_snapshot.wait(0.2):
                if stop.is_set():
                    break
        if zds is not None:
            zds.start()
            log.info("waiting for pods from the CNI on %s", args.zds_socket)
            while not zds.snapshot_done.wait(0.2):
                if stop.is_set():
                    break
        if watcher is not None:
            reload = watcher.reload
            signal.signal(signal.SIGHUP, lambda *_: threading.Thread(target=reload).start())
        # Always the first line on stdout (access log lines only come with connections).
        print(
            f"ready node={args.node} admin={endpoints[0].address} "
            f"metrics={endpoints[1].address} readiness={endpoints[2].address} "
            f"pods={len(ztunnel.pods)}",
            flush=True,
        )
        while not stop.wait(1.0):
            pass
        log.info("draining for up to %s s", args.drain_deadline)
        if watcher is not None:
            watcher.stop()
        if xds is not None:
            xds.stop()
        if zds is not None:
            zds.stop()
        finished = ztunnel.close(args.drain_deadline)
        log.info("drained%s", "" if finished else " (connections past the deadline were cut)")
        for endpoint in endpoints:
            endpoint.stop()
        certificates.stop()
    return 0
