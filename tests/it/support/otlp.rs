//! A real OTLP/HTTP receiver for tests: decodes `ExportTraceServiceRequest` protobuf bodies (the
//! wire format every OpenTelemetry SDK sends) and keeps the spans for assertions.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use prost::Message;

/// One received span, flattened for assertions.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    pub service: String,
    pub name: String,
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    /// OTLP `SpanKind` number (1 internal, 2 server, 3 client).
    pub kind: i32,
    pub attributes: BTreeMap<String, String>,
    /// OTLP status code (0 unset, 1 ok, 2 error) and message.
    pub status_code: i32,
    pub status_message: String,
}

impl ReceivedSpan {
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn value_text(v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

/// The receiver; spans accumulate in `spans`.
#[derive(Clone)]
pub struct OtlpReceiver {
    pub addr: SocketAddr,
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
}

impl OtlpReceiver {
    pub async fn start() -> Self {
        Self::start_on("127.0.0.1:0").await
    }

    /// Listens on `bind` (e.g. `0.0.0.0:0`, so containers can reach it).
    pub async fn start_on(bind: &str) -> Self {
        let listener = tokio::net::TcpListener::bind(bind).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let spans = Arc::new(Mutex::new(Vec::new()));
        let store = spans.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let store = store.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let store = store.clone();
                            async move {
                                assert_eq!(req.uri().path(), "/v1/traces");
                                let body = req.into_body().collect().await.unwrap().to_bytes();
                                let export = ExportTraceServiceRequest::decode(body)
                                    .expect("valid OTLP protobuf");
                                let mut out = store.lock().unwrap();
                                for rs in export.resource_spans {
                                    let service = rs
                                        .resource
                                        .as_ref()
                                        .and_then(|r| {
                                            r.attributes.iter().find(|kv| kv.key == "service.name")
                                        })
                                        .map(|kv| value_text(&kv.value))
                                        .unwrap_or_default();
                                    for ss in rs.scope_spans {
                                        for span in ss.spans {
                                            out.push(ReceivedSpan {
                                                service: service.clone(),
                                                name: span.name.clone(),
                                                trace_id: hex(&span.trace_id),
                                                span_id: hex(&span.span_id),
                                                parent_span_id: hex(&span.parent_span_id),
                                                kind: span.kind,
                                                attributes: span
                                                    .attributes
                                                    .iter()
                                                    .map(|kv| {
                                                        (kv.key.clone(), value_text(&kv.value))
                                                    })
                                                    .collect(),
                                                status_code: span
                                                    .status
                                                    .as_ref()
                                                    .map_or(0, |s| s.code),
                                                status_message: span
                                                    .status
                                                    .as_ref()
                                                    .map(|s| s.message.clone())
                                                    .unwrap_or_default(),
                                            });
                                        }
                                    }
                                }
                                let reply = ExportTraceServiceResponse::default().encode_to_vec();
                                Ok::<_, std::convert::Infallible>(
                                    http::Response::builder()
                                        .header("content-type", "application/x-protobuf")
                                        .body(Full::new(Bytes::from(reply)))
                                        .unwrap(),
                                )
                            }
                        },
                    );
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        Self { addr, spans }
    }

    /// The traces URL to configure exporters with.
    pub fn endpoint(&self) -> String {
        format!("http://{}/v1/traces", self.addr)
    }

    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.spans.lock().unwrap().clone()
    }

    /// Waits until `pred` holds for the received spans (or panics after 10 s).
    pub async fn wait_for(
        &self,
        what: &str,
        pred: impl Fn(&[ReceivedSpan]) -> bool,
    ) -> Vec<ReceivedSpan> {
        for _ in 0..200 {
            let spans = self.spans();
            if pred(&spans) {
                return spans;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "timed out waiting for {what}; received: {:#?}",
            self.spans()
        );
    }
}
