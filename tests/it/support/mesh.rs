//! Whole-mesh harness: a CA, a shared policy directory, and workloads each made of an echo app
//! and a real sidecar, all on ephemeral loopback ports.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshgate_ca::SpiffeId;
use meshgate_proxy::identity::{Backoff, IdentityConfig};
use meshgate_proxy::inbound::AppProtocol;
use meshgate_proxy::policy::PolicyFiles;
use meshgate_proxy::sidecar::{IdentitySource, Sidecar, SidecarConfig};

use super::TestCa;

/// A small HTTP app (HTTP/1.1 and h2c) that answers with what it received, as JSON:
/// `{method, path, version, headers, body_bytes}`. `GET /download/<n>` streams n zero bytes;
/// `/slow/<ms>` answers after `ms` milliseconds; `/pause/<ms>` streams `first`, pauses `ms`
/// milliseconds, then streams `second`.
/// Bodies are counted as they stream, never buffered.
pub struct EchoApp {
    pub addr: SocketAddr,
}

/// A body of `n` zero bytes streamed in chunks of `chunk` bytes, never held whole (the test apps'
/// `GET /download/<n>`).
pub fn download(
    n: u64,
    chunk: usize,
) -> http_body_util::combinators::BoxBody<Bytes, std::io::Error> {
    let chunk = Bytes::from(vec![0u8; chunk]);
    let chunks = n.div_ceil(chunk.len() as u64);
    let stream = futures_util::stream::iter((0..chunks).map(move |i| {
        let len = if i + 1 == chunks {
            (n - i * chunk.len() as u64) as usize
        } else {
            chunk.len()
        };
        Ok::<_, std::io::Error>(Frame::data(chunk.slice(..len)))
    }));
    StreamBody::new(stream).boxed()
}

async fn echo(
    req: http::Request<Incoming>,
) -> Result<
    http::Response<http_body_util::combinators::BoxBody<Bytes, std::io::Error>>,
    std::convert::Infallible,
> {
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    if let Some(n) = path
        .strip_prefix("/download/")
        .and_then(|n| n.parse::<u64>().ok())
    {
        return Ok(http::Response::new(download(n, 64 * 1024)));
    }
    if let Some(ms) = path
        .strip_prefix("/pause/")
        .and_then(|ms| ms.parse::<u64>().ok())
    {
        // A streamed answer that stops for `ms` milliseconds halfway (server-sent events,
        // a long download from a slow source).
        let parts = futures_util::StreamExt::then(
            futures_util::stream::iter([0u64, ms]),
            |wait| async move {
                tokio::time::sleep(Duration::from_millis(wait)).await;
                let part = if wait == 0 { "first\n" } else { "second\n" };
                Ok::<_, std::io::Error>(Frame::data(Bytes::from(part)))
            },
        );
        return Ok(http::Response::new(StreamBody::new(parts).boxed()));
    }
    if let Some(ms) = path
        .strip_prefix("/slow/")
        .and_then(|ms| ms.parse::<u64>().ok())
    {
        // An answer that takes `ms` milliseconds (a long poll, a slow query).
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if let Some(protocol) = req.headers().get("upgrade").cloned() {
        // Accept any Upgrade and echo bytes on the switched connection (a WebSocket stand-in).
        let peer = req.headers().get("x-meshgate-peer").cloned();
        let on_upgrade = hyper::upgrade::on(req);
        tokio::spawn(async move {
            if let Ok(upgraded) = on_upgrade.await {
                let (mut r, mut w) = tokio::io::split(TokioIo::new(upgraded));
                let _ = tokio::io::copy(&mut r, &mut w).await;
            }
        });
        let mut resp = http::Response::builder()
            .status(101)
            .header("connection", "upgrade")
            .header("upgrade", protocol);
        if let Some(peer) = peer {
            resp = resp.header("x-echo-peer", peer);
        }
        return Ok(resp
            .body(
                Full::new(Bytes::new())
                    .map_err(|never| match never {})
                    .boxed(),
            )
            .unwrap());
    }
    if req
        .headers()
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
    {
        return Ok(grpc(req).await);
    }
    let method = req.method().to_string();
    let version = format!("{:?}", req.version());
    let headers: BTreeMap<String, String> = req
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("<binary>").to_string()))
        .collect();
    let mut body = req.into_body();
    let mut body_bytes = 0u64;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => body_bytes += f.data_ref().map_or(0, |d| d.len() as u64),
            Err(_) => break,
        }
    }
    let json = serde_json::json!({ "method": method, "path": path, "version": version, "headers": headers, "body_bytes": body_bytes });
    Ok(http::Response::builder()
        .header("content-type", "application/json")
        .body(
            Full::new(Bytes::from(json.to_string()))
                .map_err(|never| match never {})
                .boxed(),
        )
        .unwrap())
}

/// A minimal gRPC server for tests: `/test.Echo/Unary` answers the request message back;
/// `/test.Echo/Stream` answers it back three times, each prefixed with its index. Messages are
/// opaque bytes in standard gRPC length-prefixed framing, status in trailers.
async fn grpc(
    req: http::Request<Incoming>,
) -> http::Response<http_body_util::combinators::BoxBody<Bytes, std::io::Error>> {
    let path = req.uri().path().to_string();
    let peer = req
        .headers()
        .get("x-meshgate-peer")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let message = if body.len() >= 5 {
        body.slice(5..)
    } else {
        Bytes::new()
    };
    let frame = |payload: &[u8]| {
        let mut out = vec![0u8];
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        out.extend_from_slice(payload);
        Frame::data(Bytes::from(out))
    };
    let mut frames = Vec::new();
    let mut trailers = http::HeaderMap::new();
    match path.as_str() {
        "/test.Echo/Unary" => {
            frames.push(frame(
                &[message.as_ref(), b" from ", peer.as_bytes()].concat(),
            ));
            trailers.insert("grpc-status", "0".parse().unwrap());
        }
        "/test.Echo/Stream" => {
            for i in 0..3 {
                frames.push(frame(
                    &[format!("{i}:").as_bytes(), message.as_ref()].concat(),
                ));
            }
            trailers.insert("grpc-status", "0".parse().unwrap());
        }
        _ => {
            trailers.insert("grpc-status", "12".parse().unwrap());
        }
    }
    frames.push(Frame::trailers(trailers));
    let stream = futures_util::stream::iter(frames.into_iter().map(Ok::<_, std::io::Error>));
    http::Response::builder()
        .header("content-type", "application/grpc")
        .body(StreamBody::new(stream).boxed())
        .unwrap()
}

impl EchoApp {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(async move {
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(
                            TokioIo::new(tcp),
                            hyper::service::service_fn(echo),
                        )
                        .await;
                });
            }
        });
        Self { addr }
    }
}

/// One workload: its app and its sidecar.
pub struct Workload {
    pub name: String,
    pub id: SpiffeId,
    pub app: EchoApp,
    pub sidecar: Sidecar,
}

/// The mesh default set to ALLOW (what is not covered passes, and counts as uncovered).
pub const MESH_ALLOW: &str = "apiVersion: meshgate.dev/v1\nkind: MeshConfig\nmetadata: { name: default, namespace: meshgate }\nspec: { defaultAction: ALLOW, trustDomain: mesh.local }\n";

/// orders admits every request from web, by identity alone: for tests about how requests
/// travel rather than how they are judged.
pub const WEB_TO_ORDERS: &str = r#"
apiVersion: meshgate.dev/v1
kind: AuthorizationPolicy
metadata: { name: web-to-orders, namespace: shop }
spec:
  selector: { account: orders }
  action: ALLOW
  rules:
    - from: [{ principals: ["spiffe://mesh.local/ns/shop/sa/web"] }]
"#;

/// A CA, a policy directory shared by all sidecars, and workloads in namespace `shop`.
pub struct TestMesh {
    pub ca: TestCa,
    pub policy_dir: PathBuf,
    pub workloads: BTreeMap<String, Workload>,
    /// Tracing for sidecars added from now on (off by default; each gets its name as service).
    pub telemetry: meshgate_proxy::telemetry::TelemetryConfig,
    /// The control plane, when [`start_control_plane`](Self::start_control_plane) ran; sidecars
    /// added afterwards stream their policy from it instead of reading the directory.
    pub control_plane: Option<meshgate_proxy::control_plane::RunningControlPlane>,
    /// Connection caps and idle timeout of sidecars added from now on.
    pub limits: meshgate_proxy::serve::Limits,
    /// The control plane's `--console-token` (set before `start_control_plane`).
    pub console_token: Option<String>,
    /// The control plane's `--trace-ui` (set before `start_control_plane`).
    pub trace_ui: Option<meshgate_proxy::trace_ui::TraceUi>,
    cp_port: u16,
}

/// An HTTP answer as the calling app sees it.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: String,
}

impl Answer {
    /// The echo app's JSON (only for answers that reached the app).
    pub fn echoed(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not an echo ({e}): {} {}", self.status, self.body))
    }
}

impl TestMesh {
    pub async fn new() -> Self {
        Self::with_svid_ttl(Duration::from_secs(3600)).await
    }

    /// A mesh whose CA issues SVIDs of `ttl` (sidecars renew at about half of it).
    pub async fn with_svid_ttl(ttl: Duration) -> Self {
        let ca = TestCa::start(ttl).await;
        let policy_dir = ca.tmp.path().join("policies");
        std::fs::create_dir_all(&policy_dir).unwrap();
        Self {
            ca,
            policy_dir,
            workloads: BTreeMap::new(),
            telemetry: meshgate_proxy::telemetry::TelemetryConfig::disabled(),
            control_plane: None,
            limits: Default::default(),
            console_token: None,
            trace_ui: None,
            cp_port: 0,
        }
    }

    /// Starts (or restarts, on the same port) the control plane serving the policy directory,
    /// with its own SVID `spiffe://mesh.local/ns/meshgate/sa/control-plane`.
    pub async fn start_control_plane(&mut self) {
        let files = self.ca.tmp.path().join("control-plane");
        if !files.exists() {
            std::fs::create_dir_all(&files).unwrap();
            let now = time::OffsetDateTime::now_utc();
            let svid = self.ca.sign_leaf(
                &SpiffeId::parse("spiffe://mesh.local/ns/meshgate/sa/control-plane").unwrap(),
                now - time::Duration::minutes(1),
                now + time::Duration::hours(2),
            );
            super::write_chain(&files.join("svid.pem"), &svid.chain);
            meshgate_ca::fsutil::write_atomic(
                &files.join("key.pem"),
                svid.key.serialize_pem().as_bytes(),
                0o600,
            )
            .unwrap();
            std::fs::write(files.join("bundle.pem"), self.ca.bundle_pem()).unwrap();
        }
        let cp = meshgate_proxy::control_plane::RunningControlPlane::start(
            meshgate_proxy::control_plane::ControlPlaneConfig {
                listen: SocketAddr::from(([127, 0, 0, 1], self.cp_port)),
                admin: "127.0.0.1:0".parse().unwrap(),
                policy: PolicyFiles {
                    dir: self.policy_dir.clone(),
                    services: None,
                },
                identity: IdentitySource::Files(
                    meshgate_proxy::identity::static_files::IdentityFiles {
                        cert: files.join("svid.pem"),
                        key: files.join("key.pem"),
                        bundle: files.join("bundle.pem"),
                    },
                ),
                poll_interval: Duration::from_millis(50),
                console_token: self.console_token.clone(),
                trace_ui: self.trace_ui.clone(),
            },
        )
        .await
        .unwrap();
        self.cp_port = cp.addr.port();
        self.control_plane = Some(cp);
    }

    /// Stops the control plane (sidecars keep their last snapshot).
    pub async fn stop_control_plane(&mut self) {
        if let Some(cp) = self.control_plane.take() {
            cp.shutdown();
            cp.wait().await;
        }
    }

    /// The control plane's `/status` report.
    pub async fn cp_status(&self) -> serde_json::Value {
        let admin_addr = self
            .control_plane
            .as_ref()
            .expect("control plane running")
            .admin_addr;
        let (status, body) = admin(admin_addr, "GET", "/status").await;
        assert_eq!(status, 200);
        serde_json::from_str(&body).unwrap()
    }

    pub fn id_of(name: &str) -> SpiffeId {
        SpiffeId::parse(&format!("spiffe://mesh.local/ns/shop/sa/{name}")).unwrap()
    }

    /// Writes a policy file atomically (as `git checkout` or a config push would).
    pub fn write_policy(&self, file: &str, yaml: &str) {
        let tmp = self.policy_dir.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(&tmp, self.policy_dir.join(file)).unwrap();
    }

    /// Starts a workload whose sidecar bootstraps its SVID from the CA with a join token.
    pub async fn add(&mut self, name: &str) {
        self.add_with(name, &[], &[]).await;
    }

    /// Like [`add`](Self::add), with outbound TCP forwards and extra inbound TCP ports.
    pub async fn add_with(
        &mut self,
        name: &str,
        tcp_forwards: &[meshgate_proxy::outbound::tcp::TcpForward],
        inbound_tcp_ports: &[u16],
    ) {
        let app = EchoApp::start().await;
        self.add_in_front_of(name, app, tcp_forwards, inbound_tcp_ports)
            .await;
    }

    /// Starts a workload whose sidecar fronts an app already listening at `app.addr`.
    pub async fn add_in_front_of(
        &mut self,
        name: &str,
        app: EchoApp,
        tcp_forwards: &[meshgate_proxy::outbound::tcp::TcpForward],
        inbound_tcp_ports: &[u16],
    ) {
        let (forwards, ports) = (tcp_forwards.to_vec(), inbound_tcp_ports.to_vec());
        self.add_configured(name, app, move |config| {
            config.tcp_forwards = forwards;
            config.inbound_tcp_ports = ports;
        })
        .await;
    }

    /// Starts a workload whose sidecar fronts `app.addr`, with the harness's configuration
    /// changed by `configure` first (more apps, probe ports, …).
    pub async fn add_configured(
        &mut self,
        name: &str,
        app: EchoApp,
        configure: impl FnOnce(&mut SidecarConfig),
    ) {
        let id = Self::id_of(name);
        let mut telemetry = self.telemetry.clone();
        telemetry.service_name = Some(format!("{name}-sidecar"));
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let mut config = SidecarConfig {
            apps: vec![app.addr],
            app_protocol: AppProtocol::Auto,
            mesh_protocol: Default::default(),
            identity: IdentitySource::Ca(IdentityConfig {
                ca_url: self.ca.url(),
                ca_bundle_pem: self.ca.bundle_pem(),
                token: self.ca.token(&id, Duration::from_secs(60), false).into(),
                bundle_refresh: Duration::from_secs(60),
                backoff: Backoff::default(),
            }),
            policy: if self.cp_port != 0 {
                meshgate_proxy::policy::PolicySource::ControlPlane {
                    urls: vec![format!("https://127.0.0.1:{}", self.cp_port)],
                }
            } else {
                meshgate_proxy::policy::PolicySource::Files(PolicyFiles {
                    dir: self.policy_dir.clone(),
                    services: None,
                })
            },
            inbound: any,
            outbound: any,
            admin: any,
            probe: any,
            probe_paths: vec!["/healthz".to_string()],
            probe_self: true,
            probe_tcp: vec![],
            probe_grpc: vec![],
            allow_tls12: false,
            tcp_forwards: vec![],
            inbound_tcp_ports: vec![],
            allowed_upgrades: vec!["websocket".into()],
            limits: self.limits,
            detect_timeout: Duration::from_millis(300),
            opaque_ports: vec![],
            drain: Duration::from_secs(2),
            poll_interval: Duration::from_millis(50),
            telemetry,
            ebpf_cgroup: None,
            flow_report_interval: meshgate_proxy::flows::DEFAULT_REPORT_INTERVAL,
        };
        configure(&mut config);
        let sidecar = Sidecar::start(config).await.unwrap();
        self.workloads.insert(
            name.to_string(),
            Workload {
                name: name.to_string(),
                id,
                app,
                sidecar,
            },
        );
    }

    pub fn workload(&self, name: &str) -> &Workload {
        &self.workloads[name]
    }

    /// Publishes a `Service` per workload (host = its name, endpoint = its sidecar's inbound).
    pub fn write_services(&self) {
        let docs: Vec<String> = self
            .workloads
            .values()
            .map(|w| {
                format!(
                    "apiVersion: meshgate.dev/v1\nkind: Service\nmetadata: {{ name: {name}, namespace: shop }}\nspec:\n  identity: {id}\n  hosts: [{name}]\n  ports: [{{ port: 8080, protocol: http }}]\n  endpoints: [\"{ep}\"]\n",
                    name = w.name,
                    id = w.id,
                    ep = w.sidecar.inbound_addr
                )
            })
            .collect();
        self.write_policy("services.yaml", &docs.join("---\n"));
    }

    /// Waits until every sidecar runs the policy version the directory holds now.
    pub async fn converge(&self) -> String {
        let want = meshgate_policy::load_dir(&self.policy_dir)
            .unwrap_or_else(|e| panic!("test policy invalid: {e}"))
            .version;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let all = self.workloads.values().all(|w| {
                w.sidecar.policy.is_loaded()
                    && w.sidecar.policy.snapshot.load().version() == want
                    && w.sidecar
                        .policy
                        .set
                        .load()
                        .as_ref()
                        .is_some_and(|s| s.version == want)
            });
            if all {
                return want;
            }
            if tokio::time::Instant::now() > deadline {
                let states: Vec<String> = self
                    .workloads
                    .values()
                    .map(|w| {
                        format!(
                            "{}: loaded={} snapshot={} set={:?} error={:?}",
                            w.name,
                            w.sidecar.policy.is_loaded(),
                            w.sidecar.policy.snapshot.load().version(),
                            w.sidecar
                                .policy
                                .set
                                .load()
                                .as_ref()
                                .map(|s| s.version.clone()),
                            w.sidecar.policy.last_error()
                        )
                    })
                    .collect();
                panic!(
                    "sidecars did not converge on policy version {want}:\n{}",
                    states.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A TLS client config presenting a fresh one-hour SVID of workload `name`, accepting only
    /// a server that proves `server`, offering `alpn`: a peer sidecar as the test plays it.
    pub fn client_as(
        &self,
        name: &str,
        server: SpiffeId,
        alpn: &[&[u8]],
    ) -> Arc<rustls::ClientConfig> {
        let now = time::OffsetDateTime::now_utc();
        let svid = self.ca.sign_leaf(
            &Self::id_of(name),
            now - time::Duration::minutes(1),
            now + time::Duration::hours(1),
        );
        super::mesh_client(self.ca.bundle(), &svid, server, alpn)
    }

    /// `from`'s app calls `http://<host>/<path>` through its sidecar's outbound listener.
    pub async fn call(&self, from: &str, method: &str, host: &str, path: &str) -> Answer {
        self.call_with(from, method, host, path, Bytes::new(), &[])
            .await
    }

    pub async fn call_with(
        &self,
        from: &str,
        method: &str,
        host: &str,
        path: &str,
        body: Bytes,
        headers: &[(&str, &str)],
    ) -> Answer {
        let outbound = self.workload(from).sidecar.outbound_addr;
        let tcp = tokio::net::TcpStream::connect(outbound).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        let mut req = http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", host);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = sender
            .send_request(req.body(Full::new(body)).unwrap())
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        Answer {
            status,
            body: String::from_utf8_lossy(&body).into_owned(),
        }
    }

    /// Sum of a workload's metric series named `metric` whose labels contain every `fragment`
    /// (e.g. `decision="deny"`), read from its admin `/metrics` endpoint.
    pub async fn metric(&self, workload: &str, metric: &str, fragments: &[&str]) -> f64 {
        let (status, text) = admin(
            self.workload(workload).sidecar.admin_addr,
            "GET",
            "/metrics",
        )
        .await;
        assert_eq!(status, 200);
        sum_metric(&text, metric, fragments)
    }
}

/// One plain HTTP/1.1 request on a new connection; returns the status.
pub async fn call_plain(addr: SocketAddr, method: &str, host: &str, path: &str) -> u16 {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", host)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let _ = resp.into_body().collect().await;
    status
}

/// One request to an admin endpoint: status and body.
pub async fn admin(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "admin")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Sums the samples of `metric` (exact name) whose label text contains every fragment.
pub fn sum_metric(text: &str, metric: &str, fragments: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(series, _)| {
            let name = series.split('{').next().unwrap_or(series);
            name == metric && fragments.iter().all(|f| series.contains(f))
        })
        .map(|(_, v)| v.parse::<f64>().unwrap())
        .sum::<f64>()
        + 0.0 // an empty sum is -0.0
}

impl Drop for TestMesh {
    fn drop(&mut self) {
        for w in self.workloads.values() {
            w.sidecar.shutdown();
        }
    }
}

/// Shared handle type for tests that spawn callers.
pub type SharedMesh = Arc<TestMesh>;
