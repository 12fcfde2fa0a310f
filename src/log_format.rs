//! The decision log line, written cheaply.
//!
//! Every request a sidecar judges writes one decision line (`event = "authz.decision"`, up to
//! 17 fields). Through tracing-subscriber's stock formatters that line cost more than the rest
//! of the sidecar's own work on the request: callgrind counted 18k instructions per request for
//! the text line (the field visitor paints every name through `nu_ansi_term` even with colours
//! off, and quotes strings through `Debug`) and 27k for JSON (a serde map per line, every
//! string escaped byte by byte), against ~80k for the whole inbound request. A formatter of
//! our own in front of the stock one still paid ≈ 9k for the JSON line: `tracing` hands an
//! event's fields one at a time through `dyn Value` to a visitor, and the `%` fields through
//! `fmt::write` (BENCHMARKS.md, "The decision line without tracing's field dispatch").
//!
//! [`DecisionWriter`] is the sidecar's [`LineWriter`]: it writes the line straight from the
//! [`DecisionRecord`] — the same bytes the stock formatter writes for
//! [`log_decision_event`], checked by the tests below on hostile values too — with the field
//! names as literals. Strings that need no escaping (nearly all: IDs, paths, policy names)
//! are copied as they are. It is installed only when the log has no colours; it hands the
//! line back to the `tracing` event inside a span (the stock line names the span).
//!
//! [`log_decision_event`]: meshgate_proxy::decision::log_decision_event

use std::fmt::{self, Write as _};
use std::io::Write as _;

use meshgate_policy::DecisionRecord;
use meshgate_policy::record::{DECISION_EVENT, Layer};
use meshgate_proxy::decision::{LOG_TARGET, LineWriter};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};

/// Which stock format [`DecisionWriter`] reproduces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// tracing-subscriber's default (`Full`) text line, colours off.
    Text,
    /// Its JSON line with `flatten_event(true)` and `JsonFields`.
    Json,
}

/// See the module docs. `W` is where the stock formatter writes too (the log writer).
pub struct DecisionWriter<W> {
    shape: Shape,
    out: W,
}

impl<W> DecisionWriter<W> {
    pub fn new(shape: Shape, out: W) -> Self {
        Self { shape, out }
    }
}

thread_local! {
    /// The line being written, kept between lines so that writing one allocates nothing.
    static LINE: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

impl<W> LineWriter for DecisionWriter<W>
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    fn write(&self, record: &DecisionRecord) -> bool {
        if tracing::dispatcher::get_default(|d| d.current_span().id().is_some()) {
            return false;
        }
        LINE.with(|line| {
            let Ok(mut line) = line.try_borrow_mut() else {
                return false;
            };
            line.clear();
            if self.line(&mut line, record).is_err() {
                return false;
            }
            // As the stock formatter does: a failed write is not the request's concern.
            let _ = self.out.make_writer().write_all(line.as_bytes());
            true
        })
    }
}

/// A field's value, by how the stock formatters write it.
#[derive(Clone, Copy)]
enum Value<'a> {
    /// A string field: quoted (`Debug`) in text, a JSON string.
    Str(&'a str),
    /// A `%` (`Display`) field: as it is in text, a JSON string.
    Shown(&'a str),
    /// A `%` field whose value never needs escaping in either format: a SPIFFE ID, whose
    /// parser admits only ASCII letters, digits and `.-_/:` ([`meshgate_ca::SpiffeId::parse`]).
    Id(&'a str),
    /// An integer: bare in both.
    Int(u64),
}

/// A field's name as the text line and the JSON line lead its value in, quotes included, so
/// that a field costs one copy before its value: ` name=` and ` name="` in text, `,"name":`
/// and `,"name":"` in JSON. The names are identifiers with dots: nothing to escape.
struct Name {
    text: &'static str,
    text_quoted: &'static str,
    json: &'static str,
    json_quoted: &'static str,
}

macro_rules! name {
    ($name:literal) => {
        &Name {
            text: concat!(" ", $name, "="),
            text_quoted: concat!(" ", $name, "=\""),
            json: concat!(",\"", $name, "\":"),
            json_quoted: concat!(",\"", $name, "\":\""),
        }
    };
}

impl<W> DecisionWriter<W> {
    /// The whole line, newline included, into `out`.
    fn line(&self, out: &mut String, r: &DecisionRecord) -> fmt::Result {
        use Value::{Id, Int, Shown, Str};
        // What comes before the third field is the same on every line of a layer: one copy
        // after the time.
        let json = self.shape == Shape::Json;
        let prefixes = &*PREFIXES;
        let l4 = r.layer == Layer::L4;
        if json {
            out.push_str("{\"timestamp\":\"");
            write_time(out)?;
            out.push_str(if l4 {
                &prefixes.json_l4
            } else {
                &prefixes.json_l7
            });
        } else {
            write_time(out)?;
            out.push_str(if l4 {
                &prefixes.text_l4
            } else {
                &prefixes.text_l7
            });
        }
        // `log_decision_event`'s fields in its order; a field it leaves out is not written.
        let field = |out: &mut String, name: &Name, value: Value<'_>| {
            if json {
                json_field(out, name, value)
            } else {
                text_field(out, name, value)
            }
        };
        let some = |out: &mut String, name: &Name, value: Option<Value<'_>>| match value {
            Some(value) => field(out, name, value),
            None => Ok(()),
        };
        field(out, name!("meshgate.workload.id"), Id(r.workload.as_str()))?;
        field(out, name!("peer.id"), Id(r.peer.as_str()))?;
        some(out, name!("peer.addr"), r.peer_addr.as_deref().map(Str))?;
        field(out, name!("port"), Int(u64::from(r.port)))?;
        some(
            out,
            name!("http.request.method"),
            r.method.as_deref().map(Str),
        )?;
        some(out, name!("url.path"), r.path.as_deref().map(Str))?;
        some(
            out,
            name!("meshgate.path.original"),
            r.original.as_deref().map(Str),
        )?;
        field(out, name!("decision"), Str(r.decision.as_str()))?;
        some(out, name!("policy"), r.policy.as_deref().map(Str))?;
        some(out, name!("rule"), r.rule.map(|n| Int(n as u64)))?;
        field(out, name!("policy.version"), Shown(&r.version))?;
        field(out, name!("reason"), Shown(&r.reason))?;
        some(
            out,
            name!("audit_policy"),
            r.audit_policy.as_deref().map(Str),
        )?;
        some(
            out,
            name!("dry_run_policy"),
            r.dry_run_policy.as_deref().map(Str),
        )?;
        some(out, name!("trace_id"), r.trace_id.as_deref().map(Str))?;
        if json {
            out.push_str(&prefixes.json_end);
        } else {
            out.push('\n');
        }
        Ok(())
    }
}

/// The constant parts of the line around its fields, made once: the text line's
/// `  INFO <target>: event="authz.decision" layer="l7"` after the time (the level
/// right-aligned in five columns, no space before the first field), the JSON line's
/// `","level":"INFO","event":"authz.decision","layer":"l7"` after the time, and its end.
struct Prefixes {
    text_l7: String,
    text_l4: String,
    json_l7: String,
    json_l4: String,
    json_end: String,
}

static PREFIXES: std::sync::LazyLock<Prefixes> = std::sync::LazyLock::new(|| {
    let text =
        |layer: &str| format!("  INFO {LOG_TARGET}: event=\"{DECISION_EVENT}\" layer=\"{layer}\"");
    let json = |layer: &str| {
        format!("\",\"level\":\"INFO\",\"event\":\"{DECISION_EVENT}\",\"layer\":\"{layer}\"")
    };
    Prefixes {
        text_l7: text("l7"),
        text_l4: text("l4"),
        json_l7: json("l7"),
        json_l4: json("l4"),
        json_end: format!(",\"target\":\"{LOG_TARGET}\"}}\n"),
    }
});

/// One field of the text line: strings quoted as `Debug` quotes them (escaped through `Debug`
/// itself when they hold anything it would escape), `%` fields as they are.
fn text_field(out: &mut String, name: &Name, value: Value<'_>) -> fmt::Result {
    match value {
        Value::Str(s) if !needs_escape(s.as_bytes(), true) => {
            out.push_str(name.text_quoted);
            out.push_str(s);
            out.push('"');
        }
        Value::Str(s) => {
            out.push_str(name.text);
            write!(out, "{s:?}")?;
        }
        Value::Shown(s) | Value::Id(s) => {
            out.push_str(name.text);
            out.push_str(s);
        }
        Value::Int(n) => {
            out.push_str(name.text);
            push_u64(out, n);
        }
    }
    Ok(())
}

/// One field of the JSON line: every string a JSON string, escaped unless it is an [`Value::Id`].
fn json_field(out: &mut String, name: &Name, value: Value<'_>) -> fmt::Result {
    match value {
        Value::Str(s) | Value::Shown(s) => {
            out.push_str(name.json_quoted);
            json_escape(out, s)?;
            out.push('"');
        }
        Value::Id(s) => {
            out.push_str(name.json_quoted);
            out.push_str(s);
            out.push('"');
        }
        Value::Int(n) => {
            out.push_str(name.json);
            push_u64(out, n);
        }
    }
    Ok(())
}

/// `n` in decimal, without a formatter round trip (nor a UTF-8 check of the digits).
fn push_u64(out: &mut String, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for &digit in &digits[at..] {
        out.push(char::from(digit));
    }
}

thread_local! {
    /// The `YYYY-MM-DDTHH:MM:SS` of the second this thread last logged in, and that second.
    static SECOND: std::cell::RefCell<(u64, String)> = const { std::cell::RefCell::new((u64::MAX, String::new())) };
}

/// Now as the stock timer writes it (`2026-12-02T06:21:02.110512Z`: RFC 3339, UTC,
/// microseconds), with the date and time of day formatted once a second per thread rather than
/// for every line. Before 1970 (a broken clock), the stock timer writes it.
fn write_time(out: &mut String) -> fmt::Result {
    let Ok(now) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) else {
        return SystemTime.format_time(&mut Writer::new(out));
    };
    SECOND.with(|second| {
        let mut second = second.borrow_mut();
        if second.0 != now.as_secs() {
            second.1.clear();
            civil_time(&mut second.1, now.as_secs())?;
            second.0 = now.as_secs();
        }
        out.push_str(&second.1);
        let mut micros = [0u8; 6];
        let mut n = now.subsec_micros();
        for digit in micros.iter_mut().rev() {
            *digit = b'0' + (n % 10) as u8;
            n /= 10;
        }
        out.push('.');
        for digit in micros {
            out.push(char::from(digit));
        }
        out.push('Z');
        Ok(())
    })
}

/// `YYYY-MM-DDTHH:MM:SS` (UTC) of `secs` after the Unix epoch (days to a civil date after
/// Howard Hinnant's `civil_from_days`).
fn civil_time(out: &mut String, secs: u64) -> fmt::Result {
    let (days, in_day) = ((secs / 86_400) as i64, secs % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    write!(
        out,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        in_day / 3600,
        in_day / 60 % 60,
        in_day % 60
    )
}

/// `s` escaped as serde_json escapes it inside a string: `"` and `\` backslashed, the control
/// characters as `\b \t \n \f \r` or `\u00XX` (lowercase hex), everything else as it is. Runs
/// without anything to escape are written in one piece.
fn json_escape(w: &mut impl fmt::Write, s: &str) -> fmt::Result {
    if !needs_escape(s.as_bytes(), false) {
        return w.write_str(s);
    }
    let mut start = 0;
    for (i, b) in s.bytes().enumerate() {
        let escaped = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x08 => "\\b",
            0x0c => "\\f",
            0..=0x1f => "",
            _ => continue,
        };
        // Escaped bytes are ASCII: `i` is a character boundary.
        w.write_str(&s[start..i])?;
        if escaped.is_empty() {
            write!(w, "\\u{b:04x}")?;
        } else {
            w.write_str(escaped)?;
        }
        start = i + 1;
    }
    w.write_str(&s[start..])
}

/// True when `s` holds a byte below 0x20, `"` or `\\`, or, with `non_ascii`, one of 0x7f and
/// above: what JSON (and, with `non_ascii`, `Debug`) would escape. Eight bytes at a time (the
/// "has a zero / a smaller byte" word tricks, exact for whether any byte matches), since
/// every string of every decision line goes through here.
fn needs_escape(s: &[u8], non_ascii: bool) -> bool {
    const ONES: u64 = u64::from_le_bytes([0x01; 8]);
    const HIGH: u64 = u64::from_le_bytes([0x80; 8]);
    let has_zero = |v: u64| v.wrapping_sub(ONES) & !v & HIGH;
    let mut words = s.chunks_exact(8);
    for word in &mut words {
        let x = u64::from_le_bytes(word.try_into().expect("chunks of eight"));
        let mut hit = x.wrapping_sub(ONES * 0x20) & !x & HIGH
            | has_zero(x ^ (ONES * u64::from(b'"')))
            | has_zero(x ^ (ONES * u64::from(b'\\')));
        if non_ascii {
            hit |= x & HIGH | has_zero(x ^ (ONES * 0x7f));
        }
        if hit != 0 {
            return true;
        }
    }
    words
        .remainder()
        .iter()
        .any(|&b| b < 0x20 || b == b'"' || b == b'\\' || (non_ascii && b >= 0x7f))
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshgate_policy::record::Layer;
    use meshgate_policy::{Decision, DecisionKind, DecisionRecord};
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        fn take(&self) -> String {
            String::from_utf8(std::mem::take(&mut *self.0.lock().unwrap())).unwrap()
        }
    }

    /// Records with every field set, with none of the optional ones, and with what an attacker
    /// controls (the path as sent, the method: string fields, quoted and escaped by both
    /// formats) full of quotes, backslashes, control characters, ANSI escapes and non-ASCII.
    fn records() -> Vec<DecisionRecord> {
        let workload =
            meshgate_ca::SpiffeId::parse("spiffe://mesh.local/ns/shop/sa/orders").unwrap();
        let peer = meshgate_ca::SpiffeId::parse("spiffe://mesh.local/ns/shop/sa/web").unwrap();
        let allow = Decision {
            kind: DecisionKind::Allow,
            allowed: true,
            policy: Some("shop/orders-readers".into()),
            rule: Some(2),
            version: "7f056a22adf40ce7".into(),
            reason: "allowed by ALLOW policy shop/orders-readers rule 2".into(),
            audit_policy: None,
            dry_run_policy: None,
        };
        let mut full = DecisionRecord::new(Layer::L7, &workload, &peer, 8080, &allow);
        full.peer_addr = Some("127.0.0.1:40180".into());
        full.method = Some("GET".into());
        full.path = Some("/orders/1".into());
        full.trace_id = Some("4bf92f3577b34da6a3ce929d0e0e4736".into());
        let bare = DecisionRecord::new(Layer::L4, &workload, &peer, 5432, &allow);
        let hostile_decision = Decision {
            kind: DecisionKind::BadRequest,
            allowed: false,
            policy: None,
            rule: None,
            version: "v\"1\\".into(),
            // Display fields (`%`) are written as they are by the stock text format, so the
            // sidecar never puts raw request bytes in them (methods are `{:?}`-quoted, path
            // errors name bytes by value); quotes and non-ASCII still occur.
            reason: "bad path \"/a\\b\" \tnext é ☃".into(),
            audit_policy: Some("shop/au\"dit".into()),
            dry_run_policy: Some("shop/dry\\run".into()),
        };
        let mut hostile = DecisionRecord::new(Layer::L7, &workload, &peer, 0, &hostile_decision);
        hostile.method = Some("G\u{1b}ET\r\n".into());
        hostile.original = Some("/a/../\"quoted\"/\\back/\u{8}\u{c}/ü/%2e%2e".into());
        hostile.path = Some("/naïve path/'single'".into());
        vec![full, bare, hostile]
    }

    /// The timestamp differs between two runs; everything else must not.
    fn without_time(line: &str) -> String {
        if let Some(rest) = line.strip_prefix("{\"timestamp\":\"") {
            rest.split_once('"').map(|(_, r)| r.to_string()).unwrap()
        } else {
            line.split_once(' ').map(|(_, r)| r.to_string()).unwrap()
        }
    }

    /// The line for `record` as the stock formatter writes `log_decision_event` (`fast`:
    /// false) or as [`DecisionWriter`] writes it.
    fn lines(json: bool, fast: bool, record: &DecisionRecord) -> String {
        let out = Captured::default();
        let writer = out.clone();
        if fast {
            let shape = if json { Shape::Json } else { Shape::Text };
            assert!(DecisionWriter::new(shape, move || writer.clone()).write(record));
            return out.take();
        }
        let builder = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false);
        let log = || meshgate_proxy::decision::log_decision_event(record);
        if json {
            let subscriber = builder.json().flatten_event(true).finish();
            tracing::subscriber::with_default(subscriber, log);
        } else {
            tracing::subscriber::with_default(builder.finish(), log);
        }
        out.take()
    }

    #[test]
    fn decision_lines_are_byte_for_byte_the_stock_ones() {
        for json in [false, true] {
            for record in records() {
                let stock = lines(json, false, &record);
                let fast = lines(json, true, &record);
                assert!(
                    stock.ends_with('\n') && stock.lines().count() == 1,
                    "{stock}"
                );
                assert_eq!(
                    without_time(&fast),
                    without_time(&stock),
                    "json={json}\nfast:  {fast}\nstock: {stock}"
                );
                // The timestamp has the stock shape too (RFC 3339, microseconds, UTC).
                let time = |l: &str| {
                    l.trim_start_matches("{\"timestamp\":\"")
                        .chars()
                        .take_while(|c| *c != '"' && *c != ' ')
                        .count()
                };
                assert_eq!(time(&fast), time(&stock), "{fast}\n{stock}");
            }
        }
    }

    /// The JSON line is what the policy tools read back: the same record.
    #[test]
    fn json_lines_read_back_as_the_record() {
        for record in records() {
            let line = lines(true, true, &record);
            let back: DecisionRecord = serde_json::from_str(line.trim()).unwrap();
            assert_eq!(back, record, "{line}");
        }
    }

    /// Installed, the writer takes the line from `log_decision` when the log filter lets the
    /// decision event through, writes nothing when it does not, and hands the line back to the
    /// `tracing` event inside a span (whose name the stock line carries).
    #[test]
    fn the_installed_writer_follows_the_filter_and_leaves_spans_to_the_stock_line() {
        let fast = Captured::default();
        let writer = fast.clone();
        assert!(
            meshgate_proxy::decision::set_line_writer(Box::new(DecisionWriter::new(
                Shape::Text,
                move || writer.clone()
            )))
            .is_ok()
        );
        let stock = Captured::default();
        let subscriber = |level| {
            let writer = stock.clone();
            tracing_subscriber::fmt()
                .with_writer(move || writer.clone())
                .with_ansi(false)
                .with_max_level(level)
                .finish()
        };
        let record = &records()[0];
        let log = || meshgate_proxy::decision::log_decision(record);

        tracing::subscriber::with_default(subscriber(tracing::Level::INFO), log);
        let line = fast.take();
        assert!(
            line.contains(" INFO meshgate_proxy::decision: event=\"authz.decision\""),
            "{line}"
        );
        assert_eq!(stock.take(), "");

        tracing::subscriber::with_default(subscriber(tracing::Level::WARN), log);
        assert_eq!((fast.take(), stock.take()), (String::new(), String::new()));

        tracing::subscriber::with_default(subscriber(tracing::Level::INFO), || {
            tracing::warn!(event = "x", "a \"message\"");
            let span = tracing::info_span!("conn", peer = 7);
            let _entered = span.enter();
            log();
        });
        assert_eq!(fast.take(), "");
        let text = stock.take();
        assert!(
            text.contains("WARN meshgate::log_format::tests: a \"message\" event=\"x\""),
            "{text}"
        );
        assert!(
            text.contains(" conn{peer=7}: meshgate_proxy::decision: event=\"authz.decision\""),
            "{text}"
        );
    }

    #[test]
    fn integers_are_written_in_decimal() {
        for n in [0, 7, 10, 65_535, 1_000_000_007, u64::MAX] {
            let mut out = String::new();
            push_u64(&mut out, n);
            assert_eq!(out, n.to_string());
        }
    }

    /// The word-at-a-time check agrees with a byte-at-a-time one for every byte at every
    /// position of a word and its tail.
    #[test]
    fn needs_escape_finds_every_escaped_byte_anywhere() {
        let plain = |b: u8, non_ascii: bool| {
            !(b < 0x20 || b == b'"' || b == b'\\' || (non_ascii && b >= 0x7f))
        };
        for len in [1usize, 7, 8, 9, 16, 23] {
            for pos in 0..len {
                for b in 0u8..=255 {
                    let mut s = vec![b'a'; len];
                    s[pos] = b;
                    for non_ascii in [false, true] {
                        assert_eq!(
                            needs_escape(&s, non_ascii),
                            !plain(b, non_ascii),
                            "byte {b:#04x} at {pos} of {len}, non_ascii={non_ascii}"
                        );
                    }
                }
            }
        }
        assert!(!needs_escape(b"spiffe://mesh.local/ns/shop/sa/web", true));
    }

    #[test]
    fn civil_times() {
        for (secs, want) in [
            (0, "1970-01-01T00:00:00"),
            (951_782_400, "2000-02-29T00:00:00"),
            (1_796_184_062, "2026-12-02T04:01:02"),
            (1_798_761_600, "2027-01-01T00:00:00"),
            (4_107_542_399, "2100-02-28T23:59:59"),
        ] {
            let mut out = String::new();
            civil_time(&mut out, secs).unwrap();
            assert_eq!(out, want, "{secs}");
        }
    }

    /// A SPIFFE ID is written without an escaping check ([`Value::Id`]): whatever its parser
    /// accepts needs none, in either format. Every ASCII character and a few others, in the
    /// trust domain and in a path segment.
    #[test]
    fn spiffe_ids_never_need_escaping() {
        let mut accepted = 0;
        let odd = ['é', '☃', '\u{7f}', '\u{85}'];
        for c in (0u8..0x80).map(char::from).chain(odd) {
            for candidate in [
                format!("spiffe://mesh{c}local/ns/shop/sa/web"),
                format!("spiffe://mesh.local/ns/sh{c}op/sa/web"),
            ] {
                if let Ok(id) = meshgate_ca::SpiffeId::parse(&candidate) {
                    accepted += 1;
                    assert!(
                        !needs_escape(id.as_str().as_bytes(), true),
                        "{candidate:?} was accepted and needs escaping"
                    );
                }
            }
        }
        assert!(accepted > 60, "the parser accepted only {accepted} IDs");
    }

    /// The cached clock writes what the stock timer writes (compared within one second).
    #[test]
    fn time_is_written_as_the_stock_timer_writes_it() {
        let write = |stock: bool| {
            let mut out = String::new();
            if stock {
                SystemTime.format_time(&mut Writer::new(&mut out)).unwrap();
            } else {
                write_time(&mut out).unwrap();
            }
            out
        };
        loop {
            let (before, stock, mine) = (write(false), write(true), write(false));
            let second = |t: &str| t.split('.').next().unwrap().to_string();
            if second(&before) != second(&mine) {
                continue; // a second boundary passed in between: again
            }
            assert_eq!(second(&mine), second(&stock), "{mine} vs {stock}");
            assert_eq!(mine.len(), stock.len(), "{mine} vs {stock}");
            assert!(mine.ends_with('Z') && mine.as_bytes()[19] == b'.', "{mine}");
            break;
        }
    }

    #[test]
    fn json_escaping_matches_serde_json() {
        let all: String = (0u8..0x80)
            .map(char::from)
            .chain("é☃\u{85}".chars())
            .collect();
        let mut mine = String::new();
        json_escape(&mut mine, &all).unwrap();
        assert_eq!(format!("\"{mine}\""), serde_json::to_string(&all).unwrap());
    }
}
