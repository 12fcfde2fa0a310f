//! Flow aggregation: every decision the [`crate::decision::DecisionSink`] writes (HTTP requests
//! and L4 tunnels alike) is also counted into a flow — caller, method, path *pattern*, port,
//! decision, deciding policy and rule — which the control-plane stream reports every interval
//! (`--flow-report-interval`, [`DEFAULT_REPORT_INTERVAL`]) and then forgets.
//!
//! Bounded twice:
//! - **Paths are patterns, never raw paths.** When the deciding rule has path conditions, the
//!   first of them that matches the path is the flow's path (`/orders/*` for a rule written so);
//!   otherwise the path is cut after its first segment: `/orders/123` → `/orders/*`, `/health`
//!   stays `/health`, and a first segment longer than [`MAX_SEGMENT`] bytes becomes `/*`. So IDs
//!   in paths do not make flows, and every pattern is one a policy can say.
//! - **At most [`MAX_FLOWS_PER_INTERVAL`] distinct flows per interval.** Decisions of further
//!   flows are counted (`meshgate_flow_cardinality_overflow_total`, and the report's `overflow`),
//!   not kept.
//!
//! Cheap on the request path: the key is hashed from borrowed parts of the record, looked up in
//! one of [`SHARDS`] mutex-guarded maps (so concurrent requests rarely wait on one another), and
//! an existing flow is counted without allocating. Only a new flow allocates its key.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use meshgate_policy::pattern::Pattern;
use meshgate_policy::record::Layer;
use meshgate_policy::{DecisionKind, DecisionRecord, PolicySet};
use meshgate_xds::wire::{Flow, LATENCY_BUCKETS, LatencyHistogram, MAX_TRACE_ID_LEN};
use prometheus_client::metrics::counter::Counter;

/// How often flows are reported to the control plane by default.
pub const DEFAULT_REPORT_INTERVAL: Duration = Duration::from_secs(5);
/// Distinct flows aggregated per report interval (a few hundred kB at most).
pub const MAX_FLOWS_PER_INTERVAL: usize = 4096;
/// A first path segment longer than this is not kept in a flow's path (it is an ID, a token or
/// an attack): the path becomes `/*`.
pub const MAX_SEGMENT: usize = 64;
/// Independent locks of the table: requests on different flows rarely contend.
pub const SHARDS: usize = 16;

/// The path conditions of every rule of the policies in force, by `namespace/name` and rule
/// index, with their source text.
type RulePaths = HashMap<String, Vec<Vec<(Pattern, String)>>>;

/// A flow's path as derived from a record, borrowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PathKey<'a> {
    /// Kept as is: a rule's pattern, a one-segment path, or `/*`.
    Whole(&'a str),
    /// The first segment of a longer path (`/orders`), reported as `/orders/*`.
    FirstSegment(&'a str),
}

impl PathKey<'_> {
    fn hash(&self, h: &mut impl Hasher) {
        match self {
            PathKey::Whole(p) => h.write(p.as_bytes()),
            PathKey::FirstSegment(s) => {
                h.write(s.as_bytes());
                h.write(b"/*");
            }
        }
        h.write_u8(0xff);
    }

    fn matches(&self, owned: &str) -> bool {
        match self {
            PathKey::Whole(p) => owned == *p,
            PathKey::FirstSegment(s) => owned.strip_suffix("/*") == Some(s),
        }
    }

    fn to_owned_path(self) -> String {
        match self {
            PathKey::Whole(p) => p.to_string(),
            PathKey::FirstSegment(s) => format!("{s}/*"),
        }
    }
}

/// The bounded path of a request that no rule's path condition describes.
fn cut_path(path: &str) -> PathKey<'_> {
    let rest = path.strip_prefix('/').unwrap_or(path);
    let (first, more) = match rest.find('/') {
        Some(i) => (&path[..i + 1], true),
        None => (path, false),
    };
    if first.len() > MAX_SEGMENT + 1 || !path.starts_with('/') {
        PathKey::Whole("/*")
    } else if more {
        PathKey::FirstSegment(first)
    } else {
        PathKey::Whole(first)
    }
}

struct Entry {
    layer: Layer,
    peer: String,
    method: Option<String>,
    path: Option<String>,
    port: u16,
    decision: DecisionKind,
    policy: Option<String>,
    rule: Option<usize>,
    count: u64,
    first_seen: i64,
    last_seen: i64,
    /// [`LatencyHistogram`] counts of the HTTP requests (u32: one interval's requests of one
    /// flow fit, saturating); all zero for tunnels.
    latency: [u32; LATENCY_BUCKETS],
    /// The trace ID of the latest traced request; empty when none (a reused buffer, so
    /// updating it does not allocate).
    trace_id: String,
}

impl Entry {
    fn observe(&mut self, latency: Option<Duration>, trace_id: Option<&str>) {
        if let Some(d) = latency {
            let b = &mut self.latency[LatencyHistogram::bucket(d)];
            *b = b.saturating_add(1);
        }
        if let Some(t) = trace_id.filter(|t| !t.is_empty() && t.len() <= MAX_TRACE_ID_LEN) {
            self.trace_id.clear();
            self.trace_id.push_str(t);
        }
    }
}

impl Entry {
    fn is(&self, r: &DecisionRecord, path: Option<PathKey<'_>>) -> bool {
        self.port == r.port
            && self.decision == r.decision
            && self.rule == r.rule
            && self.layer == r.layer
            && self.peer == r.peer.as_str()
            && self.method.as_deref() == r.method.as_deref()
            && self.policy.as_deref() == r.policy.as_deref()
            && match (&self.path, path) {
                (None, None) => true,
                (Some(owned), Some(key)) => key.matches(owned),
                _ => false,
            }
    }
}

/// One sidecar's flows of the current interval.
pub struct FlowTable {
    workload: String,
    hasher: std::collections::hash_map::RandomState,
    /// Hash of the key → the flows with that hash (almost always one).
    shards: Vec<Mutex<HashMap<u64, Vec<Entry>>>>,
    len: AtomicUsize,
    cap: usize,
    overflow: AtomicU64,
    overflow_metric: Counter,
    rules: ArcSwap<RulePaths>,
}

impl std::fmt::Debug for FlowTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlowTable")
            .field("workload", &self.workload)
            .field("len", &self.len)
            .finish()
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

impl FlowTable {
    /// The flows of `workload`'s sidecar, at most `cap` per interval; decisions over the cap are
    /// counted in `overflow_metric`.
    pub fn new(workload: &meshgate_ca::SpiffeId, cap: usize, overflow_metric: Counter) -> Self {
        Self {
            workload: workload.to_string(),
            hasher: std::collections::hash_map::RandomState::new(),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            len: AtomicUsize::new(0),
            cap,
            overflow: AtomicU64::new(0),
            overflow_metric,
            rules: ArcSwap::from_pointee(RulePaths::new()),
        }
    }

    /// Learns the path conditions of the policies now in force (called at each policy swap).
    pub fn set_policy(&self, set: &PolicySet) {
        let mut rules = RulePaths::new();
        for p in &set.policies {
            let per_rule = p
                .spec
                .rules
                .iter()
                .map(|rule| {
                    rule.to
                        .iter()
                        .flat_map(|op| &op.paths)
                        .filter_map(|text| Some((Pattern::parse(text).ok()?, text.clone())))
                        .collect()
                })
                .collect();
            rules.insert(p.metadata.key(), per_rule);
        }
        self.rules.store(Arc::new(rules));
    }

    /// Counts one decision, with how long the request took (`None` for tunnels) and the trace
    /// ID worth linking to (a sampled or denied request's), if any.
    pub fn record(&self, r: &DecisionRecord, latency: Option<Duration>, trace_id: Option<&str>) {
        let rules = self.rules.load();
        let path = r.path.as_deref().map(|path| {
            let from_rule = r
                .policy
                .as_deref()
                .zip(r.rule)
                .and_then(|(policy, rule)| rules.get(policy)?.get(rule))
                .and_then(|patterns| {
                    patterns.iter().find(|(p, _)| {
                        p.matches(path.as_bytes()) || p.matches_ignore_case(path.as_bytes())
                    })
                });
            match from_rule {
                Some((_, text)) => PathKey::Whole(text),
                None => cut_path(path),
            }
        });
        let mut h = self.hasher.build_hasher();
        h.write_u8(r.layer as u8);
        h.write(r.peer.as_str().as_bytes());
        h.write_u8(0xff);
        if let Some(m) = &r.method {
            h.write(m.as_bytes());
        }
        h.write_u8(0xff);
        if let Some(p) = path {
            p.hash(&mut h);
        }
        h.write_u16(r.port);
        h.write_u8(r.decision as u8);
        if let Some(p) = &r.policy {
            h.write(p.as_bytes());
        }
        h.write_u8(0xff);
        h.write_u64(r.rule.map_or(u64::MAX, |x| x as u64));
        let hash = h.finish();
        let now = now();
        let mut shard = self.shards[(hash as usize) % SHARDS]
            .lock()
            .expect("flow shard lock");
        let bucket = shard.entry(hash).or_default();
        if let Some(e) = bucket.iter_mut().find(|e| e.is(r, path)) {
            e.count += 1;
            e.last_seen = now;
            e.observe(latency, trace_id);
            return;
        }
        if self.len.fetch_add(1, Ordering::Relaxed) >= self.cap {
            self.len.fetch_sub(1, Ordering::Relaxed);
            self.overflow.fetch_add(1, Ordering::Relaxed);
            self.overflow_metric.inc();
            if bucket.is_empty() {
                shard.remove(&hash);
            }
            return;
        }
        let mut entry = Entry {
            layer: r.layer,
            peer: r.peer.to_string(),
            method: r.method.clone(),
            path: path.map(PathKey::to_owned_path),
            port: r.port,
            decision: r.decision,
            policy: r.policy.clone(),
            rule: r.rule,
            count: 1,
            first_seen: now,
            last_seen: now,
            latency: [0; LATENCY_BUCKETS],
            trace_id: String::new(),
        };
        entry.observe(latency, trace_id);
        bucket.push(entry);
    }

    /// Takes the flows of the interval (and the decisions over the cap) and starts a new one.
    ///
    /// The room of the taken flows is given back only once every shard is taken: a flow
    /// recorded into an emptied shard while later shards are still being taken would otherwise
    /// be admitted next to the old flows, and one report could carry up to twice the cap.
    pub fn drain(&self) -> (Vec<Flow>, u64) {
        let mut out = Vec::new();
        for shard in &self.shards {
            let taken = std::mem::take(&mut *shard.lock().expect("flow shard lock"));
            for entry in taken.into_values().flatten() {
                out.push(Flow {
                    layer: entry.layer,
                    peer: entry.peer,
                    workload: self.workload.clone(),
                    port: entry.port,
                    method: entry.method,
                    path: entry.path,
                    decision: entry.decision,
                    policy: entry.policy,
                    rule: entry.rule,
                    count: entry.count,
                    first_seen: entry.first_seen,
                    last_seen: entry.last_seen,
                    latency: LatencyHistogram(entry.latency.map(u64::from)).to_wire(),
                    trace_id: Some(entry.trace_id).filter(|t| !t.is_empty()),
                });
            }
        }
        self.len.fetch_sub(out.len(), Ordering::Relaxed);
        (out, self.overflow.swap(0, Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshgate_ca::SpiffeId;

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    fn record(peer: &str, method: &str, path: &str, kind: DecisionKind) -> DecisionRecord {
        let mut r = DecisionRecord::new(
            Layer::L7,
            &id("spiffe://mesh.local/ns/shop/sa/orders"),
            &id(peer),
            8080,
            &meshgate_policy::Decision::bad_request("v1", "r".into()),
        );
        r.decision = kind;
        r.method = Some(method.into());
        r.path = Some(path.into());
        r
    }

    fn table(cap: usize) -> (FlowTable, Counter) {
        let counter = Counter::default();
        (
            FlowTable::new(
                &id("spiffe://mesh.local/ns/shop/sa/orders"),
                cap,
                counter.clone(),
            ),
            counter,
        )
    }

    #[test]
    fn paths_are_cut_to_patterns() {
        let long = format!("/{}/x", "a".repeat(MAX_SEGMENT + 1));
        let edge = format!("/{}/x", "a".repeat(MAX_SEGMENT));
        let edge_want = format!("/{}/*", "a".repeat(MAX_SEGMENT));
        let cases: &[(&str, &str)] = &[
            ("/", "/"),
            ("/health", "/health"),
            ("/orders/123", "/orders/*"),
            ("/orders/", "/orders/*"),
            ("/api/v1/users/9", "/api/*"),
            (&long, "/*"),
            (&edge, &edge_want),
            ("*", "/*"),
        ];
        for (path, want) in cases {
            assert_eq!(cut_path(path).to_owned_path(), *want, "{path}");
        }
    }

    const WEB: &str = "spiffe://mesh.local/ns/shop/sa/web";
    const ADMIN: &str = "spiffe://mesh.local/ns/shop/sa/admin";

    /// Records in, flows out: same caller/method/pattern/decision merge; every key part splits.
    #[test]
    fn decisions_aggregate_into_flows() {
        use DecisionKind::*;
        let (t, _) = table(100);
        let mut l4 = record(WEB, "GET", "/x", Deny);
        (l4.layer, l4.method, l4.path, l4.port) = (Layer::L4, None, None, 5432);
        let mut other_port = record(WEB, "GET", "/orders/1", Allow);
        other_port.port = 9090;
        let records = [
            record(WEB, "GET", "/orders/1", Allow),
            record(WEB, "GET", "/orders/2", Allow),
            record(WEB, "GET", "/orders/3/items", Allow),
            record(WEB, "POST", "/orders/1", Allow),
            record(ADMIN, "GET", "/orders/1", Allow),
            record(WEB, "GET", "/orders/1", Deny),
            other_port,
            l4.clone(),
            l4,
        ];
        for r in &records {
            t.record(r, None, None);
        }
        let (mut flows, overflow) = t.drain();
        assert_eq!(overflow, 0);
        flows.sort_by_key(|f| {
            (
                f.peer.clone(),
                f.method.clone(),
                f.port,
                f.decision,
                f.layer as u8,
            )
        });
        let got: Vec<_> = flows
            .iter()
            .map(|f| {
                (
                    f.peer.rsplit('/').next().unwrap(),
                    f.method.as_deref(),
                    f.path.as_deref(),
                    f.port,
                    f.decision,
                    f.count,
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("admin", Some("GET"), Some("/orders/*"), 8080, Allow, 1),
                ("web", None, None, 5432, Deny, 2),
                ("web", Some("GET"), Some("/orders/*"), 8080, Allow, 3),
                ("web", Some("GET"), Some("/orders/*"), 8080, Deny, 1),
                ("web", Some("GET"), Some("/orders/*"), 9090, Allow, 1),
                ("web", Some("POST"), Some("/orders/*"), 8080, Allow, 1),
            ]
        );
        assert!(
            flows
                .iter()
                .all(|f| f.workload == "spiffe://mesh.local/ns/shop/sa/orders")
        );
        // Drained: the next interval starts empty.
        assert_eq!(t.drain(), (vec![], 0));
    }

    /// HTTP requests land in their flow's latency buckets (tunnels in none), and the flow keeps
    /// the trace ID of its latest traced request.
    #[test]
    fn flows_keep_latency_and_the_latest_trace_id() {
        let (t, _) = table(100);
        let ms = Duration::from_millis;
        let get = record(WEB, "GET", "/orders/1", DecisionKind::Allow);
        let mut l4 = record(WEB, "GET", "/x", DecisionKind::Allow);
        (l4.layer, l4.method, l4.path) = (Layer::L4, None, None);
        t.record(&get, Some(ms(1)), None);
        t.record(&get, Some(ms(1)), Some("aaaa"));
        t.record(&get, Some(ms(100)), Some(""));
        t.record(&get, Some(ms(100)), None);
        t.record(&get, Some(ms(3)), Some("bbbb"));
        t.record(&get, Some(ms(3)), Some(&"c".repeat(MAX_TRACE_ID_LEN + 1)));
        t.record(&l4, None, Some("dddd"));
        let (mut flows, _) = t.drain();
        flows.sort_by_key(|f| f.latency.is_empty());
        let got: Vec<_> = flows
            .iter()
            .map(|f| (f.layer, f.latency.clone(), f.trace_id.as_deref()))
            .collect();
        let mut http = vec![0; 12];
        (http[4], http[6], http[11]) = (2, 2, 2); // ≤ 1 ms, ≤ 4 ms, ≤ 131 ms
        assert_eq!(
            got,
            vec![
                (Layer::L7, http, Some("bbbb")),
                (Layer::L4, vec![], Some("dddd"))
            ]
        );
    }

    /// The deciding rule's path pattern is the flow's path when one of its paths matches.
    #[test]
    fn the_rules_pattern_names_the_path() {
        let set = meshgate_policy::load_text(
            std::path::Path::new("p.yaml"),
            r#"
apiVersion: meshgate.dev/v1
kind: AuthorizationPolicy
metadata: { name: readers, namespace: shop }
spec:
  selector: { account: orders }
  action: ALLOW
  rules:
    - to: [{ paths: ["/status", "/orders/v2/*"] }]
    - from: [{ principals: ["*"] }]
"#,
        )
        .unwrap();
        let (t, _) = table(100);
        t.set_policy(&set);
        let hit = |path: &str, rule: usize| {
            let mut r = record(WEB, "GET", path, DecisionKind::Allow);
            (r.policy, r.rule) = (Some("shop/readers".into()), Some(rule));
            r
        };
        t.record(&hit("/orders/v2/7", 0), None, None);
        t.record(&hit("/orders/v2/8", 0), None, None);
        // A rule without path conditions: the cut path.
        t.record(&hit("/orders/v2/9", 1), None, None);
        let (flows, _) = t.drain();
        let mut got: Vec<_> = flows
            .iter()
            .map(|f| (f.path.clone().unwrap(), f.rule, f.count))
            .collect();
        got.sort();
        assert_eq!(
            got,
            vec![
                ("/orders/*".to_string(), Some(1), 1),
                ("/orders/v2/*".to_string(), Some(0), 2)
            ]
        );
    }

    /// Threads recording while another drains: every decision is in exactly one report, as a
    /// flow's count or as overflow, and the cap holds per interval.
    #[test]
    fn concurrent_records_and_drains_lose_nothing() {
        let (t, _) = table(64);
        let t = Arc::new(t);
        let (threads, per_thread) = (4, 5000);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let drainer = {
            let (t, stop) = (t.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut total = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let (flows, overflow) = t.drain();
                    assert!(flows.len() <= 64);
                    // Every counted request is in the flow's latency histogram too.
                    assert!(
                        flows
                            .iter()
                            .all(|f| f.latency.iter().sum::<u64>() == f.count)
                    );
                    total += flows.iter().map(|f| f.count).sum::<u64>() + overflow;
                }
                total
            })
        };
        let workers: Vec<_> = (0..threads)
            .map(|n| {
                let t = t.clone();
                std::thread::spawn(move || {
                    for i in 0..per_thread {
                        t.record(
                            &record(
                                WEB,
                                "GET",
                                &format!("/p{}/x", (i * 7 + n) % 100),
                                DecisionKind::Allow,
                            ),
                            Some(Duration::from_micros(i as u64 * 37)),
                            None,
                        );
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        let mut total = drainer.join().unwrap();
        let (flows, overflow) = t.drain();
        total += flows.iter().map(|f| f.count).sum::<u64>() + overflow;
        assert_eq!(total, (threads * per_thread) as u64);
    }

    /// Past the cap, new flows are counted as overflow (metric and report) while known flows
    /// keep counting; a drain opens room again.
    #[test]
    fn the_cap_counts_overflow() {
        for (cap, distinct, repeats, want_flows, want_overflow) in [
            (4, 3, 2, 3, 0),
            (4, 4, 1, 4, 0),
            (4, 10, 1, 4, 6),
            (4, 10, 3, 4, 18),
            (0, 2, 1, 0, 2),
        ] {
            let (t, metric) = table(cap);
            for _ in 0..repeats {
                for i in 0..distinct {
                    t.record(
                        &record(WEB, "GET", &format!("/p{i}"), DecisionKind::Allow),
                        None,
                        None,
                    );
                }
            }
            let (flows, overflow) = t.drain();
            let case = format!("cap {cap}, {distinct} flows x{repeats}");
            assert_eq!(flows.len(), want_flows, "{case}");
            assert_eq!(overflow, want_overflow, "{case}");
            assert_eq!(metric.get(), want_overflow, "{case}");
            assert!(flows.iter().all(|f| f.count == repeats), "{case}");
            t.record(
                &record(WEB, "GET", "/again", DecisionKind::Allow),
                None,
                None,
            );
            assert_eq!(t.drain().0.len(), usize::from(cap > 0), "{case}");
        }
    }
}
