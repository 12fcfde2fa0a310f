//! Connection limits of the CA service: timeouts for every phase of a connection, a cap on open
//! connections per process and per source IP, and load shedding that keeps a share of the
//! connections for peers presenting a valid client certificate (renewing sidecars).
//!
//! Why: every workload depends on the CA to renew its SVID before it expires. Without limits, a
//! few hundred unauthenticated connections that never finish a request held the CA past its file
//! limit, and every renewal failed until they went away. Now an anonymous connection is closed
//! at the first deadline it misses, no source IP can hold more than its share, and when the
//! unauthenticated share is used up a new connection is only kept if it authenticates.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// TLS handshake deadline: 10 s. A sidecar completes its handshake in milliseconds; ten seconds
/// leaves room for a loaded node and a slow network.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshake deadline of a connection admitted beyond the unauthenticated share (it must present
/// a valid client certificate to be kept): 2 s, so such connections free their slot fast.
pub const DEFAULT_PROBATION_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
/// Time from the end of the handshake until the first request's headers are complete: 10 s.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Time to receive a request body once its headers arrived: 10 s (a CSR is under 1 KiB).
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// A kept-alive connection with no request in flight is closed this long after its last
/// response: 30 s. Sidecars renew once per half SVID lifetime, so there is nothing to keep
/// connections open for.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Open connections per process: 512, half the usual default soft file limit (1024), leaving
/// the rest for the CA's own files. Renewals are spread over half the SVID lifetime and last
/// milliseconds each, so even 10 000 workloads need a handful of connections at a time.
pub const DEFAULT_MAX_CONNECTIONS: usize = 512;
/// Connections of the cap that only peers presenting a valid client certificate can use: 128
/// (a quarter). Unauthenticated connections (bootstraps with a join token, and anyone else) can
/// hold at most the other 384.
pub const DEFAULT_RESERVED_FOR_PEERS: usize = 128;
/// Unauthenticated connections per source IP: 32. A node bootstrapping all its workloads at
/// once stays far below; a single attacker cannot take the unauthenticated share alone.
pub const DEFAULT_MAX_CONNECTIONS_PER_IP: usize = 32;

/// At most one refusal/timeout warning per this interval; the rest are counted in the metrics
/// and summarized in the next warning (a flood must not turn into a log flood).
const LOG_INTERVAL: Duration = Duration::from_secs(1);

/// Limits and timeouts of `meshgate ca serve` (see the `DEFAULT_*` constants for the values and
/// why).
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    pub handshake_timeout: Duration,
    pub probation_handshake_timeout: Duration,
    pub header_read_timeout: Duration,
    pub body_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub reserved_for_peers: usize,
    pub max_connections_per_ip: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            probation_handshake_timeout: DEFAULT_PROBATION_HANDSHAKE_TIMEOUT,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            body_timeout: DEFAULT_BODY_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            reserved_for_peers: DEFAULT_RESERVED_FOR_PEERS,
            max_connections_per_ip: DEFAULT_MAX_CONNECTIONS_PER_IP,
        }
    }
}

impl ConnectionLimits {
    /// Connections that need not authenticate.
    fn unauthenticated_share(&self) -> usize {
        self.max_connections.saturating_sub(self.reserved_for_peers)
    }
}

/// Labels of the refusal counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    /// `connection_limit` | `per_ip_limit` | `unauthenticated_over_share`.
    reason: &'static str,
}

/// Labels of the timeout counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    /// `handshake` | `header` | `body` | `idle`.
    phase: &'static str,
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The process holds `max_connections` already.
    ConnectionLimit,
    /// Its source IP holds `max_connections_per_ip` unauthenticated connections already.
    PerIpLimit,
    /// Admitted beyond the unauthenticated share and presented no valid client certificate.
    UnauthenticatedOverShare,
}

impl Refusal {
    fn as_str(self) -> &'static str {
        match self {
            Self::ConnectionLimit => "connection_limit",
            Self::PerIpLimit => "per_ip_limit",
            Self::UnauthenticatedOverShare => "unauthenticated_over_share",
        }
    }

    fn explain(self) -> &'static str {
        match self {
            Self::ConnectionLimit => {
                "the CA holds its maximum of open connections; if this is normal load, raise --max-connections (and `ulimit -n`)"
            }
            Self::PerIpLimit => {
                "this source IP holds its maximum of unauthenticated connections; if it is a legitimate node, raise --max-connections-per-ip"
            }
            Self::UnauthenticatedOverShare => {
                "the unauthenticated share of connections is used up; only peers with a valid SVID are served until it frees up"
            }
        }
    }
}

/// A connection phase that has a deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    Handshake,
    Header,
    Body,
    Idle,
}

impl Phase {
    fn as_str(self) -> &'static str {
        match self {
            Self::Handshake => "handshake",
            Self::Header => "header",
            Self::Body => "body",
            Self::Idle => "idle",
        }
    }
}

/// Connection counters of the CA, served at `GET /metrics`.
pub(crate) struct CaMetrics {
    registry: Registry,
    refused: Family<ReasonLabels, Counter>,
    timeouts: Family<PhaseLabels, Counter>,
    open: Gauge,
    accept_errors: Counter,
    /// Refused API requests by error code (`token_expired`, `token_wrong_audience`, …).
    svid_refusals: Family<CodeLabels, Counter>,
    /// Handles of the ServiceAccount key set (stay zero unless `--k8s-issuer` is set).
    pub(crate) jwks: crate::k8s::JwksMetrics,
}

/// The `code` label of `meshgate_ca_svid_refusals_total`: the `error` of the JSON answer.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabels {
    code: &'static str,
}

impl CaMetrics {
    fn new() -> Self {
        let mut registry = Registry::default();
        let refused = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "meshgate_ca_connections_refused",
            "Connections closed at admission or right after the handshake, by reason",
            refused.clone(),
        );
        let timeouts = Family::<PhaseLabels, Counter>::default();
        registry.register(
            "meshgate_ca_connection_timeouts",
            "Connections closed for missing a deadline, by phase",
            timeouts.clone(),
        );
        let open = Gauge::default();
        registry.register(
            "meshgate_ca_connections_open",
            "Connections open now",
            open.clone(),
        );
        let accept_errors = Counter::default();
        registry.register(
            "meshgate_ca_accept_errors",
            "Failed accept() calls (e.g. EMFILE: out of file descriptors)",
            accept_errors.clone(),
        );
        let svid_refusals = Family::<CodeLabels, Counter>::default();
        registry.register(
            "meshgate_ca_svid_refusals",
            "Refused API requests (bootstrap, renewal, …) by error code",
            svid_refusals.clone(),
        );
        let jwks = crate::k8s::JwksMetrics::default();
        registry.register(
            "meshgate_ca_k8s_jwks_keys",
            "Usable keys in the cluster's ServiceAccount key set (JWKS) the CA holds",
            jwks.keys.clone(),
        );
        registry.register(
            "meshgate_ca_k8s_jwks_fetches",
            "Fetches of the cluster's ServiceAccount key set, by result (ok | error)",
            jwks.fetches.clone(),
        );
        Self {
            registry,
            refused,
            timeouts,
            open,
            accept_errors,
            svid_refusals,
            jwks,
        }
    }

    /// Counts one refused API request.
    pub(crate) fn svid_refused(&self, code: &'static str) {
        self.svid_refusals.get_or_create(&CodeLabels { code }).inc();
    }

    pub(crate) fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("encoding to a String cannot fail");
        out
    }
}

#[derive(Default)]
struct Counts {
    total: usize,
    unauthenticated: usize,
    per_ip: HashMap<IpAddr, usize>,
}

/// Admission control and the counters/logging of refusals and timeouts.
pub(crate) struct Admission {
    pub(crate) limits: ConnectionLimits,
    pub(crate) metrics: CaMetrics,
    counts: Mutex<Counts>,
    last_log: Mutex<Option<Instant>>,
    suppressed: AtomicU64,
}

/// What to do with a new connection.
pub(crate) enum Admit {
    /// Serve it.
    Yes(Slot),
    /// Handshake under the probation deadline; keep it only if it authenticates (or the
    /// unauthenticated share freed up meanwhile).
    Probation(Slot),
    /// Close it now.
    No(Refusal),
}

impl Admission {
    pub(crate) fn new(limits: ConnectionLimits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            metrics: CaMetrics::new(),
            counts: Mutex::new(Counts::default()),
            last_log: Mutex::new(None),
            suppressed: AtomicU64::new(0),
        })
    }

    /// Admits (or refuses) a connection from `ip`; the slot is released when dropped.
    pub(crate) fn admit(self: &Arc<Self>, ip: IpAddr) -> Admit {
        let mut counts = self.counts.lock().expect("admission lock");
        if counts.total >= self.limits.max_connections {
            return Admit::No(Refusal::ConnectionLimit);
        }
        let from_ip = counts.per_ip.entry(ip).or_default();
        if *from_ip >= self.limits.max_connections_per_ip {
            return Admit::No(Refusal::PerIpLimit);
        }
        *from_ip += 1;
        counts.total += 1;
        counts.unauthenticated += 1;
        let probation = counts.unauthenticated > self.limits.unauthenticated_share();
        self.metrics.open.set(counts.total as i64);
        let slot = Slot {
            admission: self.clone(),
            ip,
            authenticated: false,
        };
        if probation {
            Admit::Probation(slot)
        } else {
            Admit::Yes(slot)
        }
    }

    /// Counts and (rate-limited) logs a refused connection.
    pub(crate) fn refused(&self, peer: SocketAddr, why: Refusal) {
        self.metrics
            .refused
            .get_or_create(&ReasonLabels {
                reason: why.as_str(),
            })
            .inc();
        if let Some(suppressed) = self.may_log() {
            tracing::warn!(
                event = "ca.connection_refused",
                peer.addr = %peer,
                reason = why.as_str(),
                suppressed_since_last = suppressed,
                "connection refused: {}",
                why.explain()
            );
        }
    }

    /// Counts and (rate-limited) logs a connection closed for missing a deadline.
    pub(crate) fn timed_out(&self, peer: SocketAddr, phase: Phase, after: Duration) {
        self.metrics
            .timeouts
            .get_or_create(&PhaseLabels {
                phase: phase.as_str(),
            })
            .inc();
        if let Some(suppressed) = self.may_log() {
            tracing::warn!(
                event = "ca.connection_timed_out",
                peer.addr = %peer,
                phase = phase.as_str(),
                after_ms = after.as_millis() as u64,
                suppressed_since_last = suppressed,
                "connection closed: the client sent nothing usable in time"
            );
        }
    }

    pub(crate) fn accept_failed(&self) {
        self.metrics.accept_errors.inc();
    }

    /// `Some(number of messages suppressed since the last one)` when a warning may be logged.
    fn may_log(&self) -> Option<u64> {
        let mut last = self.last_log.lock().expect("log lock");
        if last.is_some_and(|t| t.elapsed() < LOG_INTERVAL) {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *last = Some(Instant::now());
        Some(self.suppressed.swap(0, Ordering::Relaxed))
    }
}

/// One admitted connection; releases its place when dropped.
pub(crate) struct Slot {
    admission: Arc<Admission>,
    ip: IpAddr,
    authenticated: bool,
}

impl Slot {
    /// The peer presented a valid client certificate: it no longer counts against the
    /// unauthenticated share or its IP's cap.
    pub(crate) fn authenticate(&mut self) {
        if self.authenticated {
            return;
        }
        self.authenticated = true;
        let mut counts = self.admission.counts.lock().expect("admission lock");
        counts.unauthenticated -= 1;
        release_ip(&mut counts, self.ip);
    }

    /// Whether this unauthenticated connection is still beyond the unauthenticated share.
    pub(crate) fn over_share(&self) -> bool {
        let counts = self.admission.counts.lock().expect("admission lock");
        !self.authenticated
            && counts.unauthenticated > self.admission.limits.unauthenticated_share()
    }
}

fn release_ip(counts: &mut Counts, ip: IpAddr) {
    if let Some(n) = counts.per_ip.get_mut(&ip) {
        *n -= 1;
        if *n == 0 {
            counts.per_ip.remove(&ip);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self.admission.counts.lock().expect("admission lock");
        counts.total -= 1;
        if !self.authenticated {
            counts.unauthenticated -= 1;
            release_ip(&mut counts, self.ip);
        }
        self.admission.metrics.open.set(counts.total as i64);
    }
}

/// A listener's cap on open connections, in total and per source address: the accept loops of
/// the sidecar and of the control plane admit through it (the CA's own [`Admission`] adds a
/// share reserved for authenticated peers on top of the same idea).
#[derive(Debug, Clone)]
pub struct ConnectionCap {
    total: usize,
    per_source: usize,
    open: Arc<Mutex<OpenConnections>>,
}

/// Open connections of one listener, in total and per source address.
#[derive(Debug, Default)]
struct OpenConnections {
    total: usize,
    by_source: HashMap<IpAddr, usize>,
}

/// Why [`ConnectionCap::admit`] refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CapRefusal {
    /// The listener holds its total cap.
    Total,
    /// The source address holds its per-source cap.
    PerSource,
}

impl CapRefusal {
    /// The metric label: `connection_limit` | `source_connection_limit`.
    pub fn label(self) -> &'static str {
        match self {
            CapRefusal::Total => "connection_limit",
            CapRefusal::PerSource => "source_connection_limit",
        }
    }
}

/// A connection's place under its listener's cap; released on drop.
#[derive(Debug)]
pub struct CapSlot {
    open: Arc<Mutex<OpenConnections>>,
    source: IpAddr,
}

impl Drop for CapSlot {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.total -= 1;
        if let std::collections::hash_map::Entry::Occupied(mut e) =
            open.by_source.entry(self.source)
        {
            *e.get_mut() -= 1;
            if *e.get() == 0 {
                e.remove();
            }
        }
    }
}

impl ConnectionCap {
    pub fn new(total: usize, per_source: usize) -> Self {
        Self {
            total,
            per_source,
            open: Arc::default(),
        }
    }

    /// A slot for a connection from `source`, or which cap refused it.
    pub fn admit(&self, source: IpAddr) -> Result<CapSlot, CapRefusal> {
        let mut o = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if o.total >= self.total {
            return Err(CapRefusal::Total);
        }
        let from_source = o.by_source.entry(source).or_default();
        if *from_source >= self.per_source {
            return Err(CapRefusal::PerSource);
        }
        *from_source += 1;
        o.total += 1;
        Ok(CapSlot {
            open: self.open.clone(),
            source,
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.lock().unwrap_or_else(|e| e.into_inner()).total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max: usize, reserved: usize, per_ip: usize) -> ConnectionLimits {
        ConnectionLimits {
            max_connections: max,
            reserved_for_peers: reserved,
            max_connections_per_ip: per_ip,
            ..ConnectionLimits::default()
        }
    }

    #[test]
    fn admission_caps_per_ip_and_reserves_a_share_for_peers() {
        let a = Admission::new(limits(4, 2, 2));
        let ip1: IpAddr = "10.0.0.1".parse().unwrap();
        let ip2: IpAddr = "10.0.0.2".parse().unwrap();
        let ip3: IpAddr = "10.0.0.3".parse().unwrap();
        let s1 = a.admit(ip1);
        let _s2 = a.admit(ip1);
        assert!(matches!(s1, Admit::Yes(_)));
        assert!(matches!(a.admit(ip1), Admit::No(Refusal::PerIpLimit)));
        // The unauthenticated share (2) is used up: the next one is on probation.
        let Admit::Probation(mut p) = a.admit(ip2) else {
            panic!("expected probation")
        };
        assert!(p.over_share());
        // It authenticates: kept, and it no longer counts as unauthenticated.
        p.authenticate();
        assert!(!p.over_share());
        let Admit::Probation(q) = a.admit(ip3) else {
            panic!("expected probation")
        };
        assert!(q.over_share());
        // The process cap (4) is reached: refused outright.
        assert!(matches!(a.admit(ip3), Admit::No(Refusal::ConnectionLimit)));
        drop(q);
        drop(s1);
        assert!(matches!(a.admit(ip1), Admit::Yes(_)));
    }

    #[test]
    fn connection_cap_counts_total_and_per_source_and_releases_on_drop() {
        let cap = ConnectionCap::new(3, 2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let a1 = cap.admit(a).unwrap();
        let _a2 = cap.admit(a).unwrap();
        assert_eq!(cap.admit(a).unwrap_err(), CapRefusal::PerSource);
        let _b1 = cap.admit(b).unwrap();
        assert_eq!(cap.admit(b).unwrap_err(), CapRefusal::Total);
        assert_eq!(cap.open(), 3);
        drop(a1);
        assert_eq!(cap.open(), 2);
        assert!(cap.admit(a).is_ok(), "a released slot is reusable");
    }
}
