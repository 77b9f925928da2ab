"""SPIFFE identities as the ambient mesh uses them.

Istio names a workload ``spiffe://<trust domain>/ns/<namespace>/sa/<service account>``; the trust
domain defaults to ``cluster.local`` and the service account to ``default``.
"""

from __future__ import annotations

from dataclasses import dataclass

SPIFFE_SCHEME = "spiffe://"
DEFAULT_TRUST_DOMAIN = "cluster.local"
DEFAULT_SERVICE_ACCOUNT = "default"


class InvalidSpiffeId(ValueError):
    """A string that is not an Istio-shaped SPIFFE ID; the message says what was expected."""


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """The identity of a workload: who it is, as its certificate's URI SAN says."""

    trust_domain: str
    namespace: str
    service_account: str = DEFAULT_SERVICE_ACCOUNT

    def __str__(self) -> str:
        return f"{SPIFFE_SCHEME}{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    @property
    def principal(self) -> str:
        """The form AuthorizationPolicy principals use: the ID without ``spiffe://``."""
        return str(self)[len(SPIFFE_SCHEME) :]

    @classmethod
    def parse(cls, text: str) -> SpiffeId:
        """Parse ``spiffe://td/ns/NS/sa/SA``; raise :class:`InvalidSpiffeId` naming the defect."""
        if not text.startswith(SPIFFE_SCHEME):
            raise InvalidSpiffeId(f"{text!r}: expected a SPIFFE ID starting with 'spiffe://'")
        parts = text[len(SPIFFE_SCHEME) :].split("/")
        if len(parts) != 5 or parts[1] != "ns" or parts[3] != "sa":
            raise InvalidSpiffeId(
                f"{text!r}: expected the form spiffe://<trust domain>/ns/<namespace>/sa/<account>"
            )
        trust_domain, _, namespace, _, account = parts
        if not trust_domain or not namespace or not account:
            raise InvalidSpiffeId(
                f"{text!r}: trust domain, namespace and account must be non-empty"
            )
        return cls(trust_domain, namespace, account)
