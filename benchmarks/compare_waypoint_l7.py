"""What L7 security costs at the waypoint: requests/s through it with no policy, with 100
AuthorizationPolicies and a JWT rule (the same token on every request, so verified once and then
remembered), and with one Python filter — each as a ratio to the no-policy run of the same round.

    python benchmarks/compare_waypoint_l7.py --rounds 5 --seconds 8 \\
        --out benchmarks/results/waypoint-l7.json

The testbed of ``compare_waypoint.py`` (needs root, ``ip``, ``iptables-restore``, ``fortio``):
client pod -> ztunnel -> HBONE -> ``ambient waypoint`` -> HBONE -> ztunnel -> ``fortio server``,
fortio's 16 keep-alive connections posting 1 KiB bodies as fast as they go. Three Services bound
to the waypoint, the same endpoint behind each:

- ``none``: no policy, no filter.
- ``policies``: 100 AuthorizationPolicies targeting it (50 DENY on other paths, 49 ALLOW for
  other principals, 1 ALLOW requiring the JWT's request principal) and a RequestAuthentication
  with an inline RS256 key; every request carries a valid token (``Authorization: Bearer``).
- ``filter``: one Python filter (``examples/filters/canary.py``, STATS phase) called per request.

Reported per path (medians over rounds): requests/s, p50 and p99 latency, the waypoint's CPU per
1,000 requests; and per round the ratio of each path's requests/s (and CPU per request) to
``none``'s, then their median. A reading counts only if every request was answered 200 and the
waypoint counted them. Benchmarks never fail on a figure: the exit status is 0 unless nothing
could be measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import jwt  # noqa: E402  (pyjwt, in ambient's test extras)
from cryptography.hazmat.primitives.asymmetric import rsa  # noqa: E402

from benchmarks import compare_waypoint as cw  # noqa: E402
from benchmarks import harness  # noqa: E402

VIPS = {"none": "10.98.46.20", "policies": "10.98.46.21", "filter": "10.98.46.22"}
PATHS = tuple(VIPS)
ISSUER = "https://issuer.bench"
POLICIES = 100


def service(name: str) -> str:
    return f"""
---
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default, labels: {{istio.io/use-waypoint: waypoint}}}}
spec:
  clusterIP: {VIPS[name]}
  selector: {{app: server}}
  ports: [{{name: http, port: 80, targetPort: {cw.APP_PORT}}}]"""


def policy(i: int) -> str:
    """The i-th of the 100: DENY on a path nobody asks for, ALLOW for another principal, and
    (the last) the ALLOW the benchmark's token satisfies."""
    if i == POLICIES - 1:
        action, rule = "ALLOW", f'{{from: [{{source: {{requestPrincipals: ["{ISSUER}/bench"]}}}}]}}'
    elif i % 2 == 0:
        action, rule = "DENY", f"{{to: [{{operation: {{paths: [/admin{i}/*]}}}}]}}"
    else:
        principal = f"cluster.local/ns/team{i}/sa/app"
        action = "ALLOW"
        rule = (
            f"{{from: [{{source: {{principals: [{principal}]}}}}], "
            f"to: [{{operation: {{methods: [GET], paths: [/team{i}/*]}}}}]}}"
        )
    return f"""
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: p{i:03d}, namespace: default}}
spec:
  targetRefs: [{{kind: Service, group: "", name: policies}}]
  action: {action}
  rules: [{rule}]"""


def mesh_yaml(jwks: str) -> str:
    canary = REPO / "examples" / "filters" / "canary.py"
    return (
        cw.MESH_YAML.rstrip()
        + "".join(service(s) for s in PATHS)
        + "".join(policy(i) for i in range(POLICIES))
        + f"""
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: jwt, namespace: default}}
spec:
  targetRefs: [{{kind: Service, group: "", name: policies}}]
  jwtRules: [{{issuer: "{ISSUER}", jwks: '{jwks}'}}]
---
apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata: {{name: canary, namespace: default}}
spec:
  targetRefs: [{{kind: Service, group: "", name: filter}}]
  url: file://{canary}
  phase: STATS
  pluginConfig: {{percent: 10}}
"""
    )


def keys() -> tuple[str, str]:
    """An inline JWKS and a token it verifies, valid for a day."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    public.update({"kid": "bench", "alg": "RS256"})
    now = int(time.time())
    token = jwt.encode(
        {"iss": ISSUER, "sub": "bench", "iat": now, "exp": now + 86400},
        key,
        algorithm="RS256",
        headers={"kid": "bench"},
    )
    return json.dumps({"keys": [public]}), token


def measure(bed: Any, path: str, seconds: float, token: str) -> dict[str, Any]:
    for pod in (cw.CLIENT, cw.SERVER):
        bed.set_capture(pod, True)
    url = f"http://{VIPS[path]}/echo"
    headers = (f"Authorization: Bearer {token}", "x-user: bench@example.com")
    pid = bed.waypoint(cw.WAYPOINT).process.pid
    cw.warm_up(url, headers)
    answered_before = cw.waypoint_requests(bed)
    cpu_before = harness.cpu_seconds(pid)
    started = time.monotonic()
    result = cw.fortio_load(url, 0, seconds, headers)
    elapsed = time.monotonic() - started
    cpu = harness.cpu_seconds(pid) - cpu_before
    answered = cw.waypoint_requests(bed) - answered_before
    return {
        "path": path,
        **result,
        "seconds": elapsed,
        "cpu_ms_per_1000_requests": cpu * 1000 / (result["requests"] / 1000),
        "waypoint_answered": answered,
        "valid": result["ok"] == result["requests"] and answered >= result["requests"] * 0.99,
    }


def median(values: list[float]) -> float | None:
    return round(statistics.median(values), 4) if values else None


def summarise(readings: list[dict[str, Any]]) -> dict[str, Any]:
    valid = [r for r in readings if r["valid"]]
    out: dict[str, Any] = {}
    for path in PATHS:
        mine = [r for r in valid if r["path"] == path]
        out[path] = {
            "readings": len(mine),
            "rps": median([r["rps"] for r in mine]),
            "p50_ms": median([r["p50_ms"] for r in mine]),
            "p99_ms": median([r["p99_ms"] for r in mine]),
            "cpu_ms_per_1000_requests": median([r["cpu_ms_per_1000_requests"] for r in mine]),
        }
    by_round: dict[int, dict[str, dict[str, Any]]] = {}
    for r in valid:
        by_round.setdefault(r["round"], {})[r["path"]] = r
    for path in PATHS[1:]:
        rps, cpu = [], []
        for readings_of in by_round.values():
            base, other = readings_of.get("none"), readings_of.get(path)
            if base and other:
                rps.append(other["rps"] / base["rps"])
                cpu.append(other["cpu_ms_per_1000_requests"] / base["cpu_ms_per_1000_requests"])
        out[f"rps_ratio_{path}_to_none"] = median(rps)
        out[f"cpu_per_request_ratio_{path}_to_none"] = median(cpu)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--waypoint-workers", type=int, default=1)
    args = parser.parse_args(argv)
    why = cw.preflight()
    if why:
        print(f"compare_waypoint_l7: {why}", file=sys.stderr)
        return 2
    jwks, token = keys()
    readings: list[dict[str, Any]] = []
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-waypoint-l7-") as tmp:
        work = Path(tmp)
        waypoint_args = ["--workers", str(args.waypoint_workers)]
        with cw.testbed(work, waypoint_args, mesh_yaml=mesh_yaml(jwks)) as bed:
            server = cw.in_pod(
                cw.SERVER,
                [
                    cw.fortio_binary() or "fortio",
                    "server",
                    "-http-port", f"0.0.0.0:{cw.APP_PORT}",
                    "-grpc-port", "disabled",
                    "-redirect-port", "disabled",
                ],
            )  # fmt: skip
            try:
                cw.wait_listening(cw.SERVER, cw.APP_PORT, server, "fortio server")
                for rnd in range(args.rounds):
                    order = PATHS[rnd % len(PATHS) :] + PATHS[: rnd % len(PATHS)]
                    for path in order:
                        try:
                            reading = measure(bed, path, args.seconds, token)
                        except Exception as e:  # reported; the run goes on
                            failures.append(f"round {rnd} {path}: {e}")
                            traceback.print_exc()
                            continue
                        reading["round"] = rnd
                        readings.append(reading)
                        print(json.dumps(reading), flush=True)
            finally:
                server.terminate()
                server.wait(5)
    summary = summarise(readings)
    report = {
        "benchmark": "compare_waypoint_l7",
        "command": harness.command_line(),
        "machine": cw.machine(),
        "setup": {
            "connections": cw.CONNECTIONS,
            "body_bytes": cw.BODY,
            "seconds": args.seconds,
            "rounds": args.rounds,
            "waypoint_workers": args.waypoint_workers,
            "policies": POLICIES,
        },
        "summary": summary,
        "readings": readings,
        "failures": failures,
    }
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(json.dumps(summary, indent=2))
    return 0 if readings else 1


if __name__ == "__main__":
    sys.exit(main())
