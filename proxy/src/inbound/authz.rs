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

use super::sanitize::{self, TrailerFilter, UpgradePolicy};
use crate::http_util::{
    ORIG_PROTO_HEADER, PEER_ID_HEADER, POLICY_VERSION_HEADER, ProxyBody, XFCC_HEADER,
    error_response,
};
use crate::metrics::{LatencyLabels, Metrics, RequestLabels};
use crate::telemetry::{DECISION_ATTRIBUTE, Telemetry};
use opentelemetry::KeyValue;
use opentelemetry::trace::{SpanKind, Status, TraceContextExt};

/// The verified identity of the peer on one connection.
#[derive(Debug, Clone)]
pub struct PeerIdentity {
    pub id: SpiffeId,
    pub addr: std::net::SocketAddr,
    /// When the peer's certificate expires. TLS checks validity only at the handshake; a pooled
    /// HTTP/2 connection can outlive the certificate, so every request re-checks it.
    pub not_after: time::OffsetDateTime,
}

/// One authorization decision, as published on the sidecar's decision feed (for `meshgate demo`,
/// and later `meshgate status`); the log line and the span carry the same facts.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DecisionEvent {
    pub workload: SpiffeId,
    pub peer: SpiffeId,
    pub method: String,
    pub path: String,
    /// `allow` | `deny` | `audit` | `dry-run-deny` | `bad-request`.
    pub decision: &'static str,
    pub policy: Option<String>,
    pub rule: Option<usize>,
    pub reason: String,
    pub trace_id: String,
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
    /// Spans of every request and decision.
    pub telemetry: Arc<Telemetry>,
    /// Decision feed; events are built only while someone subscribes.
    pub decisions: tokio::sync::broadcast::Sender<DecisionEvent>,
    /// Bumped at every policy swap: upgraded connections re-judge their request then.
    pub swaps: tokio::sync::watch::Receiver<u64>,
    /// Which `Upgrade` protocols may reach the app.
    pub upgrades: UpgradePolicy,
    /// This workload's identity: requests are served only while its SVID is valid.
    pub identity: Arc<crate::identity::Identity>,
}

/// Set by the outbound sidecar's `x-meshgate-orig-proto`: the caller spoke HTTP/1.1, so the app
/// gets HTTP/1.1 again (read before the reserved headers are stripped).
#[derive(Debug, Clone, Copy)]
pub struct CarriedHttp1;

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
    S: Service<
            Request<TrailerFilter>,
            Response = Response<ProxyBody>,
            Error = std::convert::Infallible,
        > + Clone
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

        // The server span covers the whole request; its parent is the caller's trace context.
        let parent = ctx.telemetry.extract(req.headers());
        let inbound = ctx.telemetry.span(
            "meshgate.inbound",
            SpanKind::Server,
            &parent,
            vec![
                KeyValue::new("http.request.method", method.clone()),
                KeyValue::new("url.scheme", "https"),
                KeyValue::new("network.protocol.version", protocol_version(req.version())),
                KeyValue::new("client.address", peer.addr.ip().to_string()),
                KeyValue::new("client.port", i64::from(peer.addr.port())),
                KeyValue::new("meshgate.peer.id", peer.id.to_string()),
                KeyValue::new("meshgate.workload.id", ctx.local_id.to_string()),
            ],
        );
        let trace_id = Telemetry::trace_id(&inbound);
        // This sidecar's own SVID has expired (the CA stayed unreachable past its lifetime).
        // TLS checked it only when the connection opened, so a connection from before the
        // expiry would otherwise go on being served by a workload with no valid identity (found
        // by `tests/chaos.rs`; new handshakes are refused in `tls::inbound_config`). 503, not
        // 403: the caller is not at fault and may try another endpoint.
        if !ctx.identity.is_ready() {
            tracing::warn!(
                event = "authz.local_svid_expired",
                meshgate.workload.id = %ctx.local_id,
                peer.id = %peer.id,
                http.request.method = %method,
                meshgate.path.original = %original,
                trace_id = (!trace_id.is_empty()).then_some(trace_id.as_str()),
                "request refused: this sidecar's SVID has expired"
            );
            record(&ctx.metrics, "error", "", started);
            let span = inbound.span();
            span.set_attribute(KeyValue::new("http.response.status_code", 503));
            span.set_status(Status::error("this sidecar's SVID has expired"));
            span.end();
            let resp = error_response(
                req.headers(),
                StatusCode::SERVICE_UNAVAILABLE,
                "meshgate: this sidecar's SVID has expired\n",
            );
            return Box::pin(async { Ok(resp) });
        }
        let bad_request = |reason: String, label: &'static str, body: &'static str| {
            // A decision like any other (refused before the policy): logged at the level of
            // `authz.decision`.
            tracing::info!(
                event = "authz.bad_request",
                meshgate.workload.id = %ctx.local_id,
                peer.id = %peer.id,
                http.request.method = %method,
                meshgate.path.original = %original,
                reason = %reason,
                trace_id = (!trace_id.is_empty()).then_some(trace_id.as_str()),
                "request refused before authorization"
            );
            sanitize::count(&ctx.metrics, label, 1);
            record(&ctx.metrics, "bad-request", "", started);
            publish(
                &ctx,
                &peer,
                &method,
                &original,
                "bad-request",
                None,
                None,
                reason.clone(),
                &trace_id,
            );
            let span = inbound.span();
            span.set_attribute(KeyValue::new("meshgate.path.original", original.clone()));
            span.set_attribute(KeyValue::new("http.response.status_code", 400));
            span.set_attribute(KeyValue::new(DECISION_ATTRIBUTE, "deny"));
            span.set_status(Status::error(format!("bad request: {reason}")));
            span.end();
            let resp = error_response(req.headers(), StatusCode::BAD_REQUEST, body);
            Box::pin(async { Ok(resp) }) as Self::Future
        };

        if let Err(refusal) = sanitize::check(&req) {
            return bad_request(refusal.to_string(), refusal.label(), "bad request\n");
        }
        let normalized = match normalize_path(&original) {
            Ok(n) => n,
            Err(e) => return bad_request(e.to_string(), "bad_path", "bad request path\n"),
        };
        // Before the policy sees the headers and before the identity headers go in: nothing the
        // caller sends may remove or shadow them (see `sanitize`).
        let carried_http1 = req.headers_mut().remove(ORIG_PROTO_HEADER).is_some();
        let asked = crate::http_util::requested_upgrade(&req);
        let prepared = sanitize::prepare(req.headers_mut(), asked, &ctx.upgrades);
        if prepared.stripped > 0 {
            tracing::warn!(
                event = "authz.forged_identity_header",
                meshgate.workload.id = %ctx.local_id,
                peer.id = %peer.id,
                removed = prepared.stripped,
                trace_id = (!trace_id.is_empty()).then_some(trace_id.as_str()),
                "caller sent headers an app could read as the sidecar's identity headers; removed"
            );
            sanitize::count(&ctx.metrics, "identity_header", prepared.stripped as u64);
        }
        if let Some(refused) = &prepared.refused_upgrade {
            tracing::warn!(
                event = "authz.upgrade_refused",
                meshgate.workload.id = %ctx.local_id,
                peer.id = %peer.id,
                upgrade = ?refused,
                allowed = ?ctx.upgrades.allowed(),
                trace_id = (!trace_id.is_empty()).then_some(trace_id.as_str()),
                "Upgrade to a protocol that is not allowed was removed; the request goes on without it (allow it with --allow-upgrade)"
            );
            sanitize::count(&ctx.metrics, "upgrade_refused", 1);
        }
        if normalized.changed {
            let pq = match &normalized.query {
                Some(q) => format!("{}?{q}", normalized.path),
                None => normalized.path.clone(),
            };
            let mut parts = req.uri().clone().into_parts();
            parts.path_and_query = Some(pq.parse().expect("a normalized path is a valid URI path"));
            *req.uri_mut() = Uri::from_parts(parts).expect("valid URI parts");
        }
        inbound
            .span()
            .set_attribute(KeyValue::new("url.path", normalized.path.clone()));
        if let Some(q) = &normalized.query {
            inbound
                .span()
                .set_attribute(KeyValue::new("url.query", q.clone()));
        }

        let snapshot = ctx.policy.load();
        let mut decision = snapshot.evaluate(&AuthzRequest {
            peer: &peer.id,
            method: Some(&method),
            path: Some(&normalized.path),
            port: ctx.app_port,
            headers: Some(req.headers()),
        });
        if time::OffsetDateTime::now_utc() >= peer.not_after {
            // The identity this connection proved has expired: the policy cannot vouch for it.
            decision.kind = meshgate_xds::DecisionKind::Deny;
            decision.allowed = false;
            decision.policy = None;
            decision.rule = None;
            decision.reason = format!(
                "peer certificate expired at {} (connection outlived it); the peer must reconnect with a fresh SVID",
                meshgate_ca::cert::rfc3339(peer.not_after)
            );
        }
        let policy = decision.policy.clone().unwrap_or_default();
        let authz = decision_span(
            &ctx,
            &inbound,
            &peer,
            &method,
            &original,
            &normalized,
            &decision,
        );
        drop(authz);
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
            trace_id = (!trace_id.is_empty()).then_some(trace_id.as_str()),
        );
        inbound
            .span()
            .set_attribute(KeyValue::new(DECISION_ATTRIBUTE, decision.kind.as_str()));
        publish(
            &ctx,
            &peer,
            &method,
            &normalized.path,
            decision.kind.as_str(),
            decision.policy.clone(),
            decision.rule,
            decision.reason.clone(),
            &trace_id,
        );
        if !decision.allowed {
            record(&ctx.metrics, decision.kind.as_str(), &policy, started);
            inbound
                .span()
                .set_attribute(KeyValue::new("http.response.status_code", 403));
            inbound.span().end();
            let resp = error_response(req.headers(), StatusCode::FORBIDDEN, "forbidden\n");
            return Box::pin(async { Ok(resp) });
        }

        let reauthorize = prepared.upgrade.is_some().then(|| Reauthorize {
            policy: ctx.policy.clone(),
            swaps: ctx.swaps.clone(),
            metrics: ctx.metrics.clone(),
            local_id: ctx.local_id.clone(),
            peer: peer.clone(),
            method: method.clone(),
            path: normalized.path.clone(),
            port: ctx.app_port,
            headers: req.headers().clone(),
        });
        let headers = req.headers_mut();
        if let Ok(v) = HeaderValue::from_str(peer.id.as_str()) {
            headers.insert(PEER_ID_HEADER, v);
        }
        if let Ok(v) = HeaderValue::from_str(&format!("By={};URI={}", ctx.local_id, peer.id)) {
            headers.insert(XFCC_HEADER, v);
        }
        if let Ok(v) = HeaderValue::from_str(&decision.version) {
            headers.insert(POLICY_VERSION_HEADER, v);
        }
        // The app continues the trace from this sidecar's server span.
        ctx.telemetry.inject(&inbound, headers);
        let (parts, body) = req.into_parts();
        let mut req = Request::from_parts(parts, TrailerFilter::new(body, ctx.metrics.clone()));
        if carried_http1 {
            req.extensions_mut().insert(CarriedHttp1);
        }
        if let Some(reauthorize) = reauthorize {
            req.extensions_mut().insert(reauthorize);
        }
        let mut inner = self.inner.clone();
        let kind = decision.kind.as_str();
        Box::pin(async move {
            let resp = inner.call(req).await;
            record(&ctx.metrics, kind, &policy, started);
            if let Ok(resp) = &resp {
                let status = resp.status();
                inbound.span().set_attribute(KeyValue::new(
                    "http.response.status_code",
                    i64::from(status.as_u16()),
                ));
                if status.is_server_error() {
                    inbound.span().set_status(Status::error(status.to_string()));
                }
            }
            inbound.span().end();
            resp
        })
    }
}

/// Re-judges an upgraded connection (WebSocket, …) for as long as it is open. TLS and the
/// per-request decision cover only the request that asked for the upgrade; after the `101` the
/// bytes flow unjudged, so the connection is closed when the original request would now be
/// denied (a policy swap, e.g. `meshgate quarantine` of the caller) or when the certificate that
/// authorized it expires — as L4 tunnels are.
#[derive(Clone)]
pub struct Reauthorize {
    policy: Arc<ArcSwap<PolicySnapshot>>,
    swaps: tokio::sync::watch::Receiver<u64>,
    metrics: Arc<Metrics>,
    local_id: SpiffeId,
    peer: Arc<PeerIdentity>,
    method: String,
    path: String,
    port: u16,
    headers: http::HeaderMap,
}

impl Reauthorize {
    /// Resolves when the upgraded connection must close (logged and counted here).
    pub async fn revoked(mut self) {
        self.swaps.borrow_and_update();
        let remaining =
            (self.peer.not_after - time::OffsetDateTime::now_utc()).max(time::Duration::ZERO);
        let expiry =
            tokio::time::sleep(std::time::Duration::try_from(remaining).unwrap_or_default());
        tokio::pin!(expiry);
        let reason = loop {
            tokio::select! {
                _ = &mut expiry => break "peer certificate expired".to_string(),
                changed = self.swaps.changed() => {
                    if changed.is_err() {
                        // No more swaps can come: only expiry can end it now.
                        (&mut expiry).await;
                        break "peer certificate expired".to_string();
                    }
                    let decision = self.policy.load().evaluate(&AuthzRequest {
                        peer: &self.peer.id,
                        method: Some(&self.method),
                        path: Some(&self.path),
                        port: self.port,
                        headers: Some(&self.headers),
                    });
                    if !decision.allowed {
                        break format!("policy {} denies it: {}", decision.version, decision.reason);
                    }
                }
            }
        };
        tracing::warn!(
            event = "upgrade.revoked",
            meshgate.workload.id = %self.local_id,
            peer.id = %self.peer.id,
            http.request.method = %self.method,
            url.path = %self.path,
            reason = %reason,
            "closing the upgraded connection"
        );
        sanitize::count(&self.metrics, "upgrade_revoked", 1);
    }
}

#[allow(clippy::too_many_arguments)]
fn publish(
    ctx: &AuthzContext,
    peer: &PeerIdentity,
    method: &str,
    path: &str,
    decision: &'static str,
    policy: Option<String>,
    rule: Option<usize>,
    reason: String,
    trace_id: &str,
) {
    if ctx.decisions.receiver_count() == 0 {
        return;
    }
    let _ = ctx.decisions.send(DecisionEvent {
        workload: ctx.local_id.clone(),
        peer: peer.id.clone(),
        method: method.to_string(),
        path: path.to_string(),
        decision,
        policy,
        rule,
        reason,
        trace_id: trace_id.to_string(),
    });
}

/// `1.1` / `2` as OpenTelemetry's `network.protocol.version` wants it.
fn protocol_version(version: http::Version) -> &'static str {
    match version {
        http::Version::HTTP_2 => "2",
        http::Version::HTTP_10 => "1.0",
        _ => "1.1",
    }
}

/// Records the decision as a `meshgate.authz` child span (ended at once: deciding is all it
/// covers). Denials mark the span as an error with the reason.
fn decision_span(
    ctx: &AuthzContext,
    parent: &opentelemetry::Context,
    peer: &PeerIdentity,
    method: &str,
    original: &str,
    normalized: &meshgate_xds::NormalizedPath,
    decision: &meshgate_xds::Decision,
) -> opentelemetry::Context {
    let mut attributes = vec![
        KeyValue::new("meshgate.peer.id", peer.id.to_string()),
        KeyValue::new("http.request.method", method.to_string()),
        KeyValue::new("url.path", normalized.path.clone()),
        KeyValue::new(DECISION_ATTRIBUTE, decision.kind.as_str()),
        KeyValue::new(
            "meshgate.policy.name",
            decision.policy.clone().unwrap_or_default(),
        ),
        KeyValue::new("meshgate.policy.version", decision.version.to_string()),
        KeyValue::new("meshgate.workload.id", ctx.local_id.to_string()),
        KeyValue::new("meshgate.decision.reason", decision.reason.clone()),
    ];
    if normalized.changed {
        attributes.push(KeyValue::new(
            "meshgate.path.original",
            original.to_string(),
        ));
    }
    if let Some(rule) = decision.rule {
        attributes.push(KeyValue::new("meshgate.policy.rule", rule as i64));
    }
    if let Some(audit) = &decision.audit_policy {
        attributes.push(KeyValue::new("meshgate.audit.policy", audit.clone()));
    }
    if let Some(dry_run) = &decision.dry_run_policy {
        attributes.push(KeyValue::new("meshgate.dry_run.policy", dry_run.clone()));
    }
    let span_cx = ctx
        .telemetry
        .span("meshgate.authz", SpanKind::Internal, parent, attributes);
    if !decision.allowed {
        span_cx
            .span()
            .set_status(Status::error(decision.reason.clone()));
    }
    span_cx.span().end();
    span_cx
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
