"""RequestAuthentication at the waypoint: what a user is told about a rule the waypoint cannot
take, which RequestAuthentications apply, and how remote key sets are cached and refreshed."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from ambient.config import load_mesh
from ambient.config.errors import ConfigError
from ambient.waypoint import authn
from ambient.waypoint.table import compile_table

HEAD = """
apiVersion: v1
kind: Namespace
metadata: {name: default, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: default}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: default, labels: {istio.io/use-waypoint: waypoint}}
spec: {clusterIP: 10.96.0.10, selector: {app: echo}, ports: [{name: http, port: 80}]}
---
"""
JWKS = '{"keys": []}'


def authn_yaml(spec: str, name: str = "jwt") -> str:
    return textwrap.dedent(f"""
    apiVersion: security.istio.io/v1
    kind: RequestAuthentication
    metadata: {{name: {name}, namespace: default}}
    spec: {spec}
    ---
    """)


def load(tmp_path: Path, *docs: str):
    path = tmp_path / "mesh.yaml"
    path.write_text(HEAD + "".join(docs))
    return load_mesh([path])


ON_ECHO = "{targetRefs: [{kind: Service, name: echo}], jwtRules: "
REFUSED = [
    (ON_ECHO + "[{issuer: i}]}", "spec.jwtRules[0]", "jwks (inline) or jwksUri"),
    (ON_ECHO + "[{issuer: i, jwks: 'not json'}]}", "spec.jwtRules[0].jwks", "JSON Web Key Set"),
    (ON_ECHO + "[{issuer: i, jwksUri: 'ftp://x/k'}]}", "spec.jwtRules[0].jwksUri", "http(s)"),
    (
        ON_ECHO + f"[{{issuer: i, jwks: '{JWKS}', timeout: soon}}]}}",
        "spec.jwtRules[0].timeout",
        "duration",
    ),
    (
        ON_ECHO + f"[{{issuer: i, jwks: '{JWKS}', fromHeaders: [{{name: 'a b'}}]}}]}}",
        "spec.jwtRules[0].fromHeaders[0].name",
        "header name",
    ),
    (ON_ECHO + "[{jwks: '{}'}]}", "issuer", "required"),
    ("{targetRefs: [{kind: Service, name: echo, namespace: x}], jwtRules: []}", "namespace", "x"),
]


@pytest.mark.parametrize(("spec", "field", "said"), REFUSED, ids=[r[1] for r in REFUSED])
def test_a_rule_the_waypoint_cannot_take_is_refused_naming_the_field(
    tmp_path: Path, spec: str, field: str, said: str
) -> None:
    with pytest.raises(ConfigError) as e:
        load(tmp_path, authn_yaml(spec))
    text = str(e.value)
    assert "mesh.yaml" in text and field in text and said in text, text


def test_which_request_authentications_apply(tmp_path: Path) -> None:
    mesh = load(
        tmp_path,
        authn_yaml(ON_ECHO + f"[{{issuer: a, jwks: '{JWKS}'}}]}}", "on-echo"),
        authn_yaml(
            "{targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}],"
            f" jwtRules: [{{issuer: b, jwks: '{JWKS}'}}]}}",
            "on-gateway",
        ),
        authn_yaml(
            f"{{selector: {{matchLabels: {{app: x}}}}, jwtRules: [{{issuer: c, jwks: '{JWKS}'}}]}}",
            "sel",
        ),
    )
    assert [a.key for a in mesh.request_authentications] == [
        "default/on-echo",
        "default/on-gateway",
    ]
    assert any("has no targetRefs" in w for w in mesh.warnings)
    table = compile_table(mesh, "default/waypoint")
    assert [r["issuer"] for r in table["services"][0]["jwt_rules"]] == ["a", "b"]
    assert [r["issuer"] for r in table["workload_jwt_rules"]] == ["b"]


def test_remote_key_sets_are_cached_refreshed_and_kept_on_failure() -> None:
    answers = ['{"keys": [1]}', OSError("connection refused"), '{"keys": [2]}']
    calls: list[str] = []

    def fetch(uri: str, timeout: float) -> str:
        calls.append(uri)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    cache = authn.JwksCache(refresh=0.0, fetch=fetch)
    assert cache.get("http://k", 1.0) == ('{"keys": [1]}', None)
    assert cache.get("http://k", 1.0) == ('{"keys": [1]}', None)  # cached: no second fetch
    assert calls == ["http://k"]
    cache._update("http://k", 1.0)  # the refresh fails: the last good set stays
    text, error = cache.get("http://k", 1.0)
    assert text == '{"keys": [1]}' and error is not None and "connection refused" in error
    assert cache.status() == {"http://k": {"keys": True, "error": error}}
    cache._update("http://k", 1.0)
    assert cache.get("http://k", 1.0) == ('{"keys": [2]}', None)


def test_a_set_never_fetched_is_reported_in_the_table() -> None:
    cache = authn.JwksCache(fetch=lambda uri, timeout: (_ for _ in ()).throw(OSError("down")))
    rule = authn.JwtRule(issuer="i", jwks_uri="http://k")
    out = authn.rules_json([authn.RequestAuthn("default", "r", (), (rule,))], cache)
    assert out[0]["jwks"] is None and "down" in out[0]["jwks_error"]
