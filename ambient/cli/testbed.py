"""``ambient testbed up|down``: the mesh file's nodes and pods as network namespaces, with
istio-cni's rules and one in-pod ztunnel per node (root).

``up`` starts a background process that owns the testbed (the CNI side of ZDS must keep running
for the ztunnels) and returns once every ztunnel is ready; ``down`` stops it and removes every
namespace, also after a crash.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .. import examples
from ..config import ConfigError, load_mesh
from ..testbed import TestbedError, control
from ..testbed.testbed import STATE_FILE, Testbed, down

DEFAULT_WORKDIR = Path("/run/ambient-testbed")
UP_TIMEOUT = 60.0


def register(commands: Any) -> None:
    bed = commands.add_parser(
        "testbed",
        help="nodes and pods as network namespaces, with in-pod ztunnels (root)",
        description="Build the mesh file's nodes and pods as network namespaces (each pod's "
        "namespace is named after it: `ip netns exec <pod> curl ...`), install istio-cni's "
        "redirection rules in every in-mesh pod, and run one in-pod ztunnel per node, fed its "
        "pods over the ZDS protocol.",
    )
    actions = bed.add_subparsers(dest="action", required=True, metavar="ACTION")
    up = actions.add_parser("up", help="build the testbed and start the ztunnels")
    up.add_argument(
        "--config",
        type=Path,
        default=None,
        help="mesh file (pods need spec.nodeName and status.podIP; default: the embedded "
        "examples/testbed-mesh.yaml, the seed's figure)",
    )
    up.add_argument(
        "--xds",
        action="store_true",
        help="the ztunnels take the mesh over delta xDS and their certificates over Istio's CA "
        "API from an `ambient control-plane` on the first node, as from istiod",
    )
    for parser in (up, actions.add_parser("down", help="stop the ztunnels, remove everything")):
        parser.add_argument(
            "--workdir",
            type=Path,
            default=DEFAULT_WORKDIR,
            help=f"state, CA, CNI sockets and logs (default {DEFAULT_WORKDIR})",
        )
    pod = actions.add_parser(
        "pod", help="hand a pod to its ztunnel, or take it back (ZDS add/del), at runtime"
    )
    pod.add_argument("verb", choices=["add", "del"])
    pod.add_argument("name", help="the pod (its namespace's name)")
    capture = actions.add_parser(
        "capture", help="install or remove a pod's redirection rules (off: it bypasses ztunnel)"
    )
    capture.add_argument("verb", choices=["on", "off"])
    capture.add_argument("name", help="the pod")
    for parser in (pod, capture):
        parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    serve = actions.add_parser("serve")  # the process `up` starts; no help: not listed
    serve.add_argument("--config", type=Path, required=True)
    serve.add_argument("--workdir", type=Path, required=True)
    serve.add_argument("--xds", action="store_true")
    bed.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print("ambient testbed: needs root (network namespaces, iptables)", file=sys.stderr)
        return 2
    if args.action == "down":
        problems = down(args.workdir)
        for problem in problems:
            print(f"ambient testbed down: {problem}", file=sys.stderr)
        return 1 if problems else 0
    if args.action == "serve":
        return _serve(args.config, args.workdir, xds=args.xds)
    if args.action in ("pod", "capture"):
        action = args.verb if args.action == "pod" else f"capture-{args.verb}"
        try:
            control.request(args.workdir, action, args.name)
        except TestbedError as e:
            print(f"ambient testbed {args.action} {args.verb} {args.name}: {e}", file=sys.stderr)
            return 1
        return 0
    return _up(args.config, args.workdir, xds=args.xds)


def _up(config: Path | None, workdir: Path, *, xds: bool = False) -> int:
    if (workdir / STATE_FILE).exists():
        print(
            f"ambient testbed: {workdir} holds a testbed already (`ambient testbed down` first)",
            file=sys.stderr,
        )
        return 2
    workdir.mkdir(parents=True, exist_ok=True)
    mesh_file = workdir / "mesh.yaml"
    mesh_file.write_text(config.read_text() if config else examples.read("testbed-mesh.yaml"))
    log_path = workdir / "testbed.log"
    with open(log_path, "ab") as log:
        owner = subprocess.Popen(
            [
                sys.executable,
                "-P",
                "-m",
                "ambient",
                "--log-level",
                "info",
                "testbed",
                "serve",
                "--config",
                str(mesh_file),
                "--workdir",
                str(workdir),
                *(["--xds"] if xds else []),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,  # outlives this command
        )
    deadline = time.monotonic() + UP_TIMEOUT
    while time.monotonic() < deadline:
        status = _status(workdir)
        # Ready, and taking `pod`/`capture` requests (the owner opens its control socket last).
        if status == "ready" and (workdir / control.CONTROL_SOCKET).exists():
            _summary(workdir)
            return 0
        if owner.poll() is not None:
            print(f"ambient testbed up failed; see {log_path}:", file=sys.stderr)
            print(log_path.read_text()[-3000:], file=sys.stderr)
            down(workdir)
            return 1
        time.sleep(0.1)
    owner.terminate()
    print(f"ambient testbed up: not ready after {UP_TIMEOUT:.0f} s; see {log_path}")
    return 1


def _status(workdir: Path) -> str | None:
    try:
        return str(json.loads((workdir / STATE_FILE).read_text()).get("status"))
    except (FileNotFoundError, ValueError):
        return None


def _summary(workdir: Path) -> None:
    mesh = load_mesh([workdir / "mesh.yaml"])
    print(f"testbed ready (state in {workdir}); pods, each a network namespace:")
    for w in sorted(mesh.workloads, key=lambda w: (w.node, w.name)):
        mode = "in mesh" if w.in_mesh else "outside the mesh"
        print(f"  {w.name:<12} node {w.node:<6} {w.ips[0]!s:<15} {mode}")
    for s in mesh.services:
        print(f"  service {s.name}: {', '.join(str(ip) for _, ip in s.vips)} ports {list(s.ports)}")
    print("try: ip netns exec <pod> <command>; ambient testbed pod del|add <pod>;")
    print("     ambient testbed capture off|on <pod>; stop with: ambient testbed down")


def _serve(config: Path, workdir: Path, *, xds: bool = False) -> int:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    bed = Testbed([config], workdir, xds=xds)
    try:
        bed.up()
    except (ConfigError, TestbedError, OSError, RuntimeError) as e:
        print(f"ambient testbed: {e}", file=sys.stderr)
        return 1
    controls = control.ControlServer(bed)
    print("testbed ready", flush=True)
    stop.wait()
    controls.close()
    problems = bed.down()
    for problem in problems:
        print(f"ambient testbed: {problem}", file=sys.stderr)
    return 1 if problems else 0
