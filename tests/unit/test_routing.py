"""ztunnel's routing rules as pure functions, table-driven: each case names the rule it shows."""

from __future__ import annotations

import ipaddress
import random
import textwrap
from collections import Counter

import pytest

from ambient import routing
from ambient.config import load_mesh
from ambient.routing import Transport

MESH = """
apiVersion: v1
kind: Namespace
metadata: {name: default, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: default}
spec: {nodeName: n1, serviceAccountName: client}
status: {podIP: 10.0.1.1}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: default, labels: {app: web}}
spec: {nodeName: n2, serviceAccountName: web}
status: {podIP: 10.0.2.1}
---
apiVersion: v1
kind: Pod
metadata: {name: web-2, namespace: default, labels: {app: web}}
spec: {nodeName: n2, serviceAccountName: web}
status: {podIP: 10.0.2.2}
---
apiVersion: v1
kind: Pod
metadata: {name: web-sick, namespace: default, labels: {app: web}}
spec: {nodeName: n2, serviceAccountName: web}
status: {podIP: 10.0.2.3, conditions: [{type: Ready, status: "False"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: legacy, namespace: default, labels: {app: legacy, istio.io/dataplane-mode: none}}
spec: {nodeName: n2}
status: {podIP: 10.0.2.9}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec: {clusterIP: 10.96.0.1, selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: legacy, namespace: default}
spec: {clusterIP: 10.96.0.2, selector: {app: legacy}, ports: [{port: 80, targetPort: 9090}]}
---
apiVersion: v1
kind: Service
metadata: {name: nobody, namespace: default}
spec: {clusterIP: 10.96.0.3, selector: {app: nobody}, ports: [{port: 80}]}
"""

ip = ipaddress.ip_address


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    path = tmp_path_factory.mktemp("mesh") / "mesh.yaml"
    path.write_text(textwrap.dedent(MESH))
    return load_mesh([path])


@pytest.fixture
def client(mesh):
    return mesh.workload_by_ip(ip("10.0.1.1"))


def route(mesh, client, dst, port, *, seed=1, proxy=("10.0.1.1",)):
    return routing.outbound(
        mesh,
        client,
        ip(dst),
        port,
        rng=random.Random(seed),
        proxy_addresses=[ip(p) for p in proxy],
    )


CASES = [
    # (rule, destination, port, transport, dial, authority or None)
    (
        "a Service VIP goes to an endpoint over HBONE, authority podIP:targetPort",
        "10.96.0.1",
        80,
        Transport.HBONE,
        {"10.0.2.1:15008", "10.0.2.2:15008"},
        {"10.0.2.1:8080", "10.0.2.2:8080"},
    ),
    (
        "a pod IP goes to that pod, port unchanged",
        "10.0.2.2",
        8080,
        Transport.HBONE,
        {"10.0.2.2:15008"},
        {"10.0.2.2:8080"},
    ),
    (
        "a destination outside the mesh is plain TCP to podIP:targetPort",
        "10.96.0.2",
        80,
        Transport.TCP,
        {"10.0.2.9:9090"},
        None,
    ),
    (
        "a pod outside the mesh, by IP, is plain TCP",
        "10.0.2.9",
        9090,
        Transport.TCP,
        {"10.0.2.9:9090"},
        None,
    ),
    (
        "an unknown destination is passed through as plain TCP",
        "192.0.2.10",
        443,
        Transport.TCP,
        {"192.0.2.10:443"},
        None,
    ),
    (
        "a Service without a ready endpoint is refused, no fallback",
        "10.96.0.3",
        80,
        Transport.DENY,
        None,
        None,
    ),
    ("a Service port that does not exist is refused", "10.96.0.1", 81, Transport.DENY, None, None),
    (
        "the proxy's own outbound port is refused (no loop)",
        "10.0.1.1",
        15001,
        Transport.DENY,
        None,
        None,
    ),
    (
        "the proxy's own inbound port is refused (no loop)",
        "10.0.1.1",
        15006,
        Transport.DENY,
        None,
        None,
    ),
    (
        "the proxy's own HBONE port is refused (no loop)",
        "10.0.1.1",
        15008,
        Transport.DENY,
        None,
        None,
    ),
    (
        "the proxy's own SOCKS5 port is refused (no loop)",
        "10.0.1.1",
        15080,
        Transport.DENY,
        None,
        None,
    ),
]


@pytest.mark.parametrize(
    ("rule", "dst", "port", "transport", "dials", "authorities"), CASES, ids=[c[0] for c in CASES]
)
def test_outbound_rule(mesh, client, rule, dst, port, transport, dials, authorities):
    decision = route(mesh, client, dst, port)
    assert decision.transport is transport, decision.reason
    if dials is not None:
        assert decision.dial in dials
    if authorities is not None:
        assert decision.authority in authorities
    if transport is Transport.DENY:
        assert decision.reason


def test_hbone_expects_the_destination_identity(mesh, client):
    decision = route(mesh, client, "10.0.2.1", 8080)
    assert decision.identities == ("spiffe://cluster.local/ns/default/sa/web",)


def test_service_traffic_spreads_over_healthy_endpoints_only(mesh, client):
    rng = random.Random(7)
    picks = Counter(
        routing.outbound(mesh, client, ip("10.96.0.1"), 80, rng=rng).destination.name
        for _ in range(400)
    )
    assert set(picks) == {"web-1", "web-2"}  # web-sick is never chosen
    assert 150 < picks["web-1"] < 250  # equal capacity, roughly even


def test_capacity_weights_the_choice():
    from ambient.mesh import Endpoint, Mesh, Protocol, Service, Workload

    a = Workload("a", "a", "ns", (ip("10.0.0.1"),), protocol=Protocol.HBONE, capacity=3)
    b = Workload("b", "b", "ns", (ip("10.0.0.2"),), protocol=Protocol.HBONE, capacity=1)
    svc = Service(
        "s",
        "ns",
        "s.ns.svc.cluster.local",
        (("", ip("10.96.1.1")),),
        {80: 80},
        (Endpoint("a", {80: 80}), Endpoint("b", {80: 80})),
    )
    mesh = Mesh(workloads=(a, b), services=(svc,))
    rng = random.Random(3)
    picks = Counter(
        routing.outbound(mesh, a, ip("10.96.1.1"), 80, rng=rng).destination.name
        for _ in range(2000)
    )
    assert 2.4 < picks["a"] / picks["b"] < 3.8


def test_resolve_accepts_addresses_and_service_names(mesh):
    assert routing.resolve(mesh, "10.0.2.1:8080") == (ip("10.0.2.1"), 8080)
    assert routing.resolve(mesh, "[fd00::1]:80") == (ip("fd00::1"), 80)
    assert routing.resolve(mesh, "web.default.svc.cluster.local:80") == (ip("10.96.0.1"), 80)
    assert routing.resolve(mesh, "web.default:80") == (ip("10.96.0.1"), 80)
    with pytest.raises(ValueError, match="neither an IP nor a known Service"):
        routing.resolve(mesh, "nowhere.example:80")
    with pytest.raises(ValueError, match="expected host:port"):
        routing.resolve(mesh, "10.0.0.1")


INBOUND = [
    ("an HBONE stream to this pod is allowed to the app", "10.0.2.1:8080", True, 200),
    ("an HBONE authority that is another pod's IP gets 400", "10.0.2.2:8080", False, 400),
    ("an HBONE authority on the proxy's own port gets 400", "10.0.2.1:15008", False, 400),
    ("an HBONE authority that is not ip:port gets 400", "web:8080", False, 400),
]


@pytest.mark.parametrize(
    ("rule", "authority", "allowed", "status"), INBOUND, ids=[c[0] for c in INBOUND]
)
def test_inbound_hbone_rule(mesh, rule, authority, allowed, status):
    check = routing.inbound_hbone(mesh.workload_by_ip(ip("10.0.2.1")), authority)
    assert (check.allowed, check.status) == (allowed, status)
    if allowed:
        assert check.upstream == (ip("10.0.2.1"), 8080)


def test_inbound_plaintext_goes_to_the_app_address_in_loopback_mode():
    from ambient.mesh import Protocol, Workload

    w = Workload(
        "w", "w", "ns", (ip("127.1.0.1"),), protocol=Protocol.HBONE, app_address=ip("127.2.0.1")
    )
    assert routing.inbound_plaintext(w, ip("127.1.0.1"), 8080).upstream == (ip("127.2.0.1"), 8080)
    assert not routing.inbound_plaintext(w, ip("127.1.0.1"), 15006).allowed
    assert not routing.inbound_plaintext(w, ip("127.1.0.9"), 8080).allowed


def test_forwarded_host_is_read_as_istio_reads_it():
    assert routing.forwarded_host('for="10.0.0.1:5000";host=web.prod.svc.cluster.local') == (
        "web.prod.svc.cluster.local"
    )
    assert routing.forwarded_host('for="10.0.0.1:5000";host="quoted.example"') == "quoted.example"
    assert routing.forwarded_host('for="10.0.0.1:5000"') is None
    assert routing.forwarded_host("host=") is None


def test_the_inbound_service_is_the_named_one_else_the_one_whose_target_port_matches(mesh):
    web_1 = mesh.workload_by_ip(ip("10.0.2.1"))
    web = "web.default.svc.cluster.local"
    assert routing.guess_inbound_service(mesh, web_1, 8080).hostname == web
    assert routing.guess_inbound_service(mesh, web_1, 8080, web).hostname == web
    assert routing.guess_inbound_service(mesh, web_1, 9999) is None
    # A name the workload does not back is ignored, not trusted.
    legacy = "legacy.default.svc.cluster.local"
    assert routing.guess_inbound_service(mesh, web_1, 9999, legacy) is None
