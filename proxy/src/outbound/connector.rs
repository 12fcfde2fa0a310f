//! The connector behind every outbound connection (the HTTP/2 ones of [`super::pool::MeshPool`],
//! upgrades, L4 tunnels): TCP to one of a `Service`'s endpoints, then mTLS with the workload's
//! SVID, accepting only a server that presents the Service's SPIFFE ID.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use meshgate_ca::SpiffeId;
use meshgate_ca::tls::{self, ExpectedServer};
use tokio::net::TcpStream;

use crate::identity::Identity;
use crate::metrics::{Metrics, TlsLabels};
use crate::serve::{CoalesceWrites, Gathering};
use crate::tls_stream::ClientTls;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// An mTLS connection to a peer sidecar (HTTP/2, HTTP/1.1 or an L4 tunnel, by ALPN). On HTTP/2
/// the DATA frames h2 writes one by one (a request body's) are gathered and leave together at
/// the connection's next poll ([`Gathering::Chained`]).
pub struct MeshStream(TokioIo<CoalesceWrites<ClientTls>>);

impl MeshStream {
    fn new(stream: ClientTls) -> Self {
        let gathering = if stream.session().alpn_protocol() == Some(b"h2") {
            Gathering::Chained
        } else {
            Gathering::Off
        };
        Self(TokioIo::new(CoalesceWrites::new(stream, gathering)))
    }

    /// The TLS stream itself (for L4 tunnels, which are not HTTP).
    pub fn into_inner(self) -> ClientTls {
        self.0.into_inner().into_inner()
    }
}

impl hyper::rt::Read for MeshStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for MeshStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    /// Forwarded, so that h2 and hyper see that the stream takes several buffers at once:
    /// without it h2 writes a DATA frame larger than 1 KiB as two writes (its 9-byte head,
    /// then the payload), which rustls turned into two records and two system calls.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Connects to the endpoints of one Service (round robin, skipping ones that refuse).
#[derive(Clone)]
pub struct MeshConnector {
    endpoints: Arc<Vec<String>>,
    next: Arc<AtomicUsize>,
    tls: Arc<rustls::ClientConfig>,
    /// Same, offering only HTTP/1.1: for upgraded (WebSocket) requests, which HTTP/2 cannot carry.
    tls_http1: Arc<rustls::ClientConfig>,
    /// Same, negotiating an L4 tunnel (`meshgate-tcp`).
    tls_tunnel: Arc<rustls::ClientConfig>,
    expected: SpiffeId,
    metrics: Arc<Metrics>,
}

impl MeshConnector {
    pub fn new(
        identity: &Identity,
        expected: SpiffeId,
        endpoints: Vec<String>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let config = |alpn: &[&[u8]]| {
            Arc::new(tls::mesh_client_config_with_cache(
                identity.bundle(),
                ExpectedServer::Exact(expected.clone()),
                Some(identity.resolver()),
                alpn,
                metrics.outbound_chains.clone(),
            ))
        };
        Self {
            endpoints: Arc::new(endpoints),
            next: Arc::new(AtomicUsize::new(0)),
            tls: config(&[b"h2"]),
            tls_http1: config(&[b"http/1.1"]),
            tls_tunnel: config(&[crate::tunnel::ALPN]),
            expected,
            metrics,
        }
    }

    /// A dedicated HTTP/1.1 mTLS connection (not pooled), for upgraded requests.
    pub async fn connect_http1(&self) -> io::Result<MeshStream> {
        self.connect_with(&self.tls_http1).await
    }

    /// A dedicated mTLS connection for an L4 tunnel.
    pub async fn connect_tunnel(&self) -> io::Result<ClientTls> {
        Ok(self.connect_with(&self.tls_tunnel).await?.into_inner())
    }

    async fn connect_with(&self, tls: &Arc<rustls::ClientConfig>) -> io::Result<MeshStream> {
        let mut last_error =
            io::Error::new(io::ErrorKind::NotFound, "the Service has no endpoints");
        for _ in 0..self.endpoints.len() {
            let i = self.next.fetch_add(1, Ordering::Relaxed) % self.endpoints.len();
            match self.connect_one(i, tls).await {
                Ok(stream) => return Ok(stream),
                Err(e) => last_error = e,
            }
        }
        Err(last_error)
    }

    /// How many endpoints the Service has.
    pub fn endpoints(&self) -> usize {
        self.endpoints.len()
    }

    /// An HTTP/2 mTLS connection to endpoint `i` (of [`endpoints`](Self::endpoints)).
    pub async fn connect_endpoint(&self, i: usize) -> io::Result<MeshStream> {
        self.connect_one(i, &self.tls).await
    }

    /// An HTTP/1.1 mTLS connection to endpoint `i`, for the kept-alive HTTP/1.1 pools.
    pub async fn connect_http1_endpoint(&self, i: usize) -> io::Result<MeshStream> {
        self.connect_one(i, &self.tls_http1).await
    }

    /// Endpoint `i`'s `host:port`.
    pub fn endpoint(&self, i: usize) -> &str {
        &self.endpoints[i]
    }

    async fn connect_one(
        &self,
        i: usize,
        tls: &Arc<rustls::ClientConfig>,
    ) -> io::Result<MeshStream> {
        let endpoint = &self.endpoints[i];
        let tcp = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(endpoint.as_str()))
            .await
        {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => return Err(io::Error::new(e.kind(), format!("{endpoint}: {e}"))),
            Err(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("{endpoint}: connect timed out"),
                ));
            }
        };
        let _ = tcp.set_nodelay(true);
        match ClientTls::connect(tcp, tls.clone(), tls::mesh_server_name()).await {
            Ok(stream) => {
                self.metrics
                    .tls_handshakes
                    .get_or_create(&TlsLabels {
                        direction: "outbound",
                        reason: "ok",
                    })
                    .inc();
                Ok(MeshStream::new(stream))
            }
            Err(e) => {
                let reason = crate::tls::failure_reason(&e);
                self.metrics
                    .tls_handshake_failures
                    .get_or_create(&TlsLabels {
                        direction: "outbound",
                        reason,
                    })
                    .inc();
                tracing::warn!(
                    event = "tls.handshake_refused",
                    direction = "outbound",
                    endpoint = %endpoint,
                    expected.id = %self.expected,
                    reason,
                    error = %e,
                    "upstream sidecar refused or failed verification"
                );
                Err(io::Error::new(e.kind(), format!("{endpoint}: {e}")))
            }
        }
    }
}
