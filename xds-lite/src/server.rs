//! The control-plane server: serves each connected sidecar the scoped, versioned snapshot over one
//! long-lived HTTP/2 stream (mTLS, the sidecar's SVID is its name), and records what each sidecar
//! acknowledged, for `meshgate status`.
//!
//! State of the world: every push carries everything the workload needs at the current version.
//! A new version is pushed to every stream as soon as it is published; a NACKed version is never
//! re-sent (only a newer one is), and the NACK is kept for status. A stream ends when the peer's
//! certificate expires, so a sidecar reconnects with its fresh SVID.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use meshgate_ca::limits::ConnectionCap;
use meshgate_ca::{SpiffeId, TrustDomain, cert};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;

use crate::flows::FlowStore;
use crate::tap::{RateLimit, TapHub};
use crate::wire::{
    ClientMessage, DEFAULT_TAP_RATE, FEATURE_FLOW_LATENCY, FEATURE_FLOW_REPORTS, FEATURE_TAP,
    FEATURES_HEADER, Flow, KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT, LineBuffer, MAX_ACK_BYTES,
    MAX_NACK_ERROR_CHARS, MAX_PUSH_BYTES, Push, STREAM_PATH, sanitize_peer_text,
};
use meshgate_policy::PolicySet;
use meshgate_policy::scope::scope;

/// Flow-report lines one stream may send per second; more are dropped and counted. A sidecar at
/// its cap (4096 flows, about 30 lines) reporting every 100 ms (the shortest interval) sends
/// about 300.
const MAX_REPORT_LINES_PER_SECOND: u32 = 512;

/// A client that has not finished its TLS handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the control plane knows about one sidecar stream.
#[derive(Debug, Clone, Serialize)]
pub struct SidecarStatus {
    pub id: SpiffeId,
    pub addr: String,
    pub connected: bool,
    /// Unix seconds.
    pub connected_at: i64,
    pub last_seen: i64,
    pub sent_version: Option<String>,
    pub acked_version: Option<String>,
    pub last_nack: Option<String>,
    /// Unix seconds of the last ACK or NACK; `None` while the stream has never answered a push.
    ///
    /// A stream that never answers is not a sidecar doing its job: a real sidecar ACKs each push
    /// as soon as it is applied, and denies everything until its first policy is applied. So
    /// `meshgate quarantine` and `meshgate status` judge containment on streams that have
    /// answered and list the others as "not acknowledging" instead of waiting on them; any
    /// workload with an SVID can open such a stream.
    pub last_ack_at: Option<i64>,
    /// Unix seconds when the SVID this stream was opened with expires. Sidecars reopen their
    /// stream with each renewed SVID, so on a connected stream this is the sidecar's current
    /// SVID; `meshgate check` warns when a renewal is overdue.
    pub svid_not_after: i64,
    /// Why the latest version was not sent to this sidecar (too large), if it was not.
    pub push_refused: Option<String>,
    /// The sidecar advertised the live tap (it is sent tap requests while one runs).
    pub tap: bool,
}

/// The answer of the status endpoint.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct StatusReport {
    /// The version being served (`None` before the first valid load).
    pub version: Option<String>,
    /// Reasons the latest update was refused (`file:line: reason`), if it was.
    pub last_rejected: Option<String>,
    pub sidecars: Vec<serde_json::Value>,
    /// Connections closed at accept because a cap was reached (see [`MAX_STREAMS`]).
    #[serde(default)]
    pub refused_connections: u64,
}

/// Sidecar connections one control plane holds at most: 10 000 (one long-lived stream per
/// sidecar). Beyond it new connections are closed at accept, before any TLS work, and counted.
pub const MAX_STREAMS: usize = 10_000;
/// Connections from one source address: 1 024 (a node's pods share no address in Kubernetes;
/// behind NAT a node's sidecars do).
pub const MAX_STREAMS_PER_SOURCE: usize = 1_024;

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// The control plane's shared state.
pub struct ControlPlane {
    trust_domain: TrustDomain,
    current: watch::Sender<Option<Arc<PolicySet>>>,
    rejected: Mutex<Option<String>>,
    sidecars: Mutex<BTreeMap<u64, SidecarStatus>>,
    next_stream: AtomicU64,
    /// Caps on open connections (a flood of half-open connections cannot exhaust the process).
    cap: ConnectionCap,
    refused: AtomicU64,
    /// Flows reported by sidecars, and the counters fed by reports (the `meshgate_sli_*`).
    flows: Mutex<FlowStore>,
    /// Policy-directory updates refused (invalid), and pushes sidecars NACKed.
    rejected_updates: AtomicU64,
    nacks: AtomicU64,
    containment: Mutex<Containment>,
    /// The live tap: who watches, what sidecars are asked, the last events.
    tap: TapHub,
}

/// Time to containment, as the control plane can see it: from publishing a version that adds a
/// quarantine (a `meshgate quarantine` policy) to the moment every connected sidecar that
/// answers pushes has ACKed that version (or a later one). It starts at publication, so the
/// file write to the next directory poll (250 ms by default) is not in it.
#[derive(Debug, Default)]
struct Containment {
    /// The quarantine policies (`namespace/name`) of the version served.
    quarantines: std::collections::BTreeSet<String>,
    /// A quarantine published and not yet acknowledged everywhere: since when, at which version.
    pending: Option<(std::time::Instant, String)>,
    last_seconds: Option<f64>,
}

/// A policy written by `meshgate quarantine`: `meshgate/quarantine-<hash>`.
fn is_quarantine(p: &meshgate_policy::model::AuthorizationPolicy) -> bool {
    p.metadata.namespace == "meshgate" && p.metadata.name.starts_with("quarantine-")
}

impl ControlPlane {
    /// A control plane for sidecars of `trust_domain`; it serves nothing until [`publish`](Self::publish).
    pub fn new(trust_domain: TrustDomain) -> Arc<Self> {
        Self::with_caps(trust_domain, MAX_STREAMS, MAX_STREAMS_PER_SOURCE)
    }

    /// [`ControlPlane::new`] with other connection caps (total, per source address).
    pub fn with_caps(trust_domain: TrustDomain, total: usize, per_source: usize) -> Arc<Self> {
        Arc::new(Self {
            trust_domain,
            current: watch::channel(None).0,
            rejected: Mutex::new(None),
            sidecars: Mutex::new(BTreeMap::new()),
            next_stream: AtomicU64::new(1),
            cap: ConnectionCap::new(total, per_source),
            refused: AtomicU64::new(0),
            flows: Mutex::new(FlowStore::default()),
            rejected_updates: AtomicU64::new(0),
            nacks: AtomicU64::new(0),
            containment: Mutex::new(Containment::default()),
            tap: TapHub::default(),
        })
    }

    /// The policy set served now, if any (the console judges observed flows against it).
    pub fn policy_set(&self) -> Option<Arc<PolicySet>> {
        self.current.borrow().clone()
    }

    /// Serves `set` from now on (pushed to every stream at once when its version is new).
    pub fn publish(&self, set: PolicySet) {
        *self.rejected.lock().expect("lock") = None;
        let unchanged = self
            .current
            .borrow()
            .as_ref()
            .is_some_and(|c| c.version == set.version);
        if !unchanged {
            tracing::info!(event = "control_plane.published", version = %set.version, "new policy version served");
            let quarantines: std::collections::BTreeSet<String> = set
                .policies
                .iter()
                .filter(|p| is_quarantine(p))
                .map(|p| p.metadata.key())
                .collect();
            {
                let mut c = self.containment.lock().expect("lock");
                let added = quarantines.difference(&c.quarantines).next().is_some();
                if added {
                    c.pending = Some((std::time::Instant::now(), set.version.clone()));
                } else if let Some((_, version)) = &mut c.pending {
                    // A later version still carries the quarantine: wait for that one.
                    version.clone_from(&set.version);
                }
                c.quarantines = quarantines;
            }
            self.current.send_replace(Some(Arc::new(set)));
            self.check_containment();
        }
    }

    /// Ends a pending containment once every connected, answering stream has ACKed the version
    /// being served.
    fn check_containment(&self) {
        let mut c = self.containment.lock().expect("lock");
        let Some((since, version)) = &c.pending else {
            return;
        };
        let all = self
            .sidecars
            .lock()
            .expect("lock")
            .values()
            .filter(|s| s.connected && s.last_ack_at.is_some())
            .all(|s| s.acked_version.as_deref() == Some(version.as_str()));
        if all {
            let seconds = since.elapsed().as_secs_f64();
            tracing::info!(event = "control_plane.contained", version = %version, seconds, "every acknowledging sidecar enforces the quarantine");
            c.last_seconds = Some(seconds);
            c.pending = None;
        }
    }

    /// Records a refused update; the last good version keeps being served.
    pub fn reject(&self, reasons: String) {
        self.rejected_updates.fetch_add(1, Ordering::Relaxed);
        *self.rejected.lock().expect("lock") = Some(reasons);
    }

    /// The version served now.
    pub fn version(&self) -> Option<String> {
        self.current.borrow().as_ref().map(|s| s.version.clone())
    }

    /// Every sidecar stream seen (connected or not), for `meshgate status`.
    pub fn status(&self) -> StatusReport {
        let version = self.version();
        let sidecars = self
            .sidecars
            .lock()
            .expect("lock")
            .values()
            .map(|s| {
                let mut v = serde_json::to_value(s).expect("status serializes");
                v["in_sync"] = serde_json::Value::Bool(
                    s.connected && s.acked_version.is_some() && s.acked_version == version,
                );
                v
            })
            .collect();
        StatusReport {
            refused_connections: self.refused.load(Ordering::Relaxed),
            version,
            last_rejected: self.rejected.lock().expect("lock").clone(),
            sidecars,
        }
    }

    fn update(&self, stream: u64, f: impl FnOnce(&mut SidecarStatus)) {
        if let Some(s) = self.sidecars.lock().expect("lock").get_mut(&stream) {
            s.last_seen = now();
            f(s);
        }
    }

    /// Accepts sidecar connections until `shutdown`. `tls` must require client certificates.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        tls: Arc<ArcSwap<rustls::ServerConfig>>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut connections = tokio::task::JoinSet::new();
        let mut backoff = meshgate_ca::backoff::Backoff::for_accept();
        // Forgets idle tap viewers (stopping the tap when none is left) and renews a polled tap.
        let mut tap_tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = async { let _ = shutdown.wait_for(|s| *s).await; } => break,
                accepted = backoff.accept(&listener, "control plane") => {
                    let (tcp, addr) = accepted;
                    let slot = match self.cap.admit(addr.ip()) {
                        Ok(slot) => slot,
                        Err(refusal) => {
                            drop(tcp);
                            // Logged once per 1024 refusals: a flood must not become a log flood.
                            if self.refused.fetch_add(1, Ordering::Relaxed).is_multiple_of(1024) {
                                tracing::warn!(event = "control_plane.connection_refused", peer.addr = %addr, reason = refusal.label(), refused_total = self.refused.load(Ordering::Relaxed), "connection refused: the control plane holds its connection cap (see `meshgate status`: refused_connections)");
                            }
                            continue;
                        }
                    };
                    let (cp, tls) = (self.clone(), tls.clone());
                    connections.spawn(async move {
                        cp.connection(tcp, addr, tls).await;
                        drop(slot);
                    });
                }
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
                _ = tap_tick.tick() => self.tap.expire(std::time::Instant::now()),
            }
        }
        connections.abort_all();
    }

    async fn connection(
        self: Arc<Self>,
        tcp: tokio::net::TcpStream,
        addr: SocketAddr,
        tls: Arc<ArcSwap<rustls::ServerConfig>>,
    ) {
        let acceptor = TlsAcceptor::from(tls.load_full());
        let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                tracing::warn!(event = "control_plane.handshake_refused", peer.addr = %addr, error = %e);
                return;
            }
            Err(_) => return,
        };
        meshgate_ca::tls::ack_handshake(tls.get_ref().0);
        let Some(info) = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|c| cert::cert_info(c).ok())
        else {
            tracing::warn!(event = "control_plane.handshake_refused", peer.addr = %addr, error = "no usable SVID");
            return;
        };
        if !info.id.is_member_of(&self.trust_domain) {
            tracing::warn!(event = "control_plane.handshake_refused", peer.addr = %addr, peer.id = %info.id, error = "foreign trust domain");
            return;
        }
        let peer = Arc::new(info);
        let cp = self.clone();
        // A refusal answered over HTTP/1.1 before the request's body was read ends the
        // connection with a lingering close, so the client reads the refusal, not a reset.
        let tls = meshgate_ca::linger::LingerOnClose::new(tls);
        let linger = tls.armed();
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let (cp, peer) = (cp.clone(), peer.clone());
            let unread = req.version() < http::Version::HTTP_2
                && !hyper::body::Body::is_end_stream(req.body());
            let resp = cp.handle(req, peer, addr);
            if unread && !resp.status().is_success() {
                linger.store(true, Ordering::Relaxed);
            }
            async move { Ok::<_, Infallible>(resp) }
        });
        // PINGs mark a sidecar whose machine vanished (no FIN, no RST) as disconnected in
        // `meshgate status` within 15 s, instead of listing a dead stream as connected.
        let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        builder
            .http2()
            .timer(TokioTimer::new())
            .keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT);
        // HTTP/1.1 request heads within the handshake's limit (hyper's timer is off without
        // a timer of its own).
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(HANDSHAKE_TIMEOUT);
        let _ = builder.serve_connection(TokioIo::new(tls), service).await;
    }

    fn handle(
        self: &Arc<Self>,
        req: Request<Incoming>,
        peer: Arc<cert::CertInfo>,
        addr: SocketAddr,
    ) -> Response<UnsyncBoxBody<Bytes, Infallible>> {
        if req.method() != Method::POST || req.uri().path() != STREAM_PATH {
            return Response::builder()
                .status(StatusCode::NOT_FOUND)
                .body(
                    Full::new(Bytes::from_static(
                        b"the control plane serves POST /v1/stream\n",
                    ))
                    .boxed_unsync(),
                )
                .expect("valid response");
        }
        // Only a sidecar that says it reads tap requests gets them: an older one would take the
        // line for a malformed push and drop its stream.
        let tap = crate::wire::has_feature(req.headers(), FEATURE_TAP);
        let stream = self.next_stream.fetch_add(1, Ordering::Relaxed);
        let mut sidecars = self.sidecars.lock().expect("lock");
        // A reconnecting sidecar replaces its closed streams, so the table does not grow with
        // every certificate rotation; closed streams of identities that never came back stay
        // visible in `meshgate status`.
        sidecars.retain(|_, s| s.connected || s.id != peer.id);
        sidecars.insert(
            stream,
            SidecarStatus {
                id: peer.id.clone(),
                addr: addr.to_string(),
                connected: true,
                connected_at: now(),
                last_seen: now(),
                sent_version: None,
                acked_version: None,
                last_nack: None,
                last_ack_at: None,
                svid_not_after: peer.not_after.unix_timestamp(),
                push_refused: None,
                tap,
            },
        );
        drop(sidecars);
        tracing::info!(event = "control_plane.stream_opened", peer.id = %peer.id, peer.addr = %addr);
        let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
        let nonces = Arc::new(Mutex::new(BTreeMap::<String, String>::new()));
        tokio::spawn(
            self.clone()
                .pushes(stream, peer.clone(), tx, nonces.clone(), tap),
        );
        tokio::spawn(
            self.clone()
                .acks(stream, peer.id.clone(), req.into_body(), nonces),
        );
        let body = StreamBody::new(tokio_stream_from(rx));
        Response::builder()
            .header("content-type", "application/x-ndjson")
            // Sidecars send flow reports only to a control plane that says it reads them.
            .header(
                FEATURES_HEADER,
                format!(
                    "{FEATURE_FLOW_REPORTS},{FEATURE_FLOW_LATENCY},{}",
                    crate::wire::FEATURE_FLOW_L3L4
                ),
            )
            .body(body.boxed_unsync())
            .expect("valid response")
    }

    /// Pushes every new version to one stream until it closes or the peer's certificate expires.
    async fn pushes(
        self: Arc<Self>,
        stream: u64,
        peer: Arc<cert::CertInfo>,
        tx: mpsc::Sender<Result<Frame<Bytes>, Infallible>>,
        nonces: Arc<Mutex<BTreeMap<String, String>>>,
        tap: bool,
    ) {
        let mut current = self.current.subscribe();
        let mut taps = tap.then(|| self.tap.subscribe());
        // A sidecar connecting while a tap runs joins it at once.
        let mut tap_due = taps.as_ref().is_some_and(|t| t.borrow().active);
        let mut snapshot_due = true;
        let remaining =
            (peer.not_after - time::OffsetDateTime::now_utc()).max(time::Duration::ZERO);
        let expiry = tokio::time::sleep(Duration::try_from(remaining).unwrap_or(Duration::ZERO));
        tokio::pin!(expiry);
        loop {
            let set = if snapshot_due {
                current.borrow_and_update().clone()
            } else {
                None
            };
            snapshot_due = false;
            if let Some(set) = set {
                let mut nonce_bytes = [0u8; 8];
                meshgate_ca::tls::random_bytes(&mut nonce_bytes);
                let nonce = cert::hex(&nonce_bytes);
                let push = Push::new(scope(&set, &peer.id), nonce.clone());
                let mut line = serde_json::to_vec(&push).expect("push serializes");
                line.push(b'\n');
                if line.len() > MAX_PUSH_BYTES {
                    // Sidecars would refuse it anyway; say why here, where it can be fixed.
                    let reason = format!(
                        "the snapshot for {} is {} bytes, larger than the {MAX_PUSH_BYTES}-byte push limit; it was not sent and the sidecar keeps its last good policy. Shrink the policy set (split it per namespace, drop unused Services)",
                        peer.id,
                        line.len()
                    );
                    tracing::error!(event = "control_plane.push_too_large", peer.id = %peer.id, version = %set.version, bytes = line.len(), limit = MAX_PUSH_BYTES, "{reason}");
                    self.update(stream, |s| s.push_refused = Some(reason));
                } else {
                    nonces
                        .lock()
                        .expect("lock")
                        .insert(nonce, set.version.clone());
                    if tx.send(Ok(Frame::data(Bytes::from(line)))).await.is_err() {
                        break;
                    }
                    self.update(stream, |s| {
                        s.sent_version = Some(set.version.clone());
                        s.push_refused = None;
                    });
                }
            }
            // After the snapshot: a sidecar joining a running tap has its policy first.
            if tap_due && let Some(taps) = taps.as_mut() {
                tap_due = false;
                let request = taps.borrow_and_update().request_for(peer.id.as_str());
                let mut line = serde_json::to_vec(&request).expect("tap request serializes");
                line.push(b'\n');
                if tx.send(Ok(Frame::data(Bytes::from(line)))).await.is_err() {
                    break;
                }
            }
            let tap_changed = async {
                match taps.as_mut() {
                    Some(t) => t.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                changed = current.changed() => if changed.is_err() { break } else { snapshot_due = true },
                true = tap_changed => tap_due = true,
                _ = tx.closed() => break,
                _ = &mut expiry => {
                    tracing::info!(event = "control_plane.stream_expired", peer.id = %peer.id, "peer certificate expired; closing the stream so it reconnects with a fresh SVID");
                    break;
                }
            }
        }
        self.update(stream, |s| s.connected = false);
    }

    /// Reads ACK/NACK lines of one stream.
    async fn acks(
        self: Arc<Self>,
        stream: u64,
        peer: SpiffeId,
        mut body: Incoming,
        nonces: Arc<Mutex<BTreeMap<String, String>>>,
    ) {
        let mut lines = LineBuffer::default();
        // Report lines this second: a sidecar sends a few per interval; one sending far more
        // (broken, or hostile) is not allowed to keep the flow store's lock busy.
        let mut budget = (now(), 0u32);
        // Tap events this stream may add per second, whatever the sidecar sends: twice what
        // sidecars are asked for, because their one-second windows and ours are not aligned
        // (a sidecar's full window may straddle two of ours).
        let mut tap_limit = RateLimit::new(2 * DEFAULT_TAP_RATE);
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else { break };
            let Some(data) = frame.data_ref() else {
                continue;
            };
            let batch = match lines.push(data, MAX_ACK_BYTES) {
                Ok(batch) => batch,
                Err(e) => {
                    tracing::warn!(event = "control_plane.ack_too_large", peer.id = %peer, limit = e.limit, "closing the stream: an ACK line exceeds the limit");
                    break;
                }
            };
            for line in batch {
                let ack = match serde_json::from_slice::<ClientMessage>(&line) {
                    Ok(ClientMessage::Ack(ack)) => ack,
                    Ok(ClientMessage::Tap(event)) => {
                        self.tap.ingest(
                            peer.as_str(),
                            event,
                            &mut tap_limit,
                            std::time::Instant::now(),
                        );
                        continue;
                    }
                    Ok(ClientMessage::Flows(report)) => {
                        let second = now();
                        if budget.0 != second {
                            budget = (second, 0);
                        }
                        budget.1 += 1;
                        if budget.1 > MAX_REPORT_LINES_PER_SECOND {
                            let dropped: u64 = report.flows.iter().map(|f| f.count).sum();
                            let l3l4: u64 = report.l3l4.iter().map(|f| f.count).sum();
                            let mut store = self.flows.lock().expect("lock");
                            store.overflow =
                                store.overflow.saturating_add(dropped + report.overflow);
                            store.l3l4_overflow = store
                                .l3l4_overflow
                                .saturating_add(l3l4.saturating_add(report.l3l4_overflow));
                            if budget.1 == MAX_REPORT_LINES_PER_SECOND + 1 {
                                tracing::warn!(event = "control_plane.flow_reports_dropped", peer.id = %peer, limit = MAX_REPORT_LINES_PER_SECOND, "flow reports above the per-second limit are dropped (counted in meshgate_sli_flow_overflow_total); is --flow-report-interval very short?");
                            }
                            continue;
                        }
                        self.flows
                            .lock()
                            .expect("lock")
                            .ingest(peer.as_str(), report, now());
                        continue;
                    }
                    Err(_) => {
                        tracing::warn!(event = "control_plane.bad_ack", peer.id = %peer);
                        continue;
                    }
                };
                let known = nonces.lock().expect("lock").remove(&ack.nonce);
                if known.as_deref() != Some(ack.version.as_str()) {
                    tracing::warn!(event = "control_plane.stale_ack", peer.id = %peer, nonce = %sanitize_peer_text(&ack.nonce, 64), "ACK for an unknown nonce ignored");
                    continue;
                }
                match &ack.error {
                    None => {
                        tracing::info!(event = "control_plane.ack", peer.id = %peer, version = %ack.version);
                        self.update(stream, |s| {
                            s.acked_version = Some(ack.version.clone());
                            s.last_nack = None;
                            s.last_ack_at = Some(s.last_seen);
                        });
                        self.check_containment();
                    }
                    Some(error) => {
                        self.nacks.fetch_add(1, Ordering::Relaxed);
                        // Peer text: escaped and capped, so it stays one field of one log line.
                        let error = sanitize_peer_text(error, MAX_NACK_ERROR_CHARS);
                        tracing::warn!(event = "control_plane.nack", peer.id = %peer, version = %ack.version, error = %error);
                        self.update(stream, |s| {
                            s.last_nack = Some(format!("{}: {error}", ack.version));
                            s.last_ack_at = Some(s.last_seen);
                        });
                    }
                }
            }
        }
        self.update(stream, |s| s.connected = false);
        tracing::info!(event = "control_plane.stream_closed", peer.id = %peer);
    }
}

impl ControlPlane {
    /// A viewer polls the tap with `watch`: it starts, follows the filters or is renewed.
    pub fn tap_poll(&self, watch: crate::tap::Watch) {
        self.tap.poll(watch, std::time::Instant::now());
    }

    /// The newest tap sequence number, and the events after `since` that `watch` shows,
    /// newest first, at most `limit`.
    pub fn tap_events(
        &self,
        since: u64,
        watch: &crate::tap::Watch,
        limit: usize,
    ) -> (u64, Vec<(u64, crate::wire::TapRecord)>) {
        self.tap.events(since, watch, limit)
    }

    /// What the tap counted.
    pub fn tap_counters(&self) -> crate::tap::TapCounters {
        self.tap.counters()
    }

    /// Connected sidecars that can be tapped, and those that cannot (older versions).
    pub fn tap_sidecars(&self) -> (usize, usize) {
        let sidecars = self.sidecars.lock().expect("lock");
        let connected = sidecars.values().filter(|s| s.connected);
        connected.fold(
            (0, 0),
            |(yes, no), s| {
                if s.tap { (yes + 1, no) } else { (yes, no + 1) }
            },
        )
    }

    /// The flows reported in the last [`crate::flows::FLOW_TTL`], every sidecar's.
    pub fn flows(&self) -> Vec<Flow> {
        let mut store = self.flows.lock().expect("lock");
        store.expire(now());
        store.flows()
    }

    /// The eBPF redirect's verdicts reported in the last [`crate::flows::FLOW_TTL`], with the
    /// workload that reported each.
    pub fn l3l4_flows(&self) -> Vec<(String, crate::wire::L3L4Flow)> {
        let mut store = self.flows.lock().expect("lock");
        store.expire(now());
        store.l3l4_flows()
    }

    /// The `meshgate_sli_*` metrics, Prometheus text format (docs/operations.md, "SLIs").
    pub fn sli_metrics(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, f64)]| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, value) in samples {
                let _ = writeln!(out, "{name}{labels} {value}");
            }
        };
        let (coverage, classes, denials, overflow, l3l4_denials, l3l4_overflow) = {
            let mut store = self.flows.lock().expect("lock");
            store.expire(now());
            (
                store.coverage(),
                store.classes,
                store.denials.clone(),
                store.overflow,
                store.l3l4_denials.clone(),
                store.l3l4_overflow,
            )
        };
        let one = |v: f64| vec![(String::new(), v)];
        metric(
            "meshgate_sli_policy_coverage_ratio",
            "gauge",
            "Share of the requests that passed in the last 10 minutes that an explicit ALLOW rule allowed (absent without traffic)",
            &coverage.request_ratio().map(one).unwrap_or_default(),
        );
        metric(
            "meshgate_sli_policy_coverage_flows_ratio",
            "gauge",
            "Share of the distinct flows that passed in the last 10 minutes that an explicit ALLOW rule allowed (absent without traffic)",
            &coverage.flow_ratio().map(one).unwrap_or_default(),
        );
        metric(
            "meshgate_sli_uncovered_flows",
            "gauge",
            "Distinct flows that passed in the last 10 minutes without an explicit ALLOW rule (mesh default or dry-run)",
            &one(coverage.uncovered_flows() as f64),
        );
        metric(
            "meshgate_sli_requests_total",
            "counter",
            "Requests and tunnels reported by sidecars, by how they were decided",
            &[
                ("explicit", classes.explicit),
                ("implicit", classes.implicit),
                ("denied", classes.denied),
                ("bad_request", classes.bad_request),
            ]
            .map(|(class, n)| (format!("{{class=\"{class}\"}}"), n as f64)),
        );
        let denial_samples: Vec<(String, f64)> = denials
            .iter()
            .map(|((caller, callee), n)| {
                (
                    format!(
                        "{{caller=\"{}\",callee=\"{}\"}}",
                        escape_label(caller),
                        escape_label(callee)
                    ),
                    *n as f64,
                )
            })
            .collect();
        metric(
            "meshgate_sli_unauthorized_requests_total",
            "counter",
            "Requests and tunnels denied by policy, by caller and callee SPIFFE ID",
            &denial_samples,
        );
        let l3l4_samples: Vec<(String, f64)> = l3l4_denials
            .iter()
            .map(|((workload, direction, verdict), n)| {
                (
                    format!(
                        "{{workload=\"{}\",direction=\"{}\",verdict=\"{verdict}\"}}",
                        escape_label(workload),
                        direction.as_str()
                    ),
                    *n as f64,
                )
            })
            .collect();
        metric(
            "meshgate_sli_l3l4_denials_total",
            "counter",
            "Connections refused (EPERM) and packets dropped by the eBPF redirect's L3/L4 rules, by workload, direction and verdict (no caller identity: the kernel counters carry none)",
            &l3l4_samples,
        );
        metric(
            "meshgate_sli_l3l4_overflow_total",
            "counter",
            "eBPF verdict counts not kept because a cap was reached (per report or in the control plane)",
            &one(l3l4_overflow as f64),
        );
        metric(
            "meshgate_sli_flow_overflow_total",
            "counter",
            "Decisions not kept as flows because a cardinality cap was reached (sidecars' and the control plane's)",
            &one(overflow as f64),
        );
        let version = self.version();
        let (mut drifted, mut stale) = (0u64, 0u64);
        {
            let sidecars = self.sidecars.lock().expect("lock");
            let connected: std::collections::BTreeSet<&SpiffeId> = sidecars
                .values()
                .filter(|s| s.connected)
                .map(|s| &s.id)
                .collect();
            let oldest = now() - crate::flows::FLOW_TTL.as_secs() as i64;
            for s in sidecars.values() {
                if s.connected {
                    if s.acked_version.is_none() || s.acked_version != version {
                        drifted += 1;
                    }
                } else if !connected.contains(&s.id) && s.last_seen >= oldest {
                    stale += 1;
                }
            }
        }
        metric(
            "meshgate_sli_sidecars_drifted",
            "gauge",
            "Connected sidecars that have not acknowledged the version served (still applying it, or NACKed it)",
            &one(drifted as f64),
        );
        metric(
            "meshgate_sli_stale_sidecars",
            "gauge",
            "Sidecars whose stream to this replica closed in the last 10 minutes and that have not come back to it: they enforce their last policy and receive no update",
            &one(stale as f64),
        );
        metric(
            "meshgate_sli_refused_updates_total",
            "counter",
            "Policy updates refused: by the control plane (invalid directory) or by sidecars (NACK)",
            &[
                (
                    "{by=\"control_plane\"}".to_string(),
                    self.rejected_updates.load(Ordering::Relaxed) as f64,
                ),
                (
                    "{by=\"sidecar\"}".to_string(),
                    self.nacks.load(Ordering::Relaxed) as f64,
                ),
            ],
        );
        let last = self.containment.lock().expect("lock").last_seconds;
        metric(
            "meshgate_sli_last_containment_seconds",
            "gauge",
            "Seconds from publishing the last quarantine to its ACK by every connected sidecar (absent before the first)",
            &last.map(one).unwrap_or_default(),
        );
        out
    }
}

/// A Prometheus label value: backslash, double quote and newline escaped.
fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// An `mpsc::Receiver` as a `Stream` (without pulling in tokio-stream).
fn tokio_stream_from<T>(mut rx: mpsc::Receiver<T>) -> impl futures_core::Stream<Item = T> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
