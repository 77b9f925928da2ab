"""``ambient ca init``: a root CA for standalone use (the role Istio's CA plays in a cluster)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..identity import CertificateAuthority
from ..identity.ca import ROOT_CERT_FILE, ROOT_KEY_FILE


def register(commands: Any) -> None:
    ca = commands.add_parser("ca", help="certificate authority")
    sub = ca.add_subparsers(dest="ca_command", required=True, metavar="SUBCOMMAND")
    init = sub.add_parser("init", help="create a root CA (key written 0600)")
    init.add_argument("--dir", required=True, type=Path, help="where to write the CA")
    init.add_argument("--trust-domain", default="cluster.local")
    init.add_argument("--force", action="store_true", help="overwrite an existing CA")
    init.set_defaults(run=run_init)


def run_init(args: argparse.Namespace) -> int:
    key = args.dir / ROOT_KEY_FILE
    if key.exists() and not args.force:
        print(f"ambient ca init: {key} exists; use --force to replace it")
        return 1
    CertificateAuthority.create(args.trust_domain).save(args.dir)
    print(f"root CA for {args.trust_domain}: {args.dir / ROOT_CERT_FILE} (key {key}, mode 0600)")
    return 0
