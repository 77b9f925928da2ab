"""How a refused object is described (ambient.config.validate): the field in the file's own
names, what was expected, what was written, and the object's other errors where reading on makes
sense."""

from __future__ import annotations

import pytest

from ambient.config import kubernetes as k8s
from ambient.config import ztunnel_local as local
from ambient.config.errors import Location
from ambient.config.validate import MAX_ISSUES_PER_OBJECT, validate

WHERE = Location("mesh.yaml", 1, "Service default/web")


def refusals(doc, model=k8s.Service):
    value, issues = validate(doc, model, WHERE)
    assert value is None and issues
    assert all(i.location == WHERE for i in issues)
    return [(i.field, i.message) for i in issues]


def service(spec=None, **metadata):
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web", "namespace": "default", **metadata},
        "spec": spec or {},
    }


def test_a_valid_object_is_returned_with_no_issue():
    value, issues = validate(
        service({"clusterIP": "10.96.0.1", "ports": [{"port": 80}]}), k8s.Service, WHERE
    )
    assert issues == [] and value is not None
    assert value.spec.clusterIP == "10.96.0.1" and value.spec.ports[0].port == 80


@pytest.mark.parametrize(
    ("doc", "model", "expected"),
    [
        pytest.param(
            service({"ports": [{"port": 0}]}),
            k8s.Service,
            [("spec.ports[0].port", "expected an integer >= 1, got 0")],
            id="bound",
        ),
        pytest.param(
            service({"ports": [{"port": True}]}),
            k8s.Service,
            [("spec.ports[0].port", "expected an integer, got True")],
            id="a boolean is not a port",
        ),
        pytest.param(
            service({"ports": [{"port": "80"}]}),
            k8s.Service,
            [("spec.ports[0].port", "expected an integer, got '80'")],
            id="no coercion from text",
        ),
        pytest.param(
            service({"type": "Internal"}),
            k8s.Service,
            [
                (
                    "spec.type",
                    "expected 'ClusterIP', 'NodePort', 'LoadBalancer' or 'ExternalName', "
                    "got 'Internal'",
                )
            ],
            id="one of a literal's values",
        ),
        pytest.param(
            service(labels={"app": "web", "tier": 3}),
            k8s.Service,
            [("metadata.labels.tier", "expected a string, got 3")],
            id="the key of a mapping's bad value",
        ),
        pytest.param(
            service({"ports": [{"port": 80, "targetPort": "Http_1"}]}),
            k8s.Service,
            [
                (
                    "spec.ports[0].targetPort",
                    "expected a port name of at most 15 characters",
                )
            ],
            id="a union",
        ),
        pytest.param(
            service(labels="app=web"),
            k8s.Service,
            [("metadata.labels", "expected a mapping, got 'app=web'")],
            id="a mapping",
        ),
        pytest.param(
            {**service(), "metadata": {"name": "Web_1", "namespace": "default"}},
            k8s.Service,
            [("metadata.name", "expected an RFC 1123 subdomain")],
            id="a name Kubernetes refuses, described",
        ),
        pytest.param(
            {"namespace": "a", "workloadIps": ["10.0.0.1"], "services": {"a/b": {}, "c": {}}},
            local.LocalWorkload,
            [("services", "the key 'c': expected 'namespace/hostname', got 'c'")],
            id="a bad key",
        ),
        pytest.param(
            {"namespace": "a", "workloadIps": ["10.0.0.1"], "services": {"a/b": {80: "x"}}},
            local.LocalWorkload,
            [("services.a/b[80]", "expected an integer, got 'x'")],
            id="a value under an integer key",
        ),
    ],
)
def test_each_refusal_names_the_field_what_was_expected_and_what_was_written(doc, model, expected):
    got = refusals(doc, model)
    assert len(got) == len(expected), got
    for (field, message), (want_field, want_message) in zip(got, expected, strict=True):
        assert field == want_field
        assert message.startswith(want_message), message


def test_an_objects_independent_errors_are_all_reported():
    doc = service(
        {"clusterIPs": ["nope"], "ports": [{"port": 70000}], "type": "Internal"},
        lables={"a": "b"},
        labels={"x": 1},
    )
    assert refusals(doc) == [
        ("metadata.lables", "unknown field"),
        ("metadata.labels.x", "expected a string, got 1"),
        ("spec.clusterIPs[0]", "expected an IP address, 'None' or '', got 'nope'"),
        ("spec.ports[0].port", "expected an integer <= 65535, got 70000"),
        (
            "spec.type",
            "expected 'ClusterIP', 'NodePort', 'LoadBalancer' or 'ExternalName', got 'Internal'",
        ),
    ]


def test_an_error_in_a_required_field_ends_the_search():
    # metadata and its name are required: what follows an error there would be noise.
    doc = {**service({"ports": [{"port": 0}]}), "metadata": {"name": 5, "namespace": "default"}}
    assert refusals(doc) == [("metadata.name", "expected a string, got 5")]
    missing = {**service({"ports": [{"port": 0}]}), "metadata": {"namespace": "default"}}
    assert refusals(missing)[0] == ("metadata.name", "required field is missing")


def test_the_document_itself_is_not_changed_while_reading_on():
    doc = service({"ports": [{"port": 0}], "bogus": 1}, lables={"a": "b"})
    before = repr(doc)
    assert len(refusals(doc)) == 2  # spec is open: `bogus` is ignored
    assert repr(doc) == before


def test_a_document_all_wrong_is_reported_in_bounded_lines():
    doc = service(labels={f"k{i}": i for i in range(100)})
    assert len(refusals(doc)) == MAX_ISSUES_PER_OBJECT
