//! The live tap, control-plane side: individual decisions streamed from the sidecars on demand,
//! like Linkerd's `viz tap`, for the console's "Live tap" panel and `meshgate tap`.
//!
//! Zero cost while nobody looks: sidecars send nothing until asked. A viewer polling the
//! control plane registers a [`Watch`] (its workload and decision filters); while at least one
//! watch was polled in the last [`IDLE_STOP`], the [`TapHub`]'s [`TapPlan`] is active and every
//! stream of a sidecar that advertised [`crate::wire::FEATURE_TAP`] is sent a
//! [`TapRequest`] (renewed every [`RENEW_AFTER`]; the sidecar stops by itself after
//! [`MAX_TAP_SECONDS`] without one). When the last watch goes idle the plan stops, and the
//! streams send a stop. Each sidecar is asked only for what some watch can show: a watch on
//! workload W needs every decision of W's own sidecar, but from the others only W's calls.
//!
//! Bounded everywhere: sidecars rate-limit themselves ([`DEFAULT_TAP_RATE`] per second), the
//! control plane enforces twice that per stream whatever a sidecar sends (the windows of the
//! two sides are not aligned), events are cut
//! to small fields ([`MAX_TAP_PATH_BYTES`]), the ring keeps the last [`RING_SIZE`] events, and
//! at most [`MAX_WATCHES`] distinct filters are tracked. What is cut or refused is counted.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use meshgate_policy::DecisionKind;
use tokio::sync::watch;

use crate::wire::{
    DEFAULT_TAP_RATE, MAX_TAP_FILTER_ENTRIES, MAX_TAP_PATH_BYTES, MAX_TAP_SECONDS,
    MAX_TRACE_ID_LEN, TAP_EVENT_TYPE, TAP_REQUEST_TYPE, TapEvent, TapFilter, TapRecord, TapRequest,
    cap_text, sanitize_peer_text,
};

/// Tap events the control plane keeps (per control plane: it has one console).
pub const RING_SIZE: usize = 1000;
/// A watch not polled for this long is forgotten; with none left, the sidecars are told to stop.
pub const IDLE_STOP: Duration = Duration::from_secs(30);
/// An active tap is re-sent this often while it is polled, well before the sidecars'
/// [`MAX_TAP_SECONDS`] run out.
pub const RENEW_AFTER: Duration = Duration::from_secs(30);
/// Distinct filters tracked; past it, a new one is tracked as "everything" (the sidecars are
/// asked for more, the answers are still filtered per viewer).
pub const MAX_WATCHES: usize = 64;
/// Longest method and policy name kept from a sidecar's event.
const MAX_FIELD_BYTES: usize = 256;

/// Fixed one-second windows: at most `per_second` admitted per window.
#[derive(Debug, Clone)]
pub struct RateLimit {
    per_second: u32,
    window: Option<Instant>,
    used: u32,
}

impl RateLimit {
    pub fn new(per_second: u32) -> Self {
        Self {
            per_second,
            window: None,
            used: 0,
        }
    }

    /// Whether one more event may go at `now`.
    pub fn admit(&mut self, now: Instant) -> bool {
        let fresh = self
            .window
            .is_none_or(|w| now.saturating_duration_since(w) >= Duration::from_secs(1));
        if fresh {
            self.window = Some(now);
            self.used = 0;
        }
        if self.used < self.per_second {
            self.used += 1;
            true
        } else {
            false
        }
    }
}

/// What one viewer filters on: a workload (as caller or callee) and a decision.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Watch {
    /// A SPIFFE ID.
    pub workload: Option<String>,
    pub decision: Option<DecisionKind>,
}

impl Watch {
    pub fn matches(&self, r: &TapRecord) -> bool {
        self.workload
            .as_ref()
            .is_none_or(|w| *w == r.peer || *w == r.workload)
            && self.decision.is_none_or(|d| d == r.decision)
    }
}

/// What the sidecars are asked for now.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TapPlan {
    /// Names the tap, from the first poll until it stops.
    pub id: String,
    pub active: bool,
    /// The watches polled recently (sorted).
    pub watches: Vec<Watch>,
}

impl TapPlan {
    /// The request for the sidecar of `sidecar` (its SPIFFE ID): a stop when inactive.
    pub fn request_for(&self, sidecar: &str) -> TapRequest {
        TapRequest {
            type_url: TAP_REQUEST_TYPE.to_string(),
            id: self.id.clone(),
            seconds: if self.active { MAX_TAP_SECONDS } else { 0 },
            filter: filter_for(&self.watches, sidecar),
            max_per_second: DEFAULT_TAP_RATE,
        }
    }
}

/// The least a sidecar must send for every watch to see what it wants: a decision the sidecar
/// of `sidecar` made is shown by a watch on no workload or on `sidecar` itself (any caller), or
/// on a workload W when W was the caller.
pub fn filter_for(watches: &[Watch], sidecar: &str) -> TapFilter {
    let mut filter = TapFilter::default();
    if watches.is_empty() {
        return filter;
    }
    let any_caller = watches
        .iter()
        .any(|w| w.workload.as_deref().is_none_or(|id| id == sidecar));
    if !any_caller {
        let mut callers: Vec<String> = watches.iter().filter_map(|w| w.workload.clone()).collect();
        callers.sort();
        callers.dedup();
        if callers.len() <= MAX_TAP_FILTER_ENTRIES {
            filter.callers = callers;
        }
    }
    if watches.iter().all(|w| w.decision.is_some()) {
        let mut decisions: Vec<DecisionKind> = watches.iter().filter_map(|w| w.decision).collect();
        decisions.sort();
        decisions.dedup();
        filter.decisions = decisions;
    }
    filter
}

/// The last `cap` events, numbered from 1.
#[derive(Debug)]
pub struct TapRing {
    cap: usize,
    events: VecDeque<(u64, TapRecord)>,
    last: u64,
}

impl TapRing {
    pub fn new(cap: usize) -> Self {
        Self {
            cap,
            events: VecDeque::with_capacity(cap.min(RING_SIZE)),
            last: 0,
        }
    }

    /// Keeps `record` (forgetting the oldest when full); its sequence number.
    pub fn push(&mut self, record: TapRecord) -> u64 {
        self.last += 1;
        if self.events.len() == self.cap {
            self.events.pop_front();
        }
        self.events.push_back((self.last, record));
        self.last
    }

    /// The sequence number of the newest event (0 before the first).
    pub fn last(&self) -> u64 {
        self.last
    }

    /// Events after `since` that `watch` shows, newest first, at most `limit`.
    pub fn query(&self, since: u64, watch: &Watch, limit: usize) -> Vec<(u64, TapRecord)> {
        self.events
            .iter()
            .rev()
            .take_while(|(seq, _)| *seq > since)
            .filter(|(_, r)| watch.matches(r))
            .take(limit)
            .cloned()
            .collect()
    }

    pub fn len(&self) -> usize {
        self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }
}

/// What the hub counted, for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TapCounters {
    /// Events kept in the ring.
    pub events: u64,
    /// Events sidecars reported dropping (over their rate limit or queue).
    pub dropped_by_sidecars: u64,
    /// Events the control plane dropped: over a stream's rate limit, or not plausible.
    pub dropped_by_control_plane: u64,
    /// Whether sidecars are being asked to tap now.
    pub active: bool,
}

#[derive(Debug)]
struct HubState {
    watches: BTreeMap<Watch, Instant>,
    ring: TapRing,
    /// When the active plan was last (re)issued.
    issued: Option<Instant>,
    counters: TapCounters,
}

/// The control plane's tap: the watches, the plan sent to sidecars, the ring of events.
#[derive(Debug)]
pub struct TapHub {
    state: std::sync::Mutex<HubState>,
    plan: watch::Sender<TapPlan>,
}

impl Default for TapHub {
    fn default() -> Self {
        Self::new(RING_SIZE)
    }
}

impl TapHub {
    pub fn new(ring: usize) -> Self {
        Self {
            state: std::sync::Mutex::new(HubState {
                watches: BTreeMap::new(),
                ring: TapRing::new(ring),
                issued: None,
                counters: TapCounters::default(),
            }),
            plan: watch::channel(TapPlan::default()).0,
        }
    }

    /// The plan, as it changes (each stream of a tap-capable sidecar follows it).
    pub fn subscribe(&self) -> watch::Receiver<TapPlan> {
        self.plan.subscribe()
    }

    /// A viewer polled with `watch`: the tap starts, or follows the new filters, or is renewed.
    pub fn poll(&self, watch: Watch, now: Instant) {
        let mut st = self.state.lock().expect("lock");
        let watch = if st.watches.len() >= MAX_WATCHES && !st.watches.contains_key(&watch) {
            Watch::default()
        } else {
            watch
        };
        st.watches.insert(watch, now);
        self.replan(&mut st, now);
    }

    /// Forgets watches idle for [`IDLE_STOP`]; stops the tap when none is left. Called every
    /// second by the server.
    pub fn expire(&self, now: Instant) {
        let mut st = self.state.lock().expect("lock");
        st.watches
            .retain(|_, polled| now.saturating_duration_since(*polled) < IDLE_STOP);
        self.replan(&mut st, now);
    }

    fn replan(&self, st: &mut HubState, now: Instant) {
        let watches: Vec<Watch> = st.watches.keys().cloned().collect();
        let current = self.plan.borrow().clone();
        if watches.is_empty() {
            if current.active {
                tracing::info!(event = "control_plane.tap_stopped", id = %current.id, "nobody polls the tap any more: sidecars are told to stop");
                st.issued = None;
                st.counters.active = false;
                self.plan.send_replace(TapPlan {
                    active: false,
                    watches,
                    ..current
                });
            }
            return;
        }
        let due = st
            .issued
            .is_none_or(|t| now.saturating_duration_since(t) >= RENEW_AFTER);
        if current.active && current.watches == watches && !due {
            return;
        }
        let id = if current.active {
            current.id
        } else {
            let mut bytes = [0u8; 8];
            meshgate_ca::tls::random_bytes(&mut bytes);
            let id = meshgate_ca::cert::hex(&bytes);
            tracing::info!(event = "control_plane.tap_started", id = %id, "a tap is polled: tap-capable sidecars are asked for their decisions");
            id
        };
        st.issued = Some(now);
        st.counters.active = true;
        self.plan.send_replace(TapPlan {
            id,
            active: true,
            watches,
        });
    }

    /// One line a sidecar (`callee`, the stream's authenticated identity) sent; `limit` is that
    /// stream's rate limit. Events of another tap or while none runs are ignored.
    pub fn ingest(&self, callee: &str, event: TapEvent, limit: &mut RateLimit, now: Instant) {
        {
            let plan = self.plan.borrow();
            if event.type_url != TAP_EVENT_TYPE || !plan.active || event.id != plan.id {
                return;
            }
        }
        let mut st = self.state.lock().expect("lock");
        let c = &mut st.counters;
        c.dropped_by_sidecars = c.dropped_by_sidecars.saturating_add(event.dropped);
        let Some(record) = event.record else {
            return;
        };
        let Some(record) = plausible(record, callee) else {
            c.dropped_by_control_plane += 1;
            return;
        };
        if !limit.admit(now) {
            c.dropped_by_control_plane += 1;
            return;
        }
        c.events += 1;
        st.ring.push(record);
    }

    /// The newest sequence number and the events after `since` that `watch` shows, newest
    /// first, at most `limit`.
    pub fn events(&self, since: u64, watch: &Watch, limit: usize) -> (u64, Vec<(u64, TapRecord)>) {
        let st = self.state.lock().expect("lock");
        (st.ring.last(), st.ring.query(since, watch, limit))
    }

    pub fn counters(&self) -> TapCounters {
        self.state.lock().expect("lock").counters
    }
}

/// A record as a sidecar could have sent it, made safe to keep and show: the callee is the
/// stream's identity, the caller a valid SPIFFE ID, texts short and without control characters.
/// `None` when it cannot be.
fn plausible(mut r: TapRecord, callee: &str) -> Option<TapRecord> {
    meshgate_ca::SpiffeId::parse(&r.peer).ok()?;
    r.workload = callee.to_string();
    if [&r.method, &r.policy]
        .iter()
        .any(|t| t.as_ref().is_some_and(|t| t.len() > MAX_FIELD_BYTES))
    {
        return None;
    }
    for path in [&mut r.path, &mut r.original].into_iter().flatten() {
        *path = cap_text(
            &sanitize_peer_text(path, MAX_TAP_PATH_BYTES),
            MAX_TAP_PATH_BYTES,
        );
    }
    r.trace_id = r
        .trace_id
        .filter(|t| t.len() <= MAX_TRACE_ID_LEN && t.bytes().all(|b| b.is_ascii_alphanumeric()));
    Some(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshgate_policy::record::Layer;

    const WEB: &str = "spiffe://mesh.local/ns/shop/sa/web";
    const ORDERS: &str = "spiffe://mesh.local/ns/shop/sa/orders";
    const PAYMENTS: &str = "spiffe://mesh.local/ns/shop/sa/payments";

    fn record(caller: &str, callee: &str, decision: DecisionKind, path: &str) -> TapRecord {
        TapRecord {
            time_ms: 1,
            layer: Layer::L7,
            peer: caller.into(),
            workload: callee.into(),
            port: 8080,
            method: Some("GET".into()),
            path: Some(path.into()),
            original: None,
            decision,
            policy: None,
            rule: None,
            status: Some(403),
            latency_us: Some(120),
            trace_id: None,
        }
    }

    fn watch(workload: Option<&str>, decision: Option<DecisionKind>) -> Watch {
        Watch {
            workload: workload.map(String::from),
            decision,
        }
    }

    #[test]
    fn rate_limit_admits_per_second_windows() {
        let t0 = Instant::now();
        let mut limit = RateLimit::new(3);
        let admitted = |limit: &mut RateLimit, at: Duration, n: usize| {
            (0..n).filter(|_| limit.admit(t0 + at)).count()
        };
        assert_eq!(admitted(&mut limit, Duration::ZERO, 5), 3);
        assert_eq!(admitted(&mut limit, Duration::from_millis(999), 2), 0);
        assert_eq!(admitted(&mut limit, Duration::from_millis(1000), 5), 3);
        assert_eq!(admitted(&mut limit, Duration::from_secs(60), 1), 1);
        assert_eq!(admitted(&mut RateLimit::new(0), Duration::ZERO, 3), 0);
    }

    /// What a sidecar is asked for, given the watches: the union of what each watch shows, no
    /// more than needed.
    #[test]
    fn each_sidecar_is_asked_for_what_some_watch_shows() {
        use DecisionKind::{Allow, Deny};
        type Case<'a> = (Vec<Watch>, &'a str, &'a [DecisionKind], &'a [&'a str]);
        let (all, deny, web) = (
            watch(None, None),
            watch(None, Some(Deny)),
            watch(Some(WEB), None),
        );
        let web_deny = watch(Some(WEB), Some(Deny));
        let orders_allow = watch(Some(ORDERS), Some(Allow));
        let cases: &[Case] = &[
            (vec![all.clone()], ORDERS, &[], &[]),
            (vec![deny.clone()], ORDERS, &[Deny], &[]),
            // A watch on web: web's own sidecar sends everything, the others web's calls.
            (vec![web.clone()], WEB, &[], &[]),
            (vec![web.clone()], PAYMENTS, &[], &[WEB]),
            (vec![web_deny.clone()], PAYMENTS, &[Deny], &[WEB]),
            // Two watches: the union.
            (
                vec![web_deny.clone(), orders_allow.clone()],
                PAYMENTS,
                &[Allow, Deny],
                &[ORDERS, WEB],
            ),
            (
                vec![web_deny.clone(), orders_allow.clone()],
                ORDERS,
                &[Allow, Deny],
                &[],
            ),
            (vec![web_deny.clone(), all.clone()], PAYMENTS, &[], &[]),
        ];
        for (watches, sidecar, decisions, callers) in cases {
            let f = filter_for(watches, sidecar);
            assert_eq!(f.decisions, *decisions, "{watches:?} at {sidecar}");
            assert_eq!(f.callers, *callers, "{watches:?} at {sidecar}");
            // Whatever a watch shows from this sidecar passes the sidecar's filter.
            for w in watches {
                for caller in [WEB, ORDERS, PAYMENTS] {
                    for d in [Allow, Deny] {
                        let r = record(caller, sidecar, d, "/x");
                        if w.matches(&r) {
                            assert!(f.matches(caller, d), "{w:?} {caller} {d:?} at {sidecar}");
                        }
                    }
                }
            }
        }
        // Too many callers to list: any caller.
        let many: Vec<Watch> = (0..MAX_TAP_FILTER_ENTRIES + 1)
            .map(|i| watch(Some(&format!("spiffe://mesh.local/ns/a/sa/w{i}")), None))
            .collect();
        assert!(filter_for(&many, PAYMENTS).callers.is_empty());
    }

    #[test]
    fn watches_filter_by_workload_either_side_and_decision() {
        let r = record(WEB, PAYMENTS, DecisionKind::Deny, "/pay/2");
        for (w, want) in [
            (watch(None, None), true),
            (watch(Some(WEB), None), true),
            (watch(Some(PAYMENTS), None), true),
            (watch(Some(ORDERS), None), false),
            (watch(None, Some(DecisionKind::Deny)), true),
            (watch(None, Some(DecisionKind::Allow)), false),
            (watch(Some(WEB), Some(DecisionKind::Allow)), false),
        ] {
            assert_eq!(w.matches(&r), want, "{w:?}");
        }
    }

    #[test]
    fn the_ring_keeps_the_newest_and_answers_newest_first() {
        let mut ring = TapRing::new(3);
        for i in 0..5 {
            let d = if i % 2 == 0 {
                DecisionKind::Allow
            } else {
                DecisionKind::Deny
            };
            ring.push(record(WEB, ORDERS, d, &format!("/{i}")));
        }
        assert_eq!((ring.len(), ring.last()), (3, 5));
        let paths = |v: Vec<(u64, TapRecord)>| {
            v.into_iter()
                .map(|(seq, r)| format!("{seq}{}", r.path.unwrap()))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            paths(ring.query(0, &Watch::default(), 10)),
            ["5/4", "4/3", "3/2"]
        );
        assert_eq!(paths(ring.query(3, &Watch::default(), 10)), ["5/4", "4/3"]);
        assert_eq!(paths(ring.query(5, &Watch::default(), 10)), [] as [&str; 0]);
        assert_eq!(paths(ring.query(0, &Watch::default(), 1)), ["5/4"]);
        let deny = watch(None, Some(DecisionKind::Deny));
        assert_eq!(paths(ring.query(0, &deny, 10)), ["4/3"]);
    }

    fn event(id: &str, record: Option<TapRecord>, dropped: u64) -> TapEvent {
        TapEvent {
            type_url: TAP_EVENT_TYPE.into(),
            id: id.into(),
            record,
            dropped,
        }
    }

    /// The hub's life: idle (no plan), a poll starts it, a changed filter re-plans, idle
    /// watches expire and the tap stops; events count only while it runs, bounded and cleaned.
    #[test]
    fn the_hub_starts_renews_and_stops_with_its_viewers() {
        let hub = TapHub::new(10);
        let plans = hub.subscribe();
        let t0 = Instant::now();
        assert!(!plans.borrow().active);
        // Events before any tap: ignored.
        let mut limit = RateLimit::new(2);
        hub.ingest(
            PAYMENTS,
            event("", Some(record(WEB, PAYMENTS, DecisionKind::Deny, "/a")), 0),
            &mut limit,
            t0,
        );
        assert_eq!(hub.counters(), TapCounters::default());

        hub.poll(watch(None, Some(DecisionKind::Deny)), t0);
        let plan = plans.borrow().clone();
        assert!(plan.active && !plan.id.is_empty());
        let req = plan.request_for(PAYMENTS);
        assert_eq!(
            (req.seconds, req.max_per_second, req.filter.decisions),
            (MAX_TAP_SECONDS, DEFAULT_TAP_RATE, vec![DecisionKind::Deny])
        );
        // The same poll a second later changes nothing; a new filter or renewal time does.
        let mut rx = hub.subscribe();
        rx.borrow_and_update();
        hub.poll(
            watch(None, Some(DecisionKind::Deny)),
            t0 + Duration::from_secs(1),
        );
        assert!(!rx.has_changed().unwrap());
        hub.poll(watch(Some(WEB), None), t0 + Duration::from_secs(2));
        assert!(rx.has_changed().unwrap());
        assert_eq!(rx.borrow_and_update().id, plan.id, "same tap, new filter");
        hub.expire(t0 + Duration::from_secs(3));
        assert!(!rx.has_changed().unwrap());
        hub.poll(
            watch(Some(WEB), None),
            t0 + RENEW_AFTER + Duration::from_secs(2),
        );
        assert!(rx.has_changed().unwrap(), "renewed");
        rx.borrow_and_update();

        // Events of this tap: kept (cleaned), over the stream's limit or implausible: counted.
        let long = format!("/{}\n", "x".repeat(2 * MAX_TAP_PATH_BYTES));
        let mut forged = record(WEB, ORDERS, DecisionKind::Deny, &long);
        forged.trace_id = Some("not a trace id".into());
        hub.ingest(PAYMENTS, event(&plan.id, Some(forged), 7), &mut limit, t0);
        hub.ingest(
            PAYMENTS,
            event(
                &plan.id,
                Some(record("not-an-id", ORDERS, DecisionKind::Deny, "/")),
                0,
            ),
            &mut limit,
            t0,
        );
        hub.ingest(
            PAYMENTS,
            event(
                &plan.id,
                Some(record(WEB, ORDERS, DecisionKind::Allow, "/b")),
                0,
            ),
            &mut limit,
            t0,
        );
        hub.ingest(
            PAYMENTS,
            event(
                &plan.id,
                Some(record(WEB, ORDERS, DecisionKind::Allow, "/c")),
                0,
            ),
            &mut limit,
            t0,
        );
        hub.ingest(PAYMENTS, event("other-tap", None, 100), &mut limit, t0);
        let c = hub.counters();
        assert_eq!(
            (
                c.events,
                c.dropped_by_sidecars,
                c.dropped_by_control_plane,
                c.active
            ),
            (2, 7, 2, true)
        );
        let (last, events) = hub.events(0, &Watch::default(), 10);
        assert_eq!(last, 2);
        let kept = &events[1].1;
        assert_eq!(
            kept.workload, PAYMENTS,
            "the stream's identity, not the claim"
        );
        assert!(kept.path.as_ref().unwrap().len() <= MAX_TAP_PATH_BYTES);
        assert!(!kept.path.as_ref().unwrap().contains('\n'));
        assert_eq!(kept.trace_id, None);

        // Nobody polls for IDLE_STOP: stopped; a stop request has seconds 0.
        hub.expire(t0 + RENEW_AFTER + Duration::from_secs(2) + IDLE_STOP);
        let stopped = rx.borrow_and_update().clone();
        assert!(!stopped.active);
        assert_eq!(stopped.request_for(PAYMENTS).seconds, 0);
        assert!(!hub.counters().active);
        // A new poll starts a new tap, under a new ID.
        hub.poll(watch(None, None), t0 + Duration::from_secs(200));
        assert_ne!(plans.borrow().id, plan.id);
    }

    #[test]
    fn watches_are_bounded() {
        let hub = TapHub::new(10);
        let t0 = Instant::now();
        for i in 0..MAX_WATCHES + 5 {
            hub.poll(
                watch(Some(&format!("spiffe://mesh.local/ns/a/sa/w{i}")), None),
                t0,
            );
        }
        let plan = hub.subscribe().borrow().clone();
        assert_eq!(plan.watches.len(), MAX_WATCHES + 1);
        assert!(plan.watches.contains(&Watch::default()));
    }
}
