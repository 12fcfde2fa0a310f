//! Several app ports behind one sidecar, and kubelet probes of every kind through the plaintext
//! probe listener — with real sidecars, real apps, a real TCP listener and a real gRPC health
//! server.
//!
//! - The caller's sidecar names the app port it addressed (`x-meshgate-app-port`, only for
//!   ports the Service declares); the callee's sidecar routes to that `--app` and judges the
//!   request for that port (policy `ports`); an app port it does not serve is refused (421).
//! - A caller's app cannot choose the port by sending the header itself: its sidecar drops it.
//! - `/meshgate/probe/tcp/<port>` and `/meshgate/probe/grpc/<port>` check only the ports enabled
//!   by `--probe-tcp` / `--probe-grpc` (anything else is 404).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshgate_policy::DecisionKind;
use prost::Message;

use crate::support::mesh::{EchoApp, TestMesh, admin};
use crate::support::recorder::RecordingApp;

/// A port nothing listens on (bound, then released).
async fn closed_port() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap().port()
}

/// One call from web's app to orders.
struct Case<'a> {
    host: &'a str,
    path: &'a str,
    /// Headers the calling app adds.
    headers: Vec<(&'a str, &'a str)>,
    status: u16,
    /// The app behind orders' sidecar that must see the request (the other must not).
    reached: Option<&'a RecordingApp>,
    /// The port the decision was made for.
    port: u16,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_sidecar_serves_every_app_port_each_judged_for_its_own_port() {
    let mut mesh = TestMesh::new().await;
    let (a, b) = (RecordingApp::start().await, RecordingApp::start().await);
    let (pa, pb) = (a.addr.port(), b.addr.port());
    // Declared by the Service, served by no --app: a misconfiguration the callee refuses.
    let unserved = closed_port().await;
    mesh.add("web").await;
    let apps = vec![a.addr, b.addr];
    mesh.add_configured("orders", EchoApp { addr: a.addr }, move |config| {
        config.apps = apps;
    })
    .await;
    let orders = mesh.workload("orders");
    mesh.write_policy(
        "services.yaml",
        &format!(
            "apiVersion: meshgate.dev/v1\nkind: Service\nmetadata: {{ name: orders, namespace: shop }}\nspec:\n  identity: {}\n  hosts: [orders]\n  ports: [{{ port: {pa} }}, {{ port: {pb}, protocol: http }}, {{ port: {unserved} }}, {{ port: 80, targetPort: {pb} }}]\n  endpoints: [\"{}\"]\n",
            orders.id, orders.sidecar.inbound_addr
        ),
    );
    // The whole of app A; only /open/* of app B.
    mesh.write_policy(
        "orders.yaml",
        &format!(
            r#"apiVersion: meshgate.dev/v1
kind: AuthorizationPolicy
metadata: {{ name: orders-ports, namespace: shop }}
spec:
  selector: {{ account: orders }}
  action: ALLOW
  rules:
    - from: [{{ principals: ["spiffe://mesh.local/ns/shop/sa/web"] }}]
      to: [{{ ports: [{pa}] }}, {{ paths: ["/open/*"], ports: [{pb}] }}]
"#
        ),
    );
    mesh.converge().await;
    let mut decisions = mesh.workload("orders").sidecar.decisions();

    let (smuggle_a, smuggle_b) = (pa.to_string(), pb.to_string());
    let (a_port, b_port) = (format!("orders:{pa}"), format!("orders:{pb}"));
    let unserved_port = format!("orders:{unserved}");
    // The smuggled headers are what the caller's *app* adds; `port` is the port judged.
    let cases = [
        Case {
            host: &a_port,
            path: "/a",
            headers: vec![],
            status: 200,
            reached: Some(&a),
            port: pa,
        },
        Case {
            host: &b_port,
            path: "/open/b",
            headers: vec![],
            status: 200,
            reached: Some(&b),
            port: pb,
        },
        // B's other paths are not allowed on B's port, though they are on A's.
        Case {
            host: &b_port,
            path: "/b",
            headers: vec![],
            status: 403,
            reached: None,
            port: pb,
        },
        // A Service port in front of another app port (Kubernetes `port: 80, targetPort`): the
        // callee is asked for the target, and judges it.
        Case {
            host: "orders:80",
            path: "/open/b",
            headers: vec![],
            status: 200,
            reached: Some(&b),
            port: pb,
        },
        // No port: the default (first) app.
        Case {
            host: "orders",
            path: "/a",
            headers: vec![],
            status: 200,
            reached: Some(&a),
            port: pa,
        },
        // A port the Service does not declare is not named: the default app.
        Case {
            host: "orders:1",
            path: "/a",
            headers: vec![],
            status: 200,
            reached: Some(&a),
            port: pa,
        },
        // The caller's app cannot pick the port: its sidecar drops the header and names the
        // port the app really addressed (or none).
        Case {
            host: &b_port,
            path: "/b",
            headers: vec![("x-meshgate-app-port", &smuggle_a)],
            status: 403,
            reached: None,
            port: pb,
        },
        Case {
            host: &a_port,
            path: "/open/a",
            headers: vec![("x-meshgate-app-port", &smuggle_b)],
            status: 200,
            reached: Some(&a),
            port: pa,
        },
        Case {
            host: "orders",
            path: "/open/a",
            headers: vec![("X-Meshgate-App-Port", &smuggle_b)],
            status: 200,
            reached: Some(&a),
            port: pa,
        },
        // Another spelling is not read as the port either (the callee strips it as reserved).
        Case {
            host: "orders",
            path: "/open/a",
            headers: vec![("x_meshgate_app_port", &smuggle_b)],
            status: 200,
            reached: Some(&a),
            port: pa,
        },
        // Declared but served by no --app: refused by the callee, the apps see nothing.
        Case {
            host: &unserved_port,
            path: "/a",
            headers: vec![],
            status: 421,
            reached: None,
            port: unserved,
        },
    ];
    for Case {
        host,
        path,
        headers,
        status,
        reached,
        port,
    } in cases
    {
        a.clear();
        b.clear();
        let case = format!("Host {host} {path} {headers:?}");
        let answer = mesh
            .call_with("web", "GET", host, path, Bytes::new(), &headers)
            .await;
        assert_eq!(answer.status, status, "{case}: {}", answer.body);
        for app in [&a, &b] {
            let seen = app.requests();
            let want = reached.is_some_and(|r| r.addr == app.addr);
            assert_eq!(
                seen.len(),
                usize::from(want),
                "{case}: app {}: {seen:?}",
                app.addr
            );
            for request in &seen {
                assert_eq!(request.path, path, "{case}");
                // The apps never see the port header, in any spelling.
                assert!(
                    request
                        .headers
                        .iter()
                        .all(|(k, _)| !k.replace('_', "-").contains("meshgate-app-port")),
                    "{case}: {:?}",
                    request.headers
                );
            }
        }
        // The decision (and so policy `ports`) was made for the app port the request was for.
        let record = decisions
            .try_recv()
            .unwrap_or_else(|e| panic!("{case}: {e}"));
        assert_eq!(record.port, port, "{case}: {record:?}");
        let kind = match status {
            200 => DecisionKind::Allow,
            403 => DecisionKind::Deny,
            _ => DecisionKind::BadRequest,
        };
        assert_eq!(record.decision, kind, "{case}: {record:?}");
        assert!(
            decisions.try_recv().is_err(),
            "{case}: one decision per request"
        );
    }
    let hygiene = |reason: &'static str| {
        let mesh = &mesh;
        async move {
            mesh.metric(
                "orders",
                "meshgate_inbound_hygiene_total",
                &[&format!("reason=\"{reason}\"")],
            )
            .await
        }
    };
    assert_eq!(hygiene("unknown_app_port").await, 1.0);
    // Only the odd spelling reached the callee (and was stripped there): the caller's sidecar
    // had already dropped the exact names.
    assert_eq!(hygiene("identity_header").await, 1.0);
}

// ------------------------------------------------------------------------------------------
// Probes

#[derive(Clone, PartialEq, prost::Message)]
struct HealthCheckRequest {
    #[prost(string, tag = "1")]
    service: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct HealthCheckResponse {
    #[prost(int32, tag = "1")]
    status: i32,
}

const SERVING: i32 = 1;
const NOT_SERVING: i32 = 2;

/// A gRPC server implementing `grpc.health.v1.Health/Check` from a table: service → status;
/// services not in it get `NOT_FOUND`, as the reference implementations answer.
struct HealthServer {
    port: u16,
    statuses: Arc<Mutex<HashMap<String, i32>>>,
}

type GrpcBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

impl HealthServer {
    async fn start(statuses: &[(&str, i32)]) -> Self {
        let statuses: Arc<Mutex<HashMap<String, i32>>> = Arc::new(Mutex::new(
            statuses.iter().map(|(s, v)| (s.to_string(), *v)).collect(),
        ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let table = statuses.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let table = table.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let table = table.clone();
                        async move { Ok::<_, std::convert::Infallible>(check(req, &table).await) }
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        Self { port, statuses }
    }

    fn set(&self, service: &str, status: i32) {
        self.statuses
            .lock()
            .unwrap()
            .insert(service.to_string(), status);
    }
}

async fn check(
    req: http::Request<Incoming>,
    table: &Mutex<HashMap<String, i32>>,
) -> http::Response<GrpcBody> {
    let trailers_only = |code: &str, message: &str| {
        http::Response::builder()
            .header("content-type", "application/grpc")
            .header("grpc-status", code)
            .header("grpc-message", message)
            .body(
                Full::new(Bytes::new())
                    .map_err(|never| match never {})
                    .boxed(),
            )
            .unwrap()
    };
    if req.uri().path() != "/grpc.health.v1.Health/Check" {
        return trailers_only("12", "unknown method");
    }
    let body = req.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body[0], 0, "uncompressed");
    let len = u32::from_be_bytes(body[1..5].try_into().unwrap()) as usize;
    assert_eq!(body.len(), 5 + len, "one whole message");
    let request = HealthCheckRequest::decode(&body[5..]).expect("a HealthCheckRequest");
    let Some(status) = table.lock().unwrap().get(&request.service).copied() else {
        return trailers_only("5", "unknown service");
    };
    let message = HealthCheckResponse { status }.encode_to_vec();
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(&message);
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", "0".parse().unwrap());
    let frames = vec![
        Ok::<_, std::io::Error>(Frame::data(Bytes::from(framed))),
        Ok(Frame::trailers(trailers)),
    ];
    http::Response::builder()
        .header("content-type", "application/grpc")
        .body(StreamBody::new(futures_util::stream::iter(frames)).boxed())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubelet_probes_of_every_kind_pass_through_the_probe_listener() {
    let mut mesh = TestMesh::new().await;
    // A TCP app that is up (the kernel completes connects from the backlog), one that is down.
    let up = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up_port = up.local_addr().unwrap().port();
    let down_port = closed_port().await;
    let health = HealthServer::start(&[
        ("", SERVING),
        ("shop.Orders", SERVING),
        ("shop.Down", NOT_SERVING),
    ])
    .await;
    // Accepts, never answers: a port that is open but does not speak gRPC.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let (tcp_ports, grpc_ports) = (vec![up_port, down_port], vec![health.port, silent_port]);
    // A second app port with an HTTP probe of its own (the harness gives the default app
    // `--probe-path /healthz`).
    let second = RecordingApp::start().await;
    let sp = second.addr.port();
    let second_addr = second.addr;
    mesh.add_configured("orders", EchoApp::start().await, move |config| {
        config.apps.push(second_addr);
        config.probe_paths.push(format!("{sp}:/ready"));
        config.probe_tcp = tcp_ports;
        config.probe_grpc = grpc_ports;
    })
    .await;
    let sidecar = &mesh.workload("orders").sidecar;
    let probes = sidecar.probe_addr.expect("probe listener bound");
    let admin_port = sidecar.admin_addr.port();
    let g = health.port;

    for (path, status, says) in [
        (format!("/meshgate/probe/tcp/{up_port}"), 200, "connected"),
        (
            format!("/meshgate/probe/tcp/{up_port}?timeout=3"),
            200,
            "connected",
        ),
        (format!("/meshgate/probe/tcp/{down_port}"), 503, "refused"),
        (format!("/meshgate/probe/grpc/{g}"), 200, "SERVING"),
        (
            format!("/meshgate/probe/grpc/{g}?service=shop.Orders"),
            200,
            "SERVING",
        ),
        (
            format!("/meshgate/probe/grpc/{g}?service=shop.Orders&timeout=5"),
            200,
            "SERVING",
        ),
        (
            format!("/meshgate/probe/grpc/{g}?service=shop.Down"),
            503,
            "NOT_SERVING",
        ),
        (
            format!("/meshgate/probe/grpc/{g}?service=shop.Nope"),
            503,
            "NOT_FOUND",
        ),
        // Misspelt parameters are refused, not ignored (that would check the whole server).
        (
            format!("/meshgate/probe/grpc/{g}?servce=shop.Down"),
            400,
            "unknown probe parameter",
        ),
        (
            format!("/meshgate/probe/tcp/{up_port}?timeout=0"),
            400,
            "timeout=0",
        ),
        // Ports not enabled by their own flag: never connected to.
        (format!("/meshgate/probe/tcp/{g}"), 404, "--probe-tcp"),
        (
            format!("/meshgate/probe/grpc/{up_port}"),
            404,
            "--probe-grpc",
        ),
        (
            format!("/meshgate/probe/tcp/{admin_port}"),
            404,
            "--probe-tcp",
        ),
        ("/meshgate/probe/tcp/22".to_string(), 404, "--probe-tcp"),
        (
            "/meshgate/probe/http/80".to_string(),
            404,
            "not a configured probe path",
        ),
        // httpGet probes: each path on the app it was given for.
        ("/healthz".to_string(), 200, "/healthz"),
        (format!("/meshgate/probe/http/{sp}/ready?deep=1"), 200, ""),
        (
            format!("/meshgate/probe/http/{sp}/healthz"),
            404,
            "not a configured probe path",
        ),
        ("/ready".to_string(), 404, "not a configured probe path"),
    ] {
        let (got, body) = admin(probes, "GET", &path).await;
        assert_eq!(got, status, "{path}: {body}");
        assert!(body.contains(says), "{path}: {body}");
    }

    let seen = second.requests();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].path, "/ready?deep=1");
    assert_eq!(seen[0].header("user-agent"), vec!["meshgate-probe"]);

    // An open port that does not answer gRPC fails within the probe's timeout (1 s default).
    let started = Instant::now();
    let (got, body) = admin(
        probes,
        "GET",
        &format!("/meshgate/probe/grpc/{silent_port}"),
    )
    .await;
    assert_eq!(got, 503, "{body}");
    assert!(body.contains("within 1s"), "{body}");
    let took = started.elapsed();
    assert!(
        (Duration::from_millis(900)..Duration::from_secs(3)).contains(&took),
        "{took:?}"
    );

    // Health follows the apps: the gRPC server stops serving, the TCP app goes away.
    health.set("", NOT_SERVING);
    drop(up);
    for (path, says) in [
        (format!("/meshgate/probe/grpc/{g}"), "NOT_SERVING"),
        (format!("/meshgate/probe/tcp/{up_port}"), "refused"),
    ] {
        let (got, body) = admin(probes, "GET", &path).await;
        assert_eq!(got, 503, "{path}: {body}");
        assert!(body.contains(says), "{path}: {body}");
    }
    drop(silent);
}

/// The CLI refuses app lists the inbound could not route (before anything starts), naming the
/// fix.
#[test]
fn app_lists_the_inbound_cannot_route_are_refused() {
    use crate::support::{meshgate, run, text};
    for (extra, says) in [
        (
            &["--app", "127.0.0.1:8080", "--app", "127.0.0.2:8080"][..],
            "share port 8080: the calling sidecar names an app by its port alone",
        ),
        (
            &[
                "--app",
                "127.0.0.1:8080",
                "--app",
                "127.0.0.1:9090",
                "--inbound-tcp-port",
                "9090",
            ][..],
            "--inbound-tcp-port 9090 is also an --app port",
        ),
    ] {
        let mut cmd = meshgate();
        cmd.arg("proxy")
            .args(extra)
            .args(["--ca", "https://127.0.0.1:9", "--ca-bundle", "/nonexistent"])
            .args(["--policy-dir", "/nonexistent"]);
        let out = run(&mut cmd);
        assert!(!out.status.success(), "{extra:?} started: {}", text(&out));
        assert!(text(&out).contains(says), "{extra:?}: {}", text(&out));
    }
}

/// A peer holding a valid SVID can send `x-meshgate-app-port` itself (it talks to the mTLS port
/// directly): a malformed or repeated one is refused (400, counted); a well-formed one only picks
/// an app (here the only one), and the app never sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_naming_the_app_port_itself_gets_nothing_more() {
    let t = crate::support::attack::Target::start().await;
    for (headers, status) in [
        ("x-meshgate-app-port: 7070\r\n", 200),
        ("x-meshgate-app-port: 7070x\r\n", 400),
        ("x-meshgate-app-port: 0\r\n", 400),
        (
            "x-meshgate-app-port: 7070\r\nx-meshgate-app-port: 7071\r\n",
            400,
        ),
    ] {
        t.app.clear();
        let got = t
            .raw_h1(&format!("GET /x HTTP/1.1\r\nHost: orders\r\n{headers}\r\n"))
            .await;
        assert_eq!(got, status, "{headers:?}");
        let seen = t.app.requests();
        assert_eq!(
            seen.len(),
            usize::from(status == 200),
            "{headers:?}: {seen:?}"
        );
        for request in &seen {
            assert!(
                request.header("x-meshgate-app-port").is_empty(),
                "{request:?}"
            );
        }
    }
    assert_eq!(t.hygiene("bad_app_port").await, 3.0);
    // The well-formed one was consumed as routing, not counted as a forged identity header.
    assert_eq!(t.hygiene("identity_header").await, 0.0);
}

/// A workload that listens nowhere (a load generator, a batch job) gets a sidecar without any
/// `--app`: its calls go out through the mesh as usual, and its inbound refuses every request
/// with 421 before authorization, so nothing is forwarded to a port nobody serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbound_only_sidecar_calls_out_and_serves_nothing() {
    let mut mesh = TestMesh::new().await;
    let app = RecordingApp::start().await;
    mesh.add_configured("loadgen", EchoApp { addr: app.addr }, |config| {
        config.apps = Vec::new();
        config.probe_paths = Vec::new();
    })
    .await;
    mesh.add("orders").await;
    mesh.write_services();
    mesh.write_policy(
        "allow.yaml",
        r#"apiVersion: meshgate.dev/v1
kind: AuthorizationPolicy
metadata: { name: everyone, namespace: shop }
spec:
  action: ALLOW
  rules:
    - from: [{ principals: ["spiffe://mesh.local/ns/shop/sa/loadgen", "spiffe://mesh.local/ns/shop/sa/orders"] }]
"#,
    );
    mesh.converge().await;
    let out = mesh.call("loadgen", "GET", "orders", "/orders/1").await;
    assert_eq!(out.status, 200, "{}", out.body);
    assert_eq!(
        out.echoed()["headers"]["x-meshgate-peer"],
        "spiffe://mesh.local/ns/shop/sa/loadgen"
    );
    let back = mesh.call("orders", "GET", "loadgen", "/anything").await;
    assert_eq!(back.status, 421, "{}", back.body);
    assert!(back.body.contains("no app"), "{}", back.body);
    assert!(
        app.requests().is_empty(),
        "nothing may reach a port the outbound-only sidecar does not serve"
    );
}
