//! Workload identities the core can speak as: certificate chain, key and trust roots for a SPIFFE
//! ID, parsed once from PEM into ready TLS configurations.
//!
//! Rotation is a replacement in the store: connections made afterwards use the new material,
//! connections already up keep the one they were made with (nothing is dropped).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use rustls::server::{ClientHello, NoServerSessionStorage, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::tls::{self, ExpectedIdentityVerifier, FixedClientCert, TrustDomainClientVerifier};

/// One workload's TLS material and the configurations derived from it.
#[derive(Debug)]
pub struct IdentityMaterial {
    pub identity: Arc<str>,
    pub trust_domain: String,
    certified: Arc<CertifiedKey>,
    roots: Arc<RootCertStore>,
    /// Server side of HBONE for this workload: requires a client certificate in our trust domain.
    pub server_config: Arc<ServerConfig>,
}

#[derive(Debug)]
struct FixedServerCert(Arc<CertifiedKey>);

impl ResolvesServerCert for FixedServerCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

impl IdentityMaterial {
    /// Parse PEM material for `identity`. Errors name the piece that is wrong and never include key
    /// bytes.
    pub fn from_pem(
        identity: &str,
        chain_pem: &[u8],
        key_pem: &[u8],
        roots_pem: &[u8],
    ) -> Result<Self, String> {
        let trust_domain = tls::trust_domain(identity)
            .ok_or_else(|| {
                format!("{identity:?} is not a SPIFFE ID (spiffe://<trust domain>/...)")
            })?
            .to_string();
        let chain = CertificateDer::pem_slice_iter(chain_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("certificate chain of {identity}: bad PEM ({e})"))?;
        let leaf = chain
            .first()
            .ok_or_else(|| format!("certificate chain of {identity}: no CERTIFICATE block"))?;
        let sans = tls::uri_sans(leaf);
        if !sans.iter().any(|san| san == identity) {
            return Err(format!(
                "certificate of {identity}: its URI SANs {sans:?} do not include that identity"
            ));
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem)
            .map_err(|_| format!("private key of {identity}: expected one PEM private key"))?;
        let mut roots = RootCertStore::empty();
        for root in CertificateDer::pem_slice_iter(roots_pem) {
            let root = root.map_err(|e| format!("roots of {identity}: bad PEM ({e})"))?;
            roots
                .add(root)
                .map_err(|e| format!("roots of {identity}: unusable certificate ({e})"))?;
        }
        if roots.is_empty() {
            return Err(format!("roots of {identity}: no CERTIFICATE block"));
        }
        let provider = tls::provider();
        let certified = CertifiedKey::from_der(chain, key, &provider).map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => {
                format!("private key of {identity} does not match its certificate")
            }
            other => format!("private key of {identity}: unusable ({other})"),
        })?;
        let certified = Arc::new(certified);
        let roots = Arc::new(roots);

        let verifier =
            TrustDomainClientVerifier::new(roots.clone(), trust_domain.clone(), provider.clone())?;
        let mut server_config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| format!("TLS server config: {e}"))?
            .with_client_cert_verifier(Arc::new(verifier))
            .with_cert_resolver(Arc::new(FixedServerCert(certified.clone())));
        server_config.alpn_protocols = vec![tls::ALPN_H2.to_vec()];
        // Istio's ztunnel neither issues tickets nor caches sessions: every connection is a full
        // handshake, so every connection proves its identity afresh.
        server_config.session_storage = Arc::new(NoServerSessionStorage {});
        server_config.send_tls13_tickets = 0;

        Ok(Self {
            identity: Arc::from(identity),
            trust_domain,
            certified,
            roots,
            server_config: Arc::new(server_config),
        })
    }

    /// Client side of HBONE as this workload, accepting only a server holding one of `expected`.
    pub fn client_config(&self, expected: &[Arc<str>]) -> Result<Arc<ClientConfig>, String> {
        let provider = tls::provider();
        let verifier = ExpectedIdentityVerifier::new(
            self.roots.clone(),
            expected.iter().map(|s| s.to_string()).collect(),
            &provider,
        );
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| format!("TLS client config: {e}"))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_cert_resolver(Arc::new(FixedClientCert(self.certified.clone())));
        config.alpn_protocols = vec![tls::ALPN_H2.to_vec()];
        config.enable_sni = false;
        config.resumption = rustls::client::Resumption::disabled();
        Ok(Arc::new(config))
    }
}

/// The identities a core holds, by SPIFFE ID.
#[derive(Default)]
pub struct IdentityStore {
    inner: RwLock<HashMap<String, Arc<IdentityMaterial>>>,
}

impl IdentityStore {
    pub fn get(&self, identity: &str) -> Option<Arc<IdentityMaterial>> {
        self.inner.read().unwrap().get(identity).cloned()
    }

    /// Add or replace (rotate) an identity.
    pub fn set(&self, material: IdentityMaterial) {
        self.inner
            .write()
            .unwrap()
            .insert(material.identity.to_string(), Arc::new(material));
    }

    pub fn remove(&self, identity: &str) -> bool {
        self.inner.write().unwrap().remove(identity).is_some()
    }

    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.inner.read().unwrap().keys().cloned().collect();
        names.sort();
        names
    }
}
