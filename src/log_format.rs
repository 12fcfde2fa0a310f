//! The decision log line, written cheaply.
//!
//! Every request a sidecar judges writes one decision line (`event = "authz.decision"`, about
//! 17 fields). Through tracing-subscriber's stock formatters that line cost more than the rest
//! of the sidecar's own work on the request: callgrind counted 18k instructions per request for
//! the text line (the field visitor paints every name through `nu_ansi_term` even with colours
//! off, and quotes strings through `Debug`) and 27k for JSON (a serde map per line, every
//! string escaped byte by byte), against ~80k for the whole inbound request (BENCHMARKS.md,
//! "The decision log's cost").
//!
//! [`DecisionLines`] writes that one event itself — the same bytes the stock formatter writes,
//! checked by the tests below — and hands every other event, and the decision event whenever
//! anything unusual applies (a colour terminal, an enclosing span, a `message`), to the stock
//! formatter. Strings that need no escaping (nearly all: IDs, paths, policy names) are copied
//! as they are.

use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// Which stock format [`DecisionLines`] reproduces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// tracing-subscriber's default (`Full`) text line, colours off.
    Text,
    /// Its JSON line with `flatten_event(true)`.
    Json,
}

/// See the module docs. `F` is the stock formatter that writes every other event.
pub struct DecisionLines<F> {
    stock: F,
    shape: Shape,
}

impl<F> DecisionLines<F> {
    /// In front of the stock text formatter (`tracing_subscriber::fmt::format()`).
    pub fn text(stock: F) -> Self {
        Self {
            stock,
            shape: Shape::Text,
        }
    }

    /// In front of the stock JSON formatter (`format().json().flatten_event(true)`, with
    /// `JsonFields` as the field formatter).
    pub fn json(stock: F) -> Self {
        Self {
            stock,
            shape: Shape::Json,
        }
    }
}

impl<S, N, F> FormatEvent<S, N> for DecisionLines<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let ours = meta.target() == meshgate_proxy::decision::LOG_TARGET
            && !writer.has_ansi_escapes()
            && event.parent().is_none()
            && ctx.lookup_current().is_none()
            && meta.fields().field("message").is_none();
        if !ours {
            return self.stock.format_event(ctx, writer, event);
        }
        match self.shape {
            Shape::Text => {
                // `<time> <LEVEL> <target>: <fields>`: the level right-aligned in five columns.
                write_time(&mut writer)?;
                writer.write_str(padded_level(meta.level()))?;
                writer.write_str(meta.target())?;
                writer.write_str(": ")?;
                let mut fields = TextFields {
                    w: &mut writer,
                    first: true,
                    result: Ok(()),
                };
                event.record(&mut fields);
                fields.result?;
                writer.write_char('\n')
            }
            Shape::Json => {
                writer.write_str("{\"timestamp\":\"")?;
                write_time(&mut writer)?;
                writer.write_str("\",\"level\":\"")?;
                writer.write_str(meta.level().as_str())?;
                writer.write_char('"')?;
                let mut fields = JsonFields {
                    w: &mut writer,
                    result: Ok(()),
                };
                event.record(&mut fields);
                fields.result?;
                writer.write_str(",\"target\":\"")?;
                json_escape(&mut writer, meta.target())?;
                writer.write_str("\"}\n")
            }
        }
    }
}

/// ` LEVEL ` with the level right-aligned in five columns, as the stock text line has it.
fn padded_level(level: &tracing::Level) -> &'static str {
    match *level {
        tracing::Level::TRACE => " TRACE ",
        tracing::Level::DEBUG => " DEBUG ",
        tracing::Level::INFO => "  INFO ",
        tracing::Level::WARN => "  WARN ",
        tracing::Level::ERROR => " ERROR ",
    }
}

thread_local! {
    /// The `YYYY-MM-DDTHH:MM:SS` of the second this thread last logged in, and that second.
    static SECOND: std::cell::RefCell<(u64, String)> = const { std::cell::RefCell::new((u64::MAX, String::new())) };
}

/// Now as the stock timer writes it (`2026-12-02T06:21:02.110512Z`: RFC 3339, UTC,
/// microseconds), with the date and time of day formatted once a second per thread rather than
/// for every line. Before 1970 (a broken clock), the stock timer writes it.
fn write_time(w: &mut Writer<'_>) -> fmt::Result {
    let Ok(now) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) else {
        return SystemTime.format_time(w);
    };
    SECOND.with(|second| {
        let mut second = second.borrow_mut();
        if second.0 != now.as_secs() {
            second.1.clear();
            civil_time(&mut second.1, now.as_secs())?;
            second.0 = now.as_secs();
        }
        w.write_str(&second.1)?;
        let mut micros = *b".000000Z";
        let mut n = now.subsec_micros();
        for digit in micros[1..7].iter_mut().rev() {
            *digit = b'0' + (n % 10) as u8;
            n /= 10;
        }
        w.write_str(std::str::from_utf8(&micros).map_err(|_| fmt::Error)?)
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

/// A field's name as the stock text visitor writes it (raw identifiers without `r#`).
fn field_name(field: &Field) -> &'static str {
    let name = field.name();
    name.strip_prefix("r#").unwrap_or(name)
}

/// `name=value` pairs, space-separated: strings quoted as `Debug` quotes them, everything
/// else in its `Debug` form (which is `Display` for `%` fields).
struct TextFields<'a, 'w> {
    w: &'a mut Writer<'w>,
    first: bool,
    result: fmt::Result,
}

impl TextFields<'_, '_> {
    /// ` name=` (no space before the first field); written piece by piece, as `write!` costs
    /// a formatter round trip per field on every decision line.
    fn name(&mut self, field: &Field) -> fmt::Result {
        if self.first {
            self.first = false;
        } else {
            self.w.write_char(' ')?;
        }
        self.w.write_str(field_name(field))?;
        self.w.write_char('=')
    }
}

impl Visit for TextFields<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if self.result.is_err() || field.name().starts_with("log.") {
            return;
        }
        self.result = self.name(field).and_then(|()| {
            // What `Debug` leaves as it is: printable ASCII other than `"` and `\`.
            if !needs_escape(value.as_bytes(), true) {
                self.w.write_char('"')?;
                self.w.write_str(value)?;
                self.w.write_char('"')
            } else {
                write!(self.w, "{value:?}")
            }
        });
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.result.is_err() || field.name().starts_with("log.") {
            return;
        }
        self.result = self.name(field).and_then(|()| write!(self.w, "{value:?}"));
    }
}

/// `,"name":value` entries as serde_json writes them for tracing-serde: strings and `Debug`
/// forms escaped, integers and booleans bare.
struct JsonFields<'a, 'w> {
    w: &'a mut Writer<'w>,
    result: fmt::Result,
}

impl JsonFields<'_, '_> {
    fn key(&mut self, field: &Field) -> fmt::Result {
        self.w.write_str(",\"")?;
        json_escape(self.w, field.name())?;
        self.w.write_str("\":")
    }

    fn entry(&mut self, field: &Field, value: impl FnOnce(&mut Writer<'_>) -> fmt::Result) {
        if self.result.is_ok() {
            self.result = self.key(field).and_then(|()| value(self.w));
        }
    }
}

impl Visit for JsonFields<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.entry(field, |w| {
            w.write_char('"')?;
            json_escape(w, value)?;
            w.write_char('"')
        });
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.entry(field, |w| {
            w.write_char('"')?;
            write!(JsonEscaper(w), "{value:?}")?;
            w.write_char('"')
        });
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.entry(field, |w| write!(w, "{value}"));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.entry(field, |w| write!(w, "{value}"));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.entry(field, |w| write!(w, "{value}"));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        // serde_json's own float form (and `null` for NaN and infinities).
        self.entry(field, |w| {
            w.write_str(&serde_json::to_string(&value).map_err(|_| fmt::Error)?)
        });
    }
}

/// Escapes what is written through it, for the inside of a JSON string.
struct JsonEscaper<'a, W: fmt::Write>(&'a mut W);

impl<W: fmt::Write> fmt::Write for JsonEscaper<'_, W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        json_escape(self.0, s)
    }
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

    fn lines(json: bool, fast: bool, record: &DecisionRecord) -> String {
        use tracing_subscriber::fmt::format;
        let out = Captured::default();
        let writer = out.clone();
        let builder = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false);
        let log = || meshgate_proxy::decision::log_decision(record);
        match (json, fast) {
            (false, false) => tracing::subscriber::with_default(builder.finish(), log),
            (false, true) => tracing::subscriber::with_default(
                builder.event_format(DecisionLines::text(format())).finish(),
                log,
            ),
            (true, false) => {
                tracing::subscriber::with_default(builder.json().flatten_event(true).finish(), log)
            }
            (true, true) => tracing::subscriber::with_default(
                builder
                    .fmt_fields(format::JsonFields::new())
                    .event_format(DecisionLines::json(format().json().flatten_event(true)))
                    .finish(),
                log,
            ),
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

    /// Other events, and the decision event inside a span, go to the stock formatter.
    #[test]
    fn other_events_are_left_to_the_stock_formatter() {
        use tracing_subscriber::fmt::format;
        let out = Captured::default();
        let writer = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .event_format(DecisionLines::text(format()))
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(event = "x", "a \"message\"");
            let span = tracing::info_span!("conn", peer = 7);
            let _entered = span.enter();
            meshgate_proxy::decision::log_decision(&records()[1]);
        });
        let text = out.take();
        assert!(
            text.contains("WARN meshgate::log_format::tests: a \"message\" event=\"x\""),
            "{text}"
        );
        assert!(
            text.contains(" conn{peer=7}: meshgate_proxy::decision: event=\"authz.decision\""),
            "{text}"
        );
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

    /// The cached clock writes what the stock timer writes (compared within one second).
    #[test]
    fn time_is_written_as_the_stock_timer_writes_it() {
        let write = |stock: bool| {
            let mut out = String::new();
            let mut w = Writer::new(&mut out);
            if stock {
                SystemTime.format_time(&mut w).unwrap();
            } else {
                write_time(&mut w).unwrap();
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
