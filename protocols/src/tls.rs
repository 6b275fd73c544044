//! TLS on both sides: the client configuration used towards nodes (verification, client
//! certificate, ALPN) and the server-side certificate store chosen by SNI.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

/// The crypto provider used everywhere (ring), with its cipher suites ordered AES-128-GCM,
/// AES-256-GCM, ChaCha20-Poly1305 (for TLS 1.3 and TLS 1.2 alike), as Go's TLS stack and
/// browsers order them. ring's default puts AES-256-GCM-SHA384 first; TLS 1.3's key schedule
/// then runs on SHA-384, which no CPU instruction computes, where SHA-256 has one (SHA-NI on
/// this machine). With AES-128-GCM a full TLS 1.3 handshake cost Strait about 10% less CPU,
/// and an OpenSSL client, the bottleneck of that load, completed 5-8% more handshakes per
/// second (BENCHMARKS.md, "TLS handshakes"). AES-128-GCM is TLS 1.3's mandatory suite and not
/// the weaker choice in any practical sense.
///
/// Servers choose in this order ([`server_config`] sets `ignore_client_order`), except for a
/// client that puts ChaCha20 first ([`prefers_chacha`]): that is how a client without AES
/// instructions says so, and it gets its own order.
pub fn provider() -> Arc<CryptoProvider> {
    static P: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    P.get_or_init(|| {
        let mut p = rustls::crypto::ring::default_provider();
        // TLS 1.3 suites before TLS 1.2 ones, and (a stable sort) ECDSA ones before RSA ones.
        p.cipher_suites.sort_by_key(|s| {
            let rank = match aead(s.suite()) {
                Aead::Aes128 => 0,
                Aead::Aes256 => 1,
                Aead::ChaCha20 | Aead::Other => 2,
            };
            (matches!(s, rustls::SupportedCipherSuite::Tls12(_)), rank)
        });
        Arc::new(p)
    })
    .clone()
}

#[derive(Debug, PartialEq, Eq)]
enum Aead {
    Aes128,
    Aes256,
    ChaCha20,
    Other,
}

fn aead(suite: rustls::CipherSuite) -> Aead {
    use rustls::CipherSuite as C;
    match suite {
        C::TLS13_AES_128_GCM_SHA256
        | C::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
        | C::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => Aead::Aes128,
        C::TLS13_AES_256_GCM_SHA384
        | C::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
        | C::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => Aead::Aes256,
        C::TLS13_CHACHA20_POLY1305_SHA256
        | C::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
        | C::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256 => Aead::ChaCha20,
        _ => Aead::Other,
    }
}

/// Whether the first of `offered` (a ClientHello's cipher suites, in the client's order) that
/// Strait supports is a ChaCha20-Poly1305 one. Clients without AES instructions list ChaCha20
/// first, and software AES is slow for them; such a client gets the suite it prefers, as
/// OpenSSL's `SSL_OP_PRIORITIZE_CHACHA` and Go do. GREASE and unknown values are skipped.
pub fn prefers_chacha(offered: &[rustls::CipherSuite]) -> bool {
    // `aead` knows exactly the suites ring provides; every other value is `Other`.
    offered.iter().map(|s| aead(*s)).find(|a| *a != Aead::Other) == Some(Aead::ChaCha20)
}

/// `config`, choosing the cipher suite by the client's order instead of Strait's (for a client
/// that [`prefers_chacha`]). Made per such handshake: a copy of the configuration's handles.
pub fn in_client_order(config: &Arc<rustls::ServerConfig>) -> Arc<rustls::ServerConfig> {
    let mut c = rustls::ServerConfig::clone(config);
    c.ignore_client_order = false;
    Arc::new(c)
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
///
/// Parsed keys are remembered by the SHA-256 of their PEM texts while some configuration holds
/// them, so a reload of a file with thousands of certificates parses only the new ones (an RSA
/// key takes about 40 µs, its digest a few).
pub fn certified_key(cert_pem: &str, key_pem: &str) -> Result<Arc<CertifiedKey>, TlsError> {
    static PARSED: OnceLock<Mutex<ParsedKeys>> = OnceLock::new();
    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
    digest.update(&(cert_pem.len() as u64).to_le_bytes());
    digest.update(cert_pem.as_bytes());
    digest.update(key_pem.as_bytes());
    let mut id = [0u8; 32];
    id.copy_from_slice(digest.finish().as_ref());
    let parsed = PARSED.get_or_init(Default::default);
    if let Some(ck) = parsed.lock().unwrap_or_else(|e| e.into_inner()).keys.get(&id).and_then(Weak::upgrade) {
        return Ok(ck);
    }
    let certs = parse_certs(cert_pem)?;
    let key = parse_key(key_pem)?;
    let ck = Arc::new(CertifiedKey::from_der(certs, key, &provider())?);
    let mut p = parsed.lock().unwrap_or_else(|e| e.into_inner());
    p.keys.insert(id, Arc::downgrade(&ck));
    if p.keys.len() >= 2 * p.live.max(64) {
        // Forget keys nobody holds any more, once the map has doubled since the last look.
        p.keys.retain(|_, k| k.strong_count() > 0);
        p.live = p.keys.len();
    }
    Ok(ck)
}

/// What `certified_key` remembers.
#[derive(Default)]
struct ParsedKeys {
    keys: HashMap<[u8; 32], Weak<CertifiedKey>>,
    /// Entries after the last clean-up.
    live: usize,
}

/// The CAs of `ssls[].client.ca` (PEM), checked to be usable for verifying clients.
pub fn client_roots(pem: &str) -> Result<Arc<RootCertStore>, TlsError> {
    let mut store = RootCertStore::empty();
    for c in parse_certs(pem)? {
        store.add(c)?;
    }
    let store = Arc::new(store);
    rustls::server::WebPkiClientVerifier::builder_with_provider(store.clone(), provider())
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
    Ok(store)
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
    /// Offers ALPN `h2` and `http/1.1` (gRPC calls to https upstreams, which go over HTTP/2
    /// where the node speaks it).
    pub auto: Arc<ClientConfig>,
    /// Offers ALPN `http/1.1` only: the HTTP/1.1 relay's connections to https nodes (as nginx,
    /// and so APISIX, speak to them).
    pub http1: Arc<ClientConfig>,
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
            http1: build(vec![b"http/1.1".to_vec()])?,
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
    exact: HashMap<String, SniEntry>,
    /// Keyed by the suffix after `*`, e.g. `.example.com`.
    wildcard: HashMap<String, SniEntry>,
    /// Used when the client sends no SNI (`apisix.ssl.fallback_sni`).
    fallback: Option<SniEntry>,
    /// The name of [`Self::fallback`]: what a client without SNI counts as having asked for.
    fallback_name: Option<String>,
    /// Whether some entry has a [`SniPolicy`] (then handshakes read the ClientHello first).
    policies: bool,
    /// Whether some entry's policy requires client certificates.
    client_auth: bool,
}

/// What one SNI is served with.
#[derive(Debug, Clone)]
struct SniEntry {
    /// The `ssls` entry's certificates: `cert`, then `certs` (e.g. an ECDSA and an RSA one);
    /// a handshake gets the first the client can take ([`choose`]).
    keys: Arc<[Arc<CertifiedKey>]>,
    policy: Option<Arc<SniPolicy>>,
}

impl CertStore {
    /// Adds a certificate for `sni` (exact or `*.suffix`).
    pub fn insert(&mut self, sni: &str, key: Arc<CertifiedKey>) {
        self.insert_with(sni, Arc::new([key]), None);
    }

    /// Adds a certificate for `sni` whose handshakes follow `policy` (client certificates, TLS
    /// versions) instead of the listener's settings.
    pub fn insert_with(&mut self, sni: &str, keys: Arc<[Arc<CertifiedKey>]>, policy: Option<Arc<SniPolicy>>) {
        self.policies |= policy.is_some();
        self.client_auth |= policy.as_ref().is_some_and(|p| p.client_auth);
        let entry = SniEntry { keys, policy };
        let sni = sni.to_ascii_lowercase();
        match sni.strip_prefix('*') {
            Some(suffix) => self.wildcard.insert(suffix.to_string(), entry),
            None => self.exact.insert(sni, entry),
        };
    }

    /// Sets the certificate for clients that send no SNI, by looking `name` up.
    pub fn set_fallback(&mut self, name: &str) {
        self.fallback = self.entry(name).cloned();
        self.fallback_name = self.fallback.is_some().then(|| name.to_ascii_lowercase());
    }

    /// Whether some SNI asks for client certificates.
    pub fn has_client_auth(&self) -> bool {
        self.client_auth
    }

    /// Whether some SNI has a policy of its own.
    pub fn has_policies(&self) -> bool {
        self.policies
    }

    /// Whether a request for `host` and `path` may be served on a TLS connection whose handshake was for `sni` and whose client did or did not present a
    /// verified certificate (`verified`). APISIX's rules (otherwise 400):
    ///
    /// * when `host`'s entry asks for client certificates, the connection must have been made
    ///   for that name, so a client cannot reach it through a connection for another;
    /// * when that entry, or the entry of the connection's SNI, asks for them, the client must
    ///   have presented one, unless the entry's `skip_mtls_uri_regex` matches `path`.
    ///
    /// The second rule also covers connections made before the entry asked for certificates
    /// (the configuration is swapped under open connections). A client without SNI counts as
    /// having asked for `fallback_sni` (APISIX's `ssl.server_name()`). `skip_mtls_uri_regex` must
    /// match both the path as sent and as nginx's `$uri` has it (percent-decoded, `.` and `..`
    /// resolved, slashes merged): a raw `/public/../admin` is `/admin`. `host` must be as
    /// nginx's `$host` is made (lower-case, no port, no trailing dot: the caller's routing host).
    /// Always true while no entry asks.
    pub fn request_allowed(&self, host: &str, path: &str, sni: Option<&str>, verified: bool) -> bool {
        if !self.client_auth {
            return true;
        }
        let sni = sni.or(self.fallback_name.as_deref());
        let normalized = std::cell::OnceCell::new();
        // Both the path as sent (what routes match and the node gets) and as nginx's `$uri`:
        // `/public/../admin` and `/admin/..%2Fpublic/x` are not let through by `^/public/`.
        let skipped = |p: &SniPolicy| {
            let matches = |path: &str| p.skip_uris.iter().any(|r| r.is_match(path));
            !p.skip_uris.is_empty()
                && matches(path)
                && normalized.get_or_init(|| crate::http::uri_path(path)).as_deref().is_some_and(matches)
        };
        let needs_cert = |p: &SniPolicy| p.client_auth && !verified && !skipped(p);
        if let Some(p) = self.policy_entry(host).and_then(|e| e.policy.as_deref())
            && p.client_auth
            && (!sni.is_some_and(|s| s.eq_ignore_ascii_case(host)) || needs_cert(p))
        {
            return false;
        }
        !self.policy(sni).is_some_and(|p| needs_cert(&p))
    }

    /// The client-certificate rules over a name a client asked for (or the fallback's,
    /// without SNI), at any depth below a wildcard ([`Self::policy_entry`]).
    pub fn policy(&self, sni: Option<&str>) -> Option<Arc<SniPolicy>> {
        match sni {
            Some(name) => self.policy_entry(name)?.policy.clone(),
            None => self.fallback.as_ref()?.policy.clone(),
        }
    }

    /// The settings a handshake for `sni` runs with: those of the entry whose certificate
    /// serves it (one label below a wildcard, as [`Self::entry`]). A deeper name has no
    /// certificate, and its handshake fails as it would without a policy.
    pub fn handshake_policy(&self, sni: Option<&str>) -> Option<Arc<SniPolicy>> {
        match sni {
            Some(name) => self.entry(name)?.policy.clone(),
            None => self.fallback.as_ref()?.policy.clone(),
        }
    }

    /// The certificate for `sni`: exact match first, then the longest wildcard suffix.
    pub fn lookup(&self, sni: &str) -> Option<Arc<CertifiedKey>> {
        self.entry(sni).and_then(|e| e.keys.first().cloned())
    }

    /// The entry whose certificate serves `sni`: exact, else the wildcard one label above it.
    /// `*.example.com` serves `www.example.com`, as APISIX's SNI router does (it refuses a match
    /// with another `.` before the suffix) and as the certificate itself covers: not
    /// `a.b.example.com`, nor example.com itself.
    fn entry(&self, sni: &str) -> Option<&SniEntry> {
        self.find(sni, false)
    }

    /// The entry whose client-certificate rules cover `name`: as [`Self::entry`], except that a
    /// wildcard covers any depth below its suffix, as route hosts and stream route SNIs match.
    /// So `a.b.example.com`, which `*.example.com` routes take but no certificate serves, is
    /// still under that entry's `client` rules, and cannot reach those routes through a
    /// connection made for another name (or a plain listener's unverified ClientHello).
    fn policy_entry(&self, name: &str) -> Option<&SniEntry> {
        self.find(name, true)
    }

    fn find(&self, sni: &str, any_depth: bool) -> Option<&SniEntry> {
        let lower;
        let sni = if sni.bytes().any(|b| b.is_ascii_uppercase()) {
            lower = sni.to_ascii_lowercase();
            &lower
        } else {
            sni
        };
        if let Some(e) = self.exact.get(sni) {
            return Some(e);
        }
        for (i, _) in sni.match_indices('.') {
            if i == 0 {
                continue;
            }
            if let Some(e) = self.wildcard.get(&sni[i..]) {
                return Some(e);
            }
            if !any_depth {
                return None;
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
        self.store.load().resolve(&hello, TlsVersions::default())
    }
}

impl CertStore {
    /// The certificate for a handshake: by its SNI (or the fallback without one), the first of
    /// the entry's that the client can take ([`choose`]) with the server's `versions`.
    pub fn resolve(&self, hello: &ClientHello<'_>, versions: TlsVersions) -> Option<Arc<CertifiedKey>> {
        let entry = match hello.server_name() {
            Some(name) => self.entry(name),
            None => self.fallback.as_ref(),
        }?;
        choose(&entry.keys, hello, versions)
    }
}

/// The first of `keys` the client can take: one that signs with a signature scheme it offers
/// which a cipher suite both sides have allows (TLS 1.3: no PKCS#1 v1.5 or SHA-1 schemes;
/// TLS 1.2: the suite's own, ECDSA ones for `ECDHE_ECDSA` suites, RSA ones for `ECDHE_RSA`),
/// as nginx picks between an ECDSA and an RSA certificate. rustls does not tell the resolver
/// which version it settled on, and a client lists TLS 1.3 suites even when it will not speak
/// TLS 1.3; so a key that fits every version both sides offer comes first, then one that fits
/// some. The first key when none fits: the handshake then fails as it would with that one.
fn choose(
    keys: &[Arc<CertifiedKey>],
    hello: &ClientHello<'_>,
    versions: TlsVersions,
) -> Option<Arc<CertifiedKey>> {
    if let [one] = keys {
        return Some(one.clone());
    }
    let (schemes, offered) = (hello.signature_schemes(), hello.cipher_suites());
    let provider = provider();
    let signs_with = |k: &CertifiedKey, allowed: &dyn Fn(&SignatureScheme) -> bool| {
        let ok: Vec<SignatureScheme> = schemes.iter().copied().filter(|s| allowed(s)).collect();
        k.key.choose_scheme(&ok).is_some()
    };
    let common = || provider.cipher_suites.iter().filter(|s| offered.contains(&s.suite()));
    let tls13 = versions.tls13 && common().any(|s| matches!(s, rustls::SupportedCipherSuite::Tls13(_)));
    let tls12 = versions.tls12 && common().any(|s| matches!(s, rustls::SupportedCipherSuite::Tls12(_)));
    // (fits TLS 1.3, fits TLS 1.2) for a key.
    let fits = |k: &CertifiedKey| {
        let f13 = tls13 && signs_with(k, &tls13_scheme);
        let f12 = tls12
            && common().any(|s| match s {
                rustls::SupportedCipherSuite::Tls12(t) => signs_with(k, &|x| t.sign.contains(x)),
                rustls::SupportedCipherSuite::Tls13(_) => false,
            });
        (f13, f12)
    };
    let all = |k: &&Arc<CertifiedKey>| {
        let (f13, f12) = fits(k);
        (f13 || f12) && f13 == tls13 && f12 == tls12
    };
    let some = |k: &&Arc<CertifiedKey>| {
        let (f13, f12) = fits(k);
        f13 || f12
    };
    keys.iter().find(all).or_else(|| keys.iter().find(some)).or(keys.first()).cloned()
}

/// Whether TLS 1.3 allows `s` for a server's handshake signature (RFC 8446, 4.2.3).
fn tls13_scheme(s: &SignatureScheme) -> bool {
    use SignatureScheme as S;
    matches!(
        s,
        S::ECDSA_NISTP256_SHA256
            | S::ECDSA_NISTP384_SHA384
            | S::ECDSA_NISTP521_SHA512
            | S::ED25519
            | S::ED448
            | S::RSA_PSS_SHA256
            | S::RSA_PSS_SHA384
            | S::RSA_PSS_SHA512
    )
}

/// The server configurations of an SNI whose `ssls` entry asks for client certificates
/// (`client.ca`) or its own TLS versions (`ssl_protocols`): rustls fixes both per
/// configuration, so such an SNI gets configurations of its own, chosen once the ClientHello
/// is read. One per kind of listener, by ALPN.
#[derive(Debug)]
pub struct SniPolicy {
    /// HTTP listeners with HTTP/2: ALPN `h2` and `http/1.1`.
    pub h2: Arc<rustls::ServerConfig>,
    /// HTTP listeners without HTTP/2: ALPN `http/1.1`.
    pub h1: Arc<rustls::ServerConfig>,
    /// L4 stream listeners: no ALPN.
    pub raw: Arc<rustls::ServerConfig>,
    /// Whether its handshakes ask for a client certificate.
    pub client_auth: bool,
    /// Paths that need none (`client.skip_mtls_uri_regex`; see [`ClientAuth::skip_uris`]).
    pub skip_uris: Vec<regex::Regex>,
}

/// Client certificates an SNI requires (`ssls[].client`).
#[derive(Debug, Clone)]
pub struct ClientAuth {
    /// The CAs a client certificate must chain to (`client.ca`).
    pub roots: Arc<RootCertStore>,
    /// nginx's `ssl_verify_depth` (`client.depth`, APISIX's default 1): the chain may have at
    /// most `depth` intermediates between the client's certificate and a CA of `roots`.
    pub depth: usize,
    /// `client.skip_mtls_uri_regex`: HTTP requests whose path matches one of these need no
    /// certificate. When there are any, the handshake asks for a certificate without requiring
    /// one, and each request is checked ([`CertStore::request_allowed`]).
    pub skip_uris: Vec<regex::Regex>,
}

impl SniPolicy {
    /// Configurations serving `keys` (an entry's certificates, as [`CertStore::insert_with`]
    /// takes them), with `versions` and, when given, required client certificates; sessions
    /// kept in scopes of their own in `sessions`.
    pub fn new(
        keys: Arc<[Arc<CertifiedKey>]>,
        versions: TlsVersions,
        client: Option<ClientAuth>,
        sessions: &Arc<SessionCache>,
    ) -> Result<SniPolicy, TlsError> {
        type Verifier = Arc<dyn rustls::server::danger::ClientCertVerifier>;
        let client_auth = client.is_some();
        let mut skip_uris = Vec::new();
        // Required: for L4 streams always (APISIX rejects in the handshake there), and for HTTP
        // unless some paths may go without (`skip_mtls_uri_regex`): then a certificate that is
        // sent is still verified, and its absence is for each request to judge.
        let (required, http): (Option<Verifier>, Option<Verifier>) = match client {
            None => (None, None),
            Some(c) => {
                let verifier = |optional: bool| -> Result<Verifier, TlsError> {
                    let mut b = rustls::server::WebPkiClientVerifier::builder_with_provider(
                        c.roots.clone(),
                        provider(),
                    );
                    if optional {
                        b = b.allow_unauthenticated();
                    }
                    let inner = b.build().map_err(|e| rustls::Error::General(e.to_string()))?;
                    Ok(Arc::new(DepthLimited { inner, depth: c.depth }))
                };
                let required = verifier(false)?;
                let http = if c.skip_uris.is_empty() { required.clone() } else { verifier(true)? };
                skip_uris = c.skip_uris;
                (Some(required), Some(http))
            }
        };
        // A scope per verifier (see `SessionScope`): the HTTP ones may take clients without a
        // certificate (`skip_mtls_uri_regex`) where L4 streams never do. A new policy (made at
        // each load) starts with new scopes.
        let build = |alpn: &[&[u8]], verifier: &Option<Verifier>, scope: &Arc<SessionScope>| {
            config_with(
                Arc::new(Fixed(keys.clone(), versions)),
                alpn,
                versions,
                verifier.clone(),
                scope.clone(),
            )
        };
        let http_scope = sessions.scope();
        Ok(SniPolicy {
            h2: build(&[b"h2", b"http/1.1", b"http/1.0"], &http, &http_scope)?,
            h1: build(&[b"http/1.1", b"http/1.0"], &http, &http_scope)?,
            raw: build(&[], &required, &sessions.scope())?,
            client_auth,
            skip_uris,
        })
    }
}

/// Serves one entry's certificates, whatever the SNI (the SNI chose the [`SniPolicy`]), with
/// the policy's TLS versions.
#[derive(Debug)]
struct Fixed(Arc<[Arc<CertifiedKey>]>, TlsVersions);

impl ResolvesServerCert for Fixed {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        choose(&self.0, &hello, self.1)
    }
}

/// webpki's client verification, with only the first `depth` intermediates the client sent
/// (in the order sent, the client's issuer first, as TLS asks) available to build the chain: a
/// client whose certificate needs more between it and a CA is refused. nginx's
/// `ssl_verify_depth` with OpenSSL 1.1 and later: depth N allows N intermediate CAs between the
/// client's certificate and the trust anchor (0: signed by a CA of `client.ca` itself).
#[derive(Debug)]
struct DepthLimited {
    inner: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    depth: usize,
}

impl rustls::server::danger::ClientCertVerifier for DepthLimited {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }
    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }
    fn requires_raw_public_keys(&self) -> bool {
        self.inner.requires_raw_public_keys()
    }
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        let usable = &intermediates[..intermediates.len().min(self.depth)];
        self.inner.verify_client_cert(end_entity, usable, now)
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
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

impl TlsVersions {
    /// The versions `names` lists as nginx and APISIX write them (`TLSv1.2`, `TLSv1.3`), with
    /// the names of `old` that it lists too: accepted, never offered (rustls has no TLS 1.1 or
    /// older). `Err`: the index and text of a name that is neither. Check [`Self::any`] after.
    pub fn from_names<'a>(
        names: impl IntoIterator<Item = &'a str>,
        old: &[&str],
    ) -> Result<(TlsVersions, Vec<&'a str>), (usize, &'a str)> {
        let mut v = TlsVersions { tls12: false, tls13: false };
        let mut listed_old = Vec::new();
        for (i, name) in names.into_iter().enumerate() {
            match name {
                "TLSv1.3" => v.tls13 = true,
                "TLSv1.2" => v.tls12 = true,
                n if old.contains(&n) => listed_old.push(n),
                n => return Err((i, n)),
            }
        }
        Ok((v, listed_old))
    }

    /// Whether some version is on.
    pub fn any(self) -> bool {
        self.tls12 || self.tls13
    }

    /// rustls's versions, newest first; an error when none is on.
    fn list(self) -> Result<Vec<&'static rustls::SupportedProtocolVersion>, TlsError> {
        let mut list: Vec<&'static rustls::SupportedProtocolVersion> = Vec::with_capacity(2);
        if self.tls13 {
            list.push(&rustls::version::TLS13);
        }
        if self.tls12 {
            list.push(&rustls::version::TLS12);
        }
        if list.is_empty() {
            return Err(rustls::Error::General("no TLS version enabled".into()).into());
        }
        Ok(list)
    }
}

/// TLS sessions the gateway keeps so that clients can resume them: APISIX's `ssl_session_cache
/// shared:SSL:20m` with `ssl_session_tickets off` (sessions kept by the server, the client
/// holding only an id), for `apisix.ssl.ssl_session_timeout` (APISIX's default 10 minutes).
/// A resumed handshake skips the certificate and its signature (for an RSA key, most of a full
/// handshake's cost on both sides).
///
/// rustls's own cache keeps 256 sessions per configuration, with no expiry: two tickets per
/// client meant the 129th client pushed out the first, and a listener's configuration was made
/// per worker, so a client whose next connection went to another worker (each worker has its
/// own listening socket) could not resume at all.
///
/// One cache serves the whole process, within one budget of [`SESSION_BUDGET`] bytes, as
/// APISIX's one zone does; each server configuration sees only the sessions it made, through
/// its [`SessionScope`]. Sessions leave in the order they came, when the budget needs room or
/// once expired; a TLS 1.3 session is taken when it is resumed (each ticket is good once).
/// Like nginx, a session larger than [`MAX_SESSION_SIZE`] (one carrying a long client
/// certificate chain) is not kept.
#[derive(Debug)]
pub struct SessionCache {
    timeout: Duration,
    budget: usize,
    scopes: std::sync::atomic::AtomicU64,
    inner: Mutex<Sessions>,
}

/// Bytes of sessions one process keeps: nginx's `shared:SSL:20m`. A TLS 1.3 session is
/// counted as about 220 bytes (its id, about 85 bytes of state, [`SESSION_OVERHEAD`]), so
/// about 90,000 sessions; resident memory measured about 175 bytes a session. Memory is taken
/// only as clients come.
pub const SESSION_BUDGET: usize = 20 << 20;

/// Largest session kept, in bytes (nginx's `NGX_SSL_MAX_SESSION_SIZE`).
pub const MAX_SESSION_SIZE: usize = 4096;

/// What an entry costs beyond its key and value bytes (the map's and queue's slots, the
/// allocations' headers), for the budget.
const SESSION_OVERHEAD: usize = 96;

/// Expired sessions dropped at most per store beyond what the budget needs, so that one store
/// after a quiet spell does not hold every worker's handshakes behind the lock for long.
const EXPIRED_PER_PUT: usize = 8;

#[derive(Debug, Default)]
struct Sessions {
    /// Keyed by scope (8 bytes) and session id.
    by_id: HashMap<Arc<[u8]>, (Vec<u8>, Instant)>,
    /// Keys in the order they were stored (some already taken), with when and what they cost.
    order: VecDeque<(Arc<[u8]>, Instant, usize)>,
    /// What the entries of `order` cost.
    bytes: usize,
}

impl SessionCache {
    /// A cache whose sessions last `timeout` (none are kept when it is zero).
    pub fn new(timeout: Duration) -> Arc<SessionCache> {
        SessionCache::with_budget(timeout, SESSION_BUDGET)
    }

    fn with_budget(timeout: Duration, budget: usize) -> Arc<SessionCache> {
        Arc::new(SessionCache {
            timeout,
            budget,
            scopes: std::sync::atomic::AtomicU64::new(0),
            inner: Mutex::new(Sessions::default()),
        })
    }

    /// A view of this cache for one server configuration (or several that accept the same
    /// clients: the same certificates and client certificate rules).
    pub fn scope(self: &Arc<Self>) -> Arc<SessionScope> {
        Arc::new(SessionScope {
            cache: self.clone(),
            id: std::sync::atomic::AtomicU64::new(self.next_scope()),
        })
    }

    fn next_scope(&self) -> u64 {
        self.scopes.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Sessions> {
        // A panic while holding the lock leaves whole entries only; go on with them.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Number of sessions held (expired ones included until they are pushed out).
    pub fn len(&self) -> usize {
        self.lock().by_id.len()
    }

    /// Whether no session is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn fresh(&self, stored: Instant, now: Instant) -> bool {
        now.saturating_duration_since(stored) < self.timeout
    }

    fn key(scope: u64, id: &[u8]) -> Vec<u8> {
        let mut k = Vec::with_capacity(8 + id.len());
        k.extend_from_slice(&scope.to_le_bytes());
        k.extend_from_slice(id);
        k
    }

    fn put_at(&self, scope: u64, id: &[u8], value: Vec<u8>, now: Instant) -> bool {
        if self.timeout.is_zero() || value.len() > MAX_SESSION_SIZE {
            return false;
        }
        let key: Arc<[u8]> = Self::key(scope, id).into();
        let cost = key.len() + value.len() + SESSION_OVERHEAD;
        let mut s = self.lock();
        // The oldest leave first: all those the budget needs gone, and a few expired ones. The
        // queue bounds the map (every key in the map is in the queue), the budget the queue.
        let mut expired = EXPIRED_PER_PUT;
        while let Some((_, at, _)) = s.order.front() {
            let needed = s.bytes + cost > self.budget;
            if !needed && (expired == 0 || self.fresh(*at, now)) {
                break;
            }
            if !needed {
                expired -= 1;
            }
            let Some((old, at, old_cost)) = s.order.pop_front() else { break };
            s.bytes -= old_cost;
            if s.by_id.get(&old).is_some_and(|(_, stored)| *stored == at) {
                s.by_id.remove(&old);
            }
        }
        s.order.push_back((key.clone(), now, cost));
        s.bytes += cost;
        s.by_id.insert(key, (value, now));
        true
    }

    fn get_at(&self, scope: u64, id: &[u8], now: Instant) -> Option<Vec<u8>> {
        let s = self.lock();
        let (value, at) = s.by_id.get(Self::key(scope, id).as_slice())?;
        self.fresh(*at, now).then(|| value.clone())
    }

    fn take_at(&self, scope: u64, id: &[u8], now: Instant) -> Option<Vec<u8>> {
        let (value, at) = self.lock().by_id.remove(Self::key(scope, id).as_slice())?;
        self.fresh(at, now).then_some(value)
    }
}

/// The sessions of one server configuration in the process's [`SessionCache`]: a session made
/// in one scope is never resumed in another. rustls checks, when it resumes a session, only
/// its cipher suite and SNI, not whether the configuration that made it asked for a client
/// certificate as this one does; so configurations with different client certificate rules
/// have different scopes. [`SessionScope::renew`] makes every session of the scope unusable
/// (they leave the cache as they age), for when its certificates change.
#[derive(Debug)]
pub struct SessionScope {
    cache: Arc<SessionCache>,
    id: std::sync::atomic::AtomicU64,
}

impl SessionScope {
    /// Starts afresh: sessions made before are not resumed.
    pub fn renew(&self) {
        self.id.store(self.cache.next_scope(), std::sync::atomic::Ordering::Relaxed);
    }

    fn id(&self) -> u64 {
        self.id.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl rustls::server::StoresServerSessions for SessionScope {
    fn put(&self, id: Vec<u8>, value: Vec<u8>) -> bool {
        self.cache.put_at(self.id(), &id, value, Instant::now())
    }

    fn get(&self, id: &[u8]) -> Option<Vec<u8>> {
        self.cache.get_at(self.id(), id, Instant::now())
    }

    fn take(&self, id: &[u8]) -> Option<Vec<u8>> {
        self.cache.take_at(self.id(), id, Instant::now())
    }

    fn can_cache(&self) -> bool {
        !self.cache.timeout.is_zero()
    }
}

/// A server configuration for TLS listeners: certificates by SNI, ALPN `h2` (when enabled) and
/// `http/1.1`, the TLS `versions` given, sessions kept in `sessions` (which may serve several
/// such configurations with the same certificates and no client certificates).
pub fn server_config(
    resolver: Arc<dyn ResolvesServerCert>,
    alpn: &[&[u8]],
    versions: TlsVersions,
    sessions: Arc<SessionScope>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    config_with(resolver, alpn, versions, None, sessions)
}

/// [`server_config`], verifying client certificates with `verifier` when there is one (an
/// [`SniPolicy`]'s).
fn config_with(
    resolver: Arc<dyn ResolvesServerCert>,
    alpn: &[&[u8]],
    versions: TlsVersions,
    verifier: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
    sessions: Arc<SessionScope>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let builder =
        rustls::ServerConfig::builder_with_provider(provider()).with_protocol_versions(&versions.list()?)?;
    let builder = match verifier {
        Some(v) => builder.with_client_cert_verifier(v),
        None => builder.with_no_client_auth(),
    };
    let mut cfg = builder.with_cert_resolver(resolver);
    // Strait's suite order ([`provider`]); `accept_tls` switches back to the client's order
    // for a client that prefers ChaCha20.
    cfg.ignore_client_order = true;
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    cfg.session_storage = sessions;
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CA (`is_ca`) or client certificate for `name`, signed by `issuer` (self-signed without).
    fn cert(
        name: &str,
        is_ca: bool,
        issuer: Option<&rcgen::Issuer<'static, rcgen::KeyPair>>,
    ) -> (CertificateDer<'static>, rcgen::Issuer<'static, rcgen::KeyPair>) {
        let mut p = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        if is_ca {
            p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
        } else {
            p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        }
        let key = rcgen::KeyPair::generate().unwrap();
        let c = match issuer {
            Some(i) => p.signed_by(&key, i).unwrap(),
            None => p.self_signed(&key).unwrap(),
        };
        (c.der().clone(), rcgen::Issuer::new(p, key))
    }

    /// Sessions are kept for the timeout, a TLS 1.3 one is good once (`take`), the oldest leave
    /// when the budget needs room (taken ones counted until they reach the front), a store drops
    /// a few expired ones at most, scopes do not see each other's sessions, a renewed scope loses
    /// its own, sessions past `MAX_SESSION_SIZE` are refused and a zero timeout keeps none.
    #[test]
    fn sessions_expire_are_taken_once_and_stay_within_budget_and_scope() {
        use rustls::server::StoresServerSessions;
        let t0 = Instant::now();
        let at = |secs: u64| t0 + Duration::from_secs(secs);
        let id = |n: u8| vec![n; 32];
        // Each entry of these costs 8 + 32 + 3 + SESSION_OVERHEAD: room for three.
        let cost = 8 + 32 + 3 + SESSION_OVERHEAD;
        let c = SessionCache::with_budget(Duration::from_secs(600), 3 * cost);
        assert!(c.put_at(1, &id(1), b"one".to_vec(), at(0)));
        assert_eq!(c.get_at(1, &id(1), at(599)), Some(b"one".to_vec()));
        assert_eq!(c.get_at(1, &id(1), at(600)), None, "expired");
        assert_eq!(c.get_at(2, &id(1), at(1)), None, "another scope");
        assert_eq!(c.take_at(1, &id(1), at(10)), Some(b"one".to_vec()));
        assert_eq!(c.take_at(1, &id(1), at(10)), None, "a session is taken once");
        for n in 2..=5 {
            c.put_at(1, &id(n), vec![n; 3], at(20));
        }
        // Room for three: 1 (taken) and 2 left the queue, 3, 4 and 5 are held.
        assert_eq!(c.len(), 3);
        assert_eq!(c.get_at(1, &id(2), at(21)), None);
        assert_eq!(c.get_at(1, &id(3), at(21)), Some(vec![3; 3]));
        // Expired sessions leave at the next store, whatever the room.
        c.put_at(1, &id(6), vec![6; 3], at(700));
        assert_eq!(c.len(), 1);
        assert_eq!(c.take_at(1, &id(6), at(701)), Some(vec![6; 3]));
        assert!(!c.put_at(1, &id(7), vec![0; MAX_SESSION_SIZE + 1], at(701)), "too large");
        // The same id stored again: the newer value is the one found, and the older one's queue
        // entry, when it reaches the front, does not take the newer away.
        let d = SessionCache::with_budget(Duration::from_secs(600), 2 * cost);
        d.put_at(1, &id(1), vec![1; 3], at(0));
        d.put_at(1, &id(1), vec![2; 3], at(1));
        assert_eq!(d.get_at(1, &id(1), at(2)), Some(vec![2; 3]));
        d.put_at(1, &id(3), vec![3; 3], at(2));
        assert_eq!(d.get_at(1, &id(1), at(3)), Some(vec![2; 3]));

        // A store drops at most EXPIRED_PER_PUT expired sessions beyond what it needs room for.
        let big = SessionCache::with_budget(Duration::from_secs(600), 1 << 20);
        for n in 0..20 {
            big.put_at(1, &id(n), vec![n; 3], at(0));
        }
        big.put_at(1, &id(100), vec![1; 3], at(700));
        assert_eq!(big.len(), 21 - EXPIRED_PER_PUT);

        // Scopes through rustls's interface; a renewed scope's sessions are not resumed.
        let cache = SessionCache::new(Duration::from_secs(600));
        let (a, b) = (cache.scope(), cache.scope());
        assert!(a.put(id(1), b"a".to_vec()));
        assert_eq!(b.get(&id(1)), None);
        assert_eq!(a.get(&id(1)), Some(b"a".to_vec()));
        a.renew();
        assert_eq!(a.take(&id(1)), None);
        assert!(a.can_cache());
        let none = SessionCache::with_budget(Duration::ZERO, 1 << 20);
        assert!(!none.put_at(1, &id(1), vec![1], t0));
        assert!(none.is_empty());
        assert!(!none.scope().can_cache());
    }

    /// The client's first suite that Strait supports decides, skipping GREASE and unknown
    /// values; Strait's own order puts AES-128-GCM first for both versions.
    #[test]
    fn chacha_is_for_clients_that_list_it_first() {
        use rustls::CipherSuite as C;
        let grease = C::Unknown(0x0a0a);
        assert!(prefers_chacha(&[grease, C::TLS13_CHACHA20_POLY1305_SHA256, C::TLS13_AES_128_GCM_SHA256]));
        assert!(prefers_chacha(&[C::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256]));
        assert!(!prefers_chacha(&[grease, C::TLS13_AES_256_GCM_SHA384, C::TLS13_CHACHA20_POLY1305_SHA256]));
        assert!(!prefers_chacha(&[C::TLS_EMPTY_RENEGOTIATION_INFO_SCSV, C::TLS13_AES_128_GCM_SHA256]));
        assert!(!prefers_chacha(&[]));
        let order: Vec<C> = provider().cipher_suites.iter().map(|s| s.suite()).collect();
        assert_eq!(
            &order[..3],
            [C::TLS13_AES_128_GCM_SHA256, C::TLS13_AES_256_GCM_SHA384, C::TLS13_CHACHA20_POLY1305_SHA256]
        );
        let pos = |s: C| order.iter().position(|o| *o == s).unwrap();
        assert!(
            pos(C::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256) < pos(C::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384)
        );
        assert!(
            pos(C::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256) < pos(C::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384)
        );
    }

    /// The same PEM texts give the key parsed before while something holds it; other texts, or
    /// texts whose key nobody holds any more, are parsed (and a broken pair is still an error).
    #[test]
    fn a_key_parsed_before_is_reused_while_held() {
        let pem = |name: &str| {
            let key = rcgen::KeyPair::generate().unwrap();
            let c = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap().self_signed(&key).unwrap();
            (c.pem(), key.serialize_pem())
        };
        let (c1, k1) = pem("one.example");
        let (c2, k2) = pem("two.example");
        let a = certified_key(&c1, &k1).unwrap();
        assert!(Arc::ptr_eq(&a, &certified_key(&c1, &k1).unwrap()));
        let b = certified_key(&c2, &k2).unwrap();
        assert!(!Arc::ptr_eq(&a, &b));
        assert_eq!(b.cert[0].as_ref(), CertificateDer::from_pem_slice(c2.as_bytes()).unwrap().as_ref());
        // A certificate with another's key is refused, though both were parsed before.
        assert!(certified_key(&c1, &k2).is_err());
        let weak = Arc::downgrade(&a);
        drop(a);
        assert!(weak.upgrade().is_none());
        let again = certified_key(&c1, &k1).unwrap();
        assert_eq!(again.cert[0].as_ref(), CertificateDer::from_pem_slice(c1.as_bytes()).unwrap().as_ref());
    }

    #[test]
    fn paths_are_normalized_as_nginx_uri_for_skip_mtls_uri_regex() {
        for (raw, want) in [
            ("/public/a", Some("/public/a")),
            ("/public/../admin", Some("/admin")),
            ("/public/%2e%2e/admin", Some("/admin")),
            ("//public///a/", Some("/public/a/")),
            ("/./public/./a", Some("/public/a")),
            ("/%70ublic/a", Some("/public/a")),
            ("/public/%zz", Some("/public/%zz")),
            ("/admin/..%2Fpublic/x", Some("/public/x")),
            ("/..", None),
            ("/a/../../b", None),
            ("/", Some("/")),
        ] {
            assert_eq!(crate::http::uri_path(raw).as_deref(), want, "{raw}");
        }
    }

    #[test]
    fn client_depth_limits_the_intermediates_between_a_client_and_its_ca() {
        use rustls::server::danger::ClientCertVerifier;
        let (root, root_issuer) = cert("root", true, None);
        let (inter, inter_issuer) = cert("inter", true, Some(&root_issuer));
        let (direct, _) = cert("direct", false, Some(&root_issuer));
        let (below, _) = cert("below", false, Some(&inter_issuer));
        let mut roots = RootCertStore::empty();
        roots.add(root).unwrap();
        let roots = Arc::new(roots);
        let verifier = |depth| {
            let inner =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
                    .build()
                    .unwrap();
            DepthLimited { inner, depth }
        };
        let now = UnixTime::now();
        // depth 0: signed by the CA itself only.
        assert!(verifier(0).verify_client_cert(&direct, &[], now).is_ok());
        assert!(verifier(0).verify_client_cert(&below, std::slice::from_ref(&inter), now).is_err());
        // depth 1 (APISIX's default): one intermediate, as OpenSSL counts it.
        assert!(verifier(1).verify_client_cert(&below, std::slice::from_ref(&inter), now).is_ok());
        assert!(verifier(1).verify_client_cert(&direct, &[], now).is_ok());
        // A certificate from another CA, whatever the depth.
        let (_, other_issuer) = cert("other", true, None);
        let (stranger, _) = cert("stranger", false, Some(&other_issuer));
        assert!(verifier(9).verify_client_cert(&stranger, &[], now).is_err());
    }

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
        // One label only, as APISIX's SNI router and the certificate itself have it.
        assert!(s.lookup("x.y.example.com").is_none());
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
