//! The mesh's TLS stream, both ends: rustls's *unbuffered* connection over the socket, with the
//! buffers held by us. The inbound listener accepts with it ([`ServerTls`]); the outbound
//! connector dials the peer sidecar with it ([`ClientTls`]).
//!
//! Why: tokio-rustls drives rustls's buffered connection, which keeps a 4 KiB record buffer
//! for as long as the connection lives (rustls sizes it back to 4 KiB whenever a read finds it
//! empty, and has no call to free it). A parked HTTP/1.1 connection had given hyper's buffers
//! back, and that record buffer was the largest thing it still held: 4 of the 13.7 KiB an idle
//! inbound mTLS connection cost (massif, BENCHMARKS.md, sixteenth session). Here the ciphertext
//! read from the socket, the plaintext decrypted ahead of the reader and the records waiting for
//! the socket are three buffers of ours, and [`Tls::release_buffers`] frees each one that
//! holds nothing: a parked connection keeps only rustls's session. The buffered connection also
//! copies what it decrypts twice on the way to the reader (into a plaintext queue, then into
//! the reader's buffer); here a record is decrypted in place and copied once, to the reader.
//!
//! How: every call of `process_tls_records` takes the bytes read so far and yields one state,
//! which is handled at once — application data is copied to the reader (what does not fit waits
//! in `plain`), handshake, alert and key-update records are appended to `outgoing`, and the
//! bytes rustls consumed are discarded from the front of `incoming`. Writes are encrypted
//! straight into `outgoing` (no record is allocated on its own, as the buffered connection
//! does) and written to the socket at once; what the socket does not take waits there, and
//! past [`OUTGOING_LIMIT`] a write waits for the socket. Errors are rustls's own, wrapped in
//! `io::Error` as tokio-rustls wraps them (so [`crate::tls::failure_reason`] reads them the
//! same way), and a fatal alert rustls queued is sent before the error is returned. A TCP end
//! without `close_notify` is `UnexpectedEof`, as with tokio-rustls: HTTP's own framing, not
//! TLS, tells a complete message from a truncated one. Client and server differ only in how
//! the connection is made and in which of rustls's two `process_tls_records` is called
//! ([`Unbuffered`]); the handshake is the same loop, driven by the states rustls yields.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use rustls::client::UnbufferedClientConnection;
use rustls::pki_types::ServerName;
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncryptError, InsufficientSizeError, UnbufferedStatus,
    WriteTraffic,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// How much room for ciphertext each read from the socket has at least (rustls reads 4 KiB).
const READ_SIZE: usize = 4096;

/// The most ciphertext held unprocessed: a handshake message rustls accepts (64 KiB, its own
/// limit) plus a whole record. More means the peer sends what rustls would never take: refused.
const INCOMING_LIMIT: usize = 0xffff + 5 + 16 * 1024 + 2048;

/// Records waiting for the socket above which a write waits for it (rustls's buffered
/// connection's default limit).
pub const OUTGOING_LIMIT: usize = 64 * 1024;

/// What one call of `process_tls_records` left to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Something was handled; call again.
    Progress,
    /// rustls needs more bytes from the peer (the handshake, or a record read in part).
    NeedsBytes,
    /// Handshake complete and nothing left to process: application data may be written.
    Writable,
    /// As `Writable`, and the writer given to [`Tls::step`] ran with that permission.
    Written,
    /// Both sides sent `close_notify`.
    Closed,
}

/// What [`Tls::step`] runs when rustls permits application data: the permission, and
/// `outgoing` with its end.
type Writer<'a, D> = dyn FnMut(&mut WriteTraffic<'_, D>, &mut Vec<u8>, &mut usize) + 'a;

/// rustls's unbuffered connection of either side: the one call that differs between them.
pub trait Unbuffered {
    /// The side's data (`ServerConnectionData`, `ClientConnectionData`).
    type Data;
    /// The session's state common to both sides.
    fn common(&self) -> &rustls::CommonState;
    /// rustls's `process_tls_records` of this side.
    fn process_tls_records<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data>;
}

/// [`Unbuffered`] for one side: rustls gives each side its own `process_tls_records`, with
/// the same signature.
macro_rules! unbuffered_side {
    ($conn:ty, $data:ty) => {
        impl Unbuffered for $conn {
            type Data = $data;
            fn common(&self) -> &rustls::CommonState {
                self
            }
            fn process_tls_records<'c, 'i>(
                &'c mut self,
                incoming: &'i mut [u8],
            ) -> UnbufferedStatus<'c, 'i, Self::Data> {
                (**self).process_tls_records(incoming)
            }
        }
    };
}

unbuffered_side!(
    UnbufferedServerConnection,
    rustls::server::ServerConnectionData
);
unbuffered_side!(
    UnbufferedClientConnection,
    rustls::client::ClientConnectionData
);

/// The inbound listener's end of a mesh connection.
pub type ServerTls<T = TcpStream> = Tls<UnbufferedServerConnection, T>;

/// The outbound connector's end of a mesh connection.
pub type ClientTls<T = TcpStream> = Tls<UnbufferedClientConnection, T>;

/// A TLS connection over a TCP socket, either end; see the module docs.
pub struct Tls<C, T = TcpStream> {
    tcp: T,
    conn: C,
    /// Ciphertext read from the socket and not yet consumed by rustls: `incoming[..received]`
    /// (the rest of the vector is initialized room for the next read).
    incoming: Vec<u8>,
    received: usize,
    /// Plaintext decrypted ahead of the reader: `plain[plain_read..]`.
    plain: Vec<u8>,
    plain_read: usize,
    /// Records for the socket: `outgoing[sent..queued]` (the rest is initialized room).
    outgoing: Vec<u8>,
    sent: usize,
    queued: usize,
    /// The peer sent `close_notify`: reads end once `plain` is read.
    peer_closed: bool,
    /// The socket reached its end.
    eof: bool,
    /// We queued `close_notify`.
    close_queued: bool,
    /// rustls failed; every later call reports it (boxed: a connection that never fails keeps
    /// a pointer's room for it).
    failed: Option<Box<rustls::Error>>,
}

impl<C, T: std::fmt::Debug> std::fmt::Debug for Tls<C, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("tcp", &self.tcp)
            .field("received", &self.received)
            .field("plain", &(self.plain.len() - self.plain_read))
            .field("outgoing", &(self.queued - self.sent))
            .field("peer_closed", &self.peer_closed)
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

/// `io::Error` for a rustls error, as tokio-rustls makes it.
fn io_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Appends what `write` puts into a buffer to `buf[..*end]`, growing `buf` to the size rustls
/// asks for when the room left is too small.
fn append<E>(
    buf: &mut Vec<u8>,
    end: &mut usize,
    mut write: impl FnMut(&mut [u8]) -> Result<usize, E>,
    too_small: impl Fn(&E) -> Option<InsufficientSizeError>,
) -> Result<(), E> {
    loop {
        match write(&mut buf[*end..]) {
            Ok(n) => {
                *end += n;
                return Ok(());
            }
            Err(e) => match too_small(&e) {
                Some(InsufficientSizeError { required_size }) => {
                    buf.resize(*end + required_size, 0);
                }
                None => return Err(e),
            },
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> Tls<UnbufferedServerConnection, T> {
    /// Completes the server's handshake on `tcp` as `config` says. The caller bounds it in time.
    pub async fn accept(tcp: T, config: std::sync::Arc<rustls::ServerConfig>) -> io::Result<Self> {
        let conn = UnbufferedServerConnection::new(config).map_err(io_error)?;
        Self::handshake(tcp, conn).await
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> Tls<UnbufferedClientConnection, T> {
    /// Completes the client's handshake with the server `name` on `tcp` as `config` says. The
    /// caller bounds it in time.
    pub async fn connect(
        tcp: T,
        config: std::sync::Arc<rustls::ClientConfig>,
        name: ServerName<'static>,
    ) -> io::Result<Self> {
        let conn = UnbufferedClientConnection::new(config, name).map_err(io_error)?;
        Self::handshake(tcp, conn).await
    }
}

impl<C: Unbuffered, T: AsyncRead + AsyncWrite + Unpin> Tls<C, T> {
    /// Runs the handshake of `conn` (either side: rustls says what to send and when to read).
    async fn handshake(tcp: T, conn: C) -> io::Result<Self> {
        let mut tls = Tls {
            tcp,
            conn,
            incoming: Vec::new(),
            received: 0,
            plain: Vec::new(),
            plain_read: 0,
            outgoing: Vec::new(),
            sent: 0,
            queued: 0,
            peer_closed: false,
            eof: false,
            close_queued: false,
            failed: None,
        };
        std::future::poll_fn(|cx| tls.poll_handshake(cx)).await?;
        // What the handshake needed (the client's certificate flight, ours) is not kept for a
        // connection that may stay idle from here on.
        tls.release_buffers();
        Ok(tls)
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let step = match self.step(None, None) {
                Ok(step) => step,
                Err(e) => {
                    // The alert that tells the peer why (a refused certificate), best effort.
                    let _ = self.poll_write_out(cx);
                    return Poll::Ready(Err(e));
                }
            };
            match step {
                Step::Progress => {}
                Step::Writable if !self.conn.common().is_handshaking() => {
                    // Our last flight (a client's Finished; a TLS 1.2 server's ChangeCipherSpec
                    // and Finished) leaves before we report done.
                    ready!(self.poll_write_out(cx))?;
                    return Poll::Ready(Ok(()));
                }
                Step::NeedsBytes | Step::Writable | Step::Written => {
                    ready!(self.poll_write_out(cx))?;
                    if ready!(self.poll_fill(cx))? == 0 {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "tls handshake eof",
                        )));
                    }
                }
                Step::Closed => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "peer closed the connection during the handshake",
                    )));
                }
            }
        }
    }

    /// The socket.
    pub fn get_ref(&self) -> &T {
        &self.tcp
    }

    /// The session: the peer's certificates, the protocol ALPN agreed on.
    pub fn session(&self) -> &rustls::CommonState {
        self.conn.common()
    }

    /// Frees every buffer that holds nothing (a parked connection's: see the module docs).
    pub fn release_buffers(&mut self) {
        if self.received == 0 {
            self.incoming = Vec::new();
        }
        if self.plain_read == self.plain.len() {
            self.plain = Vec::new();
            self.plain_read = 0;
        }
        if self.sent == self.queued {
            self.outgoing = Vec::new();
            self.sent = 0;
            self.queued = 0;
        }
    }

    /// Whether a read would return without waiting for the socket: plaintext is held, or the
    /// connection has ended or failed. Ciphertext held is not enough: a read that waited
    /// processed every whole record first, so what is left is part of one, which only the
    /// socket can complete (counting it would wake a parked connection every time it parks).
    fn has_buffered(&self) -> bool {
        self.plain_read < self.plain.len() || self.peer_closed || self.eof || self.failed.is_some()
    }

    /// Records that rustls failed with `e`: the alert it queued (if any) goes into `outgoing`
    /// for the next write-out, and `e` is what every later call returns.
    fn fail(&mut self, e: rustls::Error) -> io::Error {
        // rustls queues the alert before it returns the error and hands it out first at the
        // next call, before it looks at any input: one call, with the same buffer (its
        // handshake deframer keeps positions in it). Calling on would deframe the offending
        // record again.
        let UnbufferedStatus { state, .. } = self
            .conn
            .process_tls_records(&mut self.incoming[..self.received]);
        if let Ok(ConnectionState::EncodeTlsData(mut encode)) = state {
            let _ = append(
                &mut self.outgoing,
                &mut self.queued,
                |out| encode.encode(out),
                encode_too_small,
            );
        }
        self.failed = Some(Box::new(e.clone()));
        io_error(e)
    }

    /// Hands `bytes` to the reader's `into` as far as it has room, the rest to `plain`.
    fn deliver(plain: &mut Vec<u8>, into: Option<&mut ReadBuf<'_>>, mut bytes: &[u8]) {
        if let Some(into) = into
            && plain.is_empty()
        {
            let n = bytes.len().min(into.remaining());
            into.put_slice(&bytes[..n]);
            bytes = &bytes[n..];
        }
        plain.extend_from_slice(bytes);
    }

    /// One call of `process_tls_records` on what was read so far, its state handled and the
    /// consumed bytes discarded. Application data goes to `into` (then `plain`). When rustls
    /// permits application data and `write` is given, `write` runs with the permission and
    /// `outgoing` in that same call ([`Step::Written`]): an encrypted write costs one call of
    /// `process_tls_records`, not one to learn that writing is allowed and one to write.
    fn step(
        &mut self,
        mut into: Option<&mut ReadBuf<'_>>,
        write: Option<&mut Writer<'_, C::Data>>,
    ) -> io::Result<Step> {
        if let Some(e) = &self.failed {
            return Err(io_error((**e).clone()));
        }
        if self.plain_read == self.plain.len() && self.plain_read > 0 {
            self.plain.clear();
            self.plain_read = 0;
        }
        let UnbufferedStatus { mut discard, state } = self
            .conn
            .process_tls_records(&mut self.incoming[..self.received]);
        let step = match state {
            Ok(ConnectionState::ReadTraffic(mut traffic)) => {
                let mut failed = None;
                while let Some(record) = traffic.next_record() {
                    match record {
                        Ok(record) => {
                            discard += record.discard;
                            Self::deliver(&mut self.plain, into.as_deref_mut(), record.payload);
                        }
                        Err(e) => {
                            failed = Some(e);
                            break;
                        }
                    }
                }
                match failed {
                    Some(e) => Err(e),
                    None => Ok(Step::Progress),
                }
            }
            Ok(ConnectionState::EncodeTlsData(mut encode)) => append(
                &mut self.outgoing,
                &mut self.queued,
                |out| encode.encode(out),
                encode_too_small,
            )
            .map(|()| Step::Progress)
            .map_err(|e| rustls::Error::General(format!("encoding a TLS record: {e}"))),
            Ok(ConnectionState::TransmitTlsData(transmit)) => {
                // What was encoded is in `outgoing`, which is written out in order before
                // anything later: as good as sent.
                transmit.done();
                Ok(Step::Progress)
            }
            Ok(ConnectionState::BlockedHandshake) => Ok(Step::NeedsBytes),
            Ok(ConnectionState::WriteTraffic(mut traffic)) => match write {
                Some(write) => {
                    write(&mut traffic, &mut self.outgoing, &mut self.queued);
                    Ok(Step::Written)
                }
                None => Ok(Step::Writable),
            },
            Ok(ConnectionState::PeerClosed) => {
                self.peer_closed = true;
                Ok(Step::Progress)
            }
            Ok(ConnectionState::Closed) => {
                self.peer_closed = true;
                Ok(Step::Closed)
            }
            // Early data is never accepted (`max_early_data_size` is 0), so rustls never yields
            // it; any state newer than this code is refused rather than guessed at.
            Ok(other) => Err(rustls::Error::General(format!(
                "unexpected TLS connection state {other:?}"
            ))),
            Err(e) => Err(e),
        };
        if discard > 0 {
            self.incoming.copy_within(discard..self.received, 0);
            self.received -= discard;
        }
        step.map_err(|e| self.fail(e))
    }

    /// Reads from the socket into `incoming`; the bytes read (0 at its end). After the
    /// buffers were released, the read goes to the stack first, so that waiting for the peer
    /// allocates nothing: a connection that never sends again never has a buffer again.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.eof {
            return Poll::Ready(Ok(0));
        }
        if self.received >= INCOMING_LIMIT {
            let e = rustls::Error::General("TLS message too large".into());
            return Poll::Ready(Err(self.fail(e)));
        }
        let n = if self.incoming.is_empty() {
            let mut first = [0u8; READ_SIZE];
            let mut buf = ReadBuf::new(&mut first);
            ready!(Pin::new(&mut self.tcp).poll_read(cx, &mut buf))?;
            let n = buf.filled().len();
            if n > 0 {
                self.incoming.resize(READ_SIZE, 0);
                self.incoming[..n].copy_from_slice(buf.filled());
            }
            n
        } else {
            if self.incoming.len() - self.received < READ_SIZE {
                self.incoming.resize(self.received + READ_SIZE, 0);
            }
            let mut buf = ReadBuf::new(&mut self.incoming[self.received..]);
            ready!(Pin::new(&mut self.tcp).poll_read(cx, &mut buf))?;
            buf.filled().len()
        };
        self.received += n;
        if n == 0 {
            self.eof = true;
        }
        Poll::Ready(Ok(n))
    }

    /// Writes `outgoing` to the socket until it is all sent.
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.queued {
            let n = ready!(
                Pin::new(&mut self.tcp).poll_write(cx, &self.outgoing[self.sent..self.queued])
            )?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.sent = 0;
        self.queued = 0;
        Poll::Ready(Ok(()))
    }

    /// Runs `write` with rustls's permission to write application data into `outgoing`,
    /// processing what was read first (records read ahead are decrypted into `plain`).
    fn write_traffic<E: std::fmt::Display>(
        &mut self,
        mut write: impl FnMut(&mut WriteTraffic<'_, C::Data>, &mut [u8]) -> Result<usize, E>,
        too_small: impl Fn(&E) -> Option<InsufficientSizeError>,
    ) -> io::Result<()> {
        let mut written = None;
        let mut writer = |traffic: &mut WriteTraffic<'_, C::Data>,
                          outgoing: &mut Vec<u8>,
                          queued: &mut usize| {
            written = Some(
                append(outgoing, queued, |out| write(traffic, out), &too_small)
                    .map_err(|e| io::Error::other(format!("writing a TLS record: {e}"))),
            );
        };
        loop {
            match self.step(None, Some(&mut writer))? {
                Step::Progress => {}
                Step::Written => break,
                Step::Writable | Step::NeedsBytes => {
                    return Err(io::Error::other(
                        "TLS connection not ready for application data",
                    ));
                }
                Step::Closed => return Err(io::ErrorKind::BrokenPipe.into()),
            }
        }
        written.expect("Step::Written means the writer ran")
    }

    /// Encrypts `data` (one or more records) into `outgoing`, without I/O.
    fn seal(&mut self, data: &[u8]) -> io::Result<()> {
        self.write_traffic(|traffic, out| traffic.encrypt(data, out), encrypt_too_small)
    }

    /// Takes what fits of `bufs` (up to [`OUTGOING_LIMIT`] waiting) into `outgoing` as
    /// records, without I/O; `Ok(0)` when `outgoing` is full.
    pub fn gather(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        let waiting = self.queued - self.sent;
        if waiting >= OUTGOING_LIMIT {
            return Ok(0);
        }
        let room = OUTGOING_LIMIT - waiting;
        let mut slices = bufs.iter().filter(|b| !b.is_empty());
        match (slices.next(), slices.next()) {
            (None, _) => Ok(0),
            (Some(one), None) => {
                let take = one.len().min(room);
                self.seal(&one[..take])?;
                Ok(take)
            }
            // Several small slices (a frame head and its payload, a response head and its
            // body) go into one record: joined first, as rustls's buffered connection does.
            // Larger writes are sealed slice by slice, uncopied: a record each is nothing next
            // to copying them.
            _ => {
                let total: usize = bufs.iter().map(|b| b.len()).sum();
                if total > JOIN_LIMIT {
                    let mut taken = 0;
                    for b in bufs {
                        let take = b.len().min(room - taken);
                        if take > 0 {
                            self.seal(&b[..take])?;
                            taken += take;
                        }
                    }
                    return Ok(taken);
                }
                SCRATCH.with_borrow_mut(|scratch| {
                    scratch.clear();
                    for b in bufs {
                        let take = b.len().min(room - scratch.len());
                        scratch.extend_from_slice(&b[..take]);
                    }
                    self.seal(scratch).map(|()| scratch.len())
                })
            }
        }
    }

    /// Whether records are waiting for the socket.
    pub fn has_gathered(&self) -> bool {
        self.sent < self.queued
    }
}

impl<C: Unbuffered> Tls<C, TcpStream> {
    /// Ready when a read would not wait (see [`Self::has_buffered`]) or the socket is readable.
    pub fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.has_buffered() {
            return Poll::Ready(Ok(()));
        }
        self.tcp.poll_read_ready(cx)
    }
}

/// The room rustls asked for, when encrypting failed for the lack of it.
fn encrypt_too_small(e: &EncryptError) -> Option<InsufficientSizeError> {
    match e {
        EncryptError::InsufficientSize(size) => Some(*size),
        _ => None,
    }
}

/// The room rustls asked for, when encoding failed for the lack of it.
fn encode_too_small(e: &EncodeError) -> Option<InsufficientSizeError> {
    match e {
        EncodeError::InsufficientSize(size) => Some(*size),
        _ => None,
    }
}

/// The largest write of several slices joined into one record (a record's payload).
const JOIN_LIMIT: usize = 16 * 1024;

thread_local! {
    /// Where a write of several slices is joined before it is encrypted: one per worker thread,
    /// not one per connection.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl<C: Unbuffered + Unpin, T: AsyncRead + AsyncWrite + Unpin> AsyncRead for Tls<C, T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.plain_read < this.plain.len() {
            let n = (this.plain.len() - this.plain_read).min(buf.remaining());
            buf.put_slice(&this.plain[this.plain_read..this.plain_read + n]);
            this.plain_read += n;
            return Poll::Ready(Ok(()));
        }
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        loop {
            let step = match this.step(Some(buf), None) {
                Ok(step) => step,
                Err(e) => {
                    // The alert rustls queued, best effort: the error is what counts.
                    let _ = this.poll_write_out(cx);
                    return Poll::Ready(Err(e));
                }
            };
            if buf.filled().len() > before {
                return Poll::Ready(Ok(()));
            }
            match step {
                Step::Progress => {}
                Step::Closed => return Poll::Ready(Ok(())),
                Step::NeedsBytes | Step::Writable | Step::Written => {
                    // A key update's answer or an alert rustls queued leaves now; a socket
                    // that cannot take it yet wakes the task.
                    if let Poll::Ready(Err(e)) = this.poll_write_out(cx) {
                        return Poll::Ready(Err(e));
                    }
                    if this.peer_closed {
                        return Poll::Ready(Ok(()));
                    }
                    if this.eof {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "peer closed connection without sending TLS close_notify",
                        )));
                    }
                    ready!(this.poll_fill(cx))?;
                }
            }
        }
    }
}

impl<C: Unbuffered + Unpin, T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Tls<C, T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(data)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.queued - this.sent >= OUTGOING_LIMIT {
            ready!(this.poll_write_out(cx))?;
        }
        let n = this.gather(bufs)?;
        // Out at once; what the socket does not take now leaves with the next write or flush.
        if let Poll::Ready(Err(e)) = this.poll_write_out(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_write_out(cx))?;
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_queued && this.failed.is_none() {
            this.close_queued = true;
            // Best effort, as tokio-rustls: a connection rustls cannot close cleanly (still
            // handshaking, already failed) is closed by the TCP end alone.
            let _ = this.write_traffic(
                |traffic, out| traffic.queue_close_notify(out),
                encrypt_too_small,
            );
        }
        ready!(this.poll_write_out(cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;
    use std::sync::Arc;
    use std::time::Duration;

    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    /// A server config that requires a client certificate and offers `h2`, and a client
    /// config with one, both from one throwaway CA.
    fn configs(
        version: &'static rustls::SupportedProtocolVersion,
    ) -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca =
            rcgen::CertifiedIssuer::self_signed(ca, rcgen::KeyPair::generate().unwrap()).unwrap();
        let leaf = |name: &str| {
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = rcgen::CertificateParams::new(vec![name.to_string()])
                .unwrap()
                .signed_by(&key, &ca)
                .unwrap();
            (
                vec![cert.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
        };
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.der().clone()).unwrap();
        let roots = Arc::new(roots);
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.clone(),
            provider.clone(),
        )
        .build()
        .unwrap();
        let (chain, key) = leaf("localhost");
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[version])
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .unwrap();
        server.send_tls13_tickets = 0;
        server.alpn_protocols = vec![b"h2".to_vec()];
        let (chain, key) = leaf("client");
        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[version])
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .unwrap();
        client.alpn_protocols = vec![b"h2".to_vec()];
        (Arc::new(server), Arc::new(client))
    }

    /// A `ServerTls` and a tokio-rustls client connected to it over loopback TCP; with
    /// `trickle`, every byte crosses a relay ([`route`]).
    async fn pair(trickle: bool) -> (ServerTls, tokio_rustls::client::TlsStream<TcpStream>) {
        pair_of(&rustls::version::TLS13, trickle).await
    }

    async fn pair_of(
        version: &'static rustls::SupportedProtocolVersion,
        trickle: bool,
    ) -> (ServerTls, tokio_rustls::client::TlsStream<TcpStream>) {
        connected(
            version,
            trickle,
            |tcp, config| async { ServerTls::accept(tcp, config).await.unwrap() },
            |tcp, config| async {
                tokio_rustls::TlsConnector::from(config)
                    .connect(localhost(), tcp)
                    .await
                    .unwrap()
            },
        )
        .await
    }

    /// A `ClientTls` connected to a tokio-rustls server (rustls's buffered connection: an
    /// implementation of its own) over loopback TCP, with `trickle` as in [`pair_of`].
    async fn client_pair_of(
        version: &'static rustls::SupportedProtocolVersion,
        trickle: bool,
    ) -> (ClientTls, tokio_rustls::server::TlsStream<TcpStream>) {
        let (server, client) = connected(
            version,
            trickle,
            |tcp, config| async {
                tokio_rustls::TlsAcceptor::from(config)
                    .accept(tcp)
                    .await
                    .unwrap()
            },
            |tcp, config| async { ClientTls::connect(tcp, config, localhost()).await.unwrap() },
        )
        .await;
        (client, server)
    }

    fn localhost() -> ServerName<'static> {
        ServerName::try_from("localhost").unwrap()
    }

    /// The server `accept` makes of a loopback TCP connection and the client `connect` makes
    /// of its other end, with [`configs`] of `version`; through [`route`]'s relay with
    /// `trickle`.
    async fn connected<S, C, FS, FC>(
        version: &'static rustls::SupportedProtocolVersion,
        trickle: bool,
        accept: impl FnOnce(TcpStream, Arc<rustls::ServerConfig>) -> FS,
        connect: impl FnOnce(TcpStream, Arc<rustls::ClientConfig>) -> FC,
    ) -> (S, C)
    where
        FS: std::future::Future<Output = S>,
        FC: std::future::Future<Output = C>,
    {
        let (server_config, client_config) = configs(version);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = route(listener.local_addr().unwrap(), trickle).await;
        tokio::join!(
            async {
                let (tcp, _) = listener.accept().await.unwrap();
                accept(tcp, server_config).await
            },
            async { connect(TcpStream::connect(target).await.unwrap(), client_config).await }
        )
    }

    /// The address a client dials to reach `server`: `server` itself, or with `trickle` a
    /// relay that forwards what either side sends one to three bytes at a time, so the server
    /// reads records in many pieces (and the client those of the server).
    async fn route(server: std::net::SocketAddr, trickle: bool) -> std::net::SocketAddr {
        if !trickle {
            return server;
        }
        let relay = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = relay.local_addr().unwrap();
        tokio::spawn(async move {
            let (from_client, _) = relay.accept().await.unwrap();
            let to_server = TcpStream::connect(server).await.unwrap();
            to_server.set_nodelay(true).unwrap();
            let (cr, cw) = from_client.into_split();
            let (sr, sw) = to_server.into_split();
            tokio::spawn(trickle_copy(sr, cw));
            trickle_copy(cr, sw).await;
        });
        target
    }

    /// Copies `from` to `to` one to three bytes at a time, then ends `to`.
    async fn trickle_copy(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
    ) {
        let mut buf = [0u8; 3];
        let mut size = 1;
        loop {
            let n = from.read(&mut buf[..size]).await.unwrap_or(0);
            if n == 0 || to.write_all(&buf[..n]).await.is_err() {
                let _ = to.shutdown().await;
                return;
            }
            size = size % 3 + 1;
            tokio::task::yield_now().await;
        }
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    /// Reads exactly `len` bytes from `server`, freeing its empty buffers before every read
    /// as a parking connection would.
    async fn read_releasing<C: Unbuffered + Unpin>(server: &mut Tls<C>, len: usize) -> Vec<u8> {
        let mut got = Vec::new();
        let mut buf = [0u8; 1000];
        while got.len() < len {
            server.release_buffers();
            let n = server.read(&mut buf).await.unwrap();
            assert!(n > 0, "end of stream after {} of {len} bytes", got.len());
            got.extend_from_slice(&buf[..n]);
        }
        got
    }

    #[tokio::test]
    async fn large_payloads_cross_both_ways_and_the_session_is_reported() {
        let (mut server, mut client) = pair(false).await;
        assert_eq!(server.session().alpn_protocol(), Some(&b"h2"[..]));
        assert_eq!(
            server.session().peer_certificates().map(|c| c.len()),
            Some(1),
            "the client's certificate"
        );
        let data = pattern(1 << 20);
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.flush().await.unwrap();
            let mut back = vec![0u8; sent.len()];
            client.read_exact(&mut back).await.unwrap();
            back
        });
        let mut echoed = 0;
        let mut buf = vec![0u8; 7000];
        while echoed < data.len() {
            let n = server.read(&mut buf).await.unwrap();
            assert!(n > 0);
            assert_eq!(buf[..n], data[echoed..echoed + n]);
            // Several slices in one write: joined into the same records.
            let (a, b) = buf[..n].split_at(n / 3);
            let mut slices = [io::IoSlice::new(a), io::IoSlice::new(b)];
            let mut rest: &mut [io::IoSlice<'_>] = &mut slices;
            while !rest.is_empty() {
                let w = server.write_vectored(rest).await.unwrap();
                io::IoSlice::advance_slices(&mut rest, w);
            }
            echoed += n;
        }
        server.flush().await.unwrap();
        assert_eq!(writer.await.unwrap(), data);
    }

    /// Writes of several slices, joined (small) or sealed one by one (large), arrive whole
    /// and in order, and a write never takes more than the outgoing limit.
    #[tokio::test]
    async fn vectored_writes_arrive_in_order_small_and_large() {
        let (mut server, mut client) = pair(false).await;
        let head = pattern(300);
        let body = pattern(50_000);
        let tail = pattern(90_000);
        let mut expected = Vec::new();
        for slices in [
            vec![&head[..], &body[..200]],
            vec![&head[..], &body[..], &tail[..]],
        ] {
            let mut ios: Vec<io::IoSlice<'_>> =
                slices.iter().map(|s| io::IoSlice::new(s)).collect();
            let mut rest: &mut [io::IoSlice<'_>] = &mut ios;
            while !rest.is_empty() {
                let n = server.gather(rest).unwrap();
                assert!(n <= OUTGOING_LIMIT, "took {n}");
                if n == 0 {
                    server.flush().await.unwrap();
                    continue;
                }
                io::IoSlice::advance_slices(&mut rest, n);
            }
            slices.iter().for_each(|s| expected.extend_from_slice(s));
        }
        server.flush().await.unwrap();
        let mut got = vec![0u8; expected.len()];
        client.read_exact(&mut got).await.unwrap();
        assert!(got == expected, "bytes differ");
    }

    #[tokio::test]
    async fn records_read_in_pieces_survive_buffers_released_between_reads() {
        let (mut server, mut client) = pair(true).await;
        let data = pattern(40_000);
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            for chunk in sent.chunks(5_000) {
                client.write_all(chunk).await.unwrap();
                client.flush().await.unwrap();
            }
            client
        });
        assert_eq!(read_releasing(&mut server, data.len()).await, data);
        let _client = writer.await.unwrap();
    }

    #[tokio::test]
    async fn an_idle_connection_releases_every_buffer() {
        let (mut server, mut client) = pair(false).await;
        let capacities = |s: &ServerTls| {
            (
                s.incoming.capacity(),
                s.plain.capacity(),
                s.outgoing.capacity(),
            )
        };
        // Waiting for a first request allocates nothing (the handshake's buffers are gone).
        let mut buf = [0u8; 4];
        let waited = tokio::time::timeout(Duration::from_millis(50), server.read(&mut buf)).await;
        assert!(waited.is_err(), "nothing was sent");
        assert_eq!(
            capacities(&server),
            (0, 0, 0),
            "a connection waiting for its first bytes"
        );
        client.write_all(b"ping").await.unwrap();
        client.flush().await.unwrap();
        server.read_exact(&mut buf).await.unwrap();
        server.write_all(b"pong").await.unwrap();
        server.flush().await.unwrap();
        client.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"pong");
        assert!(
            server.incoming.capacity() >= READ_SIZE && server.outgoing.capacity() > 0,
            "reading and writing allocate their buffers"
        );
        server.release_buffers();
        assert_eq!(
            capacities(&server),
            (0, 0, 0),
            "an idle connection holds no buffer"
        );
        // And it goes on as before.
        client.write_all(b"again").await.unwrap();
        client.flush().await.unwrap();
        let mut buf = [0u8; 5];
        server.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"again");
    }

    /// Part of a record waits for the socket, not for a poll: a parked connection holding it
    /// is woken by the rest of the record, not at once (and again at every park).
    #[tokio::test]
    async fn part_of_a_record_is_kept_and_does_not_make_the_stream_ready() {
        let (mut server, client) = pair(false).await;
        let (mut tcp, mut session) = client.into_inner();
        // One whole record, as the client's session seals it, sent in two parts.
        let mut record = Vec::new();
        session.writer().write_all(b"hello").unwrap();
        session.write_tls(&mut record).unwrap();
        tcp.write_all(&record[..3]).await.unwrap();
        let mut buf = [0u8; 5];
        let waited = tokio::time::timeout(Duration::from_millis(50), server.read(&mut buf)).await;
        assert!(waited.is_err(), "half a record is nothing to read");
        server.release_buffers();
        assert_eq!(server.received, 3, "the part read is kept");
        let ready = std::future::poll_fn(|cx| Poll::Ready(server.poll_read_ready(cx))).await;
        assert!(
            ready.is_pending(),
            "only the socket can complete the record"
        );
        tcp.write_all(&record[3..]).await.unwrap();
        std::future::poll_fn(|cx| server.poll_read_ready(cx))
            .await
            .unwrap();
        server.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello");
    }

    /// `--allow-tls12` sessions: another handshake, explicit nonces, 1.2's close.
    #[tokio::test]
    async fn tls12_sessions_carry_data_both_ways_through_pieces() {
        let (mut server, mut client) = pair_of(&rustls::version::TLS12, true).await;
        assert_eq!(
            server.session().protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_2)
        );
        assert!(server.session().peer_certificates().is_some());
        let data = pattern(20_000);
        client.write_all(&data).await.unwrap();
        client.flush().await.unwrap();
        assert_eq!(read_releasing(&mut server, data.len()).await, data);
        server.write_all(&data).await.unwrap();
        server.shutdown().await.unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, data);
    }

    /// rustls's buffered connection of either side (tokio-rustls), as the peer that updates
    /// its keys.
    trait RefreshKeys: AsyncRead + AsyncWrite + Unpin {
        fn refresh_keys(&mut self);
    }

    impl RefreshKeys for tokio_rustls::client::TlsStream<TcpStream> {
        fn refresh_keys(&mut self) {
            self.get_mut().1.refresh_traffic_keys().unwrap();
        }
    }

    impl RefreshKeys for tokio_rustls::server::TlsStream<TcpStream> {
        fn refresh_keys(&mut self) {
            self.get_mut().1.refresh_traffic_keys().unwrap();
        }
    }

    /// Three rounds of: `theirs` updates its keys and sends, `ours` reads it and answers.
    async fn key_update_rounds<C: Unbuffered + Unpin>(
        ours: &mut Tls<C>,
        theirs: &mut impl RefreshKeys,
    ) {
        for round in 0..3u8 {
            theirs.refresh_keys();
            theirs.write_all(&[round; 100]).await.unwrap();
            theirs.flush().await.unwrap();
            let mut buf = [0u8; 100];
            ours.read_exact(&mut buf).await.unwrap();
            assert_eq!(buf, [round; 100]);
            ours.write_all(&[round + 10; 50]).await.unwrap();
            ours.flush().await.unwrap();
            let mut back = [0u8; 50];
            theirs.read_exact(&mut back).await.unwrap();
            assert_eq!(back, [round + 10; 50]);
        }
    }

    #[tokio::test]
    async fn key_updates_from_the_client_keep_the_stream_going() {
        let (mut server, mut client) = pair(false).await;
        key_update_rounds(&mut server, &mut client).await;
    }

    #[tokio::test]
    async fn close_notify_ends_the_stream_cleanly_and_a_bare_tcp_end_does_not() {
        // The client closes with close_notify: the server reads a clean end, and its own
        // shutdown reaches the client as one.
        let (mut server, mut client) = pair(false).await;
        client.write_all(b"bye").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"bye");
        server.shutdown().await.unwrap();
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());

        // The client's TCP ends without close_notify: a truncation, reported as one.
        let (mut server, client) = pair(false).await;
        let (mut tcp, _) = client.into_inner();
        tcp.shutdown().await.unwrap();
        let mut got = Vec::new();
        let err = server.read_to_end(&mut got).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test]
    async fn garbage_after_the_handshake_fails_the_connection_with_an_alert() {
        let (mut server, client) = pair(false).await;
        let (mut tcp, _) = client.into_inner();
        garbage_fails(&mut server, &mut tcp).await;
    }

    /// The peer's socket, under its TLS session, sends a record no key decrypts: `ours` fails
    /// with rustls's error, its alert reaches the peer, and the connection stays failed.
    async fn garbage_fails<C: Unbuffered + Unpin>(ours: &mut Tls<C>, tcp: &mut TcpStream) {
        // A record header claiming application data, then bytes no key decrypts.
        tcp.write_all(&[23, 3, 3, 0, 40]).await.unwrap();
        tcp.write_all(&[0x55; 40]).await.unwrap();
        let mut buf = [0u8; 16];
        let err = ours.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(
            matches!(
                err.get_ref()
                    .and_then(|e| e.downcast_ref::<rustls::Error>()),
                Some(rustls::Error::DecryptError)
            ),
            "{err}"
        );
        let mut alert = [0u8; 64];
        let n = tcp.read(&mut alert).await.unwrap();
        assert!(
            n >= 5 && alert[0] == 23,
            "an (encrypted) alert record: {:?}",
            &alert[..n]
        );
        assert!(ours.read(&mut buf).await.is_err());
        assert!(ours.write_all(b"x").await.is_err());
    }

    /// The client end, against rustls's buffered server (tokio-rustls): TLS 1.3 and 1.2,
    /// every record read in pieces both ways, buffers released between reads, the session
    /// reported, and nothing held once idle.
    #[tokio::test]
    async fn the_client_end_carries_data_both_ways_through_pieces() {
        for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
            let (mut client, mut server) = client_pair_of(version, true).await;
            assert_eq!(client.session().protocol_version(), Some(version.version));
            assert_eq!(client.session().alpn_protocol(), Some(&b"h2"[..]));
            assert_eq!(
                client.session().peer_certificates().map(|c| c.len()),
                Some(1),
                "the server's certificate"
            );
            let data = pattern(20_000);
            client.write_all(&data).await.unwrap();
            client.flush().await.unwrap();
            let mut got = vec![0u8; data.len()];
            server.read_exact(&mut got).await.unwrap();
            assert!(got == data, "{version:?}: the server read other bytes");
            server.write_all(&data).await.unwrap();
            server.flush().await.unwrap();
            assert!(
                read_releasing(&mut client, data.len()).await == data,
                "{version:?}: the client read other bytes"
            );
            client.release_buffers();
            assert_eq!(
                (
                    client.incoming.capacity(),
                    client.plain.capacity(),
                    client.outgoing.capacity()
                ),
                (0, 0, 0),
                "{version:?}: an idle client connection holds no buffer"
            );
            // Our client's close reaches the server as close_notify, and the server's as ours.
            client.shutdown().await.unwrap();
            let mut rest = Vec::new();
            server.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty());
            server.shutdown().await.unwrap();
            client.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty());
        }
    }

    /// The two ends of ours, as two sidecars use them: a large exchange both ways.
    #[tokio::test]
    async fn client_and_server_ends_talk_to_each_other() {
        let (mut server, mut client) = connected(
            &rustls::version::TLS13,
            false,
            |tcp, config| async { ServerTls::accept(tcp, config).await.unwrap() },
            |tcp, config| async { ClientTls::connect(tcp, config, localhost()).await.unwrap() },
        )
        .await;
        let data = pattern(300_000);
        let sent = data.clone();
        let echo = tokio::spawn(async move {
            let mut got = vec![0u8; sent.len()];
            server.read_exact(&mut got).await.unwrap();
            server.write_all(&got).await.unwrap();
            server.flush().await.unwrap();
            server
        });
        client.write_all(&data).await.unwrap();
        client.flush().await.unwrap();
        let mut back = vec![0u8; data.len()];
        client.read_exact(&mut back).await.unwrap();
        assert!(back == data, "the echo differs");
        let _server = echo.await.unwrap();
    }

    #[tokio::test]
    async fn the_client_end_follows_key_updates_from_the_server() {
        let (mut client, mut server) = client_pair_of(&rustls::version::TLS13, false).await;
        key_update_rounds(&mut client, &mut server).await;
    }

    /// A server whose certificate the client's roots do not vouch for is refused in the
    /// handshake, with rustls's error where [`crate::tls::failure_reason`] reads it.
    #[tokio::test]
    async fn the_client_end_refuses_a_server_its_roots_do_not_vouch_for() {
        let (server_config, _) = configs(&rustls::version::TLS13);
        let (_, stranger_client) = configs(&rustls::version::TLS13);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let serve = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            ServerTls::accept(tcp, server_config).await.map(|_| ())
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let err = ClientTls::connect(tcp, stranger_client, localhost())
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        // Both throwaway CAs have the same (empty) name: the server's chain names an issuer the
        // client knows, whose key did not sign it.
        assert_eq!(crate::tls::failure_reason(&err), "bad_cert", "{err}");
        assert!(err.to_string().contains("BadSignature"), "{err}");
        // The client's alert told the server why.
        let served = serve.await.unwrap().unwrap_err();
        assert_eq!(
            crate::tls::failure_reason(&served),
            "peer_alert",
            "{served}"
        );
    }

    #[tokio::test]
    async fn garbage_from_the_server_fails_the_client_end_and_a_bare_tcp_end_is_a_truncation() {
        let (mut client, server) = client_pair_of(&rustls::version::TLS13, false).await;
        let (mut tcp, _) = server.into_inner();
        garbage_fails(&mut client, &mut tcp).await;

        let (mut client, server) = client_pair_of(&rustls::version::TLS13, false).await;
        let (mut tcp, _) = server.into_inner();
        tcp.shutdown().await.unwrap();
        let mut got = Vec::new();
        let err = client.read_to_end(&mut got).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}
