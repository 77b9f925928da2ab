"""SPIFFE IDs and the standalone CA: certificates shaped like Istio's, keys kept private."""

from __future__ import annotations

import datetime as dt
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from ambient.identity import CertificateAuthority, InvalidSpiffeId, SpiffeId


def test_spiffe_id_round_trip_and_principal():
    sid = SpiffeId.parse("spiffe://cluster.local/ns/default/sa/sleep")
    assert sid == SpiffeId("cluster.local", "default", "sleep")
    assert str(sid) == "spiffe://cluster.local/ns/default/sa/sleep"
    assert sid.principal == "cluster.local/ns/default/sa/sleep"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("cluster.local/ns/a/sa/b", "starting with 'spiffe://'"),
        ("spiffe://cluster.local/a/b", "expected the form"),
        ("spiffe://cluster.local/ns//sa/b", "must be non-empty"),
    ],
)
def test_spiffe_id_refusals_say_what_was_expected(text, message):
    with pytest.raises(InvalidSpiffeId, match=message):
        SpiffeId.parse(text)


def test_workload_certificate_has_istios_shape():
    ca = CertificateAuthority.create("cluster.local")
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    cert = ca.issue("spiffe://cluster.local/ns/default/sa/sleep", now=now)
    leaf = x509.load_pem_x509_certificate(cert.chain_pem)
    assert leaf.subject == x509.Name([])
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [cert.identity]
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert isinstance(leaf.public_key(), ec.EllipticCurvePublicKey)
    assert leaf.public_key().curve.name == "secp256r1"
    assert leaf.not_valid_after_utc == now + dt.timedelta(hours=24)
    # Backdated 5 minutes, so a peer whose clock lags a little accepts it at once.
    assert leaf.not_valid_before_utc == now - dt.timedelta(minutes=5)
    # Renewed at half of that lifetime (24 h 5 min), as Istio's ztunnel does.
    assert cert.renew_at() == now + dt.timedelta(hours=11, minutes=57, seconds=30)
    leaf.verify_directly_issued_by(x509.load_pem_x509_certificate(ca.roots_pem))


def test_repr_never_shows_key_material():
    cert = CertificateAuthority.create().issue("spiffe://cluster.local/ns/a/sa/b")
    assert "PRIVATE" not in repr(cert) and "BEGIN" not in repr(cert)


def test_ca_save_writes_the_key_0600_and_loads_back(tmp_path):
    ca = CertificateAuthority.create("example.org")
    ca.save(tmp_path)
    mode = stat.S_IMODE((tmp_path / "root-key.pem").stat().st_mode)
    assert mode == 0o600
    loaded = CertificateAuthority.load(tmp_path)
    assert loaded.trust_domain == "example.org"
    assert loaded.roots_pem == ca.roots_pem
    leaf = x509.load_pem_x509_certificate(loaded.issue("spiffe://example.org/ns/a/sa/b").chain_pem)
    leaf.verify_directly_issued_by(x509.load_pem_x509_certificate(ca.roots_pem))


def test_issue_refuses_a_non_spiffe_identity():
    with pytest.raises(InvalidSpiffeId):
        CertificateAuthority.create().issue("not-an-id")


def test_the_root_is_shaped_like_istios_self_signed_ca():
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    root = x509.load_pem_x509_certificate(
        CertificateAuthority.create("example.org", now=now).roots_pem
    )
    assert root.subject == root.issuer
    orgs = root.subject.get_attributes_for_oid(x509.oid.NameOID.ORGANIZATION_NAME)
    assert [o.value for o in orgs] == ["example.org"]
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = root.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    assert root.not_valid_before_utc == now - dt.timedelta(minutes=5)
    assert root.not_valid_after_utc == now + dt.timedelta(days=3650)
    root.verify_directly_issued_by(root)


def test_serials_are_random_and_positive():
    ca = CertificateAuthority.create()
    serials = {
        x509.load_pem_x509_certificate(
            ca.issue("spiffe://cluster.local/ns/a/sa/b").chain_pem
        ).serial_number
        for _ in range(20)
    }
    assert len(serials) == 20 and all(0 < s < 2**159 for s in serials)


def _rewrite_key(path, fmt):
    key = serialization.load_pem_private_key(path.read_bytes(), None)
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())
    )


@pytest.mark.parametrize(
    ("spoil", "file", "message"),
    [
        (
            lambda d: _rewrite_key(
                d / "root-key.pem", serialization.PrivateFormat.TraditionalOpenSSL
            ),
            "root-key.pem",
            "expected an unencrypted PKCS#8 key .* found 'EC PRIVATE KEY'",
        ),
        (
            lambda d: (d / "root-key.pem").write_text("not a key"),
            "root-key.pem",
            "not PEM",
        ),
        (
            lambda d: (d / "root-cert.pem").write_bytes((d / "root-key.pem").read_bytes()),
            "root-cert.pem",
            "expected a 'CERTIFICATE' PEM block, found 'PRIVATE KEY'",
        ),
        (
            lambda d: (d / "root-key.pem").write_bytes(
                ec.generate_private_key(ec.SECP256R1()).private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            ),
            "root-key.pem",
            "does not belong to the certificate",
        ),
    ],
    ids=["sec1-key", "garbage-key", "key-as-certificate", "someone-elses-key"],
)
def test_a_spoiled_ca_directory_is_refused_naming_the_file(tmp_path, spoil, file, message):
    CertificateAuthority.create().save(tmp_path)
    spoil(tmp_path)
    with pytest.raises(ValueError, match=message) as refused:
        CertificateAuthority.load(tmp_path)
    assert str(refused.value).startswith(f"{tmp_path / file}: ")
