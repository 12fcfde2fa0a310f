//! Wiring of `meshgate control-plane serve`: its identity (the same sources as a sidecar), the
//! watched policy directory, the xds-lite stream server, and a loopback admin listener with
//! `/status` (for `meshgate status`), `/metrics` (the `meshgate_sli_*` SLIs), `/v1/flows` (the
//! flows sidecars reported, for `meshgate policy suggest/diff --control-plane`), `/ready`,
//! `/live`, and the web console (`/console`, [`crate::console`], with the live tap
//! `/v1/console/tap` that `meshgate tap` reads).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use meshgate_xds::server::ControlPlane;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::identity::IdentityError;
use crate::policy::PolicyFiles;
use crate::sidecar::IdentitySource;

/// What `meshgate control-plane serve` is told.
#[derive(Debug, Clone)]
pub struct ControlPlaneConfig {
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub policy: PolicyFiles,
    pub identity: IdentitySource,
    pub poll_interval: Duration,
    /// Bearer token the console's mutating actions (quarantine, lift) require; without one they
    /// are allowed only when `admin` is a loopback address (see [`crate::console`]).
    pub console_token: Option<String>,
    /// Trace viewer the console links flows' trace IDs to (`--trace-ui`).
    pub trace_ui: Option<crate::trace_ui::TraceUi>,
}

/// Why the control plane could not start.
#[derive(Debug, thiserror::Error)]
pub enum ControlPlaneError {
    #[error(transparent)]
    Bind(#[from] crate::serve::BindError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(
        "the control plane's SVID is {got}, but sidecars only accept {want}; issue one with `meshgate ca issue --id {want}` (or a token for it)"
    )]
    WrongIdentity { got: String, want: String },
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

/// A running control plane.
pub struct RunningControlPlane {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub control_plane: Arc<ControlPlane>,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

impl RunningControlPlane {
    pub async fn start(config: ControlPlaneConfig) -> Result<Self, ControlPlaneError> {
        let listener = crate::serve::bind(config.listen, "control plane", "--listen").await?;
        let admin_listener =
            crate::serve::bind(config.admin, "control-plane admin", "--admin").await?;
        let identity = config.identity.start(config.poll_interval).await?;
        let td = identity.id().trust_domain();
        let want = td
            .workload_id("meshgate", "control-plane")
            .expect("valid ID");
        if identity.id() != &want {
            return Err(ControlPlaneError::WrongIdentity {
                got: identity.id().to_string(),
                want: want.to_string(),
            });
        }
        let control_plane = ControlPlane::new(td);
        let policy_dir = config.policy.dir.clone();
        {
            let cp = control_plane.clone();
            config.policy.watch(config.poll_interval, move |loaded| match loaded {
                Ok(set) => cp.publish(set),
                Err(errors) => {
                    for e in &errors.0 {
                        tracing::error!(event = "policy.rejected", file = %e.file.display(), line = e.line, reason = %e.reason, "update refused; the last good version keeps being served");
                    }
                    cp.reject(errors.to_string());
                }
            });
        }
        // Sidecars' chains verified once per SVID (not exported: the control plane has no
        // per-listener TLS metrics).
        let verified = Arc::new(meshgate_ca::chains::VerifiedChains::new());
        let tls = crate::tls::live_inbound_config(identity.clone(), verified, false)?;
        let (shutdown, _) = watch::channel(false);
        let addr = listener.local_addr().expect("bound");
        let admin_addr = admin_listener.local_addr().expect("bound");
        let mut tasks = JoinSet::new();
        tasks.spawn(
            control_plane
                .clone()
                .serve(listener, tls, shutdown.subscribe()),
        );
        let console = Arc::new(
            crate::console::Console::new(config.console_token.clone(), admin_addr, policy_dir)
                .with_trace_ui(config.trace_ui.clone()),
        );
        tasks.spawn(admin(
            admin_listener,
            control_plane.clone(),
            console,
            shutdown.subscribe(),
        ));
        tracing::info!(event = "control_plane.started", addr = %addr, admin = %admin_addr, id = %identity.id());
        Ok(Self {
            addr,
            admin_addr,
            control_plane,
            shutdown,
            tasks,
        })
    }

    /// Stops serving; sidecars keep their last snapshot and reconnect when it is back.
    pub fn shutdown(&self) {
        let _ = self.shutdown.send(true);
    }

    /// Completes when both listeners have stopped.
    pub async fn wait(mut self) {
        while self.tasks.join_next().await.is_some() {}
    }
}

/// How long the admin listener's open connections get to finish after shutdown.
const ADMIN_DRAIN: Duration = Duration::from_secs(5);

/// The loopback admin listener, served as every locally answering listener is
/// ([`crate::local_http::serve_local`]: capped, timed, lingering close); its refusals at the cap are
/// counted in its own `/metrics`.
async fn admin(
    listener: TcpListener,
    cp: Arc<ControlPlane>,
    console: Arc<crate::console::Console>,
    shutdown: watch::Receiver<bool>,
) {
    let refused = crate::serve::RefusedConnections::exported_as(
        "meshgate_control_plane_admin_connections_refused_total",
    );
    let counted = refused.clone();
    let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let (cp, console, refused) = (cp.clone(), console.clone(), refused.clone());
        async move {
            let path = req.uri().path().to_string();
            if let Some(answer) = console.handle(&cp, req).await {
                return Ok::<_, Infallible>(answer);
            }
            let mut content_type = "text/plain; charset=utf-8";
            let (status, body) = match path.as_str() {
                "/status" => (
                    StatusCode::OK,
                    serde_json::to_string_pretty(&cp.status()).expect("serializes"),
                ),
                "/metrics" => {
                    content_type = "text/plain; version=0.0.4; charset=utf-8";
                    let refused = refused.encode(
                        "Connections to the admin listener closed at accept: over its cap in total or from one address",
                    );
                    (
                        StatusCode::OK,
                        cp.sli_metrics() + &console.metrics(&cp) + &refused,
                    )
                }
                "/v1/flows" => {
                    content_type = "application/x-ndjson";
                    (StatusCode::OK, crate::console::flow_lines(&cp))
                }
                "/ready" if cp.version().is_some() => (StatusCode::OK, "ready\n".to_string()),
                "/ready" => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no valid policy loaded yet\n".to_string(),
                ),
                "/live" => (StatusCode::OK, "live\n".to_string()),
                _ => (
                    StatusCode::NOT_FOUND,
                    "endpoints: /console /status /metrics /v1/flows /ready /live\n".to_string(),
                ),
            };
            Ok::<_, Infallible>(
                Response::builder()
                    .status(status)
                    .header("content-type", content_type)
                    .body(Full::new(Bytes::from(body)))
                    .expect("valid"),
            )
        }
    });
    crate::local_http::serve_local(
        listener,
        shutdown,
        ADMIN_DRAIN,
        "control-plane admin",
        counted,
        Some(crate::http_conn::Version::H1),
        service,
    )
    .await;
}
