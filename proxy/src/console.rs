//! The web console on the control plane's admin listener: one HTML page (compiled in, no CDN,
//! no build step) and the JSON endpoints it polls. It draws the mesh from what the control
//! plane already holds (the flows sidecars report, their status, the policy served) and offers
//! two mutating actions, quarantine and lift, which write the same policy file as
//! `meshgate quarantine` ([`crate::quarantine`]).
//!
//! Endpoints: `GET /` and `/console` (the page), `GET /v1/console/state` (graph, flows,
//! sidecars, SLIs inputs), `GET /v1/console/suggest?caller=ID&callee=ID` (the YAML
//! `meshgate policy suggest` would write for that edge), `GET /v1/console/tap?since=SEQ&
//! workload=ID&decision=D` (the live tap: individual decisions, newest first; polling it is what
//! keeps the sidecars tapping, see [`meshgate_xds::tap`]), `POST /v1/console/quarantine` with
//! `{"id": ID, "lift": bool}`.
//!
//! Authorization of mutating actions, fail closed: with a console token (`--console-token`) a
//! POST needs `Authorization: Bearer <token>`; without one it is accepted only when the admin
//! listener is bound to loopback (then whoever can reach it already runs on the machine);
//! otherwise every POST is refused and the page says why. Every POST must also be
//! `application/json` with no foreign `Origin`, and without a token its `Host` must be a
//! loopback name, so a web page the operator happens to visit cannot forge one (CSRF, DNS
//! rebinding).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http::{HeaderMap, Method, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use meshgate_policy::{DecisionKind, PolicySnapshot};
use meshgate_policy_tools::probe::Probe;
use meshgate_xds::server::ControlPlane;
use meshgate_xds::wire::{Direction, Flow, L3L4Flow, LatencyHistogram};
use serde_json::{Value, json};

/// The page, with its script and styles inline.
const PAGE: &str = include_str!("console.html");
/// Largest POST body read (an ID and a flag).
const MAX_BODY: usize = 16 * 1024;
/// Flows are kept this long by the control plane; rates are averaged over at most this.
const WINDOW_SECS: i64 = meshgate_xds::flows::FLOW_TTL.as_secs() as i64;
/// The graph's pseudo-node for the other end of the eBPF redirect's verdicts: its counters
/// carry a port and a verdict, no address and no identity, so every destination of an egress
/// verdict and every source of a dropped ingress packet is this one node. Not a SPIFFE ID, so
/// it cannot be mistaken for (or collide with) a workload.
const OUTSIDE_NODE: &str = "l3l4:outside";
const OUTSIDE_NAME: &str = "outside (L3/L4)";

/// The console of one control plane.
pub struct Console {
    /// Bearer token required for mutating actions, if configured.
    token: Option<String>,
    admin: SocketAddr,
    policy_dir: PathBuf,
    /// (action, result) → count, for `meshgate_console_actions_total`.
    actions: std::sync::Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    requests: AtomicU64,
    /// Where flows' trace IDs link to (`--trace-ui`), if anywhere.
    trace_ui: Option<crate::trace_ui::TraceUi>,
}

type Answer = Response<Full<Bytes>>;

fn answer(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Answer {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .header("cache-control", "no-store")
        .header("x-content-type-options", "nosniff")
        .body(Full::new(body.into()))
        .expect("valid response")
}

fn json_answer(status: StatusCode, v: &Value) -> Answer {
    answer(status, "application/json", v.to_string())
}

/// How a flow is drawn: `allowed` (an explicit ALLOW rule), `uncovered` (passed by the mesh
/// default), `dry-run` (passed, but a dry-run policy would deny it), `denied`.
fn class(kind: DecisionKind, rule: Option<usize>) -> &'static str {
    match kind {
        DecisionKind::Deny | DecisionKind::BadRequest => "denied",
        DecisionKind::DryRunDeny => "dry-run",
        DecisionKind::Allow | DecisionKind::Audit if rule.is_some() => "allowed",
        _ => "uncovered",
    }
}

/// Worst first: an edge takes the class of its worst flow.
fn rank(class: &str) -> u8 {
    match class {
        "denied" => 3,
        "dry-run" => 2,
        "uncovered" => 1,
        _ => 0,
    }
}

/// Short name of a workload: `ns/account` of `spiffe://td/ns/<ns>/sa/<account>`, else the path.
fn short(id: &str) -> String {
    let path = id
        .strip_prefix("spiffe://")
        .and_then(|r| r.split_once('/'))
        .map_or(id, |(_, p)| p);
    let parts: Vec<&str> = path.split('/').collect();
    match parts.as_slice() {
        ["ns", ns, "sa", sa] => format!("{ns}/{sa}"),
        _ => path.to_string(),
    }
}

impl Console {
    pub fn new(token: Option<String>, admin: SocketAddr, policy_dir: PathBuf) -> Self {
        Self {
            token,
            admin,
            policy_dir,
            actions: Default::default(),
            requests: AtomicU64::new(0),
            trace_ui: None,
        }
    }

    /// Links flows' trace IDs to this trace viewer.
    pub fn with_trace_ui(mut self, trace_ui: Option<crate::trace_ui::TraceUi>) -> Self {
        self.trace_ui = trace_ui;
        self
    }

    /// Whether mutating actions can be authorized at all, and how (shown by the page).
    fn mutations(&self) -> (bool, &'static str, String) {
        match (&self.token, self.admin.ip().is_loopback()) {
            (Some(_), _) => (
                true,
                "token",
                "actions need the console token (--console-token): paste it below".into(),
            ),
            (None, true) => (
                true,
                "loopback",
                format!(
                    "the admin listener {} is on loopback: actions allowed from this machine",
                    self.admin
                ),
            ),
            (None, false) => (
                false,
                "refused",
                format!(
                    "read-only: the admin listener {} is not on loopback and no --console-token is set; restart `meshgate control-plane serve` with --console-token FILE to enable quarantine and lift",
                    self.admin
                ),
            ),
        }
    }

    /// Checks a mutating request; the error is the status and reason to answer with.
    fn authorize(&self, headers: &HeaderMap) -> Result<(), (StatusCode, String)> {
        let refuse = |status: StatusCode, why: String| Err((status, why));
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        if !header("content-type").is_some_and(|c| c.starts_with("application/json")) {
            return refuse(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "console actions are JSON: send Content-Type: application/json".into(),
            );
        }
        let host = header("host").unwrap_or_default();
        if let Some(origin) = header("origin")
            && origin != format!("http://{host}")
        {
            return refuse(
                StatusCode::FORBIDDEN,
                format!(
                    "origin {origin} is not this console (http://{host}); use the console page served here"
                ),
            );
        }
        match &self.token {
            Some(token) => {
                let given = header("authorization")
                    .and_then(|a| a.strip_prefix("Bearer "))
                    .unwrap_or_default();
                if !constant_time_eq(given.as_bytes(), token.as_bytes()) {
                    return refuse(
                        StatusCode::UNAUTHORIZED,
                        "missing or wrong console token: send Authorization: Bearer <the content of --console-token>".into(),
                    );
                }
            }
            None if !self.admin.ip().is_loopback() => {
                return refuse(StatusCode::FORBIDDEN, self.mutations().2);
            }
            None => {
                let name = host.rsplit_once(':').map_or(host, |(h, _)| h);
                if !matches!(name, "127.0.0.1" | "localhost" | "[::1]") {
                    return refuse(
                        StatusCode::FORBIDDEN,
                        format!(
                            "host {host} is not a loopback name; open the console at http://{}",
                            self.admin
                        ),
                    );
                }
            }
        }
        Ok(())
    }

    /// Answers the console's requests; `None` for other paths (the admin listener's own).
    pub async fn handle(
        &self,
        cp: &ControlPlane,
        req: http::Request<hyper::body::Incoming>,
    ) -> Option<Answer> {
        let path = req.uri().path().to_string();
        let known = matches!(
            path.as_str(),
            "/" | "/console"
                | "/v1/console/state"
                | "/v1/console/suggest"
                | "/v1/console/tap"
                | "/v1/console/quarantine"
        );
        if !known {
            return None;
        }
        self.requests.fetch_add(1, Ordering::Relaxed);
        Some(match (req.method().clone(), path.as_str()) {
            (Method::GET, "/" | "/console") => {
                answer(StatusCode::OK, "text/html; charset=utf-8", PAGE)
            }
            (Method::GET, "/v1/console/state") => json_answer(StatusCode::OK, &self.state(cp)),
            (Method::GET, "/v1/console/tap") => match self.tap(cp, &query_map(req.uri().query())) {
                Ok(v) => json_answer(StatusCode::OK, &v),
                Err(why) => json_answer(StatusCode::BAD_REQUEST, &json!({ "error": why })),
            },
            (Method::GET, "/v1/console/suggest") => {
                let query = query_map(req.uri().query());
                match (query.get("caller"), query.get("callee")) {
                    (Some(caller), Some(callee)) => {
                        json_answer(StatusCode::OK, &suggest_edge(cp, caller, callee))
                    }
                    _ => json_answer(
                        StatusCode::BAD_REQUEST,
                        &json!({ "error": "give ?caller=SPIFFE_ID&callee=SPIFFE_ID" }),
                    ),
                }
            }
            (Method::POST, "/v1/console/quarantine") => self.quarantine(req).await,
            _ => json_answer(
                StatusCode::METHOD_NOT_ALLOWED,
                &json!({ "error": "method not allowed here" }),
            ),
        })
    }

    fn count(&self, action: &'static str, result: &'static str) {
        *self
            .actions
            .lock()
            .expect("lock")
            .entry((action, result))
            .or_default() += 1;
    }

    async fn quarantine(&self, req: http::Request<hyper::body::Incoming>) -> Answer {
        let (parts, body) = req.into_parts();
        if let Err((status, why)) = self.authorize(&parts.headers) {
            tracing::warn!(event = "console.action_refused", status = %status, reason = %why, "a console action was refused");
            self.count("quarantine", "refused");
            return json_answer(status, &json!({ "error": why }));
        }
        let body = match Limited::new(body, MAX_BODY).collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => {
                return json_answer(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    &json!({ "error": "body too large or cut off" }),
                );
            }
        };
        #[derive(serde::Deserialize)]
        struct Ask {
            id: String,
            #[serde(default)]
            lift: bool,
        }
        let ask: Ask = match serde_json::from_slice(&body) {
            Ok(a) => a,
            Err(e) => {
                return json_answer(
                    StatusCode::BAD_REQUEST,
                    &json!({ "error": format!("expected {{\"id\": SPIFFE_ID, \"lift\": bool}}: {e}") }),
                );
            }
        };
        let id = match meshgate_ca::SpiffeId::parse(&ask.id) {
            Ok(id) => id,
            Err(e) => {
                return json_answer(
                    StatusCode::BAD_REQUEST,
                    &json!({ "error": format!("{:?} is not a SPIFFE ID: {e}", ask.id) }),
                );
            }
        };
        let action = if ask.lift { "lift" } else { "quarantine" };
        let done = if ask.lift {
            crate::quarantine::lift(&self.policy_dir, &id)
        } else {
            crate::quarantine::write(&self.policy_dir, &id)
        };
        match done {
            Ok(file) => {
                tracing::warn!(event = "console.action", action, id = %id, file = %file.display(), "console action applied");
                self.count(action, "ok");
                json_answer(
                    StatusCode::OK,
                    &json!({ "ok": true, "action": action, "id": id.as_str(), "file": file.display().to_string() }),
                )
            }
            Err(e) => {
                tracing::error!(event = "console.action_failed", action, id = %id, error = %e);
                self.count(action, "failed");
                json_answer(StatusCode::CONFLICT, &json!({ "error": e.to_string() }))
            }
        }
    }

    /// The live tap: registers the viewer's filters (which starts or renews the tap on the
    /// sidecars) and answers the events after `since` that they show, newest first. The error
    /// says which parameter is wrong and what it takes.
    fn tap(&self, cp: &ControlPlane, query: &HashMap<String, String>) -> Result<Value, String> {
        use meshgate_xds::tap::{IDLE_STOP, RING_SIZE, Watch};
        let given = |k: &str| query.get(k).map(String::as_str).filter(|v| !v.is_empty());
        let workload = given("workload")
            .map(|w| {
                meshgate_ca::SpiffeId::parse(w)
                    .map(|id| id.to_string())
                    .map_err(|e| format!("workload {w:?} is not a SPIFFE ID ({e}): give ?workload=spiffe://…, or leave it out for every workload"))
            })
            .transpose()?;
        let decision = given("decision")
            .map(|d| {
                serde_json::from_value::<DecisionKind>(json!(d)).map_err(|_| {
                    format!(
                        "decision {d:?} is not one of allow, deny, audit, dry-run-deny, bad-request"
                    )
                })
            })
            .transpose()?;
        let number = |k: &str, default: u64| {
            given(k).map_or(Ok(default), |v| {
                v.parse::<u64>()
                    .map_err(|_| format!("{k} {v:?} is not a number: give ?{k}=N"))
            })
        };
        let since = number("since", 0)?;
        let limit = number("limit", 200)?.clamp(1, RING_SIZE as u64) as usize;
        let watch = Watch { workload, decision };
        cp.tap_poll(watch.clone());
        let (seq, events) = cp.tap_events(since, &watch, limit);
        let events: Vec<Value> = events
            .into_iter()
            .map(|(seq, record)| {
                let trace_url = record
                    .trace_id
                    .as_deref()
                    .zip(self.trace_ui.as_ref())
                    .map(|(t, ui)| ui.link(t));
                let mut v = serde_json::to_value(record).expect("record serializes");
                v["seq"] = seq.into();
                if let Some(url) = trace_url {
                    v["trace_url"] = url.into();
                }
                v
            })
            .collect();
        let (tapping, without) = cp.tap_sidecars();
        let c = cp.tap_counters();
        Ok(json!({
            "seq": seq,
            "events": events,
            "active": c.active,
            "sidecars": { "tapping": tapping, "without_tap": without },
            "dropped": { "sidecars": c.dropped_by_sidecars, "control_plane": c.dropped_by_control_plane },
            "max_per_second": meshgate_xds::wire::DEFAULT_TAP_RATE,
            "stops_after_seconds": IDLE_STOP.as_secs(),
        }))
    }

    /// `meshgate_console_*` metrics, appended to the admin listener's `/metrics`.
    pub fn metrics(&self, cp: &ControlPlane) -> String {
        let mut out = String::from(
            "# HELP meshgate_console_actions_total Mutating console actions, by action and result (ok, refused, failed)\n# TYPE meshgate_console_actions_total counter\n",
        );
        for ((action, result), n) in self.actions.lock().expect("lock").iter() {
            out.push_str(&format!(
                "meshgate_console_actions_total{{action=\"{action}\",result=\"{result}\"}} {n}\n"
            ));
        }
        out.push_str(&format!(
            "# HELP meshgate_console_requests_total Requests to the console's page and endpoints\n# TYPE meshgate_console_requests_total counter\nmeshgate_console_requests_total {}\n",
            self.requests.load(Ordering::Relaxed)
        ));
        let tap = cp.tap_counters();
        out.push_str(&format!(
            "# HELP meshgate_console_tap_events_total Decisions received from tapped sidecars and kept for the console's live tap\n# TYPE meshgate_console_tap_events_total counter\nmeshgate_console_tap_events_total {}\n",
            tap.events
        ));
        out.push_str(&format!(
            "# HELP meshgate_console_tap_dropped_total Tapped decisions dropped: by sidecars (over their rate limit or queue) or by the control plane (over a stream's rate limit, or implausible)\n# TYPE meshgate_console_tap_dropped_total counter\nmeshgate_console_tap_dropped_total{{by=\"sidecar\"}} {}\nmeshgate_console_tap_dropped_total{{by=\"control_plane\"}} {}\n",
            tap.dropped_by_sidecars, tap.dropped_by_control_plane
        ));
        out.push_str(&format!(
            "# HELP meshgate_console_tap_active Whether sidecars are being tapped now (someone polled the tap in the last 30 s)\n# TYPE meshgate_console_tap_active gauge\nmeshgate_console_tap_active {}\n",
            u8::from(tap.active)
        ));
        out
    }

    /// Everything the page draws, in one answer (the page polls it every second).
    pub fn state(&self, cp: &ControlPlane) -> Value {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let flows = cp.flows();
        let set = cp.policy_set();
        let mut snapshots: HashMap<String, Option<PolicySnapshot>> = HashMap::new();
        let mut nodes: BTreeMap<String, Value> = BTreeMap::new();
        let mut edges: BTreeMap<(String, String), Edge> = BTreeMap::new();
        let mut flow_rows = Vec::new();
        for f in &flows {
            let observed = class(f.decision, f.rule);
            let (now_class, now_policy, now_rule) = match &set {
                Some(set) => {
                    let snapshot = snapshots.entry(f.workload.clone()).or_insert_with(|| {
                        meshgate_ca::SpiffeId::parse(&f.workload)
                            .ok()
                            .map(|w| PolicySnapshot::compile(set, &w))
                    });
                    judge_now(f, snapshot.as_ref()).unwrap_or((observed, f.policy.clone(), f.rule))
                }
                None => (observed, f.policy.clone(), f.rule),
            };
            for id in [&f.peer, &f.workload] {
                nodes
                    .entry(id.clone())
                    .or_insert_with(|| json!({ "id": id, "name": short(id) }));
            }
            let e = edges
                .entry((f.peer.clone(), f.workload.clone()))
                .or_default();
            e.add(f, observed, now_class);
            flow_rows.push(json!({
                "caller": f.peer, "callee": f.workload,
                "layer": match f.layer { meshgate_policy::record::Layer::L7 => "L7", meshgate_policy::record::Layer::L4 => "L4" },
                "port": f.port, "method": f.method, "path": f.path,
                "decision": f.decision.as_str(), "observed": observed,
                "policy": f.policy, "rule": f.rule,
                "now": now_class, "now_policy": now_policy, "now_rule": now_rule,
                "count": f.count, "first_seen": f.first_seen, "last_seen": f.last_seen,
                "latency": latency_json(&histogram(&f.latency)),
                "trace_id": f.trace_id,
                "trace_url": f.trace_id.as_deref().zip(self.trace_ui.as_ref()).map(|(t, ui)| ui.link(t)),
            }));
        }
        // The eBPF redirect's verdicts: workload → outside for egress (refused, or allowed
        // direct), outside → workload for ingress drops.
        let mut ebpf_edges: BTreeMap<(String, String), EbpfEdge> = BTreeMap::new();
        for (workload, f) in cp.l3l4_flows() {
            nodes
                .entry(workload.clone())
                .or_insert_with(|| json!({ "id": workload, "name": short(&workload) }));
            let ends = match f.direction {
                Direction::Egress => (workload, OUTSIDE_NODE.to_string()),
                Direction::Ingress => (OUTSIDE_NODE.to_string(), workload),
            };
            ebpf_edges.entry(ends).or_default().add(&f);
        }
        let status = serde_json::to_value(cp.status()).unwrap_or(Value::Null);
        let quarantined = |id: &str| {
            meshgate_ca::SpiffeId::parse(id)
                .is_ok_and(|id| crate::quarantine::is_quarantined(&self.policy_dir, &id))
        };
        if let Some(sidecars) = status["sidecars"].as_array() {
            for s in sidecars {
                if let Some(id) = s["id"].as_str() {
                    nodes
                        .entry(id.to_string())
                        .or_insert_with(|| json!({ "id": id, "name": short(id) }));
                }
            }
        }
        for (id, node) in nodes.iter_mut() {
            node["kind"] = "workload".into();
            node["quarantined"] = quarantined(id).into();
            let (mut count, mut allowed, mut first) = (0u64, 0u64, now);
            let mut latency = LatencyHistogram::default();
            for ((_, callee), e) in &edges {
                if callee == id {
                    count += e.count;
                    allowed += e.allowed;
                    first = first.min(e.first_seen);
                    latency.merge(&e.latency.0);
                }
            }
            node["inbound"] = golden(count, allowed, first, now, &latency);
        }
        let mut edges: Vec<Value> = edges
            .into_iter()
            .map(|((caller, callee), e)| {
                json!({
                    "caller": caller, "callee": callee,
                    "class": e.now_class, "observed": e.observed_class,
                    "count": e.count, "last_seen": e.last_seen,
                    "golden": golden(e.count, e.allowed, e.first_seen, now, &e.latency),
                    "layer": "identity",
                })
            })
            .collect();
        if !ebpf_edges.is_empty() {
            nodes.insert(
                OUTSIDE_NODE.to_string(),
                json!({
                    "id": OUTSIDE_NODE, "name": OUTSIDE_NAME, "kind": "outside",
                    "quarantined": false,
                    "inbound": golden(0, 0, now, now, &LatencyHistogram::default()),
                }),
            );
        }
        edges.extend(
            ebpf_edges
                .into_iter()
                .map(|((caller, callee), e)| e.into_json(caller, callee, now)),
        );
        let (allowed, mode, reason) = self.mutations();
        json!({
            "now": now,
            "window_seconds": WINDOW_SECS,
            "version": status["version"],
            "nodes": nodes.into_values().collect::<Vec<_>>(),
            "edges": edges,
            "flows": flow_rows,
            "status": status,
            "metrics": cp.sli_metrics(),
            "latency_note": LATENCY_NOTE,
            "trace_ui": self.trace_ui.is_some(),
            "mutations": { "allowed": allowed, "mode": mode, "reason": reason },
        })
    }
}

/// One caller → callee edge, summed over its flows.
#[derive(Default)]
struct Edge {
    count: u64,
    allowed: u64,
    first_seen: i64,
    last_seen: i64,
    observed_class: &'static str,
    now_class: &'static str,
    latency: LatencyHistogram,
}

impl Edge {
    fn add(&mut self, f: &Flow, observed: &'static str, now: &'static str) {
        if self.count == 0 {
            self.first_seen = f.first_seen;
            self.observed_class = observed;
            self.now_class = now;
        }
        self.count += f.count;
        self.latency.merge(&f.latency);
        if f.passed() {
            self.allowed += f.count;
        }
        self.first_seen = self.first_seen.min(f.first_seen);
        self.last_seen = self.last_seen.max(f.last_seen);
        if rank(observed) > rank(self.observed_class) {
            self.observed_class = observed;
        }
        if rank(now) > rank(self.now_class) {
            self.now_class = now;
        }
    }
}

/// One edge between a workload and [`OUTSIDE_NODE`], summed over its eBPF verdicts.
#[derive(Default)]
struct EbpfEdge {
    count: u64,
    allowed: u64,
    first_seen: i64,
    last_seen: i64,
    rows: Vec<Value>,
}

impl EbpfEdge {
    fn add(&mut self, f: &L3L4Flow) {
        if self.rows.is_empty() {
            self.first_seen = f.first_seen;
        }
        self.count = self.count.saturating_add(f.count);
        if !f.denied() {
            self.allowed = self.allowed.saturating_add(f.count);
        }
        self.first_seen = self.first_seen.min(f.first_seen);
        self.last_seen = self.last_seen.max(f.last_seen);
        self.rows.push(json!({
            "direction": f.direction.as_str(), "port": f.port, "verdict": f.verdict,
            "class": if f.denied() { "denied" } else { "allowed" },
            "count": f.count, "first_seen": f.first_seen, "last_seen": f.last_seen,
        }));
    }

    /// The edge in the shape of an identity edge (so the graph and the rates treat both
    /// alike), `layer: "ebpf"`, and its verdicts under `l3l4`. Coloured by its worst verdict,
    /// like identity edges: denied when any verdict was a denial, else allowed.
    fn into_json(self, caller: String, callee: String, now: i64) -> Value {
        let class = if self.allowed < self.count {
            "denied"
        } else {
            "allowed"
        };
        json!({
            "caller": caller, "callee": callee,
            "class": class, "observed": class,
            "count": self.count, "last_seen": self.last_seen,
            "golden": golden(self.count, self.allowed, self.first_seen, now, &LatencyHistogram::default()),
            "layer": "ebpf",
            "l3l4": self.rows,
        })
    }
}

/// Requests per second over the time the flows cover (at most the flow window), and the
/// success rate (share allowed).
fn golden(
    count: u64,
    allowed: u64,
    first_seen: i64,
    now: i64,
    latency: &LatencyHistogram,
) -> Value {
    let span = (now - first_seen).clamp(1, WINDOW_SECS) as f64;
    json!({
        "requests": count,
        "rps": if count == 0 { 0.0 } else { count as f64 / span },
        "success_rate": (count > 0).then(|| allowed as f64 / count as f64),
        "latency": latency_json(latency),
    })
}

/// How the page qualifies the latency it shows.
const LATENCY_NOTE: &str = "upper bounds: the top of the power-of-two bucket (64 µs to 33.6 s) \
    where the quantile falls, so the true value is between half of it and it";

fn histogram(buckets: &[u64]) -> LatencyHistogram {
    let mut h = LatencyHistogram::default();
    h.merge(buckets);
    h
}

/// p50 and p99 of a merged histogram, as upper bounds in microseconds and as text; null
/// values when no request of these flows reported a latency (L4 only, or older sidecars).
fn latency_json(h: &LatencyHistogram) -> Value {
    let q = |q: f64| match h.quantile(q) {
        None => (Value::Null, Value::Null),
        Some(bound) => (
            bound.map_or(Value::Null, |d| (d.as_micros() as u64).into()),
            latency_text(bound).into(),
        ),
    };
    let ((p50_us, p50), (p99_us, p99)) = (q(0.5), q(0.99));
    json!({
        "samples": h.count(),
        "p50_us": p50_us, "p50": p50,
        "p99_us": p99_us, "p99": p99,
    })
}

/// A quantile's upper bound for people: `≤ 512 µs`, `≤ 4.1 ms`, `≤ 131 ms`, `≤ 2.1 s`, or
/// `> 33.6 s` for the unbounded bucket.
fn latency_text(bound: Option<std::time::Duration>) -> String {
    let Some(d) = bound else {
        let top = LatencyHistogram::upper_bound(meshgate_xds::wire::LATENCY_BUCKETS - 2)
            .expect("bounded");
        return format!("> {:.1} s", top.as_secs_f64());
    };
    let us = d.as_micros() as f64;
    if us < 1000.0 {
        format!("≤ {us:.0} µs")
    } else if us < 10_000.0 {
        format!("≤ {:.1} ms", us / 1000.0)
    } else if us < 1_000_000.0 {
        format!("≤ {:.0} ms", us / 1000.0)
    } else {
        format!("≤ {:.1} s", us / 1_000_000.0)
    }
}

/// What the policy served now decides for a flow's requests: the flow's path pattern stands
/// for its requests (`*` replaced by one segment). `None` when the flow cannot be judged (a
/// refused request has no method or path), and the observed decision is shown instead.
fn judge_now(
    f: &Flow,
    snapshot: Option<&PolicySnapshot>,
) -> Option<(&'static str, Option<String>, Option<usize>)> {
    let snapshot = snapshot?;
    let path = f.path.as_ref().map(|p| p.replace('*', "x"));
    let probe = Probe::new(
        &f.peer,
        &f.workload,
        f.method.as_deref(),
        path.as_deref(),
        f.port,
        &[],
    )
    .ok()?;
    if f.decision == DecisionKind::BadRequest {
        return None;
    }
    let d = probe.judge_with(snapshot).decision;
    Some((class(d.kind, d.rule), d.policy, d.rule))
}

/// The YAML `meshgate policy suggest --control-plane` would write, learned from this edge's
/// flows only (the same parser and suggester as the command).
fn suggest_edge(cp: &ControlPlane, caller: &str, callee: &str) -> Value {
    use meshgate_policy_tools::suggest::{SuggestOptions, suggest, to_yaml};
    let log = meshgate_policy_tools::flows::parse_flows(&flow_lines(cp));
    let edge: Vec<_> = log
        .flows
        .into_iter()
        .filter(|f| f.peer.as_str() == caller && f.workload.as_str() == callee)
        .collect();
    let s = suggest(&edge, SuggestOptions::default());
    match to_yaml(&s.policies) {
        Ok(yaml) => json!({
            "yaml": yaml, "learned": s.learned, "denied_requests": s.denied,
            "unusable": s.unusable,
            "command": format!("meshgate policy suggest --control-plane <this admin address>  (all edges)"),
        }),
        Err(e) => json!({ "error": e.to_string() }),
    }
}

/// The parameters of a query string, percent-decoded.
fn query_map(query: Option<&str>) -> HashMap<String, String> {
    query
        .map(|q| {
            q.split('&')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), percent_decode(v)))
                .collect()
        })
        .unwrap_or_default()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `%XX` and `+` decoding of a query value (SPIFFE IDs arrive percent-encoded).
fn percent_decode(v: &str) -> String {
    let bytes = v.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The flows held by the control plane as decision-log lines (`event="authz.decision"`, the
/// fields of [`meshgate_policy::DecisionRecord`] plus `count`, `first_seen`, `last_seen`), so
/// the flow tools read them with the parser they use for sidecar logs. `policy.version` is the
/// version served now; `reason` says the line is an aggregate.
pub(crate) fn flow_lines(cp: &ControlPlane) -> String {
    let version = cp.version().unwrap_or_default();
    let mut out = String::new();
    for flow in cp.flows() {
        let mut line = serde_json::to_value(&flow).expect("flow serializes");
        line["event"] = meshgate_policy::record::DECISION_EVENT.into();
        line["policy.version"] = version.clone().into();
        line["reason"] = format!("aggregated flow: {} decisions", flow.count).into();
        out.push_str(&line.to_string());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Quantiles are shown as the upper bounds of their buckets, in a unit people read.
    #[test]
    fn latency_is_shown_as_bucket_upper_bounds() {
        let us = std::time::Duration::from_micros;
        for (bound, want) in [
            (Some(us(64)), "≤ 64 µs"),
            (Some(us(512)), "≤ 512 µs"),
            (Some(us(1024)), "≤ 1.0 ms"),
            (Some(us(4096)), "≤ 4.1 ms"),
            (Some(us(131_072)), "≤ 131 ms"),
            (Some(us(2_097_152)), "≤ 2.1 s"),
            (Some(us(64 << 19)), "≤ 33.6 s"),
            (None, "> 33.6 s"),
        ] {
            assert_eq!(latency_text(bound), want);
        }
        // 90 requests ≤ 1 ms, 10 ≤ 131 ms: p50 fast, p99 slow; an empty histogram has none.
        let mut buckets = vec![0; 12];
        (buckets[4], buckets[11]) = (90, 10);
        let j = latency_json(&histogram(&buckets));
        assert_eq!(
            (j["samples"].as_u64(), j["p50"].as_str(), j["p99"].as_str()),
            (Some(100), Some("≤ 1.0 ms"), Some("≤ 131 ms"))
        );
        assert_eq!(
            (j["p50_us"].as_u64(), j["p99_us"].as_u64()),
            (Some(1024), Some(131_072))
        );
        let j = latency_json(&histogram(&[]));
        assert!(
            j["p50"].is_null() && j["p99"].is_null() && j["samples"] == 0,
            "{j}"
        );
    }

    /// An eBPF edge is drawn denied when any of its verdicts was a denial, allowed otherwise;
    /// it keeps the identity edge's fields and lists its verdicts.
    #[test]
    fn ebpf_edges_take_their_worst_verdict() {
        let v = |verdict: &str, port: u16, count: u64, at: i64| L3L4Flow {
            direction: Direction::Egress,
            port,
            verdict: verdict.into(),
            count,
            first_seen: at - 5,
            last_seen: at,
        };
        for (verdicts, class, allowed) in [
            (vec![v("allowed", 443, 4, 100)], "allowed", 4),
            (vec![v("denied_egress", 9001, 1, 100)], "denied", 0),
            (
                vec![v("allowed", 443, 4, 100), v("denied_udp_mesh", 53, 1, 90)],
                "denied",
                4,
            ),
        ] {
            let mut e = EbpfEdge::default();
            for f in &verdicts {
                e.add(f);
            }
            let j = e.into_json("w".into(), OUTSIDE_NODE.into(), 110);
            assert_eq!(j["class"], class, "{j}");
            assert_eq!(j["layer"], "ebpf");
            let count: u64 = verdicts.iter().map(|f| f.count).sum();
            assert_eq!(j["count"], count);
            assert_eq!(j["golden"]["requests"], count);
            assert_eq!(
                j["golden"]["success_rate"].as_f64(),
                Some(allowed as f64 / count as f64)
            );
            assert_eq!(j["last_seen"], 100);
            let rows = j["l3l4"].as_array().unwrap();
            assert_eq!(rows.len(), verdicts.len());
            for (row, f) in rows.iter().zip(&verdicts) {
                assert_eq!(
                    (&row["verdict"], &row["port"], &row["direction"]),
                    (&json!(f.verdict), &json!(f.port), &json!("egress"))
                );
            }
        }
    }

    #[test]
    fn names_classes_and_decoding() {
        assert_eq!(short("spiffe://mesh.local/ns/shop/sa/web"), "shop/web");
        assert_eq!(short("spiffe://mesh.local/odd/path"), "odd/path");
        let cases = [
            (DecisionKind::Allow, Some(0), "allowed"),
            (DecisionKind::Allow, None, "uncovered"),
            (DecisionKind::Audit, Some(1), "allowed"),
            (DecisionKind::DryRunDeny, Some(0), "dry-run"),
            (DecisionKind::Deny, None, "denied"),
            (DecisionKind::BadRequest, None, "denied"),
        ];
        for (kind, rule, want) in cases {
            assert_eq!(class(kind, rule), want, "{kind:?} {rule:?}");
        }
        assert_eq!(
            percent_decode("spiffe%3A%2F%2Fmesh.local%2Fns%2Fa"),
            "spiffe://mesh.local/ns/a"
        );
        assert_eq!(percent_decode("a%2"), "a%2");
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }

    /// Who may quarantine: fail closed off loopback without a token, the token when set, and
    /// never a foreign origin, a non-JSON body or (without a token) a non-loopback Host.
    #[test]
    fn mutating_actions_are_authorized_fail_closed() {
        const TOKEN: &str = "0123456789abcdef-token";
        let json = ("content-type", "application/json");
        /// Token configured, admin address, request headers, refusal status (None: allowed).
        type Case<'a> = (
            Option<&'a str>,
            &'a str,
            &'a [(&'a str, &'a str)],
            Option<u16>,
        );
        let cases: &[Case] = &[
            (
                None,
                "127.0.0.1:15011",
                &[json, ("host", "127.0.0.1:15011")],
                None,
            ),
            (
                None,
                "127.0.0.1:15011",
                &[
                    json,
                    ("host", "localhost:15011"),
                    ("origin", "http://localhost:15011"),
                ],
                None,
            ),
            (
                None,
                "127.0.0.1:15011",
                &[("host", "127.0.0.1:15011")],
                Some(415),
            ),
            (
                None,
                "127.0.0.1:15011",
                &[
                    json,
                    ("host", "127.0.0.1:15011"),
                    ("origin", "http://evil.example"),
                ],
                Some(403),
            ),
            (
                None,
                "127.0.0.1:15011",
                &[json, ("host", "rebound.example:15011")],
                Some(403),
            ),
            (
                None,
                "10.0.0.5:15011",
                &[json, ("host", "10.0.0.5:15011")],
                Some(403),
            ),
            (
                Some(TOKEN),
                "10.0.0.5:15011",
                &[json, ("host", "10.0.0.5:15011")],
                Some(401),
            ),
            (
                Some(TOKEN),
                "10.0.0.5:15011",
                &[
                    json,
                    ("host", "10.0.0.5:15011"),
                    ("authorization", "Bearer wrong"),
                ],
                Some(401),
            ),
            (
                Some(TOKEN),
                "10.0.0.5:15011",
                &[
                    json,
                    ("host", "10.0.0.5:15011"),
                    ("authorization", "Bearer 0123456789abcdef-token"),
                ],
                None,
            ),
            (
                Some(TOKEN),
                "127.0.0.1:15011",
                &[json, ("host", "127.0.0.1:15011")],
                Some(401),
            ),
        ];
        for (token, admin, headers, want) in cases {
            let console = Console::new(
                token.map(String::from),
                admin.parse().unwrap(),
                "/nonexistent".into(),
            );
            let mut map = HeaderMap::new();
            for (k, v) in *headers {
                map.insert(
                    http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    v.parse().unwrap(),
                );
            }
            let got = console.authorize(&map).err().map(|(s, _)| s.as_u16());
            assert_eq!(got, *want, "{token:?} {admin} {headers:?}");
            assert_eq!(
                console.mutations().0,
                token.is_some() || admin.starts_with("127.")
            );
        }
    }
}
