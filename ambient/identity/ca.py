"""A SPIFFE certificate authority for standalone use (the role Istio's CA plays).

Certificates are made the way Istio's CA makes workload certificates: ECDSA P-256 keys, an empty
subject, the SPIFFE ID as the only (critical) URI SAN, both serverAuth and clientAuth extended key
usage, 24 hours of validity by default. Everything is PEM, ready to hand to the Rust core.

What a certificate holds is decided here; the core's :class:`~ambient._core.CertificateSigner`
makes the keys and signs (rcgen over ring), so a running ztunnel never imports a cryptography
library for the certificates it issues.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path

from .._core import CertificateSigner
from .spiffe import SpiffeId

WORKLOAD_CERT_TTL = dt.timedelta(hours=24)  # Istio's default workload certificate lifetime
ROOT_CERT_TTL = dt.timedelta(days=3650)
# Backdate so a peer whose clock is slightly behind still accepts a fresh certificate.
CLOCK_SKEW_ALLOWANCE = dt.timedelta(minutes=5)

ROOT_CERT_FILE = "root-cert.pem"
ROOT_KEY_FILE = "root-key.pem"


@dataclass(frozen=True)
class WorkloadCertificate:
    """A workload's certificate chain (leaf first), private key and trusted roots, as PEM."""

    identity: str
    chain_pem: bytes
    key_pem: bytes
    roots_pem: bytes
    not_before: dt.datetime
    not_after: dt.datetime

    def __repr__(self) -> str:  # never print key material
        return f"WorkloadCertificate({self.identity!r}, not_after={self.not_after.isoformat()})"

    def renew_at(self) -> dt.datetime:
        """Istio refreshes workload certificates at half of their lifetime."""
        return self.not_before + (self.not_after - self.not_before) / 2


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _seconds(when: dt.datetime) -> int:
    """Unix seconds (X.509 times have no finer resolution)."""
    return int(when.timestamp())


class CertificateAuthority:
    """A self-signed root that issues SPIFFE workload certificates for one trust domain.

    Its own roots are ECDSA P-256; a loaded root may be RSA, so a CA shared with other meshes works
    (Istio's test CA, many self-hosted ones, are RSA-2048)."""

    def __init__(self, signer: CertificateSigner, trust_domain: str):
        self._signer = signer
        self.trust_domain = trust_domain

    def __repr__(self) -> str:
        return f"CertificateAuthority({self.trust_domain!r})"

    @classmethod
    def create(
        cls, trust_domain: str = "cluster.local", *, now: dt.datetime | None = None
    ) -> CertificateAuthority:
        """A new root CA whose organization is the trust domain (as Istio's self-signed CA)."""
        now = now or _utcnow()
        signer = CertificateSigner.create(
            trust_domain,
            f"ambient root CA for {trust_domain}",
            _seconds(now - CLOCK_SKEW_ALLOWANCE),
            _seconds(now + ROOT_CERT_TTL),
        )
        return cls(signer, trust_domain)

    @property
    def roots_pem(self) -> bytes:
        return bytes(self._signer.cert_pem)

    @property
    def signing_key_pem(self) -> bytes:
        """The root's private key (PEM), for signing CSRs (Istio's CA API, ``istio_ca``)."""
        return bytes(self._signer.key_pem)

    def issue(
        self,
        identity: SpiffeId | str,
        *,
        now: dt.datetime | None = None,
        ttl: dt.timedelta = WORKLOAD_CERT_TTL,
    ) -> WorkloadCertificate:
        """Issue a fresh key and certificate for ``identity``.

        The identity may belong to another trust domain than this CA's; that is how tests build a
        certificate that a peer must refuse (Istio checks the trust domain at the handshake).
        """
        text = str(identity)
        SpiffeId.parse(text)  # refuse anything that is not an Istio-shaped SPIFFE ID
        now = now or _utcnow()
        not_before = now - CLOCK_SKEW_ALLOWANCE
        not_after = now + ttl
        chain_pem, key_pem = self._signer.issue(text, _seconds(not_before), _seconds(not_after))
        return WorkloadCertificate(
            identity=text,
            chain_pem=chain_pem,
            key_pem=key_pem,
            roots_pem=self.roots_pem,
            not_before=not_before,
            not_after=not_after,
        )

    def save(self, directory: Path | str) -> None:
        """Write the root certificate and key; the key file is 0600 before any byte is written."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / ROOT_CERT_FILE).write_bytes(self.roots_pem)
        key_path = directory / ROOT_KEY_FILE
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(self._signer.key_pem)
        os.chmod(key_path, 0o600)

    @classmethod
    def load(cls, directory: Path | str) -> CertificateAuthority:
        """Load a CA written by :meth:`save`; the trust domain is the root's organization."""
        directory = Path(directory)
        cert_path, key_path = directory / ROOT_CERT_FILE, directory / ROOT_KEY_FILE
        try:
            signer = CertificateSigner.load(cert_path.read_bytes(), key_path.read_bytes())
        except ValueError as e:
            # The core names the piece ("certificate: ...", "key: ..."); we name the file.
            piece, _, why = str(e).partition(": ")
            path = key_path if piece == "key" else cert_path
            raise ValueError(f"{path}: {why}") from None
        if signer.organization is None:
            raise ValueError(f"{cert_path}: root has no organization (trust domain)")
        return cls(signer, signer.organization)
