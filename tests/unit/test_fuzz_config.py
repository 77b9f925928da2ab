"""Fuzzing the config loader: whatever a mesh file holds, ``load_mesh`` returns a mesh or raises
:class:`ConfigError` whose every issue names the file -- never another exception.

Four generators, each bounded so the set runs in a few seconds: raw bytes, YAML-ish text built
from YAML's own punctuation and the words of mesh files, documents shaped like the models
(Kubernetes kinds and ztunnel's local config, with values of random types, tags included), and
valid meshes with one part replaced, removed or added. ``AMBIENT_FUZZ_SCALE=10`` runs ten times
as many examples.
"""

from __future__ import annotations

import copy
import os
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

from ambient import examples
from ambient.config import ConfigError, load_mesh
from ambient.config import kubernetes as k8s
from ambient.config import ztunnel_local as local
from ambient.config.tags import Tagged
from ambient.config.types import IPAddress, IPNetwork
from ambient.config.yamlfile import MeshLoader
from ambient.mesh import Mesh

SCALE = int(os.environ.get("AMBIENT_FUZZ_SCALE", "1"))
VECTOR = Path(__file__).parent / "vectors" / "ztunnel-local.yaml"


def fuzz_settings(examples: int) -> settings:
    return settings(
        max_examples=examples * SCALE,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


def load_or_refuse(path: Path) -> Mesh | None:
    """The property every generator checks: a mesh, or a ConfigError saying where."""
    try:
        return load_mesh([path])
    except ConfigError as e:
        assert e.issues, "a ConfigError lists at least one issue"
        for issue in e.issues:
            assert issue.location.file == str(path), issue
            assert str(issue).startswith(str(path)) and issue.message, issue
        return None


# --- 1. bytes and YAML-ish text --------------------------------------------------------------

WORDS = [
    # YAML's own syntax
    *["- ", ": ", "? ", ", ", "[", "]", "{", "}", "'", '"', "|", ">-", "#", "&a ", "*a", "<<: "],
    *["---\n", "...\n", "%YAML 1.1\n", "%TAG ! tag:x,1:\n", "\n", "\n  ", "\n    - ", "\t", " "],
    *["!Exact ", "!Prefix ", "!Suffix ", "!Presence", "!Foo ", "!!int ", "!!str ", "!!binary "],
    *["!!timestamp ", "!!float ", "!!set ", "!!omap ", "!!python/object:os.system ", "! "],
    # scalars YAML resolves to something other than a string, valid and not
    *["null", "~", "true", "no", "0x1f", "0x_", "0o7", "1_000", "1e400", ".nan", "-.inf", "-1"],
    *["2001-02-30", "2001-12-14t21:59:43.10-05:00", "9" * 40, "é", "\x00", "\ufeff", "\x85"],
    # the words of mesh files
    *["workloads:", "services:", "policies:", "apiVersion: v1", "kind: Pod", "kind: Service"],
    *["kind: Namespace", "kind: AuthorizationPolicy", "kind: Gateway", "metadata:", "spec:"],
    *["status:", "name: a", "namespace: default", "podIP: ", "podIPs:", "workloadIps:", "vips:"],
    *["ports:", "rules:", "principals:", "notNamespaces:", "from:", "source:", "labels:"],
    *["10.0.0.1", "/10.0.0.1", "net/fd00::1", "default/a.svc", "HBONE", "TCP", "80", "65536"],
    *["Allow", "Deny", "Namespace", "istio.io/dataplane-mode: ambient", "istio-waypoint"],
]
yamlish = st.lists(
    st.one_of(st.sampled_from(WORDS), st.text(max_size=4)), min_size=1, max_size=40
).map("".join)


@fuzz_settings(150)
@given(data=st.binary(min_size=1, max_size=200))
def test_any_bytes_load_or_are_refused_naming_the_file(tmp_path, data):
    path = tmp_path / "mesh.yaml"
    path.write_bytes(data)
    load_or_refuse(path)


@fuzz_settings(400)
@given(text=yamlish)
def test_yamlish_text_loads_or_is_refused_naming_the_file(tmp_path, text):
    path = tmp_path / "mesh.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    load_or_refuse(path)


# --- 2. documents shaped like the models, with values of any type ----------------------------


class _Dumper(yaml.SafeDumper):
    """Writes :class:`Tagged` values back as the tagged YAML nodes they were read from."""


def _represent_tagged(dumper: yaml.SafeDumper, t: Tagged) -> yaml.Node:
    if t.kind == "sequence":
        return dumper.represent_sequence(t.tag, t.value)
    if t.kind == "mapping":
        return dumper.represent_mapping(t.tag, t.value)
    if t.tag == "!Presence" and t.value == "":
        # An empty tagged scalar comes out quoted (`!Presence ''`), which means a value.
        return dumper.represent_sequence(t.tag, [])
    return dumper.represent_scalar(t.tag, t.value)


_Dumper.add_representer(Tagged, _represent_tagged)

TAGS = ["!Exact", "!Prefix", "!Suffix", "!Presence", "!Foo", "tag:yaml.org,2002:int"]
TEXT = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["10.0.0.1", "/10.0.0.1", "x/fd00::1", "ns/name", "cluster.local/ns/a/sa/b"]),
    st.sampled_from(["a", "web", "default", "app", "http", "istio-waypoint", "ambient"]),
)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), TEXT)
tagged = st.builds(
    Tagged,
    tag=st.sampled_from(TAGS),
    kind=st.sampled_from(["scalar", "sequence"]),
    value=TEXT,
    plain=st.just(True),
    line=st.just(0),
).map(lambda t: t if t.kind == "scalar" else Tagged(t.tag, t.kind, [t.value][:1], False, 0))
keys = st.one_of(TEXT, st.integers(0, 70000), st.booleans(), st.none())
anything = st.recursive(
    st.one_of(scalars, tagged),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(keys, inner, max_size=3)),
    max_leaves=8,
)


def _shaped(annotation: Any, depth: int, metadata: Sequence[object] = ()) -> SearchStrategy[Any]:
    """Values for a field of this type: mostly (9 in 10) of its shape, else anything at all."""
    if depth >= 6:
        return anything
    typed = _of_type(annotation, depth, metadata)
    return st.integers(0, 9).flatmap(lambda n: anything if n == 9 else typed)


def _of_type(annotation: Any, depth: int, metadata: Sequence[object] = ()) -> SearchStrategy[Any]:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _of_type(args[0], depth, args[1:])
    if origin is typing.Literal:
        return st.sampled_from(args)
    if origin in (typing.Union, types.UnionType):
        return st.one_of([_of_type(a, depth) for a in args])
    if origin is list:
        return st.lists(_shaped(args[0], depth + 1), max_size=3)
    if origin is dict:
        key, value = _of_type(args[0], depth + 1), _shaped(args[1], depth + 1)
        return st.dictionaries(key, value, max_size=3)
    if isinstance(annotation, type) and issubclass(annotation, local.StringMatch):
        return tagged
    if isinstance(annotation, type) and issubclass(annotation, msgspec.Struct):
        return model_documents(annotation, depth + 1)
    if annotation is IPAddress:
        return st.ip_addresses().map(str)
    if annotation is k8s.ClusterIP:
        return st.one_of(st.ip_addresses().map(str), st.sampled_from(k8s.CLUSTER_IP_KEYWORDS))
    if annotation is IPNetwork:
        return st.sampled_from(["10.0.0.0/8", "10.1.2.3", "::/0", "fd00::/64", "10.0.0.0/33"])
    if annotation in (local.NetworkAddress, local.Destination):
        return st.sampled_from(["/10.0.0.1", "net/fd00::1", "10.0.0.1", "ns/host", "/", "x"])
    if annotation is local.NamespacedHostname:
        return st.sampled_from(["ns/host.ns.svc.cluster.local", "ns/", "/host", "host"])
    if annotation is type(None):
        return st.none()
    if annotation is int:
        return st.integers(-5, 70000)
    if annotation is bool:
        return st.booleans()
    if annotation is str:
        patterns = [m.pattern for m in metadata if getattr(m, "pattern", None)]
        return st.from_regex(patterns[0], fullmatch=True) if patterns else TEXT
    return scalars


def model_documents(model: type[msgspec.Struct], depth: int = 0) -> SearchStrategy[dict[Any, Any]]:
    """Mappings with ``model``'s required fields and some of the others (by the name a file
    uses), each mostly of its shape. (Unknown fields come from the mutations below.)"""
    required, optional = {}, {}
    for info in msgspec.structs.fields(model):
        fields = required if info.required else optional
        fields[info.encode_name] = _shaped(info.type, depth)
    return st.fixed_dictionaries(required, optional=optional)


documents = st.one_of(
    *(model_documents(m) for m in k8s.MODELS.values()),
    model_documents(local.LocalConfig),
    model_documents(local.LocalConfig),  # twice: the local config has more to explore
    anything,
)


@fuzz_settings(150)
@given(docs=st.lists(documents, min_size=1, max_size=3))
def test_documents_of_any_shape_load_or_are_refused_naming_the_file(tmp_path, docs):
    path = tmp_path / "mesh.yaml"
    path.write_text(yaml.dump_all(docs, Dumper=_Dumper, allow_unicode=True, sort_keys=False))
    load_or_refuse(path)


# --- 3. valid meshes with one part changed ---------------------------------------------------

KUBERNETES_SEED = """
apiVersion: v1
kind: Namespace
metadata: {name: app, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: wp}}
---
apiVersion: v1
kind: Pod
metadata:
  name: web
  namespace: app
  labels: {app: web}
  annotations: {ambient.dev/app-address: 127.0.0.1}
spec:
  nodeName: n1
  serviceAccountName: web
  containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]
status: {podIP: 10.0.0.1, podIPs: [{ip: 10.0.0.1}, {ip: "fd00::1"}]}
---
apiVersion: v1
kind: Pod
metadata:
  name: wp-1
  namespace: app
  labels: {gateway.networking.k8s.io/gateway-name: wp, istio.io/dataplane-mode: none}
status: {podIP: 10.0.0.9, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: app, labels: {istio.io/use-waypoint: wp}}
spec:
  clusterIP: 10.96.0.1
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}, {port: 81, targetPort: 9090}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp, namespace: app, labels: {istio.io/waypoint-for: all}}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: app}
spec:
  selector: {matchLabels: {app: web}}
  action: DENY
  rules:
  - from: [{source: {principals: [cluster.local/ns/x/sa/y], notNamespaces: [app]}}]
    to: [{operation: {ports: ["8080"]}}]
    when: [{key: source.ip, values: [10.0.0.0/8]}]
"""

SEEDS = [
    list(yaml.safe_load_all(KUBERNETES_SEED)),
    list(yaml.safe_load_all(examples.read("demo-mesh.yaml"))),
    # The vector's tags, as the loader reads them.
    [yaml.load(VECTOR.read_text(), Loader=MeshLoader)],
]


@st.composite
def mutated_seeds(draw: st.DrawFn) -> list[Any]:
    docs = copy.deepcopy(draw(st.sampled_from(SEEDS)))
    node: Any = docs
    # Walk down a few levels, then change what is there.
    for _ in range(draw(st.integers(0, 8))):
        children = list(node.items()) if isinstance(node, dict) else list(enumerate(node))
        children = [(k, v) for k, v in children if isinstance(v, dict | list) and v]
        if not children:
            break
        _, node = draw(st.sampled_from(children))
    if isinstance(node, dict) and node:
        key = draw(st.sampled_from(sorted(node, key=repr)))
    elif isinstance(node, list) and node:
        key = draw(st.integers(0, len(node) - 1))
    else:
        return docs
    action = draw(st.sampled_from(["replace", "remove", "add", "duplicate"]))
    if action == "replace":
        node[key] = draw(anything)
    elif action == "remove":
        del node[key]
    elif action == "add" and isinstance(node, dict):
        node[draw(keys)] = draw(anything)
    elif action == "add":
        node.insert(key, draw(anything))
    elif isinstance(node, list):
        node.append(copy.deepcopy(node[key]))
    return docs


@fuzz_settings(150)
@given(docs=mutated_seeds())
def test_valid_meshes_with_one_part_changed_load_or_are_refused_naming_the_file(tmp_path, docs):
    path = tmp_path / "mesh.yaml"
    path.write_text(yaml.dump_all(docs, Dumper=_Dumper, allow_unicode=True, sort_keys=False))
    load_or_refuse(path)


@pytest.mark.parametrize("seed", range(len(SEEDS)))
def test_the_seeds_themselves_load(tmp_path, seed):
    """The mutations start from meshes that load; otherwise they would explore only refusals."""
    path = tmp_path / "mesh.yaml"
    path.write_text(yaml.dump_all(SEEDS[seed], Dumper=_Dumper, allow_unicode=True))
    assert load_mesh([path]).workloads
