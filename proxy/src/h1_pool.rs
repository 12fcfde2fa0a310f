//! Kept-alive HTTP/1.1 connections to one peer: the local app behind the inbound listener
//! (plain TCP), or one sidecar of a Service behind the outbound listener (mTLS).
//!
//! Why not hyper-util's pooled client: on the inbound path it was the largest cost after hyper's
//! own HTTP/2 server (callgrind, BENCHMARKS.md "Where the time goes"). Its pool is keyed by the
//! request's authority, so every request hashed and locked a map, cloned a client of several
//! `Arc`s and built a connect future; and because an HTTP/1.1 connection is busy until its
//! response body is read, it spawned a task per request to put the connection back once idle.
//! Each pool here serves one peer: a stack of idle connections is all it needs, and the response
//! body itself gives its connection back when it ends.
//!
//! Behaviour kept from the pooled client: the dialer's connect timeout, `TCP_NODELAY`,
//! connections idle longer than the pool's idle timeout are closed, and a request a reused
//! connection could not even start (the peer closed it while idle) is retried once on a new
//! connection. Added: an idempotent request without a body whose reused connection was closed
//! or reset as it crossed is sent once more (RFC 9112 §9.3.1), never a POST.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1;

/// Idle connections kept per peer. A burst of more concurrent requests opens more, and the
/// surplus is closed when they finish, so an idle sidecar holds at most this many sockets.
pub const MAX_IDLE: usize = 256;

/// Opens a new connection to the pool's peer.
pub trait Dial: Send + Sync + 'static {
    type Io: hyper::rt::Read + hyper::rt::Write + Send + Unpin + 'static;
    type Error: std::error::Error + Send + Sync + 'static;
    fn dial(&self) -> impl Future<Output = Result<Self::Io, Self::Error>> + Send;
    /// The peer, for error messages (`app at 127.0.0.1:8080`, `sidecar at orders:15006`).
    fn peer(&self) -> String;
}

/// A request body that can be made empty: what a bodiless request is sent again with.
pub trait Resendable: Body<Data = Bytes> + Send + Unpin + 'static
where
    Self::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn empty() -> Self;
}

/// Why a request did not get a response from the peer.
#[derive(Debug, thiserror::Error)]
pub enum PoolError<E: std::error::Error + 'static> {
    #[error(transparent)]
    Dial(E),
    #[error("HTTP/1.1 to the {peer}: {source}")]
    Http { peer: String, source: hyper::Error },
    /// From [`crate::h2_conn`], which dials with the same [`Dial`].
    #[error("HTTP/2 to the {peer}: {source}")]
    Http2 { peer: String, source: hyper::Error },
}

/// A failed send, with the request when it never left (a dial failure): the caller may try
/// another peer with it.
#[derive(Debug)]
pub struct SendError<E: std::error::Error + 'static, B> {
    pub error: PoolError<E>,
    pub unsent: Option<Request<B>>,
}

type Sender<B> = http1::SendRequest<B>;

/// What [`Http1Pool::send`] resolves to.
pub type Sent<D, B> = Result<Response<PooledBody<D, B>>, SendError<<D as Dial>::Error, B>>;

/// The idle connections to one peer. Shared by every request for it: one HTTP/1.1 request at a
/// time per connection, so callers cannot starve each other.
pub struct Http1Pool<D: Dial, B> {
    dial: D,
    idle_timeout: Duration,
    /// Most recently used at the back (reused first: its socket is warm); the front is the
    /// oldest, where expired ones are.
    idle: Mutex<VecDeque<(Sender<B>, Instant)>>,
}

impl<D: Dial, B> std::fmt::Debug for Http1Pool<D, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Http1Pool")
            .field("peer", &self.dial.peer())
            .field("idle_timeout", &self.idle_timeout)
            .finish()
    }
}

impl<D, B> Http1Pool<D, B>
where
    D: Dial,
    B: Resendable,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    /// `idle_timeout` must be shorter than the peer's own idle close of kept-alive connections,
    /// so that a request rarely crosses the peer's close.
    pub fn new(dial: D, idle_timeout: Duration) -> Arc<Self> {
        Arc::new(Self {
            dial,
            idle_timeout,
            idle: Mutex::new(VecDeque::new()),
        })
    }

    pub fn dialer(&self) -> &D {
        &self.dial
    }

    /// A live idle connection, if one is left.
    fn checkout(&self) -> Option<Sender<B>> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some((sender, since)) = idle.pop_back() {
            if !sender.is_closed() && since.elapsed() < self.idle_timeout {
                return Some(sender);
            }
        }
        None
    }

    /// Puts a connection whose response ended back, and closes expired ones (dropping a sender
    /// closes its idle connection).
    fn checkin(&self, sender: Sender<B>) {
        if sender.is_closed() {
            return;
        }
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while idle
            .front()
            .is_some_and(|(s, since)| s.is_closed() || now - *since >= self.idle_timeout)
        {
            idle.pop_front();
        }
        if idle.len() < MAX_IDLE {
            idle.push_back((sender, now));
        }
    }

    fn http_error(&self, source: hyper::Error) -> PoolError<D::Error> {
        PoolError::Http {
            peer: self.dial.peer(),
            source,
        }
    }

    async fn connect(&self) -> Result<Sender<B>, PoolError<D::Error>> {
        let io = self.dial.dial().await.map_err(PoolError::Dial)?;
        let (sender, conn) = http1::handshake(io).await.map_err(|e| self.http_error(e))?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "kept-alive HTTP/1.1 connection ended with an error");
            }
        });
        Ok(sender)
    }

    /// Sends `req` (origin-form URI, `Host` set) on an idle connection or a new one. The
    /// response body hands its connection back to the pool when it ends; a 101 keeps it (the
    /// connection now belongs to the upgraded protocol).
    ///
    /// Not an `async fn`: the future owns the pool and the request once. An `async fn` keeps
    /// its arguments and their rebinding side by side, and a caller that can only call it
    /// inside its own `async` block holds the request there too (the inbound forwarder's
    /// per-request future was 1,688 bytes, three copies of the request; `-Zprint-type-sizes`).
    #[allow(clippy::manual_async_fn)] // on purpose: see above
    pub fn send(
        self: Arc<Self>,
        mut req: Request<B>,
    ) -> impl Future<Output = Sent<D, B>> + Send + 'static {
        async move {
            // A reused connection may have been closed by the peer while idle (its keep-alive
            // timeout), and the close may cross the request on the wire. A request hyper hands
            // back unsent goes once more on a new connection; so does one it sent when the
            // connection then failed (closed or reset), if it is idempotent and bodiless (RFC
            // 9112 §9.3.1: what browsers and Envoy do), from a copy of its head kept for that
            // case. Anything else is never sent twice: the peer may have acted on it.
            if let Some(mut sender) = self.checkout()
                && sender.ready().await.is_ok()
            {
                let replay = replayable(&req);
                match sender.try_send_request(req).await {
                    Ok(resp) => return Ok(self.pooled(resp, sender)),
                    Err(mut e) => match (e.take_message(), replay) {
                        (Some(unsent), _) => req = unsent,
                        // Closed (FIN: an incomplete message) or reset (RST: an I/O error)
                        // under the request: either way, an idempotent request may go again.
                        (None, Some(head)) => {
                            tracing::debug!(
                                event = "http1_pool.retry",
                                peer = %self.dial.peer(),
                                error = %e.error(),
                                "a kept-alive connection failed under an idempotent request; sent again on a new connection"
                            );
                            req = Request::from_parts(head, B::empty());
                        }
                        (None, _) => {
                            return Err(SendError {
                                error: self.http_error(e.into_error()),
                                unsent: None,
                            });
                        }
                    },
                }
            }
            // Boxed: dialling (with TLS to a peer sidecar) is most of this future's size, and
            // a reused connection, the usual case, does not need it.
            let mut sender = match Box::pin(self.connect()).await {
                Ok(sender) => sender,
                Err(error) => {
                    return Err(SendError {
                        error,
                        unsent: Some(req),
                    });
                }
            };
            let failed = |error| SendError {
                error,
                unsent: None,
            };
            sender
                .ready()
                .await
                .map_err(|e| failed(self.http_error(e)))?;
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| failed(self.http_error(e)))?;
            Ok(self.pooled(resp, sender))
        }
    }

    fn pooled(
        self: &Arc<Self>,
        resp: Response<Incoming>,
        sender: Sender<B>,
    ) -> Response<PooledBody<D, B>> {
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
fn replayable<B: Body>(req: &Request<B>) -> Option<http::request::Parts> {
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

/// A response body from the peer that returns its connection to the pool once read to the end.
/// Dropped early (the caller went away), the connection is dropped with it: it may still carry
/// the rest of the body.
pub struct PooledBody<D: Dial, B> {
    body: Incoming,
    /// The pool and the connection to give back, until the body ends.
    home: Option<Home<D, B>>,
}

type Home<D, B> = (Arc<Http1Pool<D, B>>, Sender<B>);

impl<D, B> PooledBody<D, B>
where
    D: Dial,
    B: Resendable,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    /// Gives the connection back once it can take another request. Usually that is now: the
    /// request went out whole before its answer ended. An app may answer before it has read
    /// the request's body, though (nginx's `return`, an early 401 or 413), and the connection
    /// then stays busy until the rest of the body is written. Handed out at once, it would
    /// keep the next request waiting behind that body while the next request's own body,
    /// arriving from the peer sidecar, sat unread in the HTTP/2 connection's flow-control
    /// window, which the first body needs to arrive: enough uploads at once stopped every
    /// upload between the two sidecars (`tests/it/sidecar_flow_control.rs`). Such a connection
    /// goes back only when hyper is ready to send on it again; requests meanwhile take another.
    fn release(&mut self) {
        if let Some((pool, mut sender)) = self.home.take() {
            if sender.is_ready() {
                pool.checkin(sender);
            } else {
                tokio::spawn(async move {
                    if sender.ready().await.is_ok() {
                        pool.checkin(sender);
                    }
                });
            }
        }
    }
}

impl<D, B> Body for PooledBody<D, B>
where
    D: Dial,
    B: Resendable,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
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

/// A request body received by this sidecar, or none: what the outbound side sends to a peer
/// sidecar over HTTP/1.1 ([`Resendable`] needs a way to make an empty one).
pub struct MaybeIncoming(Option<Incoming>);

impl From<Incoming> for MaybeIncoming {
    fn from(body: Incoming) -> Self {
        Self(Some(body))
    }
}

impl Resendable for MaybeIncoming {
    fn empty() -> Self {
        Self(None)
    }
}

impl Body for MaybeIncoming {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match &mut self.0 {
            Some(body) => Pin::new(body).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.0.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.0
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}
