//! The authorization layer of the inbound path: normalize → **authorize** → forward.
//!
//! Enforced lazily per request, reading the `PolicySnapshot` current at that moment from an
//! `ArcSwap`: a policy swap never takes a lock, never pauses traffic and never drops a
//! connection, and the next request on an existing connection is judged by the new policy.
//! Requests are judged by [`meshgate_policy::judge()`] — method check, path normalization,
//! evaluation — exactly as `meshgate policy explain` judges them; the normalized path is both
//! what is judged and what is forwarded, so the app and the policy always see the same path.
//! Allowed requests go on with the caller's identity attached; every decision travels outwards
//! as a [`DecisionRecord`] for [`super::observe::Observe`] to write.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use futures_util::FutureExt;
use http::{HeaderValue, Request, Response, Uri};
use hyper::body::Incoming;
use meshgate_ca::SpiffeId;
use meshgate_policy::judge::{HttpRequest, Refusal};
use meshgate_policy::record::Layer as DecisionLayer;
use meshgate_policy::{AuthzRequest, DecisionKind, DecisionRecord, PolicySnapshot, judge};
use opentelemetry::KeyValue;
use opentelemetry::trace::TraceContextExt;
use tower::{Layer, Service};

use super::error::InboundError;
use super::normalize::{AllowedUpgrade, TargetApp, target};
use super::observe::RequestSpan;
use super::sanitize::{TrailerFilter, UpgradePolicy};
use crate::decision::DecisionSink;
use crate::http_util::{PEER_ID_HEADER, POLICY_VERSION_HEADER, ProxyBody, XFCC_HEADER};
use crate::metrics::Metrics;

/// The verified identity of the peer on one connection.
#[derive(Debug, Clone)]
pub struct PeerIdentity {
    pub id: SpiffeId,
    pub addr: std::net::SocketAddr,
    /// When the peer's certificate expires. TLS checks validity only at the handshake; a pooled
    /// HTTP/2 connection can outlive the certificate, so every request re-checks it.
    pub not_after: time::OffsetDateTime,
    /// What every request of the connection repeats, made once per connection rather than
    /// formatted per request (`addr` as text for the decision record; the identity headers
    /// for the app; `None` when an ID is not a valid header value, which a SPIFFE ID always is).
    pub addr_text: String,
    peer_header: Option<HeaderValue>,
    xfcc_header: Option<HeaderValue>,
    /// `not_after` as the system clock reads it: compared with `SystemTime::now()` on every
    /// request, which costs a fraction of building an `OffsetDateTime` for now.
    expires: std::time::SystemTime,
}

impl PeerIdentity {
    /// The peer `id` at `addr` (certificate valid until `not_after`), calling `local`.
    pub fn new(
        id: SpiffeId,
        addr: std::net::SocketAddr,
        not_after: time::OffsetDateTime,
        local: &SpiffeId,
    ) -> Self {
        Self {
            addr_text: addr.to_string(),
            peer_header: HeaderValue::from_str(id.as_str()).ok(),
            xfcc_header: HeaderValue::from_str(&format!("By={local};URI={id}")).ok(),
            id,
            addr,
            expires: not_after.into(),
            not_after,
        }
    }

    /// True once the peer's certificate has expired.
    pub fn expired(&self) -> bool {
        std::time::SystemTime::now() >= self.expires
    }
}

/// What every connection's inbound layers share.
pub struct AuthzContext {
    pub policy: Arc<ArcSwap<PolicySnapshot>>,
    pub metrics: Arc<Metrics>,
    /// This workload's ID (for the XFCC `By=` field and every decision).
    pub local_id: SpiffeId,
    /// The app ports (`--app`), the default one first. A request is judged against `ports` in
    /// rules with the port of the app it is for.
    pub app_ports: Box<[u16]>,
    /// Where decisions are written (log, spans, metrics, decision feed).
    pub sink: DecisionSink,
    /// Bumped at every policy swap: upgraded connections re-judge their request then.
    pub swaps: tokio::sync::watch::Receiver<u64>,
    /// Which `Upgrade` protocols may reach the app.
    pub upgrades: UpgradePolicy,
    /// This workload's identity: requests are served only while its SVID is valid.
    pub identity: Arc<crate::identity::Identity>,
}

impl AuthzContext {
    /// The default app's port (requests that name no app port).
    pub fn default_port(&self) -> u16 {
        // 0 for an outbound-only sidecar (no app): such requests are refused before authz.
        self.app_ports.first().copied().unwrap_or(0)
    }
}

/// Adds [`Authorize`] for one connection's peer.
pub struct AuthorizeLayer {
    ctx: Arc<AuthzContext>,
    peer: Arc<PeerIdentity>,
}

impl AuthorizeLayer {
    pub fn new(ctx: Arc<AuthzContext>, peer: Arc<PeerIdentity>) -> Self {
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

/// Judges each request; passes allowed ones to `inner` (the forwarder) with the caller's
/// identity attached.
#[derive(Clone)]
pub struct Authorize<S> {
    inner: S,
    ctx: Arc<AuthzContext>,
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
    type Error = InboundError;
    type Future = BoxFuture<Result<Self::Response, InboundError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(|never| match never {})
    }

    fn call(&mut self, mut req: Request<Incoming>) -> Self::Future {
        let ctx = &self.ctx;
        let peer = &self.peer;
        // This sidecar's own SVID has expired (the CA stayed unreachable past its lifetime).
        // TLS checked it only when the connection opened, so a connection from before the
        // expiry would otherwise go on being served by a workload with no valid identity (found
        // by `tests/it/chaos.rs`; new handshakes are refused in `tls::inbound_config`).
        if !ctx.identity.is_ready() {
            return Box::pin(std::future::ready(Err(InboundError::LocalIdentityExpired)));
        }
        let span = req.extensions_mut().remove::<RequestSpan>();
        let port = req
            .extensions()
            .get::<TargetApp>()
            .map_or_else(|| ctx.default_port(), |t| t.port);
        let snapshot = ctx.policy.load();
        // Judged on borrowed text: the method and the target as sent are copied only into the
        // record that keeps them (the target only when it differs from the normalized path).
        let judged = judge(
            &snapshot,
            &peer.id,
            port,
            Some(HttpRequest {
                method: req.method().as_str(),
                target: target(&req),
                headers: req.headers(),
            }),
        );
        let version_header = snapshot.version_header().cloned();
        drop(snapshot);
        let mut decision = judged.decision;
        if let Some(refusal) = &judged.refusal {
            ctx.metrics.count_hygiene(refusal.label(), 1);
        } else if peer.expired() {
            // The identity this connection proved has expired: the policy cannot vouch for it.
            decision.kind = DecisionKind::Deny;
            decision.allowed = false;
            decision.policy = None;
            decision.rule = None;
            decision.reason = format!(
                "peer certificate expired at {} (connection outlived it); the peer must reconnect with a fresh SVID",
                meshgate_ca::cert::rfc3339(peer.not_after)
            );
        }
        let allowed = decision.allowed;
        let mut record = DecisionRecord::from_decision(
            DecisionLayer::L7,
            &ctx.local_id,
            &peer.id,
            port,
            decision,
        );
        record.peer_addr = Some(peer.addr_text.clone());
        record.method = Some(req.method().as_str().to_string());
        record.trace_id = span
            .as_ref()
            .and_then(|s| s.trace_id)
            .map(|t| t.to_string());
        let Some(normalized) = judged.normalized else {
            record.original = Some(target(&req).to_string());
            let body = match judged.refusal {
                Some(Refusal::Path(_)) => "bad request path\n",
                _ => "bad request\n",
            };
            return Box::pin(std::future::ready(Err(InboundError::BadRequest {
                record: Box::new(record),
                body,
            })));
        };
        if normalized.changed {
            record.original = Some(target(&req).to_string());
        }
        if !allowed {
            record.path = Some(normalized.path);
            return Box::pin(std::future::ready(Err(InboundError::Forbidden(Box::new(
                record,
            )))));
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
        let reauthorize = req
            .extensions_mut()
            .remove::<AllowedUpgrade>()
            .map(|_| Reauthorize {
                policy: ctx.policy.clone(),
                swaps: ctx.swaps.clone(),
                metrics: ctx.metrics.clone(),
                local_id: ctx.local_id.clone(),
                peer: peer.clone(),
                method: req.method().as_str().to_string(),
                path: normalized.path.clone(),
                port,
                headers: req.headers().clone(),
            });
        record.path = Some(normalized.path);
        let headers = req.headers_mut();
        if let Some(v) = &peer.peer_header {
            headers.insert(PEER_ID_HEADER, v.clone());
        }
        if let Some(v) = &peer.xfcc_header {
            headers.insert(XFCC_HEADER, v.clone());
        }
        if let Some(v) = version_header {
            headers.insert(POLICY_VERSION_HEADER, v);
        }
        if let Some(span) = &span {
            if let Some(q) = &normalized.query {
                span.cx
                    .span()
                    .set_attribute(KeyValue::new("url.query", q.clone()));
            }
            // The app continues the trace from this sidecar's server span (or, when that is
            // recorded nowhere, from the caller's, whose headers are already there).
            if !span.caller_context_goes_on {
                ctx.sink.telemetry().inject(&span.cx, headers);
            }
        }
        let (parts, body) = req.into_parts();
        let mut req = Request::from_parts(parts, TrailerFilter::new(body, ctx.metrics.clone()));
        if let Some(reauthorize) = reauthorize {
            req.extensions_mut().insert(reauthorize);
        }
        // Called here rather than in an `async` block, which needed a clone of the forwarder per
        // request and held the request beside the call's future.
        Box::pin(self.inner.call(req).map(move |answered| {
            let Ok(mut resp) = answered;
            resp.extensions_mut().insert(record);
            Ok(resp)
        }))
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
        self.metrics.count_hygiene("upgrade_revoked", 1);
    }
}
