"""L4 authorization, table-driven from Istio's documented semantics: each case names the rule it
shows. Policies are written as users write them (AuthorizationPolicy YAML) and go through the
same config layer and engine the proxy uses."""

from __future__ import annotations

import ipaddress
import textwrap
from pathlib import Path

import pytest

from ambient.config import ConfigError, load_mesh
from ambient.hbone import Allow, Deny
from ambient.policy.engine import Authorizer, PolicySet, connection
from ambient.policy.model import Action, Scope
from ambient.ztunnel.proxy import Ztunnel

POD_IP = "10.0.0.10"  # the destination: pod "web" in namespace "prod"

BASE = """
apiVersion: v1
kind: Namespace
metadata: {name: prod, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: istio-system}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: prod, labels: {app: web, tier: front}}
spec: {nodeName: n1, serviceAccountName: web}
status: {podIP: 10.0.0.10}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: prod, labels: {app: db}}
spec: {nodeName: n1, serviceAccountName: db}
status: {podIP: 10.0.0.11}
"""

SLEEP = "spiffe://cluster.local/ns/prod/sa/sleep"
OTHER_NS = "spiffe://cluster.local/ns/dev/sa/sleep"
ADMIN = "spiffe://cluster.local/ns/ops/sa/admin"


def policy(name, spec, namespace="prod", annotations=None):
    meta = {"name": name, "namespace": namespace}
    if annotations:
        meta["annotations"] = annotations
    import yaml

    return "---\n" + yaml.safe_dump(
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": meta,
            "spec": spec,
        }
    )


def decide(
    tmp_path, policies, *, src="10.1.0.5", identity=SLEEP, port=8080, dst=POD_IP, workload="web"
):
    path = tmp_path / "mesh.yaml"
    path.write_text(textwrap.dedent(BASE) + "".join(policies))
    mesh = load_mesh([path])
    target = next(w for w in mesh.workloads if w.name == workload)
    return Authorizer(mesh).authorize(target, connection(src, dst, port, identity))


ALLOW_SLEEP = {
    "action": "ALLOW",
    "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/prod/sa/sleep"]}}]}],
}

# (rule shown, policies, connection overrides, allowed)
CASES = [
    # --- evaluation order and empty forms
    ("no policy at all: allow", [], {}, True),
    (
        "spec: {} denies everything (an ALLOW that never matches)",
        [policy("deny-all", {})],
        {},
        False,
    ),
    ("rules: [{}] allows everything", [policy("allow-all", {"rules": [{}]})], {}, True),
    ("an ALLOW that matches allows", [policy("a", ALLOW_SLEEP)], {}, True),
    (
        "an ALLOW that does not match denies",
        [policy("a", ALLOW_SLEEP)],
        {"identity": OTHER_NS},
        False,
    ),
    (
        "any matching DENY wins over a matching ALLOW",
        [policy("a", {"rules": [{}]}), policy("d", {"action": "DENY", "rules": [{}]})],
        {},
        False,
    ),
    (
        "a DENY that does not match leaves the ALLOW decision",
        [
            policy("a", {"rules": [{}]}),
            policy(
                "d", {"action": "DENY", "rules": [{"to": [{"operation": {"ports": ["9090"]}}]}]}
            ),
        ],
        {},
        True,
    ),
    (
        "DENY alone: what it does not match is allowed",
        [policy("d", {"action": "DENY", "rules": [{"to": [{"operation": {"ports": ["9090"]}}]}]})],
        {},
        True,
    ),
    (
        "DENY alone: what it matches is denied",
        [policy("d", {"action": "DENY", "rules": [{"to": [{"operation": {"ports": ["9090"]}}]}]})],
        {"port": 9090},
        False,
    ),
    ("a DENY without rules never matches", [policy("d", {"action": "DENY"})], {}, True),
    (
        "several ALLOWs: any one matching allows",
        [
            policy("a1", {"rules": [{"to": [{"operation": {"ports": ["1"]}}]}]}),
            policy("a2", {"rules": [{"to": [{"operation": {"ports": ["8080"]}}]}]}),
        ],
        {},
        True,
    ),
    (
        "several ALLOWs: none matching denies",
        [
            policy("a1", {"rules": [{"to": [{"operation": {"ports": ["1"]}}]}]}),
            policy("a2", {"rules": [{"to": [{"operation": {"ports": ["2"]}}]}]}),
        ],
        {},
        False,
    ),
    # --- scope
    (
        "a policy of another namespace does not apply",
        [policy("deny-all", {}, namespace="dev")],
        {},
        True,
    ),
    (
        "a root-namespace policy without selector applies mesh-wide",
        [policy("deny-all", {}, namespace="istio-system")],
        {},
        False,
    ),
    (
        "a selector that matches the pod's labels applies",
        [policy("s", {"selector": {"matchLabels": {"app": "web"}}})],
        {},
        False,
    ),
    (
        "a selector that matches other pods does not apply",
        [policy("s", {"selector": {"matchLabels": {"app": "db"}}})],
        {},
        True,
    ),
    (
        "every selector label must match",
        [policy("s", {"selector": {"matchLabels": {"app": "web", "tier": "back"}}})],
        {},
        True,
    ),
    (
        "the policy applies to the pod it selects, not its neighbour",
        [policy("s", {"selector": {"matchLabels": {"app": "web"}}})],
        {"workload": "db", "dst": "10.0.0.11"},
        True,
    ),
    (
        "targetRefs policies belong to waypoints; ztunnel ignores them",
        [policy("wp", {"targetRefs": [{"kind": "Service", "group": "", "name": "web"}]})],
        {},
        True,
    ),
    # --- sources
    ("principal: exact match", [policy("a", ALLOW_SLEEP)], {}, True),
    (
        "principal: prefix*",
        [
            policy(
                "a",
                {"rules": [{"from": [{"source": {"principals": ["cluster.local/ns/prod/*"]}}]}]},
            )
        ],
        {},
        True,
    ),
    (
        "principal: prefix* not matching",
        [
            policy(
                "a",
                {"rules": [{"from": [{"source": {"principals": ["cluster.local/ns/prod/*"]}}]}]},
            )
        ],
        {"identity": OTHER_NS},
        False,
    ),
    (
        "principal: *suffix",
        [policy("a", {"rules": [{"from": [{"source": {"principals": ["*/sa/sleep"]}}]}]})],
        {"identity": OTHER_NS},
        True,
    ),
    (
        "principal: * requires an identity, and plaintext has none",
        [policy("a", {"rules": [{"from": [{"source": {"principals": ["*"]}}]}]})],
        {"identity": None},
        False,
    ),
    (
        "principal: * with any identity allows",
        [policy("a", {"rules": [{"from": [{"source": {"principals": ["*"]}}]}]})],
        {"identity": ADMIN},
        True,
    ),
    (
        "principal written with spiffe:// still matches",
        [policy("a", {"rules": [{"from": [{"source": {"principals": [SLEEP]}}]}]})],
        {},
        True,
    ),
    (
        "notPrincipals excludes",
        [
            policy(
                "a",
                {
                    "rules": [
                        {
                            "from": [
                                {"source": {"notPrincipals": ["cluster.local/ns/prod/sa/sleep"]}}
                            ]
                        }
                    ]
                },
            )
        ],
        {},
        False,
    ),
    (
        "notPrincipals lets others in",
        [
            policy(
                "a",
                {
                    "rules": [
                        {
                            "from": [
                                {"source": {"notPrincipals": ["cluster.local/ns/prod/sa/sleep"]}}
                            ]
                        }
                    ]
                },
            )
        ],
        {"identity": ADMIN},
        True,
    ),
    (
        "DENY notPrincipals: * blocks plaintext (no identity)",
        [
            policy(
                "d", {"action": "DENY", "rules": [{"from": [{"source": {"notPrincipals": ["*"]}}]}]}
            )
        ],
        {"identity": None},
        False,
    ),
    (
        "DENY notPrincipals: * lets mTLS through",
        [
            policy(
                "d", {"action": "DENY", "rules": [{"from": [{"source": {"notPrincipals": ["*"]}}]}]}
            )
        ],
        {},
        True,
    ),
    (
        "namespaces: exact",
        [policy("a", {"rules": [{"from": [{"source": {"namespaces": ["prod"]}}]}]})],
        {},
        True,
    ),
    (
        "namespaces: another namespace is not allowed",
        [policy("a", {"rules": [{"from": [{"source": {"namespaces": ["prod"]}}]}]})],
        {"identity": OTHER_NS},
        False,
    ),
    (
        "namespaces: plaintext has no namespace",
        [policy("a", {"rules": [{"from": [{"source": {"namespaces": ["prod"]}}]}]})],
        {"identity": None},
        False,
    ),
    (
        "notNamespaces excludes",
        [policy("a", {"rules": [{"from": [{"source": {"notNamespaces": ["dev"]}}]}]})],
        {"identity": OTHER_NS},
        False,
    ),
    (
        "notNamespaces admits plaintext (it is in no namespace)",
        [policy("a", {"rules": [{"from": [{"source": {"notNamespaces": ["dev"]}}]}]})],
        {"identity": None},
        True,
    ),
    (
        "serviceAccounts: ns/sa",
        [policy("a", {"rules": [{"from": [{"source": {"serviceAccounts": ["prod/sleep"]}}]}]})],
        {},
        True,
    ),
    (
        "serviceAccounts: bare name means the policy's namespace",
        [policy("a", {"rules": [{"from": [{"source": {"serviceAccounts": ["sleep"]}}]}]})],
        {"identity": OTHER_NS},
        False,
    ),
    (
        "notServiceAccounts excludes",
        [policy("a", {"rules": [{"from": [{"source": {"notServiceAccounts": ["prod/sleep"]}}]}]})],
        {},
        False,
    ),
    (
        "ipBlocks: CIDR contains the source",
        [policy("a", {"rules": [{"from": [{"source": {"ipBlocks": ["10.1.0.0/16"]}}]}]})],
        {},
        True,
    ),
    (
        "ipBlocks: single address",
        [policy("a", {"rules": [{"from": [{"source": {"ipBlocks": ["10.1.0.5"]}}]}]})],
        {},
        True,
    ),
    (
        "ipBlocks: outside the block",
        [policy("a", {"rules": [{"from": [{"source": {"ipBlocks": ["10.2.0.0/16"]}}]}]})],
        {},
        False,
    ),
    (
        "ipBlocks apply to plaintext too",
        [policy("a", {"rules": [{"from": [{"source": {"ipBlocks": ["10.1.0.0/16"]}}]}]})],
        {"identity": None},
        True,
    ),
    (
        "notIpBlocks excludes",
        [policy("a", {"rules": [{"from": [{"source": {"notIpBlocks": ["10.1.0.0/24"]}}]}]})],
        {},
        False,
    ),
    (
        "within a source the fields AND",
        [
            policy(
                "a",
                {
                    "rules": [
                        {
                            "from": [
                                {"source": {"namespaces": ["prod"], "ipBlocks": ["10.2.0.0/16"]}}
                            ]
                        }
                    ]
                },
            )
        ],
        {},
        False,
    ),
    (
        "within a field the values OR",
        [policy("a", {"rules": [{"from": [{"source": {"namespaces": ["dev", "prod"]}}]}]})],
        {},
        True,
    ),
    (
        "several from entries OR",
        [
            policy(
                "a",
                {
                    "rules": [
                        {
                            "from": [
                                {"source": {"namespaces": ["dev"]}},
                                {"source": {"ipBlocks": ["10.1.0.0/16"]}},
                            ]
                        }
                    ]
                },
            )
        ],
        {"identity": ADMIN},
        True,
    ),
    # --- operations
    (
        "ports: the target port matches",
        [policy("a", {"rules": [{"to": [{"operation": {"ports": ["8080"]}}]}]})],
        {},
        True,
    ),
    (
        "ports: another port does not",
        [policy("a", {"rules": [{"to": [{"operation": {"ports": ["8080"]}}]}]})],
        {"port": 9090},
        False,
    ),
    (
        "notPorts excludes",
        [policy("a", {"rules": [{"to": [{"operation": {"notPorts": ["8080"]}}]}]})],
        {},
        False,
    ),
    (
        "notPorts admits others",
        [policy("a", {"rules": [{"to": [{"operation": {"notPorts": ["8080"]}}]}]})],
        {"port": 9090},
        True,
    ),
    (
        "from and to AND within a rule",
        [
            policy(
                "a",
                {
                    "rules": [
                        {
                            "from": [{"source": {"namespaces": ["prod"]}}],
                            "to": [{"operation": {"ports": ["9090"]}}],
                        }
                    ]
                },
            )
        ],
        {},
        False,
    ),
    (
        "rules OR",
        [
            policy(
                "a",
                {
                    "rules": [
                        {"to": [{"operation": {"ports": ["9090"]}}]},
                        {"from": [{"source": {"namespaces": ["prod"]}}]},
                    ]
                },
            )
        ],
        {},
        True,
    ),
    # --- when
    (
        "when source.ip",
        [policy("a", {"rules": [{"when": [{"key": "source.ip", "values": ["10.1.0.0/16"]}]}]})],
        {},
        True,
    ),
    (
        "when source.ip notValues",
        [policy("a", {"rules": [{"when": [{"key": "source.ip", "notValues": ["10.1.0.5"]}]}]})],
        {},
        False,
    ),
    (
        "when source.namespace",
        [policy("a", {"rules": [{"when": [{"key": "source.namespace", "values": ["prod"]}]}]})],
        {},
        True,
    ),
    (
        "when source.principal",
        [
            policy(
                "a",
                {
                    "rules": [
                        {
                            "when": [
                                {"key": "source.principal", "values": ["cluster.local/ns/ops/*"]}
                            ]
                        }
                    ]
                },
            )
        ],
        {"identity": ADMIN},
        True,
    ),
    (
        "when destination.ip",
        [
            policy(
                "a", {"rules": [{"when": [{"key": "destination.ip", "values": ["10.0.0.0/24"]}]}]}
            )
        ],
        {},
        True,
    ),
    (
        "when destination.port",
        [policy("a", {"rules": [{"when": [{"key": "destination.port", "values": ["9090"]}]}]})],
        {},
        False,
    ),
    (
        "when conditions AND",
        [
            policy(
                "a",
                {
                    "rules": [
                        {
                            "when": [
                                {"key": "source.namespace", "values": ["prod"]},
                                {"key": "destination.port", "values": ["9090"]},
                            ]
                        }
                    ]
                },
            )
        ],
        {},
        False,
    ),
    # --- L7 fields at L4
    (
        "an ALLOW rule with HTTP methods never matches at L4",
        [policy("a", {"rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]})],
        {},
        False,
    ),
    (
        "an ALLOW with an L7 rule still allows by its L4-only rule",
        [
            policy(
                "a",
                {
                    "rules": [
                        {"to": [{"operation": {"methods": ["GET"]}}]},
                        {"from": [{"source": {"namespaces": ["prod"]}}]},
                    ]
                },
            )
        ],
        {},
        True,
    ),
    (
        "a DENY rule keeps its L4 part (port) and drops methods",
        [
            policy(
                "d",
                {
                    "action": "DENY",
                    "rules": [{"to": [{"operation": {"methods": ["POST"], "ports": ["8080"]}}]}],
                },
            )
        ],
        {},
        False,
    ),
    (
        "a DENY rule with only L7 fields denies everything at L4",
        [
            policy(
                "d", {"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/admin"]}}]}]}
            )
        ],
        {},
        False,
    ),
    (
        "a DENY rule with requestPrincipals keeps its namespace part",
        [
            policy(
                "d",
                {
                    "action": "DENY",
                    "rules": [
                        {"from": [{"source": {"requestPrincipals": ["*"], "namespaces": ["dev"]}}]}
                    ],
                },
            )
        ],
        {},
        True,
    ),
    (
        "an ALLOW with a request.headers condition never matches",
        [policy("a", {"rules": [{"when": [{"key": "request.headers[x-id]", "values": ["1"]}]}]})],
        {},
        False,
    ),
    # --- dry run and audit
    (
        "a dry-run DENY only logs",
        [policy("d", {"action": "DENY", "rules": [{}]}, annotations={"istio.io/dry-run": "true"})],
        {},
        True,
    ),
    (
        "a dry-run ALLOW does not make other traffic denied",
        [policy("a", ALLOW_SLEEP, annotations={"istio.io/dry-run": "true"})],
        {"identity": ADMIN},
        True,
    ),
    ("AUDIT only logs", [policy("au", {"action": "AUDIT", "rules": [{}]})], {}, True),
]


def decide_as_ztunnel(
    tmp_path, policies, *, src="10.1.0.5", identity=SLEEP, port=8080, dst=POD_IP, workload="web"
):
    """The same question through the compiled path: the ztunnel's inbound HBONE decision behind
    the core's table, asked twice from different peer ports (the second answer is the
    remembered one)."""
    path = tmp_path / "mesh.yaml"
    path.write_text(textwrap.dedent(BASE) + "".join(policies))
    mesh = load_mesh([path])
    target = next(w for w in mesh.workloads if w.name == workload)
    ztunnel = Ztunnel(target.node, None, None)  # type: ignore[arg-type]  # decisions only
    ztunnel.decide_on(mesh)
    table = ztunnel.remembered_decisions(target.uid)
    first = table.inbound(identity, f"{dst}:{port}", f"{src}:40001", [])
    again = table.inbound(identity, f"{dst}:{port}", f"{src}:40002", [])
    assert table.asked == 1
    assert (type(again), getattr(again, "reason", None)) == (
        type(first),
        getattr(first, "reason", None),
    )
    return again


@pytest.mark.parametrize(("rule", "policies", "conn", "allowed"), CASES, ids=[c[0] for c in CASES])
def test_policy_rule(tmp_path, rule, policies, conn, allowed):
    decision = decide(tmp_path, policies, **conn)
    assert decision.allowed is allowed, decision.reason


@pytest.mark.parametrize(("rule", "policies", "conn", "allowed"), CASES, ids=[c[0] for c in CASES])
def test_policy_rule_through_the_compiled_path(tmp_path, rule, policies, conn, allowed):
    verdict = decide_as_ztunnel(tmp_path, policies, **conn)
    assert isinstance(verdict, Allow if allowed else Deny), verdict


def test_the_deciding_policy_is_named(tmp_path):
    d = decide(
        tmp_path,
        [
            policy("a", {"rules": [{}]}),
            policy(
                "no-8080",
                {"action": "DENY", "rules": [{"to": [{"operation": {"ports": ["8080"]}}]}]},
            ),
        ],
    )
    assert (d.allowed, d.policy) == (False, "prod/no-8080")
    assert d.reason == "denied by policy prod/no-8080"


def test_dry_run_and_audit_matches_are_logged(tmp_path):
    d = decide(
        tmp_path,
        [
            policy(
                "d", {"action": "DENY", "rules": [{}]}, annotations={"istio.io/dry-run": "true"}
            ),
            policy("au", {"action": "AUDIT", "rules": [{}]}),
        ],
    )
    assert d.allowed and set(d.logged) == {
        "dry-run Deny policy prod/d matched",
        "audit Audit policy prod/au matched",
    }


def test_l7_fields_are_warned_about_naming_the_policy(tmp_path):
    path = tmp_path / "mesh.yaml"
    path.write_text(
        textwrap.dedent(BASE)
        + policy("get-only", {"rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]})
    )
    warnings = load_mesh([path]).warnings
    assert any("prod/get-only" in w and "never matches at L4" in w for w in warnings)


@pytest.mark.parametrize(
    ("spec", "field", "message"),
    [
        ({"action": "CUSTOM", "provider": {"name": "ext"}}, "spec.action", "external authorizer"),
        (
            {"rules": [{"to": [{"operation": {"ports": ["http"]}}]}]},
            "spec.rules[0].to[0].operation.ports",
            "port number",
        ),
        (
            {"rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.300/8"]}}]}]},
            "spec.rules[0].from[0].source.ipBlocks",
            "CIDR",
        ),
        (
            {"rules": [{"when": [{"key": "source.colour", "values": ["red"]}]}]},
            "spec.rules[0].when[0].key",
            "unknown condition key",
        ),
        ({"action": "MAYBE"}, "spec.action", "ALLOW"),
        ({"rules": [{"form": []}]}, "spec.rules[0].form", "unknown field"),
    ],
)
def test_policies_ambient_cannot_enforce_are_refused_naming_the_field(
    tmp_path, spec, field, message
):
    path = tmp_path / "mesh.yaml"
    path.write_text(textwrap.dedent(BASE) + policy("bad", spec))
    with pytest.raises(ConfigError) as refused:
        load_mesh([path])
    text = str(refused.value)
    assert "AuthorizationPolicy prod/bad" in text and field in text and message in text


def test_conversion_scopes(tmp_path):
    path = tmp_path / "mesh.yaml"
    path.write_text(
        textwrap.dedent(BASE)
        + policy("ns", {})
        + policy("mesh", {}, namespace="istio-system")
        + policy("sel", {"selector": {"matchLabels": {"app": "web"}}})
    )
    scopes = {p.name: (p.scope, p.action) for p in load_mesh([path]).policies}
    assert scopes == {
        "ns": (Scope.NAMESPACE, Action.ALLOW),
        "mesh": (Scope.GLOBAL, Action.ALLOW),
        "sel": (Scope.WORKLOAD_SELECTOR, Action.ALLOW),
    }


def test_local_config_policies_apply_by_namespace_and_by_name(tmp_path):
    path = tmp_path / "local.yaml"
    path.write_text(
        textwrap.dedent("""
        workloads:
        - uid: w
          name: w
          namespace: default
          workloadIps: [10.0.0.1]
          protocol: HBONE
          authorizationPolicies: [other/picked]
        policies:
        - {name: deny-9999, namespace: default, scope: Namespace, action: Deny, dryRun: false,
           rules: [[[{destinationPorts: [9999]}]]]}
        - {name: picked, namespace: other, scope: WorkloadSelector, action: Deny, dryRun: false,
           rules: [[[{principals: [!Exact cluster.local/ns/x/sa/bad]}]]]}
    """)
    )
    mesh = load_mesh([path])
    authz = Authorizer(mesh)
    w = mesh.workloads[0]
    assert not authz.authorize(w, connection("10.0.0.2", "10.0.0.1", 9999)).allowed
    assert authz.authorize(w, connection("10.0.0.2", "10.0.0.1", 80)).allowed
    assert not authz.authorize(
        w, connection("10.0.0.2", "10.0.0.1", 80, "spiffe://cluster.local/ns/x/sa/bad")
    ).allowed


# tests/unit/vectors/ztunnel-local.yaml: `shop/all-but-9999` allows all but port 9999;
# `shop/strangers` denies, one rule each, with every string-match tag in every string-match field.
LOCAL_VECTOR_CART = "127.0.0.11"  # the HBONE workload cart-7d4f, in namespace shop


@pytest.mark.parametrize(
    ("identity", "port", "decided_by"),
    [
        pytest.param(None, 8080, "allowed by policy shop/all-but-9999", id="plaintext allowed"),
        pytest.param(
            "spiffe://cluster.local/ns/shop/sa/legacy",
            9999,
            "no ALLOW policy matched",
            id="notDestinationPorts: the one port the ALLOW leaves out",
        ),
        pytest.param(
            "spiffe://cluster.local/ns/attic/sa/x",
            8080,
            "denied by policy shop/strangers",
            id="principals !Prefix: in the attic namespace",
        ),
        pytest.param(
            "spiffe://cluster.local/ns/attic-annex/sa/x",
            8080,
            "allowed by policy shop/all-but-9999",
            id="principals !Prefix: the prefix ends with its slash",
        ),
        pytest.param(
            "spiffe://cluster.local/ns/quarantine/sa/x",
            8080,
            "denied by policy shop/strangers",
            id="namespaces !Exact: that namespace",
        ),
        pytest.param(
            "spiffe://cluster.local/ns/quarantine2/sa/x",
            8080,
            "allowed by policy shop/all-but-9999",
            id="namespaces !Exact: not one that starts the same",
        ),
        pytest.param(
            "spiffe://cluster.local/ns/other/sa/intruder",
            8080,
            "denied by policy shop/strangers",
            id="principals !Suffix: that service account elsewhere",
        ),
        pytest.param(
            "spiffe://cluster.local/ns/shop/sa/intruder",
            8080,
            "allowed by policy shop/all-but-9999",
            id="notNamespaces !Exact: the same account in shop is spared",
        ),
        pytest.param(
            None,
            8443,
            "denied by policy shop/strangers",
            id="notPrincipals !Presence: no identity, to 8443",
        ),
        pytest.param(
            "spiffe://cluster.local/ns/shop/sa/legacy",
            8443,
            "allowed by policy shop/all-but-9999",
            id="notPrincipals !Presence: an identity, to 8443",
        ),
        pytest.param(
            "spiffe://cluster.local/ns/shop/sa/legacy",
            7070,
            "denied by policy shop/strangers",
            id="namespaces !Presence []: an identity, to 7070",
        ),
        pytest.param(
            None,
            7070,
            "allowed by policy shop/all-but-9999",
            id="namespaces !Presence []: no identity, to 7070",
        ),
    ],
)
def test_local_config_string_match_tags_decide_as_istio_reads_them(identity, port, decided_by):
    mesh = load_mesh([Path(__file__).parent / "vectors" / "ztunnel-local.yaml"])
    cart = mesh.workload_by_ip(ipaddress.ip_address(LOCAL_VECTOR_CART))
    decision = Authorizer(mesh).authorize(
        cart, connection("127.0.0.99", LOCAL_VECTOR_CART, port, identity)
    )
    assert decision.reason == decided_by
    assert decision.allowed is decided_by.startswith("allowed")


def test_indexed_evaluation_agrees_with_plain_evaluation(tmp_path):
    """The index only narrows which rules are evaluated; results equal evaluating them all."""
    import random

    rng = random.Random(5)
    specs = []
    for i in range(120):
        kind = rng.choice(["principal", "namespace", "port", "ip", "mixed"])
        action = rng.choice(["ALLOW", "DENY"])
        if kind == "principal":
            rule = {
                "from": [{"source": {"principals": [f"cluster.local/ns/n{i % 7}/sa/s{i % 5}"]}}]
            }
        elif kind == "namespace":
            rule = {"from": [{"source": {"namespaces": [f"n{i % 7}"]}}]}
        elif kind == "port":
            rule = {"to": [{"operation": {"ports": [str(8000 + i % 9)]}}]}
        elif kind == "ip":
            rule = {
                "from": [{"source": {"ipBlocks": [f"10.{i % 4}.0.0/{rng.choice([8, 16, 24])}"]}}]
            }
        else:
            rule = {
                "from": [{"source": {"notNamespaces": [f"n{i % 7}"]}}],
                "to": [{"operation": {"notPorts": [str(8000 + i % 9)]}}],
            }
        specs.append(policy(f"p{i}", {"action": action, "rules": [rule]}))
    path = tmp_path / "mesh.yaml"
    path.write_text(textwrap.dedent(BASE) + "".join(specs))
    mesh = load_mesh([path])
    web = next(w for w in mesh.workloads if w.name == "web")
    compiled = Authorizer(mesh).policy_set(web)
    for _ in range(500):
        identity = rng.choice(
            [None, f"spiffe://cluster.local/ns/n{rng.randrange(8)}/sa/s{rng.randrange(6)}"]
        )
        conn = connection(
            f"10.{rng.randrange(5)}.{rng.randrange(3)}.7",
            POD_IP,
            8000 + rng.randrange(10),
            identity,
        )
        verdicts = dict(PolicySet(compiled.policies).explain(conn))
        any_deny = any(v == "deny" for v in verdicts.values())
        allow_policies = [p for p in compiled.policies if p.action is Action.ALLOW]
        expected = not any_deny and (
            not allow_policies or any(verdicts[p.key] == "allow" for p in allow_policies)
        )
        assert compiled.evaluate(conn).allowed is expected, (conn, compiled.evaluate(conn))
