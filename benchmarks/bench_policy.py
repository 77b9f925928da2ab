"""The L4 authorization decision with 1,000 policies on one pod (issue: under 20 µs per
connection on this machine).

The policy set mixes what clusters accumulate: ALLOWs by principal, by namespace and by port,
DENYs by source network and by port, a few broad rules no index can narrow, dry-run and AUDIT
policies; the connections checked are a fixed random mix of allowed and denied, mTLS and
plaintext. A rule-by-rule evaluation of the same set is measured beside it as the baseline.
"""

from __future__ import annotations

import random

import pytest

from ambient.mesh import Mesh, Protocol, Workload
from ambient.policy.engine import Authorizer, PolicySet, connection, policy_matches
from ambient.policy.model import Action, Match, MatchKind, Policy, Scope, StringMatch

POD_IP = "10.0.0.10"


def thousand_policies(rng: random.Random) -> list[Policy]:
    policies = []
    for i in range(1000):
        kind = i % 10
        if kind < 4:  # ALLOW a principal on a port
            match = (
                Match(
                    principals=(
                        StringMatch(MatchKind.EXACT, f"cluster.local/ns/team{i % 40}/sa/app{i}"),
                    )
                ),
            )
            rules = ((match, (Match(destination_ports=(8080 + i % 5,)),)),)
            action = Action.ALLOW
        elif kind < 6:  # ALLOW a namespace
            rules = (((Match(namespaces=(StringMatch(MatchKind.EXACT, f"team{i % 40}"),)),),),)
            action = Action.ALLOW
        elif kind < 7:  # ALLOW a port
            rules = (((Match(destination_ports=(9000 + i % 50,)),),),)
            action = Action.ALLOW
        elif kind < 9:  # DENY a source network
            import ipaddress

            net = ipaddress.ip_network(f"172.{i % 32}.{i % 250}.0/24")
            rules = (((Match(source_ips=(net,)),),),)
            action = Action.DENY
        else:  # DENY by prefix principal: no exact value to index on
            rules = (
                (
                    (
                        Match(
                            principals=(
                                StringMatch(MatchKind.PREFIX, f"cluster.local/ns/quarantine{i}/"),
                            )
                        ),
                    ),
                ),
            )
            action = Action.DENY
        policies.append(
            Policy(f"p{i}", "prod", Scope.NAMESPACE, action, rules, dry_run=(i % 97 == 0))
        )
    return policies


def connections(rng: random.Random, n: int = 256) -> list:
    out = []
    for _ in range(n):
        identity = rng.choice(
            [
                None,
                f"spiffe://cluster.local/ns/team{rng.randrange(45)}/sa/app{rng.randrange(1000)}",
                f"spiffe://cluster.local/ns/team{rng.randrange(40)}/sa/app{rng.randrange(40)}",
            ]
        )
        src = rng.choice(
            [
                f"10.1.{rng.randrange(4)}.{rng.randrange(250)}",
                f"172.{rng.randrange(32)}.{rng.randrange(250)}.9",
            ]
        )
        out.append(connection(src, POD_IP, rng.choice([8080, 8081, 9000, 9042, 443]), identity))
    return out


@pytest.fixture(scope="module")
def setup():
    rng = random.Random(2026)
    import ipaddress
    import types

    web = Workload(
        "web",
        "web",
        "prod",
        (ipaddress.ip_address(POD_IP),),
        protocol=Protocol.HBONE,
        labels=types.MappingProxyType({"app": "web"}),
    )
    mesh = Mesh(workloads=(web,), policies=tuple(thousand_policies(rng)))
    authorizer = Authorizer(mesh)
    authorizer.policy_set(web)  # compiled once per snapshot, as in the proxy
    return authorizer, web, connections(rng)


def test_authorize_with_1000_policies_indexed(benchmark, setup):
    authorizer, web, conns = setup
    state = {"i": 0}

    def one():
        state["i"] = (state["i"] + 1) % len(conns)
        return authorizer.authorize(web, conns[state["i"]])

    results = [authorizer.authorize(web, c).allowed for c in conns]
    assert 0 < sum(results) < len(results)  # a real mix of allowed and denied
    benchmark.extra_info["policies"] = 1000
    benchmark(one)


def test_authorize_with_1000_policies_rule_by_rule(benchmark, setup):
    authorizer, web, conns = setup
    policies = authorizer.policy_set(web).policies
    state = {"i": 0}

    def one():
        state["i"] = (state["i"] + 1) % len(conns)
        conn = conns[state["i"]]
        live = [p for p in policies if not p.dry_run]
        if any(policy_matches(p, conn) for p in live if p.action is Action.DENY):
            return False
        allows = [p for p in live if p.action is Action.ALLOW]
        return not allows or any(policy_matches(p, conn) for p in allows)

    indexed = authorizer.policy_set(web)
    assert [one() for _ in conns] == [indexed.evaluate(c).allowed for c in conns[1:] + conns[:1]]
    benchmark(one)


def test_compile_1000_policies_once_per_snapshot(benchmark, setup):
    authorizer, _, _ = setup
    policies = authorizer.mesh.policies
    benchmark(PolicySet, policies)
