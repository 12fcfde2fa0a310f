//! OpenTelemetry traces of the sidecar: spans for inbound requests, their authorization decision,
//! and outbound requests, exported over OTLP/HTTP (protobuf).
//!
//! Configured only by the standard variables (`OTEL_EXPORTER_OTLP_ENDPOINT` or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
//! `OTEL_TRACES_SAMPLER` + `_ARG`, `OTEL_BSP_SCHEDULE_DELAY`, `OTEL_BSP_MAX_QUEUE_SIZE`,
//! `OTEL_SDK_DISABLED`, `OTEL_TRACES_EXPORTER=none`) plus `--no-tracing`. Tracing is on when an
//! endpoint is configured.
//!
//! Two choices differ from the SDK defaults, on purpose:
//! - **Export never touches the request path.** Finished spans go into a bounded queue
//!   (`try_send`, never waiting); a Tokio task batches and exports them. A full queue drops spans
//!   and counts them; a dead collector costs a failed export in the background, never latency.
//!   (This also avoids the SDK's thread-based batch processor, whose hyper client panics outside
//!   a Tokio runtime and silently loses spans.)
//! - **Denials are always exported, and unsampled requests build nothing.** The configured
//!   sampler decides when a request arrives ([`Telemetry::start`]); a request it drops gets a
//!   non-recording context that carries the trace ID (for the decision log, the console's trace
//!   links and `traceparent`) and costs no span, no attributes, no export. If its decision turns
//!   out to be `deny`, `dry-run-deny` or `bad-request`, its server span is built then
//!   ([`Telemetry::start_after`]: same trace ID, the request's real start time) and kept because
//!   it carries the decision ([`KeepDenials`]). A ratio sampler can thin out allowed traffic but
//!   can never hide a denial. (Recording every request and sorting at the end cost 27k
//!   instructions per request on the inbound side at a 1 % ratio.)

use std::sync::Arc;
use std::time::Duration;

use opentelemetry::trace::{
    Link, SpanContext, SpanId, SpanKind, TraceContextExt, TraceFlags, TraceId, Tracer as _,
    TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    IdGenerator, RandomIdGenerator, Sampler, SamplingDecision, SamplingResult, ShouldSample,
    SpanData, SpanExporter, SpanProcessor,
};
use tokio::sync::mpsc;

use crate::metrics::Metrics;
use meshgate_policy::DecisionKind;

/// The attribute carrying the authorization decision; spans with a denying value are always kept.
pub const DECISION_ATTRIBUTE: &str = "meshgate.decision";

/// How tracing is set up for one sidecar.
#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    /// False with `--no-tracing`, `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`.
    pub enabled: bool,
    /// Full OTLP/HTTP traces URL; `None` = from the standard environment variables.
    pub endpoint: Option<String>,
    /// `service.name`; `None` = `OTEL_SERVICE_NAME`, else `meshgate-proxy`.
    pub service_name: Option<String>,
    /// Sampler; `None` = from `OTEL_TRACES_SAMPLER`/`_ARG` (default parent-based always-on).
    pub sampler: Option<SamplerChoice>,
    /// Export batch delay; `None` = `OTEL_BSP_SCHEDULE_DELAY` (ms), default 1 s.
    pub batch_delay: Option<Duration>,
    /// Queue capacity; `None` = `OTEL_BSP_MAX_QUEUE_SIZE`, default 2048.
    pub queue_size: Option<usize>,
}

impl TelemetryConfig {
    /// From the environment only (what `meshgate proxy` uses), unless `disabled`.
    pub fn from_env(disabled: bool) -> Self {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let off = disabled
            || env("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"))
            || env("OTEL_TRACES_EXPORTER").is_some_and(|v| v.eq_ignore_ascii_case("none"));
        let configured = env("OTEL_EXPORTER_OTLP_ENDPOINT").is_some()
            || env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some();
        Self {
            enabled: !off && configured,
            endpoint: None,
            service_name: None,
            sampler: None,
            batch_delay: None,
            queue_size: None,
        }
    }

    /// Tracing off.
    pub fn disabled() -> Self {
        Self::from_env(true)
    }
}

/// The standard sampler names of `OTEL_TRACES_SAMPLER`.
#[derive(Debug, Clone, PartialEq)]
pub enum SamplerChoice {
    AlwaysOn,
    AlwaysOff,
    TraceIdRatio(f64),
    ParentBasedAlwaysOn,
    ParentBasedAlwaysOff,
    ParentBasedTraceIdRatio(f64),
}

impl SamplerChoice {
    /// Parses `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG` (unknown names fall back to the
    /// spec's default, parent-based always-on, with a warning).
    pub fn from_env() -> Self {
        let name = std::env::var("OTEL_TRACES_SAMPLER").unwrap_or_default();
        let ratio = std::env::var("OTEL_TRACES_SAMPLER_ARG")
            .ok()
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|r| (0.0..=1.0).contains(r))
            .unwrap_or(1.0);
        match name.as_str() {
            "always_on" => Self::AlwaysOn,
            "always_off" => Self::AlwaysOff,
            "traceidratio" => Self::TraceIdRatio(ratio),
            "parentbased_always_off" => Self::ParentBasedAlwaysOff,
            "parentbased_traceidratio" => Self::ParentBasedTraceIdRatio(ratio),
            "" | "parentbased_always_on" => Self::ParentBasedAlwaysOn,
            other => {
                tracing::warn!(
                    sampler = other,
                    "unknown OTEL_TRACES_SAMPLER; using parentbased_always_on"
                );
                Self::ParentBasedAlwaysOn
            }
        }
    }

    fn sampler(&self) -> Sampler {
        match *self {
            Self::AlwaysOn => Sampler::AlwaysOn,
            Self::AlwaysOff => Sampler::AlwaysOff,
            Self::TraceIdRatio(r) => Sampler::TraceIdRatioBased(r),
            Self::ParentBasedAlwaysOn => Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
            Self::ParentBasedAlwaysOff => Sampler::ParentBased(Box::new(Sampler::AlwaysOff)),
            Self::ParentBasedTraceIdRatio(r) => {
                Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(r)))
            }
        }
    }
}

const TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");
const TRACESTATE: http::HeaderName = http::HeaderName::from_static("tracestate");

/// A W3C `traceparent` value: trace ID, parent span ID and flags (only `sampled` kept), under
/// the SDK propagator's rules (see [`Telemetry::extract`]).
fn parse_traceparent(value: &[u8]) -> Option<(TraceId, SpanId, TraceFlags)> {
    let value = value.trim_ascii();
    // version(2) - trace-id(32) - parent-id(16) - flags(2) [- future fields, version > 00]
    if value.len() < 55 || value[2] != b'-' || value[35] != b'-' || value[52] != b'-' {
        return None;
    }
    let version = hex_u128(&value[0..2])? as u8;
    let rest = &value[55..];
    let four_fields = rest.is_empty();
    if version == 0xff || (version == 0 && !four_fields) || (!four_fields && rest[0] != b'-') {
        return None;
    }
    let trace_id = TraceId::from(hex_u128(&value[3..35])?);
    let span_id = SpanId::from(hex_u128(&value[36..52])? as u64);
    let flags = TraceFlags::new(hex_u128(&value[53..55])? as u8) & TraceFlags::SAMPLED;
    (trace_id != TraceId::INVALID && span_id != SpanId::INVALID)
        .then_some((trace_id, span_id, flags))
}

/// Lowercase hex digits (at most 32) as a number; `None` for anything else. Every traced
/// request reads 52 digits here: eight at a time as one `u64` ([`hex8`]), the rest through a
/// table.
fn hex_u128(digits: &[u8]) -> Option<u128> {
    const INVALID: u8 = 0xff;
    const VALUE: [u8; 256] = {
        let mut table = [INVALID; 256];
        let mut i = 0;
        while i < 10 {
            table[b'0' as usize + i] = i as u8;
            i += 1;
        }
        let mut i = 0;
        while i < 6 {
            table[b'a' as usize + i] = 10 + i as u8;
            i += 1;
        }
        table
    };
    let mut n = 0u128;
    let mut chunks = digits.chunks_exact(8);
    for chunk in &mut chunks {
        let eight = hex8(chunk.try_into().expect("chunks of eight"))?;
        n = n << 32 | u128::from(eight);
    }
    let mut invalid = 0u8;
    for &d in chunks.remainder() {
        let v = VALUE[usize::from(d)];
        invalid |= v & 0xf0;
        n = n << 4 | u128::from(v & 0x0f);
    }
    (invalid == 0).then_some(n)
}

/// Each byte of a `u64` set to `b`.
const fn bytes_of(b: u8) -> u64 {
    u64::from_ne_bytes([b; 8])
}

/// Eight lowercase hex digits as a number, all eight checked and converted at once in one
/// `u64` (each digit a byte lane; no lane can carry into the next, as every byte is below
/// 0x80 before the additions).
fn hex8(digits: [u8; 8]) -> Option<u32> {
    const HIGH: u64 = bytes_of(0x80);
    let x = u64::from_be_bytes(digits);
    if x & HIGH != 0 {
        return None;
    }
    // A lane's high bit after adding 0x80 - c is set when the byte is at least c.
    let at_least = |c: u8| x.wrapping_add(bytes_of(0x80 - c)) & HIGH;
    let digit = at_least(b'0') & !at_least(b'9' + 1);
    let letter = at_least(b'a') & !at_least(b'f' + 1);
    if digit | letter != HIGH {
        return None;
    }
    // '0'..'9' → 0..9 by their low nibble; 'a'..'f' → 1..6 by theirs, plus 9.
    let mut v = (x & bytes_of(0x0f)) + (letter >> 7) * 9;
    // Pack the nibbles: pairs into bytes, bytes into 16-bit lanes, those into 32 bits.
    v = (v >> 4 | v) & 0x00ff_00ff_00ff_00ff;
    v = (v >> 8 | v) & 0x0000_ffff_0000_ffff;
    v = (v >> 16 | v) & 0x0000_0000_ffff_ffff;
    Some(v as u32)
}

/// `00-<trace-id>-<span-id>-<flags>` for `sc`, with only the `sampled` flag.
///
/// Marked sensitive, which h2 sends as a literal that is never indexed. A `traceparent` is
/// new on every request, and RFC 7541 (§7.1.3) advises against indexing such values: stored
/// in the connection's HPACK table they fill it with values never seen again, evict the
/// headers that do repeat, and the encoder compares each new one with every stored one
/// (callgrind: ≈ 4k instructions per request on the outbound sidecar, ≈ 3k to decode on the
/// inbound one). Over HTTP/1.1 the mark changes nothing.
fn format_traceparent(sc: &SpanContext) -> http::HeaderValue {
    let mut out = [b'-'; 55];
    out[0] = b'0';
    out[1] = b'0';
    put_hex(&mut out[3..35], &sc.trace_id().to_bytes());
    put_hex(&mut out[36..52], &sc.span_id().to_bytes());
    put_hex(
        &mut out[53..55],
        &[(sc.trace_flags() & TraceFlags::SAMPLED).to_u8()],
    );
    let mut value = http::HeaderValue::from_bytes(&out).expect("hex digits and dashes");
    value.set_sensitive(true);
    value
}

/// `bytes` as lowercase hex digits into `out`, which is twice as long: four bytes at a time
/// ([`hex_of_4`]), the rest through a table.
fn put_hex(out: &mut [u8], bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut outs = out.chunks_exact_mut(8);
    let mut ins = bytes.chunks_exact(4);
    for (eight, four) in (&mut outs).zip(&mut ins) {
        eight.copy_from_slice(&hex_of_4(four.try_into().expect("chunks of four")));
    }
    for (pair, b) in outs
        .into_remainder()
        .chunks_exact_mut(2)
        .zip(ins.remainder())
    {
        pair[0] = HEX[usize::from(b >> 4)];
        pair[1] = HEX[usize::from(b & 0xf)];
    }
}

/// Four bytes as eight lowercase hex digits, computed in one `u64` (a nibble per byte lane).
fn hex_of_4(bytes: [u8; 4]) -> [u8; 8] {
    let mut x = u64::from(u32::from_be_bytes(bytes));
    // Spread the nibbles one to a byte, the first in the highest byte.
    x = (x | x << 16) & 0x0000_ffff_0000_ffff;
    x = (x | x << 8) & 0x00ff_00ff_00ff_00ff;
    x = (x | x << 4) & bytes_of(0x0f);
    // A lane above 9 gets bit 4 set by adding 6: those get 'a' - '0' - 10 more.
    let letters = (x.wrapping_add(bytes_of(6)) >> 4) & bytes_of(1);
    (x + bytes_of(b'0') + letters * u64::from(b'a' - b'0' - 10)).to_be_bytes()
}

/// The configured sampler, except that a span carrying a refusing decision
/// ([`DECISION_ATTRIBUTE`]) is always sampled: the authorization span, and the server span
/// [`Telemetry::start_after`] builds for a refused request the sampler had dropped.
#[derive(Debug, Clone)]
struct KeepDenials(Sampler);

impl ShouldSample for KeepDenials {
    fn should_sample(
        &self,
        parent: Option<&Context>,
        trace_id: TraceId,
        name: &str,
        kind: &SpanKind,
        attributes: &[KeyValue],
        links: &[Link],
    ) -> SamplingResult {
        if is_denial(attributes) {
            return SamplingResult {
                decision: SamplingDecision::RecordAndSample,
                attributes: Vec::new(),
                trace_state: parent
                    .map(|cx| cx.span().span_context().trace_state().clone())
                    .unwrap_or_default(),
            };
        }
        self.0
            .should_sample(parent, trace_id, name, kind, attributes, links)
    }
}

/// True when `attributes` carry a refusing decision ([`DecisionKind::is_refusal`]).
fn is_denial(attributes: &[KeyValue]) -> bool {
    attributes.iter().any(|kv| {
        kv.key.as_str() == DECISION_ATTRIBUTE && {
            let value = kv.value.as_str();
            DecisionKind::ALL
                .iter()
                .any(|kind| kind.is_refusal() && kind.as_str() == value)
        }
    })
}

thread_local! {
    /// The trace ID [`PresetIds`] hands out next on this thread, if set.
    static PRESET_TRACE_ID: std::cell::Cell<Option<TraceId>> = const { std::cell::Cell::new(None) };
}

/// Random IDs, except a root span's trace ID when [`with_trace_id`] presets it: a span built
/// after the fact must carry the trace ID its request was logged and propagated with, and the
/// SDK's span builder takes no trace ID.
#[derive(Debug, Default)]
struct PresetIds(RandomIdGenerator);

impl IdGenerator for PresetIds {
    fn new_trace_id(&self) -> TraceId {
        PRESET_TRACE_ID
            .take()
            .unwrap_or_else(|| self.0.new_trace_id())
    }

    fn new_span_id(&self) -> SpanId {
        self.0.new_span_id()
    }
}

/// Runs `build` with `trace_id` as the trace ID of a root span it starts on this thread.
fn with_trace_id<T>(trace_id: TraceId, build: impl FnOnce() -> T) -> T {
    PRESET_TRACE_ID.set(Some(trace_id));
    let built = build();
    PRESET_TRACE_ID.set(None);
    built
}

/// The bounded, non-blocking export queue (see the module docs).
#[derive(Debug)]
struct ExportQueue {
    tx: mpsc::Sender<SpanData>,
    exporter: Arc<tokio::sync::Mutex<opentelemetry_otlp::SpanExporter>>,
    metrics: Arc<Metrics>,
}

impl ExportQueue {
    fn start(
        exporter: opentelemetry_otlp::SpanExporter,
        metrics: Arc<Metrics>,
        delay: Duration,
        capacity: usize,
    ) -> Self {
        let (tx, mut rx) = mpsc::channel::<SpanData>(capacity);
        let exporter = Arc::new(tokio::sync::Mutex::new(exporter));
        let task_exporter = exporter.clone();
        let task_metrics = metrics.clone();
        tokio::spawn(async move {
            const MAX_BATCH: usize = 512;
            loop {
                let Some(first) = rx.recv().await else { return };
                let mut batch = vec![first];
                let deadline = tokio::time::Instant::now() + delay;
                while batch.len() < MAX_BATCH {
                    match tokio::time::timeout_at(deadline, rx.recv()).await {
                        Ok(Some(span)) => batch.push(span),
                        Ok(None) | Err(_) => break,
                    }
                }
                let n = batch.len() as u64;
                let result = task_exporter.lock().await.export(batch).await;
                match result {
                    Ok(()) => {
                        task_metrics.spans_exported.inc_by(n);
                    }
                    Err(e) => {
                        task_metrics
                            .spans_dropped
                            .get_or_create(&crate::metrics::DropLabels {
                                reason: "export_failed",
                            })
                            .inc_by(n);
                        tracing::debug!(event = "telemetry.export_failed", spans = n, error = %e);
                    }
                }
            }
        });
        Self {
            tx,
            exporter,
            metrics,
        }
    }
}

impl SpanProcessor for ExportQueue {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        if self.tx.try_send(span).is_err() {
            self.metrics
                .spans_dropped
                .get_or_create(&crate::metrics::DropLabels {
                    reason: "queue_full",
                })
                .inc();
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }

    fn set_resource(&mut self, resource: &Resource) {
        if let Ok(mut exporter) = self.exporter.try_lock() {
            exporter.set_resource(resource);
        }
    }
}

/// Why tracing could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("OpenTelemetry exporter: {0} (check OTEL_EXPORTER_OTLP_ENDPOINT, or pass --no-tracing)")]
pub struct TelemetryError(String);

/// The sidecar's tracer (or nothing, when tracing is off).
pub struct Telemetry {
    tracer: Option<opentelemetry_sdk::trace::Tracer>,
    /// The configured sampler, asked before a request's span is built ([`Self::start`]).
    sampler: Sampler,
    ids: RandomIdGenerator,
    _provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("enabled", &self.tracer.is_some())
            .finish()
    }
}

impl Telemetry {
    /// Tracing off: every span operation is a no-op.
    pub fn off() -> Self {
        Self {
            tracer: None,
            sampler: Sampler::AlwaysOff,
            ids: RandomIdGenerator::default(),
            _provider: None,
        }
    }

    /// Sets up export for the workload `workload` (added as resource attribute
    /// `meshgate.workload.id`). Must run inside a Tokio runtime.
    pub fn new(
        config: &TelemetryConfig,
        workload: &meshgate_ca::SpiffeId,
        metrics: Arc<Metrics>,
    ) -> Result<Self, TelemetryError> {
        if !config.enabled {
            return Ok(Self::off());
        }
        let timeout = Duration::from_secs(10);
        let mut builder = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_timeout(timeout)
            .with_http_client(
                opentelemetry_http::hyper::HyperClient::with_default_connector(timeout, None),
            );
        if let Some(endpoint) = &config.endpoint {
            builder = builder.with_endpoint(endpoint.clone());
        }
        let exporter = builder.build().map_err(|e| TelemetryError(e.to_string()))?;
        let env_ms = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
        let delay = config.batch_delay.unwrap_or_else(|| {
            Duration::from_millis(env_ms("OTEL_BSP_SCHEDULE_DELAY").unwrap_or(1000))
        });
        let capacity = config
            .queue_size
            .unwrap_or_else(|| env_ms("OTEL_BSP_MAX_QUEUE_SIZE").unwrap_or(2048) as usize)
            .max(1);
        let mut resource = Resource::builder()
            .with_attribute(KeyValue::new("meshgate.workload.id", workload.to_string()));
        let service_name = config
            .service_name
            .clone()
            .or_else(|| {
                std::env::var("OTEL_SERVICE_NAME")
                    .ok()
                    .filter(|v| !v.is_empty())
            })
            .unwrap_or_else(|| "meshgate-proxy".to_string());
        resource = resource.with_service_name(service_name);
        let sampler = config
            .sampler
            .clone()
            .unwrap_or_else(SamplerChoice::from_env);
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
            .with_sampler(KeepDenials(sampler.sampler()))
            .with_id_generator(PresetIds::default())
            .with_span_processor(ExportQueue::start(exporter, metrics, delay, capacity))
            .with_resource(resource.build())
            .build();
        let tracer = provider.tracer("meshgate-proxy");
        Ok(Self {
            tracer: Some(tracer),
            sampler: sampler.sampler(),
            ids: RandomIdGenerator::default(),
            _provider: Some(provider),
        })
    }

    /// True when spans are produced.
    pub fn enabled(&self) -> bool {
        self.tracer.is_some()
    }

    /// The trace context the caller sent (`traceparent`/`tracestate`), or an empty context,
    /// with whether those headers could go on to the app as they are
    /// ([`Telemetry::caller_context_goes_on`]); each header is looked up once.
    /// Parsed here rather than by the SDK's propagator, with its rules (lowercase hex, version
    /// `00` with exactly four fields, higher versions with at least four, no `ff`, non-zero IDs,
    /// flags other than `sampled` cleared) plus the W3C field lengths, which it does not check:
    /// the propagator splits into a `Vec` and goes through `from_str_radix` on every request,
    /// 3.8k instructions.
    pub fn extract(&self, headers: &http::HeaderMap) -> CallerContext {
        let none = CallerContext {
            cx: Context::new(),
            plain: false,
        };
        if self.tracer.is_none() {
            return none;
        }
        let mut parents = headers.get_all(TRACEPARENT).iter();
        let Some((trace_id, span_id, flags)) =
            parents.next().and_then(|v| parse_traceparent(v.as_bytes()))
        else {
            return none;
        };
        let state = headers.get(TRACESTATE);
        // A second `traceparent` would reach the app unread; a `tracestate` is written back
        // in its checked form.
        let plain = parents.next().is_none() && state.is_none();
        let trace_state = state
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<opentelemetry::trace::TraceState>().ok())
            .unwrap_or_default();
        CallerContext {
            cx: Context::new().with_remote_span_context(SpanContext::new(
                trace_id,
                span_id,
                flags,
                true,
                trace_state,
            )),
            plain,
        }
    }

    /// Writes `cx` as `traceparent` (and `tracestate` when it has entries) into `headers`,
    /// replacing the caller's.
    pub fn inject(&self, cx: &Context, headers: &mut http::HeaderMap) {
        let span = cx.span();
        let sc = span.span_context();
        if self.tracer.is_none() || !sc.is_valid() {
            return;
        }
        headers.insert(TRACEPARENT, format_traceparent(sc));
        let state = sc.trace_state().header();
        match http::HeaderValue::from_str(&state) {
            Ok(value) if !state.is_empty() => {
                headers.insert(TRACESTATE, value);
            }
            _ => {
                headers.remove(TRACESTATE);
            }
        }
    }

    /// Starts a span as a child of `parent` and returns the context holding it. The tracer's
    /// sampler decides with `attributes`: the authorization span, which carries the decision.
    pub fn span(
        &self,
        name: &'static str,
        kind: SpanKind,
        parent: &Context,
        attributes: Vec<KeyValue>,
    ) -> Context {
        match &self.tracer {
            None => parent.clone(),
            Some(tracer) => {
                let span = tracer
                    .span_builder(name)
                    .with_kind(kind)
                    .with_attributes(attributes)
                    .start_with_context(tracer, parent);
                parent.with_span(span)
            }
        }
    }

    /// A request's span (server or client), child of `parent`, if the sampler samples it;
    /// otherwise a context with a non-recording span (the trace ID kept or made, a span ID of
    /// its own, not sampled), and `attributes` is never called (see the module docs).
    pub fn start(
        &self,
        name: &'static str,
        kind: SpanKind,
        parent: &Context,
        attributes: impl FnOnce() -> Vec<KeyValue>,
    ) -> Context {
        let Some(tracer) = &self.tracer else {
            return parent.clone();
        };
        let parent_span = parent.span();
        let caller = parent_span.span_context();
        let trace_id = if caller.is_valid() {
            caller.trace_id()
        } else {
            self.ids.new_trace_id()
        };
        let sampled = self
            .sampler
            .should_sample(Some(parent), trace_id, name, &kind, &[], &[])
            .decision
            == SamplingDecision::RecordAndSample;
        if !sampled {
            let unsampled = SpanContext::new(
                trace_id,
                self.ids.new_span_id(),
                TraceFlags::default(),
                false,
                caller.trace_state().clone(),
            );
            return parent.with_remote_span_context(unsampled);
        }
        let span = with_trace_id(trace_id, || {
            tracer
                .span_builder(name)
                .with_kind(kind)
                .with_attributes(attributes())
                .start_with_context(tracer, parent)
        });
        parent.with_span(span)
    }

    /// The span [`Self::start`] did not build, built now that it must be exported: `unsampled`
    /// is the context `start` returned, `started` the request's start. `attributes` must carry
    /// the refusing decision ([`DECISION_ATTRIBUTE`]), which makes the sampler keep it.
    pub fn start_after(
        &self,
        name: &'static str,
        kind: SpanKind,
        parent: &Context,
        unsampled: &Context,
        started: std::time::SystemTime,
        attributes: Vec<KeyValue>,
    ) -> Context {
        let Some(tracer) = &self.tracer else {
            return unsampled.clone();
        };
        let trace_id = unsampled.span().span_context().trace_id();
        let span = with_trace_id(trace_id, || {
            tracer
                .span_builder(name)
                .with_kind(kind)
                .with_start_time(started)
                .with_attributes(attributes)
                .start_with_context(tracer, parent)
        });
        parent.with_span(span)
    }

    /// The trace ID of `cx` as lowercase hex, for log lines (none without a trace).
    pub fn trace_id(cx: &Context) -> Option<TraceHex> {
        let span = cx.span();
        let sc = span.span_context();
        sc.is_valid().then(|| TraceHex::new(sc.trace_id()))
    }

    /// Whether the caller's trace headers can go on to the app as they are, instead of being
    /// written again for `server` (saving the work on every unsampled request): `server` is not
    /// sampled, so it is recorded nowhere and naming it as the app's parent adds nothing; its
    /// parent is the caller's context, read from the one valid `traceparent` the caller sent (a
    /// second one would reach the app unread); and there is no `tracestate`, which
    /// [`Telemetry::inject`] would write back in its checked form.
    pub fn caller_context_goes_on(caller: &CallerContext, server: &Context) -> bool {
        caller.plain && !server.span().span_context().is_sampled()
    }
}

/// A request's trace context as its caller sent it ([`Telemetry::extract`]).
pub struct CallerContext {
    /// The caller's span as a remote parent; empty without a valid `traceparent`.
    pub cx: Context,
    /// One valid `traceparent` and no `tracestate`: nothing [`Telemetry::inject`] would
    /// change but the span ID.
    plain: bool,
}

/// A trace ID as 32 lowercase hex digits, for log lines: `Copy`, so handing it from layer to
/// layer and into warnings allocates nothing (a `String` cost four allocations per traced
/// request on the inbound path).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TraceHex([u8; 32]);

impl TraceHex {
    pub fn new(id: TraceId) -> Self {
        let mut hex = [0u8; 32];
        put_hex(&mut hex, &id.to_bytes());
        Self(hex)
    }

    pub fn as_str(&self) -> &str {
        // `put_hex` writes ASCII hex digits only.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl std::fmt::Display for TraceHex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Debug for TraceHex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::propagation::TextMapPropagator;
    use opentelemetry_sdk::propagation::TraceContextPropagator;

    /// What the SDK's propagator extracts from `traceparent` (trace ID, span ID, flags).
    fn sdk(value: &str) -> Option<(TraceId, SpanId, TraceFlags)> {
        let mut headers = http::HeaderMap::new();
        headers.insert(TRACEPARENT, http::HeaderValue::from_str(value).unwrap());
        let cx =
            TraceContextPropagator::new().extract(&opentelemetry_http::HeaderExtractor(&headers));
        let span = cx.span();
        let sc = span.span_context();
        sc.is_valid()
            .then(|| (sc.trace_id(), sc.span_id(), sc.trace_flags()))
    }

    /// Tracing on with `sampler`, exporting to an address nothing listens on: exports fail in
    /// the background, which the tests using it do not look at.
    fn tracing_to_nowhere(sampler: SamplerChoice) -> Telemetry {
        let config = TelemetryConfig {
            enabled: true,
            endpoint: Some("http://127.0.0.1:9/v1/traces".into()),
            service_name: None,
            sampler: Some(sampler),
            batch_delay: None,
            queue_size: None,
        };
        let workload =
            meshgate_ca::SpiffeId::parse("spiffe://mesh.local/ns/shop/sa/orders").unwrap();
        Telemetry::new(&config, &workload, Arc::new(Metrics::default())).unwrap()
    }

    /// The caller's trace headers go on unchanged only for an unsampled request whose one
    /// `traceparent` was read, and that carries no `tracestate`.
    #[tokio::test]
    async fn the_caller_context_goes_on_only_when_nothing_would_change() {
        let t = tracing_to_nowhere(SamplerChoice::ParentBasedTraceIdRatio(0.0));
        let headers = |values: &[(&'static str, &'static str)]| {
            let mut h = http::HeaderMap::new();
            for (name, value) in values {
                h.append(*name, http::HeaderValue::from_static(value));
            }
            h
        };
        const UNSAMPLED: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";
        const SAMPLED: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        for (sent, want) in [
            (headers(&[("traceparent", UNSAMPLED)]), true),
            (headers(&[("traceparent", SAMPLED)]), false),
            (headers(&[("traceparent", "00-garbage")]), false),
            (headers(&[]), false),
            (
                headers(&[("traceparent", UNSAMPLED), ("traceparent", SAMPLED)]),
                false,
            ),
            (
                headers(&[("traceparent", UNSAMPLED), ("tracestate", "k=v")]),
                false,
            ),
        ] {
            let caller = t.extract(&sent);
            let server = t.start("meshgate.inbound", SpanKind::Server, &caller.cx, Vec::new);
            assert_eq!(
                Telemetry::caller_context_goes_on(&caller, &server),
                want,
                "{sent:?}"
            );
        }
    }

    /// The table-driven hex reader takes lowercase hex digits only, wherever they stand.
    #[test]
    fn hex_digits_are_read_through_the_table() {
        for b in 0u8..=255 {
            let want = match b {
                b'0'..=b'9' => Some(u128::from(b - b'0')),
                b'a'..=b'f' => Some(u128::from(b - b'a' + 10)),
                _ => None,
            };
            assert_eq!(hex_u128(&[b]), want, "{b:#04x}");
            assert_eq!(
                hex_u128(&[b'f', b, b'1']),
                want.map(|v| 0xf01 | v << 4),
                "{b:#04x} in the middle"
            );
        }
        assert_eq!(
            hex_u128(b"ffffffffffffffffffffffffffffffff"),
            Some(u128::MAX)
        );
    }

    /// Eight digits at once read what a digit at a time reads: every byte value in every place
    /// of a chunk (a wrong byte anywhere refuses the whole chunk), and in a 32-digit ID.
    #[test]
    fn hex_digits_are_read_eight_at_a_time_as_one_at_a_time() {
        let one_at_a_time = |digits: &[u8]| -> Option<u128> {
            digits.iter().try_fold(0u128, |n, &d| {
                let v = match d {
                    b'0'..=b'9' => d - b'0',
                    b'a'..=b'f' => d - b'a' + 10,
                    _ => return None,
                };
                Some(n << 4 | u128::from(v))
            })
        };
        let base = *b"0123456789abcdeffedcba9876543210";
        for at in 0..base.len() {
            for b in 0u8..=255 {
                let mut digits = base;
                digits[at] = b;
                assert_eq!(
                    hex_u128(&digits),
                    one_at_a_time(&digits),
                    "{b:#04x} at {at}"
                );
                assert_eq!(
                    hex8(digits[at / 8 * 8..at / 8 * 8 + 8].try_into().unwrap()).map(u128::from),
                    one_at_a_time(&digits[at / 8 * 8..at / 8 * 8 + 8]),
                    "{b:#04x} at {at} in its chunk"
                );
            }
        }
        assert_eq!(hex_u128(&base), Some(0x0123456789abcdeffedcba9876543210));
        assert_eq!(hex_u128(&[b'f'; 32]), Some(u128::MAX));
        assert_eq!(hex_u128(&[b'0'; 32]), Some(0));
    }

    /// Hex digits written four bytes at a time are the formatter's, for every byte value in
    /// every place and for every length a trace context writes.
    #[test]
    fn hex_digits_are_written_as_the_formatter_writes_them() {
        for at in 0..16 {
            for b in 0u8..=255 {
                let mut bytes =
                    *b"\x01\x23\x45\x67\x89\xab\xcd\xef\xfe\xdc\xba\x98\x76\x54\x32\x10";
                bytes[at] = b;
                let want: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
                for len in [1, 8, 16] {
                    let mut out = vec![0u8; 2 * len];
                    put_hex(&mut out, &bytes[..len]);
                    assert_eq!(
                        out,
                        want.as_bytes()[..2 * len],
                        "{b:#04x} at {at}, {len} bytes"
                    );
                }
            }
        }
    }

    /// Our `traceparent` parser takes and refuses what the SDK's propagator does, except field
    /// lengths, which W3C fixes and the propagator does not check.
    #[test]
    fn traceparent_is_read_as_the_sdk_reads_it() {
        let cases: &[(&str, bool)] = &[
            (
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                true,
            ),
            (
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00",
                true,
            ),
            // Unknown flags are accepted and cleared.
            (
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-ff",
                true,
            ),
            (
                "  00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01  ",
                true,
            ),
            // A future version may add fields.
            (
                "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
                true,
            ),
            (
                "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                true,
            ),
            // Version 00 has exactly four fields; ff is invalid.
            (
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
                false,
            ),
            (
                "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                false,
            ),
            // Uppercase, zero IDs, non-hex.
            (
                "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
                false,
            ),
            (
                "00-0af7651916cd43dd8448eb211c80319c-B7AD6B7169203331-01",
                false,
            ),
            (
                "00-00000000000000000000000000000000-b7ad6b7169203331-01",
                false,
            ),
            (
                "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
                false,
            ),
            (
                "00-0af7651916cd43dd8448eb211c80319g-b7ad6b7169203331-01",
                false,
            ),
            (
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-0x",
                false,
            ),
            ("", false),
            ("garbage", false),
        ];
        for (value, valid) in cases {
            let ours = parse_traceparent(value.as_bytes());
            assert_eq!(ours.is_some(), *valid, "{value:?}");
            assert_eq!(ours, sdk(value), "{value:?}: ours vs the SDK's");
        }
        // Lengths: the SDK takes short fields, W3C (and we) do not.
        let short = "00-af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        assert!(sdk(short).is_some());
        assert_eq!(parse_traceparent(short.as_bytes()), None);
    }

    /// A request with no caller context that the sampler drops builds nothing; when it turns
    /// out refused, its span is built afterwards with the trace ID it was logged under, and that
    /// preset does not leak into the next root span.
    #[tokio::test]
    async fn an_unsampled_root_request_keeps_its_trace_id_when_built_after_a_refusal() {
        let t = tracing_to_nowhere(SamplerChoice::TraceIdRatio(0.0));
        let root = Context::new();
        let unsampled = t.start("meshgate.inbound", SpanKind::Server, &root, || {
            panic!("attributes built for a span the sampler dropped")
        });
        let logged = unsampled.span().span_context().clone();
        assert!(logged.is_valid() && !logged.is_sampled());
        assert!(!unsampled.span().is_recording());

        let refused = vec![KeyValue::new(DECISION_ATTRIBUTE, "deny")];
        let built = t.start_after(
            "meshgate.inbound",
            SpanKind::Server,
            &root,
            &unsampled,
            std::time::SystemTime::now(),
            refused.clone(),
        );
        let built_span = built.span();
        assert!(built_span.is_recording() && built_span.span_context().is_sampled());
        assert_eq!(built_span.span_context().trace_id(), logged.trace_id());

        let next = t.span("meshgate.authz", SpanKind::Internal, &root, refused);
        assert_ne!(
            next.span().span_context().trace_id(),
            logged.trace_id(),
            "the preset trace ID leaked into the next root span"
        );
    }

    /// The written `traceparent` is the SDK propagator's, byte for byte, sampled or not.
    #[test]
    fn traceparent_is_written_as_the_sdk_writes_it() {
        for flags in [TraceFlags::SAMPLED, TraceFlags::default()] {
            let sc = SpanContext::new(
                TraceId::from(0x0af7651916cd43dd8448eb211c80319c),
                SpanId::from(0x00ad6b7169203331),
                flags,
                false,
                Default::default(),
            );
            let cx = Context::new().with_remote_span_context(sc.clone());
            let mut headers = http::HeaderMap::new();
            TraceContextPropagator::new()
                .inject_context(&cx, &mut opentelemetry_http::HeaderInjector(&mut headers));
            assert_eq!(format_traceparent(&sc), headers[TRACEPARENT]);
            // Sent as an HPACK literal never indexed: new on every request.
            assert!(format_traceparent(&sc).is_sensitive());
            // The trace ID for log lines, as the SDK formats it.
            assert_eq!(
                Telemetry::trace_id(&cx).map(|t| t.to_string()),
                Some(sc.trace_id().to_string())
            );
            assert_eq!(
                parse_traceparent(format_traceparent(&sc).as_bytes()),
                Some((sc.trace_id(), sc.span_id(), flags))
            );
        }
    }

    /// Over HTTP/2 (between sidecars), a `traceparent` leaves as an HPACK literal that is never
    /// indexed and not Huffman-coded: the bytes written are the value itself, after its length
    /// (h2 as patched in third_party/h2). Sent twice on one connection, it goes out in full
    /// both times: nothing of it entered the connection's table.
    #[tokio::test]
    async fn a_traceparent_leaves_an_http2_connection_as_a_raw_literal_never_indexed() {
        use tokio::io::AsyncReadExt;
        let sc = SpanContext::new(
            TraceId::from(0x0af7651916cd43dd8448eb211c80319c),
            SpanId::from(0x00ad6b7169203331),
            TraceFlags::SAMPLED,
            false,
            Default::default(),
        );
        let value = format_traceparent(&sc);
        // Literal never indexed, new name (0x10); name and value each a length with the
        // Huffman bit clear, then the bytes (RFC 7541 §6.2.3, §5.2).
        let mut expected = vec![0x10, 11];
        expected.extend_from_slice(b"traceparent");
        expected.push(55);
        expected.extend_from_slice(value.as_bytes());

        let (client_io, mut server_io) = tokio::io::duplex(64 * 1024);
        let (mut sender, conn) =
            hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .handshake::<_, http_body_util::Empty<bytes::Bytes>>(hyper_util::rt::TokioIo::new(
                    client_io,
                ))
                .await
                .unwrap();
        tokio::spawn(conn);
        for _ in 0..2 {
            let req = http::Request::get("http://app/api/x")
                .header(TRACEPARENT, value.clone())
                .body(http_body_util::Empty::new())
                .unwrap();
            // No server answers; the request only has to be written.
            drop(tokio::spawn(sender.send_request(req)));
        }
        let mut written = Vec::new();
        let found = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            let mut buf = [0u8; 4096];
            loop {
                let n = server_io.read(&mut buf).await.unwrap();
                assert!(n > 0, "the client closed before sending both requests");
                written.extend_from_slice(&buf[..n]);
                let seen = written
                    .windows(expected.len())
                    .filter(|w| *w == expected.as_slice())
                    .count();
                if seen == 2 {
                    return;
                }
            }
        })
        .await;
        assert!(
            found.is_ok(),
            "the traceparent was not written twice as a raw literal: {:02x?}",
            written
        );
    }
}
