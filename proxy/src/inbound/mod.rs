//! The inbound listener: mTLS termination, peer identity, authorization, forwarding to the app.

pub mod authz;
pub mod forward;
pub mod sanitize;

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use meshgate_ca::cert;
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tower::ServiceBuilder;

use crate::metrics::{Metrics, TlsLabels};
pub use authz::{AuthzContext, PeerIdentity};
pub use forward::{AppForwarder, AppProtocol};

/// A client that has not finished its TLS handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// TLS records start with this content type (handshake).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Everything the inbound listener needs.
#[derive(Clone)]
pub struct Inbound {
    pub tls: Arc<ArcSwap<ServerConfig>>,
    pub authz: AuthzContext,
    pub forwarder: AppForwarder,
    pub tunnel: crate::tunnel::TunnelServer,
    pub metrics: Arc<Metrics>,
}

fn handshake_failed(
    metrics: &Metrics,
    peer: std::net::SocketAddr,
    reason: &'static str,
    detail: &str,
) {
    metrics
        .tls_handshake_failures
        .get_or_create(&TlsLabels {
            direction: "inbound",
            reason,
        })
        .inc();
    tracing::warn!(event = "tls.handshake_refused", direction = "inbound", peer.addr = %peer, reason, detail, "inbound connection refused");
}

impl Inbound {
    /// Accepts connections until `shutdown` turns true, then drains open ones (up to `drain`).
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: watch::Receiver<bool>,
        drain: Duration,
    ) {
        crate::serve::accept_loop(
            listener,
            shutdown,
            drain,
            "inbound",
            move |tcp, peer, watcher| self.clone().connection(tcp, peer, watcher),
        )
        .await;
    }

    async fn connection(
        self,
        tcp: TcpStream,
        peer: std::net::SocketAddr,
        watcher: hyper_util::server::graceful::Watcher,
    ) {
        let _ = tcp.set_nodelay(true);
        // Plaintext on the mTLS port is refused before any TLS state is created, and counted.
        let mut first = [0u8; 1];
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, tcp.peek(&mut first)).await {
            Ok(Ok(1)) if first[0] == TLS_HANDSHAKE_RECORD => {}
            Ok(Ok(0)) => return,
            Ok(Ok(_)) => {
                return handshake_failed(
                    &self.metrics,
                    peer,
                    "plaintext",
                    "first byte is not a TLS handshake record",
                );
            }
            Ok(Err(_)) => return,
            Err(_) => return handshake_failed(&self.metrics, peer, "timeout", "no data"),
        }
        let acceptor = TlsAcceptor::from(self.tls.load_full());
        let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                return handshake_failed(
                    &self.metrics,
                    peer,
                    crate::tls::failure_reason(&e),
                    &e.to_string(),
                );
            }
            Err(_) => {
                return handshake_failed(
                    &self.metrics,
                    peer,
                    "timeout",
                    "handshake did not complete",
                );
            }
        };
        let Some(leaf) = tls.get_ref().1.peer_certificates().and_then(|c| c.first()) else {
            return handshake_failed(
                &self.metrics,
                peer,
                "no_client_cert",
                "no client certificate",
            );
        };
        let (id, not_after) = match cert::cert_info(leaf) {
            Ok(info) => (info.id, info.not_after),
            Err(e) => return handshake_failed(&self.metrics, peer, "bad_cert", &e.to_string()),
        };
        if !id.is_member_of(&self.authz.local_id.trust_domain()) {
            return handshake_failed(&self.metrics, peer, "foreign_trust_domain", id.as_str());
        }
        self.metrics
            .tls_handshakes
            .get_or_create(&TlsLabels {
                direction: "inbound",
                reason: "ok",
            })
            .inc();
        tracing::debug!(event = "inbound.connection", peer.id = %id, peer.addr = %peer);
        if tls.get_ref().1.alpn_protocol() == Some(crate::tunnel::ALPN) {
            return self.tunnel.clone().serve(tls, id, not_after).await;
        }
        let peer_identity = Arc::new(PeerIdentity {
            id,
            addr: peer,
            not_after,
        });
        let service = ServiceBuilder::new()
            .layer(authz::AuthorizeLayer::new(
                self.authz.clone(),
                peer_identity,
            ))
            .service(self.forwarder.for_connection());
        let builder = crate::serve::http_server();
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(tls), TowerToHyperService::new(service));
        if let Err(e) = watcher.watch(conn.into_owned()).await {
            tracing::debug!(peer.addr = %peer, error = %e, "inbound connection ended with an error");
        }
    }
}
