//! The authorization layer of the inbound path.
//!
//! Enforced lazily per request, reading the `PolicySnapshot` current at that moment from an
//! `ArcSwap`: a policy swap never takes a lock, never pauses traffic and never drops a
//! connection, and the next request on an existing connection is judged by the new policy.
//! The path is normalized once, here; the normalized path is both what is judged and what is
//! forwarded, so the app and the policy always see the same path.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use arc_swap::ArcSwap;
use http::{HeaderValue, Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use meshgate_ca::SpiffeId;
use meshgate_xds::{AuthzRequest, PolicySnapshot, normalize_path};
use tower::{Layer, Service};

use crate::http_util::{
    PEER_ID_HEADER, POLICY_VERSION_HEADER, ProxyBody, XFCC_HEADER, error_response,
};
use crate::metrics::{LatencyLabels, Metrics, RequestLabels};

/// The verified identity of the peer on one connection.
#[derive(Debug, Clone)]
pub struct PeerIdentity {
    pub id: SpiffeId,
    pub addr: std::net::SocketAddr,
}

/// What every connection's authorization layer shares.
#[derive(Clone)]
pub struct AuthzContext {
    pub policy: Arc<ArcSwap<PolicySnapshot>>,
    pub metrics: Arc<Metrics>,
    /// This workload's ID (for the XFCC `By=` field).
    pub local_id: SpiffeId,
    /// The app's port, judged against `ports` in rules.
    pub app_port: u16,
}

/// Adds [`Authorize`] for one connection's peer.
pub struct AuthorizeLayer {
    ctx: AuthzContext,
    peer: Arc<PeerIdentity>,
}

impl AuthorizeLayer {
    pub fn new(ctx: AuthzContext, peer: Arc<PeerIdentity>) -> Self {
        Self { ctx, peer }
    }
}

impl<S> Layer<S> for AuthorizeLayer {
    type Service = Authorize<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Authorize {
            inner,
            ctx: self.ctx.clone(),
            peer: self.peer.clone(),
        }
    }
}

/// Judges each request; passes allowed ones to `inner` with the caller's identity attached.
#[derive(Clone)]
pub struct Authorize<S> {
    inner: S,
    ctx: AuthzContext,
    peer: Arc<PeerIdentity>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S> Service<Request<Incoming>> for Authorize<S>
where
    S: Service<Request<Incoming>, Response = Response<ProxyBody>, Error = std::convert::Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    type Response = Response<ProxyBody>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Incoming>) -> Self::Future {
        let started = Instant::now();
        let ctx = self.ctx.clone();
        let peer = self.peer.clone();
        let original = req
            .uri()
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .to_string();
        let method = req.method().as_str().to_string();

        let normalized = match normalize_path(&original) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(
                    event = "authz.bad_path",
                    peer.id = %peer.id,
                    http.request.method = %method,
                    meshgate.path.original = %original,
                    reason = %e,
                    "request path cannot be normalized safely"
                );
                record(&ctx.metrics, "bad-request", "", started);
                let resp = error_response(
                    req.headers(),
                    StatusCode::BAD_REQUEST,
                    "bad request path
",
                );
                return Box::pin(async { Ok(resp) });
            }
        };
        if normalized.changed {
            let pq = match &normalized.query {
                Some(q) => format!("{}?{q}", normalized.path),
                None => normalized.path.clone(),
            };
            let mut parts = req.uri().clone().into_parts();
            parts.path_and_query = Some(pq.parse().expect("a normalized path is a valid URI path"));
            *req.uri_mut() = Uri::from_parts(parts).expect("valid URI parts");
        }

        let snapshot = ctx.policy.load();
        let decision = snapshot.evaluate(&AuthzRequest {
            peer: &peer.id,
            method: Some(&method),
            path: Some(&normalized.path),
            port: ctx.app_port,
            headers: Some(req.headers()),
        });
        let policy = decision.policy.clone().unwrap_or_default();
        tracing::info!(
            event = "authz.decision",
            meshgate.workload.id = %ctx.local_id,
            peer.id = %peer.id,
            peer.addr = %peer.addr,
            http.request.method = %method,
            url.path = %normalized.path,
            meshgate.path.original = normalized.changed.then_some(original.as_str()),
            decision = decision.kind.as_str(),
            policy = %policy,
            rule = decision.rule,
            policy.version = %decision.version,
            reason = %decision.reason,
            audit_policy = decision.audit_policy.as_deref(),
            dry_run_policy = decision.dry_run_policy.as_deref(),
        );
        if !decision.allowed {
            record(&ctx.metrics, decision.kind.as_str(), &policy, started);
            let resp = error_response(req.headers(), StatusCode::FORBIDDEN, "forbidden\n");
            return Box::pin(async { Ok(resp) });
        }

        let headers = req.headers_mut();
        headers.remove(PEER_ID_HEADER);
        headers.remove(XFCC_HEADER);
        headers.remove(POLICY_VERSION_HEADER);
        if let Ok(v) = HeaderValue::from_str(peer.id.as_str()) {
            headers.insert(PEER_ID_HEADER, v);
        }
        if let Ok(v) = HeaderValue::from_str(&format!("By={};URI={}", ctx.local_id, peer.id)) {
            headers.insert(XFCC_HEADER, v);
        }
        if let Ok(v) = HeaderValue::from_str(&decision.version) {
            headers.insert(POLICY_VERSION_HEADER, v);
        }
        let mut inner = self.inner.clone();
        let kind = decision.kind.as_str();
        Box::pin(async move {
            let resp = inner.call(req).await;
            record(&ctx.metrics, kind, &policy, started);
            resp
        })
    }
}

fn record(metrics: &Metrics, decision: &'static str, policy: &str, started: Instant) {
    metrics
        .requests
        .get_or_create(&RequestLabels {
            direction: "inbound",
            decision,
            policy: policy.to_string(),
        })
        .inc();
    metrics
        .request_duration
        .get_or_create(&LatencyLabels {
            direction: "inbound",
            decision,
        })
        .observe(started.elapsed().as_secs_f64());
}
