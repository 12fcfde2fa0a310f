//! TLS configuration of the sidecar's mesh listeners and connections.
//!
//! The inbound `ServerConfig` embeds the trust bundle (rustls' client verifier is fixed when
//! built), so it lives in an `ArcSwap` and is rebuilt whenever the bundle changes; each accepted
//! connection takes the config current at that moment. Open connections keep what they
//! authenticated with. Session tickets and resumption are off everywhere: a resumed TLS 1.3
//! session reports the peer certificate of the *original* handshake, which would carry a stale
//! identity across a rotation.

use std::sync::Arc;

use arc_swap::ArcSwap;
use meshgate_ca::chains::VerifiedChains;
use meshgate_ca::tls::provider;
use meshgate_ca::{SpiffeId, TrustDomain};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::{RootCertStore, ServerConfig};

use crate::identity::Identity;

/// A client certificate that chains to the bundle but does not carry a usable identity.
#[derive(Debug, thiserror::Error)]
pub enum IdentityRefused {
    #[error("client certificate has no valid SPIFFE ID: {0}")]
    BadSpiffeId(String),
    #[error("client SPIFFE ID {0} is outside this trust domain")]
    ForeignTrustDomain(SpiffeId),
}

/// Client verification of the inbound listener: the chain to the current bundle (webpki), then
/// the SPIFFE ID of the leaf. Checking the ID inside the handshake means a certificate without
/// one (or from another trust domain) is refused with a TLS alert the client can report, and
/// counted, instead of a connection that completes and then closes without a word.
#[derive(Debug)]
struct SpiffeClientVerifier {
    chain: Arc<dyn ClientCertVerifier>,
    /// The roots `chain` verifies against, naming them to `verified`.
    roots: Arc<RootCertStore>,
    /// Chains `chain` has accepted: a caller's next handshake skips their signature checks
    /// (shared by every config built for this listener; new roots empty it).
    verified: Arc<VerifiedChains>,
    trust_domain: TrustDomain,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.chain.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self.verified.check(
            &self.roots,
            end_entity,
            intermediates,
            now,
            || {
                self.chain
                    .verify_client_cert(end_entity, intermediates, now)
            },
            ClientCertVerified::assertion,
        )?;
        let refuse = |e: IdentityRefused| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
                Arc::new(e),
            )))
        };
        let info = meshgate_ca::cert::cert_info(end_entity)
            .map_err(|e| refuse(IdentityRefused::BadSpiffeId(e.to_string())))?;
        if !info.id.is_member_of(&self.trust_domain) {
            return Err(refuse(IdentityRefused::ForeignTrustDomain(info.id)));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}

/// The inbound certificate resolver: the workload's SVID, but only while it is valid. When the
/// CA stays unreachable past the SVID's lifetime the identity client keeps the expired
/// certificate (there is nothing better), and the plain resolver went on presenting it: a client
/// that does not check expiry was served by a sidecar with no valid identity (found by
/// `tests/it/chaos.rs`). Returning no certificate makes rustls refuse the handshake instead.
struct ValidSvidOnly(Arc<Identity>);

impl std::fmt::Debug for ValidSvidOnly {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("ValidSvidOnly").field(self.0.id()).finish()
    }
}

impl ResolvesServerCert for ValidSvidOnly {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<rustls::sign::CertifiedKey>> {
        if !self.0.is_ready() {
            tracing::warn!(event = "tls.svid_expired", id = %self.0.id(), "refusing a handshake: this workload's SVID has expired");
            return None;
        }
        self.0.resolver().resolve(hello)
    }
}

/// Why a handshake failed, as a metric label.
pub fn failure_reason(err: &std::io::Error) -> &'static str {
    use rustls::{CertificateError, Error};
    let error = err.get_ref().and_then(|e| e.downcast_ref::<Error>());
    if let Some(Error::InvalidCertificate(CertificateError::Other(other))) = error
        && let Some(refused) = other.0.downcast_ref::<IdentityRefused>()
    {
        return match refused {
            IdentityRefused::BadSpiffeId(_) => "bad_spiffe_id",
            IdentityRefused::ForeignTrustDomain(_) => "foreign_trust_domain",
        };
    }
    match error {
        Some(Error::NoCertificatesPresented) => "no_client_cert",
        Some(Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        )) => "cert_expired",
        Some(Error::InvalidCertificate(CertificateError::UnknownIssuer)) => "unknown_issuer",
        Some(Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure)) => {
            "wrong_server_id"
        }
        Some(Error::InvalidCertificate(_)) => "bad_cert",
        Some(Error::InvalidMessage(_)) => "not_tls",
        Some(Error::AlertReceived(_)) => "peer_alert",
        Some(Error::NoApplicationProtocol) => "no_alpn",
        _ => "other",
    }
}

/// Builds the inbound config: client certificate required and chained to the current bundle,
/// TLS 1.3 only unless `allow_tls12`, AES-128-GCM chosen first ([`meshgate_ca::tls::provider`]), ALPN h2 + http/1.1 + meshgate-tcp (L4 tunnels), no
/// resumption.
pub fn inbound_config(
    identity: &Arc<Identity>,
    verified: &Arc<VerifiedChains>,
    allow_tls12: bool,
) -> Result<ServerConfig, rustls::Error> {
    let roots = identity.bundle().load().roots();
    let chain = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
        .build()
        .map_err(|e| rustls::Error::General(format!("client verifier: {e}")))?;
    let verifier = Arc::new(SpiffeClientVerifier {
        chain,
        roots,
        verified: verified.clone(),
        trust_domain: identity.id().trust_domain(),
    });
    let versions: &[&rustls::SupportedProtocolVersion] = if allow_tls12 {
        &[&rustls::version::TLS13, &rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS13]
    };
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(ValidSvidOnly(identity.clone())));
    meshgate_ca::tls::prefer_our_suites(&mut config);
    config.send_tls13_tickets = 0;
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.alpn_protocols = vec![
        b"h2".to_vec(),
        b"http/1.1".to_vec(),
        crate::tunnel::ALPN.to_vec(),
    ];
    Ok(config)
}

/// The inbound config, kept current with the trust bundle. `verified` is the listener's cache
/// of verified client chains ([`crate::metrics::Metrics::inbound_chains`]); each rebuilt config
/// verifies against new roots, which empties it.
pub fn live_inbound_config(
    identity: Arc<Identity>,
    verified: Arc<VerifiedChains>,
    allow_tls12: bool,
) -> Result<Arc<ArcSwap<ServerConfig>>, rustls::Error> {
    let live = Arc::new(ArcSwap::from_pointee(inbound_config(
        &identity,
        &verified,
        allow_tls12,
    )?));
    let target = live.clone();
    let mut changes = identity.bundle_changes();
    tokio::spawn(async move {
        while changes.changed().await.is_ok() {
            match inbound_config(&identity, &verified, allow_tls12) {
                Ok(config) => {
                    target.store(Arc::new(config));
                    tracing::info!(
                        event = "tls.inbound_config_rebuilt",
                        "trust bundle changed; new handshakes use it"
                    );
                }
                Err(e) => {
                    tracing::error!(event = "tls.inbound_config_failed", error = %e, "keeping the previous TLS config")
                }
            }
        }
    });
    Ok(live)
}
