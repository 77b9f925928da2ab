//! A SPIFFE certificate authority's signing half: a root key and certificate that issue workload
//! certificates shaped like Istio's CA's (rcgen builds and signs them; ring makes the keys).
//!
//! Why in the core: the ztunnel issues a certificate per identity it serves, and minting in Rust
//! keeps a cryptography library out of the proxy's process (its import alone was 10 MiB of an idle
//! ztunnel's resident memory). What a certificate holds is decided in `ambient.identity.ca`; this
//! module only builds and signs what it is told.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};

fn invalid(what: impl std::fmt::Display) -> PyErr {
    PyValueError::new_err(what.to_string())
}

fn time_at(unix_seconds: i64, name: &str) -> PyResult<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp(unix_seconds)
        .map_err(|e| invalid(format!("{name}: {unix_seconds} is not a valid time ({e})")))
}

/// A random positive serial of 16 bytes, as RFC 5280 asks (at most 20 octets, positive).
fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01; // never a shorter encoding than 16 bytes: a leading zero byte would be dropped
    SerialNumber::from_slice(&bytes)
}

/// A root CA that signs workload certificates: its key, its certificate (PEM) and the issuer
/// name and key identifier every certificate it signs carries.
#[pyclass(frozen, module = "ambient._core")]
pub struct CertificateSigner {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    organization: Option<String>,
}

impl CertificateSigner {
    fn leaf(&self, identity: &str, not_before: i64, not_after: i64) -> PyResult<(String, KeyPair)> {
        let uri = identity
            .try_into()
            .map_err(|_| invalid(format!("identity: {identity:?} is not an ASCII URI")))?;
        let mut params = CertificateParams::default();
        // An empty subject (as Istio's CA): the SPIFFE ID is the only name, in a critical SAN.
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        params.not_before = time_at(not_before, "not_before")?;
        params.not_after = time_at(not_after, "not_after")?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(|e| invalid(format!("generating a P-256 key: {e}")))?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| invalid(format!("signing a certificate for {identity}: {e}")))?;
        Ok((cert.pem(), key))
    }
}

#[pymethods]
impl CertificateSigner {
    /// A new self-signed root: ECDSA P-256, organization `trust_domain`, common name
    /// `common_name`, valid from `not_before` to `not_after` (Unix seconds).
    #[staticmethod]
    fn create(
        trust_domain: &str,
        common_name: &str,
        not_before: i64,
        not_after: i64,
    ) -> PyResult<Self> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(|e| invalid(format!("generating a P-256 key: {e}")))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, trust_domain);
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
        ];
        params.serial_number = Some(random_serial());
        params.not_before = time_at(not_before, "not_before")?;
        params.not_after = time_at(not_after, "not_after")?;
        let cert = params
            .self_signed(&key)
            .map_err(|e| invalid(format!("signing the root: {e}")))?;
        Ok(Self {
            issuer: Issuer::new(params, key),
            cert_pem: cert.pem(),
            organization: Some(trust_domain.to_owned()),
        })
    }

    /// The CA of a root certificate and its private key, both PEM. The key must be PKCS#8
    /// (`BEGIN PRIVATE KEY`), ECDSA P-256/P-384 or RSA, and must be the certificate's.
    #[staticmethod]
    fn load(cert_pem: &[u8], key_pem: &[u8]) -> PyResult<Self> {
        let cert_pem = std::str::from_utf8(cert_pem)
            .map_err(|_| invalid("certificate: expected PEM text, found non-UTF-8 bytes"))?;
        let key_text = std::str::from_utf8(key_pem)
            .map_err(|_| invalid("key: expected PEM text, found non-UTF-8 bytes"))?;
        let cert_block =
            pem::parse(cert_pem).map_err(|e| invalid(format!("certificate: not PEM ({e})")))?;
        if cert_block.tag() != "CERTIFICATE" {
            return Err(invalid(format!(
                "certificate: expected a 'CERTIFICATE' PEM block, found '{}'",
                cert_block.tag()
            )));
        }
        let key_block = pem::parse(key_text).map_err(|e| invalid(format!("key: not PEM ({e})")))?;
        if key_block.tag() != "PRIVATE KEY" {
            return Err(invalid(format!(
                "key: expected an unencrypted PKCS#8 key ('PRIVATE KEY' PEM block), found '{}' \
                 (convert it with `openssl pkcs8 -topk8 -nocrypt`)",
                key_block.tag()
            )));
        }
        let key = KeyPair::try_from(key_block.contents()).map_err(|e| {
            invalid(format!(
                "key: expected an ECDSA P-256/P-384 or RSA PKCS#8 key ({e})"
            ))
        })?;
        let (_, parsed) = X509Certificate::from_der(cert_block.contents())
            .map_err(|e| invalid(format!("certificate: not an X.509 certificate ({e})")))?;
        if parsed.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(invalid("key: it does not belong to the certificate"));
        }
        let organization = parsed
            .subject()
            .iter_organization()
            .next()
            .and_then(|o| o.as_str().ok())
            .map(str::to_owned);
        let subject = parsed.subject().as_raw().to_vec();
        let issuer = Issuer::from_ca_cert_der(&cert_block.contents().to_vec().into(), key)
            .map_err(|e| invalid(format!("certificate: cannot issue under it ({e})")))?;
        let signer = Self {
            issuer,
            cert_pem: cert_pem.to_owned(),
            organization,
        };
        // A peer matches a leaf's issuer to the root's subject byte for byte: make sure the name
        // the issuer writes is the root's exactly (rcgen re-encodes it from the parsed subject).
        let (probe, _) = signer.leaf("spiffe://probe/ns/probe/sa/probe", 0, 1)?;
        let probe = pem::parse(probe).map_err(|e| invalid(format!("probe: {e}")))?;
        let (_, probe) = X509Certificate::from_der(probe.contents())
            .map_err(|e| invalid(format!("probe: {e}")))?;
        if probe.issuer().as_raw() != subject.as_slice() {
            return Err(invalid(
                "certificate: its subject name cannot be written back exactly as an issuer name",
            ));
        }
        Ok(signer)
    }

    /// A fresh P-256 key and a certificate for the SPIFFE ID `identity`, valid from `not_before`
    /// to `not_after` (Unix seconds): (certificate PEM, PKCS#8 key PEM).
    fn issue<'py>(
        &self,
        py: Python<'py>,
        identity: &str,
        not_before: i64,
        not_after: i64,
    ) -> PyResult<(Bound<'py, PyBytes>, Bound<'py, PyBytes>)> {
        let (cert, key) = py.detach(|| self.leaf(identity, not_before, not_after))?;
        let key_pem = key.serialize_pem();
        Ok((
            PyBytes::new(py, cert.as_bytes()),
            PyBytes::new(py, key_pem.as_bytes()),
        ))
    }

    /// The root certificate, PEM.
    #[getter]
    fn cert_pem<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, self.cert_pem.as_bytes())
    }

    /// The root's private key, PKCS#8 PEM (to save it; never logged).
    #[getter]
    fn key_pem<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, self.issuer.key().serialize_pem().as_bytes())
    }

    /// The root subject's first organization (Istio's CA names its trust domain there).
    #[getter]
    fn organization(&self) -> Option<String> {
        self.organization.clone()
    }

    fn __repr__(&self) -> String {
        format!("CertificateSigner({:?})", self.organization)
    }
}
