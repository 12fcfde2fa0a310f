//! The plaintext health-probe listener (default 0.0.0.0:15020, Istio's convention).
//!
//! Kubelets and container health checks cannot present an SVID, and with default-deny a probe
//! sent to the mTLS port would be refused — the most common way meshes make pods unready. This
//! listener forwards exactly the configured probe paths (GET/HEAD, no body) to the app and
//! nothing else, so it opens no path around mTLS. The forwarded request is rebuilt from scratch:
//! no caller header (such as a forged `x-meshgate-peer`) reaches the app.
//!
//! With `probe_self`, it also answers the sidecar's own `/meshgate/ready` and `/meshgate/live`:
//! a kubelet cannot reach the admin port (loopback only, and it has `POST /shutdown`), yet it must
//! see when the sidecar is ready before it starts the app. The `/meshgate/` prefix keeps these
//! out of the app's paths.

use std::convert::Infallible;
use std::sync::Arc;

use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::http_util::{ProxyBody, boxed, local_response, strip_hop_by_hop};

/// The sidecar's own readiness: the reasons it is not ready (empty = ready).
pub type Readiness = Arc<dyn Fn() -> Vec<String> + Send + Sync>;

/// Forwards probe paths to the app.
#[derive(Clone)]
pub struct ProbeForwarder {
    app: std::net::SocketAddr,
    paths: Arc<Vec<String>>,
    client: Client<HttpConnector, Empty<bytes::Bytes>>,
    /// Answers `/meshgate/ready` and `/meshgate/live` when set.
    readiness: Option<Readiness>,
}

impl ProbeForwarder {
    pub fn new(
        app: std::net::SocketAddr,
        paths: Vec<String>,
        readiness: Option<Readiness>,
    ) -> Self {
        Self {
            app,
            paths: Arc::new(paths),
            client: Client::builder(TokioExecutor::new()).build_http(),
            readiness,
        }
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<ProxyBody> {
        let path = req.uri().path();
        if let Some(readiness) = &self.readiness {
            match path {
                "/meshgate/live" => return local_response(StatusCode::OK, "live\n"),
                "/meshgate/ready" => {
                    // The reasons stay on the loopback admin `/ready`: this port is open to
                    // anyone who can reach the pod.
                    return if readiness().is_empty() {
                        local_response(StatusCode::OK, "ready\n")
                    } else {
                        local_response(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                    };
                }
                _ => {}
            }
        }
        if !self.paths.iter().any(|p| p == path) {
            return local_response(StatusCode::NOT_FOUND, "not a configured probe path\n");
        }
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return local_response(StatusCode::METHOD_NOT_ALLOWED, "probes use GET or HEAD\n");
        }
        let has_body = req.headers().contains_key(header::TRANSFER_ENCODING)
            || req
                .headers()
                .get(header::CONTENT_LENGTH)
                .is_some_and(|v| v.as_bytes() != b"0");
        if has_body {
            return local_response(StatusCode::BAD_REQUEST, "probes carry no body\n");
        }
        let forwarded = Request::builder()
            .method(req.method().clone())
            .uri(format!(
                "http://{}{}",
                self.app,
                req.uri().path_and_query().map_or("/", |p| p.as_str())
            ))
            .header(header::USER_AGENT, "meshgate-probe")
            .body(Empty::new())
            .expect("valid probe request");
        match self.client.request(forwarded).await {
            Ok(resp) => {
                let (mut parts, body) = resp.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                Response::from_parts(parts, boxed(body))
            }
            Err(e) => {
                tracing::warn!(event = "probe.app_unavailable", error = %e);
                local_response(StatusCode::SERVICE_UNAVAILABLE, "app unavailable\n")
            }
        }
    }

    /// Serves until shutdown.
    pub async fn serve(self, listener: TcpListener, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = meshgate_ca::backoff::Backoff::for_accept();
        loop {
            tokio::select! {
                _ = async { let _ = shutdown.wait_for(|stop| *stop).await; } => break,
                accepted = backoff.accept(&listener, "probe") => {
                    let (tcp, _) = accepted;
                    let this = self.clone();
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(move |req| {
                            let this = this.clone();
                            async move { Ok::<_, Infallible>(this.handle(req).await) }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(tcp), service)
                            .await;
                    });
                }
            }
        }
    }
}
