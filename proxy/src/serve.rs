//! The accept loop shared by the sidecar's listeners.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::metrics::Metrics;

use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Caps and timeouts of the sidecar's listeners. Every listener has a connection cap; the
/// inbound (mTLS) listener also caps connections per source address and connections still in
/// their TLS handshake, and closes HTTP connections that stay silent for `idle`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Open connections per listener; new ones beyond it are closed at accept and counted
    /// (`connection_limit`).
    pub connections: usize,
    /// Open inbound connections from one source IP (`source_connection_limit`).
    pub per_source: usize,
    /// Inbound connections that have not completed their TLS handshake yet. When a new one
    /// arrives and this many are pending, the *oldest* pending handshake is dropped
    /// (`handshake_shed`): a real peer completes its handshake in milliseconds, a slowloris
    /// never does, so a flood of half-open handshakes sheds itself and leaves room for known
    /// peers instead of locking them out.
    pub handshakes: usize,
    /// An inbound HTTP connection with no bytes in either direction for this long is closed
    /// (`idle_timeout`), HTTP/2 included: hyper has no idle timeout of its own. Upgraded
    /// connections and L4 tunnels are not subject to it (they are re-authorized instead).
    pub idle: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            connections: 10_000,
            per_source: 2_000,
            handshakes: 512,
            idle: Duration::from_secs(600),
        }
    }
}

/// Accepts connections until `shutdown` turns true, running `handle` for each in its own task;
/// then stops accepting and gives connections registered with the watcher up to `drain` to finish.
/// Connections beyond `limits` (in total, per source) are closed at once, logged and counted.
/// Accept errors (e.g. out of file descriptors) are logged and retried after a growing pause with
/// jitter rather than spinning or ending the listener.
#[allow(clippy::too_many_arguments)]
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    mut shutdown: watch::Receiver<bool>,
    drain: Duration,
    listener_name: &'static str,
    limits: Limits,
    metrics: Arc<Metrics>,
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr, Watcher) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let graceful = GracefulShutdown::new();
    let cap = meshgate_ca::limits::ConnectionCap::new(limits.connections, limits.per_source);
    let mut backoff = meshgate_ca::backoff::Backoff::for_accept();
    // Refusals are counted each time and logged once per burst, so a flood cannot flood the log.
    let mut last_refusal_log: Option<std::time::Instant> = None;
    loop {
        tokio::select! {
            _ = async { let _ = shutdown.wait_for(|stop| *stop).await; } => break,
            accepted = backoff.accept(&listener, listener_name) => {
                let (tcp, peer) = accepted;
                match cap.admit(peer.ip()) {
                    Ok(slot) => {
                        // `map`, not an `async move` block awaiting `task`: a block would hold
                        // the connection's future twice (captured, then awaited), doubling
                        // every connection's task allocation.
                        let task = handle(tcp, peer, graceful.watcher());
                        tokio::spawn(futures_util::FutureExt::map(task, move |()| drop(slot)));
                    }
                    Err(reason) => {
                        drop(tcp);
                        let reason = reason.label();
                        metrics.count_hygiene(reason, 1);
                        if last_refusal_log.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                            last_refusal_log = Some(std::time::Instant::now());
                            tracing::warn!(
                                event = "listener.connection_refused",
                                listener = listener_name,
                                peer.addr = %peer,
                                reason,
                                max_connections = limits.connections,
                                max_per_source = limits.per_source,
                                "connection refused: listener at its cap (raise --max-connections / --max-connections-per-source if this is legitimate load); further refusals are counted in meshgate_inbound_hygiene_total"
                            );
                        }
                    }
                }
            }
        }
    }
    drop(listener);
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            event = "listener.drain_timeout",
            listener = listener_name,
            "connections still open after the drain period; closing them"
        );
    }
}

/// Connections still in their TLS handshake, oldest first (see [`Limits::handshakes`]).
#[derive(Debug)]
pub struct PendingHandshakes {
    cap: usize,
    queue: Mutex<HandshakeQueue>,
}

/// The pending handshakes (id, shed signal), oldest first, and the last id given out.
#[derive(Debug, Default)]
struct HandshakeQueue {
    last_id: u64,
    pending: std::collections::VecDeque<(u64, tokio::sync::oneshot::Sender<()>)>,
}

/// A connection's place among the pending handshakes; leaves the queue on drop (handshake done
/// or failed). `shed` resolves if the connection was dropped to make room.
#[derive(Debug)]
pub struct PendingHandshake {
    queue: Arc<PendingHandshakes>,
    id: u64,
    pub shed: tokio::sync::oneshot::Receiver<()>,
}

impl PendingHandshakes {
    pub fn new(cap: usize) -> Arc<Self> {
        Arc::new(Self {
            cap: cap.max(1),
            queue: Mutex::new(HandshakeQueue::default()),
        })
    }

    /// Registers a new pending handshake; returns it and whether an older one was shed for it.
    pub fn enter(self: &Arc<Self>) -> (PendingHandshake, bool) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut q = self.queue.lock().expect("handshake queue lock");
        let mut shed = false;
        while q.pending.len() >= self.cap {
            if let Some((_, oldest)) = q.pending.pop_front() {
                shed |= oldest.send(()).is_ok();
            }
        }
        q.last_id += 1;
        let id = q.last_id;
        q.pending.push_back((id, tx));
        (
            PendingHandshake {
                queue: self.clone(),
                id,
                shed: rx,
            },
            shed,
        )
    }
}

impl Drop for PendingHandshake {
    fn drop(&mut self) {
        let mut q = self.queue.queue.lock().expect("handshake queue lock");
        if let Some(at) = q.pending.iter().position(|(id, _)| *id == self.id) {
            q.pending.remove(at);
        }
    }
}

/// Records when an I/O stream last moved bytes, for [`idle`].
#[derive(Debug, Clone)]
pub struct Activity {
    since: std::time::Instant,
    last_ms: Arc<AtomicU64>,
}

impl Activity {
    fn new() -> Self {
        Self {
            since: std::time::Instant::now(),
            last_ms: Arc::new(AtomicU64::new(0)),
        }
    }

    fn touch(&self) {
        self.last_ms
            .store(self.since.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn quiet_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.since.elapsed().saturating_sub(last)
    }
}

/// An I/O stream that notes every read and write that moved bytes.
#[derive(Debug)]
pub struct IdleIo<T> {
    inner: T,
    activity: Activity,
}

impl<T> IdleIo<T> {
    /// Wraps `inner`; the returned [`Activity`] feeds [`idle`].
    pub fn new(inner: T) -> (Self, Activity) {
        let activity = Activity::new();
        (
            Self {
                inner,
                activity: activity.clone(),
            },
            activity,
        )
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for IdleIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for IdleIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

pin_project_lite::pin_project! {
    /// Runs `conn` until it ends (`Some(output)`) or `activity` has been quiet for `limit`
    /// (`None`; dropping the future then closes the connection).
    ///
    /// A hand-written future rather than an `async` block with `select!`: it is what an idle
    /// connection holds for as long as it stays open, and a generator would keep room for the
    /// connection twice (captured, then moved into the select).
    pub struct UntilIdle<C> {
        #[pin]
        conn: C,
        #[pin]
        timer: tokio::time::Sleep,
        activity: Activity,
        limit: Duration,
    }
}

impl<C> UntilIdle<C> {
    pub fn new(conn: C, activity: Activity, limit: Duration) -> Self {
        Self {
            conn,
            timer: tokio::time::sleep(limit),
            activity,
            limit,
        }
    }
}

impl<C: Future> Future for UntilIdle<C> {
    type Output = Option<C::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if let Poll::Ready(ended) = this.conn.poll(cx) {
            return Poll::Ready(Some(ended));
        }
        loop {
            std::task::ready!(this.timer.as_mut().poll(cx));
            let quiet = this.activity.quiet_for();
            if quiet >= *this.limit {
                return Poll::Ready(None);
            }
            let until = tokio::time::Instant::now() + (*this.limit - quiet);
            this.timer.as_mut().reset(until);
        }
    }
}

/// Slowest acceptable delivery of a request's headers (HTTP/1): a slowloris client that trickles
/// header bytes is cut off instead of holding a connection forever.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request header block accepted (HTTP/2 `SETTINGS_MAX_HEADER_LIST_SIZE`).
pub const MAX_HEADER_LIST: u32 = 64 * 1024;
/// Concurrent HTTP/2 streams per connection.
pub const MAX_CONCURRENT_STREAMS: u32 = 1024;

/// The HTTP server settings of every sidecar listener that faces a client (HTTP/1.1 and HTTP/2
/// on one port), with the limits above.
pub fn http_server() -> hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor> {
    let mut builder =
        hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .keep_alive(true);
    builder
        .http2()
        .timer(hyper_util::rt::TokioTimer::new())
        .max_header_list_size(MAX_HEADER_LIST)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS);
    builder
}

/// A listener could not be bound; says which one and the flag that moves it.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot listen on {addr} ({what}): {source}; is another process using it? choose another with {flag}"
)]
pub struct BindError {
    pub what: &'static str,
    pub flag: &'static str,
    pub addr: SocketAddr,
    pub source: std::io::Error,
}

/// Binds `addr` for the listener `what`, configured by `flag`.
pub async fn bind(
    addr: SocketAddr,
    what: &'static str,
    flag: &'static str,
) -> Result<TcpListener, BindError> {
    TcpListener::bind(addr).await.map_err(|source| BindError {
        what,
        flag,
        addr,
        source,
    })
}
