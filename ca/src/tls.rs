//! TLS helpers shared by the CA, the identity client and (later) the sidecar: the crypto provider,
//! the trust bundle, and a server verifier that checks the peer's SPIFFE ID instead of a DNS name.
//!
//! They live here, once, so every mTLS endpoint in meshgate verifies peers the same way.

use std::fmt;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme,
};

use crate::cert::{self, CertError, CertInfo};
use crate::chains::VerifiedChains;
use crate::spiffe::SpiffeId;

/// The one crypto provider meshgate uses (ring), with `TLS_AES_128_GCM_SHA256` as its first
/// choice. Always pass it explicitly: with two providers in the dependency graph, rustls'
/// implicit default panics.
///
/// Why AES-128 first (ring's own order puts AES-256 first): every key in a meshgate handshake is
/// P-256 or X25519, 128-bit security, so AES-256 adds no strength to the connection, and it costs
/// 14 AES rounds per block instead of 10 on every byte of every request, plus a transcript hash
/// and key schedule on SHA-384, which most x86 CPUs run in generic code where SHA-256 has
/// instructions of its own (≈ 8 % of a handshake's CPU, BENCHMARKS.md). BoringSSL (Envoy,
/// Istio) and Go prefer AES-128-GCM on hardware with AES instructions too. The other two TLS 1.3
/// suites stay accepted: a client that offers only AES-256-GCM or ChaCha20-Poly1305 gets it.
/// Servers choose in this order ([`prefer_our_suites`]), clients offer in it.
pub fn provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|suite| match suite.suite() {
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256 => 0,
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384 => 1,
            rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256 => 2,
            _ => 3,
        });
    Arc::new(provider)
}

/// Makes a server choose the cipher suite in [`provider`]'s order rather than the client's (most
/// clients, rustls and OpenSSL among them, list AES-256-GCM first).
pub fn prefer_our_suites(config: &mut rustls::ServerConfig) {
    config.ignore_client_order = true;
}

/// Acknowledges the client's last handshake flight now, on a server socket whose TLS handshake
/// has just completed.
///
/// Why: meshgate's TLS servers send no session tickets, so after the client's Finished the
/// server has nothing to send until its first response, and Linux delays the bare ACK (at least
/// 40 ms, the delayed-ACK timer). A client that leaves Nagle's algorithm on (the socket default;
/// Java's, Python's `http.client`, `openssl s_client`) holds its first request until that ACK
/// arrives, so every new connection's first request would wait out the timer — OpenSSL-based
/// servers such as nginx and HAProxy hide this by sending tickets. `TCP_QUICKACK` sends the
/// pending ACK at once: one system call per connection, none per request. Best effort: a
/// failure only costs the delay, so it is ignored.
pub fn ack_handshake(tcp: &tokio::net::TcpStream) {
    let _ = socket2::SockRef::from(tcp).set_tcp_quickack(true);
}

/// Fills `buf` with cryptographically secure random bytes (ring's system source, the one the
/// provider uses; without building a provider, and its suite list, for every call).
pub fn random_bytes(buf: &mut [u8]) {
    use ring::rand::SecureRandom as _;
    ring::rand::SystemRandom::new()
        .fill(buf)
        .expect("the system random source failed");
}

/// The set of roots a workload trusts, kept as PEM (to hand on) and as a rustls store (to verify).
#[derive(Clone)]
pub struct TrustBundle {
    certs: Vec<CertificateDer<'static>>,
    roots: Arc<RootCertStore>,
}

impl fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustBundle")
            .field("roots", &self.certs.len())
            .finish()
    }
}

/// Why a trust bundle could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("trust bundle: {0}")]
    Pem(#[from] CertError),
    #[error("trust bundle holds a certificate rustls cannot use as a root: {0}")]
    BadRoot(rustls::Error),
}

impl TrustBundle {
    /// Parses a PEM bundle (one or more root certificates).
    pub fn from_pem(pem: &[u8]) -> Result<Self, BundleError> {
        Self::from_certs(cert::certs_from_pem(pem)?)
    }

    /// Builds a bundle from DER roots.
    pub fn from_certs(certs: Vec<CertificateDer<'static>>) -> Result<Self, BundleError> {
        let mut roots = RootCertStore::empty();
        for c in &certs {
            roots.add(c.clone()).map_err(BundleError::BadRoot)?;
        }
        Ok(Self {
            certs,
            roots: Arc::new(roots),
        })
    }

    /// The roots as a rustls store.
    pub fn roots(&self) -> Arc<RootCertStore> {
        self.roots.clone()
    }

    /// The roots as DER.
    pub fn certs(&self) -> &[CertificateDer<'static>] {
        &self.certs
    }

    /// The bundle as PEM text.
    pub fn to_pem(&self) -> String {
        cert::certs_to_pem(&self.certs)
    }

    /// The one trust domain the roots are for (see [`cert::trust_domain_of_ca`]); an error if
    /// a root names none, or roots name different ones.
    pub fn trust_domain(&self) -> Result<crate::spiffe::TrustDomain, String> {
        let mut found: Option<crate::spiffe::TrustDomain> = None;
        for (i, der) in self.certs.iter().enumerate() {
            let td = cert::trust_domain_of_ca(der)
                .map_err(|e| format!("root #{} names no trust domain: {e}", i + 1))?;
            match &found {
                Some(seen) if *seen != td => {
                    return Err(format!("roots name two trust domains, {seen} and {td}"));
                }
                _ => found = Some(td),
            }
        }
        found.ok_or_else(|| "the bundle holds no root".to_string())
    }

    /// Verifies a client chain against these roots (validity, signature chain, clientAuth EKU)
    /// and returns the client's identity.
    pub fn verify_client(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<CertInfo, ChainError> {
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider())
            .build()
            .map_err(|e| ChainError::Verifier(e.to_string()))?;
        verifier
            .verify_client_cert(end_entity, intermediates, now)
            .map_err(ChainError::from_rustls)?;
        cert::cert_info(end_entity).map_err(ChainError::NotAnSvid)
    }
}

/// A trust bundle shared between the task that refreshes it and the TLS configs that read it.
pub type SharedTrustBundle = Arc<ArcSwap<TrustBundle>>;

/// Why a peer's certificate chain was refused, in words a person can act on.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error("certificate has expired; obtain a new SVID (bootstrap again with a join token)")]
    Expired,
    #[error("certificate is not valid yet; check the clocks of both machines")]
    NotValidYet,
    #[error("certificate was not issued by a CA in this trust bundle (foreign or unknown CA)")]
    UnknownIssuer,
    #[error(
        "certificate signature does not verify against the trust bundle (issued by a foreign CA, or tampered with)"
    )]
    BadSignature,
    #[error("certificate is not allowed for this use (missing EKU or CA used as leaf)")]
    WrongUsage,
    #[error("certificate is not an X509-SVID: {0}")]
    NotAnSvid(CertError),
    #[error("certificate was refused: {0}")]
    Other(String),
    #[error("cannot build a verifier from the trust bundle: {0}")]
    Verifier(String),
}

impl ChainError {
    fn from_rustls(e: rustls::Error) -> Self {
        match e {
            rustls::Error::InvalidCertificate(ce) => match ce {
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                    Self::Expired
                }
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                    Self::NotValidYet
                }
                CertificateError::UnknownIssuer => Self::UnknownIssuer,
                CertificateError::BadSignature => Self::BadSignature,
                CertificateError::InvalidPurpose
                | CertificateError::InvalidPurposeContext { .. } => Self::WrongUsage,
                other => Self::Other(format!("{other:?}")),
            },
            other => Self::Other(other.to_string()),
        }
    }
}

/// Which SPIFFE IDs a server may present to be accepted.
#[derive(Debug, Clone)]
pub enum ExpectedServer {
    /// Exactly this ID (e.g. the CA, or the `Service` a sidecar is calling).
    Exact(SpiffeId),
    /// Any of these IDs.
    AnyOf(Vec<SpiffeId>),
}

impl ExpectedServer {
    fn accepts(&self, id: &SpiffeId) -> bool {
        match self {
            Self::Exact(want) => want == id,
            Self::AnyOf(ids) => ids.contains(id),
        }
    }
}

/// Verifies a TLS server by chain (to the shared trust bundle) and SPIFFE ID, never by DNS name:
/// in a mesh the name a client dialled says nothing about which workload answered.
pub struct SpiffeServerVerifier {
    bundle: SharedTrustBundle,
    expected: ExpectedServer,
    algorithms: WebPkiSupportedAlgorithms,
    /// Server chains already verified against the bundle (the ID is still checked each time).
    /// Shared when the caller passes one cache to several client configs
    /// ([`mesh_client_config_with_cache`]).
    verified: Arc<VerifiedChains>,
}

impl fmt::Debug for SpiffeServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeServerVerifier")
            .field("expected", &self.expected)
            .finish()
    }
}

impl SpiffeServerVerifier {
    /// A verifier that accepts servers chaining to `bundle` (read at each handshake, so a bundle
    /// swap applies to the next connection) and presenting an `expected` ID.
    pub fn new(bundle: SharedTrustBundle, expected: ExpectedServer) -> Self {
        Self::with_cache(bundle, expected, Arc::new(VerifiedChains::new()))
    }

    /// The same, answering from `verified`, a cache of server chains that other verifiers may
    /// share: entries hold chains verified as servers' against the roots they were checked
    /// with, and every verifier still checks the ID it expects.
    pub fn with_cache(
        bundle: SharedTrustBundle,
        expected: ExpectedServer,
        verified: Arc<VerifiedChains>,
    ) -> Self {
        Self {
            bundle,
            expected,
            algorithms: provider().signature_verification_algorithms,
            verified,
        }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let roots = self.bundle.load().roots();
        self.verified.check(
            &roots,
            end_entity,
            intermediates,
            now,
            || {
                let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
                rustls::client::verify_server_cert_signed_by_trust_anchor(
                    &parsed,
                    &roots,
                    intermediates,
                    now,
                    self.algorithms.all,
                )
            },
            || (),
        )?;
        let id = cert::spiffe_id_from_der(end_entity).map_err(|e| {
            tracing::warn!(error = %e, "server certificate carries no usable SPIFFE ID");
            rustls::Error::InvalidCertificate(CertificateError::BadEncoding)
        })?;
        if self.expected.accepts(&id) {
            Ok(ServerCertVerified::assertion())
        } else {
            tracing::warn!(peer.id = %id, expected = ?self.expected, "server presented an unexpected SPIFFE ID");
            Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Client-certificate verifier for the CA's own listener: it asks for a client certificate but
/// does not require one, checks the handshake signature (proof of key possession) for real, and
/// leaves chain validation to the endpoint that needs an identity (`/v1/svid/renew`).
///
/// Why deferred: a refusal at the handshake reaches the caller as a bare TLS alert and never
/// reaches the CA's refusal log; checked in the handler, an expired or foreign certificate gets a
/// clear HTTP error and one structured log line. Endpoints that do not need an identity
/// (bootstrap with a join token, the bundle) ignore the certificate entirely.
#[derive(Debug)]
pub struct DeferredClientVerifier {
    algorithms: WebPkiSupportedAlgorithms,
}

impl Default for DeferredClientVerifier {
    fn default() -> Self {
        Self {
            algorithms: provider().signature_verification_algorithms,
        }
    }
}

impl ClientCertVerifier for DeferredClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // Chain validation happens in the handler, against the bundle current at that moment.
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The workload's current certificate and key, swapped atomically on rotation. rustls asks the
/// resolver at every handshake, so a new SVID applies to the next handshake and connections
/// already open keep going untouched. Empty until the first SVID arrives: handshakes then fail
/// (closed), they never proceed without an identity.
#[derive(Debug, Default)]
pub struct CertResolver(arc_swap::ArcSwapOption<rustls::sign::CertifiedKey>);

impl CertResolver {
    /// Publishes a new certificate chain and key; rustls checks that they belong together.
    pub fn publish(
        &self,
        chain: Vec<CertificateDer<'static>>,
        key: rustls::pki_types::PrivateKeyDer<'static>,
    ) -> Result<(), rustls::Error> {
        let certified = rustls::sign::CertifiedKey::from_der(chain, key, &provider())?;
        self.0.store(Some(Arc::new(certified)));
        Ok(())
    }

    /// The chain currently served, if any.
    pub fn current(&self) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.0.load_full()
    }
}

impl rustls::server::ResolvesServerCert for CertResolver {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.0.load_full()
    }
}

impl rustls::client::ResolvesClientCert for CertResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.0.load_full()
    }

    fn has_certs(&self) -> bool {
        self.0.load().is_some()
    }
}

/// A TLS client config for talking to a mesh server that must present `expected`, optionally
/// presenting our own SVID. Resumption is off: a resumed session would report the identity of an
/// earlier handshake, which defeats rotation.
pub fn mesh_client_config(
    bundle: SharedTrustBundle,
    expected: ExpectedServer,
    client_cert: Option<Arc<CertResolver>>,
    alpn: &[&[u8]],
) -> rustls::ClientConfig {
    let verified = Arc::new(VerifiedChains::new());
    mesh_client_config_with_cache(bundle, expected, client_cert, alpn, verified)
}

/// [`mesh_client_config`] whose verifier answers from `verified`, a cache of verified server
/// chains the caller can share between configs and read the counts of (the sidecar shares one
/// between all its outbound connections and exports it as a metric).
pub fn mesh_client_config_with_cache(
    bundle: SharedTrustBundle,
    expected: ExpectedServer,
    client_cert: Option<Arc<CertResolver>>,
    alpn: &[&[u8]],
    verified: Arc<VerifiedChains>,
) -> rustls::ClientConfig {
    let verifier = SpiffeServerVerifier::with_cache(bundle, expected, verified);
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("ring supports TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    let mut config = match client_cert {
        Some(resolver) => builder.with_client_cert_resolver(resolver),
        None => builder.with_no_client_auth(),
    };
    config.resumption = rustls::client::Resumption::disabled();
    config.enable_sni = false;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config
}

/// Placeholder server name for mesh connections: identity is checked by SPIFFE ID, not by name.
pub fn mesh_server_name() -> ServerName<'static> {
    ServerName::try_from("mesh.invalid").expect("a valid DNS name")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authority::Authority;
    use crate::spiffe::TrustDomain;

    fn root(td: &str) -> String {
        Authority::create(&TrustDomain::new(td).unwrap())
            .unwrap()
            .root_pem
    }

    /// A workload holding only the CA bundle and a ServiceAccount token learns its trust domain
    /// from the roots; a bundle that does not say, or says two things, is an error, not a guess.
    #[test]
    fn trust_domain_of_the_bundle() {
        let one = TrustBundle::from_pem(root("mesh.local").as_bytes()).unwrap();
        assert_eq!(one.trust_domain().unwrap().as_str(), "mesh.local");
        let rotated = format!("{}{}", root("mesh.local"), root("mesh.local"));
        let rotated = TrustBundle::from_pem(rotated.as_bytes()).unwrap();
        assert_eq!(rotated.trust_domain().unwrap().as_str(), "mesh.local");
        let mixed = format!("{}{}", root("mesh.local"), root("other.example"));
        let err = TrustBundle::from_pem(mixed.as_bytes())
            .unwrap()
            .trust_domain()
            .unwrap_err();
        assert!(err.contains("two trust domains"), "{err}");
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let plain = params.self_signed(&key).unwrap().pem();
        let err = TrustBundle::from_pem(plain.as_bytes())
            .unwrap()
            .trust_domain()
            .unwrap_err();
        assert!(err.contains("names no trust domain"), "{err}");
    }
}
