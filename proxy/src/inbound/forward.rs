//! Forwarding allowed requests to the local app over pooled connections.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use futures_util::FutureExt;
use futures_util::future::Either;
use http::{HeaderValue, Request, Response, StatusCode, Uri, Version, header};
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tower::Service;

use super::app_pool::{AppPool, app_pool};
use super::authz::Reauthorize;
use super::normalize::{CarriedHttp1, TargetApp};
use super::sanitize::TrailerFilter;
use crate::http_util::{
    ProxyBody, absolute_uri, boxed, bridge_upgrade, error_response_for, is_grpc, origin_form,
    request_authority, requested_upgrade, set_upgrade, strip_hop_by_hop,
};

/// Which HTTP the local app speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AppProtocol {
    /// HTTP/2 (h2c) for gRPC (which needs it), HTTP/1.1 for everything else, whatever the
    /// caller spoke: most apps (Python, Node, nginx's default) speak only HTTP/1.1, and an HTTP/2
    /// caller (curl and browsers pick h2 by ALPN) must not get a 502 from them. Apps that want
    /// HTTP/2 for all traffic say `H2c`.
    #[default]
    Auto,
    Http1,
    H2c,
}

/// Dials the app whatever the request URI names. The URI keeps the caller's authority, so the
/// app sees one consistent virtual host: HTTP/1.1's `Host` and HTTP/2's `:authority` (which
/// hyper takes from the URI) both carry what the caller asked for, as RFC 9113 §8.3.1 wants.
#[derive(Clone)]
pub struct AppConnector {
    inner: HttpConnector,
    app: Uri,
}

impl Service<Uri> for AppConnector {
    type Response = <HttpConnector as Service<Uri>>::Response;
    type Error = <HttpConnector as Service<Uri>>::Error;
    type Future = <HttpConnector as Service<Uri>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, _requested: Uri) -> Self::Future {
        self.inner.call(self.app.clone())
    }
}

type AppClient = Client<AppConnector, TrailerFilter>;

/// One `--app`: where it listens, its kept-alive HTTP/1.1 connections, and how to dial it for
/// HTTP/2. Each app has its own: hyper's HTTP/2 pool is keyed by the request's authority (the
/// caller's `Host`), which is the same whichever app a request is for, so a shared pool would
/// reuse one app's connection for another.
struct App {
    addr: String,
    connector: AppConnector,
    http1: Arc<AppPool>,
}

/// Sends requests to the apps (`host:port` each, the default first), keeping the caller's `Host`.
///
/// HTTP/2 to an app is per caller connection ([`AppForwarder::for_connection`]): one shared
/// h2c connection let a caller that opened streams with a zero flow-control window and never
/// read starve every other caller's streams (connection-level flow control is shared).
#[derive(Clone)]
pub struct AppForwarder {
    apps: Arc<[App]>,
    protocol: AppProtocol,
    /// This caller connection's HTTP/2 pool per app, made on first use (most connections never
    /// need one).
    h2c: Arc<[OnceLock<Arc<AppClient>>]>,
}

impl AppForwarder {
    /// `apps`: the first is the default. Empty for an outbound-only sidecar, whose inbound
    /// refuses every request before it gets here (`AppPortRefusal::NoApp`).
    pub fn new(apps: &[std::net::SocketAddr], protocol: AppProtocol) -> Self {
        let apps: Arc<[App]> = apps
            .iter()
            .map(|app| {
                let mut connector = HttpConnector::new();
                connector.set_nodelay(true);
                // A local app that does not accept within this is down; fail fast with 502.
                connector.set_connect_timeout(Some(super::app_pool::CONNECT_TIMEOUT));
                let connector = AppConnector {
                    inner: connector,
                    app: format!("http://{app}")
                        .parse()
                        .expect("a socket address forms a URI"),
                };
                App {
                    addr: app.to_string(),
                    http1: app_pool(*app),
                    connector,
                }
            })
            .collect();
        let h2c = Self::fresh_h2c(apps.len());
        Self {
            apps,
            protocol,
            h2c,
        }
    }

    fn fresh_h2c(apps: usize) -> Arc<[OnceLock<Arc<AppClient>>]> {
        (0..apps).map(|_| OnceLock::new()).collect()
    }

    fn h2c_client(connector: &AppConnector) -> Arc<AppClient> {
        Arc::new(
            Client::builder(TokioExecutor::new())
                .http2_only(true)
                .http2_initial_stream_window_size(crate::serve::H2_STREAM_WINDOW)
                .http2_initial_connection_window_size(crate::serve::H2_CONNECTION_WINDOW)
                .build(connector.clone()),
        )
    }

    /// The forwarder for one caller connection: HTTP/1.1 connections to the apps stay pooled
    /// (one request at a time each, so callers cannot starve each other), HTTP/2 gets a pool of
    /// its own per app, opened on first use and closed with the caller's connection.
    pub fn for_connection(&self) -> Self {
        let mut me = self.clone();
        me.h2c = Self::fresh_h2c(self.apps.len());
        me
    }
}

impl Service<Request<TrailerFilter>> for AppForwarder {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<TrailerFilter>) -> Self::Future {
        let carried_http1 = req.extensions_mut().remove::<CarriedHttp1>().is_some();
        // Normalize checked that the index names one of the apps.
        let index = req
            .extensions_mut()
            .remove::<TargetApp>()
            .map_or(0, |t| t.index);
        let app = &self.apps[index];
        // Boxed: only upgrades carry one, and the future below holds it for the whole request.
        let reauthorize = req.extensions_mut().remove::<Reauthorize>().map(Box::new);
        // An Upgrade (WebSocket, …) is an HTTP/1.1 mechanism: it goes to the app over HTTP/1.1.
        // Only upgrades the authorization layer kept (allowed protocols) are still here.
        let upgrade = requested_upgrade(&req);
        let downstream = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
        let use_h2 = upgrade.is_none()
            && match self.protocol {
                AppProtocol::Http1 => false,
                AppProtocol::H2c => true,
                AppProtocol::Auto => {
                    req.version() == Version::HTTP_2 && !carried_http1 && is_grpc(req.headers())
                }
            };
        strip_hop_by_hop(req.headers_mut());
        if let Some(protocol) = upgrade.clone() {
            set_upgrade(req.headers_mut(), protocol);
        }
        // The caller's authority (checked by the authorization layer) names the virtual host.
        if use_h2 {
            // HTTP/2 carries the authority as `:authority` only (RFC 9113 §8.3.1), which hyper
            // takes from the URI.
            let authority = request_authority(&req)
                .unwrap_or(&app.addr)
                .parse()
                .or_else(|_| app.addr.parse())
                .expect("the app address is a valid authority");
            *req.uri_mut() = absolute_uri(req.uri(), authority);
            req.headers_mut().remove(header::HOST);
        } else {
            // HTTP/1.1 to the app: the authority in `Host` (read while the URI still has it),
            // origin-form target.
            if !req.headers().contains_key(header::HOST)
                && let Ok(v) = HeaderValue::from_str(request_authority(&req).unwrap_or(&app.addr))
            {
                req.headers_mut().insert(header::HOST, v);
            }
            *req.uri_mut() = origin_form(req.uri());
        }
        *req.version_mut() = if use_h2 {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        };
        let grpc = is_grpc(req.headers());
        // The upstream's future is made here, so that the request lives in it alone (the
        // per-request future was 1,688 bytes with three copies of it; `-Zprint-type-sizes`).
        let answered = if use_h2 {
            Either::Left(
                self.h2c[index]
                    .get_or_init(|| Self::h2c_client(&app.connector))
                    .request(req)
                    .map(|answer| -> Answered { Ok(answer?.map(boxed)) }),
            )
        } else {
            Either::Right(app.http1.clone().send(req).map(|answer| -> Answered {
                answer
                    .map(|r| r.map(BodyExt::boxed_unsync))
                    .map_err(|e| e.error.into())
            }))
        };
        // What follows the answer needs no await: a `map`, whose future holds the upstream's
        // future once (an `async` block would hold it again where it awaits it).
        Box::pin(answered.map(move |answered| {
            match answered {
                Ok(mut resp) => {
                    let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
                    let upstream = switching.then(|| hyper::upgrade::on(&mut resp));
                    let (mut parts, body) = resp.into_parts();
                    // Looked up only for a 101: the one answer that can carry an upgrade on.
                    let accepted = upstream
                        .is_some()
                        .then(|| parts.headers.get(http::header::UPGRADE).cloned())
                        .flatten();
                    strip_hop_by_hop(&mut parts.headers);
                    match (downstream, upstream, accepted) {
                        (Some(down), Some(up), Some(protocol)) => {
                            set_upgrade(&mut parts.headers, protocol);
                            let revoked: Pin<Box<dyn Future<Output = ()> + Send>> =
                                match reauthorize {
                                    Some(r) => Box::pin(r.revoked()),
                                    None => Box::pin(std::future::pending()),
                                };
                            bridge_upgrade(down, up, revoked);
                        }
                        (_, Some(_), _) => {
                            // A 101 nobody asked for (or without a protocol): never bridge it.
                            tracing::warn!(
                                event = "inbound.unrequested_upgrade",
                                "the app switched protocols without an allowed Upgrade request; answering 502"
                            );
                            return Ok(error_response_for(
                                grpc,
                                StatusCode::BAD_GATEWAY,
                                "upstream unavailable\n",
                            ));
                        }
                        _ => {}
                    }
                    Ok(Response::from_parts(parts, body))
                }
                Err(e) => {
                    tracing::warn!(event = "inbound.app_unavailable", error = %e, "local app did not answer");
                    Ok(error_response_for(
                        grpc,
                        StatusCode::BAD_GATEWAY,
                        "upstream unavailable\n",
                    ))
                }
            }
        }))
    }
}

/// What the app answered, or why it did not.
type Answered = Result<Response<ProxyBody>, Box<dyn std::error::Error + Send + Sync>>;
