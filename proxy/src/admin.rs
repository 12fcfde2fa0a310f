//! The admin listener (loopback only by default): liveness, readiness, config and identity dumps,
//! metrics, and `POST /shutdown` so a batch job's sidecar can exit when the job ends.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::identity::Identity;
use crate::metrics::Metrics;
use crate::outbound::RouteTable;
use crate::policy::PolicyState;

/// What the admin endpoints report on.
#[derive(Clone)]
pub struct Admin {
    pub identity: Arc<Identity>,
    pub policy: Arc<PolicyState>,
    pub routes: Arc<arc_swap::ArcSwap<RouteTable>>,
    pub metrics: Arc<Metrics>,
    pub shutdown: watch::Sender<bool>,
    /// Pin directory of the workload's eBPF redirect, when the sidecar exports its counters.
    pub ebpf_pins: Option<std::path::PathBuf>,
}

fn respond(
    status: StatusCode,
    content_type: &str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .body(Full::new(body.into()))
        .expect("valid response")
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Full<Bytes>> {
    respond(
        status,
        "application/json",
        serde_json::to_vec_pretty(value).expect("JSON serializes"),
    )
}

impl Admin {
    /// Reasons the sidecar is not ready (empty = ready): it needs a valid SVID and a policy.
    pub fn not_ready_reasons(&self) -> Vec<String> {
        let mut reasons = Vec::new();
        match self.identity.status() {
            None => reasons.push("no SVID yet".to_string()),
            Some(s) if !s.is_valid() => reasons.push(format!(
                "SVID expired at {}",
                meshgate_ca::cert::rfc3339(s.not_after)
            )),
            Some(_) => {}
        }
        if !self.policy.is_loaded() {
            reasons.push(match self.policy.last_error() {
                Some(e) => format!("no valid policy loaded: {e}"),
                None => "no policy loaded yet".to_string(),
            });
        }
        reasons
    }

    fn handle(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        // Gauges that are functions of time are computed when read.
        if let Some(status) = self.identity.status() {
            self.metrics
                .cert_not_after
                .set(status.not_after.unix_timestamp());
        }
        self.metrics
            .policy_stale_seconds
            .set(self.policy.stale_seconds());
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/live") => respond(StatusCode::OK, "text/plain", "live\n"),
            (&Method::GET, "/ready") => {
                let reasons = self.not_ready_reasons();
                if reasons.is_empty() {
                    respond(StatusCode::OK, "text/plain", "ready\n")
                } else {
                    json(
                        StatusCode::SERVICE_UNAVAILABLE,
                        &serde_json::json!({ "ready": false, "reasons": reasons }),
                    )
                }
            }
            (&Method::GET, "/identity") => match self.identity.status() {
                Some(status) => json(
                    StatusCode::OK,
                    &serde_json::to_value(&*status).expect("status serializes"),
                ),
                None => json(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &serde_json::json!({ "id": self.identity.id(), "error": "no SVID yet" }),
                ),
            },
            (&Method::GET, "/config") => {
                let snapshot = self.policy.snapshot.load();
                let routes: Vec<_> = self
                    .routes
                    .load()
                    .routes()
                    .into_iter()
                    .map(|r| serde_json::json!({ "service": r.name, "identity": r.identity, "hosts": r.hosts, "endpoints": r.endpoints }))
                    .collect();
                json(
                    StatusCode::OK,
                    &serde_json::json!({
                        "workload": self.identity.id(),
                        "policy_version": snapshot.version(),
                        "policy_loaded": self.policy.is_loaded(),
                        "last_rejected_update": self.policy.last_error(),
                        "control_plane": self.policy.stream_status(),
                        "policy": snapshot.dump(),
                        "routes": routes,
                    }),
                )
            }
            (&Method::GET, "/metrics") => respond(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                self.metrics.encode_with_ebpf(self.ebpf_pins.as_deref()),
            ),
            (&Method::POST, "/shutdown") => {
                tracing::info!(
                    event = "sidecar.shutdown_requested",
                    "shutdown requested on the admin endpoint"
                );
                let _ = self.shutdown.send(true);
                respond(StatusCode::ACCEPTED, "text/plain", "shutting down\n")
            }
            _ => respond(
                StatusCode::NOT_FOUND,
                "text/plain",
                "endpoints: /live /ready /config /identity /metrics, POST /shutdown\n",
            ),
        }
    }

    /// Serves until shutdown, as every locally answering listener is served
    /// ([`crate::local_http::serve_local`]: capped, timed, lingering close).
    pub async fn serve(self, listener: TcpListener, drain: std::time::Duration) {
        let shutdown = self.shutdown.subscribe();
        let metrics = self.metrics.clone();
        let service = hyper::service::service_fn(move |req| {
            let resp = self.handle(&req);
            async move { Ok::<_, Infallible>(resp) }
        });
        crate::local_http::serve_local(
            listener,
            shutdown,
            drain,
            "admin",
            metrics,
            Some(crate::http_conn::Version::H1),
            service,
        )
        .await;
    }
}
