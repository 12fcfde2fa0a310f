//! Forwarding allowed requests to the local app over pooled connections.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use futures_util::FutureExt;
use futures_util::future::Either;
use http::{HeaderValue, Request, Response, StatusCode, Version, header};
use http_body_util::BodyExt;
use tower::Service;

use super::app_pool::{AppDial, AppPool, app_pool};
use super::authz::Reauthorize;
use super::normalize::{CarriedHttp1, TargetApp};
use super::sanitize::TrailerFilter;
use crate::h2_conn::SharedH2;
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

/// One `--app`: where it listens, its kept-alive HTTP/1.1 connections, and how to dial it for
/// HTTP/2.
struct App {
    addr: SocketAddr,
    /// `addr` as an authority, for a request that names none.
    authority: String,
    http1: Arc<AppPool>,
}

/// One h2c connection to one app, shared by one caller connection's requests.
type AppH2 = SharedH2<AppDial, TrailerFilter>;

/// Sends requests to the apps (`host:port` each, the default first), keeping the caller's `Host`.
///
/// HTTP/2 to an app is per caller connection ([`AppForwarder::for_connection`]): one shared
/// h2c connection let a caller that opened streams with a zero flow-control window and never
/// read starve every other caller's streams (connection-level flow control is shared).
#[derive(Clone)]
pub struct AppForwarder {
    apps: Arc<[App]>,
    protocol: AppProtocol,
    /// This caller connection's h2c connection per app, opened on first use (most caller
    /// connections never need one).
    h2c: Arc<[OnceLock<AppH2>]>,
}

impl AppForwarder {
    /// `apps`: the first is the default. Empty for an outbound-only sidecar, whose inbound
    /// refuses every request before it gets here (`AppPortRefusal::NoApp`).
    pub fn new(apps: &[SocketAddr], protocol: AppProtocol) -> Self {
        let apps: Arc<[App]> = apps
            .iter()
            .map(|app| App {
                addr: *app,
                authority: app.to_string(),
                http1: app_pool(*app),
            })
            .collect();
        let h2c = Self::fresh_h2c(apps.len());
        Self {
            apps,
            protocol,
            h2c,
        }
    }

    fn fresh_h2c(apps: usize) -> Arc<[OnceLock<AppH2>]> {
        (0..apps).map(|_| OnceLock::new()).collect()
    }

    /// The forwarder for one caller connection: HTTP/1.1 connections to the apps stay pooled
    /// (one request at a time each, so callers cannot starve each other), HTTP/2 gets a
    /// connection of its own per app, opened on first use and closed with the caller's
    /// connection.
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
        let addr = app.addr;
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
                .unwrap_or(&app.authority)
                .parse()
                .or_else(|_| app.authority.parse())
                .expect("the app address is a valid authority");
            *req.uri_mut() = absolute_uri(req.uri(), authority);
            req.headers_mut().remove(header::HOST);
        } else {
            // HTTP/1.1 to the app: the authority in `Host` (read while the URI still has it),
            // origin-form target.
            if !req.headers().contains_key(header::HOST)
                && let Ok(v) =
                    HeaderValue::from_str(request_authority(&req).unwrap_or(&app.authority))
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
            let h2c = self.h2c.clone();
            Either::Left(
                async move {
                    h2c[index]
                        .get_or_init(|| SharedH2::new(AppDial::new(addr)))
                        .send(req)
                        .await
                }
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
