"""RequestAuthentication (JWT) at the waypoint, end to end in loopback mode: tokens signed by keys
this test makes (PyJWT over ``cryptography``), sent by the standard library's ``http.client``
through the client pod's ztunnel, HBONE and ``ambient waypoint`` to the standard library's HTTP
server. Key sets inline and from a JWKS server (the standard library's), one of them down. Each
case names the rule it shows; the semantics are in ``ambient/waypoint/authn.py``."""

from __future__ import annotations

import base64
import http.client
import http.server
import json
import textwrap
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from ambient.identity import CertificateAuthority
from ambient.testing import HttpEcho, http_via_ztunnel, pod_yaml, service_yaml, wait_until
from ambient.waypoint.process import WaypointProcess
from ambient.ztunnel.process import ZtunnelProcess

CLIENT = "127.64.1.1"
VIP = {"open": "127.64.100.1", "needs-jwt": "127.64.100.2", "claims": "127.64.100.3"}
JWKS_HOST = "127.64.9.1"
ISSUER, REMOTE, COOKIE, DOWN = (
    "https://issuer.example",
    "https://remote.example",
    "https://cookie.example",
    "https://down.example",
)

RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
PS = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC = ec.generate_private_key(ec.SECP256R1())
ED = ed25519.Ed25519PrivateKey.generate()
REMOTE_1 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
REMOTE_2 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
STRANGER = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def jwk(algorithm: Any, key: Any, kid: str, alg: str | None = None) -> dict[str, Any]:
    out = json.loads(algorithm.to_jwk(key.public_key()))
    out["kid"] = kid
    if alg:
        out["alg"] = alg
    return out


ALGS = jwt.algorithms
INLINE_JWKS = {
    "keys": [
        jwk(ALGS.RSAAlgorithm, RSA, "rsa-1", "RS256"),
        jwk(ALGS.RSAPSSAlgorithm, PS, "ps-1", "PS256"),
        jwk(ALGS.ECAlgorithm, EC, "ec-1"),
        jwk(ALGS.OKPAlgorithm, ED, "ed-1"),
    ]
}


class JwksServer:
    """A JWKS endpoint whose key set a test can change (rotation)."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.body = b""
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(server.body)))
                self.end_headers()
                self.wfile.write(server.body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(address, Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def serve(self, *keys: dict[str, Any]) -> None:
        self.body = json.dumps({"keys": list(keys)}).encode()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


pod = pod_yaml


def service(name: str) -> str:
    return service_yaml(name, VIP[name])


def mesh(jwks_port: int, down_port: int) -> str:
    return (
        """
apiVersion: v1
kind: Namespace
metadata: {name: default, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: default}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---"""
        + pod(
            "waypoint-1",
            "n3",
            "127.64.3.1",
            "waypoint",
            ", labels: {gateway.networking.k8s.io/gateway-name: waypoint, "
            "istio.io/dataplane-mode: none}",
        )
        + pod("client", "n1", CLIENT, "client")
        + pod(
            "echo-1",
            "n2",
            "127.64.2.1",
            "echo",
            ", labels: {app: echo}, annotations: {ambient.dev/app-address: 127.65.2.1}",
        )
        + "".join(service(s) for s in VIP)
        + f"""
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: jwt, namespace: default}}
spec:
  targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}}]
  jwtRules:
  - issuer: {ISSUER}
    audiences: [api, web]
    jwks: '{json.dumps(INLINE_JWKS)}'
    outputPayloadToHeader: x-jwt-payload
    outputClaimToHeaders:
    - {{header: x-jwt-group, claim: group}}
    - {{header: x-jwt-team, claim: org.team}}
  - issuer: {REMOTE}
    jwksUri: http://{JWKS_HOST}:{jwks_port}/jwks.json
    fromHeaders: [{{name: x-token}}]
  - issuer: {COOKIE}
    jwks: '{json.dumps(INLINE_JWKS)}'
    fromCookies: [session]
    fromParams: [jwt]
    forwardOriginalToken: true
  - issuer: {DOWN}
    jwksUri: http://{JWKS_HOST}:{down_port}/jwks.json
    timeout: 1s
    fromHeaders: [{{name: x-down-token, prefix: "Token "}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: needs-jwt, namespace: default}}
spec:
  targetRefs: [{{kind: Service, group: "", name: needs-jwt}}]
  rules:
  - from: [{{source: {{requestPrincipals: ["{ISSUER}/alice"]}}}}]
    when: [{{key: "request.auth.claims[group]", values: [admins]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: claims, namespace: default}}
spec:
  targetRefs: [{{kind: Service, group: "", name: claims}}]
  rules:
  - when:
    - {{key: "request.auth.claims[org][team]", values: [core]}}
    - {{key: request.auth.audiences, values: [web]}}
    - {{key: request.auth.presenter, values: [cli]}}
---"""
    )


def token(
    key: Any = None,
    alg: str = "RS256",
    kid: str | None = "rsa-1",
    issuer: str = ISSUER,
    sub: str = "alice",
    **claims: Any,
) -> str:
    now = int(time.time())
    payload: dict[str, Any] = {
        "iss": issuer,
        "sub": sub,
        "aud": "api",
        "iat": now,
        "exp": now + 600,
    }
    payload.update(claims)
    payload = {k: v for k, v in payload.items() if v is not None}
    headers = {"kid": kid} if kid else {}
    return jwt.encode(payload, key if key is not None else RSA, algorithm=alg, headers=headers)


def unsigned(**claims: Any) -> str:
    """``alg: none``: the attack every verifier must refuse."""

    def b64(d: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()

    now = int(time.time())
    payload = {"iss": ISSUER, "sub": "alice", "aud": "api", "exp": now + 600, **claims}
    return f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(payload)}."


def bearer(t: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {t}"}


@dataclass
class Case:
    rule: str
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    path: str = "/"
    service: str = "open"
    body: str | None = None  # what a 401's body must say


def tampered() -> str:
    t = token()
    return t[:-4] + ("AAAA" if not t.endswith("AAAA") else "BBBB")


def make_cases() -> list[Case]:
    """The cases, with tokens made now: their times are relative to when the case runs."""
    NOW = int(time.time())
    return [
        Case("no token: the request passes, with no request principal", 200),
        Case("RS256 token, valid", 200, bearer(token())),
        Case("ES256 token, valid", 200, bearer(token(EC, "ES256", "ec-1"))),
        Case("EdDSA token, valid", 200, bearer(token(ED, "EdDSA", "ed-1"))),
        Case("PS256 token, valid", 200, bearer(token(PS, "PS256", "ps-1"))),
        Case(
            "a token without kid is tried on the keys that fit its alg",
            200,
            bearer(token(kid=None)),
        ),
        Case("the Bearer scheme ignores case", 200, {"Authorization": f"bearer {token()}"}),
        Case(
            "audiences: any of the token's audiences may match",
            200,
            bearer(token(aud=["other", "web"])),
        ),
        Case("alg: none is refused", 401, bearer(unsigned()), body="Jwt"),
        Case(
            "a tampered signature is refused",
            401,
            bearer(tampered()),
            body="Jwt verification fails",
        ),
        Case(
            "a key of another set (same kid) is refused",
            401,
            bearer(token(STRANGER)),
            body="Jwt verification fails",
        ),
        Case(
            "a kid not in the set is refused",
            401,
            bearer(token(kid="nope")),
            body="Jwks doesn't have key to match kid or alg from Jwt",
        ),
        Case(
            "an algorithm the key does not allow (RS256 on a PS256 key) is refused",
            401,
            bearer(token(PS, "RS256", "ps-1")),
            body="Jwks doesn't have key",
        ),
        Case(
            "HS256 with the RSA key's kid (key confusion) is refused",
            401,
            bearer(token(b"x" * 32, "HS256", "rsa-1")),
            body="Jwks doesn't have key",
        ),
        Case(
            "an expired token is refused", 401, bearer(token(exp=NOW - 3600)), body="Jwt is expired"
        ),
        Case("expired within the 60 s clock skew: accepted", 200, bearer(token(exp=NOW - 20))),
        Case(
            "a token not yet valid is refused",
            401,
            bearer(token(nbf=NOW + 3600)),
            body="Jwt not yet valid",
        ),
        Case("nbf within the clock skew: accepted", 200, bearer(token(nbf=NOW + 20))),
        Case(
            "an issuer no rule names is refused",
            401,
            bearer(token(issuer="https://evil.example")),
            body="Jwt issuer is not configured",
        ),
        Case(
            "a wrong audience is refused",
            401,
            bearer(token(aud="payments")),
            body="Audiences in Jwt are not allowed",
        ),
        Case("not a JWT at all is refused", 401, bearer("abc.def"), body="Jwt"),
        Case(
            "another scheme (Basic) is not a bearer token: no token",
            200,
            {"Authorization": "Basic dXNlcjpwYXNz"},
        ),
        Case("a token in the access_token parameter", 200, path=f"/?access_token={token()}"),
        Case(
            "an expired token in the access_token parameter is refused",
            401,
            path=f"/?access_token={token(exp=NOW - 3600)}",
        ),
        Case(
            "fromCookies: the rule's cookie",
            200,
            {"Cookie": f"a=1; session={token(issuer=COOKIE)}"},
        ),
        Case("fromParams: the rule's parameter", 200, path=f"/?jwt={token(issuer=COOKIE)}"),
        Case(
            "fromHeaders with no prefix, remote JWKS",
            200,
            {"x-token": token(REMOTE_1, kid="r1", issuer=REMOTE)},
        ),
        Case(
            "a token counts only where its issuer's rule looks (x-token, not Authorization)",
            401,
            bearer(token(REMOTE_1, kid="r1", issuer=REMOTE)),
            body="Jwt issuer is not configured",
        ),
        Case(
            "remote JWKS: a key it does not hold is refused",
            401,
            {"x-token": token(RSA, kid="rsa-1", issuer=REMOTE)},
        ),
        Case(
            "a JWKS server that is down: its issuer's tokens are refused",
            401,
            {"x-down-token": "Token " + token(issuer=DOWN)},
            body="Jwks remote fetch is failed",
        ),
        Case(
            "requestPrincipals + claim: alice in admins",
            200,
            bearer(token(group="admins")),
            service="needs-jwt",
        ),
        Case("requestPrincipals: no token, no principal: 403", 403, service="needs-jwt"),
        Case(
            "requestPrincipals: bob is not alice",
            403,
            bearer(token(sub="bob", group="admins")),
            service="needs-jwt",
        ),
        Case(
            "request.auth.claims: alice outside admins",
            403,
            bearer(token(group="users")),
            service="needs-jwt",
        ),
        Case(
            "claims in a list: any element matches",
            200,
            bearer(token(group=["users", "admins"])),
            service="needs-jwt",
        ),
        Case(
            "nested claims, audiences and presenter all hold",
            200,
            bearer(token(org={"team": "core"}, aud=["api", "web"], azp="cli")),
            service="claims",
        ),
        Case(
            "nested claim differs",
            403,
            bearer(token(org={"team": "edge"}, aud=["api", "web"], azp="cli")),
            service="claims",
        ),
        Case(
            "presenter differs",
            403,
            bearer(token(org={"team": "core"}, aud=["api", "web"], azp="web")),
            service="claims",
        ),
        Case(
            "audience web missing",
            403,
            bearer(token(org={"team": "core"}, azp="cli")),
            service="claims",
        ),
    ]


CASES = make_cases()  # for the names; each test makes its case again


class Env:
    def __init__(self, tmp) -> None:
        self.jwks = JwksServer((JWKS_HOST, 0))
        self.jwks.serve(jwk(ALGS.RSAAlgorithm, REMOTE_1, "r1"))
        # A port nothing listens on: the down JWKS server.
        probe = http.server.HTTPServer((JWKS_HOST, 0), http.server.BaseHTTPRequestHandler)
        down_port = probe.server_address[1]
        probe.server_close()
        self.mesh_file = tmp / "mesh.yaml"
        self.mesh_file.write_text(
            textwrap.dedent(mesh(self.jwks.httpd.server_address[1], down_port))
        )
        CertificateAuthority.create().save(tmp / "ca")
        self.echo = HttpEcho("echo-1", ("127.65.2.1", 8080))
        self.nodes = [
            ZtunnelProcess(n, [self.mesh_file], tmp / "ca", tmp).wait_ready() for n in ("n1", "n2")
        ]
        self.waypoint = WaypointProcess(
            "default/waypoint", [self.mesh_file], tmp / "ca", tmp, "--jwks-refresh", "1"
        ).wait_ready()

    def close(self) -> None:
        for proc in [*self.nodes, self.waypoint]:
            proc.stop()
        self.echo.close()
        self.jwks.close()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = Env(tmp_path_factory.mktemp("waypoint-authn"))
    yield e
    e.close()


def send(
    service: str, path: str = "/", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    return http_via_ztunnel(CLIENT, VIP[service], 80, path, headers)


def test_there_are_at_least_thirty_cases() -> None:
    assert len(CASES) >= 30
    assert len({c.rule for c in CASES}) == len(CASES)


@pytest.mark.parametrize("rule", [c.rule for c in CASES])
def test_jwt_at_the_waypoint(env: Env, rule: str) -> None:
    case = next(c for c in make_cases() if c.rule == rule)
    status, headers, body = send(case.service, case.path, case.headers)
    assert status == case.status, (case.rule, body)
    if status == 401:
        assert case.body is None or case.body.encode() in body, body
        challenge = headers.get("www-authenticate", "")
        assert (
            challenge.startswith('Bearer realm="http://') and 'error="invalid_token"' in challenge
        )


def test_a_valid_token_is_removed_and_its_claims_become_headers(env: Env) -> None:
    t = token(group="admins", org={"team": "core"})
    status, _, body = send("open", "/", bearer(t))
    assert status == 200
    seen = json.loads(body)["headers"]
    assert "authorization" not in seen, "the token is not forwarded by default"
    assert seen["x-jwt-group"] == "admins" and seen["x-jwt-team"] == "core"
    payload = json.loads(base64.urlsafe_b64decode(seen["x-jwt-payload"] + "=="))
    assert payload["sub"] == "alice" and payload["iss"] == ISSUER


def test_forward_original_token_keeps_it(env: Env) -> None:
    cookie = f"session={token(issuer=COOKIE)}"
    status, _, body = send("open", "/", {"Cookie": cookie})
    assert status == 200
    assert json.loads(body)["headers"]["cookie"] == cookie


def test_a_repeated_token_is_verified_once_and_still_expires(env: Env) -> None:
    t = token()
    for _ in range(20):
        assert send("open", "/", bearer(t))[0] == 200


def test_jwks_rotation_by_kid(env: Env) -> None:
    old = token(REMOTE_1, kid="r1", issuer=REMOTE)
    new = token(REMOTE_2, kid="r2", issuer=REMOTE)
    assert send("open", "/", {"x-token": old})[0] == 200
    assert send("open", "/", {"x-token": new})[0] == 401
    env.jwks.serve(jwk(ALGS.RSAAlgorithm, REMOTE_2, "r2"))
    wait_until(lambda: send("open", "/", {"x-token": new})[0] == 200, timeout=10)
    assert send("open", "/", {"x-token": old})[0] == 401
    env.jwks.serve(jwk(ALGS.RSAAlgorithm, REMOTE_1, "r1"))
    wait_until(lambda: send("open", "/", {"x-token": old})[0] == 200, timeout=10)


def test_a_jwks_fetch_failure_is_reported_and_other_rules_keep_working(env: Env) -> None:
    admin = f"http://{env.waypoint.admin}/config_dump"
    dump = json.loads(urllib.request.urlopen(admin).read())
    failing = [s for uri, s in dump["jwks"].items() if s["error"] and not s["keys"]]
    assert len(failing) == 1 and "cannot fetch the JWKS" in failing[0]["error"], dump["jwks"]
    assert send("open", "/", bearer(token()))[0] == 200
    assert "cannot fetch the JWKS" in env.waypoint.output()


def test_refused_tokens_are_counted_and_logged(env: Env) -> None:
    assert send("open", "/", bearer(token(exp=int(time.time()) - 3600)))[0] == 401
    entries = env.waypoint.claim_entries(
        lambda e: str(e.get("response_code_details", "")).startswith("jwt_authn_access_denied")
    )
    assert entries and entries[0]["response_code"] == 401
