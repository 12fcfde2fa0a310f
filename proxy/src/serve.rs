//! The accept loop shared by the sidecar's listeners.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Accepts connections until `shutdown` turns true, running `handle` for each in its own task;
/// then stops accepting and gives connections registered with the watcher up to `drain` to finish.
/// Accept errors (e.g. out of file descriptors) are logged and retried after a short pause rather
/// than ending the listener.
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    mut shutdown: watch::Receiver<bool>,
    drain: Duration,
    listener_name: &'static str,
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr, Watcher) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let graceful = GracefulShutdown::new();
    loop {
        tokio::select! {
            _ = async { let _ = shutdown.wait_for(|stop| *stop).await; } => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    tokio::spawn(handle(tcp, peer, graceful.watcher()));
                }
                Err(e) => {
                    tracing::warn!(event = "listener.accept_failed", listener = listener_name, error = %e);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
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
