//! The lingering close (nginx's `lingering_close`) of an HTTP/1.1 connection answered before
//! its request body was read: the server's answer goes out, its side of the stream is shut
//! down, and what the client still sends is read and thrown away until the client closes or
//! [`LINGER`] passes. Dropping the stream at once, with the body's bytes unread, makes the
//! kernel answer with a reset, and a client still writing its body (Python's `http.client`, a
//! sidecar's pool with `--mesh-protocol preserve`) fails on that reset before it reads the
//! answer: a `401` or a `403` turned into a connection error. Used by the CA's listener
//! ([`LingerOnClose`]) and the sidecar's (`meshgate_proxy::http_conn`).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// How long a connection goes on reading and discarding after its answer (nginx's
/// `lingering_time` is 30 s; a client still sending after 5 s is not sending a request body
/// the size of anything a meshgate listener takes).
pub const LINGER: Duration = Duration::from_secs(5);

/// Reads what `io` still receives and throws it away until the peer closes, the read fails or
/// `until` fires; `Pending` while the peer may still send.
pub fn poll_discard<T: AsyncRead + Unpin + ?Sized>(
    io: &mut T,
    mut until: Pin<&mut Sleep>,
    cx: &mut Context<'_>,
) -> Poll<()> {
    let mut discard = [0u8; 8192];
    loop {
        if until.as_mut().poll(cx).is_ready() {
            return Poll::Ready(());
        }
        let mut buf = ReadBuf::new(&mut discard);
        match Pin::new(&mut *io).poll_read(cx, &mut buf) {
            Poll::Ready(Ok(())) if !buf.filled().is_empty() => {}
            Poll::Ready(_) => return Poll::Ready(()),
            Poll::Pending => return Poll::Pending,
        }
    }
}

/// A stream whose shutdown lingers ([`poll_discard`]) once [`armed`](Self::armed) is set: the
/// service sets it when it answers a request whose body it did not read to its end; hyper
/// then ends the connection, and its `poll_shutdown` returns only once the lingering is over.
#[derive(Debug)]
pub struct LingerOnClose<T> {
    inner: T,
    armed: Arc<AtomicBool>,
    until: Option<Pin<Box<Sleep>>>,
}

impl<T> LingerOnClose<T> {
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            armed: Arc::default(),
            until: None,
        }
    }

    /// The flag that makes the next shutdown linger.
    pub fn armed(&self) -> Arc<AtomicBool> {
        self.armed.clone()
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for LingerOnClose<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for LingerOnClose<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.until.is_none() {
            std::task::ready!(Pin::new(&mut this.inner).poll_shutdown(cx))?;
            if !this.armed.load(Ordering::Relaxed) {
                return Poll::Ready(Ok(()));
            }
            this.until = Some(Box::pin(tokio::time::sleep(LINGER)));
        }
        let until = this.until.as_mut().expect("set above").as_mut();
        std::task::ready!(poll_discard(&mut this.inner, until, cx));
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::time::Instant;

    /// A peer that sends `chunks` of 512 bytes 100 ms apart, then closes (or, with `None`,
    /// sends for ever); returns what it read before it stopped: the server's side shut down
    /// first, so it reads EOF.
    fn peer(
        mut io: tokio::io::DuplexStream,
        chunks: Option<usize>,
    ) -> tokio::task::JoinHandle<Vec<u8>> {
        tokio::spawn(async move {
            let mut sent = 0;
            while chunks.is_none_or(|n| sent < n) {
                if io.write_all(&[b'x'; 512]).await.is_err() {
                    break;
                }
                sent += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let mut got = Vec::new();
            let _ = io.read_to_end(&mut got).await;
            got
        })
    }

    #[tokio::test(start_paused = true)]
    async fn an_armed_shutdown_reads_until_the_peer_closes() {
        let (ours, theirs) = tokio::io::duplex(1024);
        let mut conn = LingerOnClose::new(ours);
        conn.armed().store(true, Ordering::Relaxed);
        let peer = peer(theirs, Some(5));
        let started = Instant::now();
        conn.shutdown().await.unwrap();
        let waited = started.elapsed();
        assert!(
            (Duration::from_millis(400)..LINGER).contains(&waited),
            "returned after {waited:?}: once the peer closed, after its 5 chunks"
        );
        assert!(peer.await.unwrap().is_empty(), "the peer read EOF");
    }

    #[tokio::test(start_paused = true)]
    async fn an_armed_shutdown_gives_up_after_the_limit() {
        let (ours, theirs) = tokio::io::duplex(1024);
        let mut conn = LingerOnClose::new(ours);
        conn.armed().store(true, Ordering::Relaxed);
        let peer = peer(theirs, None);
        let started = Instant::now();
        conn.shutdown().await.unwrap();
        let waited = started.elapsed();
        assert!(
            (LINGER..LINGER + Duration::from_millis(150)).contains(&waited),
            "returned after {waited:?}, the limit is {LINGER:?}"
        );
        drop(conn);
        peer.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn an_unarmed_shutdown_does_not_wait() {
        let (ours, theirs) = tokio::io::duplex(1024);
        let mut conn = LingerOnClose::new(ours);
        let peer = peer(theirs, None);
        let started = Instant::now();
        conn.shutdown().await.unwrap();
        assert_eq!(started.elapsed(), Duration::ZERO);
        drop(conn);
        peer.await.unwrap();
    }
}
