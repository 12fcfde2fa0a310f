//! Prometheus metrics of the sidecar, served as OpenMetrics text on the admin listener.
//! Names and labels are documented in docs/operations.md ("Metrics").

use std::sync::Arc;

use meshgate_ca::chains::VerifiedChains;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of a request counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `inbound` | `outbound`.
    pub direction: &'static str,
    /// `allow` | `deny` | `audit` | `dry-run-deny` | `bad-request` | `error`.
    pub decision: &'static str,
    /// `namespace/name` of the deciding policy, empty for the mesh default.
    pub policy: String,
}

/// Labels of a latency histogram.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LatencyLabels {
    pub direction: &'static str,
    pub decision: &'static str,
}

/// Labels of TLS handshake counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TlsLabels {
    pub direction: &'static str,
    /// For failures: `plaintext`, `no_client_cert`, `cert_expired`, `unknown_issuer`,
    /// `bad_cert`, `bad_spiffe_id`, `foreign_trust_domain`, `wrong_server_id`, `timeout`, `other`.
    pub reason: &'static str,
}

/// Labels of the L4 (TCP tunnel) connection counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub direction: &'static str,
    /// `allow` | `deny` | `revoked` (closed after a policy change) | `error`.
    pub decision: &'static str,
    /// Destination port.
    pub port: u16,
}

/// Labels of the request-hygiene counter: what the inbound path removed or refused before (or
/// instead of) authorization.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HygieneLabels {
    /// `identity_header` (a caller-sent header an app could read as the sidecar's identity
    /// header, any spelling), `identity_trailer` (the same in request trailers),
    /// `upgrade_refused` (an `Upgrade` protocol not on the allowlist, stripped),
    /// `upgrade_revoked` (an upgraded connection closed by a policy change or cert expiry),
    /// `bad_method`, `bad_host`, `bad_app_port` (a malformed `x-meshgate-app-port`),
    /// `unknown_app_port` (an app port with no `--app` here), `tunnel_to_http_port`,
    /// `connection_limit`,
    /// `source_connection_limit`, `idle_timeout`.
    pub reason: &'static str,
}

/// Labels of the protocol detection counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DetectLabels {
    /// `http` | `opaque` | `timeout` | `closed`.
    pub result: &'static str,
}

/// Labels of the dropped-spans counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DropLabels {
    /// `queue_full` (collector too slow or down for long) | `export_failed`.
    pub reason: &'static str,
}

/// Labels of the tap counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TapLabels {
    /// `sent` | `dropped` (over the tap's rate limit, or the stream's queue was full).
    pub result: &'static str,
}

/// Labels of the policy version info gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionLabels {
    pub version: String,
}

/// Every metric the sidecar exports.
pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: Family<LatencyLabels, Histogram>,
    pub tls_handshakes: Family<TlsLabels, Counter>,
    pub tls_handshake_failures: Family<TlsLabels, Counter>,
    pub tcp_connections: Family<TcpLabels, Counter>,
    pub protocol_detections: Family<DetectLabels, Counter>,
    pub hygiene: Family<HygieneLabels, Counter>,
    pub spans_exported: Counter,
    pub spans_dropped: Family<DropLabels, Counter>,
    pub policy_swaps: Counter,
    pub policy_rejected: Counter,
    pub policy_version: Family<VersionLabels, Gauge>,
    pub cert_not_after: Gauge,
    pub control_plane_connected: Gauge,
    pub control_plane_reconnects: Counter,
    pub control_plane_last_reconnect_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub policy_stale_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Decisions not aggregated into a flow because the per-interval cap on distinct flows was
    /// reached (`meshgate_flow_cardinality_overflow_total`).
    pub flow_cardinality_overflow: Counter,
    /// Decisions sent to, or dropped from, a live tap (`meshgate_tap_events_total{result}`).
    pub tap_events: Family<TapLabels, Counter>,
    /// Idle HTTP/1.1 connections holding no hyper buffers right now
    /// (`meshgate_http_connections_parked{listener}`, [`crate::http_conn`]).
    pub http_connections_parked: Family<ListenerLabels, Gauge>,
    /// HTTP connections closed after `--idle-timeout` without a byte either way
    /// (`meshgate_http_connections_idle_closed_total{listener}`): the inbound listener's
    /// peers and the app's own pooled connections to the outbound listener alike.
    pub http_idle_closes: Family<ListenerLabels, Counter>,
    /// HTTP connections closed because their first bytes or a request head did not arrive
    /// within the header timeout (`meshgate_http_header_timeouts_total{listener}`): silent and
    /// trickling clients, which would otherwise hold a slot under the listener's cap.
    pub http_header_timeouts: Family<ListenerLabels, Counter>,
    /// Client chains the inbound listener has verified, so a caller's next handshake skips
    /// their signature checks ([`meshgate_ca::chains`]). Its counts are read at scrape time as
    /// `meshgate_tls_chain_verifications_total{direction="inbound",result}`.
    pub inbound_chains: Arc<VerifiedChains>,
    /// Server chains the outbound side has verified (peer sidecars, for every Service, HTTP/2,
    /// HTTP/1.1 and tunnel connections alike): one cache, since each connection still checks
    /// the SPIFFE ID its Service expects. Exported with `direction="outbound"`.
    pub outbound_chains: Arc<VerifiedChains>,
}

/// Exports the chain caches' counts at scrape time, one family for both directions:
/// `result="cached"` for handshakes whose chain was found verified, `"verified"` for full
/// verifications (first sight, expired entry, new roots, refusals).
#[derive(Debug)]
struct ChainCacheCollector {
    caches: [(&'static str, Arc<VerifiedChains>); 2],
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ChainLabels {
    direction: &'static str,
    result: &'static str,
}

impl Collector for ChainCacheCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut family = encoder.encode_descriptor(
            "tls_chain_verifications",
            "Peer certificate chains checked at handshakes, answered from the cache of verified chains or verified in full",
            None,
            ConstCounter::<u64>::new(0).metric_type(),
        )?;
        for (direction, chains) in &self.caches {
            let stats = chains.stats();
            for (result, n) in [("cached", stats.hits), ("verified", stats.misses)] {
                let labels = ChainLabels { direction, result };
                ConstCounter::new(n).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    pub listener: &'static str,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("meshgate");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests by direction, decision and deciding policy",
            requests.clone(),
        );
        let request_duration = Family::<LatencyLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 16))
        });
        registry.register(
            "request_duration_seconds",
            "Time from request received to response headers sent",
            request_duration.clone(),
        );
        let tls_handshakes = Family::<TlsLabels, Counter>::default();
        registry.register(
            "tls_handshakes",
            "Completed mTLS handshakes",
            tls_handshakes.clone(),
        );
        let tls_handshake_failures = Family::<TlsLabels, Counter>::default();
        registry.register(
            "tls_handshake_failures",
            "Refused or failed TLS handshakes by reason",
            tls_handshake_failures.clone(),
        );
        let tcp_connections = Family::<TcpLabels, Counter>::default();
        registry.register(
            "tcp_connections",
            "Tunnelled TCP connections by direction, L4 decision and port",
            tcp_connections.clone(),
        );
        let protocol_detections = Family::<DetectLabels, Counter>::default();
        registry.register(
            "protocol_detections",
            "Protocol detection outcomes on redirected outbound connections (timeout = server-speaks-first or slow client)",
            protocol_detections.clone(),
        );
        let hygiene = Family::<HygieneLabels, Counter>::default();
        registry.register(
            "inbound_hygiene",
            "Forged identity headers removed, refused upgrades and requests, revoked upgrades, shed connections",
            hygiene.clone(),
        );
        let spans_exported = Counter::default();
        registry.register(
            "trace_spans_exported",
            "Spans delivered to the OTLP collector",
            spans_exported.clone(),
        );
        let spans_dropped = Family::<DropLabels, Counter>::default();
        registry.register(
            "trace_spans_dropped",
            "Spans not delivered (queue full or export failed); requests are never slowed instead",
            spans_dropped.clone(),
        );
        let policy_swaps = Counter::default();
        registry.register(
            "policy_swaps",
            "Policy snapshots swapped in",
            policy_swaps.clone(),
        );
        let policy_rejected = Counter::default();
        registry.register(
            "policy_rejected",
            "Policy updates refused by validation",
            policy_rejected.clone(),
        );
        let policy_version = Family::<VersionLabels, Gauge>::default();
        registry.register(
            "policy_version_info",
            "The policy version in force (value 1)",
            policy_version.clone(),
        );
        let cert_not_after = Gauge::default();
        registry.register(
            "cert_not_after_timestamp_seconds",
            "Expiry of the workload's current SVID (Unix seconds)",
            cert_not_after.clone(),
        );
        let control_plane_connected = Gauge::default();
        registry.register(
            "control_plane_connected",
            "1 while the control-plane stream is up (0 when down or not used)",
            control_plane_connected.clone(),
        );
        let control_plane_reconnects = Counter::default();
        registry.register(
            "control_plane_reconnects",
            "Control-plane streams re-established after a loss (to the same or another replica)",
            control_plane_reconnects.clone(),
        );
        let control_plane_last_reconnect_seconds =
            Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "control_plane_last_reconnect_seconds",
            "Time from the last control-plane stream loss to the first snapshot answered after it",
            control_plane_last_reconnect_seconds.clone(),
        );
        let policy_stale_seconds = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "policy_stale_seconds",
            "Seconds since the policy source was last reachable (0 while connected or with files)",
            policy_stale_seconds.clone(),
        );
        let flow_cardinality_overflow = Counter::default();
        registry.register(
            "flow_cardinality_overflow",
            "Decisions not aggregated into a flow report because the cap on distinct flows per report interval was reached",
            flow_cardinality_overflow.clone(),
        );
        let tap_events = Family::<TapLabels, Counter>::default();
        registry.register(
            "tap_events",
            "Decisions sent to a live tap the control plane asked for, or dropped (over its rate limit, or the stream's queue was full)",
            tap_events.clone(),
        );
        let http_connections_parked = Family::<ListenerLabels, Gauge>::default();
        registry.register(
            "http_connections_parked",
            "Idle HTTP/1.1 connections parked without buffers until their next request, by listener",
            http_connections_parked.clone(),
        );
        let http_idle_closes = Family::<ListenerLabels, Counter>::default();
        registry.register(
            "http_connections_idle_closed",
            "HTTP connections closed after the idle timeout without a byte either way, by listener",
            http_idle_closes.clone(),
        );
        let http_header_timeouts = Family::<ListenerLabels, Counter>::default();
        registry.register(
            "http_header_timeouts",
            "HTTP connections closed because their first bytes or a request head did not arrive within the header timeout (10 s), by listener",
            http_header_timeouts.clone(),
        );
        let inbound_chains = Arc::new(VerifiedChains::new());
        let outbound_chains = Arc::new(VerifiedChains::new());
        registry.register_collector(Box::new(ChainCacheCollector {
            caches: [
                ("inbound", inbound_chains.clone()),
                ("outbound", outbound_chains.clone()),
            ],
        }));
        Self {
            registry,
            inbound_chains,
            outbound_chains,
            http_connections_parked,
            http_idle_closes,
            http_header_timeouts,
            flow_cardinality_overflow,
            tap_events,
            requests,
            request_duration,
            tls_handshakes,
            tls_handshake_failures,
            tcp_connections,
            protocol_detections,
            hygiene,
            spans_exported,
            spans_dropped,
            policy_swaps,
            policy_rejected,
            policy_version,
            cert_not_after,
            control_plane_connected,
            control_plane_reconnects,
            control_plane_last_reconnect_seconds,
            policy_stale_seconds,
        }
    }
}

impl Metrics {
    /// The gauge of `listener`'s parked connections, handed to each of its connections.
    pub fn parked(&self, listener: &'static str) -> Gauge {
        self.http_connections_parked
            .get_or_create(&ListenerLabels { listener })
            .clone()
    }

    /// Counts one of `listener`'s HTTP connections closed for staying idle.
    pub fn count_idle_close(&self, listener: &'static str) {
        self.http_idle_closes
            .get_or_create(&ListenerLabels { listener })
            .inc();
    }

    /// Counts one of `listener`'s HTTP connections closed at the header timeout.
    pub fn count_header_timeout(&self, listener: &'static str) {
        self.http_header_timeouts
            .get_or_create(&ListenerLabels { listener })
            .inc();
    }

    /// Counts `n` request-hygiene events (`meshgate_inbound_hygiene_total{reason}`): what the
    /// inbound path removed or refused before (or instead of) authorization.
    pub fn count_hygiene(&self, reason: &'static str, n: u64) {
        self.hygiene
            .get_or_create(&HygieneLabels { reason })
            .inc_by(n);
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String");
        out
    }

    /// The exposition plus the eBPF redirect's counters read from its pins (when the workload's
    /// cgroup is attached). They live in kernel maps, so they are read at scrape time rather than
    /// mirrored; reading loads nothing and needs CAP_BPF.
    pub fn encode_with_ebpf(&self, pins: Option<&std::path::Path>) -> String {
        let mut text = self.encode();
        let Some(pins) = pins else { return text };
        let extra = ebpf_counters(pins);
        match text.rfind("# EOF") {
            Some(at) => text.insert_str(at, &extra),
            None => text.push_str(&extra),
        }
        text
    }

    /// Records a new policy version in force.
    pub fn set_policy_version(&self, version: &str) {
        self.policy_version.clear();
        self.policy_version
            .get_or_create(&VersionLabels {
                version: version.to_string(),
            })
            .set(1);
    }
}

/// Where the eBPF redirect pinned the counters of the workload attached at `cgroup`.
#[cfg(all(feature = "ebpf", target_os = "linux"))]
pub fn ebpf_pins(cgroup: &std::path::Path) -> Result<std::path::PathBuf, String> {
    meshgate_ebpf::pin_dir_for(cgroup).map_err(|e| e.to_string())
}

/// Built without eBPF support: `--ebpf-cgroup` cannot be served.
#[cfg(not(all(feature = "ebpf", target_os = "linux")))]
pub fn ebpf_pins(_cgroup: &std::path::Path) -> Result<std::path::PathBuf, String> {
    Err("this sidecar was built without eBPF support (Cargo feature `ebpf`, Linux only): rebuild with it, or drop --ebpf-cgroup".to_string())
}

/// The eBPF counters as OpenMetrics text.
#[cfg(all(feature = "ebpf", target_os = "linux"))]
fn ebpf_counters(pins: &std::path::Path) -> String {
    let mut extra = String::from(
        "# HELP meshgate_ebpf_attached 1 when the workload's eBPF redirect counters could be read.\n# TYPE meshgate_ebpf_attached gauge\n",
    );
    match meshgate_ebpf::Counters::read_pinned(pins) {
        Ok(snapshot) => {
            extra.push_str("meshgate_ebpf_attached 1\n");
            extra.push_str("# HELP meshgate_ebpf_verdicts eBPF redirect verdicts (connections; denied_ingress counts packets).\n# TYPE meshgate_ebpf_verdicts counter\n");
            for (verdict, count) in snapshot.totals() {
                extra.push_str(&format!(
                    "meshgate_ebpf_verdicts_total{{verdict=\"{verdict}\"}} {count}\n"
                ));
            }
            extra.push_str("# HELP meshgate_ebpf_local_accel Local acceleration of the pod's loopback hops: sockets put into the sockhash, sockets refused (full, or in another attachment's sockhash), messages passed socket to socket, connections left on TCP (fallback).\n# TYPE meshgate_ebpf_local_accel counter\n");
            for (event, count) in snapshot.acceleration() {
                extra.push_str(&format!(
                    "meshgate_ebpf_local_accel_total{{event=\"{event}\"}} {count}\n"
                ));
            }
            extra.push_str("# HELP meshgate_ebpf_port_verdicts eBPF redirect verdicts by destination port.\n# TYPE meshgate_ebpf_port_verdicts counter\n");
            for p in &snapshot.per_port {
                extra.push_str(&format!(
                    "meshgate_ebpf_port_verdicts_total{{verdict=\"{}\",port=\"{}\"}} {}\n",
                    p.verdict.as_str(),
                    p.port,
                    p.count
                ));
            }
        }
        Err(e) => {
            tracing::debug!(error = %e, "eBPF counters not readable");
            extra.push_str("meshgate_ebpf_attached 0\n");
        }
    }
    extra
}

/// Without eBPF support there are no pins to read (`ebpf_pins` refused them already).
#[cfg(not(all(feature = "ebpf", target_os = "linux")))]
fn ebpf_counters(_pins: &std::path::Path) -> String {
    String::new()
}
