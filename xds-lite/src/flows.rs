//! The control plane's view of the mesh's traffic: the flows each sidecar reports
//! ([`crate::wire::FlowReport`]), kept per reporting sidecar with a time-to-live, and the
//! counters behind the `meshgate_sli_*` metrics that are fed by reports.
//!
//! Everything here is bounded: flows per sidecar ([`MAX_FLOWS_PER_SIDECAR`]), flows in total
//! ([`MAX_FLOWS_TOTAL`]) and denial series ([`MAX_DENIAL_SERIES`]); what does not fit is counted
//! (`meshgate_sli_flow_overflow_total`), never stored. The callee of a reported flow is always
//! the reporting sidecar's authenticated identity (a sidecar cannot report flows into another
//! workload); the caller is what that sidecar's mTLS handshake proved, which the control plane
//! has to take on trust from the reporter.
//!
//! The eBPF redirect's verdicts ([`crate::wire::L3L4Flow`]) are kept beside the flows, not as
//! flows (they have no caller), per reporting sidecar with the same TTL and caps; what does not
//! fit, and entries no sidecar sends, are counted in `meshgate_sli_l3l4_overflow_total`, and
//! their denials feed `meshgate_sli_l3l4_denials_total` ([`MAX_L3L4_DENIAL_SERIES`]).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use crate::wire::{
    Direction, FLOW_REPORT_TYPE, Flow, FlowReport, L3L4Flow, LatencyHistogram, MAX_TRACE_ID_LEN,
    l3l4_verdict,
};
use meshgate_policy::DecisionKind;
use meshgate_policy::record::Layer;

/// A flow not reported again for this long is forgotten: the coverage SLIs describe the
/// traffic of the last ten minutes, and a workload that went away stops counting.
pub const FLOW_TTL: Duration = Duration::from_secs(600);
/// Distinct flows kept per reporting sidecar (its own per-interval cap is 4096; several
/// intervals' flows accumulate here).
pub const MAX_FLOWS_PER_SIDECAR: usize = 8192;
/// Distinct flows kept in total, whatever the number of sidecars (about 40 MB at most).
pub const MAX_FLOWS_TOTAL: usize = 200_000;
/// `{caller, callee}` pairs of the denial counter; denials of further pairs are counted under
/// `caller="other", callee="other"` so the metric's cardinality stays bounded.
pub const MAX_DENIAL_SERIES: usize = 2000;
/// `{workload, direction, verdict}` series of the eBPF denial counter; denials of further
/// workloads are counted under `workload="other"` (direction and verdict are few and fixed).
pub const MAX_L3L4_DENIAL_SERIES: usize = MAX_DENIAL_SERIES;
/// Longest method, path pattern and policy name a reported flow may carry. A real sidecar's
/// are far shorter (tokens, patterns from policies, `namespace/name`); longer ones are refused
/// so a hostile reporter cannot bloat the store or the metrics' labels.
const MAX_FIELD_LEN: usize = 1024;

/// A flow a sidecar could have produced: the caller a valid SPIFFE ID, the other texts short.
fn plausible(f: &Flow) -> bool {
    meshgate_ca::SpiffeId::parse(&f.peer).is_ok()
        && [&f.method, &f.path, &f.policy]
            .iter()
            .all(|t| t.as_ref().is_none_or(|t| t.len() <= MAX_FIELD_LEN))
}

/// The key of a stored flow: everything but the counts and times.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Key {
    layer: u8,
    peer: String,
    port: u16,
    method: Option<String>,
    path: Option<String>,
    decision: DecisionKind,
    policy: Option<String>,
    rule: Option<usize>,
}

impl Key {
    fn of(f: &Flow) -> Self {
        Self {
            layer: match f.layer {
                Layer::L7 => 7,
                Layer::L4 => 4,
            },
            peer: f.peer.clone(),
            port: f.port,
            method: f.method.clone(),
            path: f.path.clone(),
            decision: f.decision,
            policy: f.policy.clone(),
            rule: f.rule,
        }
    }
}

#[derive(Debug, Default)]
struct SidecarFlows {
    flows: HashMap<Key, Flow>,
}

/// The key of a stored eBPF verdict flow: direction, port, verdict (one of
/// [`crate::wire::L3L4_VERDICTS`], so `'static`).
type L3L4Key = (Direction, u16, &'static str);

/// A denial series of `meshgate_sli_l3l4_denials_total`: workload, direction, verdict.
pub type L3L4DenialKey = (String, Direction, &'static str);

/// Requests (and tunnels) reported, by how they were decided; monotonic, for `rate()`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RequestClasses {
    /// Passed because an enforce-mode ALLOW rule matched.
    pub explicit: u64,
    /// Passed without being covered: by the mesh default (`defaultAction: ALLOW`), or marked
    /// `dry-run-deny` (a policy being rolled out would deny them).
    pub implicit: u64,
    pub denied: u64,
    pub bad_request: u64,
}

/// The coverage view of the flows currently held (the last [`FLOW_TTL`]).
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Coverage {
    /// Requests that passed, and those of them an explicit ALLOW rule allowed.
    pub passed_requests: u64,
    pub explicit_requests: u64,
    /// Distinct flows that passed, and those an explicit ALLOW rule allowed.
    pub passed_flows: u64,
    pub explicit_flows: u64,
}

impl Coverage {
    /// Share of passed requests allowed by an explicit rule; `None` when none passed.
    pub fn request_ratio(&self) -> Option<f64> {
        (self.passed_requests > 0)
            .then(|| self.explicit_requests as f64 / self.passed_requests as f64)
    }

    /// Share of distinct passed flows allowed by an explicit rule; `None` when none passed.
    pub fn flow_ratio(&self) -> Option<f64> {
        (self.passed_flows > 0).then(|| self.explicit_flows as f64 / self.passed_flows as f64)
    }

    /// Flows seen passing that no explicit ALLOW rule covers.
    pub fn uncovered_flows(&self) -> u64 {
        self.passed_flows - self.explicit_flows
    }
}

/// The flows of every reporting sidecar, and the report-fed counters.
#[derive(Debug, Default)]
pub struct FlowStore {
    sidecars: BTreeMap<String, SidecarFlows>,
    total: usize,
    /// Decisions not stored: the sidecars' own overflow plus this store's caps.
    pub overflow: u64,
    pub classes: RequestClasses,
    /// Denials by (caller, callee).
    pub denials: BTreeMap<(String, String), u64>,
    /// Reports received (lines), for the operator's sanity.
    pub reports: u64,
    /// The eBPF redirect's verdicts, per reporting sidecar (kept like flows: same TTL, same
    /// caps, the workload always the reporter).
    l3l4: BTreeMap<String, HashMap<L3L4Key, L3L4Flow>>,
    l3l4_total: usize,
    /// Connections (or packets) of eBPF verdicts not stored: the sidecars' cap per report,
    /// this store's caps, and entries no sidecar would send.
    pub l3l4_overflow: u64,
    /// eBPF denials by workload, direction and verdict; monotonic.
    pub l3l4_denials: BTreeMap<L3L4DenialKey, u64>,
    /// When flows were last expired: a sweep walks every flow, so it runs at most once a second
    /// however many reports arrive.
    swept_at: i64,
}

impl FlowStore {
    /// Adds one report from the sidecar `reporter` (its authenticated SPIFFE ID) at `now`
    /// (Unix seconds). A report of an unknown type is ignored (a newer sidecar).
    pub fn ingest(&mut self, reporter: &str, report: FlowReport, now: i64) {
        if report.type_url != FLOW_REPORT_TYPE {
            return;
        }
        self.reports += 1;
        self.overflow = self.overflow.saturating_add(report.overflow);
        if now != self.swept_at {
            self.expire(now);
        }
        self.l3l4_overflow = self.l3l4_overflow.saturating_add(report.l3l4_overflow);
        self.ingest_l3l4(reporter, report.l3l4, now);
        for mut flow in report.flows {
            if !plausible(&flow) {
                self.overflow = self.overflow.saturating_add(flow.count);
                continue;
            }
            // The callee is the reporter, whatever the line says.
            flow.workload = reporter.to_string();
            // Times from the sidecar's clock, kept within reason of ours.
            flow.last_seen = flow.last_seen.clamp(now - FLOW_TTL.as_secs() as i64, now);
            flow.first_seen = flow.first_seen.min(flow.last_seen);
            // At most LATENCY_BUCKETS counts, whatever the line says; a trace ID only if it
            // could be one (it ends up in a link).
            let mut latency = LatencyHistogram::default();
            latency.merge(&flow.latency);
            flow.latency = latency.to_wire();
            flow.trace_id = flow.trace_id.filter(|t| {
                !t.is_empty()
                    && t.len() <= MAX_TRACE_ID_LEN
                    && t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
            self.count(&flow);
            let key = Key::of(&flow);
            let total = self.total;
            let sidecar = self.sidecars.entry(reporter.to_string()).or_default();
            let room = sidecar.flows.len() < MAX_FLOWS_PER_SIDECAR && total < MAX_FLOWS_TOTAL;
            match sidecar.flows.get_mut(&key) {
                Some(held) => {
                    held.count = held.count.saturating_add(flow.count);
                    held.first_seen = held.first_seen.min(flow.first_seen);
                    if !flow.latency.is_empty() {
                        latency.merge(&held.latency);
                        held.latency = latency.to_wire();
                    }
                    // The most recent traced request's, by report order.
                    if flow.trace_id.is_some() {
                        held.trace_id = flow.trace_id;
                    }
                    held.last_seen = held.last_seen.max(flow.last_seen);
                }
                None if room => {
                    sidecar.flows.insert(key, flow);
                    self.total += 1;
                }
                None => self.overflow = self.overflow.saturating_add(flow.count),
            }
        }
    }

    /// Stores the eBPF verdicts of one report and counts its denials. An entry no sidecar
    /// would send (a verdict that is not reported, or with the wrong direction) is counted as
    /// overflow, never stored or used as a label.
    fn ingest_l3l4(&mut self, reporter: &str, flows: Vec<L3L4Flow>, now: i64) {
        for mut flow in flows {
            let verdict = match l3l4_verdict(&flow.verdict) {
                Some((verdict, direction)) if direction == flow.direction => verdict,
                _ => {
                    self.l3l4_overflow = self.l3l4_overflow.saturating_add(flow.count);
                    continue;
                }
            };
            if flow.count == 0 {
                continue;
            }
            flow.last_seen = flow.last_seen.clamp(now - FLOW_TTL.as_secs() as i64, now);
            flow.first_seen = flow.first_seen.min(flow.last_seen);
            if flow.denied() {
                let series = (reporter.to_string(), flow.direction, verdict);
                let key = if self.l3l4_denials.contains_key(&series)
                    || self.l3l4_denials.len() < MAX_L3L4_DENIAL_SERIES
                {
                    series
                } else {
                    ("other".to_string(), flow.direction, verdict)
                };
                let c = self.l3l4_denials.entry(key).or_default();
                *c = c.saturating_add(flow.count);
            }
            let total = self.l3l4_total;
            let held = self.l3l4.entry(reporter.to_string()).or_default();
            let room = held.len() < MAX_FLOWS_PER_SIDECAR && total < MAX_FLOWS_TOTAL;
            match held.get_mut(&(flow.direction, flow.port, verdict)) {
                Some(h) => {
                    h.count = h.count.saturating_add(flow.count);
                    h.first_seen = h.first_seen.min(flow.first_seen);
                    h.last_seen = h.last_seen.max(flow.last_seen);
                }
                None if room => {
                    held.insert((flow.direction, flow.port, verdict), flow);
                    self.l3l4_total += 1;
                }
                None => self.l3l4_overflow = self.l3l4_overflow.saturating_add(flow.count),
            }
        }
        if self.l3l4.get(reporter).is_some_and(HashMap::is_empty) {
            self.l3l4.remove(reporter);
        }
    }

    fn count(&mut self, flow: &Flow) {
        let n = flow.count;
        let class = match flow.decision {
            DecisionKind::BadRequest => &mut self.classes.bad_request,
            DecisionKind::Deny => &mut self.classes.denied,
            _ if flow.explicitly_allowed() => &mut self.classes.explicit,
            _ => &mut self.classes.implicit,
        };
        *class = class.saturating_add(n);
        if flow.decision == DecisionKind::Deny {
            let pair = (flow.peer.clone(), flow.workload.clone());
            let key = if self.denials.contains_key(&pair) || self.denials.len() < MAX_DENIAL_SERIES
            {
                pair
            } else {
                ("other".to_string(), "other".to_string())
            };
            let c = self.denials.entry(key).or_default();
            *c = c.saturating_add(n);
        }
    }

    /// Forgets flows last seen more than [`FLOW_TTL`] before `now`.
    pub fn expire(&mut self, now: i64) {
        self.swept_at = now;
        let oldest = now - FLOW_TTL.as_secs() as i64;
        let mut removed = 0;
        self.sidecars.retain(|_, s| {
            let before = s.flows.len();
            s.flows.retain(|_, f| f.last_seen >= oldest);
            removed += before - s.flows.len();
            !s.flows.is_empty()
        });
        self.total -= removed;
        let mut removed = 0;
        self.l3l4.retain(|_, held| {
            let before = held.len();
            held.retain(|_, f| f.last_seen >= oldest);
            removed += before - held.len();
            !held.is_empty()
        });
        self.l3l4_total -= removed;
    }

    /// Every eBPF verdict flow held, with the workload that reported it, sorted by workload,
    /// direction, port and verdict.
    pub fn l3l4_flows(&self) -> Vec<(String, L3L4Flow)> {
        let mut out: Vec<(&String, &L3L4Key, &L3L4Flow)> = self
            .l3l4
            .iter()
            .flat_map(|(id, held)| held.iter().map(move |(k, f)| (id, k, f)))
            .collect();
        out.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
        out.into_iter()
            .map(|(id, _, f)| (id.clone(), f.clone()))
            .collect()
    }

    /// Distinct eBPF verdict flows held.
    pub fn l3l4_len(&self) -> usize {
        self.l3l4_total
    }

    /// Every flow held, sorted (callee, caller, …) so answers are stable.
    pub fn flows(&self) -> Vec<Flow> {
        let mut out: Vec<(&String, &Key, &Flow)> = self
            .sidecars
            .iter()
            .flat_map(|(id, s)| s.flows.iter().map(move |(k, f)| (id, k, f)))
            .collect();
        out.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
        out.into_iter().map(|(_, _, f)| f.clone()).collect()
    }

    /// Coverage of the flows held. L4 tunnels count like requests (one per connection).
    pub fn coverage(&self) -> Coverage {
        let mut c = Coverage::default();
        for f in self.sidecars.values().flat_map(|s| s.flows.values()) {
            if !f.passed() {
                continue;
            }
            c.passed_requests += f.count;
            c.passed_flows += 1;
            if f.explicitly_allowed() {
                c.explicit_requests += f.count;
                c.explicit_flows += 1;
            }
        }
        c
    }

    /// Distinct flows held.
    pub fn len(&self) -> usize {
        self.total
    }

    pub fn is_empty(&self) -> bool {
        self.total == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(peer: &str, path: &str, decision: DecisionKind, rule: Option<usize>, n: u64) -> Flow {
        Flow {
            layer: Layer::L7,
            peer: peer.to_string(),
            workload: "spiffe://mesh.local/ns/shop/sa/forged".to_string(),
            port: 8080,
            method: Some("GET".into()),
            path: Some(path.into()),
            decision,
            policy: rule.map(|_| "shop/p".to_string()),
            rule,
            count: n,
            first_seen: 100,
            last_seen: 100,
            latency: vec![],
            trace_id: None,
        }
    }

    fn report(flows: Vec<Flow>, overflow: u64) -> FlowReport {
        FlowReport::new(flows, overflow)
    }

    const WEB: &str = "spiffe://mesh.local/ns/shop/sa/web";
    const ORDERS: &str = "spiffe://mesh.local/ns/shop/sa/orders";

    /// Reports of one flow merge their latency buckets and keep the latest trace ID; what no
    /// sidecar could send (too many buckets, a trace ID that is no ID) is cut or dropped.
    #[test]
    fn reports_merge_latency_and_trace_ids() {
        let mut store = FlowStore::default();
        let with = |latency: Vec<u64>, trace: Option<&str>| {
            let mut f = flow(WEB, "/orders/*", DecisionKind::Allow, Some(0), 1);
            (f.latency, f.trace_id) = (latency, trace.map(str::to_string));
            report(vec![f], 0)
        };
        let mut too_long = vec![0; crate::wire::LATENCY_BUCKETS + 5];
        too_long[crate::wire::LATENCY_BUCKETS + 4] = 1;
        let mut want = vec![0; crate::wire::LATENCY_BUCKETS];
        (
            want[0],
            want[1],
            want[2],
            want[crate::wire::LATENCY_BUCKETS - 1],
        ) = (1, 3, 1, 1);
        for (latency, trace, want_latency, want_trace) in [
            (vec![1, 2], Some("aaaa"), vec![1, 2], Some("aaaa")),
            // An old sidecar's line: nothing to merge, the trace ID stays.
            (vec![], None, vec![1, 2], Some("aaaa")),
            (vec![0, 1, 1], Some("bbbb"), vec![1, 3, 1], Some("bbbb")),
            (vec![], Some("<script>"), vec![1, 3, 1], Some("bbbb")),
            (too_long, None, want, Some("bbbb")),
        ] {
            store.ingest(ORDERS, report(with(latency, trace).flows, 0), 100);
            let f = &store.flows()[0];
            assert_eq!(f.latency, want_latency);
            assert_eq!(f.trace_id.as_deref(), want_trace);
        }
    }

    #[test]
    fn reports_merge_count_and_expire() {
        let mut store = FlowStore::default();
        use DecisionKind::*;
        store.ingest(
            ORDERS,
            report(
                vec![
                    flow(WEB, "/orders/*", Allow, Some(0), 3),
                    flow(WEB, "/admin", Allow, None, 1),
                    flow(WEB, "/secret", Deny, None, 2),
                    flow(WEB, "/orders/*", DryRunDeny, Some(0), 1),
                ],
                5,
            ),
            100,
        );
        // The same flow again merges; the callee is always the reporter.
        let mut again = flow(WEB, "/orders/*", Allow, Some(0), 2);
        (again.first_seen, again.last_seen) = (150, 160);
        store.ingest(ORDERS, report(vec![again], 0), 160);
        assert_eq!(store.len(), 4);
        assert!(store.flows().iter().all(|f| f.workload == ORDERS));
        let merged = store
            .flows()
            .into_iter()
            .find(|f| f.decision == Allow && f.rule.is_some())
            .unwrap();
        assert_eq!(
            (merged.count, merged.first_seen, merged.last_seen),
            (5, 100, 160)
        );
        let c = store.coverage();
        // Explicit: the allow by rule 0 (5). Passed but not covered: the mesh default (1), and
        // the dry-run-deny that a policy being rolled out would deny (1).
        assert_eq!(
            c,
            Coverage {
                passed_requests: 7,
                explicit_requests: 5,
                passed_flows: 3,
                explicit_flows: 1,
            }
        );
        assert_eq!(c.uncovered_flows(), 2);
        assert_eq!(
            store.classes,
            RequestClasses {
                explicit: 5,
                implicit: 2,
                denied: 2,
                bad_request: 0
            }
        );
        assert_eq!(store.denials[&(WEB.to_string(), ORDERS.to_string())], 2);
        assert_eq!(store.overflow, 5);
        // Ten minutes after the last report of a flow, it is gone; counters stay.
        store.expire(160 + FLOW_TTL.as_secs() as i64);
        assert_eq!(store.len(), 1, "only the flow seen at 160 is left");
        store.expire(161 + FLOW_TTL.as_secs() as i64);
        assert!(store.is_empty());
        assert_eq!(store.coverage().request_ratio(), None);
        assert_eq!(store.classes.denied, 2);
    }

    #[test]
    fn caps_are_counted_not_stored() {
        let mut store = FlowStore::default();
        let flows: Vec<Flow> = (0..MAX_FLOWS_PER_SIDECAR + 10)
            .map(|i| flow(WEB, &format!("/p{i}"), DecisionKind::Allow, None, 2))
            .collect();
        store.ingest(ORDERS, report(flows, 0), 100);
        assert_eq!(store.len(), MAX_FLOWS_PER_SIDECAR);
        assert_eq!(store.overflow, 20);
        // Denial series past the cap fold into one.
        let mut store = FlowStore::default();
        let flows: Vec<Flow> = (0..MAX_DENIAL_SERIES + 3)
            .map(|i| flow(&format!("{WEB}{i}"), "/x", DecisionKind::Deny, None, 1))
            .collect();
        store.ingest(ORDERS, report(flows, 0), 100);
        assert_eq!(store.denials.len(), MAX_DENIAL_SERIES + 1);
        assert_eq!(store.denials[&("other".into(), "other".into())], 3);
    }

    /// Flows no sidecar would send are refused (and counted), never stored or labelled.
    #[test]
    fn implausible_flows_are_refused() {
        let long = format!("/{}", "a".repeat(MAX_FIELD_LEN));
        let mut bad_policy = flow(WEB, "/x", DecisionKind::Deny, Some(0), 1);
        bad_policy.policy = Some("p".repeat(MAX_FIELD_LEN + 1));
        let cases = [
            (flow("web", "/x", DecisionKind::Deny, None, 1), false),
            (
                flow("spiffe://mesh.local/a?b", "/x", DecisionKind::Deny, None, 1),
                false,
            ),
            (flow(WEB, &long, DecisionKind::Deny, None, 1), false),
            (bad_policy, false),
            (
                flow(WEB, &long[..MAX_FIELD_LEN], DecisionKind::Deny, None, 1),
                true,
            ),
        ];
        for (f, stored) in cases {
            let mut store = FlowStore::default();
            store.ingest(ORDERS, report(vec![f.clone()], 0), 100);
            assert_eq!(store.len(), usize::from(stored), "{f:?}");
            assert_eq!(store.denials.len(), usize::from(stored), "{f:?}");
            assert_eq!(store.overflow, u64::from(!stored), "{f:?}");
        }
    }

    fn l3l4(direction: Direction, port: u16, verdict: &str, n: u64, at: i64) -> L3L4Flow {
        L3L4Flow {
            direction,
            port,
            verdict: verdict.into(),
            count: n,
            first_seen: at - 5,
            last_seen: at,
        }
    }

    fn l3l4_report(flows: Vec<L3L4Flow>, overflow: u64) -> FlowReport {
        FlowReport {
            l3l4: flows,
            l3l4_overflow: overflow,
            ..FlowReport::new(Vec::new(), 0)
        }
    }

    /// eBPF verdicts merge per (direction, port, verdict) of their reporter, expire like flows,
    /// and only denials feed the denial counter, which outlives them.
    #[test]
    fn l3l4_verdicts_merge_count_and_expire() {
        use Direction::*;
        let mut store = FlowStore::default();
        store.ingest(
            ORDERS,
            l3l4_report(
                vec![
                    l3l4(Egress, 9001, "denied_egress", 2, 100),
                    l3l4(Egress, 443, "allowed", 7, 100),
                    l3l4(Ingress, 8080, "denied_ingress", 3, 100),
                ],
                4,
            ),
            100,
        );
        store.ingest(
            ORDERS,
            l3l4_report(vec![l3l4(Egress, 9001, "denied_egress", 1, 160)], 0),
            160,
        );
        store.ingest(
            WEB,
            l3l4_report(vec![l3l4(Egress, 53, "denied_udp_mesh", 5, 160)], 0),
            160,
        );
        assert_eq!(store.l3l4_len(), 4);
        assert!(store.is_empty(), "eBPF verdicts are not flows");
        let held = store.l3l4_flows();
        let got: Vec<_> = held
            .iter()
            .map(|(w, f)| (w.as_str(), f.direction, f.port, f.verdict.as_str(), f.count))
            .collect();
        assert_eq!(
            got,
            vec![
                (ORDERS, Egress, 443, "allowed", 7),
                (ORDERS, Egress, 9001, "denied_egress", 3),
                (ORDERS, Ingress, 8080, "denied_ingress", 3),
                (WEB, Egress, 53, "denied_udp_mesh", 5),
            ]
        );
        assert_eq!((held[1].1.first_seen, held[1].1.last_seen), (95, 160));
        let denials: Vec<_> = store
            .l3l4_denials
            .iter()
            .map(|((w, d, v), n)| (w.as_str(), *d, *v, *n))
            .collect();
        assert_eq!(
            denials,
            vec![
                (ORDERS, Egress, "denied_egress", 3),
                (ORDERS, Ingress, "denied_ingress", 3),
                (WEB, Egress, "denied_udp_mesh", 5),
            ]
        );
        assert_eq!(store.l3l4_overflow, 4);
        // Ten minutes after its last report an entry is gone; the counter stays.
        store.expire(100 + FLOW_TTL.as_secs() as i64 + 1);
        assert_eq!(store.l3l4_len(), 2, "{:?}", store.l3l4_flows());
        store.expire(161 + FLOW_TTL.as_secs() as i64);
        assert_eq!(store.l3l4_len(), 0);
        assert!(store.l3l4_flows().is_empty());
        assert_eq!(store.l3l4_denials.len(), 3);
    }

    /// What no sidecar sends is counted, never stored or used as a label; caps count too.
    #[test]
    fn l3l4_caps_and_implausible_entries() {
        use Direction::*;
        for (flow, stored) in [
            (l3l4(Egress, 1, "denied_egress", 2, 100), true),
            (l3l4(Ingress, 1, "denied_egress", 2, 100), false),
            (l3l4(Egress, 1, "redirected", 2, 100), false),
            (l3l4(Egress, 1, "exempt", 2, 100), false),
            (l3l4(Egress, 1, "denied_\"} 1\nfake", 2, 100), false),
        ] {
            let mut store = FlowStore::default();
            store.ingest(ORDERS, l3l4_report(vec![flow.clone()], 0), 100);
            assert_eq!(store.l3l4_len(), usize::from(stored), "{flow:?}");
            assert_eq!(store.l3l4_denials.len(), usize::from(stored), "{flow:?}");
            assert_eq!(store.l3l4_overflow, if stored { 0 } else { 2 }, "{flow:?}");
        }
        // Times from the future are brought back to now.
        let mut store = FlowStore::default();
        store.ingest(
            ORDERS,
            l3l4_report(vec![l3l4(Egress, 1, "allowed", 1, 10_000)], 0),
            100,
        );
        assert_eq!(store.l3l4_flows()[0].1.last_seen, 100);
        // Per sidecar: at most MAX_FLOWS_PER_SIDECAR entries.
        let mut store = FlowStore::default();
        let many: Vec<_> = (0..MAX_FLOWS_PER_SIDECAR + 5)
            .map(|p| l3l4(Egress, p as u16, "allowed", 1, 100))
            .collect();
        store.ingest(ORDERS, l3l4_report(many, 0), 100);
        assert_eq!(store.l3l4_len(), MAX_FLOWS_PER_SIDECAR);
        assert_eq!(store.l3l4_overflow, 5);
        // Denial series past the cap fold into workload "other", direction and verdict kept.
        let mut store = FlowStore::default();
        for i in 0..MAX_L3L4_DENIAL_SERIES + 2 {
            store.ingest(
                &format!("{WEB}{i}"),
                l3l4_report(vec![l3l4(Ingress, 8080, "denied_ingress", 1, 100)], 0),
                100,
            );
        }
        assert_eq!(store.l3l4_denials.len(), MAX_L3L4_DENIAL_SERIES + 1);
        assert_eq!(
            store.l3l4_denials[&("other".to_string(), Ingress, "denied_ingress")],
            2
        );
    }

    #[test]
    fn unknown_report_types_are_ignored() {
        let mut store = FlowStore::default();
        let mut r = report(vec![flow(WEB, "/x", DecisionKind::Allow, None, 1)], 1);
        r.type_url = "meshgate.dev/v2/FlowReport".into();
        store.ingest(ORDERS, r, 100);
        assert!(store.is_empty());
        assert_eq!((store.reports, store.overflow), (0, 0));
    }
}
