//! Flow reports end to end: three real sidecars under a real control plane, traffic allowed
//! (by an explicit rule and by the mesh default) and denied; the aggregated flows arrive at the
//! control plane (`/v1/flows`), and its `meshgate_sli_*` metrics move as traffic and policy
//! change: a policy edit adding an explicit ALLOW raises coverage, denials are counted per
//! caller and callee, a refused update and a quarantine show. `meshgate policy suggest
//! --control-plane` learns a policy from the observed flows.

use std::time::Duration;

use crate::support::mesh::{MESH_ALLOW, TestMesh, admin};
use crate::support::*;

/// Flows are reported this often here (5 s by default).
const REPORT_EVERY: Duration = Duration::from_millis(200);

/// web may GET orders' `/orders/*` (explicitly); nobody may reach payments' `/admin/*`.
const POLICY: &str = r#"apiVersion: meshgate.dev/v1
kind: AuthorizationPolicy
metadata: { name: orders-readers, namespace: shop }
spec:
  selector: { account: orders }
  action: ALLOW
  rules:
    - from: [{ principals: ["spiffe://mesh.local/ns/shop/sa/web"] }]
      to: [{ methods: ["GET"], paths: ["/orders/*"] }]
---
apiVersion: meshgate.dev/v1
kind: AuthorizationPolicy
metadata: { name: payments-admin, namespace: shop }
spec:
  selector: { account: payments }
  action: DENY
  rules:
    - to: [{ paths: ["/admin/*"] }]
"#;

/// The edit: payments explicitly allows web and orders on `/pay/*`.
const PAYMENTS_ALLOW: &str = r#"apiVersion: meshgate.dev/v1
kind: AuthorizationPolicy
metadata: { name: payments-callers, namespace: shop }
spec:
  selector: { account: payments }
  action: ALLOW
  rules:
    - from: [{ principals: ["spiffe://mesh.local/ns/shop/sa/web", "spiffe://mesh.local/ns/shop/sa/orders"] }]
      to: [{ paths: ["/pay/*"] }]
"#;

/// One sample of the control plane's metrics (the sum over series matching `fragments`), or
/// `None` when no series matches.
fn sample(text: &str, metric: &str, fragments: &[&str]) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(metric) else {
            continue;
        };
        if !(rest.starts_with(' ') || rest.starts_with('{')) {
            continue;
        }
        if fragments.iter().all(|f| rest.contains(f)) {
            let v: f64 = rest.rsplit(' ').next().unwrap().parse().unwrap();
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

async fn cp_get(mesh: &TestMesh, path: &str) -> String {
    let addr = mesh.control_plane.as_ref().unwrap().admin_addr;
    let (status, body) = admin(addr, "GET", path).await;
    assert_eq!(status, 200, "{path}: {body}");
    body
}

/// Polls the control plane's `/metrics` until `check` holds (10 s at most).
async fn metrics_until(mesh: &TestMesh, what: &str, check: impl Fn(&str) -> bool) -> String {
    let mut last = String::new();
    for _ in 0..200 {
        last = cp_get(mesh, "/metrics").await;
        if check(&last) {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for: {what}\n{last}");
}

const WEB: &str = "spiffe://mesh.local/ns/shop/sa/web";
const ORDERS: &str = "spiffe://mesh.local/ns/shop/sa/orders";
const PAYMENTS: &str = "spiffe://mesh.local/ns/shop/sa/payments";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flows_reach_the_control_plane_and_move_its_slis() {
    let mut mesh = TestMesh::new().await;
    mesh.write_policy("mesh.yaml", MESH_ALLOW);
    mesh.write_policy("policy.yaml", POLICY);
    mesh.start_control_plane().await;
    // An opaque TCP service behind orders, and web's tunnel to it: L4 decisions make flows too.
    let db = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let db_port = db.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (mut tcp, _) = db.accept().await.unwrap();
            tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                let _ = tcp.write_all(b"220 ready\r\n").await;
            });
        }
    });
    let forward = free_port();
    for name in ["web", "orders", "payments"] {
        let app = crate::support::mesh::EchoApp::start().await;
        mesh.add_configured(name, app, |c| {
            c.flow_report_interval = REPORT_EVERY;
            match name {
                "orders" => c.inbound_tcp_ports = vec![db_port],
                "web" => {
                    c.tcp_forwards = vec![
                        format!("127.0.0.1:{forward}=orders:{db_port}")
                            .parse()
                            .unwrap(),
                    ]
                }
                _ => {}
            }
        })
        .await;
    }
    mesh.write_services();
    mesh.converge().await;

    // Before any traffic there is no coverage to speak of, and nothing drifted once ACKed.
    let text = metrics_until(&mesh, "every sidecar ACKed", |t| {
        sample(t, "meshgate_sli_sidecars_drifted", &[]) == Some(0.0)
    })
    .await;
    assert_eq!(
        sample(&text, "meshgate_sli_policy_coverage_ratio", &[]),
        None
    );
    assert_eq!(sample(&text, "meshgate_sli_stale_sidecars", &[]), Some(0.0));

    // Explicitly allowed: web → orders (twice, two IDs: one flow). By the mesh default:
    // web → payments and orders → payments. Denied: web → payments /admin.
    let calls = [
        ("web", "GET", "orders", "/orders/1", 200),
        ("web", "GET", "orders", "/orders/2", 200),
        ("web", "GET", "payments", "/pay/1", 200),
        ("orders", "GET", "payments", "/pay/2", 200),
        ("web", "GET", "payments", "/admin/users", 403),
    ];
    for (from, method, host, path, want) in calls {
        let got = mesh.call(from, method, host, path).await.status;
        assert_eq!(got, want, "{from} {method} {host}{path}");
    }
    let text = metrics_until(&mesh, "the five requests reported", |t| {
        sample(t, "meshgate_sli_requests_total", &[]) == Some(5.0)
    })
    .await;
    assert_eq!(
        sample(&text, "meshgate_sli_policy_coverage_ratio", &[]),
        Some(0.5),
        "2 of 4 passed requests explicitly allowed\n{text}"
    );
    assert_eq!(
        sample(&text, "meshgate_sli_uncovered_flows", &[]),
        Some(2.0),
        "{text}"
    );
    let web_payments = [
        format!("caller=\"{WEB}\""),
        format!("callee=\"{PAYMENTS}\""),
    ];
    let web_payments: Vec<&str> = web_payments.iter().map(String::as_str).collect();
    assert_eq!(
        sample(
            &text,
            "meshgate_sli_unauthorized_requests_total",
            &web_payments
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "meshgate_sli_unauthorized_requests_total", &[]),
        Some(1.0),
        "only that pair was denied\n{text}"
    );

    // Far below the sidecars' cap: nothing overflowed, and the sidecars export the counter.
    assert_eq!(
        sample(&text, "meshgate_sli_flow_overflow_total", &[]),
        Some(0.0)
    );
    let (_, sidecar_metrics) = admin(
        mesh.workload("payments").sidecar.admin_addr,
        "GET",
        "/metrics",
    )
    .await;
    assert_eq!(
        sample(
            &sidecar_metrics,
            "meshgate_flow_cardinality_overflow_total",
            &[]
        ),
        Some(0.0),
        "{sidecar_metrics}"
    );

    // The flows themselves: aggregated, with path patterns, as decision-log lines.
    let flows: Vec<serde_json::Value> = cp_get(&mesh, "/v1/flows")
        .await
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let find = |peer: &str, workload: &str, path: &str| {
        flows
            .iter()
            .find(|f| {
                f["peer.id"] == peer
                    && f["meshgate.workload.id"] == workload
                    && f["url.path"] == path
            })
            .unwrap_or_else(|| panic!("no flow {peer} → {workload} {path} in {flows:#?}"))
    };
    let explicit = find(WEB, ORDERS, "/orders/*");
    assert_eq!(explicit["count"], 2);
    // Both requests are in the flow's latency buckets, merged over however many reports.
    let buckets: Vec<u64> = serde_json::from_value(explicit["latency.buckets"].clone())
        .unwrap_or_else(|e| panic!("latency buckets: {e}: {explicit}"));
    assert_eq!(buckets.iter().sum::<u64>(), 2, "{explicit}");
    assert_eq!(explicit["decision"], "allow");
    assert_eq!(explicit["policy"], "shop/orders-readers");
    assert_eq!(explicit["event"], "authz.decision");
    assert_eq!(find(WEB, PAYMENTS, "/admin/*")["decision"], "deny");
    assert_eq!(find(ORDERS, PAYMENTS, "/pay/*")["count"], 1);
    assert!(
        flows
            .iter()
            .all(|f| f["url.path"].as_str().unwrap().ends_with('*')),
        "raw paths never leave the sidecar: {flows:#?}"
    );
    let policy_of = |f: &serde_json::Value| f["policy"].clone();
    assert_eq!(
        policy_of(find(WEB, PAYMENTS, "/pay/*")),
        serde_json::Value::Null
    );

    // `policy suggest --control-plane` learns from those flows.
    let admin_url = format!("http://{}", mesh.control_plane.as_ref().unwrap().admin_addr);
    let mut cmd = meshgate();
    cmd.args(["policy", "suggest", "--control-plane", &admin_url]);
    let out = run_async(cmd).await;
    let yaml = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{}", text_of(&out));
    assert!(
        yaml.contains("name: payments-observed"),
        "{}",
        text_of(&out)
    );
    assert!(yaml.contains(ORDERS) && yaml.contains("/pay/*"), "{yaml}");
    assert!(
        !yaml.contains("/admin"),
        "denied requests are not learned: {yaml}"
    );

    // The policy edit: payments' callers become explicit. More traffic to payments now counts
    // as covered, and coverage rises; the denial counter keeps counting.
    mesh.write_policy("payments.yaml", PAYMENTS_ALLOW);
    mesh.converge().await;
    for _ in 0..4 {
        assert_eq!(
            mesh.call("web", "GET", "payments", "/pay/3").await.status,
            200
        );
    }
    assert_eq!(
        mesh.call("web", "GET", "payments", "/admin/x").await.status,
        403
    );
    let text = metrics_until(&mesh, "the next five requests reported", |t| {
        sample(t, "meshgate_sli_requests_total", &[]) == Some(10.0)
    })
    .await;
    let coverage = sample(&text, "meshgate_sli_policy_coverage_ratio", &[]).unwrap();
    assert_eq!(coverage, 0.75, "6 of 8 passed requests explicit\n{text}");
    assert_eq!(
        sample(
            &text,
            "meshgate_sli_unauthorized_requests_total",
            &web_payments
        ),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "meshgate_sli_requests_total",
            &["class=\"explicit\""]
        ),
        Some(6.0)
    );

    // `policy diff --control-plane`: dropping the edit would deny the observed /pay flows.
    let next = mesh.policy_dir.parent().unwrap().join("next");
    std::fs::create_dir_all(&next).unwrap();
    std::fs::write(next.join("mesh.yaml"), MESH_ALLOW).unwrap();
    std::fs::write(next.join("policy.yaml"), POLICY).unwrap();
    std::fs::write(
        next.join("payments.yaml"),
        PAYMENTS_ALLOW.replace(", \"spiffe://mesh.local/ns/shop/sa/orders\"", ""),
    )
    .unwrap();
    let mut cmd = meshgate();
    cmd.args(["policy", "diff"])
        .arg(&mesh.policy_dir)
        .arg(&next)
        .args(["--control-plane", &admin_url]);
    let out = run_async(cmd).await;
    let shown = text_of(&out);
    assert_eq!(out.status.code(), Some(2), "{shown}");
    assert!(
        shown.contains("would start being denied: 1 (1 requests)"),
        "orders → payments /pay/* was seen once\n{shown}"
    );

    // A refused update is counted.
    mesh.write_policy("broken.yaml", "apiVersion: meshgate.dev/v1\nkind: AuthorizationPolicy\nmetadata: { name: x, namespace: shop }\nspec:\n  action: PERMIT\n");
    metrics_until(&mesh, "the refused update counted", |t| {
        sample(
            t,
            "meshgate_sli_refused_updates_total",
            &["by=\"control_plane\""],
        ) == Some(1.0)
    })
    .await;
    std::fs::remove_file(mesh.policy_dir.join("broken.yaml")).unwrap();

    // A quarantine: time to containment appears once every sidecar ACKed it, and web is cut.
    mesh.write_policy(
        "quarantine.yaml",
        &format!("apiVersion: meshgate.dev/v1\nkind: AuthorizationPolicy\nmetadata: {{ name: quarantine-0123456789ab, namespace: meshgate }}\nspec:\n  action: DENY\n  rules:\n    - from: [{{ principals: [\"{WEB}\"] }}]\n"),
    );
    mesh.converge().await;
    let text = metrics_until(&mesh, "containment measured", |t| {
        sample(t, "meshgate_sli_last_containment_seconds", &[]).is_some()
    })
    .await;
    let contained = sample(&text, "meshgate_sli_last_containment_seconds", &[]).unwrap();
    assert!((0.0..10.0).contains(&contained), "{contained}");
    assert_eq!(
        mesh.call("web", "GET", "orders", "/orders/3").await.status,
        403
    );
    let text = metrics_until(&mesh, "the quarantined request reported", |t| {
        sample(
            t,
            "meshgate_sli_unauthorized_requests_total",
            &[&format!("callee=\"{ORDERS}\"")],
        ) == Some(1.0)
    })
    .await;
    assert_eq!(
        sample(&text, "meshgate_sli_sidecars_drifted", &[]),
        Some(0.0),
        "{text}"
    );

    // An L4 tunnel from the quarantined web is refused too, and reported as an L4 flow.
    let mut tunnel = tokio::net::TcpStream::connect(("127.0.0.1", forward))
        .await
        .unwrap();
    let mut greeting = Vec::new();
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read_to_end(&mut tunnel, &mut greeting),
    )
    .await;
    assert!(greeting.is_empty(), "quarantined tunnel got {greeting:?}");
    metrics_until(&mesh, "the refused tunnel reported", |t| {
        sample(
            t,
            "meshgate_sli_unauthorized_requests_total",
            &[&format!("callee=\"{ORDERS}\"")],
        ) == Some(2.0)
    })
    .await;
    let flows = cp_get(&mesh, "/v1/flows").await;
    let l4: Vec<serde_json::Value> = flows
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|f| f["layer"] == "l4")
        .collect();
    assert_eq!(l4.len(), 1, "{flows}");
    assert_eq!(
        (
            &l4[0]["peer.id"],
            &l4[0]["port"],
            &l4[0]["decision"],
            &l4[0]["policy"]
        ),
        (
            &serde_json::json!(WEB),
            &serde_json::json!(db_port),
            &serde_json::json!("deny"),
            &serde_json::json!("meshgate/quarantine-0123456789ab")
        )
    );
}

fn text_of(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// eBPF verdicts on the stream, both ways round: a stream client whose reporter has verdicts
/// (as a sidecar with `--ebpf-cgroup` has) sends them only to a control plane advertising
/// `flow-l3l4`; for one that does not, it does not even take them (the kernel counters keep
/// counting for a later control plane that reads them), while its flow reports go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ebpf_verdicts_go_only_to_control_planes_that_read_them() {
    use meshgate_xds::wire::{Direction, FlowReport, L3L4Flow};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    for features in [
        "flow-reports,flow-latency,flow-l3l4",
        "flow-reports,flow-latency",
    ] {
        let reads_l3l4 = features.contains("flow-l3l4");
        let mesh = TestMesh::new().await;
        mesh.write_policy("mesh.yaml", MESH_ALLOW);
        let (url, lines) = fake_control_plane(&mesh, Some(features)).await;
        let now = time::OffsetDateTime::now_utc();
        let svid = mesh.ca.sign_leaf(
            &id(WEB),
            now - time::Duration::minutes(1),
            now + time::Duration::hours(1),
        );
        let tls = mesh_client(
            mesh.ca.bundle(),
            &svid,
            id("spiffe://mesh.local/ns/meshgate/sa/control-plane"),
            &[b"h2"],
        );
        let taken = Arc::new(AtomicU64::new(0));
        let counter = taken.clone();
        let at = now.unix_timestamp();
        let client = meshgate_xds::client::StreamClient::new(&[url], tls)
            .unwrap()
            .report_flows(meshgate_xds::client::FlowReporter {
                interval: Duration::from_millis(100),
                // One decision over the cap every interval: a report line each time.
                drain: Arc::new(|| (Vec::new(), 1)),
                l3l4: Some(Arc::new(move || {
                    counter.fetch_add(1, Ordering::Relaxed);
                    let refused = L3L4Flow {
                        direction: Direction::Egress,
                        port: 9001,
                        verdict: "denied_egress".into(),
                        count: 1,
                        first_seen: at,
                        last_seen: at,
                    };
                    (vec![refused], 0)
                })),
            });
        let stream = tokio::spawn(client.run(
            |_| Ok(()),
            |_| {},
            Duration::from_millis(100),
            Duration::from_secs(1),
        ));
        // Wait for three intervals' flow reports: the ticks happened, so what is absent is
        // absent because of the features.
        let reports = |lines: &[Vec<u8>]| -> Vec<FlowReport> {
            lines
                .iter()
                .filter_map(|l| serde_json::from_slice::<FlowReport>(l).ok())
                .collect()
        };
        let mut seen = Vec::new();
        for _ in 0..100 {
            seen = lines.lock().unwrap().clone();
            if reports(&seen).iter().filter(|r| r.overflow == 1).count() >= 3 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        stream.abort();
        let got = reports(&seen);
        assert!(
            got.iter().filter(|r| r.overflow == 1).count() >= 3,
            "{features}: flow reports every interval: {got:?}"
        );
        let verdicts: Vec<&L3L4Flow> = got.iter().flat_map(|r| &r.l3l4).collect();
        if reads_l3l4 {
            assert!(
                verdicts
                    .iter()
                    .all(|v| v.port == 9001 && v.verdict == "denied_egress" && v.count == 1),
                "{features}: {verdicts:?}"
            );
            // Each interval's verdicts ride its report (the last one taken may still be in
            // flight).
            assert!(
                !verdicts.is_empty() && verdicts.len() as u64 <= taken.load(Ordering::Relaxed),
                "{features}: {verdicts:?}"
            );
        } else {
            assert_eq!(
                taken.load(Ordering::Relaxed),
                0,
                "{features}: not even read"
            );
            for line in &seen {
                let text = String::from_utf8_lossy(line);
                assert!(!text.contains("l3l4"), "{features}: {text}");
            }
        }
    }
}

/// A stand-in control plane: pushes the policy directory once to the first stream, keeps it
/// open, and records every request-body line. It sends `features` as the feature header: this
/// version's `flow-reports,flow-latency`, `flow-reports` (from before latency on flows), or none
/// (from before flow reports).
async fn fake_control_plane(
    mesh: &TestMesh,
    features: Option<&'static str>,
) -> (String, std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>) {
    use http_body_util::{BodyExt, StreamBody};
    use hyper::body::Frame;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use std::sync::{Arc, Mutex};

    let now = time::OffsetDateTime::now_utc();
    let svid = mesh.ca.sign_leaf(
        &meshgate_ca::SpiffeId::parse("spiffe://mesh.local/ns/meshgate/sa/control-plane").unwrap(),
        now - time::Duration::minutes(1),
        now + time::Duration::hours(1),
    );
    let key = rustls_pki_types::PrivatePkcs8KeyDer::from(svid.key.serialize_der());
    let mut config = rustls::ServerConfig::builder_with_provider(meshgate_ca::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(svid.chain, key.into())
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    let lines = Arc::new(Mutex::new(Vec::new()));
    let set = meshgate_policy::load_dir(&mesh.policy_dir).unwrap();
    let (recorded, keep) = (lines.clone(), Arc::new(Mutex::new(Vec::new())));
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let Ok(tls) = acceptor.accept(tcp).await else {
                continue;
            };
            let (recorded, keep, set) = (recorded.clone(), keep.clone(), set.clone());
            let service =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let (recorded, keep, set) = (recorded.clone(), keep.clone(), set.clone());
                    async move {
                        tokio::spawn(async move {
                            let mut body = req.into_body();
                            let mut buffer = meshgate_xds::wire::LineBuffer::default();
                            while let Some(Ok(frame)) = body.frame().await {
                                if let Some(data) = frame.data_ref() {
                                    let batch = buffer.push(data, 1 << 20).unwrap();
                                    recorded.lock().unwrap().extend(batch);
                                }
                            }
                        });
                        let (tx, mut rx) = tokio::sync::mpsc::channel::<
                            Result<Frame<bytes::Bytes>, std::convert::Infallible>,
                        >(4);
                        let mut push =
                            serde_json::to_vec(&meshgate_xds::wire::Push::new(set, "n1".into()))
                                .unwrap();
                        push.push(b'\n');
                        tx.send(Ok(Frame::data(push.into()))).await.unwrap();
                        keep.lock().unwrap().push(tx);
                        let body = StreamBody::new(futures_util::stream::poll_fn(move |cx| {
                            rx.poll_recv(cx)
                        }));
                        let mut resp = http::Response::builder()
                            .header("content-type", "application/x-ndjson");
                        if let Some(features) = features {
                            resp = resp.header("x-meshgate-stream-features", features);
                        }
                        Ok::<_, std::convert::Infallible>(resp.body(body.boxed_unsync()).unwrap())
                    }
                });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (url, lines)
}

/// Compatibility both ways round: a control plane that does not advertise flow reports (one
/// from before them) receives ACKs only, never a line it would not understand; one that does
/// receives the reports, from the same traffic — with latency buckets only when it also says
/// it reads them (an older one refuses flows with fields it does not know).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flow_reports_go_only_to_control_planes_that_read_them() {
    for features in [
        Some("flow-reports,flow-latency"),
        Some("flow-reports"),
        None,
    ] {
        let advertise = features.is_some();
        let latency = features.is_some_and(|f| f.contains("flow-latency"));
        let mut mesh = TestMesh::new().await;
        mesh.write_policy("mesh.yaml", MESH_ALLOW);
        let (url, lines) = fake_control_plane(&mesh, features).await;
        let app = crate::support::mesh::EchoApp::start().await;
        mesh.add_configured("orders", app, |c| {
            c.policy = meshgate_proxy::policy::PolicySource::ControlPlane { urls: vec![url] };
            c.flow_report_interval = Duration::from_millis(100);
        })
        .await;
        mesh.add("web").await;
        mesh.write_services();
        let mut status = 0;
        for _ in 0..100 {
            status = mesh.call("web", "GET", "orders", "/orders/1").await.status;
            if status == 200 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(status, 200, "orders never applied the pushed policy");
        // Five report intervals after the request: a reader of reports has one by then.
        let mut reports = Vec::new();
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let seen = lines.lock().unwrap().clone();
            reports = seen
                .iter()
                .filter_map(|l| serde_json::from_slice::<meshgate_xds::wire::FlowReport>(l).ok())
                .collect::<Vec<_>>();
            if advertise && !reports.is_empty() {
                break;
            }
        }
        let seen = lines.lock().unwrap().clone();
        assert!(
            seen.iter()
                .any(|l| serde_json::from_slice::<meshgate_xds::wire::Ack>(l).is_ok()),
            "the push is ACKed either way"
        );
        if advertise {
            let flows: Vec<_> = reports.iter().flat_map(|r| &r.flows).collect();
            assert!(
                flows
                    .iter()
                    .any(|f| f.path.as_deref() == Some("/orders/*") && f.peer == WEB),
                "{flows:?}"
            );
            // With flow-latency: every request in a bucket; without: no field an older control
            // plane would refuse.
            for f in &flows {
                let buckets: u64 = f.latency.iter().sum();
                assert_eq!(
                    buckets,
                    if latency { f.count } else { 0 },
                    "{features:?}: {f:?}"
                );
            }
            for line in &seen {
                let text = String::from_utf8_lossy(line);
                assert_eq!(
                    text.contains("latency.buckets"),
                    latency && text.contains("FlowReport") && text.contains("/orders/*"),
                    "{features:?}: {text}"
                );
            }
        } else {
            for line in &seen {
                assert!(
                    serde_json::from_slice::<meshgate_xds::wire::Ack>(line).is_ok(),
                    "an old control plane got a line it cannot read: {}",
                    String::from_utf8_lossy(line)
                );
            }
        }
    }
}

/// The live tap of `/v1/console/tap` (what the console's "Live tap" panel and `meshgate tap`
/// poll) on a real mesh: while nobody polls, decisions produce no tap event anywhere; once
/// polled, an individual denied request, with its raw path, arrives within 2 s and the filters
/// select it or not; a sidecar that does not offer the tap (an older version) is never sent a
/// tap request, which would end its stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tap_streams_individual_decisions_only_while_polled() {
    let mut mesh = TestMesh::new().await;
    mesh.write_policy("mesh.yaml", MESH_ALLOW);
    mesh.write_policy("policy.yaml", POLICY);
    mesh.start_control_plane().await;
    for name in ["web", "orders", "payments"] {
        let app = crate::support::mesh::EchoApp::start().await;
        mesh.add_configured(name, app, |c| c.flow_report_interval = REPORT_EVERY)
            .await;
    }
    mesh.write_services();
    mesh.converge().await;

    // An older sidecar's stream: a client that does not offer the tap.
    let cp = mesh.control_plane.as_ref().unwrap();
    let now = time::OffsetDateTime::now_utc();
    let hour = time::Duration::hours(1);
    let legacy_id = TestMesh::id_of("legacy");
    let legacy_svid = mesh.ca.sign_leaf(&legacy_id, now - hour, now + hour);
    let config = crate::support::mesh_client(
        mesh.ca.bundle(),
        &legacy_svid,
        meshgate_ca::SpiffeId::parse("spiffe://mesh.local/ns/meshgate/sa/control-plane").unwrap(),
        &[b"h2"],
    );
    let client =
        meshgate_xds::client::StreamClient::new(&[format!("https://{}", cp.addr)], config).unwrap();
    let legacy_events = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let log = legacy_events.clone();
    let legacy = tokio::spawn(client.run(
        |_| Ok(()),
        move |e| log.lock().unwrap().push(format!("{e:?}")),
        Duration::from_millis(100),
        Duration::from_millis(200),
    ));

    // Nobody polls the tap: the decisions are made and reported as flows, and no tap event
    // exists anywhere.
    for (path, want) in [("/pay/1", 200), ("/admin/users/1", 403)] {
        assert_eq!(mesh.call("web", "GET", "payments", path).await.status, want);
    }
    let text = metrics_until(&mesh, "the two requests reported as flows", |t| {
        sample(t, "meshgate_sli_requests_total", &[]) == Some(2.0)
    })
    .await;
    assert_eq!(
        sample(&text, "meshgate_console_tap_events_total", &[]),
        Some(0.0),
        "{text}"
    );
    assert_eq!(sample(&text, "meshgate_console_tap_active", &[]), Some(0.0));
    for name in ["web", "orders", "payments"] {
        assert_eq!(
            mesh.metric(name, "meshgate_tap_events_total", &[]).await,
            0.0,
            "{name} tapped while nobody looked"
        );
    }

    let tap = |query: String| {
        let mesh = &mesh;
        async move {
            let text = cp_get(mesh, &format!("/v1/console/tap?{query}")).await;
            serde_json::from_str::<serde_json::Value>(&text).unwrap()
        }
    };
    let paths = |v: &serde_json::Value| -> Vec<String> {
        v["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["url.path"].as_str().unwrap_or_default().to_string())
            .collect()
    };

    // A viewer polls: the tap starts. Allowed probes until one comes back show that payments'
    // sidecar is tapping (the request is sent at once, but on its own stream).
    let first = tap(String::new()).await;
    assert_eq!(first["active"], true, "{first}");
    assert_eq!(first["sidecars"]["tapping"], 3, "{first}");
    assert_eq!(
        first["sidecars"]["without_tap"], 1,
        "the legacy stream: {first}"
    );
    let started = std::time::Instant::now();
    let mut probe = 0;
    let since = loop {
        probe += 1;
        let path = format!("/pay/probe-{probe}");
        assert_eq!(mesh.call("web", "GET", "payments", &path).await.status, 200);
        let v = tap(String::new()).await;
        if paths(&v).contains(&path) {
            break v["seq"].as_u64().unwrap();
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the tap never started: {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    // A denied request, one of its kind: there within 2 s, with its raw path (flows only ever
    // carry the pattern `/admin/*`).
    let started = std::time::Instant::now();
    assert_eq!(
        mesh.call("web", "GET", "payments", "/admin/users/42")
            .await
            .status,
        403
    );
    let event = loop {
        let v = tap(format!("since={since}&decision=deny")).await;
        let found = v["events"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["url.path"] == "/admin/users/42")
            .cloned();
        if let Some(event) = found {
            break event;
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "the denied request is not in the tap after 2 s: {v}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for (field, want) in [
        ("decision", "deny"),
        ("peer.id", WEB),
        ("meshgate.workload.id", PAYMENTS),
        ("http.request.method", "GET"),
        ("policy", "shop/payments-admin"),
    ] {
        assert_eq!(event[field], want, "{field}: {event}");
    }
    assert_eq!(event["http.response.status_code"], 403, "{event}");
    assert!(event["latency_us"].as_u64().is_some(), "{event}");

    // The filters, applied by the control plane: only what each asks for.
    let denied = "/admin/users/42".to_string();
    for (query, shown) in [
        (format!("since={since}"), true),
        (format!("since={since}&decision=allow"), false),
        (format!("since={since}&decision=deny"), true),
        (format!("since={since}&workload={WEB}"), true),
        (
            format!("since={since}&workload={PAYMENTS}&decision=deny"),
            true,
        ),
        (format!("since={since}&workload={ORDERS}"), false),
    ] {
        let v = tap(query.clone()).await;
        assert_eq!(paths(&v).contains(&denied), shown, "{query}: {v}");
        if query.contains("decision=allow") {
            assert!(
                v["events"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|e| e["decision"] == "allow"),
                "{v}"
            );
        }
    }
    // Wrong parameters are refused with what to give instead.
    let admin_addr = mesh.control_plane.as_ref().unwrap().admin_addr;
    for (query, words) in [
        ("decision=nope", "not one of allow, deny"),
        ("workload=web", "is not a SPIFFE ID"),
        ("since=x", "is not a number"),
    ] {
        let (status, body) = admin(admin_addr, "GET", &format!("/v1/console/tap?{query}")).await;
        assert_eq!(status, 400, "{query}: {body}");
        assert!(body.contains(words), "{query}: {body}");
    }

    // Counted on both sides.
    let text = cp_get(&mesh, "/metrics").await;
    assert!(
        sample(&text, "meshgate_console_tap_events_total", &[]).unwrap() >= 2.0,
        "{text}"
    );
    assert_eq!(sample(&text, "meshgate_console_tap_active", &[]), Some(1.0));
    assert!(
        mesh.metric(
            "payments",
            "meshgate_tap_events_total",
            &["result=\"sent\""]
        )
        .await
            >= 2.0
    );

    // `meshgate tap`, as `linkerd viz tap` users expect: denied decisions as JSON lines. It
    // streams what happens after it starts, so denied requests are made until it has one.
    let admin_url = format!("http://{admin_addr}");
    // `--duration` bounds it should this test fail before it exits.
    let child = meshgate()
        .args([
            "tap",
            "--control-plane",
            &admin_url,
            "--decision",
            "deny",
            "--workload",
            WEB,
            "--count",
            "1",
            "--duration",
            "20s",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let output = tokio::task::spawn_blocking(move || child.wait_with_output());
    let started = std::time::Instant::now();
    while !output.is_finished() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "meshgate tap printed no denial in 10 s"
        );
        mesh.call("web", "GET", "orders", "/orders/x/allowed").await;
        mesh.call("web", "GET", "payments", "/admin/cli").await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let out = output.await.unwrap().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", text_of(&out));
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(lines.len(), 1, "{stdout}");
    assert_eq!(
        (
            &lines[0]["decision"],
            &lines[0]["url.path"],
            &lines[0]["peer.id"]
        ),
        (
            &serde_json::json!("deny"),
            &serde_json::json!("/admin/cli"),
            &serde_json::json!(WEB)
        ),
        "{stdout}"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("tapping 3 sidecar(s)"),
        "{}",
        text_of(&out)
    );

    // Over the rate: bursts of 100 concurrent requests at payments (the sidecars are asked for
    // 50 a second) until payments' sidecar drops some. Every decision a sidecar tapped is then
    // accounted for at the control plane: sent ones kept (or dropped there), dropped ones
    // reported (sidecars report their drops once a second).
    tap(String::new()).await;
    let started = std::time::Instant::now();
    loop {
        let burst = (0..100).map(|_| mesh.call("web", "GET", "payments", "/pay/burst"));
        futures_util::future::join_all(burst).await;
        let dropped = mesh
            .metric(
                "payments",
                "meshgate_tap_events_total",
                &["result=\"dropped\""],
            )
            .await;
        if dropped > 0.0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "bursts of 100 requests never went over the tap's 50/s"
        );
    }
    let started = std::time::Instant::now();
    loop {
        let (mut sent, mut dropped) = (0.0, 0.0);
        for name in ["web", "orders", "payments"] {
            sent += mesh
                .metric(name, "meshgate_tap_events_total", &["result=\"sent\""])
                .await;
            dropped += mesh
                .metric(name, "meshgate_tap_events_total", &["result=\"dropped\""])
                .await;
        }
        let text = cp_get(&mesh, "/metrics").await;
        let kept = sample(&text, "meshgate_console_tap_events_total", &[]).unwrap();
        let reported = sample(&text, "meshgate_console_tap_dropped_total", &["sidecar"]).unwrap();
        let cut = sample(
            &text,
            "meshgate_console_tap_dropped_total",
            &["control_plane"],
        )
        .unwrap();
        if kept + cut == sent && reported == dropped {
            assert!(kept <= sent);
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "sidecars sent {sent} and dropped {dropped}; the control plane kept {kept}, cut {cut} and heard of {reported} dropped"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The older sidecar was never sent a tap request: its first stream is still open (a tap
    // request would have been an undecodable push and ended it), and it is listed as such.
    let log = legacy_events.lock().unwrap().clone();
    assert!(
        log.len() == 1 && log[0].starts_with("Connected"),
        "the legacy stream was interrupted: {log:?}"
    );
    let status = mesh.cp_status().await;
    let legacy_status = status["sidecars"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == legacy_id.as_str())
        .unwrap_or_else(|| panic!("{status}"))
        .clone();
    assert_eq!(
        (&legacy_status["connected"], &legacy_status["tap"]),
        (&serde_json::json!(true), &serde_json::json!(false)),
        "{legacy_status}"
    );
    legacy.abort();
}
