//! TLS on both sides: the client configuration used towards nodes (verification, client
//! certificate, ALPN) and the server-side certificate store chosen by SNI.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

/// The crypto provider used everywhere (ring).
pub fn provider() -> Arc<CryptoProvider> {
    static P: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    P.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider())).clone()
}

/// Errors while loading certificates and keys.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("no PEM certificate found")]
    NoCertificate,
    #[error("invalid PEM certificate: {0}")]
    BadCertificate(String),
    #[error("invalid or unsupported private key: {0}")]
    BadKey(String),
    #[error("{0}")]
    Rustls(#[from] rustls::Error),
}

/// Parses a PEM certificate chain.
pub fn parse_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem.as_bytes()).collect();
    let certs = certs.map_err(|e| TlsError::BadCertificate(e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate);
    }
    Ok(certs)
}

/// Parses a PEM private key (PKCS#8, PKCS#1 or SEC1).
pub fn parse_key(pem: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| TlsError::BadKey(e.to_string()))
}

/// Builds a signing certificate from PEM text and checks that key and certificate belong together.
pub fn certified_key(cert_pem: &str, key_pem: &str) -> Result<Arc<CertifiedKey>, TlsError> {
    let certs = parse_certs(cert_pem)?;
    let key = parse_key(key_pem)?;
    let ck = CertifiedKey::from_der(certs, key, &provider())?;
    Ok(Arc::new(ck))
}

/// The system's trust anchors plus any extra PEM bundle, loaded once.
pub fn root_store(extra_pem: Option<&str>) -> Result<Arc<RootCertStore>, TlsError> {
    static SYSTEM: OnceLock<Vec<CertificateDer<'static>>> = OnceLock::new();
    let system = SYSTEM.get_or_init(|| rustls_native_certs::load_native_certs().certs);
    let mut store = RootCertStore::empty();
    let _ = store.add_parsable_certificates(system.iter().cloned());
    if let Some(pem) = extra_pem {
        for c in parse_certs(pem)? {
            store.add(c)?;
        }
    }
    Ok(Arc::new(store))
}

/// TLS settings towards the nodes of one upstream.
#[derive(Debug)]
pub struct ClientTls {
    /// Offers ALPN `h2` and `http/1.1` (https upstreams: HTTP/2 where the node speaks it).
    pub auto: Arc<ClientConfig>,
    /// Offers ALPN `h2` only (grpcs upstreams).
    pub h2: Arc<ClientConfig>,
    /// Offers no ALPN (TLS origination for L4 streams).
    pub raw: Arc<ClientConfig>,
    /// Distinguishes pools of connections made with different verification or client
    /// certificates, so a connection is only reused with the settings it was made with.
    pub pool_id: u64,
}

/// Inputs of [`ClientTls::new`].
pub struct ClientTlsOptions {
    /// Verify the node's certificate against `roots`.
    pub verify: bool,
    pub roots: Arc<RootCertStore>,
    /// Client certificate chain and key (mTLS to the node).
    pub client_cert: Option<(String, String)>,
}

impl ClientTls {
    /// Builds the client configurations.
    pub fn new(opts: ClientTlsOptions) -> Result<Self, TlsError> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        opts.verify.hash(&mut h);
        if let Some((c, k)) = &opts.client_cert {
            c.hash(&mut h);
            k.hash(&mut h);
        }
        let pool_id = h.finish() | 1;

        let build = |alpn: Vec<Vec<u8>>| -> Result<Arc<ClientConfig>, TlsError> {
            let builder =
                ClientConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
            let builder = if opts.verify {
                builder.with_root_certificates(opts.roots.clone())
            } else {
                builder.dangerous().with_custom_certificate_verifier(Arc::new(NoVerify(provider())))
            };
            let mut cfg = match &opts.client_cert {
                Some((c, k)) => builder.with_client_auth_cert(parse_certs(c)?, parse_key(k)?)?,
                None => builder.with_no_client_auth(),
            };
            cfg.alpn_protocols = alpn;
            cfg.resumption = rustls::client::Resumption::in_memory_sessions(256);
            Ok(Arc::new(cfg))
        };
        Ok(ClientTls {
            auto: build(vec![b"h2".to_vec(), b"http/1.1".to_vec()])?,
            h2: build(vec![b"h2".to_vec()])?,
            raw: build(vec![])?,
            pool_id,
        })
    }
}

/// Server name for a TLS connection to a node: a DNS name, or an IP address (no SNI sent).
pub fn server_name(host: &str) -> Option<ServerName<'static>> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_string()).ok()
}

/// Accepts any certificate (`tls.verify: false`, APISIX's default) but still checks that the
/// handshake signatures are valid for the presented key.
#[derive(Debug)]
struct NoVerify(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Certificates by SNI (`ssls`): exact names and `*.` wildcards, matched case-insensitively.
#[derive(Default, Debug, Clone)]
pub struct CertStore {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// Keyed by the suffix after `*`, e.g. `.example.com`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    /// Used when the client sends no SNI (`apisix.ssl.fallback_sni`).
    fallback: Option<Arc<CertifiedKey>>,
}

impl CertStore {
    /// Adds a certificate for `sni` (exact or `*.suffix`).
    pub fn insert(&mut self, sni: &str, key: Arc<CertifiedKey>) {
        let sni = sni.to_ascii_lowercase();
        match sni.strip_prefix('*') {
            Some(suffix) => self.wildcard.insert(suffix.to_string(), key),
            None => self.exact.insert(sni, key),
        };
    }

    /// Sets the certificate for clients that send no SNI, by looking `name` up.
    pub fn set_fallback(&mut self, name: &str) {
        self.fallback = self.lookup(name);
    }

    /// The certificate for `sni`: exact match first, then the longest wildcard suffix.
    pub fn lookup(&self, sni: &str) -> Option<Arc<CertifiedKey>> {
        let lower;
        let sni = if sni.bytes().any(|b| b.is_ascii_uppercase()) {
            lower = sni.to_ascii_lowercase();
            &lower
        } else {
            sni
        };
        if let Some(k) = self.exact.get(sni) {
            return Some(k.clone());
        }
        // `*.example.com` matches any depth below example.com, but not example.com itself.
        for (i, _) in sni.match_indices('.') {
            if i == 0 {
                continue;
            }
            if let Some(k) = self.wildcard.get(&sni[i..]) {
                return Some(k.clone());
            }
        }
        None
    }

    /// Whether no certificate is configured.
    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.wildcard.is_empty()
    }

    /// Whether some certificate serves `sni`.
    pub fn has(&self, sni: &str) -> bool {
        self.lookup(sni).is_some()
    }
}

/// rustls certificate resolver over a hot-swappable [`CertStore`].
#[derive(Debug)]
pub struct SniResolver {
    store: Arc<ArcSwap<CertStore>>,
}

impl SniResolver {
    /// A resolver reading `store` at every handshake.
    pub fn new(store: Arc<ArcSwap<CertStore>>) -> Self {
        SniResolver { store }
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.store.load().resolve(hello.server_name())
    }
}

impl CertStore {
    /// The certificate for a handshake with this SNI (or none).
    pub fn resolve(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        match sni {
            Some(name) => self.lookup(name),
            None => self.fallback.clone(),
        }
    }
}

/// The TLS versions a listener offers (`apisix.ssl.ssl_protocols`); at least one is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TlsVersions {
    pub tls12: bool,
    pub tls13: bool,
}

impl Default for TlsVersions {
    /// APISIX's default, `TLSv1.2 TLSv1.3`.
    fn default() -> Self {
        TlsVersions { tls12: true, tls13: true }
    }
}

/// A server configuration for TLS listeners: certificates by SNI, ALPN `h2` (when enabled) and
/// `http/1.1`, the TLS `versions` given.
pub fn server_config(
    resolver: Arc<dyn ResolvesServerCert>,
    alpn: &[&[u8]],
    versions: TlsVersions,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut list: Vec<&'static rustls::SupportedProtocolVersion> = Vec::with_capacity(2);
    if versions.tls13 {
        list.push(&rustls::version::TLS13);
    }
    if versions.tls12 {
        list.push(&rustls::version::TLS12);
    }
    if list.is_empty() {
        return Err(rustls::Error::General("no TLS version enabled".into()).into());
    }
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&list)?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Arc<CertifiedKey> {
        let ck = rcgen::generate_simple_self_signed(vec!["a.test".into()]).unwrap();
        certified_key(&ck.cert.pem(), &ck.signing_key.serialize_pem()).unwrap()
    }

    #[test]
    fn exact_beats_wildcard_and_wildcard_needs_a_label() {
        let (a, b) = (key(), key());
        let mut s = CertStore::default();
        s.insert("*.example.com", a.clone());
        s.insert("API.example.com", b.clone());
        assert!(Arc::ptr_eq(&s.lookup("api.example.com").unwrap(), &b));
        assert!(Arc::ptr_eq(&s.lookup("Web.Example.com").unwrap(), &a));
        assert!(Arc::ptr_eq(&s.lookup("x.y.example.com").unwrap(), &a));
        assert!(s.lookup("example.com").is_none());
        assert!(s.lookup("other.org").is_none());
    }

    #[test]
    fn mismatched_key_is_rejected() {
        let a = rcgen::generate_simple_self_signed(vec!["a.test".into()]).unwrap();
        let b = rcgen::generate_simple_self_signed(vec!["b.test".into()]).unwrap();
        assert!(certified_key(&a.cert.pem(), &b.signing_key.serialize_pem()).is_err());
        assert!(certified_key("junk", &a.signing_key.serialize_pem()).is_err());
    }
}
