//! The plaintext health-probe listener (default 0.0.0.0:15020, Istio's convention).
//!
//! Kubelets and container health checks cannot present an SVID, and with default-deny a probe
//! sent to the mTLS port would be refused — the most common way meshes make pods unready. This
//! listener forwards exactly the configured probe paths (GET/HEAD, no body) to the app and
//! nothing else, so it opens no path around mTLS. The forwarded request is rebuilt from scratch:
//! no caller header (such as a forged `x-meshgate-peer`) reaches the app.
//!
//! A probe path of another `--app` (`--probe-path PORT:PATH`) is served at
//! `/meshgate/probe/http/PORT/PATH`, since two apps may both have a `/healthz`.
//!
//! Kubelet `tcpSocket` and `grpc` probes need the app port itself, which takes only mTLS once
//! meshed. For ports enabled with `--probe-tcp` / `--probe-grpc` this listener runs the check on
//! the kubelet's behalf against `127.0.0.1:<port>` and answers 200 or 503 (with the reason):
//!
//! - `GET /meshgate/probe/tcp/<port>`: a TCP connect (what the kubelet's `tcpSocket` does);
//! - `GET /meshgate/probe/grpc/<port>[?service=NAME]`: `grpc.health.v1.Health/Check` over h2c,
//!   200 only for `SERVING` ([`grpc`]).
//!
//! Both take `timeout=SECONDS` (1–60, default 1: the kubelet's default `timeoutSeconds`), so an
//! injected probe can carry the pod's own `timeoutSeconds`. A port not enabled by its flag is
//! `404`: the listener never connects anywhere it was not told to, so it is not an open proxy or
//! port scanner for whoever can reach the pod.
//!
//! With `probe_self`, it also answers the sidecar's own `/meshgate/ready` and `/meshgate/live`:
//! a kubelet cannot reach the admin port (loopback only, and it has `POST /shutdown`), yet it must
//! see when the sidecar is ready before it starts the app. The `/meshgate/` prefix keeps these
//! out of the app's paths.

pub mod grpc;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::http_util::{ProxyBody, boxed, local_response, strip_hop_by_hop};

/// The sidecar's own readiness: the reasons it is not ready (empty = ready).
pub type Readiness = Arc<dyn Fn() -> Vec<String> + Send + Sync>;

/// What the probe listener may reach.
#[derive(Debug, Clone, Default)]
pub struct ProbeTargets {
    /// Exact app paths forwarded to an app (GET/HEAD), as `--probe-path` takes them: `PATH`
    /// for the default app, served at `PATH`; `PORT:PATH` for the `--app` on PORT, served at
    /// `/meshgate/probe/http/PORT/PATH` (a kubelet `httpGet` probe on another app port).
    pub paths: Vec<String>,
    /// Local ports `/meshgate/probe/tcp/<port>` may connect to.
    pub tcp: Vec<u16>,
    /// Local ports `/meshgate/probe/grpc/<port>` may ask for their gRPC health.
    pub grpc: Vec<u16>,
}

impl ProbeTargets {
    /// Refuses a probe path that is malformed or names a port with no `--app` (`apps`, the
    /// default first), so a typo fails at start rather than as a pod that never gets ready.
    pub fn check(&self, apps: &[std::net::SocketAddr]) -> Result<(), String> {
        let ports: Vec<u16> = apps.iter().map(|a| a.port()).collect();
        for path in &self.paths {
            ProbePath::parse(path, &ports)?;
        }
        Ok(())
    }
}

/// Prefixes of the checks made on the kubelet's behalf.
const TCP_PROBE: &str = "/meshgate/probe/tcp/";
const GRPC_PROBE: &str = "/meshgate/probe/grpc/";
/// Prefix of the probe paths of apps other than the default one (`--probe-path PORT:PATH`).
const HTTP_PROBE: &str = "/meshgate/probe/http/";
/// The kubelet's default `timeoutSeconds`.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
/// The longest check a caller may ask for (`timeout=`).
const MAX_TIMEOUT_SECS: u64 = 60;

/// One `--probe-path`: `port` is `None` for the default app.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ProbePath {
    port: Option<u16>,
    path: String,
}

impl ProbePath {
    /// `PATH` or `PORT:PATH`; `PORT` must be an `--app` port.
    fn parse(value: &str, app_ports: &[u16]) -> Result<Self, String> {
        let Some(&example) = app_ports.first() else {
            return Err(format!(
                "--probe-path {value}: this sidecar serves no --app (outbound-only), so there is no app to probe; add the --app or drop the --probe-path"
            ));
        };
        let (port, path) = match value.split_once(':') {
            Some((port, path)) if !value.starts_with('/') => {
                let port = port
                    .parse::<u16>()
                    .ok()
                    .filter(|p| app_ports.contains(p))
                    .ok_or_else(|| {
                        format!(
                            "--probe-path {value}: {port} is not an --app port (give PATH for the default app or APP_PORT:PATH, e.g. {}:/healthz)",
                            example
                        )
                    })?;
                (Some(port), path)
            }
            _ => (None, value),
        };
        if !path.starts_with('/') {
            return Err(format!(
                "--probe-path {value}: the path must start with /, e.g. /healthz or {example}:/healthz"
            ));
        }
        // A kubelet `httpGet.path` may carry a query: the path is matched, the query the
        // kubelet sends is forwarded as it comes.
        let path = path.split_once('?').map_or(path, |(path, _)| path);
        Ok(Self {
            port,
            path: path.to_string(),
        })
    }
}

/// Forwards probe paths to the apps and runs TCP and gRPC health checks.
#[derive(Clone)]
pub struct ProbeForwarder {
    /// The `--app`s, the default first.
    apps: Arc<[std::net::SocketAddr]>,
    paths: Arc<[ProbePath]>,
    targets: Arc<ProbeTargets>,
    client: Client<HttpConnector, Empty<bytes::Bytes>>,
    /// Answers `/meshgate/ready` and `/meshgate/live` when set.
    readiness: Option<Readiness>,
}

impl ProbeForwarder {
    /// `apps` are the `--app`s (not empty, the default first); a `PORT:PATH` probe path must
    /// name one of their ports.
    pub fn new(
        apps: &[std::net::SocketAddr],
        targets: ProbeTargets,
        readiness: Option<Readiness>,
    ) -> Result<Self, String> {
        let ports: Vec<u16> = apps.iter().map(|a| a.port()).collect();
        let paths = targets
            .paths
            .iter()
            .map(|p| ProbePath::parse(p, &ports))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            apps: apps.into(),
            paths,
            targets: Arc::new(targets),
            client: Client::builder(TokioExecutor::new()).build_http(),
            readiness,
        })
    }

    /// The app and path a probe path names, if it is a configured one.
    fn forwarded(&self, path: &str) -> Option<(std::net::SocketAddr, String)> {
        if let Some(rest) = path.strip_prefix(HTTP_PROBE) {
            let slash = rest.find('/')?;
            let (port, app_path) = rest.split_at(slash);
            if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            let port: u16 = port.parse().ok()?;
            self.paths
                .iter()
                .any(|p| p.port == Some(port) && p.path == app_path)
                .then(|| self.apps.iter().find(|a| a.port() == port).copied())
                .flatten()
                .map(|app| (app, app_path.to_string()))
        } else {
            self.paths
                .iter()
                .any(|p| p.port.is_none() && p.path == path)
                .then(|| (self.apps[0], path.to_string()))
        }
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<ProxyBody> {
        let path = req.uri().path();
        if let Some(readiness) = &self.readiness {
            match path {
                "/meshgate/live" => return local_response(StatusCode::OK, "live\n"),
                "/meshgate/ready" => {
                    // The reasons stay on the loopback admin `/ready`: this port is open to
                    // anyone who can reach the pod.
                    return if readiness().is_empty() {
                        local_response(StatusCode::OK, "ready\n")
                    } else {
                        local_response(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                    };
                }
                _ => {}
            }
        }
        // A check run here, or (Err) the app and path a probe path is forwarded to.
        let check = if let Some(port) = path.strip_prefix(TCP_PROBE) {
            match enabled(port, &self.targets.tcp) {
                Some(port) => Ok(Check::Tcp(port)),
                None => {
                    return local_response(
                        StatusCode::NOT_FOUND,
                        "not a port enabled for TCP probes (--probe-tcp)\n",
                    );
                }
            }
        } else if let Some(port) = path.strip_prefix(GRPC_PROBE) {
            match enabled(port, &self.targets.grpc) {
                Some(port) => Ok(Check::Grpc(port)),
                None => {
                    return local_response(
                        StatusCode::NOT_FOUND,
                        "not a port enabled for gRPC probes (--probe-grpc)\n",
                    );
                }
            }
        } else {
            let Some(target) = self.forwarded(path) else {
                return local_response(StatusCode::NOT_FOUND, "not a configured probe path\n");
            };
            Err(target)
        };
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return local_response(StatusCode::METHOD_NOT_ALLOWED, "probes use GET or HEAD\n");
        }
        let has_body = req.headers().contains_key(header::TRANSFER_ENCODING)
            || req
                .headers()
                .get(header::CONTENT_LENGTH)
                .is_some_and(|v| v.as_bytes() != b"0");
        if has_body {
            return local_response(StatusCode::BAD_REQUEST, "probes carry no body\n");
        }
        let (app, app_path) = match check {
            Ok(check) => {
                let grpc = matches!(check, Check::Grpc(_));
                return match CheckParams::parse(req.uri().query(), grpc) {
                    Ok(params) => check.run(&params).await,
                    Err(reason) => text(StatusCode::BAD_REQUEST, reason),
                };
            }
            Err(target) => target,
        };
        let query = req
            .uri()
            .query()
            .map(|q| format!("?{q}"))
            .unwrap_or_default();
        let forwarded = Request::builder()
            .method(req.method().clone())
            .uri(format!("http://{app}{app_path}{query}"))
            .header(header::USER_AGENT, "meshgate-probe")
            .body(Empty::new())
            .expect("valid probe request");
        match self.client.request(forwarded).await {
            Ok(resp) => {
                let (mut parts, body) = resp.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                Response::from_parts(parts, boxed(body))
            }
            Err(e) => {
                tracing::warn!(event = "probe.app_unavailable", error = %e);
                local_response(StatusCode::SERVICE_UNAVAILABLE, "app unavailable\n")
            }
        }
    }

    /// Serves until shutdown, as every locally answering listener is served
    /// ([`crate::local_http::serve_local`]: capped, timed, lingering close).
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: watch::Receiver<bool>,
        drain: Duration,
        metrics: Arc<crate::metrics::Metrics>,
    ) {
        let service = hyper::service::service_fn(move |req| {
            let this = self.clone();
            async move { Ok::<_, Infallible>(this.handle(req).await) }
        });
        crate::local_http::serve_local(
            listener,
            shutdown,
            drain,
            "probes",
            metrics,
            Some(crate::http_conn::Version::H1),
            service,
        )
        .await;
    }
}

/// A check the probe listener makes on the kubelet's behalf.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    Tcp(u16),
    Grpc(u16),
}

/// The query of a check: `timeout=SECONDS`, and `service=NAME` for gRPC.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CheckParams {
    timeout: Duration,
    service: String,
}

impl CheckParams {
    /// Refuses what it does not understand rather than ignoring it: a misspelt `service` would
    /// otherwise silently check the whole server instead of the service the probe names.
    fn parse(query: Option<&str>, grpc: bool) -> Result<Self, String> {
        let mut params = CheckParams {
            timeout: DEFAULT_TIMEOUT,
            service: String::new(),
        };
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "timeout" => {
                    params.timeout = value
                        .parse::<u64>()
                        .ok()
                        .filter(|s| (1..=MAX_TIMEOUT_SECS).contains(s))
                        .map(Duration::from_secs)
                        .ok_or_else(|| {
                            format!(
                                "timeout={value}: give whole seconds from 1 to {MAX_TIMEOUT_SECS} (the probe's timeoutSeconds)\n"
                            )
                        })?;
                }
                "service" if grpc => {
                    let valid = value.len() <= 256
                        && value
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b));
                    if !valid {
                        return Err(format!(
                            "service={value}: a gRPC service name is letters, digits and ._-/ (at most 256), e.g. service=grpc.health.v1.Health\n"
                        ));
                    }
                    params.service = value.to_string();
                }
                _ => {
                    return Err(format!(
                        "unknown probe parameter {key:?}: use timeout=SECONDS{}\n",
                        if grpc { " and service=NAME" } else { "" }
                    ));
                }
            }
        }
        Ok(params)
    }
}

impl Check {
    async fn run(self, params: &CheckParams) -> Response<ProxyBody> {
        let (port, result) = match self {
            Check::Tcp(port) => (port, tcp_check(port, params.timeout).await),
            Check::Grpc(port) => (
                port,
                grpc::check(port, &params.service, params.timeout).await,
            ),
        };
        match result {
            Ok(()) => text(
                StatusCode::OK,
                format!("{}\n", self.ok_text(&params.service)),
            ),
            Err(reason) => {
                tracing::info!(event = "probe.failed", port, check = ?self, reason = %reason, "probe check failed");
                text(StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n"))
            }
        }
    }

    fn ok_text(self, service: &str) -> String {
        match self {
            Check::Tcp(port) => format!("tcp 127.0.0.1:{port}: connected"),
            Check::Grpc(port) if service.is_empty() => {
                format!("grpc 127.0.0.1:{port}: SERVING")
            }
            Check::Grpc(port) => format!("grpc 127.0.0.1:{port} {service}: SERVING"),
        }
    }
}

/// What the kubelet's `tcpSocket` probe does: the port accepts a connection in time.
async fn tcp_check(port: u16, timeout: Duration) -> Result<(), String> {
    let target = (std::net::Ipv4Addr::LOCALHOST, port);
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(target)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("tcp 127.0.0.1:{port}: {e}")),
        Err(_) => Err(format!(
            "tcp 127.0.0.1:{port}: no connection within {}s",
            timeout.as_secs()
        )),
    }
}

/// `port` if it is a port number listed in `enabled`.
fn enabled(port: &str, enabled: &[u16]) -> Option<u16> {
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    port.parse().ok().filter(|p| enabled.contains(p))
}

/// A generated plain-text answer with a body made at run time (the reason a check failed).
fn text(status: StatusCode, body: String) -> Response<ProxyBody> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(
            Full::new(bytes::Bytes::from(body))
                .map_err(|never| match never {})
                .boxed_unsync(),
        )
        .expect("plain response is valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_parameters() {
        let ok = |timeout: u64, service: &str| {
            Ok(CheckParams {
                timeout: Duration::from_secs(timeout),
                service: service.to_string(),
            })
        };
        for (query, grpc, want) in [
            (None, true, ok(1, "")),
            (Some(""), false, ok(1, "")),
            (Some("timeout=5"), false, ok(5, "")),
            (
                Some("service=hipstershop.CartService"),
                true,
                ok(1, "hipstershop.CartService"),
            ),
            (Some("service=a&timeout=60"), true, ok(60, "a")),
            (Some("service="), true, ok(1, "")),
        ] {
            assert_eq!(CheckParams::parse(query, grpc), want, "{query:?}");
        }
        for (query, grpc) in [
            (Some("timeout=0"), false),
            (Some("timeout=61"), false),
            (Some("timeout=1.5"), false),
            (Some("servce=a"), true),
            (Some("service=a"), false),
            (Some("service=a%20b"), true),
            (Some("service=a b"), true),
        ] {
            assert!(CheckParams::parse(query, grpc).is_err(), "{query:?}");
        }
    }

    #[test]
    fn probe_paths_for_each_app() {
        let apps: Vec<std::net::SocketAddr> = vec![
            "127.0.0.1:8080".parse().unwrap(),
            "127.0.0.1:9090".parse().unwrap(),
        ];
        let targets = ProbeTargets {
            paths: vec![
                "/healthz".into(),
                "9090:/-/ready".into(),
                "/live?full=1".into(),
            ],
            ..Default::default()
        };
        let probes = ProbeForwarder::new(&apps, targets, None).unwrap();
        for (path, want) in [
            ("/healthz", Some((apps[0], "/healthz"))),
            (
                "/meshgate/probe/http/9090/-/ready",
                Some((apps[1], "/-/ready")),
            ),
            // A query in the flag (from a kubelet `httpGet.path`) is not part of the match.
            ("/live", Some((apps[0], "/live"))),
            // Each path only on the app it was given for.
            ("/-/ready", None),
            ("/meshgate/probe/http/8080/-/ready", None),
            ("/meshgate/probe/http/9090/healthz", None),
            ("/meshgate/probe/http/8080/healthz", None),
            ("/meshgate/probe/http/9090", None),
            ("/meshgate/probe/http/+9090/-/ready", None),
        ] {
            let got = probes.forwarded(path);
            assert_eq!(got, want.map(|(app, p)| (app, p.to_string())), "{path}");
        }
        for (bad, says) in [
            ("7070:/x", "7070 is not an --app port"),
            ("x:/x", "x is not an --app port"),
            ("healthz", "must start with /"),
            ("9090:healthz", "must start with /"),
        ] {
            let targets = ProbeTargets {
                paths: vec![bad.into()],
                ..Default::default()
            };
            let err = ProbeForwarder::new(&apps, targets, None)
                .err()
                .unwrap_or_else(|| panic!("{bad} accepted"));
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn only_enabled_ports() {
        let ports = [8080, 9090];
        assert_eq!(enabled("9090", &ports), Some(9090));
        for refused in ["7070", "", "+9090", "9090/", "09090x", "99999"] {
            assert_eq!(enabled(refused, &ports), None, "{refused:?}");
        }
    }
}
