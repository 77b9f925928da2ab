"""The mesh as Istio's ztunnel xDS resources and back (``ambient.xds``): field numbers on the
wire as Istio's API has them, a round trip of real mesh files, and the resources a ztunnel must
refuse (NACK), each saying which and why."""

from __future__ import annotations

import dataclasses
import ipaddress
from pathlib import Path

import pytest

from ambient.config import load_mesh
from ambient.mesh import Mesh, Workload
from ambient.policy.model import Action
from ambient.xds import messages as m
from ambient.xds import translate

EXAMPLES = Path(__file__).resolve().parents[2] / "ambient" / "examples"
VECTORS = Path(__file__).resolve().parent / "vectors"


def test_field_numbers_are_istios_on_the_wire() -> None:
    # Workload.uid is field 20 (tag 0xa2 0x01), Workload.services 22, Resource.name 3,
    # DeltaDiscoveryResponse.nonce 5 and removed_resources 6, Match.service_accounts 11.
    assert m.Workload(uid="u").SerializeToString() == b"\xa2\x01\x01u"
    assert m.Resource(name="n").SerializeToString() == b"\x1a\x01n"
    response = m.DeltaDiscoveryResponse(nonce="x", removed_resources=["r"])
    assert response.SerializeToString() == b"\x2a\x01x\x32\x01r"
    match = m.Match(service_accounts=[m.ServiceAccountMatch(namespace="a", serviceAccount="b")])
    assert match.SerializeToString() == b"\x5a\x06\x0a\x01a\x12\x01b"
    address = m.Address(service=m.Service(name="s"))
    assert address.SerializeToString() == b"\x12\x03\x0a\x01s"
    assert m.Address.FromString(b"\x12\x03\x0a\x01s").service.name == "s"


def _carried(w: Workload, mesh: Mesh) -> Workload:
    """What xDS carries of a workload: labels and ports istiod has already used (selectors
    become the policies it lists); loopback-mode extensions are ambient's."""
    return dataclasses.replace(
        w,
        labels={},
        named_ports={},
        container_ports=(),
        app_address=None,
        waypoint_only=False,
        authorization_policies=translate.selected_policies(w, mesh.policies),
    )


def _through_the_wire(mesh: Mesh) -> Mesh:
    addresses, authorizations = translate.resources(mesh)
    wire = {k: m.Address.FromString(v.SerializeToString()) for k, v in addresses.items()}
    auths = {
        k: m.Authorization.FromString(v.SerializeToString()) for k, v in authorizations.items()
    }
    return translate.mesh_from_resources(wire, auths)


@pytest.mark.parametrize(
    "path",
    [EXAMPLES / "demo-mesh.yaml", EXAMPLES / "testbed-mesh.yaml", VECTORS / "ztunnel-local.yaml"],
    ids=lambda p: p.name,
)
def test_a_mesh_survives_the_round_trip(path: Path) -> None:
    mesh = load_mesh([path])
    back = _through_the_wire(mesh)
    assert sorted(back.workloads, key=lambda w: w.uid) == sorted(
        (_carried(w, mesh) for w in mesh.workloads), key=lambda w: w.uid
    )
    extra = {(s.namespace, s.name) for s in translate.waypoint_services(mesh)}
    assert sorted(
        (s for s in back.services if (s.namespace, s.name) not in extra), key=lambda s: s.key
    ) == sorted(mesh.services, key=lambda s: s.key)
    sent = [p for p in mesh.policies if p.action is not Action.AUDIT]
    assert sorted(back.policies, key=lambda p: p.key) == sorted(
        (dataclasses.replace(p, selector=()) for p in sent), key=lambda p: p.key
    )
    assert {w.key for w in back.waypoints} == {
        w.waypoint for w in (*mesh.workloads, *mesh.services) if w.waypoint
    }


def test_a_waypoint_is_named_by_its_service_hostname_with_its_pods_behind(tmp_path: Path) -> None:
    mesh = load_mesh([EXAMPLES / "demo-mesh.yaml"])
    addresses, _ = translate.resources(mesh)
    bound = next(a.service for a in addresses.values() if a.service.HasField("waypoint"))
    assert bound.waypoint.hostname.hostname == "waypoint.default.svc.cluster.local"
    assert bound.waypoint.hbone_mtls_port == 15008
    (wp,) = mesh.waypoints
    pod = addresses[wp.workload_uids[0]].workload
    assert list(pod.services["default/waypoint.default.svc.cluster.local"].ports) == [
        m.Port(service_port=15008, target_port=15008)
    ]
    (back,) = _through_the_wire(mesh).waypoints
    assert back.key == wp.key and back.workload_uids == wp.workload_uids


def _workload(**fields: object) -> m.Address:
    return m.Address(workload=m.Workload(uid="u1", name="p", namespace="ns", **fields))


REFUSED = [
    ({"u1": _workload(addresses=[b"\x01\x02\x03"])}, {}, "workload u1: addresses: 3 bytes"),
    (
        {
            "u1": _workload(
                waypoint=m.GatewayAddress(address=m.NetworkAddress(address=b"\x7f\0\0\1"))
            )
        },
        {},
        "waypoint by address is not supported",
    ),
    ({"x": m.Address()}, {}, "address x: neither a workload nor a service"),
    ({}, {"ns/p": m.Authorization(name="p", namespace="ns", scope=7)}, "unknown scope or action"),
    (
        {},
        {
            "ns/p": m.Authorization(
                rules=[m.Rule(clauses=[m.Clause(matches=[m.Match(principals=[m.StringMatch()])])])]
            )
        },
        "authorization ns/p: a string match with no exact",
    ),
]


@pytest.mark.parametrize(
    ("addresses", "authorizations", "said"), REFUSED, ids=[r[2] for r in REFUSED]
)
def test_a_resource_ztunnel_cannot_take_is_refused_naming_it(
    addresses: dict, authorizations: dict, said: str
) -> None:
    with pytest.raises(translate.ResourceError, match=said):
        translate.mesh_from_resources(addresses, authorizations)


def test_policies_keep_their_ip_blocks_and_string_matches() -> None:
    from ambient.policy.model import Match, MatchKind, Policy, Scope, StringMatch

    policy = Policy(
        "p",
        "ns",
        Scope.NAMESPACE,
        Action.DENY,
        rules=(
            (
                (
                    Match(
                        principals=(StringMatch(MatchKind.PRESENCE),),
                        not_namespaces=(StringMatch(MatchKind.SUFFIX, "-test"),),
                        source_ips=(ipaddress.ip_network("10.0.0.0/8"),),
                        not_destination_ips=(ipaddress.ip_network("fd00::1/128"),),
                        destination_ports=(80, 443),
                    ),
                ),
            ),
        ),
        dry_run=True,
    )
    resource = translate.authorization_resource(policy)
    wire = m.Authorization.FromString(resource.SerializeToString())
    assert translate.policy_from_resource("ns/p", wire) == policy
