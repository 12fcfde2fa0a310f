//! HTTP/2 connections to the sidecars of one Service, and which one each request takes.
//!
//! Why not hyper-util's pooled client: its pool is keyed by the request's authority, and an
//! HTTP/2 key holds one connection, so every request for a Service went to whichever endpoint
//! that one connection happened to reach: no balancing across a Service's sidecars after the
//! first connect. And per request it hashed and locked the pool, cloned a client of a few hundred
//! bytes and built a connect future (on the mesh path's outbound side, ~5k instructions of ~70k;
//! BENCHMARKS.md). Here each endpoint has at most one connection, opened on first use and shared
//! by every request (HTTP/2 multiplexes), and requests go round robin over the endpoints, as
//! Linkerd and Envoy balance per request rather than per connection.
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
use hyper_util::rt::TokioExecutor;

use super::connector::MeshConnector;

/// First pause before an endpoint whose connect failed is dialled again.
pub const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// Longest pause for an endpoint that keeps failing.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

type Sender = http2::SendRequest<Incoming>;

/// Why a request did not reach a sidecar of the Service.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("the Service has no endpoints")]
    NoEndpoints,
    #[error("connecting: {0}")]
    Connect(#[from] io::Error),
    #[error("HTTP/2: {0}")]
    Http(#[from] hyper::Error),
}

#[derive(Default)]
struct Endpoint {
    /// The connection in use, if one is open.
    live: Mutex<Option<Sender>>,
    /// Held while dialling, so that requests arriving meanwhile wait for that one connection
    /// instead of each opening their own.
    dialling: tokio::sync::Mutex<()>,
    /// Failed connects in a row, and until when the endpoint is skipped.
    backoff: Mutex<(u32, Option<Instant>)>,
}

impl Endpoint {
    fn current(&self) -> Option<Sender> {
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        live.as_ref().filter(|s| !s.is_closed()).cloned()
    }

    fn resting(&self, now: Instant) -> bool {
        let backoff = self.backoff.lock().unwrap_or_else(|p| p.into_inner());
        backoff.1.is_some_and(|until| now < until)
    }

    fn failed(&self) {
        let mut backoff = self.backoff.lock().unwrap_or_else(|p| p.into_inner());
        let pause = FIRST_BACKOFF
            .saturating_mul(1 << backoff.0.min(5))
            .min(MAX_BACKOFF);
        *backoff = (backoff.0.saturating_add(1), Some(Instant::now() + pause));
    }

    fn succeeded(&self) {
        *self.backoff.lock().unwrap_or_else(|p| p.into_inner()) = (0, None);
    }
}

/// See the module docs.
pub struct MeshPool {
    connector: MeshConnector,
    endpoints: Box<[Endpoint]>,
    next: AtomicUsize,
}

impl MeshPool {
    pub fn new(connector: MeshConnector) -> Self {
        Self {
            endpoints: (0..connector.endpoints())
                .map(|_| Endpoint::default())
                .collect(),
            connector,
            next: AtomicUsize::new(0),
        }
    }

    /// The open connection to endpoint `i`, or a new one.
    async fn sender(&self, i: usize) -> Result<Sender, UpstreamError> {
        let endpoint = &self.endpoints[i];
        if let Some(sender) = endpoint.current() {
            return Ok(sender);
        }
        let _dialling = endpoint.dialling.lock().await;
        if let Some(sender) = endpoint.current() {
            return Ok(sender);
        }
        let stream = match self.connector.connect_endpoint(i).await {
            Ok(stream) => stream,
            Err(e) => {
                endpoint.failed();
                return Err(e.into());
            }
        };
        let (sender, conn) = match http2::Builder::new(TokioExecutor::new())
            .handshake(stream)
            .await
        {
            Ok(handshaken) => handshaken,
            Err(e) => {
                endpoint.failed();
                return Err(e.into());
            }
        };
        endpoint.succeeded();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "HTTP/2 connection to a peer sidecar ended with an error");
            }
        });
        *endpoint.live.lock().unwrap_or_else(|p| p.into_inner()) = Some(sender.clone());
        Ok(sender)
    }

    /// Sends `req` (absolute URI: its authority is the `:authority` the callee judges) to the
    /// next endpoint in turn that is not in backoff, moving on to the next when one cannot be
    /// reached.
    pub async fn send(&self, req: Request<Incoming>) -> Result<Response<Incoming>, UpstreamError> {
        let n = self.endpoints.len();
        if n == 0 {
            return Err(UpstreamError::NoEndpoints);
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        // Endpoints out of backoff first, in turn; then, if all of those failed, the resting
        // ones (better a late answer than none).
        let order = (0..n)
            .map(|k| (start + k) % n)
            .filter(|i| !self.endpoints[*i].resting(now))
            .chain(
                (0..n)
                    .map(|k| (start + k) % n)
                    .filter(|i| self.endpoints[*i].resting(now)),
            );
        let mut order = order;
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
                        let endpoint = &self.endpoints[i];
                        let mut live = endpoint.live.lock().unwrap_or_else(|p| p.into_inner());
                        if live
                            .as_ref()
                            .is_some_and(|s| s.is_closed() || !s.is_ready())
                        {
                            *live = None;
                        }
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
