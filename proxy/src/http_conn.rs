//! The sidecar's HTTP server connection: HTTP/2 as hyper serves it, HTTP/1.1 *parked* while it
//! idles.
//!
//! Why parking: hyper's HTTP/1.1 server connection allocates an 8 KiB read buffer and an 8 KiB
//! header write buffer with its first request and keeps both for as long as the connection stays
//! open; hyper has no setting to give them back. An app's client pool holds its connections to
//! the outbound sidecar open and idle between requests, so each idle pooled connection cost the
//! sidecar 24.5 KiB, where HAProxy, which takes buffers per transfer and returns them when a
//! connection goes quiet, pays 1.1 KiB (BENCHMARKS.md, fourteenth and fifteenth sessions).
//!
//! How: once a connection has moved no bytes for [`Limits::park`](crate::serve::Limits) and
//! nothing is in flight on it, [`HttpConnection::park`] asks hyper to end the connection
//! gracefully. hyper ends an *idle* HTTP/1.1 connection at once, at its next poll, and calls
//! `shutdown` on its I/O, which [`HttpIo`] turns into a no-op while parking; the stream, any
//! bytes hyper read but did not parse yet and the service come back through `into_parts`. The
//! parked connection then holds the stream and the service only, and waits for the stream to
//! become readable; when it does, a new hyper connection takes over, reading the saved bytes
//! first. The client sees one connection that never closed.
//!
//! What keeps this from changing what the client sees:
//! - nothing is in flight: every request counts from the moment hyper hands it to the service
//!   until its response body is dropped ([`InFlight`]); a long poll or a slow stream never parks;
//! - no bytes were read since the last write: a request head arriving in pieces is never cut at
//!   a park (and a client that trickles its head cannot restart hyper's header-read timeout by
//!   pausing between bytes);
//! - the last write did not find the socket full (hyper could still hold bytes to send);
//! - if hyper does not end at once after the graceful shutdown, the connection was not idle
//!   after all: parking is called off and that connection closes after its current message, as
//!   any gracefully shut down HTTP/1.1 connection does.
//!
//! Upgrades (WebSocket, …) go through hyper's own upgrade path unchanged: only a connection that
//! hyper ended without an upgrade is ever parked. HTTP/2 connections are not parked (h2 keeps its
//! own per-connection state and is used by peers that send continuously).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::HeaderValue;
use hyper::body::{Body, Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::http_util::LocalReply;

/// What a connection's I/O, its service and its driver share: when bytes last moved, what is in
/// flight, and whether the connection is being parked.
#[derive(Debug)]
struct Shared {
    since: Instant,
    /// Milliseconds after `since` at which bytes last moved.
    last_ms: AtomicU64,
    /// Requests handed to the service whose response body is not dropped yet.
    in_flight: AtomicU32,
    /// Bytes were read after the last write (a request, or part of one, hyper has not answered).
    read_since_write: AtomicBool,
    /// The last write or flush found the socket full.
    write_blocked: AtomicBool,
    /// The driver asked hyper to end the connection to park it: `shutdown` is a no-op.
    parking: AtomicBool,
    /// An HTTP/1.1 request was answered by the sidecar itself with its body unread
    /// ([`Counted`]): when hyper ends the connection, the rest of that body is read and thrown
    /// away before the stream is dropped ([`LINGER`]).
    linger: AtomicBool,
}

/// When a connection's I/O last moved bytes, for [`crate::serve::Serve`]'s idle limit and for
/// parking.
#[derive(Debug, Clone)]
pub struct Activity(Arc<Shared>);

impl Activity {
    fn new() -> Self {
        Self(Arc::new(Shared {
            since: Instant::now(),
            last_ms: AtomicU64::new(0),
            in_flight: AtomicU32::new(0),
            read_since_write: AtomicBool::new(false),
            write_blocked: AtomicBool::new(false),
            parking: AtomicBool::new(false),
            linger: AtomicBool::new(false),
        }))
    }

    fn touch(&self) {
        self.0
            .last_ms
            .store(self.0.since.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// How long the connection has moved no bytes.
    pub fn quiet_for(&self) -> Duration {
        let last = Duration::from_millis(self.0.last_ms.load(Ordering::Relaxed));
        self.0.since.elapsed().saturating_sub(last)
    }

    /// Bytes were read since the last write: part of a request the connection has not
    /// answered yet (or, before any write, its first bytes).
    pub fn read_since_write(&self) -> bool {
        self.0.read_since_write.load(Ordering::Relaxed)
    }

    /// Nothing in flight, nothing half-read, nothing left to write (see the module docs).
    fn may_park(&self) -> bool {
        self.0.in_flight.load(Ordering::Relaxed) == 0
            && !self.0.read_since_write.load(Ordering::Relaxed)
            && !self.0.write_blocked.load(Ordering::Relaxed)
    }
}

/// The stream under a served HTTP connection: notes every read and write that moved bytes
/// ([`Activity`]), replays bytes read before hyper took the stream (protocol detection, or what
/// hyper had read but not parsed when the connection was parked), and does not shut the stream
/// down while the connection is being parked.
#[derive(Debug)]
pub struct HttpIo<T> {
    inner: T,
    /// Read from `inner` already; handed out before `inner` is read again.
    replay: Bytes,
    activity: Activity,
}

impl<T> HttpIo<T> {
    /// Wraps `inner`; the returned [`Activity`] feeds [`crate::serve::DrainWatch::serve`].
    pub fn new(inner: T) -> (Self, Activity) {
        let activity = Activity::new();
        (
            Self {
                inner,
                replay: Bytes::new(),
                activity: activity.clone(),
            },
            activity,
        )
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for HttpIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.replay.is_empty() {
            let n = self.replay.len().min(buf.remaining());
            buf.put_slice(&self.replay.split_to(n));
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
            self.activity
                .0
                .read_since_write
                .store(true, Ordering::Relaxed);
        }
        polled
    }
}

impl<T> HttpIo<T> {
    /// Notes the outcome of a write or flush.
    fn wrote<R>(&self, polled: &Poll<std::io::Result<R>>, moved: bool) {
        let shared = &self.activity.0;
        shared
            .write_blocked
            .store(polled.is_pending(), Ordering::Relaxed);
        if moved {
            self.activity.touch();
            shared.read_since_write.store(false, Ordering::Relaxed);
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for HttpIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, data);
        self.wrote(&polled, matches!(polled, Poll::Ready(Ok(n)) if n > 0));
        polled
    }

    /// Forwarded so that rustls's pending records (a batch of responses can be several) leave in
    /// one `writev` rather than one `send` each.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.wrote(&polled, matches!(polled, Poll::Ready(Ok(n)) if n > 0));
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.wrote(&polled, false);
        polled
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if self.activity.0.parking.load(Ordering::Relaxed) {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A stream a parked connection can wait on without reading from it.
pub trait ReadReady {
    /// Ready when the stream has something to read (or has failed, or reached its end).
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>>;

    /// Frees the buffers that hold nothing, as the connection parks.
    fn release_buffers(&mut self) {}
}

impl ReadReady for tokio::net::TcpStream {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        tokio::net::TcpStream::poll_read_ready(self, cx)
    }
}

impl ReadReady for crate::tls_stream::ServerTls {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        crate::tls_stream::ServerTls::poll_read_ready(self, cx)
    }

    fn release_buffers(&mut self) {
        crate::tls_stream::ServerTls::release_buffers(self);
    }
}

impl<T: ReadReady> ReadReady for crate::serve::CoalesceWrites<T> {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.get_ref().poll_read_ready(cx)
    }

    fn release_buffers(&mut self) {
        self.get_mut().release_buffers();
    }
}

/// The HTTP version a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    H1,
    H2,
}

/// The HTTP/2 connection preface (RFC 9113, section 3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How the sidecar's HTTP/1.1 connections are served.
pub fn http1_builder() -> hyper::server::conn::http1::Builder {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(crate::serve::HEADER_READ_TIMEOUT)
        .keep_alive(true);
    builder
}

/// The executor of the sidecar's HTTP/2 servers: hyper spawns each stream as a task of its own
/// (its `H2Stream`, which holds the request's future), and this boxes it before tokio takes it.
///
/// Why: tokio moves a spawned future several times on its way into the task's cell (five
/// copies of it per spawn, counted with callgrind). The outbound listener's per-request future
/// is ≈ 3.5 KB, so every request from an HTTP/2 (gRPC) client paid ≈ 1.5k instructions of
/// copies; boxed, the future is copied once, into the box, and tokio moves a pointer
/// (BENCHMARKS.md, twenty-sixth session). HTTP/1.1 connections are not affected: hyper polls
/// their requests' futures in the connection's task.
#[derive(Clone, Copy, Debug, Default)]
pub struct BoxedSpawn;

impl<F> hyper::rt::Executor<F> for BoxedSpawn
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        tokio::spawn(Box::pin(fut));
    }
}

/// How the sidecar's HTTP/2 connections are served.
pub fn http2_builder() -> hyper::server::conn::http2::Builder<BoxedSpawn> {
    let mut builder = hyper::server::conn::http2::Builder::new(BoxedSpawn);
    builder
        .timer(TokioTimer::new())
        .max_header_list_size(crate::serve::MAX_HEADER_LIST)
        .max_concurrent_streams(crate::serve::MAX_CONCURRENT_STREAMS)
        .initial_stream_window_size(crate::serve::H2_STREAM_WINDOW)
        .initial_connection_window_size(crate::serve::H2_CONNECTION_WINDOW);
    builder
}

/// The stream a [`HttpConnection`] serves.
pub trait ConnIo: AsyncRead + AsyncWrite + ReadReady + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + ReadReady + Unpin + Send + 'static> ConnIo for T {}

/// The service a [`HttpConnection`] serves with: hyper's, cloned per connection, its response
/// body named once (`ResBody`).
pub trait ConnService:
    hyper::service::Service<
        Request<Incoming>,
        Response = Response<Self::ResBody>,
        Error: Into<ConnError>,
        Future: Send + 'static,
    > + Clone
    + Send
    + Unpin
    + 'static
{
    type ResBody: Body<Data: Send, Error: Into<ConnError>> + Send + 'static;
}

impl<S, B> ConnService for S
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>>
        + Clone
        + Send
        + Unpin
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<ConnError>,
    B: Body<Data: Send, Error: Into<ConnError>> + Send + 'static,
{
    type ResBody = B;
}

/// How long an HTTP/1.1 connection ended with a request body unread goes on reading and
/// throwing away what the caller still sends (see [`meshgate_ca::linger`]).
pub use meshgate_ca::linger::LINGER;

/// A request handed to the service and not answered to its end yet; see [`Counted`].
#[derive(Debug)]
pub struct InFlight(Activity);

impl InFlight {
    fn new(activity: &Activity) -> Self {
        activity.0.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(activity.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A service whose requests count as in flight from the call until their response body is
/// dropped, so that a connection waiting for a slow answer, or streaming one, is never parked.
///
/// It also ends an HTTP/1.1 connection whose request the sidecar answers itself
/// ([`LocalReply`]: a refusal, a `502`) before reading its body: the body is never read, so
/// hyper closes the connection after the answer; the answer says `connection: close`, and the
/// connection lingers ([`LINGER`]). Without them a caller — an app, or another sidecar's pool
/// with `--mesh-protocol preserve` — lost the answer: the stream, dropped with the body's bytes
/// unread, was reset, and the caller, still writing the body, failed the request (a refused
/// upload became a `502`), or took the connection back and sent its next request into it
/// (`tests/it/sidecar_flow_control.rs`, `refused_uploads_do_not_hold_up_allowed_ones`).
#[derive(Debug, Clone)]
pub struct Counted<S> {
    inner: S,
    activity: Activity,
}

impl<S, B> hyper::service::Service<Request<Incoming>> for Counted<S>
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>>,
{
    type Response = Response<CountedBody<B>>;
    type Error = S::Error;
    type Future = CountedFuture<S::Future>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let unread_body = req.version() < http::Version::HTTP_2 && !req.body().is_end_stream();
        CountedFuture {
            guard: Some(InFlight::new(&self.activity)),
            unread_body,
            inner: self.inner.call(req),
        }
    }
}

pin_project_lite::pin_project! {
    /// A [`Counted`] service's response on its way; the count moves into the body.
    pub struct CountedFuture<F> {
        #[pin]
        inner: F,
        guard: Option<InFlight>,
        // An HTTP/1.x request with a body still to come when it was called.
        unread_body: bool,
    }
}

impl<F, B, E> Future for CountedFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<CountedBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut resp = std::task::ready!(this.inner.poll(cx))?;
        let guard = this.guard.take();
        if *this.unread_body && resp.extensions().get::<LocalReply>().is_some() {
            resp.headers_mut()
                .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
            if let Some(InFlight(activity)) = &guard {
                activity.0.linger.store(true, Ordering::Relaxed);
            }
        }
        Poll::Ready(Ok(resp.map(|inner| CountedBody {
            inner,
            _guard: guard,
        })))
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its request counted as in flight until it is dropped.
    pub struct CountedBody<B> {
        #[pin]
        inner: B,
        _guard: Option<InFlight>,
    }
}

impl<B: Body> Body for CountedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Why a connection ended with an error (hyper's, or a read before hyper took the stream).
pub type ConnError = Box<dyn std::error::Error + Send + Sync>;

/// The first bytes of a connection whose protocol they decide did not arrive within
/// [`HEADER_READ_TIMEOUT`](crate::serve::HEADER_READ_TIMEOUT): the same limit hyper puts on an
/// HTTP/1.1 request head, which it starts only once the protocol is known.
#[derive(Debug)]
pub struct FirstBytesTimeout;

impl std::fmt::Display for FirstBytesTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "no request within {} s of the connection",
            crate::serve::HEADER_READ_TIMEOUT.as_secs()
        )
    }
}

impl std::error::Error for FirstBytesTimeout {}

/// Whether a connection ended at the header timeout: its first bytes ([`FirstBytesTimeout`])
/// or an HTTP/1.1 request head (hyper's) came too late. The listeners count these.
pub fn is_header_timeout(e: &ConnError) -> bool {
    e.is::<FirstBytesTimeout>()
        || e.downcast_ref::<hyper::Error>()
            .is_some_and(|e| e.is_timeout())
}

type H1<T, S> = hyper::server::conn::http1::UpgradeableConnection<TokioIo<HttpIo<T>>, Counted<S>>;
type H2<T, S> = hyper::server::conn::http2::Connection<TokioIo<HttpIo<T>>, Counted<S>, BoxedSpawn>;

/// Where a connection is.
enum State<T, S>
where
    Counted<S>: hyper::service::HttpService<Incoming>,
{
    /// Reading until the first bytes decide between the HTTP/2 preface and anything else
    /// (HTTP/1.x, whose parser judges it), as hyper-util's automatic server does; what was read
    /// is replayed to hyper. Driven like the rest, so a drain or the idle limit ends a
    /// connection that never sends.
    ///
    /// Only how many bytes matched the preface so far is kept (they are the preface's own):
    /// every open connection holds this state's room for as long as it stays open, so the
    /// bytes of the read that settles the question live on the stack until they are replayed.
    ///
    /// The bytes are due within the header timeout ([`FirstBytesTimeout`]): hyper's own timer
    /// starts only once it serves, so without `until` a client that sends nothing, or stops in
    /// the middle of the preface, would hold its slot until the idle limit. The timer is made
    /// (and boxed: a pointer's room) only when a read has to wait.
    Detecting {
        io: HttpIo<T>,
        service: Counted<S>,
        matched: u8,
        until: Option<Pin<Box<tokio::time::Sleep>>>,
    },
    /// hyper serves HTTP/1.1 (boxed: a parked connection keeps only a pointer's room for it).
    H1(Box<H1<T, S>>),
    H2(Pin<Box<H2<T, S>>>),
    /// Idle, without hyper: waiting for the stream to become readable.
    Parked {
        io: HttpIo<T>,
        service: Counted<S>,
    },
    /// Asked to close while parked: shutting the stream down.
    Closing(HttpIo<T>),
    /// Ended by hyper after answering a request whose body it did not read: reading what the
    /// caller still sends, and throwing it away, until the caller closes or [`LINGER`] passes.
    Lingering {
        io: HttpIo<T>,
        until: Pin<Box<tokio::time::Sleep>>,
    },
    /// hyper failed while being parked; reported at the next poll.
    Failed(Option<hyper::Error>),
    Done,
}

/// One served HTTP connection (see the module docs). A future that ends with the connection;
/// [`crate::serve::Serve`] drives it, closes it gracefully and asks it to park.
pub struct HttpConnection<T, S>
where
    Counted<S>: hyper::service::HttpService<Incoming>,
{
    state: State<T, S>,
    activity: Activity,
    /// Connections of this listener parked right now (`meshgate_http_connections_parked`).
    parked: Gauge,
}

impl<T: ConnIo, S: ConnService> HttpConnection<T, S> {
    /// Serves `io` with `service`: as `version` (the TLS session's ALPN) or, without one, as
    /// its first bytes say; `parked` counts this listener's parked connections.
    pub fn new(io: HttpIo<T>, version: Option<Version>, service: S, parked: Gauge) -> Self {
        let activity = io.activity.clone();
        let service = Counted {
            inner: service,
            activity: activity.clone(),
        };
        let state = match version {
            Some(version) => Self::serving(version, io, service),
            None => State::Detecting {
                io,
                service,
                matched: 0,
                until: None,
            },
        };
        Self {
            state,
            activity,
            parked,
        }
    }

    fn serving(version: Version, io: HttpIo<T>, service: Counted<S>) -> State<T, S> {
        match version {
            Version::H1 => State::H1(Box::new(Self::h1(io, service))),
            Version::H2 => State::H2(Box::pin(
                http2_builder().serve_connection(TokioIo::new(io), service),
            )),
        }
    }

    fn h1(io: HttpIo<T>, service: Counted<S>) -> H1<T, S> {
        http1_builder()
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades()
    }
}

impl<T: ConnIo, S: ConnService> crate::serve::ServedConnection for HttpConnection<T, S> {
    fn graceful_shutdown(mut self: Pin<&mut Self>) {
        match std::mem::replace(&mut self.state, State::Done) {
            State::H1(mut conn) => {
                Pin::new(&mut *conn).graceful_shutdown();
                self.state = State::H1(conn);
            }
            State::H2(mut conn) => {
                conn.as_mut().graceful_shutdown();
                self.state = State::H2(conn);
            }
            State::Parked { io, .. } => {
                self.parked.dec();
                self.state = State::Closing(io);
            }
            State::Detecting { io, .. } => self.state = State::Closing(io),
            State::Lingering { .. } => self.state = State::Done,
            other => self.state = other,
        }
    }

    fn is_parked(&self) -> bool {
        matches!(self.state, State::Parked { .. })
    }

    fn quiet_for(&self) -> Duration {
        self.activity.quiet_for()
    }

    /// Parks an idle HTTP/1.1 connection; whether it did. `cx` is the driving task's: if hyper
    /// turns out not to be idle, it has been polled with it and will wake the task as usual.
    fn park(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> bool {
        let this = &mut *self;
        let State::H1(conn) = &mut this.state else {
            return false;
        };
        if !this.activity.may_park() {
            return false;
        }
        let shared = &this.activity.0;
        shared.parking.store(true, Ordering::Relaxed);
        Pin::new(&mut **conn).graceful_shutdown();
        let ended = Pin::new(&mut **conn).poll(cx);
        shared.parking.store(false, Ordering::Relaxed);
        match ended {
            Poll::Pending => false,
            Poll::Ready(Err(e)) => {
                this.state = State::Failed(Some(e));
                false
            }
            Poll::Ready(Ok(())) => {
                let State::H1(conn) = std::mem::replace(&mut this.state, State::Done) else {
                    unreachable!("matched above")
                };
                // `None` only after an upgrade, which an idle connection cannot have had.
                let Some(parts) = conn.into_parts() else {
                    return false;
                };
                let mut io = parts.io.into_inner();
                if parts.read_buf.is_empty() {
                    io.inner.release_buffers();
                    this.parked.inc();
                    tracing::trace!(event = "http.parked", "idle HTTP/1.1 connection parked");
                    this.state = State::Parked {
                        io,
                        service: parts.service,
                    };
                    true
                } else {
                    // Bytes hyper read but had not parsed (cannot happen while nothing was read
                    // since the last write, kept for safety): serve them at once.
                    io.replay = Bytes::copy_from_slice(&parts.read_buf);
                    this.state = State::H1(Box::new(Self::h1(io, parts.service)));
                    false
                }
            }
        }
    }
}

impl<T: ConnIo, S: ConnService> Future for HttpConnection<T, S> {
    type Output = Result<(), ConnError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        loop {
            match &mut this.state {
                State::Detecting {
                    io, matched, until, ..
                } => {
                    let done = usize::from(*matched);
                    let mut read = [0u8; H2_PREFACE.len()];
                    let mut buf = ReadBuf::new(&mut read[..H2_PREFACE.len() - done]);
                    if Pin::new(&mut *io).poll_read(cx, &mut buf)?.is_pending() {
                        let until = until.get_or_insert_with(|| {
                            Box::pin(tokio::time::sleep(crate::serve::HEADER_READ_TIMEOUT))
                        });
                        std::task::ready!(until.as_mut().poll(cx));
                        this.state = State::Done;
                        return Poll::Ready(Err(Box::new(FirstBytesTimeout)));
                    }
                    let n = buf.filled().len();
                    let matches = read[..n] == H2_PREFACE[done..done + n];
                    let version = if n == 0 || !matches {
                        Version::H1
                    } else if done + n == H2_PREFACE.len() {
                        Version::H2
                    } else {
                        // A prefix of the preface: at most 24, so it fits.
                        *matched = (done + n) as u8;
                        continue;
                    };
                    let State::Detecting {
                        mut io, service, ..
                    } = std::mem::replace(&mut this.state, State::Done)
                    else {
                        unreachable!("matched above")
                    };
                    // What was read: the preface's first `done` bytes, then this read's.
                    let mut replay = Vec::with_capacity(done + n);
                    replay.extend_from_slice(&H2_PREFACE[..done]);
                    replay.extend_from_slice(&read[..n]);
                    io.replay = Bytes::from(replay);
                    this.state = Self::serving(version, io, service);
                }
                State::H1(conn) => {
                    let ended = std::task::ready!(Pin::new(&mut **conn).poll(cx));
                    let State::H1(conn) = std::mem::replace(&mut this.state, State::Done) else {
                        unreachable!("matched above")
                    };
                    if ended.is_ok()
                        && this.activity.0.linger.load(Ordering::Relaxed)
                        && let Some(parts) = conn.into_parts()
                    {
                        // hyper has sent the answer and shut the stream's write side down.
                        this.state = State::Lingering {
                            io: parts.io.into_inner(),
                            until: Box::pin(tokio::time::sleep(LINGER)),
                        };
                        continue;
                    }
                    return Poll::Ready(ended.map_err(Into::into));
                }
                State::Lingering { io, until } => {
                    std::task::ready!(meshgate_ca::linger::poll_discard(io, until.as_mut(), cx));
                    this.state = State::Done;
                    return Poll::Ready(Ok(()));
                }
                State::H2(conn) => {
                    let ended = std::task::ready!(conn.as_mut().poll(cx));
                    this.state = State::Done;
                    return Poll::Ready(ended.map_err(Into::into));
                }
                State::Parked { io, .. } => {
                    // Readable, at its end or failed: hyper takes over and finds out which.
                    std::task::ready!(io.inner.poll_read_ready(cx)).ok();
                    let State::Parked { io, service } =
                        std::mem::replace(&mut this.state, State::Done)
                    else {
                        unreachable!("matched above")
                    };
                    this.parked.dec();
                    tracing::trace!(
                        event = "http.unparked",
                        "parked HTTP/1.1 connection resumed"
                    );
                    this.state = State::H1(Box::new(Self::h1(io, service)));
                }
                State::Closing(io) => {
                    let _ = std::task::ready!(Pin::new(io).poll_shutdown(cx));
                    this.state = State::Done;
                    return Poll::Ready(Ok(()));
                }
                State::Failed(e) => {
                    let e = e.take();
                    this.state = State::Done;
                    return Poll::Ready(e.map_or(Ok(()), |e| Err(e.into())));
                }
                State::Done => return Poll::Ready(Ok(())),
            }
        }
    }
}

impl<T, S> Drop for HttpConnection<T, S>
where
    Counted<S>: hyper::service::HttpService<Incoming>,
{
    fn drop(&mut self) {
        if matches!(self.state, State::Parked { .. }) {
            self.parked.dec();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::serve::{Limits, accept_loop};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::watch;

    /// A listener told to stop drains: the request in flight on an HTTP/2 connection is
    /// answered, the connection is then ended by the sidecar's GOAWAY (the client does not have
    /// to go away on its own), and the listener returns long before its drain period.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_draining_listener_answers_requests_in_flight_then_closes_its_connections() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = watch::channel(false);
        let drain_period = Duration::from_secs(20);
        let metrics = Arc::new(Metrics::default());
        let listening = tokio::spawn(accept_loop(
            listener,
            stopped,
            drain_period,
            "test",
            Limits::default(),
            metrics,
            |tcp, _peer, drain| {
                let slow = hyper::service::service_fn(|_req| async {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(
                        http_body_util::Empty::<bytes::Bytes>::new(),
                    ))
                });
                let (io, _) = HttpIo::new(tcp);
                let conn = HttpConnection::new(io, None, slow, Gauge::default());
                async move {
                    drain.serve(conn, None, None).await;
                }
            },
        ));

        let tcp = TcpStream::connect(addr).await.unwrap();
        let (mut client, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            TokioIo::new(tcp),
        )
        .await
        .unwrap();
        let client_conn = tokio::spawn(conn);
        let in_flight = tokio::spawn(
            client.send_request(
                hyper::Request::get("http://test/slow")
                    .body(http_body_util::Empty::<bytes::Bytes>::new())
                    .unwrap(),
            ),
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        let draining_since = std::time::Instant::now();
        stop.send_replace(true);

        let response = in_flight
            .await
            .unwrap()
            .expect("the request in flight was cut off");
        assert_eq!(response.status(), 200);
        tokio::time::timeout(Duration::from_secs(5), client_conn)
            .await
            .expect("the sidecar did not end the drained connection")
            .unwrap()
            .expect("the drained connection ended with an error");
        tokio::time::timeout(Duration::from_secs(5), listening)
            .await
            .expect("the listener waited for its whole drain period")
            .unwrap();
        assert!(draining_since.elapsed() < drain_period / 2);
        assert!(
            TcpStream::connect(addr).await.is_err(),
            "a drained listener still accepts connections"
        );
    }
}
