"""``ambient explain``: path and verdicts without sending traffic, from the proxy's own functions;
exit status 0 allowed, 1 denied, 2 bad input; --json for scripts."""

from __future__ import annotations

import json
import textwrap

import pytest

from ambient.cli import main

MESH = """
apiVersion: v1
kind: Namespace
metadata: {name: prod, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: dev, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: sleep, namespace: prod}
spec: {nodeName: n1, serviceAccountName: sleep}
status: {podIP: 10.0.1.1}
---
apiVersion: v1
kind: Pod
metadata: {name: intruder, namespace: dev}
spec: {nodeName: n1, serviceAccountName: intruder}
status: {podIP: 10.0.1.2}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: prod, labels: {app: web}}
spec: {nodeName: n2, serviceAccountName: web}
status: {podIP: 10.0.2.1}
---
apiVersion: v1
kind: Pod
metadata: {name: web-2, namespace: prod, labels: {app: web}}
spec: {nodeName: n2, serviceAccountName: web}
status: {podIP: 10.0.2.2}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: prod}
spec: {clusterIP: 10.96.0.1, selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: only-prod, namespace: prod}
spec:
  rules: [{from: [{source: {namespaces: [prod]}}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp, namespace: prod}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: v1
kind: Pod
metadata:
  name: wp-1
  namespace: prod
  labels: {gateway.networking.k8s.io/gateway-name: wp, istio.io/dataplane-mode: none}
spec: {nodeName: n3, serviceAccountName: wp}
status: {podIP: 10.0.3.1}
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: prod, labels: {istio.io/use-waypoint: wp}}
spec: {clusterIP: 10.96.0.2, selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}
"""


@pytest.fixture
def mesh_file(tmp_path):
    path = tmp_path / "mesh.yaml"
    path.write_text(textwrap.dedent(MESH))
    return str(path)


def run(capsys, *args):
    code = main(["explain", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_an_allowed_connection_to_a_service_explains_every_endpoint(capsys, mesh_file):
    code, out, _ = run(capsys, "--config", mesh_file, "prod/sleep", "web.prod:80", "--json")
    result = json.loads(out)
    assert code == 0 and result["allowed"] is True
    assert result["transport"] == "HBONE"
    assert result["expected_identities"] == ["spiffe://cluster.local/ns/prod/sa/web"]
    assert {e["workload"] for e in result["endpoints"]} == {"prod/web-1", "prod/web-2"}
    assert {"name": "prod/only-prod", "verdict": "allow", "workload": "prod/web-1"} in result[
        "policies"
    ]
    assert any(
        "HBONE (mTLS) to 10.0.2.1:15008, authority 10.0.2.1:8080" in h
        for e in result["endpoints"]
        for h in e["hops"]
    )


def test_a_denied_connection_exits_1_and_names_the_policy_verdicts(capsys, mesh_file):
    code, out, _ = run(capsys, "--config", mesh_file, "dev/intruder", "10.0.2.1:8080")
    assert code == 1
    assert "prod/only-prod: no match" in out
    assert "verdict: DENIED (no ALLOW policy matched)" in out


def test_plaintext_from_an_unknown_source_has_no_identity(capsys, mesh_file):
    code, out, _ = run(capsys, "--config", mesh_file, "192.0.2.7", "10.0.2.1:8080", "--json")
    result = json.loads(out)
    assert code == 1 and result["allowed"] is False  # only-prod needs a prod identity
    assert any("no identity (plaintext)" in h for h in result["hops"])


def test_a_service_with_a_waypoint_goes_through_it(capsys, mesh_file):
    code, out, _ = run(capsys, "--config", mesh_file, "prod/sleep", "10.96.0.2:80", "--json")
    result = json.loads(out)
    assert code == 0 and result["waypoint"] == "prod/wp"
    assert result["expected_identities"] == ["spiffe://cluster.local/ns/prod/sa/wp"]
    assert any("authority 10.96.0.2:80" in h for h in result["hops"])


def test_refusals_by_routing_are_explained(capsys, mesh_file):
    code, out, _ = run(capsys, "--config", mesh_file, "prod/sleep", "10.0.1.1:15008")
    assert code == 1 and "refusing to loop" in out


@pytest.mark.parametrize(
    ("source", "allowed", "reason", "verdict"),
    [
        # only-prod is an ALLOW policy on prod's workloads matching sources in namespace prod.
        ("prod/sleep", True, "allowed by policy prod/only-prod", "allow"),
        # With an ALLOW policy applying, a connection it does not match is denied.
        ("dev/intruder", False, "no ALLOW policy matched", "no match"),
        # Plaintext carries no identity, hence no namespace: it matches no namespace rule.
        ("192.0.2.7", False, "no ALLOW policy matched", "no match"),
    ],
)
def test_explain_gives_the_verdict_istios_semantics_give(
    mesh_file, source, allowed, reason, verdict
):
    from ambient.config import load_mesh
    from ambient.explain import explain

    explanation = explain(load_mesh([mesh_file]), source, "10.0.2.1:8080")
    assert explanation.allowed is allowed
    (leg,) = explanation.legs
    assert (leg.allowed, leg.reason) == (allowed, reason)
    assert leg.policies == [("prod/only-prod", verdict)]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["prod/nobody", "10.0.2.1:8080"], "no pod prod/nobody"),
        (["not-an-ip", "10.0.2.1:8080"], "expected a pod as namespace/name, or an IP"),
        (["prod/sleep", "10.0.2.1"], "expected host:port"),
        (["prod/sleep", "unknown.svc:80"], "neither an IP nor a known Service"),
    ],
)
def test_bad_input_exits_2_with_what_was_expected(capsys, mesh_file, args, message):
    code, _, err = run(capsys, "--config", mesh_file, *args)
    assert code == 2 and message in err


def test_a_bad_config_exits_2(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: v1\nkind: Pod\nmetadata: {name: x}\n")
    code, _, err = run(capsys, "--config", str(bad), "1.2.3.4", "1.2.3.5:80")
    assert code == 2 and "metadata.namespace" in err


WAYPOINT_MESH = """
apiVersion: v1
kind: Namespace
metadata: {name: default, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp, namespace: default}
spec: {gatewayClassName: istio-waypoint}
---
apiVersion: v1
kind: Pod
metadata:
  name: wp-1
  namespace: default
  labels: {gateway.networking.k8s.io/gateway-name: wp, istio.io/dataplane-mode: none}
spec: {nodeName: n3, serviceAccountName: wp}
status: {podIP: 10.0.3.1}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: default}
spec: {nodeName: n1}
status: {podIP: 10.0.1.1}
---
apiVersion: v1
kind: Pod
metadata: {name: api-1, namespace: default, labels: {app: api}}
spec: {nodeName: n2}
status: {podIP: 10.0.2.1}
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: default, labels: {istio.io/use-waypoint: wp}}
spec: {clusterIP: 10.96.0.1, selector: {app: api}, ports: [{name: http, port: 80}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: api}
spec:
  parentRefs: [{group: "", kind: Service, name: api}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /v1}, headers: [{name: x-user, value: alice}]}]
    backendRefs: [{name: api, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /old}}]
    filters: [{type: RequestRedirect, requestRedirect: {statusCode: 301}}]
"""


@pytest.mark.parametrize(
    "args,hop",
    [
        (
            ["--path", "/v1/users", "--header", "X-User: alice"],
            "GET /v1/users: takes default/api#0 -> default/api weight 1: default/api-1",
        ),
        (
            ["--path", "/v1/users"],
            "GET /v1/users: 404, no rule of the routes attached to the Service matches",
        ),
        (
            ["--method", "post", "--path", "/old"],
            "POST /old: takes default/api#1, answered with a 301",
        ),
    ],
    ids=["header match", "no rule matches", "redirect"],
)
def test_through_a_waypoint_the_route_of_an_http_request_is_shown(tmp_path, capsys, args, hop):
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(WAYPOINT_MESH)
    code = main(["explain", "--config", str(mesh), "default/client", "10.96.0.1:80", *args])
    out = capsys.readouterr().out
    assert code == 0
    assert "HBONE (mTLS) to waypoint default/wp at 10.0.3.1:15008" in out
    assert f"waypoint default/wp: {hop}" in out


WAYPOINT_POLICIES = """
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: default}
spec:
  targetRefs: [{kind: Service, group: "", name: api}]
  action: DENY
  rules: [{to: [{operation: {paths: ["/admin*"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: users-need-jwt, namespace: default}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: wp}]
  rules:
  - to: [{operation: {paths: ["/v1/*"]}}]
    from: [{source: {requestPrincipals: ["https://idp.example/*"]}}]
  - to: [{operation: {notPaths: ["/v1/*"]}}]
"""


@pytest.mark.parametrize(
    "args,code,shown",
    [
        (
            ["--path", "/admin/../admin"],
            1,
            ["waypoint default/wp: 403 RBAC: access denied (denied by policy default/no-admin)",
             "default/no-admin: DENY: matches"],
        ),
        (
            ["--path", "/v1/users", "--header", "X-User: alice"],
            1,
            ["403 RBAC: access denied (no ALLOW policy matched)",
             "default/users-need-jwt: ALLOW: does not match"],
        ),
        (
            ["--path", "/v1/users", "--header", "X-User: alice",
             "--request-principal", "https://idp.example/alice"],
            0,
            ["waypoint default/wp: authorization: allowed by policy default/users-need-jwt",
             "waypoint default/wp: GET /v1/users: takes default/api#0"],
        ),
        (
            ["--path", "/old"],
            0,
            ["authorization: allowed by policy default/users-need-jwt",
             "default/no-admin: DENY: does not match"],
        ),
    ],
    ids=["DENY after normalization", "ALLOW needs a JWT", "with a request principal", "other path"],
)  # fmt: skip
def test_through_a_waypoint_its_authorization_policies_are_shown(
    tmp_path, capsys, args, code, shown
):
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(WAYPOINT_MESH + WAYPOINT_POLICIES)
    got = main(["explain", "--config", str(mesh), "default/client", "10.96.0.1:80", *args])
    out = capsys.readouterr().out
    assert got == code, out
    for line in shown:
        assert line in out, out


JWT_RULE = """
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt, namespace: default}
spec:
  targetRefs: [{kind: Service, group: "", name: api}]
  jwtRules: [{issuer: "https://idp.example", jwks: 'JWKS'}]
"""


def test_explain_checks_a_jwt_as_the_waypoint_does(tmp_path, capsys):
    import json as _json

    import jwt as pyjwt
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    public = _json.loads(pyjwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    jwks = _json.dumps({"keys": [{**public, "kid": "k1"}]})
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(WAYPOINT_MESH + WAYPOINT_POLICIES + JWT_RULE.replace("JWKS", jwks))

    def explain(token: str) -> tuple[int, str]:
        args = ["--path", "/v1/users", "--header", "X-User: alice", "--jwt", token]
        code = main(["explain", "--config", str(mesh), "default/client", "10.96.0.1:80", *args])
        return code, capsys.readouterr().out

    claims = {"iss": "https://idp.example", "sub": "alice", "exp": 4102444800}
    good = pyjwt.encode(claims, key, algorithm="ES256", headers={"kid": "k1"})
    code, out = explain(good)
    assert code == 0 and "allowed by policy default/users-need-jwt" in out, out
    expired = pyjwt.encode({**claims, "exp": 1}, key, algorithm="ES256", headers={"kid": "k1"})
    code, out = explain(expired)
    assert code == 1 and "401: the JWT is refused: Jwt is expired" in out, out
