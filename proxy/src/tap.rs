//! The sidecar's end of the live tap (`meshgate_xds::tap` has the control plane's): while the
//! control plane asks for it over the stream, decisions matching its filter are sent up one by
//! one, rate-limited, until the request's time runs out or a stop arrives.
//!
//! The [`crate::decision::DecisionSink`] calls [`Tap::record`] for every decision. While nobody
//! taps, that is one relaxed atomic load of the tap's deadline (0: off), so the request path
//! pays nothing else. While tapping, a matching decision takes a mutex (filter, rate limit),
//! builds a small [`TapRecord`] and `try_send`s it to the stream; a decision over the rate
//! limit, or one the stream cannot take at once, is counted as dropped and reported with the
//! next line: the tap never waits, so it can never slow traffic.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meshgate_policy::DecisionRecord;
use meshgate_xds::client::{TapControl, TapSource};
use meshgate_xds::tap::RateLimit;
use meshgate_xds::wire::{
    MAX_TAP_FILTER_ENTRIES, MAX_TAP_PATH_BYTES, MAX_TAP_RATE, MAX_TAP_SECONDS, TAP_EVENT_TYPE,
    TAP_REQUEST_TYPE, TapEvent, TapFilter, TapRecord, TapRequest, cap_text,
};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::mpsc;

use crate::metrics::{Metrics, TapLabels};

/// Events queued for the stream: a second's worth at the highest rate a tap may ask for.
const QUEUE: usize = MAX_TAP_RATE as usize;

/// The tap of one sidecar.
pub struct Tap {
    epoch: Instant,
    /// When the tap ends, in milliseconds since `epoch`; 0 while it is off.
    until_ms: AtomicU64,
    state: Mutex<State>,
    tx: mpsc::Sender<TapEvent>,
    rx: Arc<tokio::sync::Mutex<mpsc::Receiver<TapEvent>>>,
    /// Decisions dropped and not reported yet.
    dropped: AtomicU64,
    sent_total: Counter,
    dropped_total: Counter,
}

struct State {
    id: String,
    filter: TapFilter,
    rate: u32,
    limit: RateLimit,
}

impl Tap {
    pub fn new(metrics: &Metrics) -> Arc<Self> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let counter = |result| {
            metrics
                .tap_events
                .get_or_create(&TapLabels { result })
                .clone()
        };
        Arc::new(Self {
            epoch: Instant::now(),
            until_ms: AtomicU64::new(0),
            state: Mutex::new(State {
                id: String::new(),
                filter: TapFilter::default(),
                rate: 0,
                limit: RateLimit::new(0),
            }),
            tx,
            rx: Arc::new(tokio::sync::Mutex::new(rx)),
            dropped: AtomicU64::new(0),
            sent_total: counter("sent"),
            dropped_total: counter("dropped"),
        })
    }

    /// What the control-plane stream drives and drains.
    pub fn source(self: &Arc<Self>) -> TapSource {
        TapSource {
            control: self.clone(),
            events: self.rx.clone(),
        }
    }

    /// Whether a tap runs now.
    pub fn active(&self) -> bool {
        let until = self.until_ms.load(Ordering::Relaxed);
        until != 0 && self.now_ms() < until
    }

    fn now_ms(&self) -> u64 {
        // At least 1: 0 means "off".
        (self.epoch.elapsed().as_millis() as u64).max(1)
    }

    /// A decision (for HTTP: its response status, the sidecar's latency, and the trace ID
    /// when that trace is exported). One atomic load unless a tap runs.
    #[inline]
    pub fn record(
        &self,
        r: &DecisionRecord,
        status: Option<u16>,
        latency: Option<Duration>,
        trace_id: Option<&str>,
    ) {
        let until = self.until_ms.load(Ordering::Relaxed);
        if until != 0 {
            self.tapped(
                until,
                r,
                Extra {
                    status,
                    latency,
                    trace_id,
                },
            );
        }
    }

    #[cold]
    fn tapped(&self, until: u64, r: &DecisionRecord, extra: Extra<'_>) {
        if self.now_ms() >= until {
            // Ran out without a renewal: off, until the next request.
            let _ = self
                .until_ms
                .compare_exchange(until, 0, Ordering::Relaxed, Ordering::Relaxed);
            return;
        }
        let mut st = self.state.lock().expect("tap lock");
        if !st.filter.matches(r.peer.as_str(), r.decision) {
            return;
        }
        if !st.limit.admit(Instant::now()) {
            drop(st);
            self.drop_events(1);
            return;
        }
        let event = TapEvent {
            type_url: TAP_EVENT_TYPE.to_string(),
            id: st.id.clone(),
            record: Some(tap_record(r, extra)),
            dropped: self.dropped.swap(0, Ordering::Relaxed),
        };
        drop(st);
        match self.tx.try_send(event) {
            Ok(()) => {
                self.sent_total.inc();
            }
            Err(e) => {
                // The stream is slower than the tap: this one and the drops it carried.
                let event = e.into_inner();
                self.dropped.fetch_add(event.dropped, Ordering::Relaxed);
                self.drop_events(1);
            }
        }
    }

    fn drop_events(&self, n: u64) {
        self.dropped.fetch_add(n, Ordering::Relaxed);
        self.dropped_total.inc_by(n);
    }
}

/// What the tap sends beside the record.
struct Extra<'a> {
    status: Option<u16>,
    latency: Option<Duration>,
    trace_id: Option<&'a str>,
}

/// A decision as the tap sends it: the paths cut to [`MAX_TAP_PATH_BYTES`].
fn tap_record(r: &DecisionRecord, extra: Extra<'_>) -> TapRecord {
    let cap = |p: &Option<String>| p.as_deref().map(|p| cap_text(p, MAX_TAP_PATH_BYTES));
    TapRecord {
        time_ms: (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64,
        layer: r.layer,
        peer: r.peer.to_string(),
        workload: r.workload.to_string(),
        port: r.port,
        method: r.method.clone(),
        path: cap(&r.path),
        original: cap(&r.original),
        decision: r.decision,
        policy: r.policy.clone(),
        rule: r.rule,
        status: extra.status,
        latency_us: extra
            .latency
            .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX)),
        trace_id: extra.trace_id.map(str::to_string),
    }
}

impl TapControl for Tap {
    fn start(&self, request: &TapRequest) {
        if request.type_url != TAP_REQUEST_TYPE {
            tracing::warn!(event = "tap.refused", type_url = %meshgate_xds::wire::sanitize_peer_text(&request.type_url, 128), "a tap request of an unknown type was ignored (a newer control plane?)");
            return;
        }
        if request.seconds == 0 {
            self.stop();
            return;
        }
        let mut filter = request.filter.clone();
        // A list longer than a control plane sends would make every decision scan it.
        if filter.callers.len() > MAX_TAP_FILTER_ENTRIES {
            filter.callers.clear();
        }
        if filter.decisions.len() > MAX_TAP_FILTER_ENTRIES {
            filter.decisions.clear();
        }
        let rate = request.max_per_second.min(MAX_TAP_RATE);
        let seconds = u64::from(request.seconds.min(MAX_TAP_SECONDS));
        {
            let mut st = self.state.lock().expect("tap lock");
            // A renewal of the same tap keeps its rate window, so it cannot double a second.
            if st.id != request.id || st.rate != rate {
                st.limit = RateLimit::new(rate);
                st.rate = rate;
            }
            st.id.clone_from(&request.id);
            st.filter = filter;
        }
        let was_on = self.active();
        self.until_ms
            .store(self.now_ms() + seconds * 1000, Ordering::Relaxed);
        if !was_on {
            tracing::info!(event = "tap.started", id = %meshgate_xds::wire::sanitize_peer_text(&request.id, 64), seconds, max_per_second = rate, "the control plane taps this sidecar's decisions");
        }
    }

    fn stop(&self) {
        if self.until_ms.swap(0, Ordering::Relaxed) != 0 {
            tracing::info!(event = "tap.stopped", "tap stopped");
        }
    }

    fn flush_dropped(&self) -> Option<TapEvent> {
        let dropped = self.dropped.swap(0, Ordering::Relaxed);
        (dropped > 0).then(|| TapEvent {
            type_url: TAP_EVENT_TYPE.to_string(),
            id: self.state.lock().expect("tap lock").id.clone(),
            record: None,
            dropped,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshgate_policy::DecisionKind;
    use meshgate_policy::record::Layer;

    const WEB: &str = "spiffe://mesh.local/ns/shop/sa/web";
    const ORDERS: &str = "spiffe://mesh.local/ns/shop/sa/orders";

    fn record(caller: &str, decision: DecisionKind, path: &str) -> DecisionRecord {
        let id = |s: &str| meshgate_ca::SpiffeId::parse(s).unwrap();
        let mut r = DecisionRecord::new(
            Layer::L7,
            &id(ORDERS),
            &id(caller),
            8080,
            &meshgate_policy::Decision::bad_request("v1", "x".into()),
        );
        r.decision = decision;
        r.method = Some("GET".into());
        r.path = Some(path.into());
        r
    }

    fn request(seconds: u32, rate: u32, filter: TapFilter) -> TapRequest {
        TapRequest {
            type_url: TAP_REQUEST_TYPE.into(),
            id: "t1".into(),
            seconds,
            filter,
            max_per_second: rate,
        }
    }

    fn drain(tap: &Tap) -> Vec<TapEvent> {
        let mut rx = tap.rx.try_lock().unwrap();
        std::iter::from_fn(|| rx.try_recv().ok()).collect()
    }

    /// Off until asked: decisions produce nothing and nothing is counted.
    #[test]
    fn an_idle_tap_sends_nothing() {
        let metrics = Metrics::default();
        let tap = Tap::new(&metrics);
        for _ in 0..10 {
            tap.record(
                &record(WEB, DecisionKind::Deny, "/a"),
                Some(403),
                None,
                None,
            );
        }
        assert!(!tap.active());
        assert!(drain(&tap).is_empty());
        assert_eq!(tap.flush_dropped(), None);
        assert_eq!((tap.sent_total.get(), tap.dropped_total.get()), (0, 0));
    }

    /// The filter decides what is sent; over the rate, decisions are dropped, counted, and
    /// reported on the next line (or by a flush); a stop or `seconds: 0` ends it.
    #[test]
    fn a_tap_filters_rate_limits_and_counts_drops() {
        let metrics = Metrics::default();
        let tap = Tap::new(&metrics);
        let filter = TapFilter {
            decisions: vec![DecisionKind::Deny],
            callers: vec![WEB.into()],
        };
        tap.start(&request(30, 3, filter));
        assert!(tap.active());
        let long = format!("/orders/{}", "9".repeat(2 * MAX_TAP_PATH_BYTES));
        let cases = [
            (WEB, DecisionKind::Deny, "/1"),
            (WEB, DecisionKind::Allow, "/not-this-decision"),
            (ORDERS, DecisionKind::Deny, "/not-this-caller"),
            (WEB, DecisionKind::Deny, "/2"),
            (WEB, DecisionKind::Deny, long.as_str()),
            (WEB, DecisionKind::Deny, "/over-the-rate-1"),
            (WEB, DecisionKind::Deny, "/over-the-rate-2"),
        ];
        for (caller, decision, path) in cases {
            tap.record(
                &record(caller, decision, path),
                Some(403),
                Some(Duration::from_micros(250)),
                None,
            );
        }
        let events = drain(&tap);
        let paths: Vec<String> = events
            .iter()
            .map(|e| e.record.as_ref().unwrap().path.clone().unwrap())
            .collect();
        assert_eq!(paths.len(), 3, "{paths:?}");
        assert_eq!(&paths[..2], ["/1", "/2"]);
        assert!(paths[2].len() <= MAX_TAP_PATH_BYTES && paths[2].ends_with('…'));
        let first = events[0].record.as_ref().unwrap();
        assert_eq!(
            (
                first.status,
                first.latency_us,
                first.workload.as_str(),
                first.peer.as_str()
            ),
            (Some(403), Some(250), ORDERS, WEB)
        );
        assert!(events.iter().all(|e| e.id == "t1" && e.dropped == 0));
        assert_eq!((tap.sent_total.get(), tap.dropped_total.get()), (3, 2));
        let flushed = tap.flush_dropped().unwrap();
        assert_eq!(
            (flushed.dropped, flushed.record, flushed.id.as_str()),
            (2, None, "t1")
        );
        assert_eq!(tap.flush_dropped(), None, "reported once");

        // Renewed with a new rate: a fresh window. Dropped decisions ride on the next event.
        tap.start(&request(30, 1, TapFilter::default()));
        tap.record(&record(ORDERS, DecisionKind::Allow, "/a"), None, None, None);
        tap.record(&record(ORDERS, DecisionKind::Allow, "/b"), None, None, None);
        assert_eq!(drain(&tap).len(), 1);
        assert_eq!(tap.dropped.load(Ordering::Relaxed), 1);

        // Stopped: nothing more.
        tap.start(&request(0, 1, TapFilter::default()));
        assert!(!tap.active());
        tap.record(&record(WEB, DecisionKind::Deny, "/c"), None, None, None);
        assert!(drain(&tap).is_empty());
    }

    /// A tap ends by itself when its time is up (at most MAX_TAP_SECONDS, whatever is asked).
    #[test]
    fn a_tap_runs_out() {
        let metrics = Metrics::default();
        let tap = Tap::new(&metrics);
        tap.start(&request(10_000, 10_000, TapFilter::default()));
        let until = tap.until_ms.load(Ordering::Relaxed);
        assert!(until <= tap.now_ms() + u64::from(MAX_TAP_SECONDS) * 1000);
        assert_eq!(tap.state.lock().unwrap().rate, MAX_TAP_RATE);
        // Make it due now.
        tap.until_ms.store(1, Ordering::Relaxed);
        tap.record(&record(WEB, DecisionKind::Deny, "/late"), None, None, None);
        assert!(drain(&tap).is_empty());
        assert_eq!(tap.until_ms.load(Ordering::Relaxed), 0);
    }

    /// A full queue (the stream is slower than the tap) drops instead of waiting.
    #[test]
    fn a_full_queue_drops_instead_of_blocking() {
        let metrics = Metrics::default();
        let tap = Tap::new(&metrics);
        tap.start(&request(30, MAX_TAP_RATE, TapFilter::default()));
        for i in 0..QUEUE + 5 {
            tap.record(
                &record(WEB, DecisionKind::Allow, &format!("/{i}")),
                None,
                None,
                None,
            );
        }
        assert_eq!(tap.sent_total.get(), QUEUE as u64);
        assert_eq!(tap.dropped_total.get(), 5);
        assert_eq!(drain(&tap).len(), QUEUE);
        assert_eq!(tap.flush_dropped().map(|e| e.dropped), Some(5));
    }
}
