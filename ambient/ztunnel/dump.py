"""``/config_dump``: what a ztunnel is serving — workloads, services, policies and certificates
(identity and validity only; private keys never leave the data plane)."""

from __future__ import annotations

from typing import Any

from ..mesh import Mesh, Service, Workload
from .proxy import Ztunnel


def _workload(w: Workload) -> dict[str, Any]:
    return {
        "uid": w.uid,
        "name": w.name,
        "namespace": w.namespace,
        "workloadIps": [str(ip) for ip in w.ips],
        "protocol": w.protocol.value,
        "node": w.node,
        "serviceAccount": w.service_account,
        "identity": str(w.identity),
        "status": w.status.value,
    }


def _service(s: Service) -> dict[str, Any]:
    return {
        "name": s.name,
        "namespace": s.namespace,
        "hostname": s.hostname,
        "vips": [f"{net}/{ip}" for net, ip in s.vips],
        "ports": {str(p): t for p, t in s.ports.items()},
        "endpoints": [e.workload_uid for e in s.endpoints],
    }


def config_dump(ztunnel: Ztunnel, reload: dict[str, object] | None = None) -> dict[str, Any]:
    mesh: Mesh = ztunnel.mesh
    return {
        "reload": reload or {},
        "node": ztunnel.node,
        "workloads": [_workload(w) for w in mesh.workloads],
        "services": [_service(s) for s in mesh.services],
        "policies": [
            {
                "name": p.name,
                "namespace": p.namespace,
                "action": p.action.value,
                "scope": p.scope.value,
                "dryRun": p.dry_run,
            }
            for p in mesh.policies
        ],
        "servedPods": sorted(p.workload.key for p in ztunnel.pods.values()),
        "certificates": ztunnel.certificates.status(),
        "sources": list(mesh.sources),
    }
