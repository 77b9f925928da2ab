"""RequestAuthentication (JWT) at a waypoint: which rules apply, what they say, and the JWKS they
verify with. The per-request work (finding the token, verifying it, its claims) is the core's
(``rust/src/waypoint/authn.rs``, over the ``jsonwebtoken`` crate); this module compiles the
rules into the waypoint's table and keeps the remote key sets fresh.

Which: RequestAuthentications whose ``targetRefs`` name this waypoint's Gateway, a Service it
serves, or (from ``istio-system``) the ``istio-waypoint`` GatewayClass, as for
AuthorizationPolicy (:mod:`ambient.waypoint.authz`).

Per request (Istio's semantics): the token is looked for where the rules say (``fromHeaders``
with their prefix, ``fromParams``, ``fromCookies``; by default ``Authorization: Bearer …``, then
the ``access_token`` parameter). No token: the request goes on with no request principal (an
AuthorizationPolicy with ``requestPrincipals: ["*"]`` then requires one). A token is checked by
the rule of its issuer: signature (RS256/384/512, PS256/384/512, ES256/384, EdDSA) with the key
of its ``kid`` (or, without a ``kid``, any key of the set that fits the algorithm), ``exp`` and
``nbf`` with 60 s of clock skew allowed, the issuer, and ``aud`` against ``audiences`` (any; no
``audiences``: not checked). Any failure — ``alg: none``, an unknown ``kid``, an algorithm the
key does not allow, expired, not yet valid, a wrong audience, an issuer no rule names, a key set
that could not be fetched — is answered ``401`` with ``www-authenticate: Bearer realm="…",
error="invalid_token"``. A valid token gives the request principal ``iss/sub``, its audiences,
presenter (``azp``) and claims to authorization; ``outputPayloadToHeader`` and
``outputClaimToHeaders`` add headers; the token is removed from the header it came in unless
``forwardOriginalToken``. Verified tokens are remembered (bounded, until they expire).

``jwks`` inline or ``jwksUri`` (fetched over HTTP or HTTPS, cached, refreshed every
``refresh`` seconds, sooner while failing). A failed fetch keeps the last good set; with none,
the rule's tokens are refused and the failure is reported (logged, and in ``config_dump``),
while other rules keep working.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ..config import kubernetes as k8s

# The module, not its names: config imports this module while authz may still be loading.
from . import authz

log = logging.getLogger(__name__)

# How long a JWKS fetch may take, when the rule gives no `timeout` (Istio's default).
DEFAULT_FETCH_TIMEOUT = 5.0
# Istio refreshes remote key sets every 20 minutes; a failed fetch is retried sooner.
DEFAULT_REFRESH = 1200.0
RETRY_AFTER_FAILURE = 10.0


@dataclass(frozen=True)
class JwtRule:
    issuer: str
    audiences: tuple[str, ...] = ()
    jwks: str | None = None
    jwks_uri: str | None = None
    from_headers: tuple[tuple[str, str], ...] = ()  # (name lower-cased, prefix)
    from_params: tuple[str, ...] = ()
    from_cookies: tuple[str, ...] = ()
    output_payload_to_header: str | None = None
    output_claim_to_headers: tuple[tuple[str, str], ...] = ()  # (header, claim)
    forward_original_token: bool = False
    timeout: float = DEFAULT_FETCH_TIMEOUT


@dataclass(frozen=True)
class RequestAuthn:
    namespace: str
    name: str
    targets: tuple[authz.Target, ...]
    rules: tuple[JwtRule, ...]

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def seconds(text: str, where: str) -> float:
    """A duration (`5s`, `500ms`, `1m`, `0.5s`) in seconds; :class:`AuthzError` at ``where``."""
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    for unit in ("ms", "s", "m", "h"):
        if text.endswith(unit):
            try:
                return float(text[: -len(unit)]) * units[unit]
            except ValueError:
                break
    raise authz.AuthzError(where, f"expected a duration such as 5s or 500ms, got {text!r}")


def _check_jwks(text: str, where: str) -> None:
    try:
        keys = json.loads(text).get("keys")
    except (ValueError, AttributeError):
        keys = None
    if not isinstance(keys, list):
        raise authz.AuthzError(where, 'expected a JSON Web Key Set: {"keys": [...]}')


def _rule(rule: k8s.JWTRule, where: str) -> JwtRule:
    if not rule.issuer:
        raise authz.AuthzError(f"{where}.issuer", "a JWT rule needs its issuer")
    if rule.jwks is not None:
        _check_jwks(rule.jwks, f"{where}.jwks")
    elif rule.jwksUri is None:
        raise authz.AuthzError(
            where,
            "give jwks (inline) or jwksUri: OpenID discovery from the issuer is not supported",
        )
    elif not rule.jwksUri.startswith(("http://", "https://")):
        raise authz.AuthzError(f"{where}.jwksUri", f"expected an http(s) URL, got {rule.jwksUri!r}")
    for i, h in enumerate(rule.fromHeaders):
        if not h.name or any(c in h.name for c in " :\t"):
            raise authz.AuthzError(
                f"{where}.fromHeaders[{i}].name", f"not a header name: {h.name!r}"
            )
    return JwtRule(
        issuer=rule.issuer,
        audiences=tuple(rule.audiences),
        jwks=rule.jwks,
        jwks_uri=None if rule.jwks is not None else rule.jwksUri,
        from_headers=tuple((h.name.lower(), h.prefix) for h in rule.fromHeaders),
        from_params=tuple(rule.fromParams),
        from_cookies=tuple(rule.fromCookies),
        output_payload_to_header=rule.outputPayloadToHeader,
        output_claim_to_headers=tuple((c.header, c.claim) for c in rule.outputClaimToHeaders),
        forward_original_token=rule.forwardOriginalToken,
        timeout=seconds(rule.timeout, f"{where}.timeout")
        if rule.timeout
        else DEFAULT_FETCH_TIMEOUT,
    )


def compile_authn(resource: k8s.RequestAuthentication) -> RequestAuthn:
    """A RequestAuthentication with targetRefs; :class:`AuthzError` names what it cannot take."""
    meta = resource.metadata
    return RequestAuthn(
        namespace=meta.namespace,
        name=meta.name,
        targets=authz.targets_of(resource),
        rules=tuple(_rule(r, f"spec.jwtRules[{i}]") for i, r in enumerate(resource.spec.jwtRules)),
    )


class JwksCache:
    """Remote key sets by URI: fetched when first needed, refreshed every ``refresh`` seconds
    in the background (every :data:`RETRY_AFTER_FAILURE` while failing); ``changed`` is called
    when a set's text changes, so the waypoint recompiles its table."""

    def __init__(
        self,
        refresh: float = DEFAULT_REFRESH,
        changed: Callable[[], None] | None = None,
        fetch: Callable[[str, float], str] | None = None,
    ) -> None:
        self.refresh = refresh
        self.changed = changed
        self._fetch = fetch or _fetch
        self._lock = threading.Lock()
        # uri -> (last good text or None, last error or None, next refresh at, timeout)
        self._sets: dict[str, tuple[str | None, str | None, float, float]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def get(self, uri: str, timeout: float) -> tuple[str | None, str | None]:
        """The set at ``uri`` (fetched now if never tried) and the last fetch's error."""
        with self._lock:
            known = self._sets.get(uri)
        if known is None:
            known = self._update(uri, timeout)
        return known[0], known[1]

    def _update(self, uri: str, timeout: float) -> tuple[str | None, str | None, float, float]:
        with self._lock:
            previous = self._sets.get(uri)
        try:
            text = self._fetch(uri, timeout)
            _check_jwks(text, uri)
            entry: tuple[str | None, str | None, float, float] = (
                text,
                None,
                time.monotonic() + self.refresh,
                timeout,
            )
        except (OSError, ValueError) as e:  # urllib's URLError is an OSError
            why = f"cannot fetch the JWKS at {uri}: {e}"
            log.warning(
                "%s%s", why, " (keeping the last good set)" if previous and previous[0] else ""
            )
            entry = (
                previous[0] if previous else None,
                why,
                time.monotonic() + RETRY_AFTER_FAILURE,
                timeout,
            )
        with self._lock:
            self._sets[uri] = entry
        return entry

    def status(self) -> dict[str, Any]:
        """What ``config_dump`` shows: each URI, whether a set is held, the last error."""
        with self._lock:
            return {
                uri: {"keys": text is not None, "error": error}
                for uri, (text, error, _, _) in self._sets.items()
            }

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="jwks-refresh", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            with self._lock:
                due = [
                    (uri, timeout)
                    for uri, (_, _, at, timeout) in self._sets.items()
                    if at <= time.monotonic()
                ]
            changed = False
            for uri, timeout in due:
                with self._lock:
                    before = self._sets[uri][:2]
                after = self._update(uri, timeout)[:2]
                changed |= after != before
            if changed and self.changed is not None:
                self.changed()


def _fetch(uri: str, timeout: float) -> str:
    # Imported here: urllib.request loads OpenSSL (for https), which no process needs until it
    # fetches a key set (ztunnel's loads the config but must not carry OpenSSL).
    import urllib.request

    with urllib.request.urlopen(
        uri, timeout=timeout
    ) as response:  # http(s) only: checked when the rule was loaded
        body: bytes = response.read(1 << 20)
        return body.decode()


def rules_json(authns: Iterable[RequestAuthn], jwks: JwksCache | None) -> list[dict[str, Any]]:
    """The rules of ``authns`` for the core's table, each with its key set's text (``None``
    and why, when a remote set could not be fetched)."""
    out = []
    for authn in authns:
        for rule in authn.rules:
            text, error = rule.jwks, None
            if rule.jwks_uri is not None:
                if jwks is None:
                    text, error = None, f"the JWKS at {rule.jwks_uri} is not fetched here"
                else:
                    text, error = jwks.get(rule.jwks_uri, rule.timeout)
            out.append(
                {
                    "policy": authn.key,
                    "issuer": rule.issuer,
                    "audiences": list(rule.audiences),
                    "jwks": text,
                    "jwks_error": error if text is None else None,
                    "from_headers": [list(h) for h in rule.from_headers],
                    "from_params": list(rule.from_params),
                    "from_cookies": list(rule.from_cookies),
                    "output_payload_to_header": rule.output_payload_to_header,
                    "output_claim_to_headers": [list(c) for c in rule.output_claim_to_headers],
                    "forward_original_token": rule.forward_original_token,
                }
            )
    return out
