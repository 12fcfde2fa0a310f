//! The plaintext listeners that answer locally — a sidecar's admin and health-probe listeners,
//! the control plane's admin listener, the demo app (`meshgate demo-app`) — served with the
//! sidecar's accept loop ([`crate::serve::accept_loop`]) and connection type
//! ([`crate::http_conn::HttpConnection`]), under limits of their own.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::serve::Limits;

/// Caps and timeouts of the plaintext listeners that answer locally: a sidecar's admin
/// endpoint and health-probe listener, the control plane's admin listener. They take a handful
/// of connections (a kubelet, a metrics scraper, the CLI), and the probe listener is bound on
/// every address, so any pod can reach it: a few hundred connections from one address are
/// plenty. Their connections are never parked (`park` is not used): a parked connection is out
/// of hyper's hands, so its header-read timer does not run, and a silent client would hold its
/// slot until the idle limit. Unparked, a request head must arrive within
/// [`HEADER_READ_TIMEOUT`](crate::serve::HEADER_READ_TIMEOUT) of the connection or of the previous answer; `idle` is a backstop.
pub const LOCAL_LIMITS: Limits = Limits {
    connections: 1024,
    per_source: 256,
    handshakes: 0,
    idle: Duration::from_secs(120),
    park: Duration::from_secs(1),
};

/// Serves one of the plaintext listeners that answer locally (a sidecar's admin and
/// health-probe listeners, the control plane's admin listener: HTTP/1.1, `version`
/// `Some(Version::H1)`; the demo app: HTTP/1.1 or h2c as the first bytes say, `None`) until
/// `shutdown`, with [`LOCAL_LIMITS`]: connections capped in total and per source address, a
/// request head due within [`HEADER_READ_TIMEOUT`](crate::serve::HEADER_READ_TIMEOUT) of the
/// connection or of the previous answer (without a version, the first bytes too; connections
/// closed at that timeout are counted with `counts`, as its refusals are). Each answer
/// is marked [`LocalReply`](crate::http_util::LocalReply): these endpoints never read an upload
/// to its end, so a request that came with one ends its connection with a lingering close
/// (`crate::http_conn::LINGER`) and the client reads the answer instead of a reset.
///
/// Why: these listeners used to run hyper's connection bare — no cap, and on the probe
/// listener (bound on every address) no header timeout at all — so silent connections from any
/// pod held the sidecar's file descriptors for as long as the attacker liked. The demo app ran
/// the same way, on every address of its pod.
#[allow(clippy::too_many_arguments)]
pub async fn serve_local<S, B>(
    listener: TcpListener,
    shutdown: watch::Receiver<bool>,
    drain: Duration,
    listener_name: &'static str,
    counts: impl crate::serve::CountRefusal + Clone + Send + 'static,
    version: Option<crate::http_conn::Version>,
    service: S,
) where
    S: hyper::service::Service<
            http::Request<hyper::body::Incoming>,
            Response = http::Response<B>,
            Error = std::convert::Infallible,
            Future: Send + 'static,
        > + Clone
        + Send
        + Sync
        + Unpin
        + 'static,
    B: hyper::body::Body<Data: Send, Error: Into<crate::http_conn::ConnError>> + Send + 'static,
{
    use futures_util::FutureExt;
    let service = hyper::service::service_fn(move |req| {
        service.call(req).map(|answered| {
            answered.map(|mut resp| {
                resp.extensions_mut().insert(crate::http_util::LocalReply);
                resp
            })
        })
    });
    crate::serve::accept_loop(
        listener,
        shutdown,
        drain,
        listener_name,
        LOCAL_LIMITS,
        counts.clone(),
        move |tcp, _peer, drain| {
            let counts = counts.clone();
            // Whether the connection answered a request: one kept alive after its answers and
            // closed when no next request came is an idle close, not a silent client.
            let answered = Arc::new(AtomicBool::new(false));
            let service = {
                let (service, answered) = (service.clone(), answered.clone());
                hyper::service::service_fn(move |req| {
                    answered.store(true, Ordering::Relaxed);
                    hyper::service::Service::call(&service, req)
                })
            };
            async move {
                let (io, activity) = crate::http_conn::HttpIo::new(tcp);
                // Without a version, the first bytes decide, under the header timeout.
                let conn = crate::http_conn::HttpConnection::new(
                    io,
                    version,
                    service,
                    // Never parked (see `LOCAL_LIMITS`): no gauge to keep.
                    prometheus_client::metrics::gauge::Gauge::default(),
                );
                let served = drain.serve(conn, Some(LOCAL_LIMITS.idle), None).await;
                if served.idle_closed {
                    tracing::debug!(
                        event = "listener.idle_timeout",
                        listener = listener_name,
                        "closed an idle connection"
                    );
                }
                if let Some(Err(e)) = &served.result
                    && crate::http_conn::is_header_timeout(e)
                {
                    if answered.load(Ordering::Relaxed) && !activity.read_since_write() {
                        tracing::debug!(
                            event = "listener.idle_timeout",
                            listener = listener_name,
                            "closed a kept-alive connection that sent no next request in time"
                        );
                    } else {
                        counts.header_timeout(listener_name);
                        tracing::debug!(
                            event = "listener.header_timeout",
                            listener = listener_name,
                            error = %e,
                            "closed a connection that sent no request head in time"
                        );
                    }
                }
            }
        },
    )
    .await;
}
