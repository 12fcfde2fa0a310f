//! The outermost inbound layer: one server span per request, and the one place a request's
//! decision is written ([`crate::decision::DecisionSink::http`]) and its error turned into a
//! response ([`InboundError::into_response`]).
//!
//! Inner layers decide; this layer records. An allowed request's
//! [`DecisionRecord`](meshgate_policy::DecisionRecord) comes back beside its response
//! ([`Authorized`]), a refused one inside the [`InboundError`], so every request is written
//! exactly once, with its latency, whatever layer decided.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use http::{Request, Response};
use hyper::body::Incoming;
use meshgate_policy::DecisionKind;
use opentelemetry::KeyValue;
use opentelemetry::trace::{SpanKind, Status, TraceContextExt};
use tower::{Layer, Service};

use super::authz::{Authorized, AuthzContext, PeerIdentity};
use super::error::InboundError;
use crate::http_util::{ProxyBody, is_grpc};
use crate::telemetry::{DECISION_ATTRIBUTE, Telemetry, TraceHex};

/// The request's server span, for the inner layers (the app continues the trace from it).
/// Only when tracing is on.
pub struct RequestSpan {
    pub cx: opentelemetry::Context,
    /// Its W3C trace ID, when tracing is on (for log lines).
    pub trace_id: Option<TraceHex>,
    /// The caller's trace headers go on to the app as they are
    /// ([`Telemetry::caller_context_goes_on`]).
    pub caller_context_goes_on: bool,
}

/// A request on its way to the inner layers, with its server span when tracing is on. The span
/// travels beside the request rather than in its extensions, which would allocate a map and a
/// box for it on every traced request and search them twice more.
pub struct Observed {
    pub req: Request<Incoming>,
    pub span: Option<RequestSpan>,
}

/// Adds [`Observe`].
pub struct ObserveLayer {
    ctx: Arc<AuthzContext>,
    peer: Arc<PeerIdentity>,
}

impl ObserveLayer {
    pub fn new(ctx: Arc<AuthzContext>, peer: Arc<PeerIdentity>) -> Self {
        Self { ctx, peer }
    }
}

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Observe {
            inner,
            ctx: self.ctx.clone(),
            peer: self.peer.clone(),
        }
    }
}

/// See the module docs.
#[derive(Clone)]
pub struct Observe<S> {
    inner: S,
    ctx: Arc<AuthzContext>,
    peer: Arc<PeerIdentity>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S> Service<Request<Incoming>> for Observe<S>
where
    S: Service<Observed, Response = Authorized, Error = InboundError> + Send + 'static,
    S::Future: Send,
{
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // The inner layers are ready when the forwarder is, which never fails: their errors
        // are per request, from `call`.
        self.inner.poll_ready(cx).map(|_| Ok(()))
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        let started = Instant::now();
        let sink = self.ctx.sink.clone();
        let grpc = is_grpc(req.headers());
        // The caller's trace context (the server span's parent), and what the server span is
        // made of if it is built after the decision (see `telemetry`'s module docs).
        let (parent, server, caller_context_goes_on) = if sink.telemetry().enabled() {
            let caller = sink.telemetry().extract(req.headers());
            let server = sink
                .telemetry()
                .start(SERVER_SPAN, SpanKind::Server, &caller.cx, || {
                    server_attributes(req.method(), req.version(), &self.peer, &self.ctx)
                });
            let goes_on = Telemetry::caller_context_goes_on(&caller, &server);
            (
                Some((caller.cx, req.method().clone(), req.version())),
                server,
                goes_on,
            )
        } else {
            (None, opentelemetry::Context::new(), false)
        };
        let trace_id = Telemetry::trace_id(&server);
        // With tracing off there is nothing to hand on.
        let span = parent.is_some().then(|| RequestSpan {
            cx: server.clone(),
            trace_id,
            caller_context_goes_on,
        });
        let ctx = self.ctx.clone();
        let peer = self.peer.clone();
        let call = self.inner.call(Observed { req, span });
        Box::pin(async move {
            let (resp, record) = match call.await {
                Ok(Authorized { response, record }) => (response, Some(record)),
                Err(e) => {
                    let record = e.record().cloned();
                    if record.is_none() {
                        tracing::warn!(
                            event = "authz.local_svid_expired",
                            meshgate.workload.id = %ctx.local_id,
                            peer.id = %peer.id,
                            trace_id = trace_id.as_ref().map(TraceHex::as_str),
                            "request refused: this sidecar's SVID has expired"
                        );
                    }
                    (e.into_response(grpc), record)
                }
            };
            // A refusal the sampler dropped is exported all the same: its server span is built
            // now, with the request's start time.
            let server = match (&record, parent) {
                (Some(record), Some((parent, method, version)))
                    if record.decision.is_refusal() && !server.span().is_recording() =>
                {
                    let mut attributes = server_attributes(&method, version, &peer, &ctx);
                    attributes.push(KeyValue::new(DECISION_ATTRIBUTE, record.decision.as_str()));
                    sink.telemetry().start_after(
                        SERVER_SPAN,
                        SpanKind::Server,
                        &parent,
                        &server,
                        std::time::SystemTime::now() - started.elapsed(),
                        attributes,
                    )
                }
                _ => server,
            };
            match &record {
                Some(record) => sink.http(record, &server, started, resp.status().as_u16()),
                None => crate::decision::count_undecided(sink.metrics(), started),
            }
            let span = server.span();
            if span.is_recording() {
                let status = resp.status();
                span.set_attribute(KeyValue::new(
                    "http.response.status_code",
                    i64::from(status.as_u16()),
                ));
                if status.is_server_error() {
                    span.set_status(Status::error(status.to_string()));
                } else if let Some(record) = record
                    .as_ref()
                    .filter(|r| r.decision == DecisionKind::BadRequest)
                {
                    span.set_status(Status::error(record.reason.clone()));
                }
                span.end();
            }
            Ok(resp)
        })
    }
}

/// The name of the inbound server span.
const SERVER_SPAN: &str = "meshgate.inbound";

/// The server span's attributes at its start.
fn server_attributes(
    method: &http::Method,
    version: http::Version,
    peer: &PeerIdentity,
    ctx: &AuthzContext,
) -> Vec<KeyValue> {
    vec![
        KeyValue::new("http.request.method", method.as_str().to_string()),
        KeyValue::new("url.scheme", "https"),
        KeyValue::new("network.protocol.version", protocol_version(version)),
        KeyValue::new("client.address", peer.addr.ip().to_string()),
        KeyValue::new("client.port", i64::from(peer.addr.port())),
        KeyValue::new("meshgate.peer.id", peer.id.to_string()),
        KeyValue::new("meshgate.workload.id", ctx.local_id.to_string()),
    ]
}

/// `1.1` / `2` as OpenTelemetry's `network.protocol.version` wants it.
fn protocol_version(version: http::Version) -> &'static str {
    match version {
        http::Version::HTTP_2 => "2",
        http::Version::HTTP_10 => "1.0",
        _ => "1.1",
    }
}
