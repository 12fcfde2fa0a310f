//! Kept-alive HTTP/1.1 connections to one local app.
//!
//! Why not hyper-util's pooled client: on the inbound path it was the largest cost after hyper's
//! own HTTP/2 server (callgrind, BENCHMARKS.md "Where the time goes"). Its pool is keyed by the
//! request's authority, so every request hashed and locked a map, cloned a client of several
//! `Arc`s and built a connect future; and because an HTTP/1.1 connection is busy until its
//! response body is read, it spawned a task per request to put the connection back once idle.
//! A sidecar talks to one app per `--app`: a stack of idle connections is all the pool needs, and
//! the response body itself gives its connection back when it ends.
//!
//! Behaviour kept from the pooled client: a 5 s connect timeout, `TCP_NODELAY`, connections
//! idle longer than [`IDLE_TIMEOUT`] are closed, and a request a reused connection could not
//! even start (the app closed it while idle) is retried once on a new connection.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::body::{Body, Frame, SizeHint};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::sanitize::TrailerFilter;

/// How long an app may take to accept a connection before the request fails with 502.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// An idle connection unused this long is closed (hyper-util's default too; below the 75 s
/// after which nginx drops idle keep-alive connections, so it is rarely the app's close we race).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Idle connections kept per app. A burst of more concurrent requests opens more, and the
/// surplus is closed when they finish, so an idle sidecar holds at most this many sockets.
pub const MAX_IDLE: usize = 256;

type Sender = http1::SendRequest<TrailerFilter>;

/// Why a request did not reach the app (the forwarder answers 502 and logs it).
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("connecting to the app at {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the app at {addr} did not accept a connection within {CONNECT_TIMEOUT:?}")]
    ConnectTimeout { addr: SocketAddr },
    #[error("HTTP/1.1 to the app at {addr}: {source}")]
    Http {
        addr: SocketAddr,
        source: hyper::Error,
    },
}

/// The idle connections to one app. Shared by every caller connection: one HTTP/1.1 request
/// at a time per app connection, so callers cannot starve each other.
#[derive(Debug)]
pub struct Http1Pool {
    addr: SocketAddr,
    /// Most recently used at the back (reused first: its socket is warm); the front is the
    /// oldest, where expired ones are.
    idle: Mutex<VecDeque<(Sender, Instant)>>,
}

impl Http1Pool {
    pub fn new(addr: SocketAddr) -> Arc<Self> {
        Arc::new(Self {
            addr,
            idle: Mutex::new(VecDeque::new()),
        })
    }

    /// A live idle connection, if one is left.
    fn checkout(&self) -> Option<Sender> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some((sender, since)) = idle.pop_back() {
            if !sender.is_closed() && since.elapsed() < IDLE_TIMEOUT {
                return Some(sender);
            }
        }
        None
    }

    /// Puts a connection whose response ended back, and closes expired ones (dropping a sender
    /// closes its idle connection).
    fn checkin(&self, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while idle
            .front()
            .is_some_and(|(s, since)| s.is_closed() || now - *since >= IDLE_TIMEOUT)
        {
            idle.pop_front();
        }
        if idle.len() < MAX_IDLE {
            idle.push_back((sender, now));
        }
    }

    async fn connect(&self) -> Result<Sender, AppError> {
        let addr = self.addr;
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| AppError::ConnectTimeout { addr })?
            .map_err(|source| AppError::Connect { addr, source })?;
        let _ = tcp.set_nodelay(true);
        let (sender, conn) = http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|source| AppError::Http { addr, source })?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "connection to the app ended with an error");
            }
        });
        Ok(sender)
    }

    /// Sends `req` (origin-form URI, `Host` set) on an idle connection or a new one. The
    /// response body hands its connection back to the pool when it ends; a 101 keeps it (the
    /// connection now belongs to the upgraded protocol).
    pub async fn send(
        self: &Arc<Self>,
        req: Request<TrailerFilter>,
    ) -> Result<Response<PooledBody>, AppError> {
        let addr = self.addr;
        let mut req = req;
        // A reused connection may have been closed by the app while idle (its keep-alive
        // timeout), and the close may cross the request on the wire. A request hyper hands back
        // unsent goes once more on a new connection; so does one it sent when the connection
        // then failed (closed or reset), if it is idempotent and bodiless (RFC 9112 §9.3.1:
        // what browsers and Envoy do), from a copy of its head kept for that case. Anything
        // else is never sent twice: the app may have acted on it.
        if let Some(mut sender) = self.checkout()
            && sender.ready().await.is_ok()
        {
            let replay = replayable(&req);
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok(self.pooled(resp, sender)),
                Err(mut e) => match (e.take_message(), replay) {
                    (Some(unsent), _) => req = unsent,
                    // Closed (FIN: an incomplete message) or reset (RST: an I/O error) under
                    // the request: either way, an idempotent request may go again.
                    (None, Some(head)) => {
                        tracing::debug!(
                            event = "inbound.app_retry",
                            error = %e.error(),
                            "a kept-alive connection to the app failed under an idempotent request; sent again on a new connection"
                        );
                        req = Request::from_parts(head, TrailerFilter::empty());
                    }
                    (None, _) => {
                        return Err(AppError::Http {
                            addr,
                            source: e.into_error(),
                        });
                    }
                },
            }
        }
        let mut sender = self.connect().await?;
        sender
            .ready()
            .await
            .map_err(|source| AppError::Http { addr, source })?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|source| AppError::Http { addr, source })?;
        Ok(self.pooled(resp, sender))
    }

    fn pooled(self: &Arc<Self>, resp: Response<Incoming>, sender: Sender) -> Response<PooledBody> {
        let keep = resp.status() != http::StatusCode::SWITCHING_PROTOCOLS;
        resp.map(|body| {
            let mut pooled = PooledBody {
                body,
                home: keep.then(|| (self.clone(), sender)),
            };
            if pooled.body.is_end_stream() {
                pooled.release();
            }
            pooled
        })
    }
}

/// A copy of the head of an idempotent request without a body (RFC 9110 §9.2.2: GET, HEAD,
/// OPTIONS, TRACE, PUT, DELETE), which may be sent again; `None` for any other.
fn replayable(req: &Request<TrailerFilter>) -> Option<http::request::Parts> {
    use http::Method;
    let idempotent = matches!(
        *req.method(),
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    );
    if !idempotent || !req.body().is_end_stream() {
        return None;
    }
    let mut head = Request::new(());
    *head.method_mut() = req.method().clone();
    *head.uri_mut() = req.uri().clone();
    *head.version_mut() = req.version();
    *head.headers_mut() = req.headers().clone();
    Some(head.into_parts().0)
}

/// A response body from the app that returns its connection to the pool once read to the end.
/// Dropped early (the caller went away), the connection is dropped with it: it may still carry
/// the rest of the body.
pub struct PooledBody {
    body: Incoming,
    home: Option<(Arc<Http1Pool>, Sender)>,
}

impl PooledBody {
    fn release(&mut self) {
        if let Some((pool, sender)) = self.home.take() {
            pool.checkin(sender);
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let frame = ready!(Pin::new(&mut self.body).poll_frame(cx));
        match &frame {
            None => self.release(),
            Some(Ok(_)) if self.body.is_end_stream() => self.release(),
            Some(Err(_)) => self.home = None,
            Some(Ok(_)) => {}
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
