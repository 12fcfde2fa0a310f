//! The L4 tunnel between sidecars for non-HTTP TCP (databases, brokers, anything opaque).
//!
//! A tunnel is its own mTLS connection negotiated with ALPN `meshgate-tcp`, so the inbound side
//! knows what it is from the handshake alone — no sniffing, no stall on server-speaks-first
//! protocols (MySQL, SMTP). Only ports declared TCP (`--inbound-tcp-port`) are reachable; the
//! app's HTTP port never is (HTTP is judged per request). The client then sends one line, `MGTCP1 <port>\n`; the inbound sidecar
//! authorizes the peer's identity for that port (ALLOW rules with HTTP conditions never match L4
//! traffic; DENY rules drop their HTTP conditions and so refuse more),
//! answers `OK\n` and splices bytes. The decision is re-checked at every policy swap: a
//! connection that the new policy denies is closed and counted as `revoked`.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use meshgate_ca::SpiffeId;
use meshgate_policy::record::Layer as DecisionLayer;
use meshgate_policy::{DecisionRecord, PolicySnapshot, judge};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::metrics::{Metrics, TcpLabels};

/// ALPN protocol ID of an L4 tunnel.
pub const ALPN: &[u8] = b"meshgate-tcp";
const HEADER_PREFIX: &str = "MGTCP1 ";
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_HEADER: usize = 32;

fn count(metrics: &Metrics, direction: &'static str, decision: &'static str, port: u16) {
    metrics
        .tcp_connections
        .get_or_create(&TcpLabels {
            direction,
            decision,
            port,
        })
        .inc();
}

/// Reads the tunnel header (`MGTCP1 <port>\n`) with a timeout and a length limit.
async fn read_header<S: AsyncRead + Unpin>(stream: &mut BufReader<S>) -> Option<u16> {
    let mut line = String::new();
    let read = tokio::time::timeout(HEADER_TIMEOUT, async {
        let mut limited = (&mut *stream).take(MAX_HEADER as u64);
        limited.read_line(&mut line).await
    });
    match read.await {
        Ok(Ok(n)) if n > 0 && line.ends_with('\n') => {
            line.trim_end().strip_prefix(HEADER_PREFIX)?.parse().ok()
        }
        _ => None,
    }
}

use tokio::io::AsyncReadExt as _;

/// Inbound side: what an accepted `meshgate-tcp` connection may reach.
#[derive(Clone)]
pub struct TunnelServer {
    pub policy: Arc<ArcSwap<PolicySnapshot>>,
    pub swaps: tokio::sync::watch::Receiver<u64>,
    pub metrics: Arc<Metrics>,
    /// The app's host; tunnels connect to `<app_host>:<port>`.
    pub app_host: std::net::IpAddr,
    /// Ports a tunnel may target (the `--inbound-tcp-port`s). Anything else — the admin port,
    /// other local services — is refused before policy is even consulted.
    pub ports: Arc<Vec<u16>>,
    /// The apps' HTTP ports (every `--app`). Never reachable as an opaque tunnel: bytes in a
    /// tunnel are judged by identity and port only, so an HTTP request sent through one would
    /// skip per-request authorization (method, path, headers) and header sanitizing.
    pub http_ports: Arc<[u16]>,
    /// This workload's ID, for decision records (the same type as HTTP decisions).
    pub workload: SpiffeId,
    /// Where decisions are written.
    pub sink: crate::decision::DecisionSink,
}

impl TunnelServer {
    fn allowed(&self, peer: &SpiffeId, port: u16) -> (bool, meshgate_policy::Decision) {
        let decision = judge(&self.policy.load(), peer, port, None).decision;
        (decision.allowed, decision)
    }

    /// Serves one tunnel whose TLS handshake identified `peer`.
    pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
        self,
        stream: S,
        peer: SpiffeId,
        not_after: time::OffsetDateTime,
    ) {
        let mut stream = BufReader::new(stream);
        let Some(port) = read_header(&mut stream).await else {
            tracing::warn!(event = "tunnel.bad_header", peer.id = %peer, "tunnel closed: missing or malformed header");
            count(&self.metrics, "inbound", "error", 0);
            return;
        };
        if self.http_ports.contains(&port) {
            tracing::warn!(
                event = "tunnel.http_port_refused",
                peer.id = %peer,
                port,
                "tunnel to an app's HTTP port refused: HTTP is authorized per request (send HTTP through the mesh, or declare a TCP port with --inbound-tcp-port)"
            );
            self.metrics.count_hygiene("tunnel_to_http_port", 1);
            count(&self.metrics, "inbound", "deny", port);
            return;
        }
        if !self.ports.contains(&port) {
            tracing::warn!(event = "tunnel.port_refused", peer.id = %peer, port, "tunnel to a port this sidecar does not expose");
            count(&self.metrics, "inbound", "deny", port);
            return;
        }
        let (allowed, decision) = self.allowed(&peer, port);
        // Logged, counted (`allow`/`deny`) and published in one place, like HTTP decisions.
        self.sink.tunnel(&DecisionRecord::new(
            DecisionLayer::L4,
            &self.workload,
            &peer,
            port,
            &decision,
        ));
        if !allowed {
            return;
        }
        let mut app = match TcpStream::connect((self.app_host, port)).await {
            Ok(app) => app,
            Err(e) => {
                tracing::warn!(event = "tunnel.app_unavailable", port, error = %e);
                count(&self.metrics, "inbound", "error", port);
                return;
            }
        };
        if stream.get_mut().write_all(b"OK\n").await.is_err() {
            return;
        }
        let mut swaps = self.swaps.clone();
        swaps.borrow_and_update();
        let copy = tokio::io::copy_bidirectional(&mut stream, &mut app);
        tokio::pin!(copy);
        // The tunnel lives no longer than the certificate that authorized it.
        let remaining = (not_after - time::OffsetDateTime::now_utc()).max(time::Duration::ZERO);
        let expiry = tokio::time::sleep(Duration::try_from(remaining).unwrap_or(Duration::ZERO));
        tokio::pin!(expiry);
        loop {
            tokio::select! {
                _ = &mut copy => return,
                _ = &mut expiry => {
                    tracing::warn!(event = "tunnel.revoked", peer.id = %peer, port, reason = "peer certificate expired", "closing the tunnel");
                    count(&self.metrics, "inbound", "revoked", port);
                    return;
                }
                changed = swaps.changed() => {
                    if changed.is_err() {
                        continue;
                    }
                    let (still, decision) = self.allowed(&peer, port);
                    if !still {
                        tracing::warn!(event = "tunnel.revoked", peer.id = %peer, port, policy.version = %decision.version, reason = %decision.reason, "policy changed: closing the tunnel");
                        count(&self.metrics, "inbound", "revoked", port);
                        return;
                    }
                }
            }
        }
    }
}

/// Outbound side: opens the tunnel header on an established `meshgate-tcp` mTLS stream and waits
/// for the peer's `OK`.
pub async fn open<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    port: u16,
) -> std::io::Result<BufReader<S>> {
    let mut stream = BufReader::new(stream);
    stream
        .get_mut()
        .write_all(format!("{HEADER_PREFIX}{port}\n").as_bytes())
        .await?;
    let mut line = String::new();
    let read = tokio::time::timeout(HEADER_TIMEOUT, async {
        let mut limited = (&mut stream).take(8);
        limited.read_line(&mut line).await
    })
    .await;
    match read {
        Ok(Ok(_)) if line == "OK\n" => Ok(stream),
        Ok(Ok(_)) => Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            "the peer sidecar refused the tunnel",
        )),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the peer sidecar did not answer the tunnel header",
        )),
    }
}
