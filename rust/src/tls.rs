//! Mutual TLS as Istio's ztunnel does it: TLS 1.3 only, ALPN `h2`, no SNI, no resumption, and
//! SPIFFE checks on both sides.
//!
//! - Server side: a client certificate is required, its chain must verify against the roots, and
//!   one of its URI SANs must be a SPIFFE ID in the *server's own* trust domain.
//! - Client side: the server chain must verify against the roots, and one of its URI SANs must be
//!   exactly one of the identities expected for this connection.
//!
//! Chain verification is webpki's (through rustls); SANs are read with `x509-parser`.

use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::ResolvesClientCert;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error, RootCertStore,
    SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

/// ALPN protocol id HBONE negotiates on both sides.
pub const ALPN_H2: &[u8] = b"h2";

/// The crypto provider every HBONE connection uses: Istio's ztunnel offers exactly these two
/// TLS 1.3 suites, in this order.
pub fn provider() -> Arc<CryptoProvider> {
    let base = rustls::crypto::ring::default_provider();
    Arc::new(CryptoProvider {
        cipher_suites: vec![
            rustls::crypto::ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
            rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
        ],
        ..base
    })
}

/// The URI SANs of a DER certificate. A certificate that does not parse has none.
pub fn uri_sans(cert: &CertificateDer<'_>) -> Vec<String> {
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
        return Vec::new();
    };
    let Ok(Some(san)) = parsed.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            x509_parser::extensions::GeneralName::URI(uri) => Some((*uri).to_string()),
            _ => None,
        })
        .collect()
}

/// The trust domain of a SPIFFE ID (`spiffe://<td>/...`), if it is one.
pub fn trust_domain(spiffe_id: &str) -> Option<&str> {
    let rest = spiffe_id.strip_prefix("spiffe://")?;
    let (td, path) = rest.split_once('/')?;
    (!td.is_empty() && !path.is_empty()).then_some(td)
}

/// The first URI SAN of `cert` that is a SPIFFE ID in `trust_domain`.
pub fn spiffe_identity_in(cert: &CertificateDer<'_>, domain: &str) -> Option<String> {
    uri_sans(cert)
        .into_iter()
        .find(|san| trust_domain(san) == Some(domain))
}

fn rejected(message: String) -> Error {
    Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(
        SpiffeMismatch(message),
    ))))
}

/// A certificate that verified but carries the wrong identity; the text says what was expected.
#[derive(Debug)]
pub struct SpiffeMismatch(pub String);

impl fmt::Display for SpiffeMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SpiffeMismatch {}

/// Server side: webpki chain verification plus the trust-domain check on the client's URI SANs.
#[derive(Debug)]
pub struct TrustDomainClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl TrustDomainClientVerifier {
    pub fn new(
        roots: Arc<RootCertStore>,
        trust_domain: String,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, String> {
        let inner = WebPkiClientVerifier::builder_with_provider(roots, provider)
            .build()
            .map_err(|e| format!("cannot build the client verifier: {e}"))?;
        Ok(Self {
            inner,
            trust_domain,
        })
    }
}

impl ClientCertVerifier for TrustDomainClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        if spiffe_identity_in(end_entity, &self.trust_domain).is_none() {
            return Err(rejected(format!(
                "client certificate has no SPIFFE identity in trust domain {:?} (its URI SANs: {:?})",
                self.trust_domain,
                uri_sans(end_entity)
            )));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Client side: the server is accepted only if its chain verifies and one of its URI SANs is one of
/// the identities expected for this connection (the destination's, or its waypoint's).
#[derive(Debug)]
pub struct ExpectedIdentityVerifier {
    roots: Arc<RootCertStore>,
    expected: Vec<String>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ExpectedIdentityVerifier {
    pub fn new(
        roots: Arc<RootCertStore>,
        expected: Vec<String>,
        provider: &CryptoProvider,
    ) -> Self {
        Self {
            roots,
            expected,
            algorithms: provider.signature_verification_algorithms,
        }
    }
}

impl ServerCertVerifier for ExpectedIdentityVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        let sans = uri_sans(end_entity);
        if sans.iter().any(|san| self.expected.contains(san)) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rejected(format!(
                "server identity mismatch: expected one of {:?}, the certificate has {:?}",
                self.expected, sans
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        // The configs only enable TLS 1.3; reaching this would be a rustls bug.
        Err(Error::General("TLS 1.2 is not allowed for HBONE".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Always presents the same workload certificate as the client's.
#[derive(Debug)]
pub struct FixedClientCert(pub Arc<CertifiedKey>);

impl ResolvesClientCert for FixedClientCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Human text for a TLS failure, naming the peer: what a log line or an error to Python says.
pub fn describe_handshake_error(peer: &str, err: &std::io::Error) -> String {
    let detail = match err.get_ref().and_then(|e| e.downcast_ref::<Error>()) {
        // Our own SPIFFE refusals carry a full sentence; show it instead of rustls' Debug form.
        Some(Error::InvalidCertificate(CertificateError::Other(other))) => other.0.to_string(),
        Some(Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        )) => "the peer's certificate has expired".into(),
        Some(Error::InvalidCertificate(
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. },
        )) => "the peer's certificate is not valid yet (clock skew?)".into(),
        Some(Error::InvalidCertificate(CertificateError::UnknownIssuer)) => {
            "the peer's certificate is not signed by a trusted root".into()
        }
        Some(Error::InvalidCertificate(reason)) => format!("invalid peer certificate: {reason:?}"),
        Some(Error::AlertReceived(alert)) => format!("the peer refused it with alert {alert:?}"),
        Some(Error::InvalidMessage(what)) => format!("the peer does not speak TLS ({what:?})"),
        Some(Error::NoApplicationProtocol) => "no common ALPN protocol (HBONE needs h2)".into(),
        Some(other) => other.to_string(),
        None if err.kind() == std::io::ErrorKind::InvalidData => {
            format!("not a TLS peer ({err})")
        }
        None => err.to_string(),
    };
    format!("TLS handshake with {peer} failed: {detail}")
}
