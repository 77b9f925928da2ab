"""A SPIFFE certificate authority for standalone use (the role Istio's CA plays).

Certificates are made the way Istio's CA makes workload certificates: ECDSA P-256 keys, an empty
subject, the SPIFFE ID as the only (critical) URI SAN, both serverAuth and clientAuth extended key
usage, 24 hours of validity by default. Everything is PEM, ready to hand to the Rust core.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

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


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _public_der(key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey | object) -> bytes:
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        return b""
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _key_pem(key: RootKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# Roots this CA can sign with: its own are ECDSA P-256; an RSA root is accepted so a CA shared
# with other meshes works (Istio's test CA, many self-hosted ones, are RSA-2048).
RootKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


class CertificateAuthority:
    """A self-signed root that issues SPIFFE workload certificates for one trust domain."""

    def __init__(self, key: RootKey, cert: x509.Certificate, trust_domain: str):
        self._key = key
        self.certificate = cert
        self.trust_domain = trust_domain

    def __repr__(self) -> str:
        return f"CertificateAuthority({self.trust_domain!r})"

    @classmethod
    def create(
        cls, trust_domain: str = "cluster.local", *, now: dt.datetime | None = None
    ) -> CertificateAuthority:
        """A new root CA whose organization is the trust domain (as Istio's self-signed CA)."""
        now = now or _utcnow()
        key = _new_key()
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
                x509.NameAttribute(NameOID.COMMON_NAME, f"ambient root CA for {trust_domain}"),
            ]
        )
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW_ALLOWANCE)
            .not_valid_after(now + ROOT_CERT_TTL)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert, trust_domain)

    @property
    def roots_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

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
        key = _new_key()
        not_before = now - CLOCK_SKEW_ALLOWANCE
        not_after = now + ttl
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=True,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            # An empty subject makes the SAN extension critical (RFC 5280 section 4.2.1.6).
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(text)]), critical=True
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), False
            )
            .sign(self._key, hashes.SHA256())
        )
        return WorkloadCertificate(
            identity=text,
            chain_pem=cert.public_bytes(serialization.Encoding.PEM),
            key_pem=_key_pem(key),
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
            f.write(_key_pem(self._key))
        os.chmod(key_path, 0o600)

    @classmethod
    def load(cls, directory: Path | str) -> CertificateAuthority:
        """Load a CA written by :meth:`save`; the trust domain is the root's organization."""
        directory = Path(directory)
        cert = x509.load_pem_x509_certificate((directory / ROOT_CERT_FILE).read_bytes())
        key = serialization.load_pem_private_key((directory / ROOT_KEY_FILE).read_bytes(), None)
        if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise ValueError(f"{directory / ROOT_KEY_FILE}: expected an ECDSA or RSA private key")
        if _public_der(key.public_key()) != _public_der(cert.public_key()):
            raise ValueError(
                f"{directory / ROOT_KEY_FILE}: the key does not belong to the certificate "
                f"{directory / ROOT_CERT_FILE}"
            )
        orgs = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
        if not orgs:
            raise ValueError(
                f"{directory / ROOT_CERT_FILE}: root has no organization (trust domain)"
            )
        return cls(key, cert, str(orgs[0].value))
