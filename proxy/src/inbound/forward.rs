//! Forwarding allowed requests to the local app over pooled connections.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::{HeaderValue, Request, Response, StatusCode, Uri, Version, header};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tower::Service;

use crate::http_util::{
    ORIG_PROTO_HEADER, ProxyBody, boxed, bridge_upgrade, error_response, requested_upgrade,
    set_upgrade, strip_hop_by_hop,
};

/// Which HTTP the local app speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AppProtocol {
    /// HTTP/2 (h2c) for requests that arrived as HTTP/2 from a client, HTTP/1.1 otherwise
    /// (including HTTP/1.1 requests that a peer sidecar carried over HTTP/2).
    #[default]
    Auto,
    Http1,
    H2c,
}

/// Sends requests to the app at `app` (`host:port`), keeping the caller's `Host`.
#[derive(Clone)]
pub struct AppForwarder {
    app: String,
    protocol: AppProtocol,
    http1: Client<HttpConnector, Incoming>,
    h2c: Client<HttpConnector, Incoming>,
}

impl AppForwarder {
    pub fn new(app: std::net::SocketAddr, protocol: AppProtocol) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        // A local app that does not accept within this is down; fail fast with 502.
        connector.set_connect_timeout(Some(std::time::Duration::from_secs(5)));
        let http1 = Client::builder(TokioExecutor::new()).build(connector.clone());
        let h2c = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build(connector);
        Self {
            app: app.to_string(),
            protocol,
            http1,
            h2c,
        }
    }
}

impl Service<Request<Incoming>> for AppForwarder {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<Incoming>) -> Self::Future {
        let carried_http1 = req.headers_mut().remove(ORIG_PROTO_HEADER).is_some();
        // An Upgrade (WebSocket, …) is an HTTP/1.1 mechanism: it goes to the app over HTTP/1.1.
        let upgrade = requested_upgrade(&req);
        let downstream = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
        let use_h2 = upgrade.is_none()
            && match self.protocol {
                AppProtocol::Http1 => false,
                AppProtocol::H2c => true,
                AppProtocol::Auto => req.version() == Version::HTTP_2 && !carried_http1,
            };
        if !req.headers().contains_key(header::HOST)
            && let Some(authority) = req.uri().authority()
            && let Ok(v) = HeaderValue::from_str(authority.as_str())
        {
            req.headers_mut().insert(header::HOST, v);
        }
        strip_hop_by_hop(req.headers_mut());
        if let Some(protocol) = upgrade.clone() {
            set_upgrade(req.headers_mut(), protocol);
        }
        let pq = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
        *req.uri_mut() = format!("http://{}{pq}", self.app)
            .parse::<Uri>()
            .expect("app address and path form a URI");
        *req.version_mut() = if use_h2 {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        };
        let client = if use_h2 {
            self.h2c.clone()
        } else {
            self.http1.clone()
        };
        let request_headers = req.headers().clone();
        Box::pin(async move {
            match client.request(req).await {
                Ok(mut resp) => {
                    let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
                    let upstream = switching.then(|| hyper::upgrade::on(&mut resp));
                    let (mut parts, body) = resp.into_parts();
                    let accepted = parts.headers.get(http::header::UPGRADE).cloned();
                    strip_hop_by_hop(&mut parts.headers);
                    if let (Some(down), Some(up), Some(protocol)) = (downstream, upstream, accepted)
                    {
                        set_upgrade(&mut parts.headers, protocol);
                        bridge_upgrade(down, up);
                    }
                    Ok(Response::from_parts(parts, boxed(body)))
                }
                Err(e) => {
                    tracing::warn!(event = "inbound.app_unavailable", error = %e, "local app did not answer");
                    Ok(error_response(
                        &request_headers,
                        StatusCode::BAD_GATEWAY,
                        "upstream unavailable\n",
                    ))
                }
            }
        })
    }
}
