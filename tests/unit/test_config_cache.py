"""Reloading with a MeshCache: only changed documents are parsed again, and the snapshot, the
errors and their line numbers are exactly those of a load from scratch."""

from __future__ import annotations

import textwrap

import pytest

from ambient.config import ConfigError, MeshCache, load_mesh
from ambient.config.documents import split

NAMESPACE = """\
apiVersion: v1
kind: Namespace
metadata: {name: ns0, labels: {istio.io/dataplane-mode: ambient}}
"""


def pod(i: int, app: str = "web") -> str:
    return textwrap.dedent(
        f"""\
        ---
        apiVersion: v1
        kind: Pod
        metadata: {{name: pod{i}, namespace: ns0, labels: {{app: {app}}}}}
        spec: {{nodeName: n1, serviceAccountName: sa}}
        status: {{podIP: 10.0.0.{i + 1}}}
        """
    )


SERVICE = """\
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: ns0}
spec: {clusterIP: 10.96.0.1, selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow, namespace: ns0}
spec: {rules: [{from: [{source: {namespaces: [ns0]}}]}]}
"""


def mesh_text(pods: list[str]) -> str:
    return NAMESPACE + "".join(pods) + SERVICE


def errors(paths, **kwargs) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_mesh(paths, **kwargs)
    return [str(issue) for issue in caught.value.issues]


def test_a_reload_parses_only_the_changed_document_and_equals_a_fresh_load(tmp_path):
    path = tmp_path / "mesh.yaml"
    pods = [pod(i) for i in range(20)]
    path.write_text(mesh_text(pods))
    cache = MeshCache()
    first = load_mesh([path], cache=cache)
    assert cache.documents.parsed == len(pods) + 3  # every document, the first time

    pods[7] = pod(7, app="other")  # leaves the Service's endpoints
    path.write_text(mesh_text(pods))
    again = load_mesh([path], cache=cache)
    assert cache.documents.parsed == 1
    fresh = load_mesh([path])
    assert again.workloads == fresh.workloads
    assert again.services == fresh.services
    assert again.policies == fresh.policies
    assert again.workloads != first.workloads
    web = next(s for s in again.services if s.name == "web")
    assert len(list(again.endpoints_of(web))) == 19


def test_unchanged_objects_are_reused_not_rebuilt(tmp_path):
    path = tmp_path / "mesh.yaml"
    pods = [pod(i) for i in range(5)]
    path.write_text(mesh_text(pods))
    cache = MeshCache()
    first = load_mesh([path], cache=cache)
    path.write_text(mesh_text([*pods, pod(9)]))
    again = load_mesh([path], cache=cache)
    assert again.workloads[0] is first.workloads[0]
    # The Service's namespace gained a pod: its endpoints are made again.
    assert again.services[0] is not first.services[0]


def test_errors_and_their_lines_are_those_of_a_load_from_scratch(tmp_path):
    path = tmp_path / "mesh.yaml"
    pods = [pod(i) for i in range(4)]
    path.write_text(mesh_text(pods))
    cache = MeshCache()
    load_mesh([path], cache=cache)
    # A tag where none belongs and a YAML error, below documents the cache holds.
    broken = [
        *pods,
        "---\napiVersion: v1\nkind: Pod\nmetadata: !Foo {name: x}\n",
        "---\nkey: [unclosed\n",
    ]
    path.write_text(mesh_text(broken))
    cached = errors([path], cache=cache)
    assert cached == errors([path])
    tag_line = mesh_text(broken).splitlines().index("metadata: !Foo {name: x}") + 1
    assert any(f"(line {tag_line})" in e for e in cached), cached  # the file's line
    # A document inserted above a tagged one moves it down: still the file's line.
    path.write_text(mesh_text([pod(8), *broken]))
    assert errors([path], cache=cache) == errors([path])


def test_a_refused_file_keeps_the_last_good_cache(tmp_path):
    path = tmp_path / "mesh.yaml"
    path.write_text(mesh_text([pod(0), pod(1)]))
    cache = MeshCache()
    load_mesh([path], cache=cache)
    path.write_text(mesh_text([pod(0), pod(1), "---\nkind: [\n"]))
    errors([path], cache=cache)
    path.write_text(mesh_text([pod(0), pod(1)]))
    load_mesh([path], cache=cache)
    assert cache.documents.parsed == 0


@pytest.mark.parametrize(
    ("text", "chunks"),
    [
        ("a: 1\n", ["a: 1\n"]),
        ("---\na: 1\n---\nb: 2\n", ["---\na: 1\n", "---\nb: 2\n"]),
        ("a: 1\n--- {b: 2}\n", ["a: 1\n", "--- {b: 2}\n"]),
        ("s: |\n  x\n----\n", ["s: |\n  x\n----\n"]),  # ---- is not a marker
        ("a: '---'\n---", ["a: '---'\n", "---"]),
    ],
)
def test_a_file_is_split_at_its_document_markers(text, chunks):
    found = split(text)
    assert found is not None
    assert [c for _, c in found] == chunks
    starts = [sum(c.count("\n") for c in chunks[:i]) for i in range(len(chunks))]
    assert [line for line, _ in found] == starts


def test_a_file_with_directives_is_read_whole(tmp_path):
    assert split("%YAML 1.1\n---\na: 1\n") is None
    path = tmp_path / "mesh.yaml"
    path.write_text("%YAML 1.1\n---\n" + NAMESPACE + pod(0))
    cache = MeshCache()
    mesh = load_mesh([path], cache=cache)
    assert [w.name for w in mesh.workloads] == ["pod0"]
    assert cache.documents.parsed == 0  # not split: nothing cached
