//! Test certificates: a CA and leaf certificates signed by it, generated at run time.

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose};

/// A test certificate authority.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pub pem: String,
}

/// A leaf certificate and its key, PEM.
#[derive(Clone)]
pub struct Leaf {
    pub cert: String,
    pub key: String,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca { pem: cert.pem(), issuer: Issuer::new(params, key) }
    }

    /// A certificate for `names` (DNS names or IPs), usable by servers and clients.
    pub fn leaf(&self, names: &[&str]) -> Leaf {
        self.leaf_with_key(names, KeyPair::generate().unwrap())
    }

    /// As [`Ca::leaf`], with an Ed25519 key (`leaf`'s is ECDSA P-256).
    #[allow(dead_code)]
    pub fn leaf_ed25519(&self, names: &[&str]) -> Leaf {
        self.leaf_with_key(names, KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap())
    }

    fn leaf_with_key(&self, names: &[&str], key: KeyPair) -> Leaf {
        let mut params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, names.first().copied().unwrap_or("leaf"));
        params.extended_key_usages =
            vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf { cert: cert.pem(), key: key.serialize_pem() }
    }
}

/// Indents PEM text for a YAML block scalar at `spaces`.
pub fn yaml_block(pem: &str, spaces: usize) -> String {
    let pad = " ".repeat(spaces);
    let mut out = String::from("|\n");
    for line in pem.lines() {
        out.push_str(&pad);
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// A TLS client that trusts only `ca`.
pub fn client_tls(ca: &Ca) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for c in strait_protocols::tls::parse_certs(&ca.pem).unwrap() {
        roots.add(c).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
}

/// A TLS client that trusts only `ca` and presents `cert` (mTLS).
pub fn client_tls_with_cert(ca: &Ca, cert: &Leaf) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for c in strait_protocols::tls::parse_certs(&ca.pem).unwrap() {
        roots.add(c).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(
        strait_protocols::tls::parse_certs(&cert.cert).unwrap(),
        strait_protocols::tls::parse_key(&cert.key).unwrap(),
    )
    .unwrap();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
}
