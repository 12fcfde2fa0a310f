//! The request-hygiene layer: what the caller sent is made safe to judge and to forward before
//! authorization sees it (the rules and why: [`super::sanitize`]).
//!
//! - a method that is not canonical, or `CONNECT`, and a duplicate, invalid or disagreeing
//!   `Host` are refused (400, a `bad-request` decision);
//! - hop-by-hop headers and every caller-sent identity header are removed, so nothing the
//!   caller sends can remove or shadow the headers the sidecar adds after authorization;
//! - an `Upgrade` survives only to an allowed protocol;
//! - the outbound sidecar's HTTP/1.1 marker and app port are read and removed (an app port this
//!   sidecar, with several apps, does not serve: 421).
//!
//! Method and path checks are part of judging ([`meshgate_policy::judge()`]), so that
//! `policy explain` refuses exactly what the sidecar refuses; the method is checked here too
//! (the same function, the same reason text), before the Host that a `CONNECT` would make
//! meaningless.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::{HeaderValue, Request};
use hyper::body::Incoming;
use meshgate_policy::judge::Refusal;
use meshgate_policy::record::Layer as DecisionLayer;
use meshgate_policy::{Decision, DecisionRecord};
use tower::{Layer, Service};

use super::authz::{Authorized, AuthzContext, PeerIdentity};
use super::error::InboundError;
use super::observe::Observed;
use super::sanitize::{self, AppPortRefusal};
use crate::http_util::{APP_PORT_HEADER, ORIG_PROTO_HEADER};
use crate::telemetry::TraceHex;

/// Set by the outbound sidecar's `x-meshgate-orig-proto`: the caller spoke HTTP/1.1, so the app
/// gets HTTP/1.1 again (read before the reserved headers are stripped).
#[derive(Debug, Clone, Copy)]
pub struct CarriedHttp1;

/// The request is for one of the sidecar's other `--app`s (named by the calling sidecar's
/// `x-meshgate-app-port`); absent means the default (first) app. Read by authorization (the port
/// judged) and by the forwarder (the app dialled).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TargetApp {
    /// Index into the `--app` list.
    pub index: usize,
    pub port: u16,
}

/// The request asked for an allowed upgrade (WebSocket, …): once authorized, the upgraded
/// connection is re-judged for as long as it stays open.
#[derive(Debug, Clone)]
pub struct AllowedUpgrade(pub HeaderValue);

/// Adds [`Normalize`].
pub struct NormalizeLayer {
    ctx: Arc<AuthzContext>,
    peer: Arc<PeerIdentity>,
}

impl NormalizeLayer {
    pub fn new(ctx: Arc<AuthzContext>, peer: Arc<PeerIdentity>) -> Self {
        Self { ctx, peer }
    }
}

impl<S> Layer<S> for NormalizeLayer {
    type Service = Normalize<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Normalize {
            inner,
            ctx: self.ctx.clone(),
            peer: self.peer.clone(),
        }
    }
}

/// See the module docs.
#[derive(Clone)]
pub struct Normalize<S> {
    inner: S,
    ctx: Arc<AuthzContext>,
    peer: Arc<PeerIdentity>,
}

impl<S> Service<Observed> for Normalize<S>
where
    S: Service<Observed, Response = Authorized, Error = InboundError>,
    S::Future: Send + 'static,
{
    type Response = Authorized;
    type Error = InboundError;
    type Future = futures_util::future::Either<
        S::Future,
        std::future::Ready<Result<Authorized, InboundError>>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, observed: Observed) -> Self::Future {
        use futures_util::future::Either;
        let ctx = &self.ctx;
        let Observed { mut req, span } = observed;
        let traced = span.as_ref().and_then(|s| s.trace_id);
        // As text only where it is written (a refusal, a warning), not on every request.
        let trace_id = || traced.as_ref().map(TraceHex::as_str);
        // The method first (as `judge` would: a CONNECT names no Host worth checking), then
        // the Host.
        let refusal = match meshgate_policy::check_method(req.method().as_str()) {
            Err(e) => Some(Refusal::from(e).to_string()).zip(Some("bad_method")),
            Ok(()) => sanitize::check(&req)
                .err()
                .map(|r| (r.to_string(), r.label())),
        };
        let refused = |req: &Request<Incoming>, port: u16, reason: String, label: &'static str| {
            ctx.metrics.count_hygiene(label, 1);
            let snapshot = ctx.policy.load();
            let decision = Decision::bad_request(snapshot.version(), reason);
            let mut record = DecisionRecord::new(
                DecisionLayer::L7,
                &ctx.local_id,
                &self.peer.id,
                port,
                &decision,
            );
            record.peer_addr = Some(self.peer.addr_text.clone());
            record.method = Some(req.method().as_str().to_string());
            record.original = Some(target(req).to_string());
            record.trace_id = trace_id().map(str::to_string);
            Box::new(record)
        };
        if let Some((reason, label)) = refusal {
            let record = refused(&req, ctx.default_port(), reason, label);
            return Either::Right(std::future::ready(Err(InboundError::BadRequest {
                record,
                body: "bad request\n",
            })));
        }
        // Which app (read before the reserved headers are stripped, which would count it as a
        // forgery): the calling sidecar names it, the default one otherwise.
        let app = match sanitize::target_app(req.headers(), &ctx.app_ports) {
            Ok(app) => app,
            Err(e) => {
                let (port, error): (u16, fn(Box<DecisionRecord>) -> InboundError) = match e {
                    AppPortRefusal::NotServed(port) => (port, InboundError::MisdirectedPort),
                    AppPortRefusal::NoApp => (0, InboundError::MisdirectedPort),
                    AppPortRefusal::Malformed => {
                        (ctx.default_port(), |record| InboundError::BadRequest {
                            record,
                            body: "bad request\n",
                        })
                    }
                };
                let record = refused(&req, port, e.to_string(), e.label());
                return Either::Right(std::future::ready(Err(error(record))));
            }
        };
        req.headers_mut().remove(APP_PORT_HEADER);
        if app != 0 {
            req.extensions_mut().insert(TargetApp {
                index: app,
                port: ctx.app_ports[app],
            });
        }
        if req.headers_mut().remove(ORIG_PROTO_HEADER).is_some() {
            req.extensions_mut().insert(CarriedHttp1);
        }
        let asked = crate::http_util::requested_upgrade(&req);
        let prepared = sanitize::prepare(req.headers_mut(), asked, &ctx.upgrades);
        if prepared.stripped > 0 {
            tracing::warn!(
                event = "authz.forged_identity_header",
                meshgate.workload.id = %ctx.local_id,
                peer.id = %self.peer.id,
                removed = prepared.stripped,
                trace_id = trace_id(),
                "caller sent headers an app could read as the sidecar's identity headers; removed"
            );
            ctx.metrics
                .count_hygiene("identity_header", prepared.stripped as u64);
        }
        if let Some(refused) = &prepared.refused_upgrade {
            tracing::warn!(
                event = "authz.upgrade_refused",
                meshgate.workload.id = %ctx.local_id,
                peer.id = %self.peer.id,
                upgrade = ?refused,
                allowed = ?ctx.upgrades.allowed(),
                trace_id = trace_id(),
                "Upgrade to a protocol that is not allowed was removed; the request goes on without it (allow it with --allow-upgrade)"
            );
            ctx.metrics.count_hygiene("upgrade_refused", 1);
        }
        if let Some(upgrade) = prepared.upgrade {
            req.extensions_mut().insert(AllowedUpgrade(upgrade));
        }
        Either::Left(self.inner.call(Observed { req, span }))
    }
}

/// The request target as the caller sent it (path and query).
pub fn target<B>(req: &Request<B>) -> &str {
    req.uri().path_and_query().map_or("/", |pq| pq.as_str())
}
