//! Observed decisions read back from sidecar access logs (`meshgate proxy --log-format json`), the
//! real traffic that `diff --flows` replays and `suggest` learns from.
//!
//! Each decision line is read as the [`DecisionRecord`] the sidecar wrote (the same serde type),
//! so a field renamed on one side cannot silently empty the other. The file is whatever the
//! sidecar wrote to stderr, so it mixes decision lines with every other log line: parsing is
//! lenient. Lines that are not JSON are skipped and counted as malformed,
//! JSON lines that are not `authz.decision` events are skipped silently, and decision lines that
//! lack what a flow needs (older sidecars did not log `meshgate.workload.id`) are counted as
//! incomplete, so the operator learns how much of the log was actually used.
//!
//! The control plane's `GET /v1/flows` answers with lines of the same shape, one per aggregated
//! flow, each with a `count` of the decisions it stands for (and a path *pattern*, such as
//! `/orders/*`, rather than a raw path): [`parse_flows`] reads both.

use std::fmt;
use std::path::{Path, PathBuf};

use meshgate_policy::DecisionRecord;
use meshgate_policy::authz::DecisionKind;
use meshgate_policy::record::DECISION_EVENT;
use meshgate_spiffe::SpiffeId;

/// One observed L7 request: who called which workload with what, and what was decided.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObservedFlow {
    pub workload: SpiffeId,
    pub peer: SpiffeId,
    pub method: String,
    /// Already normalized by the sidecar.
    pub path: String,
    pub decision: DecisionKind,
    /// Requests this line stands for: 1 for a log line, the `count` of an aggregated flow.
    pub count: usize,
    /// `path` is a path pattern (an aggregated flow's `/orders/*`), not a raw path: a `*` in it
    /// is the pattern language's, not a character of the path.
    pub pattern: bool,
}

/// What happened to the lines of a log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlowStats {
    pub lines: usize,
    /// Decision lines turned into flows.
    pub used: usize,
    /// Non-empty lines that are not JSON objects.
    pub malformed: usize,
    /// Decision lines missing a field (or with an invalid ID or decision).
    pub incomplete: usize,
    /// L4 (TCP tunnel) decision lines: no method or path to learn from.
    pub l4: usize,
    /// Requests refused before they were judged (`bad-request`): no judged path.
    pub bad_requests: usize,
}

impl fmt::Display for FlowStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} decision lines used; skipped {} malformed, {} incomplete, {} L4, {} bad requests",
            self.used, self.malformed, self.incomplete, self.l4, self.bad_requests
        )
    }
}

/// Flows and line statistics.
#[derive(Debug, Clone, Default)]
pub struct FlowLog {
    pub flows: Vec<ObservedFlow>,
    pub stats: FlowStats,
}

/// Why an access log could not be read at all.
#[derive(Debug, thiserror::Error)]
#[error("cannot read access log {}: {source}", path.display())]
pub struct FlowLogError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

/// Reads an access log file.
pub fn read_flows(path: &Path) -> Result<FlowLog, FlowLogError> {
    let text = std::fs::read_to_string(path).map_err(|source| FlowLogError {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(parse_flows(&text))
}

/// Parses access-log text, line by line.
pub fn parse_flows(text: &str) -> FlowLog {
    let mut log = FlowLog::default();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        log.stats.lines += 1;
        let Some(value) = json_of(line) else {
            log.stats.malformed += 1;
            continue;
        };
        let Some(object) = value.as_object() else {
            log.stats.malformed += 1;
            continue;
        };
        // Other events may use the same field names with other shapes: look at `event` first.
        if object.get("event").and_then(|e| e.as_str()) != Some(DECISION_EVENT) {
            continue;
        }
        // L4 lines first, whatever else they lack: they have no method or path to learn from.
        if object.get("layer").and_then(|l| l.as_str()) == Some("l4") {
            log.stats.l4 += 1;
            continue;
        }
        // An aggregated flow (the control plane's `/v1/flows`) stands for `count` requests.
        let object_has_count = object.contains_key("count");
        let count = match object.get("count") {
            None => 1,
            Some(c) => match c.as_u64().and_then(|c| usize::try_from(c).ok()) {
                Some(c) if c > 0 => c,
                _ => {
                    log.stats.incomplete += 1;
                    continue;
                }
            },
        };
        // The very type the sidecar wrote (`meshgate_policy::DecisionRecord`).
        let Ok(entry) = serde_json::from_value::<DecisionRecord>(value) else {
            log.stats.incomplete += 1;
            continue;
        };
        if entry.decision == DecisionKind::BadRequest {
            log.stats.bad_requests += 1;
            continue;
        }
        match flow_of(entry, count, object_has_count) {
            Some(flow) => {
                log.stats.used += 1;
                log.flows.push(flow);
            }
            None => log.stats.incomplete += 1,
        }
    }
    log
}

/// The JSON object of a log line: the whole line, or what follows a log collector's prefix
/// (`docker-compose logs`: `orders-proxy_1  | {…}`; `kubectl logs --prefix`: `[pod/x/c] {…}`).
fn json_of(line: &str) -> Option<serde_json::Value> {
    if let Ok(value) = serde_json::from_str(line) {
        return Some(value);
    }
    let start = line.find('{')?;
    let prefix = line[..start].trim_end();
    let collector = prefix.ends_with('|') || (prefix.starts_with('[') && prefix.ends_with(']'));
    if !collector {
        return None;
    }
    serde_json::from_str(&line[start..]).ok()
}

/// A flow from an L7 decision; `None` for a request refused before it was judged (no path was
/// judged, so there is nothing to learn or replay).
fn flow_of(entry: DecisionRecord, count: usize, aggregated: bool) -> Option<ObservedFlow> {
    Some(ObservedFlow {
        workload: entry.workload,
        peer: entry.peer,
        method: entry.method?,
        path: entry.path?,
        decision: entry.decision,
        count,
        pattern: aggregated,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lenient_parsing_counts_what_it_skips() {
        let text = r#"
{"timestamp":"t","level":"INFO","event":"authz.decision","meshgate.workload.id":"spiffe://mesh.local/ns/shop/sa/orders","peer.id":"spiffe://mesh.local/ns/shop/sa/web","peer.addr":"127.0.0.1:5555","http.request.method":"GET","url.path":"/orders/1","decision":"allow","policy":"shop/orders-readers","rule":0,"policy.version":"ab12","reason":"r","target":"meshgate_proxy::inbound::authz"}
not json at all
{"timestamp":"t","level":"INFO","message":"listening","target":"x"}
{"event":"authz.decision","layer":"l4","peer.id":"spiffe://mesh.local/ns/shop/sa/web","port":5432,"decision":"deny"}
{"event":"authz.decision","peer.id":"spiffe://mesh.local/ns/shop/sa/web","http.request.method":"GET","url.path":"/x","decision":"allow"}
{"event":"authz.decision","meshgate.workload.id":"spiffe://mesh.local/ns/shop/sa/orders","peer.id":"spiffe://mesh.local/ns/shop/sa/web","http.request.method":"GET","url.path":"/x","decision":"maybe"}
{"event":"authz.decision","layer":"l7","meshgate.workload.id":"spiffe://mesh.local/ns/shop/sa/orders","peer.id":"spiffe://mesh.local/ns/shop/sa/web","port":8080,"http.request.method":"GET","meshgate.path.original":"/a%2fb","decision":"bad-request","policy.version":"v","reason":"bad path: x"}
[1,2]
"#;
        let log = parse_flows(text);
        assert_eq!(
            log.stats,
            FlowStats {
                lines: 8,
                used: 1,
                malformed: 2,
                incomplete: 2,
                l4: 1,
                bad_requests: 1,
            }
        );
        assert_eq!(log.flows[0].path, "/orders/1");
        assert_eq!(log.flows[0].decision, DecisionKind::Allow);
    }

    /// Lines of the control plane's `/v1/flows` stand for `count` requests each; a count that
    /// is not a positive integer makes the line incomplete, not a request.
    #[test]
    fn aggregated_flows_carry_their_count() {
        let line = |count: &str| {
            format!(
                r#"{{"event":"authz.decision","layer":"l7","meshgate.workload.id":"spiffe://mesh.local/ns/shop/sa/orders","peer.id":"spiffe://mesh.local/ns/shop/sa/web","port":8080,"http.request.method":"GET","url.path":"/orders/*","decision":"allow","policy":"shop/p","rule":0,"count":{count},"first_seen":1,"last_seen":2,"policy.version":"v","reason":"aggregated flow"}}"#
            )
        };
        for (count, want) in [
            ("7", Some(7)),
            ("1", Some(1)),
            ("0", None),
            ("-2", None),
            ("\"3\"", None),
        ] {
            let log = parse_flows(&line(count));
            match want {
                Some(n) => {
                    assert_eq!(log.stats.used, 1, "{count}");
                    assert_eq!(log.flows[0].count, n);
                    assert_eq!(log.flows[0].path, "/orders/*");
                    assert!(log.flows[0].pattern, "an aggregated path is a pattern");
                }
                None => assert_eq!((log.stats.used, log.stats.incomplete), (0, 1), "{count}"),
            }
        }
    }
}
