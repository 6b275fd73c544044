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

    /// As [`Ca::leaf`], with a 2048-bit RSA key generated once for these tests (ring, which
    /// rcgen uses here, cannot generate RSA keys).
    #[allow(dead_code)]
    pub fn leaf_rsa(&self, names: &[&str]) -> Leaf {
        self.leaf_with_key(names, KeyPair::from_pem(RSA_KEY).unwrap())
    }

    /// A root store holding this CA.
    pub fn roots(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        for c in strait_protocols::tls::parse_certs(&self.pem).unwrap() {
            roots.add(c).unwrap();
        }
        roots
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

/// A TLS server configuration presenting `leaf`, without client certificates.
#[allow(dead_code)]
pub fn tls_acceptor(leaf: &Leaf) -> tokio_rustls::TlsAcceptor {
    let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        strait_protocols::tls::parse_certs(&leaf.cert).unwrap(),
        strait_protocols::tls::parse_key(&leaf.key).unwrap(),
    )
    .unwrap();
    tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config))
}

/// The ClientHello a rustls client sends for `sni`, as bytes on the wire (one record).
#[allow(dead_code)]
pub fn client_hello(sni: &str) -> Vec<u8> {
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(rustls::RootCertStore::empty())
    .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(sni.to_string()).unwrap();
    let mut hello = Vec::new();
    rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap().write_tls(&mut hello).unwrap();
    hello
}

/// A TLS client that trusts only `ca`.
pub fn client_tls(ca: &Ca) -> tokio_rustls::TlsConnector {
    client_tls_as(ca, None)
}

/// A TLS client that trusts only `ca` and presents `cert` (mTLS).
#[allow(dead_code)]
pub fn client_tls_with_cert(ca: &Ca, cert: &Leaf) -> tokio_rustls::TlsConnector {
    client_tls_as(ca, Some(cert))
}

fn client_tls_as(ca: &Ca, cert: Option<&Leaf>) -> tokio_rustls::TlsConnector {
    use strait_protocols::tls::{parse_certs, parse_key};
    let roots = ca.roots();
    let builder = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let cfg = match cert {
        Some(c) => {
            builder.with_client_auth_cert(parse_certs(&c.cert).unwrap(), parse_key(&c.key).unwrap()).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
}

/// A test RSA key (`openssl genrsa 2048 | openssl pkcs8 -topk8 -nocrypt`), for [`Ca::leaf_rsa`].
const RSA_KEY: &str = "\
-----BEGIN PRIVATE KEY-----\n\
MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQCoSqJxFkQ0r5bq\n\
mKbpUV1AA2LhwFYLhFIltUkY8cfQU88WO4h73E+O+AI7MmJUpCK/ECMLzcYkFhcI\n\
/QLnbJLI2YUAidqdD7nCOiIdq382WW4hQaCgmjj+5w2BQy8a3+9A5k99is1rrz3L\n\
QA8r7wMmg7F28R5oEFr6B3v9d46QDt/XbAL7iyyUieNB0eT3tZDnOEKNDJJcDKL/\n\
0JlTCCJRireDDICdgorhxhK6UcSf924iTqFV/2TWI4LmL5XhM2iSC73aBDghgfvY\n\
osTFK9U7KvFrzSGUqfk6kU58XztXqaQUgURbMoJhOjXoad+ksascsnPKIByvZFTr\n\
JmhmOmeFAgMBAAECggEAB9h04rdCRj+CVlz3+QwTQBL4VuRnzoEkcEAXkItjAI4L\n\
qzJqzjVq2xQqTHawmVgOi6A1tgzphhCmkcNz0XShEi570hbbI3PSeeDKat4uH8tD\n\
BFdiJOKTsiR033gRl9vlND4YahagtXq1s4ZAvtBVcgP1L8GVZI4Qo7PaHqqmcYZA\n\
o6PWni9uyNXP8uSL2XtvR7W1w1iJYNaGwdDzGAxpOiCobjymR6Gc1FZSc4K6+QRv\n\
f9REVX408Bb3MSIE7uIR3EBsvvVyZKG9w64Wl6SUtLCEdRwRw/ZwQy5qYacWfL+C\n\
E1u93HfEwi690XLqZ4cUJaJQIm87cexAmEApdcD2qQKBgQDTEiXnUp9LmGYz4JsG\n\
wCMqSpzjPQx6o6xojlscxi+ccjlC04GOzmQOfj5v5TX4txeyf666/1CJuC3a9Jsc\n\
328yycD3JFxgYxq/wBJDrXVh4Etf5Suvy86FPImsD6LIQ/oAdijEFcvkr8pAA4y/\n\
9soCsnv2iMtUWwoX6zsilhiaTQKBgQDMHVF7XgI7f242rwjuQrExVHw/HIcvgZXI\n\
gHCnuSZB1Nqi7P8DdxtDZQvakSO3UYPAOLZiPhZSWLm+TrHwuvam/3cJ4I+ebLeu\n\
mhMW49+63kIyukOcI0qqbMkZzJLguuknqYFPNx/rhHEni3CmEAZPeYdjHOTD4Ckt\n\
ejB3PD+uGQKBgC5n+g9u+fj769SSGGOWkOS2fOH1RS4dmEVwrxWXeVZTQsWvjPeh\n\
5xvMo9ukMIabcslbC0av5bwx01slloj1kxQ+iX+M7gZ/I51vFFTu6TT4xHm0ADPp\n\
gmGG2toKogaX83pwgCwEgsyn3bbPUP3Pu8B2D403rETCs2ho3pqPF5+tAoGAD46Q\n\
fkmc+/HrcYmHsbktjif1TE4dU5aZ1u1LKM1oyA20GETd7uKuFkXmUGNNiJRS6Vyp\n\
MfWvd9lBVurijwmA8Rt5dCxEZfu9SDaAC/eUPsbf3sPpkUXzU+f0r92yuCQmzxoR\n\
O/tkmGvAwBXVoSKJiJcnpXs3SGKWYNv2Q7A43kkCgYEAxZoa7XbEf6pHORzNkgHd\n\
GXoxaRBMrjbS0eFInsKs3Cuvy4NIRBVJTKIUdN1dsmi5R7ULgMJo7phs0kC+WGR6\n\
sZ7Yabtrx+mSjIvNtDbAuVZXnuAVex89whTxLOslG0ALW5ZYI7IoM7cBf2jKu/p8\n\
gYdriQtKxV37gzUTrqBSs7U=\n\
-----END PRIVATE KEY-----\n";

/// `config` (a `config.yaml` with a `control:` line under `apisix:`) with
/// `apisix.ssl.ssl_trusted_certificate` naming `ca`, written to a file in the returned
/// directory (which must live as long as the gateway reads it).
#[allow(dead_code)]
pub fn trusting(config: &str, ca: &Ca) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ca.pem");
    std::fs::write(&path, &ca.pem).unwrap();
    let config = config.replace(
        "  control:",
        &format!("  ssl:\n    ssl_trusted_certificate: {}\n  control:", path.display()),
    );
    (dir, config)
}
