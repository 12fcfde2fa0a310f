//! The eBPF redirect's verdicts as L3/L4 flows: what the kernel refused or let go direct for
//! this workload ("world → pod dropped", "pod → world refused"), reported next to the flows
//! the sidecar judged itself, so the control plane shows traffic that never reached a sidecar.
//!
//! The redirect counts per (destination port, verdict) in a pinned LRU map
//! (`meshgate_ebpf::Counters::read_pinned` → `per_port`). Those counters only grow, so each
//! report interval reads them and reports the growth since the previous read:
//! - the first read is the baseline: what was counted before this sidecar started is history
//!   (an earlier sidecar of the workload reported it), nothing is reported for it;
//! - a (port, verdict) not seen at the previous read counts in full (it started at zero since:
//!   a new port, or one the LRU map had evicted);
//! - a counter lower than at the previous read means the map was reset (the redirect was
//!   detached and attached again): its value becomes the new baseline;
//! - a read that fails (nothing attached any more, pins gone) reports nothing and keeps the
//!   previous read, logged at debug level only: `/metrics` says `meshgate_ebpf_attached 0`.
//!
//! Only [`meshgate_xds::wire::L3L4_VERDICTS`] are reported: every denial, and `allowed` (direct
//! egress past the sidecar). Redirected connections are not: the sidecar reports them as
//! flows, with the caller's identity.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;

use meshgate_xds::wire::{L3L4Flow, MAX_L3L4_PER_REPORT, l3l4_verdict};

/// One read of the counters: when, and the reported verdicts' values by (port, verdict).
#[derive(Debug)]
struct Read {
    at: i64,
    counts: HashMap<(u16, &'static str), u64>,
}

/// The per-(port, verdict) growth of the eBPF counters between reads.
#[derive(Debug, Default)]
pub struct VerdictDeltas {
    /// None until the first read (the baseline).
    last: Option<Read>,
}

impl VerdictDeltas {
    /// Takes one read of the counters, `(port, verdict name, value)`, made at `now` (Unix
    /// seconds), and returns the growth since the previous read of the reported verdicts as
    /// flows timed by the two reads: at most `cap` of them, the largest, and the summed counts
    /// of the rest.
    pub fn update<'a>(
        &mut self,
        counts: impl IntoIterator<Item = (u16, &'a str, u64)>,
        now: i64,
        cap: usize,
    ) -> (Vec<L3L4Flow>, u64) {
        let counts: HashMap<(u16, &'static str), u64> = counts
            .into_iter()
            .filter_map(|(port, verdict, n)| Some(((port, l3l4_verdict(verdict)?.0), n)))
            .collect();
        let Some(last) = self.last.replace(Read { at: now, counts }) else {
            return (Vec::new(), 0);
        };
        let current = &self.last.as_ref().expect("just stored").counts;
        let mut out: Vec<L3L4Flow> = current
            .iter()
            .filter_map(|(&(port, verdict), &n)| {
                let before = last.counts.get(&(port, verdict)).copied().unwrap_or(0);
                // Equal: nothing happened. Lower: the map was reset, this is the new baseline.
                let grown = n.checked_sub(before).filter(|d| *d > 0)?;
                Some(L3L4Flow {
                    direction: l3l4_verdict(verdict)?.1,
                    port,
                    verdict: verdict.to_string(),
                    count: grown,
                    first_seen: last.at,
                    last_seen: now,
                })
            })
            .collect();
        // The largest first, so a port scan's thousand single refusals do not push out the
        // port that is refused all the time; ties in a stable order.
        out.sort_by(|a, b| (b.count, a.port, &a.verdict).cmp(&(a.count, b.port, &b.verdict)));
        let overflow = out
            .drain(cap.min(out.len())..)
            .fold(0u64, |sum, f| sum.saturating_add(f.count));
        (out, overflow)
    }
}

/// The verdicts of the redirect attached to this sidecar's workload, read from its pins.
#[derive(Debug)]
pub struct EbpfVerdicts {
    pins: PathBuf,
    deltas: Mutex<VerdictDeltas>,
}

impl EbpfVerdicts {
    /// Reads the counters once, as the baseline (when they can be read now; else the first
    /// read that succeeds is).
    pub fn start(pins: PathBuf) -> Self {
        let verdicts = Self {
            pins,
            deltas: Mutex::new(VerdictDeltas::default()),
        };
        let _ = verdicts.drain();
        verdicts
    }

    /// The verdicts counted since the last call (see the module's rules), at most
    /// [`MAX_L3L4_PER_REPORT`], and the counts left out.
    pub fn drain(&self) -> (Vec<L3L4Flow>, u64) {
        match read_counts(&self.pins) {
            Ok(counts) => {
                let now = time::OffsetDateTime::now_utc().unix_timestamp();
                self.deltas.lock().expect("verdict deltas lock").update(
                    counts
                        .iter()
                        .map(|(port, verdict, n)| (*port, *verdict, *n)),
                    now,
                    MAX_L3L4_PER_REPORT,
                )
            }
            Err(e) => {
                tracing::debug!(event = "ebpf.counters_unreadable", pins = %self.pins.display(), error = %e, "eBPF counters not readable, so no L3/L4 verdicts in this report: is the workload's cgroup still attached (`meshgate redirect status --cgroup …`)?");
                (Vec::new(), 0)
            }
        }
    }
}

/// `(port, verdict, count)` of the attachment pinned at `pins`.
#[cfg(all(feature = "ebpf", target_os = "linux"))]
fn read_counts(pins: &std::path::Path) -> Result<Vec<(u16, &'static str, u64)>, String> {
    let snapshot = meshgate_ebpf::Counters::read_pinned(pins).map_err(|e| e.to_string())?;
    Ok(snapshot
        .per_port
        .iter()
        .map(|p| (p.port, p.verdict.as_str(), p.count))
        .collect())
}

/// Built without eBPF support there are no pins (`--ebpf-cgroup` is refused at start).
#[cfg(not(all(feature = "ebpf", target_os = "linux")))]
fn read_counts(_pins: &std::path::Path) -> Result<Vec<(u16, &'static str, u64)>, String> {
    Err("this sidecar was built without eBPF support".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshgate_xds::wire::Direction;

    type Counts<'a> = &'a [(u16, &'a str, u64)];
    /// Flows as (direction, port, verdict, count).
    type Got<'a> = Vec<(Direction, u16, &'a str, u64)>;

    /// A sequence of reads (time, counter values) and what each must report: the baseline,
    /// growth, new keys, unreported verdicts, a reset, a missing read.
    #[test]
    fn deltas_between_reads() {
        use Direction::*;
        let steps: &[(i64, Counts, Got, &str)] = &[
            (
                100,
                &[(9001, "denied_egress", 3), (8080, "redirected", 50)],
                vec![],
                "the first read is the baseline",
            ),
            (
                105,
                &[
                    (9001, "denied_egress", 5),
                    (8080, "redirected", 70),
                    (8080, "exempt", 2),
                    (443, "allowed", 4),
                    (8080, "denied_ingress", 1),
                ],
                vec![
                    (Egress, 443, "allowed", 4),
                    (Egress, 9001, "denied_egress", 2),
                    (Ingress, 8080, "denied_ingress", 1),
                ],
                "growth, and new keys in full (largest first); redirected and exempt never",
            ),
            (
                110,
                &[
                    (9001, "denied_egress", 5),
                    (443, "allowed", 4),
                    (8080, "denied_ingress", 1),
                ],
                vec![],
                "no growth, nothing",
            ),
            (
                115,
                &[(9001, "denied_egress", 2), (53, "denied_udp_mesh", 1)],
                vec![(Egress, 53, "denied_udp_mesh", 1)],
                "a counter that went down is a new baseline",
            ),
            (
                120,
                &[(9001, "denied_egress", 6), (53, "denied_udp_mesh", 1)],
                vec![(Egress, 9001, "denied_egress", 4)],
                "growth from the new baseline",
            ),
            (
                125,
                &[
                    (9001, "denied_egress", 6),
                    (53, "denied_udp_mesh", 1),
                    (80, "denied_ipv6", 2),
                    (0, "unknown_verdict", 9),
                ],
                vec![(Egress, 80, "denied_ipv6", 2)],
                "verdicts nobody reports are ignored",
            ),
        ];
        let mut deltas = VerdictDeltas::default();
        let mut previous = None;
        for (now, counts, want, why) in steps {
            let (flows, overflow) = deltas.update(counts.iter().copied(), *now, 100);
            assert_eq!(overflow, 0, "{why}");
            let got: Got = flows
                .iter()
                .map(|f| (f.direction, f.port, f.verdict.as_str(), f.count))
                .collect();
            assert_eq!(&got, want, "at {now}: {why}");
            for f in &flows {
                assert_eq!(
                    (Some(f.first_seen), f.last_seen),
                    (previous, *now),
                    "timed by the two reads: {why}"
                );
            }
            previous = Some(*now);
        }
    }

    /// Past the cap the largest growths are kept and the rest counted.
    #[test]
    fn deltas_are_capped_largest_first() {
        let mut deltas = VerdictDeltas::default();
        let _ = deltas.update([], 1, 3);
        let counts: Vec<(u16, &str, u64)> = (1..=6)
            .map(|p| (p, "denied_egress", u64::from(p) * 10))
            .collect();
        let (flows, overflow) = deltas.update(counts.iter().copied(), 2, 3);
        let ports: Vec<u16> = flows.iter().map(|f| f.port).collect();
        assert_eq!(ports, vec![6, 5, 4]);
        assert_eq!(overflow, 10 + 20 + 30);
        let (flows, overflow) = deltas.update(counts.iter().copied(), 3, 3);
        assert!(flows.is_empty() && overflow == 0);
    }

    /// Pins that cannot be read (nothing attached) give nothing, every time, without error.
    #[test]
    fn unreadable_pins_report_nothing() {
        let v = EbpfVerdicts::start(PathBuf::from("/nonexistent/meshgate/pins"));
        assert_eq!(v.drain(), (Vec::new(), 0));
        assert_eq!(v.drain(), (Vec::new(), 0));
    }

    /// The names the loader gives its verdicts are the ones the wire reports, with the
    /// directions the redirect applies them in.
    #[cfg(all(feature = "ebpf", target_os = "linux"))]
    #[test]
    fn loader_verdict_names_match_the_wire() {
        use meshgate_ebpf::Verdict as V;
        for (v, want) in [
            (V::Redirected, None),
            (V::Exempt, None),
            (V::Allowed, Some(Direction::Egress)),
            (V::DeniedEgress, Some(Direction::Egress)),
            (V::DeniedIngress, Some(Direction::Ingress)),
            (V::DeniedIpv6, Some(Direction::Egress)),
            (V::DeniedUdpMesh, Some(Direction::Egress)),
        ] {
            assert_eq!(l3l4_verdict(v.as_str()).map(|(_, d)| d), want, "{v:?}");
        }
    }
}
