//! One HTTP/2 client connection to one peer, opened on first use and shared by every request
//! to it: HTTP/2 multiplexes, so one connection is all a peer needs.
//!
//! Used for a peer sidecar's endpoint ([`crate::outbound::pool`]) and for the h2c connection to
//! a local app (gRPC, `--app-protocol h2c`; [`crate::inbound::forward`]).
//!
//! Why not hyper-util's pooled client: per request it locks and hashes a pool keyed by the
//! request's authority, clones a client of a few hundred bytes, builds a connect future and
//! wraps the connection's handle for the pool. On the inbound sidecar's h2c hop to an app that
//! was ≈ 2.5k instructions and 26 copies per request (callgrind, HTTP/2 end to end;
//! BENCHMARKS.md, twenty-sixth session). Here a request clones the open connection's handle
//! under a lock held for a flag check.
//!
//! The connection, its dispatcher and its requests' futures run in one task
//! ([`ConnExecutor`]). A dial in progress is shared: requests arriving meanwhile wait for that
//! one connection instead of each opening their own. A request the connection could not start
//! (it was closing: the peer's GOAWAY, an app restarting) comes back unsent, and
//! [`SharedH2::send`] sends it once more on a new connection; a request that was sent is never
//! sent twice.

use std::sync::Mutex;

use http::{Request, Response};
use hyper::body::{Body, Incoming};
use hyper::client::conn::http2;

use crate::conn_task::ConnExecutor;
use crate::h1_pool::{Dial, PoolError};

type Sender<B> = http2::SendRequest<B>;

/// See the module docs.
pub struct SharedH2<D: Dial, B> {
    dial: D,
    /// The connection in use, if one is open.
    live: Mutex<Option<Sender<B>>>,
    /// Held while dialling, so that requests arriving meanwhile wait for that one connection.
    dialling: tokio::sync::Mutex<()>,
}

impl<D: Dial, B> std::fmt::Debug for SharedH2<D, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedH2")
            .field("peer", &self.dial.peer())
            .finish()
    }
}

impl<D, B> SharedH2<D, B>
where
    D: Dial,
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    pub fn new(dial: D) -> Self {
        Self {
            dial,
            live: Mutex::new(None),
            dialling: tokio::sync::Mutex::new(()),
        }
    }

    /// The open connection, unless it closed.
    fn current(&self) -> Option<Sender<B>> {
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        live.as_ref().filter(|s| !s.is_closed()).cloned()
    }

    /// The open connection, or a new one.
    pub async fn sender(&self) -> Result<Sender<B>, PoolError<D::Error>> {
        match self.current() {
            Some(sender) => Ok(sender),
            // Boxed: dialling (with TLS to a peer sidecar) and the HTTP/2 handshake are most of
            // this future's size, and every request's future would otherwise make room for it.
            None => Box::pin(self.connect()).await,
        }
    }

    /// A new connection, unless another request opened one meanwhile.
    async fn connect(&self) -> Result<Sender<B>, PoolError<D::Error>> {
        let _dialling = self.dialling.lock().await;
        if let Some(sender) = self.current() {
            return Ok(sender);
        }
        let io = self.dial.dial().await.map_err(PoolError::Dial)?;
        let exec = ConnExecutor::new();
        let (sender, conn) = http2::Builder::new(exec.clone())
            .initial_stream_window_size(crate::serve::H2_STREAM_WINDOW)
            .initial_connection_window_size(crate::serve::H2_CONNECTION_WINDOW)
            .handshake(io)
            .await
            .map_err(|source| PoolError::Http2 {
                peer: self.dial.peer(),
                source,
            })?;
        let peer = self.dial.peer();
        tokio::spawn(async move {
            if let Err(e) = exec.run(conn).await {
                tracing::debug!(error = %e, %peer, "HTTP/2 connection ended with an error");
            }
        });
        *self.live.lock().unwrap_or_else(|p| p.into_inner()) = Some(sender.clone());
        Ok(sender)
    }

    /// After a request came back unsent: the connection is forgotten if it is closing, so that
    /// the next request dials a new one.
    pub fn forget_if_closing(&self) {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        if live
            .as_ref()
            .is_some_and(|s| s.is_closed() || !s.is_ready())
        {
            *live = None;
        }
    }

    /// Sends `req` (absolute URI: its authority becomes `:authority`). A request the connection
    /// could not start goes once more, on a new connection.
    pub async fn send(&self, req: Request<B>) -> Result<Response<Incoming>, PoolError<D::Error>> {
        let mut req = req;
        let mut retried = false;
        loop {
            let mut sender = self.sender().await?;
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok(resp),
                Err(mut e) => match e.take_message() {
                    Some(unsent) if !retried => {
                        self.forget_if_closing();
                        req = unsent;
                        retried = true;
                    }
                    _ => {
                        return Err(PoolError::Http2 {
                            peer: self.dial.peer(),
                            source: e.into_error(),
                        });
                    }
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use http_body_util::{BodyExt, Empty, Full};
    use hyper::body::Bytes;
    use hyper::service::service_fn;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use tokio::net::TcpListener;
    use tokio::task::JoinHandle;

    use super::*;
    use crate::inbound::app_pool::AppDial;

    /// A real h2c server on a loopback port: counts the connections it accepts, answers each
    /// request after 50 ms (so that concurrent requests overlap) with the connection's number,
    /// and keeps each connection's task so that the test can cut it.
    struct H2cServer {
        addr: SocketAddr,
        accepted: Arc<AtomicUsize>,
        conns: Arc<std::sync::Mutex<Vec<JoinHandle<()>>>>,
    }

    impl H2cServer {
        async fn start() -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let accepted = Arc::new(AtomicUsize::new(0));
            let conns = Arc::new(std::sync::Mutex::new(Vec::new()));
            let (count, tasks) = (accepted.clone(), conns.clone());
            tokio::spawn(async move {
                loop {
                    let (tcp, _) = listener.accept().await.unwrap();
                    let n = count.fetch_add(1, Ordering::SeqCst) + 1;
                    let svc = service_fn(
                        move |_req: http::Request<hyper::body::Incoming>| async move {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                                Bytes::from(n.to_string()),
                            )))
                        },
                    );
                    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc);
                    tasks.lock().unwrap().push(tokio::spawn(async move {
                        let _ = conn.await;
                    }));
                }
            });
            Self {
                addr,
                accepted,
                conns,
            }
        }

        /// Cuts every open connection (its task aborted: the socket closes without a GOAWAY,
        /// as when an app is killed).
        fn cut(&self) {
            for task in self.conns.lock().unwrap().drain(..) {
                task.abort();
            }
        }
    }

    type Lane = SharedH2<AppDial, Empty<Bytes>>;

    async fn get(
        lane: &Lane,
        addr: SocketAddr,
    ) -> Result<String, PoolError<crate::inbound::app_pool::AppDialError>> {
        let req = http::Request::get(format!("http://{addr}/x"))
            .body(Empty::new())
            .unwrap();
        let resp = lane.send(req).await?;
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        Ok(String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_requests_share_one_connection() {
        let server = H2cServer::start().await;
        let lane = Arc::new(Lane::new(AppDial::new(server.addr)));
        let mut requests = Vec::new();
        for _ in 0..32 {
            let lane = lane.clone();
            let addr = server.addr;
            requests.push(tokio::spawn(async move { get(&lane, addr).await.unwrap() }));
        }
        for r in requests {
            assert_eq!(
                r.await.unwrap(),
                "1",
                "every request on the first connection"
            );
        }
        assert_eq!(
            server.accepted.load(Ordering::SeqCst),
            1,
            "32 concurrent requests, all arriving before the first connection was up, must share it"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_closed_connection_is_dialled_again() {
        let server = H2cServer::start().await;
        let lane = Lane::new(AppDial::new(server.addr));
        assert_eq!(get(&lane, server.addr).await.unwrap(), "1");
        assert_eq!(
            get(&lane, server.addr).await.unwrap(),
            "1",
            "kept open and reused"
        );
        // The app drops its connection (killed, restarted): once the close has arrived, the
        // next requests go on a new connection, and none fails.
        server.cut();
        tokio::time::sleep(Duration::from_millis(200)).await;
        for _ in 0..3 {
            let got = tokio::time::timeout(Duration::from_secs(5), get(&lane, server.addr))
                .await
                .expect("a request after the app's close hung");
            assert_eq!(got.unwrap(), "2", "answered on the new connection");
        }
        assert_eq!(get(&lane, server.addr).await.unwrap(), "2");
        assert_eq!(server.accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn an_app_that_is_down_fails_the_request_with_the_dial_error() {
        // A port nothing listens on: bound, then released.
        let addr = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let lane = Lane::new(AppDial::new(addr));
        let err = get(&lane, addr).await.unwrap_err();
        assert!(
            matches!(err, PoolError::Dial(_)),
            "expected a dial error, got {err}"
        );
        assert!(err.to_string().contains(&addr.to_string()), "{err}");
    }
}
