//! Where authorization decisions are written — once each, in one place.
//!
//! The inbound layers and the L4 tunnel server build a [`DecisionRecord`] at the point they
//! decide and hand it to a [`DecisionSink`], which writes the same value to the log line
//! (`event = "authz.decision"`, one field per record field, under the record's serde names so the
//! policy tools read it back as the same type), the trace span, the metrics and the decision
//! feed, and hands it to the flow table and the live tap. Nothing else logs or counts
//! decisions, so they can never disagree (a bad path was once `bad-request` in metrics and
//! `deny` in the span).

use std::sync::Arc;
use std::time::{Duration, Instant};

use meshgate_policy::DecisionRecord;
use meshgate_policy::record::{DECISION_EVENT, Layer};
use opentelemetry::KeyValue;
use opentelemetry::trace::{SpanKind, Status, TraceContextExt};
use tokio::sync::broadcast;

use crate::metrics::{LatencyLabels, Metrics, RequestLabels, TcpLabels};
use crate::telemetry::{DECISION_ATTRIBUTE, Telemetry};

/// Writes decisions to the log, spans, metrics and the decision feed.
#[derive(Clone)]
pub struct DecisionSink {
    metrics: Arc<Metrics>,
    telemetry: Arc<Telemetry>,
    /// Records are cloned into it only while someone subscribes (`meshgate demo`). Made on
    /// the first subscription: its 1024 slots are ≈ 330 KB that a sidecar nobody subscribes
    /// to (every sidecar in production) would hold for nothing. Shared by the clones.
    feed: Arc<std::sync::OnceLock<broadcast::Sender<DecisionRecord>>>,
    /// The flows reported to the control plane (when the sidecar has one).
    flows: Option<Arc<crate::flows::FlowTable>>,
    /// The live tap (when the sidecar has a control plane): one atomic load per decision
    /// while nobody taps.
    tap: Option<Arc<crate::tap::Tap>>,
    /// The request metrics of each decision and policy seen so far. Shared by the clones.
    handles: Arc<RequestHandles>,
}

/// The inbound request counter and latency histogram for each (decision, policy) pair seen,
/// looked up in their families once. Why: a family lookup builds the labels (the policy name
/// copied into a `String`), hashes them and compares them under a lock, ≈ 600 instructions,
/// and every request did two. Families never drop a label set, so a handle stays the one the
/// family exports. Bounded: past [`RequestHandles::MAX`] pairs (a policy set with very many
/// names), the families are asked directly.
#[derive(Default)]
struct RequestHandles(arc_swap::ArcSwap<Vec<RequestHandle>>);

#[derive(Clone)]
struct RequestHandle {
    decision: &'static str,
    policy: Option<Box<str>>,
    requests: prometheus_client::metrics::counter::Counter,
    latency: prometheus_client::metrics::histogram::Histogram,
}

impl RequestHandles {
    const MAX: usize = 64;

    /// Counts one inbound request with `decision` by `policy`, `elapsed` long.
    fn count(&self, metrics: &Metrics, decision: &'static str, policy: Option<&str>, elapsed: f64) {
        let found = |handles: &[RequestHandle]| {
            handles
                .iter()
                .find(|h| h.decision == decision && h.policy.as_deref() == policy)
                .cloned()
        };
        let handle = found(&self.0.load()).unwrap_or_else(|| {
            let handle = RequestHandle {
                decision,
                policy: policy.map(Box::from),
                requests: metrics
                    .requests
                    .get_or_create(&RequestLabels {
                        direction: "inbound",
                        decision,
                        policy: policy.unwrap_or_default().to_string(),
                    })
                    .clone(),
                latency: metrics
                    .request_duration
                    .get_or_create(&LatencyLabels {
                        direction: "inbound",
                        decision,
                    })
                    .clone(),
            };
            self.0.rcu(|handles| {
                let mut handles = Vec::clone(handles);
                if handles.len() < Self::MAX && found(&handles).is_none() {
                    handles.push(handle.clone());
                }
                handles
            });
            handle
        });
        handle.requests.inc();
        handle.latency.observe(elapsed);
    }
}

impl DecisionSink {
    pub fn new(metrics: Arc<Metrics>, telemetry: Arc<Telemetry>) -> Self {
        Self {
            metrics,
            telemetry,
            feed: Arc::default(),
            flows: None,
            tap: None,
            handles: Arc::default(),
        }
    }

    /// Also counts every decision into `flows` (reported to the control plane).
    pub fn with_flows(mut self, flows: Arc<crate::flows::FlowTable>) -> Self {
        self.flows = Some(flows);
        self
    }

    /// Also offers every decision to `tap` (sent on only while the control plane taps).
    pub fn with_tap(mut self, tap: Arc<crate::tap::Tap>) -> Self {
        self.tap = Some(tap);
        self
    }

    /// Every decision from now on (a slow subscriber misses the oldest, never blocks traffic).
    pub fn subscribe(&self) -> broadcast::Receiver<DecisionRecord> {
        self.feed
            .get_or_init(|| broadcast::channel(1024).0)
            .subscribe()
    }

    pub fn telemetry(&self) -> &Arc<Telemetry> {
        &self.telemetry
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// An HTTP decision: the log line, a `meshgate.authz` child span of the request's server span
    /// (`server`), the decision on the server span, the request counter and latency (since
    /// `started`), the feed, and the tap (with the response `status`).
    pub fn http(
        &self,
        record: &DecisionRecord,
        server: &opentelemetry::Context,
        started: Instant,
        status: u16,
    ) {
        log_decision(record);
        self.span(record, server);
        self.handles.count(
            &self.metrics,
            record.decision.as_str(),
            record.policy.as_deref(),
            started.elapsed().as_secs_f64(),
        );
        // Worth a link from the console: a trace that is exported (sampled, or a refusal, whose
        // spans are built and kept whatever the sampler said).
        let exported = server.span().span_context().is_sampled() || record.decision.is_refusal();
        let trace_id = record.trace_id.as_deref().filter(|_| exported);
        self.publish(record, Some(started.elapsed()), trace_id, Some(status));
    }

    /// An L4 tunnel decision: the log line, the tunnel counter, the feed.
    pub fn tunnel(&self, record: &DecisionRecord) {
        log_decision(record);
        self.metrics
            .tcp_connections
            .get_or_create(&TcpLabels {
                direction: "inbound",
                decision: if record.allowed() { "allow" } else { "deny" },
                port: record.port,
            })
            .inc();
        self.publish(record, None, None, None);
    }

    fn publish(
        &self,
        record: &DecisionRecord,
        latency: Option<Duration>,
        trace_id: Option<&str>,
        status: Option<u16>,
    ) {
        if let Some(flows) = &self.flows {
            flows.record(record, latency, trace_id);
        }
        if let Some(tap) = &self.tap {
            tap.record(record, status, latency, trace_id);
        }
        if let Some(feed) = self.feed.get()
            && feed.receiver_count() > 0
        {
            let _ = feed.send(record.clone());
        }
    }

    /// The decision as a `meshgate.authz` span (ended at once: deciding is all it covers) and as
    /// attributes of the server span. Refusals mark both as errors with the reason.
    fn span(&self, record: &DecisionRecord, server: &opentelemetry::Context) {
        // Not recording: a request the sampler dropped and that was not refused.
        if !self.telemetry.enabled() || !server.span().is_recording() {
            return;
        }
        let decision = record.decision.as_str();
        let mut attributes = vec![
            KeyValue::new("meshgate.peer.id", record.peer.to_string()),
            KeyValue::new(DECISION_ATTRIBUTE, decision),
            KeyValue::new(
                "meshgate.policy.name",
                record.policy.clone().unwrap_or_default(),
            ),
            KeyValue::new("meshgate.policy.version", record.version.clone()),
            KeyValue::new("meshgate.workload.id", record.workload.to_string()),
            KeyValue::new("meshgate.decision.reason", record.reason.clone()),
        ];
        let optional = [
            ("http.request.method", &record.method),
            ("url.path", &record.path),
            ("meshgate.path.original", &record.original),
            ("meshgate.audit.policy", &record.audit_policy),
            ("meshgate.dry_run.policy", &record.dry_run_policy),
        ];
        for (key, value) in optional {
            if let Some(value) = value {
                attributes.push(KeyValue::new(key, value.clone()));
            }
        }
        if let Some(rule) = record.rule {
            attributes.push(KeyValue::new("meshgate.policy.rule", rule as i64));
        }
        let authz = self
            .telemetry
            .span("meshgate.authz", SpanKind::Internal, server, attributes);
        let server_span = server.span();
        server_span.set_attribute(KeyValue::new(DECISION_ATTRIBUTE, decision));
        if let Some(path) = &record.path {
            server_span.set_attribute(KeyValue::new("url.path", path.clone()));
        }
        if let Some(original) = &record.original {
            server_span.set_attribute(KeyValue::new("meshgate.path.original", original.clone()));
        }
        if !record.allowed() {
            authz
                .span()
                .set_status(Status::error(record.reason.clone()));
        }
        authz.span().end();
    }
}

/// The request counter and latency of a request that ended without a decision (this sidecar
/// could not serve it: `error`).
pub fn count_undecided(metrics: &Metrics, started: Instant) {
    metrics
        .requests
        .get_or_create(&RequestLabels {
            direction: "inbound",
            decision: "error",
            policy: String::new(),
        })
        .inc();
    observe_latency(metrics, "error", started);
}

fn observe_latency(metrics: &Metrics, decision: &'static str, started: Instant) {
    metrics
        .request_duration
        .get_or_create(&LatencyLabels {
            direction: "inbound",
            decision,
        })
        .observe(started.elapsed().as_secs_f64());
}

/// The target of the decision log line (this module's path).
pub const LOG_TARGET: &str = module_path!();

/// Writes the decision line straight from the record, instead of through a `tracing` event.
///
/// Why: the line is written for every request a sidecar judges, and a `tracing` event hands
/// its 17 fields one by one through `dyn Value` and the field visitor, which callgrind counted
/// at ≈ 9k instructions per request for the JSON line (more than the sidecar's own layers
/// cost). The binary installs one ([`set_line_writer`]) that writes the same bytes as its
/// stock formatter; library users and tests without one get the `tracing` event.
pub trait LineWriter: Send + Sync + 'static {
    /// Writes `record`'s line. False when it cannot write it the way the stock formatter
    /// would (say, inside a span, whose name the stock line carries): the `tracing` event is
    /// written instead.
    fn write(&self, record: &DecisionRecord) -> bool;
}

static LINE_WRITER: std::sync::OnceLock<Box<dyn LineWriter>> = std::sync::OnceLock::new();

/// Installs the process's decision line writer (once; later calls are refused and return
/// theirs). The log filter still decides whether the line is written: `MESHGATE_LOG=warn`
/// or `meshgate_proxy::decision=off` silence it. A filter on the event's field values
/// (`[{decision=deny}]`) is not applied to the lines this writer writes.
pub fn set_line_writer(writer: Box<dyn LineWriter>) -> Result<(), Box<dyn LineWriter>> {
    LINE_WRITER.set(writer)
}

/// The decision log line: every field of the record under its serde name. Public for the
/// binary's log formatter tests; the sidecar writes it through [`DecisionSink`] only.
pub fn log_decision(r: &DecisionRecord) {
    if let Some(writer) = LINE_WRITER.get()
        && (!tracing::enabled!(target: LOG_TARGET, tracing::Level::INFO) || writer.write(r))
    {
        return;
    }
    log_decision_event(r);
}

/// [`log_decision`] as a `tracing` event, whatever line writer is installed. The fields and
/// their order are the line's definition: the binary's [`LineWriter`] is tested against the
/// stock formatters' rendering of this event, byte for byte.
pub fn log_decision_event(r: &DecisionRecord) {
    let layer = match r.layer {
        Layer::L7 => "l7",
        Layer::L4 => "l4",
    };
    tracing::info!(
        target: LOG_TARGET,
        event = DECISION_EVENT,
        layer,
        meshgate.workload.id = %r.workload,
        peer.id = %r.peer,
        peer.addr = r.peer_addr.as_deref(),
        port = r.port,
        http.request.method = r.method.as_deref(),
        url.path = r.path.as_deref(),
        meshgate.path.original = r.original.as_deref(),
        decision = r.decision.as_str(),
        policy = r.policy.as_deref(),
        rule = r.rule,
        policy.version = %r.version,
        reason = %r.reason,
        audit_policy = r.audit_policy.as_deref(),
        dry_run_policy = r.dry_run_policy.as_deref(),
        trace_id = r.trace_id.as_deref(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::Mutex;

    /// A `MakeWriter` collecting everything written.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn logged(record: &DecisionRecord) -> DecisionRecord {
        let out = Captured::default();
        let writer = out.clone();
        // The format `meshgate --log-format json` installs.
        let subscriber = tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || log_decision(record));
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let value: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(value["event"], DECISION_EVENT);
        serde_json::from_value(value).unwrap()
    }

    /// The log line reads back as the record that was written, field for field, for each kind
    /// of record: the tools that parse logs see exactly what the sidecar decided.
    #[test]
    fn log_line_round_trips() {
        let id = |s: &str| meshgate_ca::SpiffeId::parse(s).unwrap();
        let decision = meshgate_policy::Decision::bad_request("v1", "bad path: x".into());
        let mut bad = DecisionRecord::new(
            Layer::L7,
            &id("spiffe://mesh.local/ns/shop/sa/orders"),
            &id("spiffe://mesh.local/ns/shop/sa/web"),
            8080,
            &decision,
        );
        bad.method = Some("GET".into());
        bad.original = Some("/a/..%2fb".into());
        bad.peer_addr = Some("127.0.0.1:4000".into());
        assert_eq!(logged(&bad), bad);

        let mut full = bad.clone();
        full.decision = meshgate_policy::DecisionKind::DryRunDeny;
        full.path = Some("/b".into());
        full.policy = Some("shop/p".into());
        full.rule = Some(3);
        full.audit_policy = Some("shop/a".into());
        full.dry_run_policy = Some("shop/d".into());
        full.trace_id = Some("0af7651916cd43dd8448eb211c80319c".into());
        assert_eq!(logged(&full), full);

        let mut l4 = DecisionRecord::new(
            Layer::L4,
            &id("spiffe://mesh.local/ns/shop/sa/db"),
            &id("spiffe://mesh.local/ns/shop/sa/orders"),
            5432,
            &meshgate_policy::Decision::bad_request("v1", "r".into()),
        );
        l4.decision = meshgate_policy::DecisionKind::Deny;
        assert_eq!(logged(&l4), l4);
    }

    /// The decision feed costs nothing until someone subscribes (its 1024 slots are made on the
    /// first subscription), and a subscriber on any clone of the sink sees the decisions of
    /// every clone from then on.
    #[test]
    fn the_feed_is_made_on_the_first_subscription_and_shared_by_clones() {
        let id = |s: &str| meshgate_ca::SpiffeId::parse(s).unwrap();
        let metrics = Arc::new(Metrics::default());
        let sink = DecisionSink::new(metrics, Arc::new(Telemetry::off()));
        let decision = meshgate_policy::Decision::bad_request("v1", "bad path: x".into());
        let record = DecisionRecord::new(
            Layer::L4,
            &id("spiffe://mesh.local/ns/shop/sa/orders"),
            &id("spiffe://mesh.local/ns/shop/sa/web"),
            5432,
            &decision,
        );
        sink.tunnel(&record);
        assert!(sink.feed.get().is_none(), "no channel before a subscriber");
        let other = sink.clone();
        let mut feed = sink.subscribe();
        other.tunnel(&record);
        assert_eq!(feed.try_recv().unwrap(), record);
        assert!(
            feed.try_recv().is_err(),
            "the decision before subscribing is not replayed"
        );
    }

    /// Every request is counted under its decision and policy, and its latency under its
    /// decision: through the cached handles, for the mesh default (no policy), and past the
    /// cache's bound, where the families are asked directly. Clones share the handles.
    #[test]
    fn request_metrics_count_each_decision_and_policy() {
        let metrics = Arc::new(Metrics::default());
        let sink = DecisionSink::new(metrics.clone(), Arc::new(Telemetry::off()));
        let clone = sink.clone();
        let policies: Vec<String> = (0..RequestHandles::MAX + 6)
            .map(|i| format!("shop/p{i}"))
            .collect();
        for round in 0..3 {
            for (i, policy) in policies.iter().enumerate() {
                let by = if i % 2 == 0 { &sink } else { &clone };
                by.handles.count(&metrics, "allow", Some(policy), 0.001);
            }
            sink.handles.count(&metrics, "deny", None, 0.002);
            clone
                .handles
                .count(&metrics, "deny", Some("shop/p0"), 0.002);
            assert!(
                sink.handles.0.load().len() <= RequestHandles::MAX,
                "round {round}"
            );
        }
        let count = |decision, policy: &str| {
            metrics
                .requests
                .get_or_create(&RequestLabels {
                    direction: "inbound",
                    decision,
                    policy: policy.to_string(),
                })
                .get()
        };
        for policy in &policies {
            assert_eq!(count("allow", policy), 3, "{policy}");
        }
        assert_eq!(count("deny", ""), 3);
        assert_eq!(count("deny", "shop/p0"), 3);
        assert_eq!(count("allow", ""), 0);
        let latency = |decision| {
            let text = metrics.encode();
            text.lines()
                .find(|l| {
                    l.contains("request_duration_seconds_count")
                        && l.contains("direction=\"inbound\"")
                        && l.contains(&format!("decision=\"{decision}\""))
                })
                .and_then(|l| l.rsplit(' ').next())
                .map(str::to_string)
        };
        assert_eq!(
            latency("allow").as_deref(),
            Some(&*(3 * policies.len()).to_string())
        );
        assert_eq!(latency("deny").as_deref(), Some("6"));
    }
}
