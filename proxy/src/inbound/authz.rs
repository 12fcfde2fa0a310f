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
use meshgate_ca::SpiffeId;
use meshgate_policy::judge::{HttpRequest, Refusal};
use meshgate_policy::record::Layer as DecisionLayer;
use meshgate_policy::{AuthzRequest, DecisionKind, DecisionRecord, PolicySnapshot, judge};
use opentelemetry::KeyValue;
use opentelemetry::trace::TraceContextExt;
use tower::{Layer, Service};

use super::error::InboundError;
use super::normalize::{AllowedUpgrade, TargetApp, target};
use super::observe::Observed;
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
    /// The peer `id` at `addr` (certificate valid until `not_after`): its ID and identity
    /// headers from `known` (shared with the peer's other connections).
    pub fn new(
        known: &KnownPeers,
        id: SpiffeId,
        addr: std::net::SocketAddr,
        not_after: time::OffsetDateTime,
    ) -> Self {
        let PeerParts {
            id,
            peer_header,
            xfcc_header,
        } = known.parts(id);
        Self {
            addr_text: addr.to_string(),
            peer_header,
            xfcc_header,
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

/// What the connections of one peer identity share: the ID and the identity headers the app
/// receives, made once per identity instead of once per connection. An idle mesh holds
/// thousands of connections from a few identities, and each held its own copies: ≈ 200 bytes
/// of every open connection (BENCHMARKS.md, "seventeenth session"). Cloning them takes no
/// allocation (`Arc<str>`, and header values backed by shared `Bytes`).
#[derive(Clone)]
struct PeerParts {
    id: SpiffeId,
    peer_header: Option<HeaderValue>,
    xfcc_header: Option<HeaderValue>,
}

/// Peer identities remembered at most. At the cap the memory starts afresh (connections keep
/// what they were given): a mesh has far fewer service accounts than this, and forgetting
/// costs only making the parts again.
pub const KNOWN_PEERS: usize = 4096;

/// The inbound listener's memory of [`PeerParts`], by peer ID, for calls to `local`.
pub struct KnownPeers {
    local: SpiffeId,
    parts: std::sync::Mutex<std::collections::HashMap<SpiffeId, PeerParts>>,
}

impl KnownPeers {
    /// Parts for peers calling the workload `local`.
    pub fn new(local: SpiffeId) -> Self {
        Self {
            local,
            parts: Default::default(),
        }
    }

    /// The parts of `id`, made on its first connection (or after the memory started afresh).
    fn parts(&self, id: SpiffeId) -> PeerParts {
        let mut parts = self
            .parts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(known) = parts.get(&id) {
            return known.clone();
        }
        if parts.len() >= KNOWN_PEERS {
            parts.clear();
        }
        let made = PeerParts {
            peer_header: HeaderValue::from_str(id.as_str()).ok(),
            xfcc_header: HeaderValue::from_str(&format!("By={};URI={id}", self.local)).ok(),
            id: id.clone(),
        };
        parts.insert(id, made.clone());
        made
    }

    /// How many identities are remembered now.
    pub fn len(&self) -> usize {
        self.parts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
    /// The identity parts of the peers that connected (see [`KnownPeers`]).
    pub peers: KnownPeers,
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

/// An allowed request's response and the record of the decision that let it through, for
/// [`super::observe::Observe`] to write. Beside the response rather than in its extensions: the
/// record was the only extension of most responses, so every request paid for a map to carry
/// it (allocated, grown, searched, freed).
pub struct Authorized {
    pub response: Response<ProxyBody>,
    pub record: DecisionRecord,
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

impl<S> Service<Observed> for Authorize<S>
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
    type Response = Authorized;
    type Error = InboundError;
    type Future = BoxFuture<Result<Self::Response, InboundError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(|never| match never {})
    }

    fn call(&mut self, observed: Observed) -> Self::Future {
        let Observed { mut req, span } = observed;
        let ctx = &self.ctx;
        let peer = &self.peer;
        // This sidecar's own SVID has expired (the CA stayed unreachable past its lifetime).
        // TLS checked it only when the connection opened, so a connection from before the
        // expiry would otherwise go on being served by a workload with no valid identity (found
        // by `tests/it/chaos.rs`; new handshakes are refused in `tls::inbound_config`).
        if !ctx.identity.is_ready() {
            return Box::pin(std::future::ready(Err(InboundError::LocalIdentityExpired)));
        }
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
            .map(|t| t.as_str().to_owned());
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
            let Ok(response) = answered;
            Ok(Authorized { response, record })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn id(sa: &str) -> SpiffeId {
        SpiffeId::parse(&format!("spiffe://mesh.local/ns/shop/sa/{sa}")).unwrap()
    }

    fn header_ptr(v: &Option<HeaderValue>) -> *const u8 {
        v.as_ref()
            .expect("a SPIFFE ID is a valid header value")
            .as_bytes()
            .as_ptr()
    }

    /// Two connections of one peer hold the same ID and header bytes, not copies; another
    /// peer gets its own; every connection still has its own address and expiry.
    #[test]
    fn connections_of_one_peer_share_its_id_and_headers() {
        let known = KnownPeers::new(id("orders"));
        let at = |port| std::net::SocketAddr::from(([10, 0, 0, 1], port));
        let later = time::OffsetDateTime::now_utc() + time::Duration::hours(1);
        let first = PeerIdentity::new(&known, id("web"), at(1000), later);
        let second = PeerIdentity::new(&known, id("web"), at(1001), later + time::Duration::MINUTE);
        let other = PeerIdentity::new(&known, id("admin"), at(1002), later);

        assert_eq!(first.id, second.id);
        assert_eq!(first.id.as_str().as_ptr(), second.id.as_str().as_ptr());
        assert_eq!(
            header_ptr(&first.peer_header),
            header_ptr(&second.peer_header)
        );
        assert_eq!(
            header_ptr(&first.xfcc_header),
            header_ptr(&second.xfcc_header)
        );
        assert_eq!(
            first.xfcc_header.as_ref().unwrap(),
            "By=spiffe://mesh.local/ns/shop/sa/orders;URI=spiffe://mesh.local/ns/shop/sa/web"
        );
        assert_eq!(
            (first.addr_text.as_str(), second.addr_text.as_str()),
            ("10.0.0.1:1000", "10.0.0.1:1001")
        );
        assert!(second.not_after > first.not_after);

        assert_eq!(
            other.peer_header.as_ref().unwrap(),
            "spiffe://mesh.local/ns/shop/sa/admin"
        );
        assert_ne!(
            header_ptr(&first.peer_header),
            header_ptr(&other.peer_header)
        );
        assert_eq!(known.len(), 2);
    }

    /// The memory is bounded: at the cap it starts afresh, and what connections hold stays
    /// valid.
    #[test]
    fn known_peers_stay_within_their_cap() {
        let known = KnownPeers::new(id("orders"));
        let at = std::net::SocketAddr::from(([10, 0, 0, 1], 1000));
        let later = time::OffsetDateTime::now_utc() + time::Duration::hours(1);
        let first = PeerIdentity::new(&known, id("sa-0"), at, later);
        for n in 1..=KNOWN_PEERS {
            PeerIdentity::new(&known, id(&format!("sa-{n}")), at, later);
            assert!(known.len() <= KNOWN_PEERS);
        }
        assert_eq!(known.len(), 1, "the memory did not start afresh at its cap");
        assert_eq!(
            first.peer_header.as_ref().unwrap(),
            "spiffe://mesh.local/ns/shop/sa/sa-0"
        );
    }
}
