"""The config layer: what Istio users write becomes the mesh model as istiod would build it; every
malformed file is refused with the file, document, object and field named."""

from __future__ import annotations

import io
import ipaddress
import shutil
import sys
import textwrap
from pathlib import Path

import pytest

from ambient.config import ConfigError, load_mesh, yamlfile
from ambient.mesh import HealthStatus, Protocol
from ambient.policy.model import Action, Match, MatchKind, Scope, StringMatch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import generate_mesh  # noqa: E402

# ambient's own vector in the shape of Istio ztunnel's local config (see the file's header).
ZTUNNEL_LOCAL = Path(__file__).parent / "vectors" / "ztunnel-local.yaml"


def write(tmp_path: Path, text: str, name: str = "mesh.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


NAMESPACE = """
apiVersion: v1
kind: Namespace
metadata: {name: default, labels: {istio.io/dataplane-mode: ambient}}
"""


def pod(name: str, ip: str, labels: str = "{app: x}", extra: str = "") -> str:
    return f"""
---
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: default, labels: {labels}}}
spec: {{nodeName: n1, serviceAccountName: {name}-sa{extra}}}
status: {{podIP: {ip}}}
"""


# --- translation ------------------------------------------------------------------------------


def test_a_local_config_in_ztunnels_shape_is_accepted_as_is():
    mesh = load_mesh([ZTUNNEL_LOCAL])
    assert mesh.warnings == ()
    cart, legacy = mesh.workloads
    assert (cart.uid, cart.name, cart.namespace, cart.node) == (
        "cluster1//v1/Pod/shop/cart-7d4f",
        "cart-7d4f",
        "shop",
        "node-a",
    )
    assert (cart.protocol, legacy.protocol) == (Protocol.HBONE, Protocol.TCP)
    assert cart.ips == (ipaddress.ip_address("127.0.0.11"),)
    assert legacy.ips == (ipaddress.ip_address("127.0.0.12"),)
    assert str(cart.identity) == "spiffe://cluster.local/ns/shop/sa/cart"
    assert str(legacy.identity) == "spiffe://cluster.local/ns/shop/sa/legacy"
    assert (cart.canonical_name, cart.canonical_revision) == ("cart", "v2")
    assert mesh.workload_by_ip(ipaddress.ip_address("127.0.0.12")) is legacy

    cart_svc = mesh.service_by_hostname("cart.shop.svc.cluster.local")
    assert (cart_svc.name, cart_svc.namespace) == ("cart", "shop")
    # `/127.10.1.1` is the default (empty) network; `edge/127.10.1.2` a named one.
    assert cart_svc.vips == (("", ipaddress.ip_address("127.10.1.1")),)
    assert dict(cart_svc.ports) == {80: 8080}
    assert cart_svc.subject_alt_names == ("spiffe://cluster.local/ns/shop/sa/cart",)
    # Each endpoint keeps the target port its workload's `services` map gives.
    assert {e.workload_uid: dict(e.ports) for e in cart_svc.endpoints} == {
        cart.uid: {80: 8080},
        legacy.uid: {80: 9090},
    }
    search = mesh.service_by_vip(ipaddress.ip_address("127.10.1.2"))
    assert search is mesh.service_by_hostname("search.example.org")
    assert search.vips == (("edge", ipaddress.ip_address("127.10.1.2")),)
    assert dict(search.ports) == {443: 8443}
    assert search.subject_alt_names == ()
    assert {e.workload_uid: dict(e.ports) for e in search.endpoints} == {cart.uid: {443: 8443}}

    allow, deny = mesh.policies
    assert (allow.key, allow.action, allow.scope, allow.dry_run) == (
        "shop/all-but-9999",
        Action.ALLOW,
        Scope.NAMESPACE,
        False,
    )
    assert allow.rules == (((Match(not_destination_ports=(9999,)),),),)
    assert (deny.key, deny.action, deny.scope, deny.dry_run) == (
        "shop/strangers",
        Action.DENY,
        Scope.NAMESPACE,
        False,
    )
    # One rule per line of the file, each one clause of one match; the tags become matches.
    assert [rule[0][0] for rule in deny.rules] == [
        Match(principals=(StringMatch(MatchKind.PREFIX, "cluster.local/ns/attic/"),)),
        Match(namespaces=(StringMatch(MatchKind.EXACT, "quarantine"),)),
        Match(
            principals=(StringMatch(MatchKind.SUFFIX, "/sa/intruder"),),
            not_namespaces=(StringMatch(MatchKind.EXACT, "shop"),),
        ),
        Match(not_principals=(StringMatch(MatchKind.PRESENCE),), destination_ports=(8443,)),
        Match(namespaces=(StringMatch(MatchKind.PRESENCE),), destination_ports=(7070,)),
    ]
    # What these policies let through is tested in test_policy.py, on the same file.


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        ("!Exact cluster.local/ns/a/sa/b", StringMatch(MatchKind.EXACT, "cluster.local/ns/a/sa/b")),
        ("!Prefix 'cluster.local/ns/a/'", StringMatch(MatchKind.PREFIX, "cluster.local/ns/a/")),
        ('!Suffix "/sa/b"', StringMatch(MatchKind.SUFFIX, "/sa/b")),
        # serde_yaml reads any scalar's text as the string: no number, no null.
        ("!Exact 80", StringMatch(MatchKind.EXACT, "80")),
        ("!Exact null", StringMatch(MatchKind.EXACT, "null")),
        ("!Exact", StringMatch(MatchKind.EXACT, "")),
        # Istio's `Presence()` is an empty tuple variant: no value, or an empty sequence.
        ("!Presence", StringMatch(MatchKind.PRESENCE)),
        ("!Presence []", StringMatch(MatchKind.PRESENCE)),
    ],
)
def test_string_matches_are_read_as_ztunnels_serde_yaml_reads_them(tmp_path, written, expected):
    text = f"""
policies:
- name: p
  namespace: default
  scope: Global
  action: Deny
  dryRun: false
  rules:
  - - - principals:
        - {written}
        notPrincipals:
        - {written}
        namespaces:
        - {written}
        notNamespaces:
        - {written}
"""
    (policy,) = load_mesh([write(tmp_path, text)]).policies
    assert policy.rules == (
        (
            (
                Match(
                    principals=(expected,),
                    not_principals=(expected,),
                    namespaces=(expected,),
                    not_namespaces=(expected,),
                ),
            ),
        ),
    )


def test_the_loader_never_builds_python_objects(tmp_path):
    made = tmp_path / "made-by-yaml"
    path = write(tmp_path, f"!!python/object/apply:os.mkdir [{made}]\n")
    with pytest.raises(ConfigError, match="unknown YAML tag !!python/object/apply:os.mkdir"):
        load_mesh([path])
    assert not made.exists()


def test_namespace_and_pod_labels_decide_who_is_in_the_mesh(tmp_path):
    text = (
        NAMESPACE
        + pod("in-by-namespace", "10.0.0.1")
        + pod("out-by-label", "10.0.0.2", "{app: x, istio.io/dataplane-mode: none}")
        + """
---
apiVersion: v1
kind: Namespace
metadata: {name: other}
---
apiVersion: v1
kind: Pod
metadata: {name: in-by-label, namespace: other, labels: {istio.io/dataplane-mode: ambient}}
spec: {nodeName: n2}
status: {podIP: 10.0.1.1}
---
apiVersion: v1
kind: Pod
metadata: {name: plain, namespace: other}
spec: {nodeName: n2}
status: {podIP: 10.0.1.2}
"""
    )
    mesh = load_mesh([write(tmp_path, text)])
    modes = {w.name: w.protocol for w in mesh.workloads}
    assert modes == {
        "in-by-namespace": Protocol.HBONE,  # namespace label
        "out-by-label": Protocol.TCP,  # the pod's `none` beats its namespace's `ambient`
        "in-by-label": Protocol.HBONE,  # the pod's own label
        "plain": Protocol.TCP,  # neither
    }
    w = mesh.workload_by_ip(ipaddress.ip_address("10.0.0.1"))
    assert str(w.identity) == "spiffe://cluster.local/ns/default/sa/in-by-namespace-sa"
    assert w.node == "n1"
    assert str(mesh.workload_by_ip(ipaddress.ip_address("10.0.1.2")).identity).endswith(
        "sa/default"
    )


def test_service_endpoints_come_from_the_selector_and_named_ports(tmp_path):
    text = (
        NAMESPACE
        + pod(
            "a",
            "10.0.0.1",
            "{app: web}",
            ", containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]",
        )
        + pod(
            "b",
            "10.0.0.2",
            "{app: web}",
            ", containers: [{name: c, ports: [{name: http, containerPort: 9090}]}]",
        )
        + pod("c", "10.0.0.3", "{app: db}")
        + """
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: http}
  - {name: admin, port: 81, targetPort: 9901}
  - {name: same, port: 82}
"""
    )
    mesh = load_mesh([write(tmp_path, text)])
    web = mesh.service_by_vip(ipaddress.ip_address("10.96.0.10"))
    assert web.hostname == "web.default.svc.cluster.local"
    by_pod = {mesh.workload_by_uid(e.workload_uid).name: dict(e.ports) for e in web.endpoints}
    assert by_pod == {"a": {80: 8080, 81: 9901, 82: 82}, "b": {80: 9090, 81: 9901, 82: 82}}


def test_unready_pods_are_unhealthy_and_pods_without_ip_are_not_workloads_yet(tmp_path):
    text = (
        NAMESPACE
        + """
---
apiVersion: v1
kind: Pod
metadata: {name: starting, namespace: default}
status: {conditions: [{type: Ready, status: "False"}], podIP: 10.0.0.5}
---
apiVersion: v1
kind: Pod
metadata: {name: pending, namespace: default}
"""
    )
    mesh = load_mesh([write(tmp_path, text)])
    (w,) = mesh.workloads
    assert w.status is HealthStatus.UNHEALTHY
    assert any("pending" in warning and "no status.podIP" in warning for warning in mesh.warnings)


def test_kinds_ambient_does_not_use_are_ignored_with_a_warning(tmp_path):
    text = (
        NAMESPACE
        + """
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: default}
spec: {replicas: 3}
"""
    )
    mesh = load_mesh([write(tmp_path, text)])
    assert any("kind Deployment" in w and "ignored" in w for w in mesh.warnings)


def test_real_manifests_with_fields_ambient_ignores_load(tmp_path):
    text = (
        NAMESPACE
        + """
---
apiVersion: v1
kind: Pod
metadata:
  name: full
  namespace: default
  uid: 0f3c
  ownerReferences: [{kind: ReplicaSet, name: full-abc}]
spec:
  nodeName: n1
  restartPolicy: Always
  volumes: [{name: data, emptyDir: {}}]
  containers:
  - name: app
    image: nginx
    resources: {limits: {cpu: 100m}}
    ports: [{containerPort: 80, protocol: TCP}]
status:
  phase: Running
  podIP: 10.0.0.7
  podIPs: [{ip: 10.0.0.7}, {ip: "fd00::7"}]
"""
    )
    mesh = load_mesh([write(tmp_path, text)])
    assert mesh.workloads[0].ips == (
        ipaddress.ip_address("10.0.0.7"),
        ipaddress.ip_address("fd00::7"),
    )


def local_policy(match: str) -> str:
    """ztunnel's local config with one policy whose only match is ``match`` (on line 8)."""
    return f"""
policies:
- name: p
  namespace: default
  scope: Namespace
  action: Allow
  dryRun: false
  rules: [[[{{{match}}}]]]
"""


# --- refusals: at least ten kinds of malformed input, each naming the field --------------------

MALFORMED = [
    pytest.param(
        NAMESPACE + pod("a", "10.0.0.300"),
        ["document 2", "Pod default/a", "status.podIP", "10.0.0.300"],
        id="bad pod IP",
    ),
    pytest.param(
        NAMESPACE + pod("a", "10.0.0.1").replace("nodeName: n1", "nodeName: [n1]"),
        ["Pod default/a", "spec.nodeName", "string"],
        id="wrong type",
    ),
    pytest.param(
        NAMESPACE + pod("a", "10.0.0.1").replace("metadata:", "metdata: {}\nmetadata:"),
        ["Pod default/a", "metdata", "unknown field"],
        id="unknown top-level field",
    ),
    pytest.param(
        NAMESPACE + pod("a", "10.0.0.1").replace("labels:", "lables:"),
        ["metadata.lables", "unknown field"],
        id="unknown metadata field",
    ),
    pytest.param(
        NAMESPACE + pod("a", "10.0.0.1").replace(", namespace: default", ""),
        ["Pod a", "metadata.namespace", "required field is missing"],
        id="missing namespace",
    ),
    pytest.param(
        NAMESPACE + pod("a", "10.0.0.1") + pod("b", "10.0.0.1"),
        ["Pod default/b", "duplicate workload IP '/10.0.0.1'", "first at"],
        id="duplicate pod IP",
    ),
    pytest.param(
        NAMESPACE + pod("a", "10.0.0.1") + pod("a", "10.0.0.2"),
        ["document 3", "duplicate object 'Pod default/a'"],
        id="duplicate pod",
    ),
    pytest.param(
        NAMESPACE
        + """
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec: {clusterIP: 10.96.0.1, ports: [{port: 70000}]}
""",
        ["Service default/web", "spec.ports[0].port", "expected an integer <= 65535, got 70000"],
        id="port out of range",
    ),
    pytest.param(
        NAMESPACE
        + """
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec: {clusterIP: 10.96.0.1, ports: [{port: 80, targetPort: Not_A_Name}]}
""",
        ["spec.ports[0].targetPort"],
        id="bad named targetPort",
    ),
    pytest.param(
        """
workloads:
- uid: w1
  namespace: default
  workloadIps: [10.0.0.1]
- uid: w1
  namespace: default
  workloadIps: [10.0.0.2]
""",
        ["ztunnel local config", "duplicate workload uid 'w1'"],
        id="duplicate uid (local config)",
    ),
    pytest.param(
        """
workloads:
- namespace: default
  workloadIps: [10.0.0.1]
  protocol: HBONE
  serviceAcount: typo
""",
        ["workloads[0].serviceAcount", "unknown field"],
        id="unknown field (local config)",
    ),
    pytest.param(
        """
workloads:
- workloadIps: [10.0.0.1]
""",
        ["workloads[0].namespace", "required field is missing"],
        id="missing namespace (local config)",
    ),
    pytest.param(
        """
workloads:
- namespace: default
  workloadIps: [10.0.0.1]
  protocol: QUIC
""",
        ["workloads[0].protocol", "'HBONE' or 'TCP'"],
        id="bad protocol (local config)",
    ),
    pytest.param(
        """
services:
- name: s
  namespace: default
  hostname: s.default.svc.cluster.local
  vips: [10.96.0.1]
  ports: {80: 8080}
""",
        ["services[0].vips[0]", "expected 'network/ip'"],
        id="VIP without network (local config)",
    ),
    pytest.param(
        local_policy("principals: [{Exact: cluster.local/ns/a/sa/b}]"),
        [
            "policies[0].rules[0][0][0].principals[0]",
            "`!Exact cluster.local/ns/a/sa/b`",
            "refuses the map form",
        ],
        id="map-form string match (local config; Istio refuses it)",
    ),
    pytest.param(
        local_policy("notNamespaces: [{Presence: {}}]"),
        ["policies[0].rules[0][0][0].notNamespaces[0]", "`!Presence`", "refuses the map form"],
        id="map-form presence (local config)",
    ),
    pytest.param(
        local_policy("namespaces: [{Exact: a, Prefix: b}]"),
        ["policies[0].rules[0][0][0].namespaces[0]", "expected a string match: `!Exact value`"],
        id="two kinds in one match (local config)",
    ),
    pytest.param(
        local_policy("notPrincipals: [cluster.local/ns/a/sa/b]"),
        ["policies[0].rules[0][0][0].notPrincipals[0]", "`!Exact cluster.local/ns/a/sa/b`"],
        id="untagged string match (local config)",
    ),
    pytest.param(
        local_policy("principals: [!Regex 'cluster.local/.*']"),
        ["policies[0].rules[0][0][0].principals[0]", "unknown tag !Regex (line 8)"],
        id="unknown string-match tag (local config)",
    ),
    pytest.param(
        local_policy("namespaces: [!Presence null]"),
        ["policies[0].rules[0][0][0].namespaces[0]", "!Presence takes no value (line 8)"],
        id="presence with a value (local config)",
    ),
    pytest.param(
        local_policy("namespaces: [!Presence {}]"),
        ["policies[0].rules[0][0][0].namespaces[0]", "!Presence takes no value"],
        id="presence with a mapping (local config)",
    ),
    pytest.param(
        local_policy("principals: [!Exact [a, b]]"),
        ["policies[0].rules[0][0][0].principals[0]", "!Exact takes a string (line 8)"],
        id="exact with a sequence (local config)",
    ),
    pytest.param(
        local_policy("destinationPorts: [!Exact 80]"),
        [
            "policies[0].rules[0][0][0].destinationPorts[0]",
            "the tag !Exact (line 8) marks a string match",
        ],
        id="string-match tag on a port (local config)",
    ),
    pytest.param(
        "workloads:\n- {namespace: !Prefix default, workloadIps: [10.0.0.1]}\n",
        ["workloads[0].namespace", "the tag !Prefix (line 2) marks a string match"],
        id="string-match tag outside a policy (local config)",
    ),
    pytest.param(
        NAMESPACE + pod("a", "10.0.0.1", "{app: !Exact web}"),
        ["Pod default/a", "metadata.labels.app", "the tag !Exact (line 9) marks a string match"],
        id="string-match tag in a Kubernetes object",
    ),
    pytest.param(
        NAMESPACE + pod("a", "10.0.0.1", "!Labels {app: web}"),
        ["Pod default/a", "metadata.labels", "unknown YAML tag !Labels (line 9)"],
        id="unknown tag in a Kubernetes object",
    ),
    pytest.param(
        "!!python/object/apply:os.getcwd []\n",
        ["document 1", "unknown YAML tag !!python/object/apply:os.getcwd (line 1)"],
        id="Python tag (never constructed)",
    ),
    pytest.param(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: default\n",
        ["line", "invalid YAML"],
        id="YAML syntax error",
    ),
    pytest.param("\n\n", ["the file is empty"], id="empty file (half-written?)"),
    # Found by tests/unit/test_fuzz_config.py: each was a ValueError or RecursionError escaping.
    pytest.param(
        "apiVersion: v1\nkind: Pod\nmetadata: {creationTimestamp: 2001-02-30}\n",
        [
            "line 3, column 31",
            "'2001-02-30' is not a valid !!timestamp value (day is out of range for month)",
        ],
        id="impossible date",
    ),
    pytest.param(
        "workloads: [{namespace: a, workloadIps: [!!int x]}]\n",
        ["line 1, column 42", "'x' is not a valid !!int value"],
        id="explicit tag its value cannot have",
    ),
    pytest.param(
        "workloads: " + "[" * 200 + "]" * 200 + "\n",
        ["line 1, column 139", "nested deeper than 128 levels"],
        id="nested deeper than serde_yaml allows",
    ),
    pytest.param(
        "hello: world\n",
        ["expected a Kubernetes object", "ztunnel's local config"],
        id="neither format",
    ),
    pytest.param(
        NAMESPACE
        + """
---
apiVersion: v1
kind: Pod
metadata:
  name: a
  namespace: default
  annotations: {ambient.dev/app-address: not-an-ip}
status: {podIP: 10.0.0.1}
""",
        ["ambient.dev/app-address", "not-an-ip"],
        id="bad app address annotation",
    ),
]


@pytest.fixture(
    params=[
        "core",
        pytest.param(
            "CMeshLoader",
            marks=pytest.mark.skipif(not yamlfile.FAST, reason="PyYAML was built without libyaml"),
        ),
        "PureMeshLoader",
    ]
)
def yaml_loader(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each way mesh files can be read in turn (ambient.config.yamlfile): the core's fast path
    (with PyYAML behind it), and each PyYAML loader alone."""
    if request.param != "core":
        monkeypatch.setattr(yamlfile, "CORE", False)
        monkeypatch.setattr(yamlfile, "MeshLoader", getattr(yamlfile, request.param))
    return str(request.param)


@pytest.mark.parametrize(("text", "expected"), MALFORMED)
def test_malformed_config_is_refused_naming_the_field(tmp_path, text, expected, yaml_loader):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as refused:
        load_mesh([path])
    message = str(refused.value)
    assert str(path) in message
    for part in expected:
        assert part in message, f"{part!r} not in:\n{message}"


def test_a_file_that_is_not_utf8_is_refused_naming_the_byte(tmp_path):
    path = tmp_path / "mesh.yaml"
    path.write_bytes("workloads: []\n# caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError) as refused:
        load_mesh([path])
    assert str(refused.value) == (
        f"{path}: not UTF-8 text: byte 0xe9 at offset 19 (invalid continuation byte)"
    )


def test_every_error_of_every_file_is_reported_at_once(tmp_path):
    first = write(tmp_path, NAMESPACE + pod("a", "10.0.0.300"), "first.yaml")
    second = write(
        tmp_path,
        "workloads:\n"
        "- {workloadIps: [nope]}\n"
        "- {namespace: a, workloadIps: [10.0.0.1], protocol: QUIC, serviceAcount: x}\n",
        "second.yaml",
    )
    with pytest.raises(ConfigError) as refused:
        load_mesh([first, second, tmp_path / "missing.yaml"])
    assert [(Path(i.location.file).name, i.field, i.message) for i in refused.value.issues] == [
        ("first.yaml", "status.podIP", "expected an IPv4 or IPv6 address, got '10.0.0.300'"),
        # A required field is wrong: that object's other errors would follow from it.
        (
            "second.yaml",
            "workloads[0].workloadIps[0]",
            "expected an IPv4 or IPv6 address, got 'nope'",
        ),
        # Optional fields and unknown ones: each is reported and the object read further.
        ("second.yaml", "workloads[1].protocol", "expected 'HBONE' or 'TCP', got 'QUIC'"),
        ("second.yaml", "workloads[1].serviceAcount", "unknown field"),
        ("missing.yaml", "", "cannot read: No such file or directory"),
    ]


def test_config_check_command_summarises_or_lists_errors(tmp_path, capsys):
    from ambient.cli import main

    good = tmp_path / "good.yaml"
    shutil.copy(ZTUNNEL_LOCAL, good)
    assert main(["config", "check", str(good)]) == 0
    out = capsys.readouterr().out
    assert "valid" in out and "1 in the mesh (HBONE), 1 outside (TCP)" in out
    bad = write(tmp_path, NAMESPACE + pod("a", "10.0.0.300") + pod("b", "10.0.0.1000"), "bad.yaml")
    assert main(["config", "check", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.count("error:") == 2 and "2 error(s)" in err


def test_config_check_summarises_a_large_mesh_and_lists_it_all_on_request(tmp_path, capsys):
    from ambient.cli import main

    path = tmp_path / "big.yaml"
    text = io.StringIO()
    generate_mesh.write(text, pods=300, services=60, policies=50, seed=1)
    path.write_text(text.getvalue())
    assert main(["config", "check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "workloads: 300 — 300 in the mesh (HBONE), 0 outside (TCP)" in out
    assert "... and 280 more workloads in the mesh (--all lists them)" in out
    assert "... and 40 more services" in out and "... and 30 more policies" in out
    assert out.count(" as spiffe://") == 20
    assert main(["config", "check", "--all", str(path)]) == 0
    everything = capsys.readouterr().out
    assert everything.count(" as spiffe://") == 300 and "more" not in everything
    assert everything.count(" endpoint(s)") == 60


def test_local_config_fields_istio_reads_differently_are_warned_about(tmp_path):
    """A local-config workload without `services`, `trustDomain` or `serviceAccount` loads, with a
    warning for each: Istio's ztunnel refuses the first and leaves the others empty (found
    running both on one file)."""
    text = "workloads:\n- {uid: u1, name: a, namespace: default, workloadIps: [10.1.1.1]}\n"
    mesh = load_mesh([write(tmp_path, text)])
    notes = [w for w in mesh.warnings if "workloads[0] (a)" in w]
    assert len(notes) == 3
    assert any("no `services`: Istio's ztunnel refuses the file" in w for w in notes)
    assert any("no `trustDomain`" in w and "spiffe:///" in w for w in notes)
    assert any("no `serviceAccount`" in w for w in notes)
    complete = (
        "workloads:\n- {uid: u1, name: a, namespace: default, workloadIps: [10.1.1.1],"
        " services: {}, trustDomain: cluster.local, serviceAccount: a}\n"
    )
    assert not load_mesh([write(tmp_path, complete)]).warnings
