//! The sidecar's side of the stream: connect with the workload's SVID (the control plane must
//! present `spiffe://<td>/ns/meshgate/sa/control-plane`), apply each push, ACK or NACK it, and
//! reconnect whenever the stream breaks. What `apply` installed stays in force while
//! disconnected: losing the control plane never opens traffic.
//!
//! High availability: the client is given one or more control-plane URLs, and every address a
//! URL's host name resolves to is one more replica (a headless Kubernetes Service answers with
//! every ready pod). Names are resolved again at every reconnect round, because that answer
//! changes as replicas come and go. When an established stream breaks, the other replicas are
//! tried at once, starting with the one after the lost replica; only when a whole round failed
//! does the client pause, with the jittered [`Backoff`] every retry uses. A stream that stops
//! answering without closing (its machine vanished) is detected by HTTP/2 PINGs
//! ([`KEEPALIVE_INTERVAL`], [`KEEPALIVE_TIMEOUT`]).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshgate_ca::backoff::Backoff;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::sync::mpsc;
use tokio_rustls::TlsConnector;

use crate::wire::{
    Ack, FEATURE_TAP, FEATURES_HEADER, Flow, FlowReport, KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT,
    L3L4Flow, LineBuffer, MAX_ACK_BYTES, MAX_NACK_ERROR_CHARS, MAX_PUSH_BYTES, STREAM_PATH,
    ServerMessage, StreamFeatures, TapEvent, TapRequest, sanitize_peer_text,
};
use meshgate_policy::PolicySet;

/// How long opening a stream may take, from TCP connect to the control plane's response
/// headers. A replica that accepts connections but does not answer (overloaded, half-dead)
/// must not hold the sidecar away from the healthy ones for longer.
const SETUP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long resolving one control-plane host name may take in a reconnect round.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a stream must have worked for its loss to start a new round at once. A replica
/// that pushes and closes straight away (broken, or flapping) is treated as unreachable, so
/// the pauses of the backoff apply to it.
const HEALTHY_SESSION: Duration = Duration::from_secs(1);
/// The port of a control-plane URL that names none.
const DEFAULT_PORT: u16 = 15010;

/// A control-plane URL that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("control plane URL {url:?}: {reason} (e.g. https://control-plane:15010)")]
pub struct BadControlPlaneUrl {
    pub url: String,
    pub reason: String,
}

/// One configured control-plane URL.
#[derive(Debug, Clone)]
struct Target {
    url: String,
    /// `host:port` as written (IPv6 literals keep their brackets): what is resolved and what the
    /// request's authority says.
    authority: String,
}

/// One address of a control-plane replica, and the URL it was resolved from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub url: String,
    pub addr: SocketAddr,
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.addr, self.url)
    }
}

/// What happens to the stream, for metrics, readiness and status pages.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamEvent {
    /// A stream is open with `endpoint`.
    Connected { endpoint: Endpoint },
    /// The stream is down; the last applied policy stays in force.
    Disconnected,
    /// The first push after a lost stream was received and answered: `after` is the time from
    /// the loss to that answer, i.e. how long the sidecar could not receive updates.
    Reconnected { endpoint: Endpoint, after: Duration },
}

/// A stream client for one control plane, made of one or more replicas.
pub struct StreamClient {
    targets: Vec<Target>,
    tls: TlsConnector,
    /// Bumped when the workload's SVID is renewed: the stream is reopened with the new one.
    renewals: Option<tokio::sync::watch::Receiver<u64>>,
    /// Where flow reports come from, when this sidecar sends them.
    reports: Option<FlowReporter>,
    /// The live tap, when this sidecar offers it.
    tap: Option<TapSource>,
}

/// The sidecar's end of the live tap, driven by the stream: [`TapRequest`]s start, renew and
/// stop it; it is stopped whenever a stream ends (the control plane that asked is gone; the
/// next one asks again if it wants to).
pub trait TapControl: Send + Sync {
    /// Starts or replaces the tap (`seconds: 0` stops it).
    fn start(&self, request: &TapRequest);
    fn stop(&self);
    /// The decisions dropped and not yet reported, as an event line without a record.
    fn flush_dropped(&self) -> Option<TapEvent>;
}

/// A sidecar's tap: what controls it, and the events it produces (sent on the stream as they
/// come; the receiver is shared by the successive streams).
#[derive(Clone)]
pub struct TapSource {
    pub control: Arc<dyn TapControl>,
    pub events: Arc<tokio::sync::Mutex<mpsc::Receiver<TapEvent>>>,
}

/// Stops the tap when a session ends, however it ends.
struct StopTap<'a>(Option<&'a dyn TapControl>);

impl Drop for StopTap<'_> {
    fn drop(&mut self) {
        if let Some(control) = self.0 {
            control.stop();
        }
    }
}

/// Drains the flows aggregated since the last call, and the decisions not aggregated (cap hit).
pub type FlowDrain = Arc<dyn Fn() -> (Vec<Flow>, u64) + Send + Sync>;

/// Drains the eBPF verdicts counted since the last call (at most
/// [`crate::wire::MAX_L3L4_PER_REPORT`]), and the count of those left out.
pub type L3L4Drain = Arc<dyn Fn() -> (Vec<L3L4Flow>, u64) + Send + Sync>;

/// Flow reports on the stream: every `interval`, what `drain` returns is sent as
/// [`crate::wire::FlowReport`] lines, to a control plane that advertises
/// [`crate::wire::FEATURE_FLOW_REPORTS`] only. Drained when sent: a stream lost loses at most
/// the report in flight; while no stream is open, the sidecar's aggregate keeps counting
/// (within its cap).
#[derive(Clone)]
pub struct FlowReporter {
    pub interval: Duration,
    pub drain: FlowDrain,
    /// The eBPF redirect's verdicts (a sidecar with `--ebpf-cgroup`), drained with the flows
    /// but only for a control plane advertising [`crate::wire::FEATURE_FLOW_L3L4`]: for any
    /// other the kernel counters keep counting, and a later control plane that reads them
    /// gets the whole growth.
    pub l3l4: Option<L3L4Drain>,
}

/// Where a session writes its ACK/NACK lines (the request body).
type AckSender = mpsc::Sender<Result<Frame<Bytes>, Infallible>>;

/// How a stream session ended without an error.
enum SessionEnd {
    /// The SVID was renewed: reconnect at once, presenting it.
    Renewed,
}

/// How far one session got, whatever its end.
#[derive(Default)]
struct Progress {
    /// The control plane answered the stream request (at this instant).
    established: Option<Instant>,
    /// Pushes received and answered on it.
    pushes: u64,
}

impl Progress {
    /// The stream served its purpose (a push answered) for at least [`HEALTHY_SESSION`]: its
    /// loss is worth an immediate new round.
    fn worked(&self) -> bool {
        self.pushes > 0
            && self
                .established
                .is_some_and(|t| t.elapsed() >= HEALTHY_SESSION)
    }
}

/// Where the next reconnect round starts.
#[derive(Debug, Clone, Copy)]
enum Start {
    /// At a random replica: a fleet started together spreads over the replicas.
    Random,
    /// At this replica (after a renewal: it was fine).
    At(SocketAddr),
    /// At the replica after this one (it was just lost).
    After(SocketAddr),
}

impl Start {
    fn index(self, endpoints: &[Endpoint]) -> usize {
        let position = |addr| endpoints.iter().position(|e| e.addr == addr);
        match self {
            Start::At(addr) => position(addr),
            Start::After(addr) => position(addr).map(|i| i + 1),
            Start::Random => None,
        }
        .unwrap_or_else(|| {
            let mut random = [0u8; 4];
            meshgate_ca::tls::random_bytes(&mut random);
            u32::from_le_bytes(random) as usize
        }) % endpoints.len()
    }
}

impl StreamClient {
    /// `urls` are `https://host[:port]` (port 15010 by default), each entry possibly a
    /// comma-separated list; `tls` verifies the control plane's SPIFFE ID and presents the
    /// workload's SVID (offering ALPN `h2`).
    pub fn new<S: AsRef<str>>(
        urls: &[S],
        tls: Arc<rustls::ClientConfig>,
    ) -> Result<Self, BadControlPlaneUrl> {
        let mut targets = Vec::new();
        for url in urls
            .iter()
            .flat_map(|u| u.as_ref().split(','))
            .map(str::trim)
        {
            targets.push(parse_url(url)?);
        }
        if targets.is_empty() {
            return Err(BadControlPlaneUrl {
                url: String::new(),
                reason: "no URL given".to_string(),
            });
        }
        Ok(Self {
            targets,
            tls: TlsConnector::from(tls),
            renewals: None,
            reports: None,
            tap: None,
        })
    }

    /// The configured URLs, as given.
    pub fn urls(&self) -> Vec<String> {
        self.targets.iter().map(|t| t.url.clone()).collect()
    }

    /// Reopens the stream whenever `renewals` changes (the sidecar's SVID generation), so the
    /// control plane always knows the SVID in use (`meshgate check` warns when one is about to
    /// expire unrenewed) and the stream never outlives a certificate it no longer needs.
    pub fn reconnect_on(mut self, mut renewals: tokio::sync::watch::Receiver<u64>) -> Self {
        renewals.borrow_and_update();
        self.renewals = Some(renewals);
        self
    }

    /// Sends flow reports on every stream whose control plane reads them.
    pub fn report_flows(mut self, reporter: FlowReporter) -> Self {
        self.reports = Some(reporter);
        self
    }

    /// Offers the live tap on every stream (advertised with [`FEATURE_TAP`]).
    pub fn tap(mut self, source: TapSource) -> Self {
        self.tap = Some(source);
        self
    }

    /// Every address of every URL, in URL order then resolver order, without duplicates. A name
    /// that does not resolve is logged and skipped: the other replicas may still answer.
    async fn resolve(&self) -> Vec<Endpoint> {
        let mut out: Vec<Endpoint> = Vec::new();
        for target in &self.targets {
            let found =
                tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host(&target.authority))
                    .await;
            match found {
                Ok(Ok(addrs)) => {
                    for addr in addrs {
                        if !out.iter().any(|e| e.addr == addr) {
                            out.push(Endpoint {
                                url: target.url.clone(),
                                addr,
                            });
                        }
                    }
                }
                Ok(Err(e)) => {
                    tracing::warn!(event = "control_plane.resolve_failed", control_plane = %target.url, error = %e, "cannot resolve the control plane's host name; check --control-plane and DNS");
                }
                Err(_) => {
                    tracing::warn!(event = "control_plane.resolve_failed", control_plane = %target.url, error = "timed out", "cannot resolve the control plane's host name; check --control-plane and DNS");
                }
            }
        }
        out
    }

    /// Runs forever. `apply` installs a pushed set (its error becomes the NACK); `on_event`
    /// hears about connections, losses and recoveries. A lost stream fails over to the next
    /// replica at once; `initial_backoff` doubling to `max_backoff` (jittered) paces the rounds
    /// in which no replica could be reached.
    pub async fn run(
        self,
        mut apply: impl FnMut(PolicySet) -> Result<(), String> + Send,
        on_event: impl Fn(StreamEvent) + Send,
        initial_backoff: Duration,
        max_backoff: Duration,
    ) {
        let mut backoff = Backoff::new(initial_backoff, max_backoff);
        let mut renewals = self.renewals.clone();
        let mut start = Start::Random;
        // When the last established stream was lost, until the first push after it.
        let mut lost_at: Option<Instant> = None;
        loop {
            let endpoints = self.resolve().await;
            let first = if endpoints.is_empty() {
                0
            } else {
                start.index(&endpoints)
            };
            let mut failures = Vec::new();
            let mut at_once = false;
            for i in 0..endpoints.len() {
                let endpoint = &endpoints[(first + i) % endpoints.len()];
                let mut progress = Progress::default();
                let result = self
                    .session(
                        endpoint,
                        &mut apply,
                        &on_event,
                        renewals.as_mut(),
                        &mut progress,
                        &mut lost_at,
                    )
                    .await;
                if progress.established.is_some() {
                    on_event(StreamEvent::Disconnected);
                }
                match result {
                    Ok(SessionEnd::Renewed) => {
                        tracing::debug!(event = "control_plane.reconnect", control_plane = %endpoint, "SVID renewed: reopening the stream with it");
                        start = Start::At(endpoint.addr);
                        at_once = true;
                        break;
                    }
                    Err(e) => {
                        if progress.established.is_some() {
                            lost_at.get_or_insert_with(Instant::now);
                            tracing::warn!(event = "control_plane.disconnected", control_plane = %endpoint, error = %e, replicas = endpoints.len(), "stream lost; keeping the last good policy and trying the next control-plane replica now");
                        } else {
                            tracing::debug!(event = "control_plane.connect_failed", control_plane = %endpoint, error = %e);
                        }
                        start = Start::After(endpoint.addr);
                        if progress.worked() {
                            // A replica that worked is gone: a new round (names resolved again)
                            // starts now with the next replica, not after a pause; the policy in
                            // force cannot change until one answers.
                            backoff.reset();
                            at_once = true;
                            break;
                        }
                        // Not reachable, or it dropped the stream before being of use: the
                        // round goes on with the next replica, and pauses once all failed, so
                        // replicas that accept and close at once are not hammered.
                        failures.push(format!("{endpoint}: {e}"));
                    }
                }
            }
            if at_once {
                continue;
            }
            let pause = backoff.pause();
            let reasons = if failures.is_empty() {
                format!("no address found for {}", self.urls().join(", "))
            } else {
                failures.join("; ")
            };
            tracing::warn!(event = "control_plane.unreachable", replicas = endpoints.len(), error = %reasons, retry_in_ms = pause.as_millis() as u64, "no control-plane replica reachable; keeping the last good policy");
            tokio::time::sleep(pause).await;
        }
    }

    /// Opens the stream to `endpoint` (within [`SETUP_TIMEOUT`]) and answers its pushes until it
    /// breaks or the SVID is renewed.
    async fn session(
        &self,
        endpoint: &Endpoint,
        apply: &mut (impl FnMut(PolicySet) -> Result<(), String> + Send),
        on_event: &(impl Fn(StreamEvent) + Send),
        mut renewals: Option<&mut tokio::sync::watch::Receiver<u64>>,
        progress: &mut Progress,
        lost_at: &mut Option<Instant>,
    ) -> Result<SessionEnd, String> {
        let (resp, acks) = tokio::time::timeout(SETUP_TIMEOUT, self.open(endpoint))
            .await
            .map_err(|_| format!("no answer within {SETUP_TIMEOUT:?}"))??;
        progress.established = Some(Instant::now());
        // What this control plane reads: reports at all, and which of their newer fields (an
        // older one refuses lines carrying fields it does not know).
        let features = StreamFeatures::parse(
            resp.headers()
                .get_all(FEATURES_HEADER)
                .iter()
                .filter_map(|v| v.to_str().ok()),
        );
        let reports = self.reports.as_ref().filter(|_| features.flow_reports);
        if self.reports.is_some() && reports.is_none() {
            tracing::info!(event = "control_plane.no_flow_reports", control_plane = %endpoint, "this control plane does not read flow reports (an older version): none are sent to it");
        }
        let mut report_tick = reports.map(|r| {
            let mut tick =
                tokio::time::interval_at(tokio::time::Instant::now() + r.interval, r.interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick
        });
        on_event(StreamEvent::Connected {
            endpoint: endpoint.clone(),
        });
        tracing::info!(event = "control_plane.connected", control_plane = %endpoint);
        let mut body = resp.into_body();
        let mut lines = LineBuffer::default();
        // The tap's events go out as they come; dropped counts once a second. Sessions run one
        // after the other, so this lock is never contended.
        let mut tap_events = match &self.tap {
            Some(tap) => Some(tap.events.lock().await),
            None => None,
        };
        let _stop_tap = StopTap(self.tap.as_ref().map(|t| &*t.control));
        let mut tap_tick = tokio::time::interval(Duration::from_secs(1));
        tap_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let renewed = async {
                match renewals.as_deref_mut() {
                    Some(r) => r.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            let tick = async {
                match report_tick.as_mut() {
                    Some(t) => {
                        t.tick().await;
                    }
                    None => std::future::pending().await,
                }
            };
            let tap_event = async {
                match tap_events.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            };
            let tap_flush = async {
                match &self.tap {
                    Some(_) => {
                        tap_tick.tick().await;
                    }
                    None => std::future::pending().await,
                }
            };
            let frame = tokio::select! {
                frame = body.frame() => frame,
                true = renewed => return Ok(SessionEnd::Renewed),
                Some(event) = tap_event => {
                    send_line(&acks, &event).await?;
                    continue;
                }
                () = tap_flush => {
                    if let Some(event) = self.tap.as_ref().and_then(|t| t.control.flush_dropped()) {
                        send_line(&acks, &event).await?;
                    }
                    continue;
                }
                () = tick => {
                    if let Some(r) = reports {
                        let (flows, overflow) = (r.drain)();
                        let mut report = FlowReport::new(flows, overflow);
                        if let Some(l3l4) = r.l3l4.as_ref().filter(|_| features.flow_l3l4) {
                            (report.l3l4, report.l3l4_overflow) = l3l4();
                        }
                        for line in report.for_features(&features).into_lines(MAX_ACK_BYTES) {
                            acks.send(Ok(Frame::data(Bytes::from(line))))
                                .await
                                .map_err(|_| "stream closed".to_string())?;
                        }
                    }
                    continue;
                }
            };
            let Some(frame) = frame else { break };
            let frame = frame.map_err(|e| format!("stream: {e}"))?;
            let Some(data) = frame.data_ref() else {
                continue;
            };
            let batch = lines.push(data, MAX_PUSH_BYTES).map_err(|e| {
                format!(
                    "refused a push of {} MiB or more from the control plane: larger than the {} MiB snapshot limit; the last good policy stays in force. Shrink the policy set the control plane serves (split it per namespace, drop unused Services)",
                    e.len / (1024 * 1024),
                    e.limit / (1024 * 1024)
                )
            })?;
            for line in batch {
                let push = match ServerMessage::parse(&line) {
                    Ok(ServerMessage::Push(push)) => push,
                    Ok(ServerMessage::Tap(request)) => {
                        match &self.tap {
                            Some(tap) => tap.control.start(&request),
                            None => return Err("the control plane sent a tap request on a stream that did not offer the tap (a protocol error: it must check x-meshgate-stream-features); reconnecting".into()),
                        }
                        continue;
                    }
                    Err(e) => return Err(format!("undecodable push: {e}")),
                };
                let (nonce, version) = (push.nonce.clone(), push.version.clone());
                let error = push
                    .into_set()
                    .map_err(|e| e.to_string())
                    .and_then(&mut *apply)
                    .err()
                    .map(|e| sanitize_peer_text(&e, MAX_NACK_ERROR_CHARS));
                if let Some(e) = &error {
                    tracing::warn!(event = "control_plane.nack_sent", version = %version, error = %e);
                }
                let mut ack = serde_json::to_vec(&Ack {
                    nonce,
                    version,
                    error,
                })
                .expect("ack serializes");
                ack.push(b'\n');
                acks.send(Ok(Frame::data(Bytes::from(ack))))
                    .await
                    .map_err(|_| "stream closed".to_string())?;
                progress.pushes += 1;
                if let Some(lost) = lost_at.take() {
                    let after = lost.elapsed();
                    tracing::info!(event = "control_plane.reconnected", control_plane = %endpoint, after_ms = after.as_millis() as u64, "policy stream restored: the first snapshot after the loss is answered");
                    on_event(StreamEvent::Reconnected {
                        endpoint: endpoint.clone(),
                        after,
                    });
                }
            }
        }
        Err("the control plane closed the stream".into())
    }

    /// TCP, TLS (the control plane's SPIFFE ID checked), HTTP/2 with keep-alive PINGs, and the
    /// stream request up to its response headers. Returns the response and the sender of the
    /// request body (the ACK lines).
    async fn open(
        &self,
        endpoint: &Endpoint,
    ) -> Result<(http::Response<hyper::body::Incoming>, AckSender), String> {
        let tcp = tokio::net::TcpStream::connect(endpoint.addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let tls = self
            .tls
            .connect(meshgate_ca::tls::mesh_server_name(), tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|e| format!("HTTP/2: {e}"))?;
        tokio::spawn(conn);
        let (acks, mut ack_rx): (AckSender, _) = mpsc::channel(4);
        let body = StreamBody::new(futures_util::stream::poll_fn(move |cx| {
            ack_rx.poll_recv(cx)
        }));
        let authority = self
            .targets
            .iter()
            .find(|t| t.url == endpoint.url)
            .map_or_else(|| endpoint.addr.to_string(), |t| t.authority.clone());
        let mut req = Request::post(format!("https://{authority}{STREAM_PATH}"))
            .header("content-type", "application/x-ndjson");
        if self.tap.is_some() {
            // Without it the control plane never sends a tap request (older sidecars would
            // take it for a malformed push).
            req = req.header(FEATURES_HEADER, FEATURE_TAP);
        }
        let req = req.body(body).map_err(|e| e.to_string())?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("stream request: {e}"))?;
        if !resp.status().is_success() {
            return Err(format!("control plane answered {}", resp.status()));
        }
        Ok((resp, acks))
    }
}

/// One line of the request body.
async fn send_line(acks: &AckSender, message: &impl serde::Serialize) -> Result<(), String> {
    let mut line = serde_json::to_vec(message).expect("line serializes");
    line.push(b'\n');
    acks.send(Ok(Frame::data(Bytes::from(line))))
        .await
        .map_err(|_| "stream closed".to_string())
}

fn parse_url(url: &str) -> Result<Target, BadControlPlaneUrl> {
    let bad = |reason: &str| BadControlPlaneUrl {
        url: url.to_string(),
        reason: reason.to_string(),
    };
    if url.is_empty() {
        return Err(bad("empty entry in the list"));
    }
    let uri: http::Uri = url
        .parse()
        .map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
    if uri.scheme_str() != Some("https") {
        return Err(bad("it must start with https://"));
    }
    let host = uri.host().ok_or_else(|| bad("it has no host"))?;
    Ok(Target {
        url: url.to_string(),
        authority: format!("{host}:{}", uri.port_u16().unwrap_or(DEFAULT_PORT)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn endpoints(addrs: &[&str]) -> Vec<Endpoint> {
        addrs
            .iter()
            .map(|a| Endpoint {
                url: format!("https://{a}"),
                addr: addr(a),
            })
            .collect()
    }

    #[test]
    fn urls_are_split_checked_and_defaulted() {
        let tls = Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth(),
        );
        /// URLs given, and the authorities they become or words of the refusal.
        type Case<'a> = (&'a [&'a str], Result<&'a [&'a str], &'a str>);
        let cases: &[Case] = &[
            (&["https://cp:15010"], Ok(&["cp:15010"])),
            (&["https://cp"], Ok(&["cp:15010"])),
            (
                &["https://a:1,https://b:2", " https://[::1]:3 "],
                Ok(&["a:1", "b:2", "[::1]:3"]),
            ),
            (&["http://cp:15010"], Err("must start with https://")),
            (&["https://a:1,,https://b:2"], Err("empty entry")),
            (&["https://a:1,cp:15010"], Err("must start with https://")),
            (&[], Err("no URL given")),
        ];
        for (urls, want) in cases {
            let got = StreamClient::new(urls, tls.clone());
            match (got, want) {
                (Ok(client), Ok(want)) => {
                    let got: Vec<_> = client
                        .targets
                        .iter()
                        .map(|t| t.authority.as_str())
                        .collect();
                    assert_eq!(&got, want, "{urls:?}");
                }
                (Err(e), Err(words)) => {
                    assert!(e.to_string().contains(words), "{urls:?}: {e}");
                    assert!(e.to_string().contains("e.g. https://"), "{e}");
                }
                (got, want) => panic!("{urls:?}: got {:?}, want {want:?}", got.map(|c| c.urls())),
            }
        }
    }

    #[test]
    fn a_round_starts_after_the_lost_replica_or_at_the_renewed_one() {
        let list = endpoints(&["10.0.0.1:15010", "10.0.0.2:15010", "10.0.0.3:15010"]);
        let cases = [
            (Start::After(addr("10.0.0.1:15010")), 1),
            (Start::After(addr("10.0.0.3:15010")), 0),
            (Start::At(addr("10.0.0.2:15010")), 1),
            (Start::At(addr("10.0.0.3:15010")), 2),
        ];
        for (start, want) in cases {
            assert_eq!(start.index(&list), want, "{start:?}");
        }
        // A replica that left the DNS answer (or a first round) starts anywhere in range, and
        // the starts spread over the replicas.
        let mut seen = [false; 3];
        for _ in 0..200 {
            let i = Start::After(addr("10.0.0.9:15010")).index(&list);
            seen[i] = true;
            assert!(Start::Random.index(&list) < 3);
        }
        assert_eq!(seen, [true; 3]);
    }

    #[tokio::test]
    async fn every_address_of_every_url_is_a_replica_once() {
        let tls = Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth(),
        );
        // `localhost` resolves to 127.0.0.1 (and ::1 where configured): each address counts,
        // and the literal duplicate does not.
        let client = StreamClient::new(
            &[
                "https://127.0.0.1:15999,https://localhost:15999",
                "https://127.0.0.2:15999",
            ],
            tls,
        )
        .unwrap();
        let found = client.resolve().await;
        let addrs: Vec<_> = found.iter().map(|e| e.addr).collect();
        assert_eq!(addrs[0], addr("127.0.0.1:15999"), "{found:?}");
        assert_eq!(found[0].url, "https://127.0.0.1:15999");
        assert_eq!(*addrs.last().unwrap(), addr("127.0.0.2:15999"), "{found:?}");
        assert_eq!(
            addrs
                .iter()
                .filter(|a| **a == addr("127.0.0.1:15999"))
                .count(),
            1,
            "{found:?}"
        );
    }
}
