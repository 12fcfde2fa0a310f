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
use meshgate_ca::tls::provider;
use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;

use crate::identity::Identity;

/// Why a handshake failed, as a metric label.
pub fn failure_reason(err: &std::io::Error) -> &'static str {
    use rustls::{CertificateError, Error};
    match err.get_ref().and_then(|e| e.downcast_ref::<Error>()) {
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
/// TLS 1.3 only unless `allow_tls12`, ALPN h2 + http/1.1 + meshgate-tcp (L4 tunnels), no
/// resumption.
pub fn inbound_config(
    identity: &Identity,
    allow_tls12: bool,
) -> Result<ServerConfig, rustls::Error> {
    let verifier =
        WebPkiClientVerifier::builder_with_provider(identity.bundle().load().roots(), provider())
            .build()
            .map_err(|e| rustls::Error::General(format!("client verifier: {e}")))?;
    let versions: &[&rustls::SupportedProtocolVersion] = if allow_tls12 {
        &[&rustls::version::TLS13, &rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS13]
    };
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(identity.resolver());
    config.send_tls13_tickets = 0;
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.alpn_protocols = vec![
        b"h2".to_vec(),
        b"http/1.1".to_vec(),
        crate::tunnel::ALPN.to_vec(),
    ];
    Ok(config)
}

/// The inbound config, kept current with the trust bundle.
pub fn live_inbound_config(
    identity: Arc<Identity>,
    allow_tls12: bool,
) -> Result<Arc<ArcSwap<ServerConfig>>, rustls::Error> {
    let live = Arc::new(ArcSwap::from_pointee(inbound_config(
        &identity,
        allow_tls12,
    )?));
    let target = live.clone();
    let mut changes = identity.bundle_changes();
    tokio::spawn(async move {
        while changes.changed().await.is_ok() {
            match inbound_config(&identity, allow_tls12) {
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
