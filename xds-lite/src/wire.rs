//! The xds-lite wire format (documented in `xds-lite/PROTOCOL.md`): newline-delimited JSON over
//! one long-lived HTTP/2 stream, `POST /v1/stream`. The control plane writes [`Push`] lines; the
//! sidecar writes one [`Ack`] line per push (an ACK, or a NACK with the error), and, to a control
//! plane that advertises them, [`FlowReport`] lines. To a sidecar that advertises the `tap`
//! feature, the control plane may also write [`TapRequest`] lines, answered by [`TapEvent`]
//! lines while the tap runs.

use serde::{Deserialize, Serialize};

use meshgate_policy::PolicySet;
use meshgate_policy::model::{AuthorizationPolicy, MeshConfig, NetworkPolicy, Service};

/// The one resource type of the stream: everything one workload needs, state of the world.
pub const SNAPSHOT_TYPE: &str = "meshgate.dev/v1/WorkloadSnapshot";
/// The stream's path.
pub const STREAM_PATH: &str = "/v1/stream";

/// How often each side of a stream sends an HTTP/2 PING on the connection. A control plane or
/// sidecar whose machine vanished sends no FIN or RST; without pings the other side would wait
/// on the silent connection until TCP gives up (minutes). Ten seconds is cheap for one stream
/// per sidecar.
pub const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);
/// How long a PING may go unanswered before the connection is declared dead and closed, so a
/// lost peer is noticed within `KEEPALIVE_INTERVAL + KEEPALIVE_TIMEOUT` (15 s).
pub const KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The resources of one push (scoped to the receiving workload).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Resources {
    pub policies: Vec<AuthorizationPolicy>,
    pub services: Vec<Service>,
    pub network_policies: Vec<NetworkPolicy>,
    pub mesh_config: MeshConfig,
}

/// Control plane → sidecar.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Push {
    pub type_url: String,
    /// The policy version (same for every sidecar, so drift is a string comparison).
    pub version: String,
    /// Unique per push; the ACK/NACK names it.
    pub nonce: String,
    pub resources: Resources,
}

/// Sidecar → control plane: `error: None` is an ACK of `version`, otherwise a NACK.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Ack {
    pub nonce: String,
    pub version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The response header by which a control plane says it reads [`FlowReport`] lines
/// (value: a comma-separated feature list containing [`FEATURE_FLOW_REPORTS`]). A sidecar sends
/// flow reports only when the header is present: a control plane from before flow reports reads
/// every request line as an ACK, warns on anything else and closes the stream on a line over
/// [`MAX_ACK_BYTES`], so it must never receive one.
pub const FEATURES_HEADER: &str = "x-meshgate-stream-features";
/// Whether `headers` list `feature` in [`FEATURES_HEADER`] (repeated headers and
/// comma-separated lists alike).
pub fn has_feature(headers: &http::HeaderMap, feature: &str) -> bool {
    headers
        .get_all(FEATURES_HEADER)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|f| f.trim() == feature)
}

/// The feature name of flow reports in [`FEATURES_HEADER`].
pub const FEATURE_FLOW_REPORTS: &str = "flow-reports";
/// The type of a [`FlowReport`] line.
pub const FLOW_REPORT_TYPE: &str = "meshgate.dev/v1/FlowReport";

/// One aggregated flow: the decisions of one sidecar (the callee) for one caller, method, path
/// pattern, port, decision and deciding rule, over a report interval. Field names are those of
/// [`meshgate_policy::DecisionRecord`] (the decision log's), so the flow tools read both alike.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Flow {
    pub layer: meshgate_policy::record::Layer,
    /// The caller, as its certificate proved it.
    #[serde(rename = "peer.id")]
    pub peer: String,
    /// The workload whose sidecar decided (the callee).
    #[serde(rename = "meshgate.workload.id")]
    pub workload: String,
    #[serde(default)]
    pub port: u16,
    #[serde(
        rename = "http.request.method",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub method: Option<String>,
    /// A path *pattern*, never a raw path: the deciding rule's path pattern when one matched the
    /// path, else the path cut to its first segment (`/orders/123` → `/orders/*`), so the number
    /// of flows does not grow with IDs in paths. None for L4 and refused requests.
    #[serde(rename = "url.path", default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    pub decision: meshgate_policy::DecisionKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<usize>,
    /// Decisions aggregated into this flow.
    pub count: u64,
    /// Unix seconds of the first and last of them.
    pub first_seen: i64,
    pub last_seen: i64,
    /// How long the HTTP requests of this flow took (the sidecar's request latency), as
    /// [`LatencyHistogram`] bucket counts. Empty for L4 tunnels and from sidecars that predate
    /// it; sent only to a control plane advertising [`FEATURE_FLOW_LATENCY`].
    #[serde(
        rename = "latency.buckets",
        default,
        skip_serializing_if = "Vec::is_empty"
    )]
    pub latency: Vec<u64>,
    /// The trace ID of the most recent traced request of the flow (so the console can link to
    /// a trace viewer); at most [`MAX_TRACE_ID_LEN`] bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
}

/// The feature name of the latency and trace fields of a [`Flow`] in [`FEATURES_HEADER`]. The
/// control plane's `Flow` denies unknown fields, so a sidecar clears them for one that does
/// not advertise this.
pub const FEATURE_FLOW_LATENCY: &str = "flow-latency";
/// Longest trace ID kept on a flow (a W3C trace ID is 32 hex digits).
pub const MAX_TRACE_ID_LEN: usize = 64;

/// Buckets of [`LatencyHistogram`]: bucket `i < LATENCY_BUCKETS - 1` counts durations of at
/// most `64 µs << i` (64 µs … 33.5 s); the last counts everything slower.
pub const LATENCY_BUCKETS: usize = 21;
/// Upper bound of the first bucket, in microseconds.
pub const LATENCY_FIRST_BOUND_US: u64 = 64;

/// Log-scale latency histogram with a fixed number of buckets: counting one request is an
/// index computation and an add (no allocation on the request path), and histograms of many
/// sidecars and intervals merge by adding bucket counts. Quantiles from it are upper bounds
/// with a factor-two resolution, which is what a console needs to tell 1 ms from 100 ms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LatencyHistogram(pub [u64; LATENCY_BUCKETS]);

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self([0; LATENCY_BUCKETS])
    }
}

impl LatencyHistogram {
    /// The bucket a duration falls in.
    pub fn bucket(d: std::time::Duration) -> usize {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        // ceil(us / 64), then the smallest i with 2^i >= that.
        let q = us.div_ceil(LATENCY_FIRST_BOUND_US);
        let i = if q <= 1 {
            0
        } else {
            (u64::BITS - (q - 1).leading_zeros()) as usize
        };
        i.min(LATENCY_BUCKETS - 1)
    }

    /// Upper bound of bucket `i`; `None` for the last (unbounded) one.
    pub fn upper_bound(i: usize) -> Option<std::time::Duration> {
        (i < LATENCY_BUCKETS - 1)
            .then(|| std::time::Duration::from_micros(LATENCY_FIRST_BOUND_US << i))
    }

    pub fn observe(&mut self, d: std::time::Duration) {
        let b = &mut self.0[Self::bucket(d)];
        *b = b.saturating_add(1);
    }

    /// Adds bucket counts as a [`Flow`] carries them; counts past [`LATENCY_BUCKETS`] (a
    /// peer with more buckets) are added to the last, unbounded bucket.
    pub fn merge(&mut self, buckets: &[u64]) {
        for (i, n) in buckets.iter().enumerate() {
            let b = &mut self.0[i.min(LATENCY_BUCKETS - 1)];
            *b = b.saturating_add(*n);
        }
    }

    pub fn count(&self) -> u64 {
        self.0.iter().fold(0u64, |a, b| a.saturating_add(*b))
    }

    /// The `q` quantile (0 < q ≤ 1) as the upper bound of the bucket where the cumulative count
    /// reaches `q` of the total: `None` when empty, `Some(None)` when it is the unbounded one.
    pub fn quantile(&self, q: f64) -> Option<Option<std::time::Duration>> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0u64;
        for (i, n) in self.0.iter().enumerate() {
            seen = seen.saturating_add(*n);
            if seen >= rank {
                return Some(Self::upper_bound(i));
            }
        }
        Some(None)
    }

    /// The counts as a [`Flow`] carries them: empty when nothing was counted, else without
    /// trailing zero buckets.
    pub fn to_wire(&self) -> Vec<u64> {
        let len = self.0.iter().rposition(|n| *n > 0).map_or(0, |i| i + 1);
        self.0[..len].to_vec()
    }
}

impl Flow {
    /// Allowed because an enforce-mode ALLOW rule matched, rather than by the mesh default, and
    /// not marked by a dry-run policy that would deny it (only an ALLOW policy names a rule on
    /// an allowed decision). What policy coverage counts as covered.
    pub fn explicitly_allowed(&self) -> bool {
        use meshgate_policy::DecisionKind as K;
        matches!(self.decision, K::Allow | K::Audit) && self.rule.is_some()
    }

    /// The request or tunnel passed (allow, audit, dry-run-deny).
    pub fn passed(&self) -> bool {
        use meshgate_policy::DecisionKind as K;
        matches!(self.decision, K::Allow | K::Audit | K::DryRunDeny)
    }
}

/// Sidecar → control plane, every report interval (only to a control plane advertising
/// [`FEATURE_FLOW_REPORTS`]): the flows aggregated since the last report. One interval may be
/// split over several lines, each below [`MAX_ACK_BYTES`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FlowReport {
    pub type_url: String,
    pub flows: Vec<Flow>,
    /// Decisions not aggregated because the sidecar's cap on distinct flows per interval was
    /// reached (they are counted here and in `meshgate_flow_cardinality_overflow_total`).
    #[serde(default)]
    pub overflow: u64,
    /// The eBPF redirect's verdicts since the last report (only to a control plane advertising
    /// [`FEATURE_FLOW_L3L4`]; an older one's `FlowReport` denies unknown fields). At most
    /// [`MAX_L3L4_PER_REPORT`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub l3l4: Vec<L3L4Flow>,
    /// Connections (or packets) of verdicts left out of `l3l4` by the cap.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub l3l4_overflow: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The feature name of [`FlowReport::l3l4`] in [`FEATURES_HEADER`].
pub const FEATURE_FLOW_L3L4: &str = "flow-l3l4";
/// Most [`L3L4Flow`]s in one report: the eBPF counters are keyed by port and verdict, so a
/// port scan could make thousands; the largest counts are kept, the rest counted in
/// [`FlowReport::l3l4_overflow`]. 256 of them make a line of about 25 KiB, well below
/// [`MAX_ACK_BYTES`].
pub const MAX_L3L4_PER_REPORT: usize = 256;

/// Which way an eBPF verdict's traffic went, seen from the reporting workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// The workload's app connected (or sent UDP) out.
    Egress,
    /// Packets on their way into one of the workload's app ports.
    Ingress,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Egress => "egress",
            Direction::Ingress => "ingress",
        }
    }
}

/// The eBPF verdicts that are reported as [`L3L4Flow`]s, by their stable names (those of
/// `meshgate_ebpf::Verdict::as_str` and the sidecar's `meshgate_ebpf_*` metrics), with their
/// direction. Every denial, and `allowed`: direct egress past the sidecar, so operators see
/// what leaves the mesh. Not `redirected` (those connections are reported by the sidecar as
/// L7/L4 flows with the caller's identity) nor `exempt` (loopback and `--exempt`).
pub const L3L4_VERDICTS: [(&str, Direction); 5] = [
    ("allowed", Direction::Egress),
    ("denied_egress", Direction::Egress),
    ("denied_ingress", Direction::Ingress),
    ("denied_ipv6", Direction::Egress),
    ("denied_udp_mesh", Direction::Egress),
];

/// The reported verdict named `name` (as a `'static` name) and its direction; `None` for a
/// verdict that is not reported or not known.
pub fn l3l4_verdict(name: &str) -> Option<(&'static str, Direction)> {
    L3L4_VERDICTS.into_iter().find(|(v, _)| *v == name)
}

/// What the eBPF redirect decided for one (destination port, verdict) of the reporting
/// workload between two reads of its counters. Not a [`Flow`]: the kernel counters carry no
/// caller identity and no address, only the port (the destination port of an egress connect,
/// the app port of a dropped ingress packet) and the verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct L3L4Flow {
    pub direction: Direction,
    pub port: u16,
    /// One of [`L3L4_VERDICTS`].
    pub verdict: String,
    /// Connections (UDP sends; dropped packets for `denied_ingress`).
    pub count: u64,
    /// Unix seconds of the counter reads between which they happened (the counters are
    /// sampled, so the events themselves are not timed).
    pub first_seen: i64,
    pub last_seen: i64,
}

impl L3L4Flow {
    /// A denial (`denied_*`), as opposed to direct egress that was let through.
    pub fn denied(&self) -> bool {
        self.verdict.starts_with("denied_")
    }
}

/// What the control plane of a stream says it reads, from its [`FEATURES_HEADER`] values.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamFeatures {
    /// [`FEATURE_FLOW_REPORTS`]: any [`FlowReport`] at all.
    pub flow_reports: bool,
    /// [`FEATURE_FLOW_LATENCY`]: latency buckets and trace IDs on flows.
    pub flow_latency: bool,
    /// [`FEATURE_FLOW_L3L4`]: eBPF verdicts on reports.
    pub flow_l3l4: bool,
}

impl StreamFeatures {
    /// Reads header values (each a comma-separated list); unknown names are ignored.
    pub fn parse<'a>(values: impl IntoIterator<Item = &'a str>) -> Self {
        let mut f = Self::default();
        for name in values.into_iter().flat_map(|v| v.split(',')).map(str::trim) {
            match name {
                FEATURE_FLOW_REPORTS => f.flow_reports = true,
                FEATURE_FLOW_LATENCY => f.flow_latency = true,
                FEATURE_FLOW_L3L4 => f.flow_l3l4 = true,
                _ => {}
            }
        }
        f
    }
}

impl FlowReport {
    /// A report of `flows`, with the sidecar's `overflow` count and no eBPF verdicts.
    pub fn new(flows: Vec<Flow>, overflow: u64) -> Self {
        Self {
            type_url: FLOW_REPORT_TYPE.to_string(),
            flows,
            overflow,
            l3l4: Vec::new(),
            l3l4_overflow: 0,
        }
    }

    /// The report without the fields a control plane that does not advertise them would
    /// refuse (its types deny unknown fields, and one refused line loses the whole line):
    /// latency buckets and trace IDs without [`FEATURE_FLOW_LATENCY`], eBPF verdicts without
    /// [`FEATURE_FLOW_L3L4`].
    pub fn for_features(mut self, features: &StreamFeatures) -> Self {
        if !features.flow_latency {
            for f in &mut self.flows {
                (f.latency, f.trace_id) = (Vec::new(), None);
            }
        }
        if !features.flow_l3l4 {
            (self.l3l4, self.l3l4_overflow) = (Vec::new(), 0);
        }
        self
    }

    /// The report as lines of at most `max` bytes: the flows as [`report_lines`] cuts them,
    /// then the eBPF verdicts (at most [`MAX_L3L4_PER_REPORT`], so they fit) on a line of
    /// their own.
    pub fn into_lines(self, max: usize) -> Vec<Vec<u8>> {
        let mut lines = report_lines(self.flows, self.overflow, max);
        let (mut l3l4, mut l3l4_overflow) = (self.l3l4, self.l3l4_overflow);
        if l3l4.len() > MAX_L3L4_PER_REPORT {
            let cut: u64 = l3l4.drain(MAX_L3L4_PER_REPORT..).map(|f| f.count).sum();
            l3l4_overflow = l3l4_overflow.saturating_add(cut);
        }
        if !l3l4.is_empty() || l3l4_overflow > 0 {
            let mut line = serde_json::to_vec(&FlowReport {
                l3l4,
                l3l4_overflow,
                ..FlowReport::new(Vec::new(), 0)
            })
            .expect("report serializes");
            line.push(b'\n');
            lines.push(line);
        }
        lines
    }
}

/// A line of the request body: an ACK/NACK, or (from sidecars that know them) a flow report or
/// a tap event. Told apart by shape (each refuses unknown fields): a report has `flows`, a tap
/// event `id`, an ACK `nonce`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum ClientMessage {
    Flows(FlowReport),
    Tap(TapEvent),
    Ack(Ack),
}

/// The feature name by which a *sidecar* says, in its stream request's [`FEATURES_HEADER`],
/// that it reads [`TapRequest`] lines. A control plane sends them to such sidecars only: a
/// sidecar from before taps parses every response line as a [`Push`] (unknown fields denied),
/// so a tap request would end its stream.
pub const FEATURE_TAP: &str = "tap";
/// The type of a [`TapRequest`] line.
pub const TAP_REQUEST_TYPE: &str = "meshgate.dev/v1/TapRequest";
/// The type of a [`TapEvent`] line.
pub const TAP_EVENT_TYPE: &str = "meshgate.dev/v1/TapEvent";
/// Longest a tap runs without being renewed: a control plane that went away stops costing its
/// sidecars anything within a minute even if the stream survived.
pub const MAX_TAP_SECONDS: u32 = 60;
/// Tap events a sidecar sends per second unless asked for fewer (Linkerd's tap defaults to a
/// similar trickle): enough to watch, too few to load the stream or the control plane.
pub const DEFAULT_TAP_RATE: u32 = 50;
/// The most a sidecar sends per second whatever it is asked.
pub const MAX_TAP_RATE: u32 = 200;
/// Longest raw path kept in a tap event, in bytes (cut at a character boundary, with `…`):
/// enough to recognise a request, short enough that 1000 events stay small.
pub const MAX_TAP_PATH_BYTES: usize = 512;
/// Most callers or decisions a [`TapFilter`] lists; a longer list is treated as "any".
pub const MAX_TAP_FILTER_ENTRIES: usize = 16;

/// Control plane → sidecar (only to a sidecar advertising [`FEATURE_TAP`]): send the decisions
/// matching `filter` as [`TapEvent`] lines, at most `max_per_second` (capped at
/// [`MAX_TAP_RATE`]), for `seconds` from now (capped at [`MAX_TAP_SECONDS`]). A new request
/// replaces the previous one; `seconds: 0` stops the tap. A relative duration, not a deadline:
/// the two machines' clocks need not agree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TapRequest {
    pub type_url: String,
    /// Names the tap; the sidecar's events carry it.
    pub id: String,
    pub seconds: u32,
    #[serde(default)]
    pub filter: TapFilter,
    pub max_per_second: u32,
}

/// Which decisions a tap sends: empty lists match anything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TapFilter {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub decisions: Vec<meshgate_policy::DecisionKind>,
    /// Callers' SPIFFE IDs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub callers: Vec<String>,
}

impl TapFilter {
    /// Whether a decision of `caller` of kind `decision` is tapped (no allocation: it runs for
    /// every decision while a tap is on).
    pub fn matches(&self, caller: &str, decision: meshgate_policy::DecisionKind) -> bool {
        (self.decisions.is_empty() || self.decisions.contains(&decision))
            && (self.callers.is_empty() || self.callers.iter().any(|c| c == caller))
    }
}

/// Sidecar → control plane while a tap runs: one decision, and the decisions that matched but
/// were not sent since the previous line (over the rate limit, or the queue to the stream was
/// full). A line may carry only `dropped` (sent once a second while there are some).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TapEvent {
    pub type_url: String,
    /// The [`TapRequest::id`] this answers.
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<TapRecord>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub dropped: u64,
}

/// One decision as a tap shows it: the fields of [`meshgate_policy::DecisionRecord`] under the
/// decision log's names, plus when, the response status and how long the sidecar took. The
/// path is the raw one (`meshgate.path.original` when the caller sent something else than what
/// was judged): a tap is live and not stored, unlike flows, whose paths are patterns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TapRecord {
    /// Unix milliseconds of the decision (the sidecar's clock).
    pub time_ms: i64,
    pub layer: meshgate_policy::record::Layer,
    #[serde(rename = "peer.id")]
    pub peer: String,
    /// The deciding sidecar's workload; the control plane replaces it with the stream's
    /// authenticated identity.
    #[serde(rename = "meshgate.workload.id")]
    pub workload: String,
    #[serde(default)]
    pub port: u16,
    #[serde(
        rename = "http.request.method",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub method: Option<String>,
    /// The normalized path that was judged.
    #[serde(rename = "url.path", default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The target as sent, when it differs from `url.path` or could not be normalized.
    #[serde(
        rename = "meshgate.path.original",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub original: Option<String>,
    pub decision: meshgate_policy::DecisionKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<usize>,
    #[serde(
        rename = "http.response.status_code",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub status: Option<u16>,
    /// How long the sidecar took from the request to the response headers (HTTP only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_us: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
}

/// `text` cut to at most `max` bytes at a character boundary, marked with `…` when cut.
pub fn cap_text(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// A line of the response body, as a sidecar that reads taps sees it.
#[derive(Debug, Clone, PartialEq)]
pub enum ServerMessage {
    Push(Push),
    Tap(TapRequest),
}

impl ServerMessage {
    /// Parses a response line: a push (the usual, large case, parsed once), else a tap request.
    /// A line that is neither reports the push parser's error, the one that says what is wrong
    /// with a snapshot.
    pub fn parse(line: &[u8]) -> Result<Self, serde_json::Error> {
        match serde_json::from_slice::<Push>(line) {
            Ok(push) => Ok(Self::Push(push)),
            Err(e) => serde_json::from_slice::<TapRequest>(line)
                .map(Self::Tap)
                .map_err(|_| e),
        }
    }
}

/// `flows` as report lines (newline-terminated), each at most `max` bytes, the overflow count on
/// the first. A flow that alone exceeds `max` (it cannot: IDs, method and pattern are bounded
/// far below) would be dropped and counted as overflow rather than break the stream.
pub fn report_lines(flows: Vec<Flow>, overflow: u64, max: usize) -> Vec<Vec<u8>> {
    let mut lines = Vec::new();
    let mut overflow = overflow;
    let mut batch: Vec<Flow> = Vec::new();
    let mut size = 0usize;
    // Envelope without flows, plus a margin for the overflow number.
    let envelope = FLOW_REPORT_TYPE.len() + 64;
    let flush = |batch: &mut Vec<Flow>, overflow: &mut u64, lines: &mut Vec<Vec<u8>>| {
        let mut line = serde_json::to_vec(&FlowReport::new(
            std::mem::take(batch),
            std::mem::take(overflow),
        ))
        .expect("report serializes");
        line.push(b'\n');
        lines.push(line);
    };
    for flow in flows {
        let len = serde_json::to_vec(&flow).map_or(usize::MAX, |v| v.len()) + 1;
        if len.saturating_add(envelope) > max {
            overflow += flow.count;
            continue;
        }
        if size + len + envelope > max {
            flush(&mut batch, &mut overflow, &mut lines);
            size = 0;
        }
        size += len;
        batch.push(flow);
    }
    if !batch.is_empty() || overflow > 0 {
        flush(&mut batch, &mut overflow, &mut lines);
    }
    lines
}

impl Push {
    /// A push of `set` (already scoped).
    pub fn new(set: PolicySet, nonce: String) -> Self {
        Self {
            type_url: SNAPSHOT_TYPE.to_string(),
            version: set.version.clone(),
            nonce,
            resources: Resources {
                policies: set.policies,
                services: set.services,
                network_policies: set.network_policies,
                mesh_config: set.mesh_config,
            },
        }
    }

    /// The pushed resources as a policy set (for compiling on the sidecar).
    pub fn into_set(self) -> Result<PolicySet, UnknownResourceType> {
        if self.type_url != SNAPSHOT_TYPE {
            return Err(UnknownResourceType(self.type_url));
        }
        Ok(PolicySet {
            policies: self.resources.policies,
            services: self.resources.services,
            network_policies: self.resources.network_policies,
            mesh_config: self.resources.mesh_config,
            version: self.version,
        })
    }
}

/// A push of a resource type this sidecar does not know (a newer control plane): NACKed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown resource type {0:?}: this sidecar understands {SNAPSHOT_TYPE:?} only (upgrade the sidecar)"
)]
pub struct UnknownResourceType(pub String);

/// Largest push (one snapshot line) a sidecar accepts, and the control plane sends: 16 MiB.
///
/// A push is one workload's scoped view: its own policies plus every Service. The control plane
/// refuses policy directories above [`meshgate_policy::load::MAX_POLICY_DIR_BYTES`] (8 MiB of YAML), and
/// JSON of the same documents is at most about twice that, so a valid mesh stays below this;
/// anything larger is a bug or an attack, and buffering it would cost the sidecar its memory.
pub const MAX_PUSH_BYTES: usize = 16 * 1024 * 1024;

// A policy directory the loader accepts, as JSON, fits one push.
const _: () = assert!(2 * meshgate_policy::load::MAX_POLICY_DIR_BYTES <= MAX_PUSH_BYTES as u64);

/// Largest ACK/NACK line the control plane reads: 64 KiB. An ACK is a nonce and a version; a
/// NACK adds an error text, which sidecars cap at [`MAX_NACK_ERROR_CHARS`].
pub const MAX_ACK_BYTES: usize = 64 * 1024;

/// Longest NACK error text that is sent, logged or kept for `meshgate status`: 4096 characters
/// (a `file:line: reason` list of a few dozen problems). Longer texts are cut with a marker.
pub const MAX_NACK_ERROR_CHARS: usize = 4096;

/// A line longer than the limit of its direction.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a line of {len} bytes or more exceeds the {limit}-byte limit")]
pub struct LineTooLong {
    /// Bytes of the line seen so far (at least; the rest was not read).
    pub len: usize,
    pub limit: usize,
}

/// Splits a byte stream into lines, keeping an incomplete tail for the next chunk; a line longer
/// than `max` is an error (a peer cannot make us buffer without bound).
///
/// Linear in the bytes received: each chunk is scanned once for newlines (never the buffered
/// tail again), and complete lines are removed from the buffer in one move per chunk. Rescanning
/// the tail per chunk made a 50 MB push cost minutes of CPU.
#[derive(Debug, Default)]
pub struct LineBuffer {
    pending: Vec<u8>,
    scanned: u64,
}

impl LineBuffer {
    pub fn push(&mut self, chunk: &[u8], max: usize) -> Result<Vec<Vec<u8>>, LineTooLong> {
        let mut lines = Vec::new();
        let mut line_start = 0;
        let mut cursor = self.pending.len();
        self.pending.extend_from_slice(chunk);
        while let Some(i) = self.pending[cursor..].iter().position(|b| *b == b'\n') {
            let end = cursor + i;
            self.scanned += (i + 1) as u64;
            if end - line_start > max {
                return Err(self.too_long(end - line_start, max));
            }
            lines.push(self.pending[line_start..end].to_vec());
            line_start = end + 1;
            cursor = end + 1;
        }
        self.scanned += (self.pending.len() - cursor) as u64;
        self.pending.drain(..line_start);
        if self.pending.len() > max {
            return Err(self.too_long(self.pending.len(), max));
        }
        Ok(lines)
    }

    /// Bytes examined for newlines so far: equals the bytes received when the scan is linear.
    pub fn scanned(&self) -> u64 {
        self.scanned
    }

    fn too_long(&mut self, len: usize, limit: usize) -> LineTooLong {
        // The stream is abandoned after this; free the memory now.
        self.pending = Vec::new();
        LineTooLong { len, limit }
    }
}

/// Peer-supplied text (a NACK's error) made safe for one log field or status line: control
/// characters (newlines, escape sequences) are escaped as `\n`, `\u{1b}`…, so a peer cannot
/// forge log lines or move a terminal's cursor, and the result is cut at `max` characters.
pub fn sanitize_peer_text(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max));
    for (n, c) in text.chars().enumerate() {
        if n >= max {
            out.push_str("…(truncated)");
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn line_buffer_splits_across_chunks_and_bounds_lines() {
        let mut b = LineBuffer::default();
        assert_eq!(
            b.push(b"{\"a\":1}\n{\"b\"", 100).unwrap(),
            vec![b"{\"a\":1}".to_vec()]
        );
        assert_eq!(b.push(b":2}\n", 100).unwrap(), vec![b"{\"b\":2}".to_vec()]);
        assert!(b.push(&[b'x'; 200], 100).is_err());
        // A complete line over the limit in one chunk is refused too.
        let mut b = LineBuffer::default();
        let mut long = vec![b'x'; 200];
        long.push(b'\n');
        assert_eq!(
            b.push(&long, 100),
            Err(LineTooLong {
                len: 200,
                limit: 100
            })
        );
    }

    /// A 20 MB line in 4 KiB chunks, then many short lines in one chunk: every byte is examined
    /// once (the quadratic version examined ~50 GB for the long line).
    #[test]
    fn line_buffer_scans_each_byte_once() {
        let mut b = LineBuffer::default();
        let chunk = [b'x'; 4096];
        let total = 20 * 1024 * 1024;
        let mut fed = 0u64;
        for _ in 0..total / chunk.len() {
            assert!(b.push(&chunk, 32 * 1024 * 1024).unwrap().is_empty());
            fed += chunk.len() as u64;
        }
        let lines = b.push(b"\n", 32 * 1024 * 1024).unwrap();
        fed += 1;
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].len(), total);
        assert_eq!(b.scanned(), fed);
        let many = b"{}\n".repeat(100_000);
        assert_eq!(b.push(&many, 1024).unwrap().len(), 100_000);
        fed += many.len() as u64;
        assert_eq!(b.scanned(), fed);
    }

    #[test]
    fn peer_text_is_one_escaped_capped_field() {
        let forged = "bad\n{\"event\":\"control_plane.ack\"}\r\u{1b}[2J";
        let clean = sanitize_peer_text(forged, 100);
        assert!(!clean.chars().any(char::is_control), "{clean}");
        assert_eq!(clean, r#"bad\n{"event":"control_plane.ack"}\r\u{1b}[2J"#);
        let long = "é".repeat(10);
        assert_eq!(sanitize_peer_text(&long, 4), "éééé…(truncated)");
    }

    /// Found by the `stream_decoder` fuzz target (fuzz/corpus/stream_decoder/regress-*): a line
    /// longer than `max` was accepted when its newline arrived in the same chunk as the bytes
    /// that made it too long, and refused only when the excess sat in the pending tail.
    #[test]
    fn line_buffer_refuses_a_long_line_whatever_the_chunking() {
        let line = b"0123456789\n";
        for cut in 0..=line.len() {
            let mut b = LineBuffer::default();
            let result = b
                .push(&line[..cut], 5)
                .and_then(|_| b.push(&line[cut..], 5));
            assert!(result.is_err(), "cut at {cut}: {result:?}");
        }
        // The whole line in one chunk, after a line that is fine.
        let mut b = LineBuffer::default();
        assert!(b.push(b"ok\n0123456789\nok\n", 5).is_err());
        // Exactly `max` bytes is fine, complete or pending.
        let mut b = LineBuffer::default();
        assert_eq!(b.push(b"01234\n56789", 5).unwrap(), vec![b"01234".to_vec()]);
        assert_eq!(b.push(b"\n", 5).unwrap(), vec![b"56789".to_vec()]);
    }

    #[test]
    fn line_buffer_keeps_empty_lines_and_cr() {
        let mut b = LineBuffer::default();
        let lines = b.push(b"\n\na\r\n", 5).unwrap();
        assert_eq!(lines, vec![b"".to_vec(), b"".to_vec(), b"a\r".to_vec()]);
        let many = vec![b'\n'; 100_000];
        assert_eq!(b.push(&many, 5).unwrap().len(), 100_000);
    }

    fn flow(i: usize) -> Flow {
        Flow {
            layer: meshgate_policy::record::Layer::L7,
            peer: format!("spiffe://mesh.local/ns/shop/sa/caller-{i}"),
            workload: "spiffe://mesh.local/ns/shop/sa/orders".into(),
            port: 8080,
            method: Some("GET".into()),
            path: Some("/orders/*".into()),
            decision: meshgate_policy::DecisionKind::Allow,
            policy: Some("shop/orders".into()),
            rule: Some(0),
            count: 2,
            first_seen: 1,
            last_seen: 2,
            latency: vec![],
            trace_id: None,
        }
    }

    /// Bucket boundaries: each bound belongs to its own bucket, one microsecond more to the next.
    #[test]
    fn latency_buckets_at_their_boundaries() {
        let us = Duration::from_micros;
        for (d, want) in [
            (Duration::ZERO, 0),
            (us(1), 0),
            (us(64), 0),
            (us(65), 1),
            (us(128), 1),
            (us(129), 2),
            (us(1000), 4),                    // ≤ 1024 µs
            (us(1025), 5),                    // ≤ 2048 µs
            (Duration::from_millis(100), 11), // ≤ 131 ms
            (us(64 << 19), 19),               // 33.5 s
            (us((64 << 19) + 1), 20),
            (Duration::from_secs(3600), 20),
            (Duration::MAX, 20),
        ] {
            assert_eq!(LatencyHistogram::bucket(d), want, "{d:?}");
        }
        assert_eq!(LatencyHistogram::upper_bound(0), Some(us(64)));
        assert_eq!(LatencyHistogram::upper_bound(19), Some(us(64 << 19)));
        assert_eq!(LatencyHistogram::upper_bound(20), None);
    }

    /// Quantiles are the upper bound of the bucket where the cumulative count reaches them.
    #[test]
    fn latency_quantiles_from_buckets() {
        let us = Duration::from_micros;
        let hist = |counts: &[(usize, u64)]| {
            let mut h = LatencyHistogram::default();
            for (i, n) in counts {
                h.0[*i] = *n;
            }
            h
        };
        for (counts, q, want) in [
            (vec![], 0.5, None),
            (vec![(3, 1)], 0.5, Some(Some(us(512)))),
            (vec![(3, 1)], 0.99, Some(Some(us(512)))),
            // 50 fast, 50 slow: p50 is the fast bucket, p51 the slow one.
            (vec![(0, 50), (10, 50)], 0.5, Some(Some(us(64)))),
            (vec![(0, 50), (10, 50)], 0.51, Some(Some(us(64 << 10)))),
            // 99 fast, one in the unbounded bucket: p99 fast, p100 unbounded.
            (vec![(2, 99), (20, 1)], 0.99, Some(Some(us(256)))),
            (vec![(2, 99), (20, 1)], 1.0, Some(None)),
            (vec![(2, 98), (20, 2)], 0.99, Some(None)),
        ] {
            assert_eq!(hist(&counts).quantile(q), want, "{counts:?} q={q}");
        }
    }

    /// Merging adds bucket counts; a longer peer histogram folds into the last bucket, and the
    /// wire form drops trailing empty buckets.
    #[test]
    fn latency_histograms_merge() {
        let mut h = LatencyHistogram::default();
        h.observe(Duration::from_micros(10));
        h.observe(Duration::from_millis(3));
        assert_eq!(h.to_wire(), vec![1, 0, 0, 0, 0, 0, 1]);
        h.merge(&[2, 1]);
        h.merge(&[1; LATENCY_BUCKETS + 2]);
        assert_eq!(h.0[0], 4);
        assert_eq!(h.0[1], 2);
        assert_eq!(h.0[6], 2);
        assert_eq!(h.0[LATENCY_BUCKETS - 1], 3);
        assert_eq!(h.count(), 2 + 3 + (LATENCY_BUCKETS as u64 + 2));
        h.merge(&[u64::MAX]);
        assert_eq!(h.0[0], u64::MAX, "saturates");
        assert!(LatencyHistogram::default().to_wire().is_empty());
        // An old peer's flow (no latency field) reads, and an empty histogram is not written.
        let mut f = flow(0);
        let line = serde_json::to_string(&f).unwrap();
        assert!(
            !line.contains("latency") && !line.contains("trace"),
            "{line}"
        );
        f.latency = h.to_wire();
        f.trace_id = Some("4bf92f3577b34da6a3ce929d0e0e4736".into());
        let back: Flow = serde_json::from_str(&serde_json::to_string(&f).unwrap()).unwrap();
        assert_eq!(back, f);
    }

    /// Reports are split into lines under the limit, every flow lands exactly once, the
    /// overflow travels once, and each line reads back as a flow report (never as an ACK).
    #[test]
    fn report_lines_split_under_the_limit() {
        for (flows, overflow, max, want_lines) in [
            (0, 0, MAX_ACK_BYTES, 0),
            (0, 7, MAX_ACK_BYTES, 1),
            (3, 0, MAX_ACK_BYTES, 1),
            (1000, 4, MAX_ACK_BYTES, 5),
            (10, 0, 1000, 4),
        ] {
            let lines = report_lines((0..flows).map(flow).collect(), overflow, max);
            assert_eq!(lines.len(), want_lines, "{flows} flows, max {max}");
            let mut seen = Vec::new();
            let mut overflow_seen = 0;
            for line in &lines {
                assert!(line.len() <= max, "{} > {max}", line.len());
                assert_eq!(line.last(), Some(&b'\n'));
                match serde_json::from_slice::<ClientMessage>(line).unwrap() {
                    ClientMessage::Flows(r) => {
                        assert_eq!(r.type_url, FLOW_REPORT_TYPE);
                        overflow_seen += r.overflow;
                        seen.extend(r.flows);
                    }
                    other => panic!("not read as a report: {other:?}"),
                }
            }
            assert_eq!(seen, (0..flows).map(flow).collect::<Vec<_>>());
            assert_eq!(overflow_seen, overflow);
        }
        // A flow too large for any line is counted, not sent.
        let lines = report_lines(vec![flow(1)], 0, 100);
        let ClientMessage::Flows(r) = serde_json::from_slice(&lines[0]).unwrap() else {
            panic!()
        };
        assert_eq!((r.flows.len(), r.overflow), (0, 2));
    }

    #[test]
    fn stream_features_are_read_from_every_header_value() {
        let f = |reports, latency, l3l4| StreamFeatures {
            flow_reports: reports,
            flow_latency: latency,
            flow_l3l4: l3l4,
        };
        let cases: &[(&[&str], StreamFeatures)] = &[
            (&[], f(false, false, false)),
            (&["flow-reports"], f(true, false, false)),
            (&["flow-reports,flow-latency"], f(true, true, false)),
            (
                &["flow-reports, flow-latency ,flow-l3l4"],
                f(true, true, true),
            ),
            (&["flow-reports", "flow-l3l4,tap"], f(true, false, true)),
            // Names are exact: no prefix or case games.
            (&["flow-l3l4x,Flow-Reports,flow"], f(false, false, false)),
        ];
        for (values, want) in cases {
            assert_eq!(
                StreamFeatures::parse(values.iter().copied()),
                *want,
                "{values:?}"
            );
        }
    }

    fn l3l4(port: u16, verdict: &str, count: u64) -> L3L4Flow {
        L3L4Flow {
            direction: l3l4_verdict(verdict).map_or(Direction::Egress, |(_, d)| d),
            port,
            verdict: verdict.into(),
            count,
            first_seen: 100,
            last_seen: 105,
        }
    }

    /// The `FlowReport` and `Flow` of a control plane from before eBPF verdicts and latency
    /// (field for field what it had, unknown fields denied), to prove what it accepts.
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    #[allow(dead_code)]
    struct OldFlowReport {
        type_url: String,
        flows: Vec<OldFlow>,
        #[serde(default)]
        overflow: u64,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct OldFlow {
        layer: meshgate_policy::record::Layer,
        #[serde(rename = "peer.id")]
        peer: String,
        #[serde(rename = "meshgate.workload.id")]
        workload: String,
        #[serde(default)]
        port: u16,
        #[serde(rename = "http.request.method", default)]
        method: Option<String>,
        #[serde(rename = "url.path", default)]
        path: Option<String>,
        decision: meshgate_policy::DecisionKind,
        #[serde(default)]
        policy: Option<String>,
        #[serde(default)]
        rule: Option<usize>,
        count: u64,
        first_seen: i64,
        last_seen: i64,
    }

    /// A report carrying eBPF verdicts and latency loses each unless the control plane
    /// advertised it: every line then reads as that control plane's report (an older one
    /// refuses unknown fields); with the features, nothing is lost.
    #[test]
    fn reports_are_stripped_to_what_the_control_plane_reads() {
        let full = || {
            let mut f = flow(1);
            (f.latency, f.trace_id) = (vec![1, 2], Some("abcd".into()));
            FlowReport {
                l3l4: vec![l3l4(9001, "denied_egress", 3)],
                l3l4_overflow: 4,
                ..FlowReport::new(vec![f], 0)
            }
        };
        // Features advertised → (latency kept, eBPF verdicts kept).
        for (header, latency, ebpf) in [
            ("flow-reports", false, false),
            ("flow-reports,flow-latency", true, false),
            ("flow-reports,flow-l3l4", false, true),
            ("flow-reports,flow-latency,flow-l3l4", true, true),
        ] {
            let features = StreamFeatures::parse([header]);
            let lines = full().for_features(&features).into_lines(MAX_ACK_BYTES);
            let mut back = FlowReport::new(Vec::new(), 0);
            for line in &lines {
                let ClientMessage::Flows(r) = serde_json::from_slice(line).unwrap() else {
                    panic!("{header}: not a report")
                };
                // An old control plane reads every line that carries nothing new to it, and
                // with `flow-reports` alone that is every line.
                let carries_new = !r.l3l4.is_empty()
                    || r.l3l4_overflow > 0
                    || r.flows
                        .iter()
                        .any(|f| !f.latency.is_empty() || f.trace_id.is_some());
                let old = serde_json::from_slice::<OldFlowReport>(line);
                assert_eq!(
                    old.is_ok(),
                    !carries_new,
                    "{header}: {}",
                    String::from_utf8_lossy(line)
                );
                assert!(old.is_ok() || latency || ebpf, "{header}");
                back.flows.extend(r.flows);
                back.l3l4.extend(r.l3l4);
                back.l3l4_overflow += r.l3l4_overflow;
            }
            assert_eq!(back.flows.len(), 1, "{header}");
            assert_eq!(!back.flows[0].latency.is_empty(), latency, "{header}");
            assert_eq!(back.flows[0].trace_id.is_some(), latency, "{header}");
            assert_eq!(
                (back.l3l4.len(), back.l3l4_overflow),
                if ebpf { (1, 4) } else { (0, 0) },
                "{header}"
            );
            assert_eq!(lines.len(), if ebpf { 2 } else { 1 }, "{header}");
        }
    }

    /// A report at the cap, with the longest verdict names and the largest numbers, fits one
    /// line; more than the cap is cut and counted, never sent past the line limit.
    #[test]
    fn l3l4_lines_are_capped_and_fit() {
        let worst = |i: usize| L3L4Flow {
            count: u64::MAX / 1024,
            first_seen: i64::MIN,
            last_seen: i64::MAX,
            ..l3l4(u16::MAX - i as u16, "denied_udp_mesh", 0)
        };
        let report = FlowReport {
            l3l4: (0..MAX_L3L4_PER_REPORT + 3).map(worst).collect(),
            ..FlowReport::new(Vec::new(), 0)
        };
        let lines = report.into_lines(MAX_ACK_BYTES);
        assert_eq!(lines.len(), 1);
        assert!(lines[0].len() <= MAX_ACK_BYTES, "{}", lines[0].len());
        let ClientMessage::Flows(r) = serde_json::from_slice(&lines[0]).unwrap() else {
            panic!()
        };
        assert_eq!(r.l3l4.len(), MAX_L3L4_PER_REPORT);
        assert_eq!(r.l3l4_overflow, 3 * (u64::MAX / 1024));
        assert_eq!(r.l3l4[0], worst(0));
        // Nothing to say, no line.
        assert!(
            FlowReport::new(Vec::new(), 0)
                .into_lines(MAX_ACK_BYTES)
                .is_empty()
        );
    }

    #[test]
    fn reported_verdicts_and_their_directions() {
        for (name, want) in [
            ("allowed", Some(Direction::Egress)),
            ("denied_egress", Some(Direction::Egress)),
            ("denied_ingress", Some(Direction::Ingress)),
            ("denied_ipv6", Some(Direction::Egress)),
            ("denied_udp_mesh", Some(Direction::Egress)),
            ("redirected", None),
            ("exempt", None),
            ("sidecar", None),
            ("denied", None),
            ("", None),
        ] {
            assert_eq!(l3l4_verdict(name).map(|(_, d)| d), want, "{name}");
        }
        assert!(l3l4(1, "denied_ipv6", 1).denied());
        assert!(!l3l4(1, "allowed", 1).denied());
        assert_eq!(
            serde_json::to_string(&l3l4(9001, "denied_egress", 2)).unwrap(),
            r#"{"direction":"egress","port":9001,"verdict":"denied_egress","count":2,"first_seen":100,"last_seen":105}"#
        );
    }

    #[test]
    fn acks_still_read_as_acks() {
        let line = br#"{"nonce":"n","version":"v"}"#;
        assert!(matches!(
            serde_json::from_slice::<ClientMessage>(line).unwrap(),
            ClientMessage::Ack(_)
        ));
        assert!(serde_json::from_slice::<ClientMessage>(br#"{"nonce":"n"}"#).is_err());
    }

    fn tap_record() -> TapRecord {
        TapRecord {
            time_ms: 1_764_646_800_123,
            layer: meshgate_policy::record::Layer::L7,
            peer: "spiffe://mesh.local/ns/shop/sa/web".into(),
            workload: "spiffe://mesh.local/ns/shop/sa/payments".into(),
            port: 8080,
            method: Some("GET".into()),
            path: Some("/admin/users/42".into()),
            original: Some("/admin/./users/42".into()),
            decision: meshgate_policy::DecisionKind::Deny,
            policy: Some("shop/payments-admin".into()),
            rule: Some(0),
            status: Some(403),
            latency_us: Some(180),
            trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736".into()),
        }
    }

    /// Tap lines read back as themselves, each in its direction's message type, under the
    /// decision log's field names; a minimal event and a stop are valid too.
    #[test]
    fn tap_lines_round_trip() {
        let request = TapRequest {
            type_url: TAP_REQUEST_TYPE.into(),
            id: "a1b2".into(),
            seconds: MAX_TAP_SECONDS,
            filter: TapFilter {
                decisions: vec![meshgate_policy::DecisionKind::Deny],
                callers: vec!["spiffe://mesh.local/ns/shop/sa/web".into()],
            },
            max_per_second: DEFAULT_TAP_RATE,
        };
        let line = serde_json::to_vec(&request).unwrap();
        assert_eq!(
            ServerMessage::parse(&line).unwrap(),
            ServerMessage::Tap(request.clone())
        );
        let stop = br#"{"typeUrl":"meshgate.dev/v1/TapRequest","id":"a1b2","seconds":0,"maxPerSecond":50}"#;
        let ServerMessage::Tap(stop) = ServerMessage::parse(stop).unwrap() else {
            panic!("a stop is a tap request")
        };
        assert_eq!((stop.seconds, stop.filter), (0, TapFilter::default()));

        for event in [
            TapEvent {
                type_url: TAP_EVENT_TYPE.into(),
                id: "a1b2".into(),
                record: Some(tap_record()),
                dropped: 3,
            },
            TapEvent {
                type_url: TAP_EVENT_TYPE.into(),
                id: "a1b2".into(),
                record: None,
                dropped: 9,
            },
        ] {
            let line = serde_json::to_string(&event).unwrap();
            match serde_json::from_str::<ClientMessage>(&line).unwrap() {
                ClientMessage::Tap(back) => assert_eq!(back, event),
                other => panic!("{line} read as {other:?}"),
            }
        }
        let line = serde_json::to_value(tap_record()).unwrap();
        for field in [
            "peer.id",
            "meshgate.workload.id",
            "url.path",
            "meshgate.path.original",
            "http.request.method",
            "http.response.status_code",
            "decision",
        ] {
            assert!(line.get(field).is_some(), "{field} in {line}");
        }
        // A push still parses as a push, and a line that is neither reports the push error.
        let push = Push::new(
            PolicySet {
                policies: vec![],
                services: vec![],
                network_policies: vec![],
                mesh_config: serde_json::from_value(serde_json::json!({
                    "apiVersion": "meshgate.dev/v1", "kind": "MeshConfig",
                    "metadata": {"name": "default", "namespace": "meshgate"},
                    "spec": {"defaultAction": "DENY", "trustDomain": "mesh.local"}
                }))
                .unwrap(),
                version: "v1".into(),
            },
            "n".into(),
        );
        let line = serde_json::to_vec(&push).unwrap();
        assert_eq!(
            ServerMessage::parse(&line).unwrap(),
            ServerMessage::Push(push)
        );
        let err = ServerMessage::parse(br#"{"typeUrl":"x","version":"v"}"#).unwrap_err();
        assert!(err.to_string().contains("nonce"), "{err}");
    }

    #[test]
    fn features_are_read_from_lists_and_repeated_headers() {
        let mut headers = http::HeaderMap::new();
        assert!(!has_feature(&headers, FEATURE_TAP));
        headers.append(FEATURES_HEADER, "flow-reports, tap".parse().unwrap());
        assert!(has_feature(&headers, FEATURE_TAP));
        assert!(!has_feature(&headers, "ta"));
        let mut headers = http::HeaderMap::new();
        headers.append(FEATURES_HEADER, "flow-reports".parse().unwrap());
        headers.append(FEATURES_HEADER, "tap".parse().unwrap());
        assert!(has_feature(&headers, FEATURE_TAP));
    }

    /// What an old sidecar would do with a tap request: its push parser refuses it. This is
    /// why a control plane sends taps only to sidecars that advertise them.
    #[test]
    fn an_old_sidecar_cannot_read_a_tap_request() {
        let line = serde_json::to_vec(&TapRequest {
            type_url: TAP_REQUEST_TYPE.into(),
            id: "a".into(),
            seconds: 1,
            filter: TapFilter::default(),
            max_per_second: 1,
        })
        .unwrap();
        assert!(serde_json::from_slice::<Push>(&line).is_err());
    }

    #[test]
    fn tap_filters_and_caps() {
        use meshgate_policy::DecisionKind::{Allow, Deny};
        let web = "spiffe://mesh.local/ns/shop/sa/web";
        let orders = "spiffe://mesh.local/ns/shop/sa/orders";
        let f = |decisions: Vec<meshgate_policy::DecisionKind>, callers: Vec<&str>| TapFilter {
            decisions,
            callers: callers.into_iter().map(String::from).collect(),
        };
        for (filter, caller, decision, want) in [
            (f(vec![], vec![]), web, Deny, true),
            (f(vec![Deny], vec![]), web, Deny, true),
            (f(vec![Deny], vec![]), web, Allow, false),
            (f(vec![Allow, Deny], vec![]), web, Allow, true),
            (f(vec![], vec![web]), web, Allow, true),
            (f(vec![], vec![web]), orders, Allow, false),
            (f(vec![Deny], vec![web, orders]), orders, Deny, true),
            (f(vec![Deny], vec![web, orders]), orders, Allow, false),
        ] {
            assert_eq!(
                filter.matches(caller, decision),
                want,
                "{filter:?} {caller} {decision:?}"
            );
        }
        for (text, max, want) in [
            ("/short", 10, "/short"),
            ("/exactly10", 10, "/exactly10"),
            ("/longer-than-ten", 10, "/longer…"),
            ("/ééééé", 9, "/éé…"),
        ] {
            let got = cap_text(text, max);
            assert_eq!(got, want);
            assert!(got.len() <= max, "{got}");
        }
    }

    #[test]
    fn ack_round_trip() {
        let nack = Ack {
            nonce: "n".into(),
            version: "v".into(),
            error: Some("bad".into()),
        };
        let text = serde_json::to_string(&nack).unwrap();
        assert_eq!(serde_json::from_str::<Ack>(&text).unwrap(), nack);
        assert!(serde_json::from_str::<Ack>(r#"{"nonce":"n","version":"v","extra":1}"#).is_err());
    }
}
