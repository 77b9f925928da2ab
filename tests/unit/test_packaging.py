"""The Kubernetes packaging (packaging/): the entrypoint turns the environment Istio's ztunnel
DaemonSet gives into `ambient ztunnel` flags that ambient's own parser accepts, and the
manifest mounts what the entrypoint reads where it reads it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import yaml

from ambient.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
ENTRYPOINT = ROOT / "packaging" / "ztunnel-entrypoint.sh"
MANIFEST = ROOT / "packaging" / "kubernetes" / "ztunnel.yaml"


def entrypoint_argv(tmp_path: Path, env: dict[str, str], *extra: str) -> list[str]:
    """What the entrypoint would run, caught by an `ambient` that prints its arguments."""
    fake = tmp_path / "bin" / "ambient"
    fake.parent.mkdir(exist_ok=True)
    fake.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done\n')
    fake.chmod(0o755)
    done = subprocess.run(
        ["sh", str(ENTRYPOINT), *extra],
        env={"PATH": f"{fake.parent}:{os.environ['PATH']}", **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.splitlines()


def test_the_entrypoint_maps_istios_environment_to_flags_ambient_accepts(tmp_path: Path) -> None:
    argv = entrypoint_argv(
        tmp_path,
        {"NODE_NAME": "node-a", "CA_ADDRESS": "ca.example:15012", "ISTIO_META_CLUSTER_ID": "c1"},
        "--drain-deadline",
        "5",
    )
    assert argv[:3] == ["--log-level", "info", "ztunnel"], argv
    args = build_parser("ztunnel").parse_args(argv)
    assert args.node == "node-a" and args.ca_address == "ca.example:15012"
    assert args.xds_address == "istiod.istio-system.svc:15012"
    assert args.cluster_id == "c1" and args.drain_deadline == 5
    assert str(args.token_file) == "/var/run/secrets/tokens/istio-token"
    assert str(args.zds_socket) == "/var/run/ztunnel/ztunnel.sock"
    assert str(args.ca_root_cert) == "/var/run/secrets/istio/root-cert.pem"


def test_the_entrypoint_needs_the_node_name(tmp_path: Path) -> None:
    done = subprocess.run(["sh", str(ENTRYPOINT)], env={"PATH": os.environ["PATH"]},
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode != 0 and "NODE_NAME is required" in done.stderr


def test_the_manifest_gives_what_the_entrypoint_reads() -> None:
    docs = list(yaml.safe_load_all(MANIFEST.read_text()))
    (daemonset,) = [d for d in docs if d["kind"] == "DaemonSet"]
    assert (daemonset["metadata"]["namespace"], daemonset["metadata"]["name"]) == (
        "istio-system",
        "ztunnel",
    )
    pod = daemonset["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"] for e in container["env"]}
    assert {"CA_ADDRESS", "XDS_ADDRESS", "NODE_NAME", "ISTIO_META_CLUSTER_ID"} <= env
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    script = ENTRYPOINT.read_text()
    for path in ("/var/run/secrets/istio", "/var/run/secrets/tokens", "/var/run/ztunnel"):
        assert path in mounts and path in script, path
    assert container["readinessProbe"]["httpGet"]["port"] == 15021
    assert "--readiness-address 0.0.0.0:15021" in script
