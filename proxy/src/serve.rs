//! The accept loop shared by the sidecar's listeners.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::metrics::Metrics;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Caps and timeouts of the sidecar's listeners. Every listener has a connection cap; the
/// inbound (mTLS) listener also caps connections per source address and connections still in
/// their TLS handshake; the inbound and outbound listeners close HTTP connections that stay
/// silent for `idle`.
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
    /// An inbound or outbound HTTP connection with no bytes in either direction for this long is
    /// closed (`idle_timeout`), HTTP/2 included: hyper has no idle timeout of its own. Upgraded
    /// connections and L4 tunnels are not subject to it (they are re-authorized instead).
    pub idle: Duration,
    /// An HTTP/1.1 connection with nothing in flight and no bytes in either direction for this
    /// long gives hyper's buffers back until its next request (see the `http_conn` module).
    pub park: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            connections: 10_000,
            per_source: 2_000,
            handshakes: 512,
            idle: Duration::from_secs(600),
            park: Duration::from_secs(1),
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
    refusals: impl CountRefusal,
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
                        refusals.refused(reason);
                        if last_refusal_log.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                            last_refusal_log = Some(std::time::Instant::now());
                            tracing::warn!(
                                event = "listener.connection_refused",
                                listener = listener_name,
                                peer.addr = %peer,
                                reason,
                                max_connections = limits.connections,
                                max_per_source = limits.per_source,
                                "connection refused: listener at its cap (raise --max-connections / --max-connections-per-source if this is legitimate load); further refusals are not logged for 10 s{}",
                                refusals.counted_in().map(|m| format!(" and are counted in {m}")).unwrap_or_default()
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

/// Where a listener counts the connections it refuses at its cap ([`accept_loop`]).
pub trait CountRefusal {
    /// One connection refused; `reason` is the cap's label (`connection_limit`,
    /// `source_connection_limit`).
    fn refused(&self, reason: &'static str);
    /// The metric the refusals can be read from, named in the listener's warning; `None` for a
    /// process without a metrics endpoint (the demo app).
    fn counted_in(&self) -> Option<&'static str>;
    /// One of `listener`'s connections closed at the header timeout: its first bytes or a
    /// request head did not arrive in time (a silent or trickling client).
    fn header_timeout(&self, listener: &'static str);
}

/// The sidecar's listeners count refusals with the request hygiene
/// (`meshgate_inbound_hygiene_total{reason}`).
impl CountRefusal for Arc<Metrics> {
    fn refused(&self, reason: &'static str) {
        self.count_hygiene(reason, 1);
    }

    fn counted_in(&self) -> Option<&'static str> {
        Some("meshgate_inbound_hygiene_total")
    }

    /// `meshgate_http_header_timeouts_total{listener}`, as the mesh listeners count theirs.
    fn header_timeout(&self, listener: &'static str) {
        self.count_header_timeout(listener);
    }
}

/// Refusals of a listener outside a sidecar (the control plane's admin listener, the demo
/// app), by reason: at accept, over a cap; or later, at the header timeout.
#[derive(Debug, Clone, Default)]
pub struct RefusedConnections {
    /// `connection_limit`, `source_connection_limit`, `header_timeout`.
    counts: Arc<[std::sync::atomic::AtomicU64; 3]>,
    /// The metric they are exported as, if the process has a metrics endpoint.
    metric: Option<&'static str>,
}

impl RefusedConnections {
    /// Refusals exported as `metric` (which ends in `_total`, see [`Self::encode`]).
    pub fn exported_as(metric: &'static str) -> Self {
        Self {
            counts: Arc::default(),
            metric: Some(metric),
        }
    }

    /// The counter as OpenMetrics text, named as given to [`Self::exported_as`] (nothing for
    /// refusals that are not exported).
    pub fn encode(&self, help: &str) -> String {
        let Some(metric) = self.metric else {
            return String::new();
        };
        let [total, per_source, header_timeout] = &*self.counts;
        let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        format!(
            "# HELP {metric} {help}\n# TYPE {metric} counter\n{metric}{{reason=\"connection_limit\"}} {}\n{metric}{{reason=\"source_connection_limit\"}} {}\n{metric}{{reason=\"header_timeout\"}} {}\n",
            load(total),
            load(per_source),
            load(header_timeout)
        )
    }
}

impl CountRefusal for RefusedConnections {
    fn refused(&self, reason: &'static str) {
        let [total, per_source, _] = &*self.counts;
        let counter = if reason == "source_connection_limit" {
            per_source
        } else {
            total
        };
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    fn counted_in(&self) -> Option<&'static str> {
        self.metric
    }

    /// Counted with the refusals, as `reason="header_timeout"` (the listener is the process's
    /// only one of its kind).
    fn header_timeout(&self, _listener: &'static str) {
        self.counts[2].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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

/// Gathers what an HTTP/2 connection writes during one poll of its task and writes it when the
/// task is next polled, so that the frames of many responses leave in one system call.
///
/// Why: on the HTTP/2 connection from a peer sidecar, h2 writes every DATA frame larger than
/// 256 bytes on its own (it chains the payload rather than copying it, then flushes before the
/// next frame). Through tokio-rustls, which writes its records to the socket on every write,
/// that was one `send` and one wake-up of the peer per response (1.0 system call per request on
/// the inbound sidecar at saturation, while its reads of that connection took 0.05), and one
/// per 16 KiB frame of a large response (BENCHMARKS.md, "seventh session", "eighth session").
///
/// How: small writes are copied into a buffer of ours (up to [`COALESCE_LIMIT`]), so that many
/// small frames are sealed into one TLS record; a full buffer, and any write of a whole record
/// or more, go into the TLS stream's record buffer ([`Gather`]: [`crate::tls_stream::Tls`]
/// encrypts there, with no copy of ours and no I/O). A flush wakes the task and reports done. The next poll of
/// the connection starts with a read (h2 reads the peer's frames before it writes), and the
/// read first writes every gathered record out, in one vectored write. When the record buffer
/// is full ([`crate::tls_stream::OUTGOING_LIMIT`]) it is written out first. A flush while an earlier
/// write-out is blocked on a full socket waits for it for real, so a slow peer pushes back and
/// nothing spins. Shutdown writes everything first. HTTP/1.1 connections carry one response at
/// a time and pass straight through ([`Gathering::Off`]): the auto server needs one I/O type
/// for both protocols. The outbound HTTP/2 client gathers only the frames h2 writes one by one
/// ([`Gathering::Chained`]).
#[derive(Debug)]
pub struct CoalesceWrites<T> {
    inner: T,
    gathering: Gathering,
    /// Small writes, not yet sealed into a record.
    buf: Vec<u8>,
    /// How much of `buf` is sealed.
    sealed: usize,
    /// The last write-out found the socket full; it is retried when the socket wakes the task.
    blocked: bool,
}

/// Most bytes copied into one record before it is sealed; one TLS record's payload. A write
/// this large or larger goes into the TLS stream's record buffer as it is.
///
/// The buffer is allocated at this size by the first write of a batch and freed once the batch
/// is sealed: it never grows (growing by doubling copied what it held at every step: 1.4
/// reallocations and 1.9 KB copied per request on the inbound sidecar at saturation, callgrind
/// and a uprobe on `memcpy`, BENCHMARKS.md "eleventh session"), and an idle connection holds
/// none of it.
pub const COALESCE_LIMIT: usize = 16 * 1024;

/// What [`CoalesceWrites`] gathers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gathering {
    /// Nothing: every write goes to the socket (HTTP/1.1 carries one message at a time, an L4
    /// tunnel is not HTTP).
    Off,
    /// Every write (the inbound HTTP/2 server, whose responses' DATA frames h2 writes one by
    /// one): small ones copied together into one record, large ones into the record buffer.
    All,
    /// A write of several slices — a frame's head and a payload h2 chained rather than copied,
    /// such as a request body's DATA frame — and whatever follows it until the write-out, into
    /// the TLS stream's record buffer; a single slice with nothing gathered goes straight through (the
    /// outbound HTTP/2 client: h2 copies small frames, such as a GET's HEADERS, into its own
    /// buffer and already writes them together).
    Chained,
}

/// A stream with a send buffer of its own that can take bytes without writing to its socket,
/// for [`CoalesceWrites`]; its `poll_flush` writes everything taken.
pub trait Gather {
    /// Takes what fits of `bufs`, in order, into the send buffer, without I/O; `Ok(0)` when
    /// it is full.
    fn gather(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize>;
    /// Whether something taken is not written to the socket yet.
    fn has_gathered(&self) -> bool;
}

impl<C: crate::tls_stream::Unbuffered, T: AsyncRead + AsyncWrite + Unpin> Gather
    for crate::tls_stream::Tls<C, T>
{
    fn gather(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        crate::tls_stream::Tls::gather(self, bufs)
    }

    fn has_gathered(&self) -> bool {
        crate::tls_stream::Tls::has_gathered(self)
    }
}

impl<T> CoalesceWrites<T> {
    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    pub fn get_mut(&mut self) -> &mut T {
        &mut self.inner
    }

    pub fn new(inner: T, gathering: Gathering) -> Self {
        Self {
            inner,
            gathering,
            buf: Vec::new(),
            sealed: 0,
            blocked: false,
        }
    }

    /// The stream, for a connection that never gathered (an L4 tunnel: [`Gathering::Off`]).
    pub fn into_inner(self) -> T {
        debug_assert!(self.buf.is_empty(), "gathered writes would be lost");
        self.inner
    }
}

impl<T: AsyncWrite + Gather + Unpin> CoalesceWrites<T> {
    /// Whether anything written is not on the socket yet.
    fn has_gathered(&self) -> bool {
        self.sealed < self.buf.len() || self.inner.has_gathered()
    }

    /// Writes what rustls holds to the socket.
    fn flush_records(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let flushed = Pin::new(&mut self.inner).poll_flush(cx);
        self.blocked = flushed.is_pending();
        flushed
    }

    /// Seals `buf` into records (writing records out when rustls holds as much as it takes).
    fn seal(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while self.sealed < self.buf.len() {
            let rest = [std::io::IoSlice::new(&self.buf[self.sealed..])];
            match self.inner.gather(&rest)? {
                0 => std::task::ready!(self.flush_records(cx))?,
                n => self.sealed += n,
            }
        }
        self.buf = Vec::new();
        self.sealed = 0;
        Poll::Ready(Ok(()))
    }

    /// Writes everything gathered to the socket.
    fn write_out(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        std::task::ready!(self.seal(cx))?;
        self.flush_records(cx)
    }

    /// Takes a write of `len` bytes: copied into `buf` when small, into rustls's record
    /// buffer as it is when not (after what `buf` holds, which keeps the order).
    fn gather_all(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        if len == 0 {
            return Poll::Ready(Ok(0));
        }
        if self.gathering == Gathering::Chained {
            if bufs.len() < 2 && !self.has_gathered() {
                return Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
            }
            return self.gather_records(cx, bufs);
        }
        if !self.buf.is_empty() && self.buf.len() + len > COALESCE_LIMIT {
            std::task::ready!(self.seal(cx))?;
        }
        if len < COALESCE_LIMIT {
            if self.buf.capacity() == 0 {
                self.buf.reserve_exact(COALESCE_LIMIT);
            }
            for b in bufs {
                self.buf.extend_from_slice(b);
            }
            return Poll::Ready(Ok(len));
        }
        self.gather_records(cx, bufs)
    }

    /// Takes what fits of `bufs` into the TLS stream's record buffer, writing it out first when
    /// full.
    fn gather_records(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        loop {
            match self.inner.gather(bufs)? {
                0 => std::task::ready!(self.flush_records(cx))?,
                n => return Poll::Ready(Ok(n)),
            }
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Gather + Unpin> AsyncRead for CoalesceWrites<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.gathering != Gathering::Off
            && self.has_gathered()
            // A new poll of the connection: what the last one gathered leaves now. A full
            // socket does not hold the read up; the socket wakes the task when it drains.
            && let Poll::Ready(Err(e)) = self.write_out(cx)
        {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Gather + Unpin> AsyncWrite for CoalesceWrites<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.gathering == Gathering::Off {
            return Pin::new(&mut self.inner).poll_write(cx, data);
        }
        self.gather_all(cx, &[std::io::IoSlice::new(data)])
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        if self.gathering == Gathering::Off {
            return Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        }
        self.gather_all(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.gathering != Gathering::Off || self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if self.gathering == Gathering::Off || !self.has_gathered() || self.blocked {
            return self.write_out(cx);
        }
        // Written out by the next poll's read; the wake makes sure there is one.
        cx.waker().wake_by_ref();
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        std::task::ready!(self.write_out(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A connection task's part in its listener's drain: the signal that the listener is draining
/// and, for as long as the task holds it, the listener's count of open connections.
#[derive(Debug, Clone)]
pub struct DrainWatch(watch::Receiver<bool>);

impl DrainWatch {
    /// Serves the HTTP connection `conn` until it ends (see [`Serve`]); with `idle`, closes it
    /// gracefully once its I/O has been quiet for that long; with `park`, parks it once quiet
    /// for that long ([`ServedConnection::park`]).
    pub fn serve<C: ServedConnection>(
        self,
        conn: C,
        idle: Option<Duration>,
        park: Option<Duration>,
    ) -> Serve<C, impl Future<Output = ()> + Send + 'static> {
        let mut signal = self.0.clone();
        let first = match (idle, park) {
            (Some(idle), Some(park)) => Some(idle.min(park)),
            (one, other) => one.or(other),
        };
        Serve {
            conn,
            // A listener that is gone (its sender dropped) counts as draining.
            drain: async move {
                let _ = signal.wait_for(|draining| *draining).await;
            },
            timer: tokio::time::sleep(first.unwrap_or(Duration::ZERO)),
            armed: first.is_some(),
            parked: false,
            idle: Millis::from(idle),
            park: Millis::from(park),
            closing: Closing::No,
            _watch: self,
        }
    }
}

/// A served HTTP connection, as [`Serve`] drives it (the sidecar's is `HttpConnection`).
pub trait ServedConnection: Future {
    /// Ends the connection gracefully: answers what is in flight, then closes.
    fn graceful_shutdown(self: Pin<&mut Self>);
    /// Gives back what the connection holds only while busy, if it is idle; whether it did.
    fn park(self: Pin<&mut Self>, cx: &mut Context<'_>) -> bool;
    /// Parked now (it resumes on its own when the client sends again).
    fn is_parked(&self) -> bool;
    /// How long its I/O has moved no bytes.
    fn quiet_for(&self) -> Duration;
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
    /// new ones on a new connection, as Envoy and Linkerd close idle connections. A connection
    /// quiet for the park delay is asked to park; one timer serves both limits, re-armed only
    /// while there is something left to time (a parked connection without an idle limit
    /// costs no wake-ups).
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
        armed: bool,
        // The connection parked when last asked (it may have resumed since).
        parked: bool,
        idle: Millis,
        park: Millis,
        closing: Closing,
        _watch: DrainWatch,
    }
}

/// A limit of [`Serve`]'s, in whole milliseconds (at least 1; at most 49 days), or none. Every
/// open connection holds two: as `Option<Duration>` they took 32 bytes, which pushed the
/// inbound connection's future into the allocator's next size class (BENCHMARKS.md,
/// "seventeenth session").
#[derive(Debug, Clone, Copy)]
struct Millis(Option<std::num::NonZeroU32>);

impl From<Option<Duration>> for Millis {
    fn from(limit: Option<Duration>) -> Self {
        Self(limit.map(|d| {
            let ms = d.as_millis().clamp(1, u128::from(u32::MAX));
            std::num::NonZeroU32::new(ms as u32).expect("clamped to at least 1")
        }))
    }
}

impl Millis {
    fn get(self) -> Option<Duration> {
        self.0.map(|ms| Duration::from_millis(u64::from(ms.get())))
    }
}

impl<C: ServedConnection, D: Future<Output = ()>> Future for Serve<C, D> {
    type Output = Served<C::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let (idle, park) = (this.idle.get(), this.park.get());
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
                    if *this.parked && !this.conn.is_parked() {
                        // Resumed by its client: timed again, from its last bytes.
                        *this.parked = false;
                        let quiet = this.conn.quiet_for();
                        let left = |limit: Duration| limit.saturating_sub(quiet);
                        let wait = match (idle, park) {
                            (Some(idle), Some(park)) => left(idle).min(left(park)),
                            (one, other) => one.or(other).map_or(Duration::ZERO, left),
                        };
                        this.timer.as_mut().reset(
                            tokio::time::Instant::now() + wait.max(Duration::from_millis(1)),
                        );
                        *this.armed = true;
                    }
                    if !*this.armed {
                        // Parked without an idle limit: nothing to time until it resumes.
                        return Poll::Pending;
                    }
                    std::task::ready!(this.timer.as_mut().poll(cx));
                    let quiet = this.conn.quiet_for();
                    if let Some(limit) = idle
                        && quiet >= limit
                    {
                        this.conn.as_mut().graceful_shutdown();
                        *this.closing = Closing::Idle;
                        this.timer
                            .as_mut()
                            .reset(tokio::time::Instant::now() + CLOSE_GRACE);
                        continue;
                    }
                    let mut next = idle.map(|limit| limit - quiet);
                    if let Some(park) = park
                        && !*this.parked
                    {
                        *this.parked = quiet >= park && this.conn.as_mut().park(cx);
                        if !*this.parked {
                            // Not quiet long enough yet, or busy: look again later.
                            let wait = if quiet >= park { park } else { park - quiet };
                            next = Some(next.map_or(wait, |n| n.min(wait)));
                        }
                    }
                    match next {
                        Some(wait) => this
                            .timer
                            .as_mut()
                            .reset(tokio::time::Instant::now() + wait),
                        None => *this.armed = false,
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
/// HTTP/2 flow control on every connection the sidecar serves or opens (RFC 9113 §5.2): how
/// much of one stream's body may be sent and not yet read. A body nobody reads (an app that
/// does not read an upload, a caller that stops reading a download) holds at most this much
/// of its connection's window. At 256 KiB a stream still moves ≥ 250 MB/s over a 1 ms round
/// trip.
pub const H2_STREAM_WINDOW: u32 = 256 * 1024;
/// How much all the streams of one HTTP/2 connection together may have sent and not yet read:
/// 16 streams' windows, so that it takes 16 bodies nobody reads before the connection (every
/// request between two pods) stops for the others. hyper's defaults give one stream the whole
/// server-side window (1 MiB each): one unread upload stopped every upload between the two
/// sidecars (`tests/it/sidecar_flow_control.rs`). Linkerd keeps the same ratio (64 KiB and
/// 1 MiB).
pub const H2_CONNECTION_WINDOW: u32 = 16 * H2_STREAM_WINDOW;

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
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Counts the times it was woken.
    struct CountWakes(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for CountWakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// An in-memory pipe end that counts the writes made to it (a vectored write is one write,
    /// as `writev` is one system call).
    struct CountWrites {
        inner: tokio::io::DuplexStream,
        writes: Arc<AtomicUsize>,
        bytes: Arc<AtomicUsize>,
    }

    impl AsyncRead for CountWrites {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for CountWrites {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            let written = Pin::new(&mut self.inner).poll_write(cx, data);
            if let Poll::Ready(Ok(n)) = written
                && n > 0
            {
                self.writes.fetch_add(1, Ordering::SeqCst);
                self.bytes.fetch_add(n, Ordering::SeqCst);
            }
            written
        }
        fn poll_write_vectored(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            bufs: &[std::io::IoSlice<'_>],
        ) -> Poll<std::io::Result<usize>> {
            let joined: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
            self.poll_write(cx, &joined)
        }
        fn is_write_vectored(&self) -> bool {
            true
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.inner).poll_flush(cx)
        }
        fn poll_shutdown(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    /// A TLS 1.3 connection over an in-memory pipe holding `capacity` bytes each way: the
    /// server's end, the client's end, and the count of the server's writes to the pipe and of
    /// their bytes.
    async fn tls_pair(
        capacity: usize,
    ) -> (
        crate::tls_stream::ServerTls<CountWrites>,
        tokio_rustls::client::TlsStream<tokio::io::DuplexStream>,
        Arc<AtomicUsize>,
        Arc<AtomicUsize>,
    ) {
        use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca =
            rcgen::CertifiedIssuer::self_signed(ca, rcgen::KeyPair::generate().unwrap()).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .unwrap();
        server.send_tls13_tickets = 0;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.der().clone()).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let (near, far) = tokio::io::duplex(capacity);
        let writes = Arc::new(AtomicUsize::new(0));
        let bytes = Arc::new(AtomicUsize::new(0));
        let near = CountWrites {
            inner: near,
            writes: writes.clone(),
            bytes: bytes.clone(),
        };
        let (server, client) = tokio::join!(
            crate::tls_stream::ServerTls::accept(near, Arc::new(server)),
            tokio_rustls::TlsConnector::from(Arc::new(client))
                .connect(ServerName::try_from("localhost").unwrap(), far),
        );
        (server.unwrap(), client.unwrap(), writes, bytes)
    }

    /// A flush that returns at once and wakes its task once: the write-out is deferred to the
    /// next poll, which the wake guarantees.
    fn flush_is_deferred<T: tokio::io::AsyncWrite + ?Sized>(
        io: Pin<&mut T>,
        cx: &mut Context<'_>,
        woken: impl Fn() -> usize,
    ) {
        let before = woken();
        assert!(matches!(io.poll_flush(cx), Poll::Ready(Ok(()))));
        assert_eq!(woken(), before + 1, "a deferred flush must wake its task");
    }

    /// A batch of small writes fills one buffer allocated at a record's size, never grown (a
    /// growing buffer copied what it held at every doubling), which a full record seals and the
    /// write-out frees: an idle connection holds none of it.
    #[tokio::test]
    async fn the_gathering_buffer_is_allocated_once_per_batch_and_freed_by_the_write_out() {
        use tokio::io::AsyncWrite as _;
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let (server, _client, writes, _) = tls_pair(256 * 1024).await;
        let mut io = CoalesceWrites::new(server, Gathering::All);
        let frame = [7u8; 1033];
        assert!(Pin::new(&mut io).poll_write(&mut cx, &frame).is_ready());
        assert_eq!(io.buf.capacity(), COALESCE_LIMIT);
        let start = io.buf.as_ptr();
        let mut taken = frame.len();
        while taken + frame.len() <= COALESCE_LIMIT {
            assert!(Pin::new(&mut io).poll_write(&mut cx, &frame).is_ready());
            taken += frame.len();
            assert_eq!(
                (io.buf.as_ptr(), io.buf.capacity()),
                (start, COALESCE_LIMIT),
                "the buffer moved or grew after {taken} bytes"
            );
        }
        // The next frame does not fit: what is gathered is sealed into a record first.
        assert!(Pin::new(&mut io).poll_write(&mut cx, &frame).is_ready());
        assert_eq!(io.buf.len(), frame.len());
        assert_eq!(io.buf.capacity(), COALESCE_LIMIT);
        let before = writes.load(Ordering::SeqCst);
        let mut scratch = [0u8; 64];
        let mut rb = ReadBuf::new(&mut scratch);
        assert!(Pin::new(&mut io).poll_read(&mut cx, &mut rb).is_pending());
        assert_eq!(writes.load(Ordering::SeqCst), before + 1);
        assert_eq!(io.buf.capacity(), 0, "the write-out frees the buffer");
    }

    /// What one poll of an HTTP/2 connection writes leaves together, in one write, at the next
    /// poll's read (and the flush wakes the task, or it would stall); a full socket makes the
    /// next flush wait for real; a full record buffer is written out by the next write;
    /// shutdown writes everything; an HTTP/1.1 connection's writes go straight through. Over a
    /// real TLS connection, since the gathering happens in the TLS stream's record buffer.
    #[tokio::test]
    async fn coalesced_writes_leave_at_the_next_read_and_a_full_socket_pushes_back() {
        use tokio::io::AsyncWrite as _;
        let wakes = Arc::new(CountWakes(Default::default()));
        let waker = std::task::Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        let woken = || wakes.0.load(Ordering::SeqCst);
        let mut scratch = vec![0u8; 256 * 1024];
        // The plaintext the client can read so far, and whether it saw the end.
        let drain = |client: &mut tokio_rustls::client::TlsStream<tokio::io::DuplexStream>,
                     cx: &mut Context<'_>,
                     scratch: &mut [u8]| {
            let mut got = Vec::new();
            loop {
                let mut rb = ReadBuf::new(scratch);
                match Pin::new(&mut *client).poll_read(cx, &mut rb) {
                    Poll::Ready(Ok(())) if rb.filled().is_empty() => return (got, true),
                    Poll::Ready(Ok(())) => got.extend_from_slice(rb.filled()),
                    _ => return (got, false),
                }
            }
        };

        let (server, mut client, writes, bytes) = tls_pair(256 * 1024).await;
        let written = || writes.load(Ordering::SeqCst);
        let bytes_before = bytes.load(Ordering::SeqCst);
        let mut io = CoalesceWrites::new(server, Gathering::All);
        let mut io = Pin::new(&mut io);
        let before = written();
        assert!(matches!(
            io.as_mut().poll_write(&mut cx, b"head"),
            Poll::Ready(Ok(4))
        ));
        let frames = [std::io::IoSlice::new(b"er"), std::io::IoSlice::new(b"body")];
        assert!(matches!(
            io.as_mut().poll_write_vectored(&mut cx, &frames),
            Poll::Ready(Ok(6))
        ));
        flush_is_deferred(io.as_mut(), &mut cx, woken);
        assert_eq!(written(), before, "gathered, not yet written");
        let mut rb = ReadBuf::new(&mut scratch);
        assert!(io.as_mut().poll_read(&mut cx, &mut rb).is_pending());
        assert_eq!(
            written(),
            before + 1,
            "what one poll wrote leaves in one write"
        );
        // The small writes are sealed into one record: 10 bytes, a content-type byte, a 5-byte
        // header and a 16-byte tag (three records would be 86 bytes).
        assert_eq!(bytes.load(Ordering::SeqCst) - bytes_before, 10 + 1 + 5 + 16);
        assert_eq!(drain(&mut client, &mut cx, &mut scratch).0, b"headerbody");

        // More than the record buffer holds (64 KiB): the write takes part of it, and the
        // next write writes the buffer out first.
        let big = vec![1u8; 100_000];
        let Poll::Ready(Ok(first)) = io.as_mut().poll_write(&mut cx, &big) else {
            panic!("a write into an empty record buffer is taken at once");
        };
        assert!(first > 0 && first < big.len(), "took {first}");
        let before = written();
        let Poll::Ready(Ok(rest)) = io.as_mut().poll_write(&mut cx, &big[first..]) else {
            panic!("the write-out fits the pipe");
        };
        assert_eq!(first + rest, big.len());
        assert_eq!(
            written(),
            before + 1,
            "a full record buffer is written out by the next write"
        );
        assert!(matches!(
            io.as_mut().poll_flush(&mut cx),
            Poll::Ready(Ok(()))
        ));
        let mut rb = ReadBuf::new(&mut scratch);
        assert!(io.as_mut().poll_read(&mut cx, &mut rb).is_pending());
        assert_eq!(drain(&mut client, &mut cx, &mut scratch).0, big);

        // Shutdown writes what is gathered first.
        assert!(matches!(
            io.as_mut().poll_write(&mut cx, b"bye"),
            Poll::Ready(Ok(3))
        ));
        assert!(matches!(
            io.as_mut().poll_shutdown(&mut cx),
            Poll::Ready(Ok(()))
        ));
        assert_eq!(
            drain(&mut client, &mut cx, &mut scratch),
            (b"bye".to_vec(), true)
        );

        // 5000 bytes into a pipe that holds 1024: the write-out blocks and the next flush waits
        // for real until the client has read them all.
        let (server, mut client, _, _) = tls_pair(1024).await;
        let mut io = CoalesceWrites::new(server, Gathering::All);
        let mut io = Pin::new(&mut io);
        assert!(matches!(
            io.as_mut().poll_write(&mut cx, &[7; 5000]),
            Poll::Ready(Ok(5000))
        ));
        assert!(matches!(
            io.as_mut().poll_flush(&mut cx),
            Poll::Ready(Ok(()))
        ));
        let mut rb = ReadBuf::new(&mut scratch);
        assert!(io.as_mut().poll_read(&mut cx, &mut rb).is_pending());
        assert!(
            io.as_mut().poll_flush(&mut cx).is_pending(),
            "a blocked write-out must push back"
        );
        let mut got = Vec::new();
        for _ in 0..100 {
            got.extend(drain(&mut client, &mut cx, &mut scratch).0);
            if io.as_mut().poll_flush(&mut cx).is_ready() {
                break;
            }
        }
        got.extend(drain(&mut client, &mut cx, &mut scratch).0);
        assert_eq!(got, vec![7; 5000]);

        // HTTP/1.1: nothing held.
        let (server, mut client, writes, _) = tls_pair(1024).await;
        let mut plain = CoalesceWrites::new(server, Gathering::Off);
        let before = (writes.load(Ordering::SeqCst), woken());
        assert!(matches!(
            Pin::new(&mut plain).poll_write(&mut cx, b"x"),
            Poll::Ready(Ok(1))
        ));
        assert_eq!(
            writes.load(Ordering::SeqCst),
            before.0 + 1,
            "HTTP/1.1 writes are not held"
        );
        assert!(matches!(
            Pin::new(&mut plain).poll_flush(&mut cx),
            Poll::Ready(Ok(()))
        ));
        assert_eq!(woken(), before.1);
        assert_eq!(drain(&mut client, &mut cx, &mut scratch).0, b"x");

        // The outbound client's gathering: one slice with nothing gathered (frames h2 copied
        // together) goes straight through; a frame head with a chained payload is gathered,
        // and so is what follows it, until the next read writes them out together.
        let (server, mut client, writes, _) = tls_pair(64 * 1024).await;
        let written = || writes.load(Ordering::SeqCst);
        let mut chained = CoalesceWrites::new(server, Gathering::Chained);
        let mut chained = Pin::new(&mut chained);
        let before = written();
        let one = [std::io::IoSlice::new(b"headers")];
        assert!(matches!(
            chained.as_mut().poll_write_vectored(&mut cx, &one),
            Poll::Ready(Ok(7))
        ));
        assert_eq!(
            written(),
            before + 1,
            "one slice, nothing gathered: written at once"
        );
        let frame = [
            std::io::IoSlice::new(b"head"),
            std::io::IoSlice::new(b"payload"),
        ];
        assert!(matches!(
            chained.as_mut().poll_write_vectored(&mut cx, &frame),
            Poll::Ready(Ok(11))
        ));
        assert!(matches!(
            chained
                .as_mut()
                .poll_write_vectored(&mut cx, &[std::io::IoSlice::new(b"more")]),
            Poll::Ready(Ok(4))
        ));
        flush_is_deferred(chained.as_mut(), &mut cx, woken);
        assert_eq!(
            written(),
            before + 1,
            "a chained frame and what follows are gathered"
        );
        let mut rb = ReadBuf::new(&mut scratch);
        assert!(chained.as_mut().poll_read(&mut cx, &mut rb).is_pending());
        assert_eq!(written(), before + 2, "and leave in one write");
        assert_eq!(
            drain(&mut client, &mut cx, &mut scratch).0,
            b"headersheadpayloadmore"
        );
    }
}
