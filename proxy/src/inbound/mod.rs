//! The inbound listener: mTLS termination (the caller's SPIFFE ID checked in the handshake),
//! then, per request, a pipeline of tower layers:
//!
//! ```text
//! Observe  →  Normalize  →  Authorize  →  AppForwarder
//! (span,      (Host,        (judge: method,   (HTTP/1.1 or h2c
//!  decision    hop-by-hop,   path, policy;     to the app)
//!  written,    identity      identity headers
//!  errors →    headers,      added)
//!  responses)  upgrades)
//! ```
//!
//! Each inner layer either passes the request on or returns an [`error::InboundError`] carrying
//! its decision; [`observe::Observe`] writes every decision once and maps errors to responses.
//! Opaque TCP (ALPN `meshgate-tcp`) goes to the L4 tunnel server instead.

pub mod app_pool;
pub mod authz;
pub mod error;
pub mod forward;
pub mod normalize;
pub mod observe;
pub mod sanitize;

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper_util::service::TowerToHyperService;
use meshgate_ca::cert;
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
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
    pub authz: Arc<AuthzContext>,
    pub forwarder: AppForwarder,
    pub tunnel: crate::tunnel::TunnelServer,
    pub metrics: Arc<Metrics>,
    pub limits: crate::serve::Limits,
    /// Connections still in their TLS handshake (`limits.handshakes`).
    pub handshakes: Arc<crate::serve::PendingHandshakes>,
}

/// Logs and counts a refused or failed handshake; the handshake produced no connection.
fn handshake_failed<T>(
    metrics: &Metrics,
    peer: std::net::SocketAddr,
    reason: &'static str,
    detail: &str,
) -> Option<T> {
    metrics
        .tls_handshake_failures
        .get_or_create(&TlsLabels {
            direction: "inbound",
            reason,
        })
        .inc();
    tracing::warn!(event = "tls.handshake_refused", direction = "inbound", peer.addr = %peer, reason, detail, "inbound connection refused");
    None
}

impl Inbound {
    /// Accepts connections until `shutdown` turns true, then drains open ones (up to `drain`).
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: watch::Receiver<bool>,
        drain: Duration,
    ) {
        let (limits, metrics) = (self.limits, self.metrics.clone());
        let this = Arc::new(self);
        crate::serve::accept_loop(
            listener,
            shutdown,
            drain,
            "inbound",
            limits,
            metrics,
            move |tcp, peer, drain| this.clone().connection(tcp, peer, drain),
        )
        .await;
    }

    /// One accepted connection: the handshake, then the authenticated connection. Memory per
    /// open connection is what an idle mesh holds (thousands of them), so each phase lives in
    /// its own allocation, freed or made when the phase changes, and the task itself keeps
    /// only pointers: as one `async fn`, the task's future had room for the handshake's state
    /// and the HTTP connection's side by side (17 KiB per connection, measured).
    fn connection(
        self: Arc<Self>,
        tcp: TcpStream,
        peer: std::net::SocketAddr,
        drain: crate::serve::DrainWatch,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        use futures_util::FutureExt;
        let this = self.clone();
        let handshake = Box::pin(async move {
            let _ = tcp.set_nodelay(true);
            // Until its handshake completes a connection is one of the pending handshakes; at
            // the cap the oldest is shed, so half-open floods cannot lock known peers out.
            let (mut pending, shed_other) = this.handshakes.enter();
            if shed_other {
                this.metrics.count_hygiene("handshake_shed", 1);
            }
            tokio::select! {
                handshake = this.handshake(tcp, peer) => handshake,
                _ = &mut pending.shed => {
                    tracing::debug!(event = "inbound.handshake_shed", peer.addr = %peer, "pending handshake dropped to make room for newer connections");
                    None
                }
            }
        });
        handshake.then(move |handshake| match handshake {
            Some((tls, id, not_after)) => self.serve_authenticated(tls, peer, id, not_after, drain),
            None => Box::pin(std::future::ready(())),
        })
    }

    /// Peeks for TLS, completes the handshake (client certificate with a SPIFFE ID of this
    /// trust domain) within [`HANDSHAKE_TIMEOUT`]; failures are logged and counted here.
    async fn handshake(
        &self,
        tcp: TcpStream,
        peer: std::net::SocketAddr,
    ) -> Option<(
        crate::tls_stream::ServerTls<TcpStream>,
        meshgate_ca::SpiffeId,
        time::OffsetDateTime,
    )> {
        // Plaintext on the mTLS port is refused before any TLS state is created, and counted.
        let mut first = [0u8; 1];
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, tcp.peek(&mut first)).await {
            Ok(Ok(1)) if first[0] == TLS_HANDSHAKE_RECORD => {}
            Ok(Ok(0)) => return None,
            Ok(Ok(_)) => {
                return handshake_failed(
                    &self.metrics,
                    peer,
                    "plaintext",
                    "first byte is not a TLS handshake record",
                );
            }
            Ok(Err(_)) => return None,
            Err(_) => return handshake_failed(&self.metrics, peer, "timeout", "no data"),
        }
        let accept = crate::tls_stream::ServerTls::accept(tcp, self.tls.load_full());
        let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, accept).await {
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
        meshgate_ca::tls::ack_handshake(tls.get_ref());
        let Some(leaf) = tls.session().peer_certificates().and_then(|c| c.first()) else {
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
        Some((tls, id, not_after))
    }

    /// Serves an authenticated connection: an L4 tunnel (ALPN `meshgate-tcp`) or HTTP through
    /// the authorization layer, until it ends or stays idle for `limits.idle`. Built without
    /// `async` (combinators and [`crate::serve::Serve`]) so that the future holds each
    /// part once (see [`Self::connection`]).
    fn serve_authenticated(
        &self,
        tls: crate::tls_stream::ServerTls,
        peer: std::net::SocketAddr,
        id: meshgate_ca::SpiffeId,
        not_after: time::OffsetDateTime,
        drain: crate::serve::DrainWatch,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        if tls.session().alpn_protocol() == Some(crate::tunnel::ALPN) {
            return Box::pin(self.tunnel.clone().serve(tls, id, not_after));
        }
        let peer_identity = Arc::new(PeerIdentity::new(&self.authz.peers, id, peer, not_after));
        Box::pin(self.serve_http(tls, peer_identity, drain))
    }

    /// Serves an authenticated HTTP connection. What it returns is what every open HTTP
    /// connection holds (in a box of its own) for as long as it stays open: the test
    /// `a_served_connection_fits_the_allocators_size_class` keeps it within the allocator's
    /// size class.
    fn serve_http(
        &self,
        tls: crate::tls_stream::ServerTls,
        peer_identity: Arc<PeerIdentity>,
        drain: crate::serve::DrainWatch,
    ) -> impl std::future::Future<Output = ()> + Send + use<> {
        use futures_util::FutureExt;
        let service = ServiceBuilder::new()
            .layer(observe::ObserveLayer::new(
                self.authz.clone(),
                peer_identity.clone(),
            ))
            .layer(normalize::NormalizeLayer::new(
                self.authz.clone(),
                peer_identity.clone(),
            ))
            .layer(authz::AuthorizeLayer::new(
                self.authz.clone(),
                peer_identity.clone(),
            ))
            .service(self.forwarder.for_connection());
        // The version ALPN agreed on; a client that offered none is detected from its bytes.
        let version = match tls.session().alpn_protocol() {
            Some(b"h2") => Some(crate::http_conn::Version::H2),
            Some(b"http/1.1") => Some(crate::http_conn::Version::H1),
            _ => None,
        };
        // Responses to a peer sidecar's HTTP/2 connection leave in batches.
        let gathering = if version == Some(crate::http_conn::Version::H2) {
            crate::serve::Gathering::All
        } else {
            crate::serve::Gathering::Off
        };
        let (io, _) =
            crate::http_conn::HttpIo::new(crate::serve::CoalesceWrites::new(tls, gathering));
        let conn = crate::http_conn::HttpConnection::new(
            io,
            version,
            TowerToHyperService::new(service),
            self.metrics.parked("inbound"),
        );
        let metrics = self.metrics.clone();
        // The peer's address is read from `peer_identity`, which the service holds anyway: a
        // `SocketAddr` of its own here would be 24 bytes more in every open connection.
        drain
            .serve(conn, Some(self.limits.idle), Some(self.limits.park))
            .map(move |served| {
                let peer = peer_identity.addr;
                if served.idle_closed {
                    metrics.count_hygiene("idle_timeout", 1);
                    metrics.count_idle_close("inbound");
                    tracing::debug!(event = "inbound.idle_timeout", peer.addr = %peer, finished = served.result.is_some(), "closed an idle connection");
                }
                match served.result {
                    Some(Err(e)) if crate::http_conn::is_header_timeout(&e) => {
                        metrics.count_hygiene("header_timeout", 1);
                        metrics.count_header_timeout("inbound");
                        tracing::debug!(event = "inbound.header_timeout", peer.addr = %peer, error = %e, "closed a connection that sent no request in time");
                    }
                    Some(Err(e)) => {
                        tracing::debug!(peer.addr = %peer, error = %e, "inbound connection ended with an error");
                    }
                    _ => {}
                }
            })
    }
}

#[cfg(test)]
mod tests {
    use super::Inbound;

    /// The size of what `f` returns, without calling it.
    fn returned_size<F, A, B, C, D, R>(_: F) -> usize
    where
        F: FnOnce(A, B, C, D) -> R,
    {
        std::mem::size_of::<R>()
    }

    /// What an open HTTP connection holds for as long as it stays open (rustls's session, the
    /// HTTP connection's state, its timer) is one allocation, which mimalloc rounds up to its
    /// next size class: at 1,840 bytes that was 2,048, and 1,792 is the class below. Past it,
    /// every idle connection costs 256 bytes more (BENCHMARKS.md, "seventeenth session").
    #[test]
    fn a_served_connection_fits_the_allocators_size_class() {
        let size = returned_size(Inbound::serve_http);
        assert!(
            size <= 1792,
            "Inbound::serve_http's future is {size} bytes, past mimalloc's 1,792-byte size class: \
             find the field that grew it (or box a part no idle connection needs)"
        );
    }

    /// Every open connection holds its task's future for as long as it stays open; an idle
    /// mesh holds thousands. The phases are boxed so the task keeps pointers, not the
    /// handshake's and the HTTP connection's states side by side (17 KiB before, measured).
    #[test]
    fn a_connection_task_holds_pointers_not_phases() {
        let size = returned_size(Inbound::connection);
        assert!(
            size <= 512,
            "Inbound::connection's future is {size} bytes: box the phase that grew it"
        );
    }
}
