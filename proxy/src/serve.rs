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

use hyper_util::server::graceful::GracefulConnection;
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
/// then stops accepting, signals the [`DrainWatch`] each task was given, and gives the tasks up
/// to `drain` to finish (a task counts until it drops its `DrainWatch`).
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
    F: Fn(TcpStream, SocketAddr, DrainWatch) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (drain_signal, drain_watch) = watch::channel(false);
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
                        let task = handle(tcp, peer, DrainWatch(drain_watch.clone()));
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
    drop(drain_watch);
    drain_signal.send_replace(true);
    if tokio::time::timeout(drain, drain_signal.closed())
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

/// Records when an I/O stream last moved bytes, for [`DrainWatch::serve`]'s idle limit.
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
    /// Wraps `inner`; the returned [`Activity`] feeds [`DrainWatch::serve`].
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

/// A connection task's part in its listener's drain: the signal that the listener is draining
/// and, for as long as the task holds it, the listener's count of open connections.
#[derive(Debug, Clone)]
pub struct DrainWatch(watch::Receiver<bool>);

impl DrainWatch {
    /// Serves the HTTP connection `conn` until it ends (see [`Serve`]); with `idle`, closes it
    /// gracefully once its I/O has been quiet for that long.
    pub fn serve<C: GracefulConnection>(
        self,
        conn: C,
        idle: Option<(Activity, Duration)>,
    ) -> Serve<C, impl Future<Output = ()> + Send + 'static> {
        let mut signal = self.0.clone();
        Serve {
            conn,
            // A listener that is gone (its sender dropped) counts as draining.
            drain: async move {
                let _ = signal.wait_for(|draining| *draining).await;
            },
            timer: tokio::time::sleep(idle.as_ref().map_or(Duration::ZERO, |(_, limit)| *limit)),
            idle,
            closing: Closing::No,
            _watch: self,
        }
    }
}

/// How long a connection closed for idleness gets to finish its goodbye (the HTTP/2 GOAWAY's
/// PING round trip, a request that crossed it) before it is dropped.
pub const CLOSE_GRACE: Duration = Duration::from_secs(10);

/// Why [`Serve`] asked its connection to finish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Closing {
    No,
    Drain,
    Idle,
}

/// How a served connection ended.
#[derive(Debug)]
pub struct Served<T> {
    /// The connection's own result; `None` when it was dropped after an idle close's
    /// [`CLOSE_GRACE`] ran out.
    pub result: Option<T>,
    /// The connection was closed because it stayed idle.
    pub idle_closed: bool,
}

pin_project_lite::pin_project! {
    /// Runs an HTTP server connection until it ends, and ends it gracefully — a GOAWAY on
    /// HTTP/2, `Connection: close` on HTTP/1.1, in-flight requests answered — when its
    /// listener drains or when its I/O has been quiet for the idle limit. A plain drop would
    /// cut off a request that crossed the close on its way in (the client sees a reset and its
    /// proxy answers 502); after a GOAWAY the client knows which requests were taken and sends
    /// new ones on a new connection, as Envoy and Linkerd close idle connections.
    ///
    /// A hand-written future rather than an `async` block with `select!`: it is what an idle
    /// connection holds for as long as it stays open, and a generator would keep room for the
    /// connection twice (captured, then moved into the select).
    pub struct Serve<C, D> {
        #[pin]
        conn: C,
        #[pin]
        drain: D,
        #[pin]
        timer: tokio::time::Sleep,
        idle: Option<(Activity, Duration)>,
        closing: Closing,
        _watch: DrainWatch,
    }
}

impl<C: GracefulConnection, D: Future<Output = ()>> Future for Serve<C, D> {
    type Output = Served<C::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            if let Poll::Ready(ended) = this.conn.as_mut().poll(cx) {
                return Poll::Ready(Served {
                    result: Some(ended),
                    idle_closed: *this.closing == Closing::Idle,
                });
            }
            match *this.closing {
                Closing::No => {
                    if this.drain.as_mut().poll(cx).is_ready() {
                        this.conn.as_mut().graceful_shutdown();
                        *this.closing = Closing::Drain;
                        continue;
                    }
                    let Some((activity, limit)) = this.idle.as_ref() else {
                        return Poll::Pending;
                    };
                    std::task::ready!(this.timer.as_mut().poll(cx));
                    let quiet = activity.quiet_for();
                    if quiet >= *limit {
                        this.conn.as_mut().graceful_shutdown();
                        *this.closing = Closing::Idle;
                        this.timer
                            .as_mut()
                            .reset(tokio::time::Instant::now() + CLOSE_GRACE);
                    } else {
                        let until = tokio::time::Instant::now() + (*limit - quiet);
                        this.timer.as_mut().reset(until);
                    }
                }
                // The listener's drain period bounds this one.
                Closing::Drain => return Poll::Pending,
                Closing::Idle => {
                    std::task::ready!(this.timer.as_mut().poll(cx));
                    return Poll::Ready(Served {
                        result: None,
                        idle_closed: true,
                    });
                }
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use hyper_util::rt::{TokioExecutor, TokioIo};

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
                let conn = http_server()
                    .serve_connection_with_upgrades(TokioIo::new(tcp), slow)
                    .into_owned();
                async move {
                    drain.serve(conn, None).await;
                }
            },
        ));

        let tcp = TcpStream::connect(addr).await.unwrap();
        let (mut client, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
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
