//! Connections to the sidecars of one Service, and which one each request takes.
//!
//! Why not hyper-util's pooled client: its pool is keyed by the request's authority, and an
//! HTTP/2 key holds one connection, so every request for a Service went to whichever endpoint
//! that one connection happened to reach: no balancing across a Service's sidecars after the
//! first connect. And per request it hashed and locked the pool, cloned a client of a few hundred
//! bytes and built a connect future (on the mesh path's outbound side, ~5k instructions of ~70k;
//! BENCHMARKS.md). Here requests go round robin over the endpoints, as Linkerd and Envoy balance
//! per request rather than per connection, and each endpoint has:
//!
//! - at most one HTTP/2 connection, opened on first use and shared by every request (HTTP/2
//!   multiplexes): every request by default ([`MeshProtocol::Http2`], as Linkerd carries them);
//! - with [`MeshProtocol::Preserve`], for the HTTP/1.1 requests, a stack of kept-alive HTTP/1.1
//!   mTLS connections ([`crate::h1_pool`]), one request at a time each, as Istio's sidecars
//!   carry HTTP/1.1 (the trade-off: [`MeshProtocol`]).
//!
//! A dead endpoint is not dialled on every request: a failed connect puts it in backoff (1 s,
//! doubling to 30 s), during which requests go to the others; when every endpoint is in backoff
//! they are all tried again rather than refusing outright. A request a closing connection could
//! not start (hyper hands it back unsent) goes once more, on the next endpoint.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http2;

use super::connector::{MeshConnector, MeshStream};
use crate::h1_pool::{Dial, Http1Pool, MaybeIncoming, PoolError, PooledBody};
use crate::h2_conn::SharedH2;

/// First pause before an endpoint whose connect failed is dialled again.
pub const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// Longest pause for an endpoint that keeps failing.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A kept-alive HTTP/1.1 connection to a peer sidecar unused this long is closed: half the
/// peer's [`crate::serve::HEADER_READ_TIMEOUT`], after which the peer closes a connection that
/// sent no new request, so a request never races the peer's close of an idle connection.
pub const HTTP1_IDLE_TIMEOUT: Duration =
    Duration::from_millis(crate::serve::HEADER_READ_TIMEOUT.as_millis() as u64 / 2);

/// How requests travel between sidecars (`--mesh-protocol`).
///
/// Measured on the mesh path (BENCHMARKS.md, "HTTP/1.1 between sidecars"): `Preserve` spends a
/// quarter fewer instructions per request in the two sidecars and answers a moderate load
/// sooner, but at saturation costs as much CPU or more, because every request is a separate
/// write on a separate connection where HTTP/2 reads many frames at once; and it holds one
/// mTLS connection per concurrent request instead of one per endpoint. So HTTP/2 stays the
/// default, as in Linkerd; `Preserve` is Istio's default (`h2UpgradePolicy: DO_NOT_UPGRADE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MeshProtocol {
    /// Everything over one multiplexed HTTP/2 connection per endpoint.
    #[default]
    Http2,
    /// As the app sent them: HTTP/1.1 over kept-alive HTTP/1.1 mTLS connections, HTTP/2 (gRPC)
    /// over the one HTTP/2 connection per endpoint.
    Preserve,
}

type Sender = http2::SendRequest<Incoming>;

/// The kept-alive HTTP/1.1 connections to one endpoint.
pub type Http1Endpoint = Http1Pool<MeshDial, MaybeIncoming>;

/// A response body from a peer sidecar over HTTP/1.1.
pub type Http1Body = PooledBody<MeshDial, MaybeIncoming>;

/// Why a request did not reach a sidecar of the Service.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("the Service has no endpoints")]
    NoEndpoints,
    #[error("connecting: {0}")]
    Connect(#[from] io::Error),
    #[error("HTTP/2: {0}")]
    Http(#[from] hyper::Error),
    #[error(transparent)]
    Http1(#[from] PoolError<io::Error>),
}

/// Failed connects to one endpoint in a row, and until when it is skipped.
#[derive(Debug, Default)]
struct Backoff(Mutex<(u32, Option<Instant>)>);

impl Backoff {
    fn resting(&self, now: Instant) -> bool {
        let backoff = self.0.lock().unwrap_or_else(|p| p.into_inner());
        backoff.1.is_some_and(|until| now < until)
    }

    fn failed(&self) {
        let mut backoff = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let pause = FIRST_BACKOFF
            .saturating_mul(1 << backoff.0.min(5))
            .min(MAX_BACKOFF);
        *backoff = (backoff.0.saturating_add(1), Some(Instant::now() + pause));
    }

    fn succeeded(&self) {
        let mut backoff = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if backoff.0 != 0 {
            *backoff = (0, None);
        }
    }
}

/// Dials one endpoint (mTLS, `h2` or `http/1.1` by ALPN), feeding its backoff.
pub struct MeshDial {
    connector: MeshConnector,
    index: usize,
    backoff: Arc<Backoff>,
    http1: bool,
}

impl Dial for MeshDial {
    type Io = MeshStream;
    type Error = io::Error;

    async fn dial(&self) -> io::Result<MeshStream> {
        let dialled = if self.http1 {
            self.connector.connect_http1_endpoint(self.index).await
        } else {
            self.connector.connect_endpoint(self.index).await
        };
        match &dialled {
            Ok(_) => self.backoff.succeeded(),
            Err(_) => self.backoff.failed(),
        }
        dialled
    }

    fn peer(&self) -> String {
        format!("sidecar at {}", self.connector.endpoint(self.index))
    }
}

struct Endpoint {
    /// The HTTP/2 connection, opened on first use.
    http2: SharedH2<MeshDial, Incoming>,
    backoff: Arc<Backoff>,
    http1: Arc<Http1Endpoint>,
}

/// See the module docs.
pub struct MeshPool {
    endpoints: Box<[Endpoint]>,
    next: AtomicUsize,
}

impl MeshPool {
    pub fn new(connector: MeshConnector) -> Self {
        Self {
            endpoints: (0..connector.endpoints())
                .map(|index| {
                    let backoff = Arc::new(Backoff::default());
                    let dial = |http1| MeshDial {
                        connector: connector.clone(),
                        index,
                        backoff: backoff.clone(),
                        http1,
                    };
                    Endpoint {
                        http2: SharedH2::new(dial(false)),
                        http1: Http1Pool::new(dial(true), HTTP1_IDLE_TIMEOUT),
                        backoff,
                    }
                })
                .collect(),
            next: AtomicUsize::new(0),
        }
    }

    /// The endpoints in the order this request tries them: the next one in turn first, those
    /// out of backoff before the resting ones (better a late answer than none).
    fn order(&self) -> impl Iterator<Item = usize> + '_ {
        let n = self.endpoints.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let turn = move |k| (start + k) % n;
        (0..n)
            .map(turn)
            .filter(move |i| !self.endpoints[*i].backoff.resting(now))
            .chain(
                (0..n)
                    .map(turn)
                    .filter(move |i| self.endpoints[*i].backoff.resting(now)),
            )
    }

    /// The open HTTP/2 connection to endpoint `i`, or a new one. A failed HTTP/2 handshake
    /// puts the endpoint in backoff as a failed connect does (the dial feeds it).
    async fn sender(&self, i: usize) -> Result<Sender, UpstreamError> {
        let endpoint = &self.endpoints[i];
        endpoint.http2.sender().await.map_err(|e| match e {
            PoolError::Dial(e) => UpstreamError::Connect(e),
            PoolError::Http { source, .. } | PoolError::Http2 { source, .. } => {
                endpoint.backoff.failed();
                UpstreamError::Http(source)
            }
        })
    }

    /// Sends `req` over HTTP/2 (absolute URI: its authority is the `:authority` the callee
    /// judges) to the next endpoint in turn that is not in backoff, moving on to the next when
    /// one cannot be reached.
    pub async fn send(&self, req: Request<Incoming>) -> Result<Response<Incoming>, UpstreamError> {
        let n = self.endpoints.len();
        if n == 0 {
            return Err(UpstreamError::NoEndpoints);
        }
        let mut order = self.order();
        let mut req = req;
        let mut last_error = UpstreamError::NoEndpoints;
        // With one endpoint, an unsent request goes once more to it, on a new connection.
        let (mut again, mut retried) = (None, false);
        while let Some(i) = again.take().or_else(|| order.next()) {
            let mut sender = match self.sender(i).await {
                Ok(sender) => sender,
                Err(e) => {
                    last_error = e;
                    continue;
                }
            };
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok(resp),
                Err(mut e) => match e.take_message() {
                    // Never sent (the connection was closing): forget it, try the next one.
                    Some(unsent) => {
                        self.endpoints[i].http2.forget_if_closing();
                        req = unsent;
                        last_error = UpstreamError::Http(e.into_error());
                        if n == 1 && !retried {
                            (again, retried) = (Some(i), true);
                        }
                    }
                    None => return Err(e.into_error().into()),
                },
            }
        }
        Err(last_error)
    }

    /// Sends `req` over HTTP/1.1 (origin-form URI, `Host` set) on a kept-alive connection to
    /// the next endpoint in turn, moving on to the next when one cannot be reached.
    pub async fn send_http1(
        &self,
        req: Request<MaybeIncoming>,
    ) -> Result<Response<Http1Body>, UpstreamError> {
        let mut req = req;
        let mut last_error = UpstreamError::NoEndpoints;
        for i in self.order() {
            match self.endpoints[i].http1.clone().send(req).await {
                Ok(resp) => return Ok(resp),
                Err(failed) => match failed.unsent {
                    Some(unsent) => {
                        req = unsent;
                        last_error = failed.error.into();
                    }
                    None => return Err(failed.error.into()),
                },
            }
        }
        Err(last_error)
    }
}

impl std::fmt::Debug for MeshPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshPool")
            .field("endpoints", &self.endpoints.len())
            .finish()
    }
}

/// Shared by the requests of one route.
pub type SharedPool = Arc<MeshPool>;
