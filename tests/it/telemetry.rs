//! OpenTelemetry traces through real sidecars, received by a real OTLP/HTTP receiver: span names
//! and attributes, one trace across web → orders → payments with correct parent/child links, a
//! new trace when the caller sends none, denials always exported even when sampling drops
//! everything else, and the export counters.

use std::time::Duration;

use crate::support::mesh::TestMesh;
use crate::support::otlp::{OtlpReceiver, ReceivedSpan};
use meshgate_proxy::telemetry::{SamplerChoice, TelemetryConfig};

const POLICIES: &str = r#"
apiVersion: meshgate.dev/v1
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
metadata: { name: payments-chargers, namespace: shop }
spec:
  selector: { account: payments }
  action: ALLOW
  rules:
    - from: [{ principals: ["spiffe://mesh.local/ns/shop/sa/orders"] }]
      to: [{ methods: ["POST"], paths: ["/charge"] }]
"#;

async fn traced_shop(receiver: &OtlpReceiver, sampler: SamplerChoice) -> TestMesh {
    let mut mesh = TestMesh::new().await;
    mesh.telemetry = TelemetryConfig {
        enabled: true,
        endpoint: Some(receiver.endpoint()),
        service_name: None,
        sampler: Some(sampler),
        batch_delay: Some(Duration::from_millis(100)),
        queue_size: None,
    };
    mesh.write_policy("shop.yaml", POLICIES);
    for name in ["web", "orders", "payments"] {
        mesh.add(name).await;
    }
    mesh.write_services();
    mesh.converge().await;
    mesh
}

fn find<'a>(spans: &'a [ReceivedSpan], service: &str, name: &str, trace: &str) -> &'a ReceivedSpan {
    spans
        .iter()
        .find(|s| s.service == service && s.name == name && s.trace_id == trace)
        .unwrap_or_else(|| panic!("no {name} span from {service} in trace {trace}: {spans:#?}"))
}

const SERVER: i32 = 2;
const CLIENT: i32 = 3;
const INTERNAL: i32 = 1;
const ERROR: i32 = 2;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_across_web_orders_payments_with_decision_attributes() {
    let receiver = OtlpReceiver::start().await;
    let mesh = traced_shop(&receiver, SamplerChoice::ParentBasedAlwaysOn).await;
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let traceparent = format!("00-{trace}-{caller_span}-01");

    // web's app calls orders, continuing its own trace.
    let answer = mesh
        .call_with(
            "web",
            "GET",
            "orders",
            "/orders/%31",
            bytes::Bytes::new(),
            &[("traceparent", &traceparent)],
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    // The orders app received a traceparent naming orders' server span; it passes it on to payments.
    let to_orders_app = answer.echoed()["headers"]["traceparent"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        to_orders_app.starts_with(&format!("00-{trace}-")),
        "{to_orders_app}"
    );
    let answer = mesh
        .call_with(
            "orders",
            "POST",
            "payments",
            "/charge",
            bytes::Bytes::from_static(b"{}"),
            &[("traceparent", &to_orders_app)],
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.body);

    let spans = receiver
        .wait_for("six spans of the trace", |s| {
            s.iter().filter(|s| s.trace_id == trace).count() >= 6
        })
        .await;
    let web_out = find(&spans, "web-sidecar", "meshgate.outbound", trace);
    let orders_in = find(&spans, "orders-sidecar", "meshgate.inbound", trace);
    let orders_authz = find(&spans, "orders-sidecar", "meshgate.authz", trace);
    let orders_out = find(&spans, "orders-sidecar", "meshgate.outbound", trace);
    let payments_in = find(&spans, "payments-sidecar", "meshgate.inbound", trace);
    let payments_authz = find(&spans, "payments-sidecar", "meshgate.authz", trace);

    // Parent/child order across both hops.
    assert_eq!(web_out.parent_span_id, caller_span);
    assert_eq!(orders_in.parent_span_id, web_out.span_id);
    assert_eq!(orders_authz.parent_span_id, orders_in.span_id);
    assert_eq!(
        orders_out.parent_span_id, orders_in.span_id,
        "the app continued from orders' server span"
    );
    assert_eq!(payments_in.parent_span_id, orders_out.span_id);
    assert_eq!(payments_authz.parent_span_id, payments_in.span_id);
    assert_eq!(
        (web_out.kind, orders_in.kind, orders_authz.kind),
        (CLIENT, SERVER, INTERNAL)
    );

    // The decision, on the authz span.
    let a = orders_authz;
    assert_eq!(a.attr("meshgate.decision"), Some("allow"));
    assert_eq!(
        a.attr("meshgate.peer.id"),
        Some(TestMesh::id_of("web").as_str())
    );
    assert_eq!(
        a.attr("meshgate.workload.id"),
        Some(TestMesh::id_of("orders").as_str())
    );
    assert_eq!(a.attr("http.request.method"), Some("GET"));
    assert_eq!(a.attr("url.path"), Some("/orders/1"), "the normalized path");
    assert_eq!(
        a.attr("meshgate.path.original"),
        Some("/orders/%31"),
        "and the original, since it differs"
    );
    assert_eq!(a.attr("meshgate.policy.name"), Some("shop/orders-readers"));
    assert_eq!(a.attr("meshgate.policy.rule"), Some("0"));
    assert!(
        a.attr("meshgate.policy.version")
            .is_some_and(|v| v.len() == 16)
    );
    assert_eq!(
        payments_authz.attr("meshgate.policy.name"),
        Some("shop/payments-chargers")
    );
    // HTTP semantic conventions on the server and client spans.
    assert_eq!(orders_in.attr("http.response.status_code"), Some("200"));
    assert_eq!(orders_in.attr("url.scheme"), Some("https"));
    assert_eq!(web_out.attr("server.address"), Some("orders"));
    assert_eq!(web_out.attr("http.response.status_code"), Some("200"));
    assert!(
        mesh.metric("orders", "meshgate_trace_spans_exported_total", &[])
            .await
            >= 3.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_without_traceparent_starts_a_trace_and_denials_are_errors() {
    let receiver = OtlpReceiver::start().await;
    let mesh = traced_shop(&receiver, SamplerChoice::ParentBasedAlwaysOn).await;
    assert_eq!(
        mesh.call("web", "DELETE", "orders", "/orders/1")
            .await
            .status,
        403
    );
    let spans = receiver
        .wait_for("a denied authz span and web's client span", |s| {
            s.iter()
                .any(|s| s.name == "meshgate.authz" && s.attr("meshgate.decision") == Some("deny"))
                && s.iter()
                    .any(|s| s.service == "web-sidecar" && s.name == "meshgate.outbound")
        })
        .await;
    let authz = spans.iter().find(|s| s.name == "meshgate.authz").unwrap();
    assert_eq!(authz.status_code, ERROR);
    assert!(
        authz.status_message.contains("no ALLOW policy matched"),
        "{authz:?}"
    );
    let web_out = find(&spans, "web-sidecar", "meshgate.outbound", &authz.trace_id);
    assert_eq!(
        web_out.parent_span_id, "",
        "no traceparent from the app: the sidecar starts the trace"
    );
    let orders_in = find(
        &spans,
        "orders-sidecar",
        "meshgate.inbound",
        &authz.trace_id,
    );
    assert_eq!(orders_in.attr("http.response.status_code"), Some("403"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampling_never_hides_a_denial() {
    let receiver = OtlpReceiver::start().await;
    // Sample nothing: parent-based with a 0 ratio for new traces.
    let mesh = traced_shop(&receiver, SamplerChoice::ParentBasedTraceIdRatio(0.0)).await;
    for _ in 0..5 {
        assert_eq!(
            mesh.call("web", "GET", "orders", "/orders/1").await.status,
            200
        );
    }
    // Even a caller that explicitly says "not sampled" cannot hide a denial.
    let unsampled = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";
    // An unsampled request the app receives still carries its trace: the same trace ID, not
    // sampled, a parent that is not the caller's own span, and the caller's tracestate.
    for tracestate in [None, Some("vendor=opaque")] {
        let mut headers = vec![("traceparent", unsampled)];
        headers.extend(tracestate.map(|t| ("tracestate", t)));
        let answer = mesh
            .call_with(
                "web",
                "GET",
                "orders",
                "/orders/1",
                bytes::Bytes::new(),
                &headers,
            )
            .await;
        assert_eq!(answer.status, 200, "{}", answer.body);
        let echoed = &answer.echoed()["headers"];
        let to_app = echoed["traceparent"].as_str().unwrap();
        assert!(
            to_app.starts_with("00-0af7651916cd43dd8448eb211c80319c-") && to_app.ends_with("-00"),
            "{to_app}"
        );
        assert_ne!(&to_app[36..52], "b7ad6b7169203331", "{to_app}");
        assert_eq!(echoed["tracestate"].as_str(), tracestate, "{echoed}");
    }
    let answer = mesh
        .call_with(
            "web",
            "POST",
            "orders",
            "/orders/1",
            bytes::Bytes::new(),
            &[("traceparent", unsampled)],
        )
        .await;
    assert_eq!(answer.status, 403);
    let spans = receiver
        .wait_for("the denial", |s| {
            s.iter()
                .any(|s| s.name == "meshgate.authz" && s.attr("meshgate.decision") == Some("deny"))
        })
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let spans_now = receiver.spans();
    assert!(
        spans_now
            .iter()
            .all(|s| s.attr("meshgate.decision") != Some("allow")),
        "allowed requests were sampled out: {spans_now:#?}"
    );
    let denied = spans
        .iter()
        .find(|s| s.name == "meshgate.authz" && s.attr("meshgate.decision") == Some("deny"))
        .unwrap();
    assert_eq!(denied.trace_id, "0af7651916cd43dd8448eb211c80319c");
    // The sampler dropped the request, so its server span is built after the decision: it
    // must still be the authorization span's parent and carry the decision.
    let server = spans_now
        .iter()
        .find(|s| s.name == "meshgate.inbound" && s.trace_id == denied.trace_id)
        .expect("the denied request's server span is exported with it");
    assert_eq!(denied.parent_span_id, server.span_id, "{spans_now:#?}");
    assert_eq!(server.attr("meshgate.decision"), Some("deny"));
    assert_eq!(server.attr("http.response.status_code"), Some("403"));
    assert_eq!(server.attr("http.request.method"), Some("POST"));
}

/// The real binary, configured only by the standard OTEL_* variables, writing JSON decision logs
/// whose trace ids match the exported spans.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn env_configured_process_logs_json_decisions_with_trace_ids() {
    use crate::support::*;
    require_tool("curl");
    let receiver = OtlpReceiver::start().await;
    let ca = TestCa::init();
    let base = ca.tmp.path().to_path_buf();
    issue_files(
        &ca,
        "spiffe://mesh.local/ns/shop/sa/orders",
        &base.join("orders"),
    );
    let policies = base.join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::write(policies.join("p.yaml"), POLICIES).unwrap();
    let app = crate::support::mesh::EchoApp::start().await;
    let log = base.join("proxy.log");
    let endpoint = format!("http://{}", receiver.addr);
    let proxy = ProxyProcess::spawn_with(
        &base.join("orders"),
        &policies,
        &app.addr.to_string(),
        &["--log-format", "json"],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_SERVICE_NAME", "orders-process"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
        Some(&log),
    );
    proxy.ready().await;
    ca.write_client_cert("spiffe://mesh.local/ns/shop/sa/web", &base, "web");
    for (method, path, want) in [("GET", "/orders/7", "200"), ("DELETE", "/orders/7", "403")] {
        let mut curl = std::process::Command::new("curl");
        curl.args([
            "-sk",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-X",
            method,
            "--cert",
        ])
        .arg(base.join("web.pem"))
        .arg("--key")
        .arg(base.join("web.key"))
        .arg(format!("https://127.0.0.1:{}{path}", proxy.inbound));
        let out = run_async(curl).await;
        assert_eq!(String::from_utf8_lossy(&out.stdout), want);
    }
    let spans = receiver
        .wait_for("two authz spans from the process", |s| {
            s.iter()
                .filter(|s| s.name == "meshgate.authz" && s.service == "orders-process")
                .count()
                >= 2
        })
        .await;
    let text = crate::support::log_when(&log, "two decision lines", |t| {
        t.matches("authz.decision").count() >= 2
    })
    .await;
    let decisions: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event"] == "authz.decision")
        .collect();
    assert_eq!(decisions.len(), 2, "one JSON line per request:\n{text}");
    for line in &decisions {
        assert_eq!(line["peer.id"], "spiffe://mesh.local/ns/shop/sa/web");
        assert_eq!(
            line["meshgate.workload.id"],
            "spiffe://mesh.local/ns/shop/sa/orders"
        );
        assert_eq!(line["url.path"], "/orders/7");
        let trace = line["trace_id"].as_str().unwrap();
        let span = spans
            .iter()
            .find(|s| s.name == "meshgate.authz" && s.trace_id == trace)
            .unwrap_or_else(|| panic!("no exported span for logged trace {trace}"));
        assert_eq!(span.attr("meshgate.decision"), line["decision"].as_str());
        assert_eq!(
            span.attr("http.request.method"),
            line["http.request.method"].as_str()
        );
    }
    assert_eq!(decisions[0]["decision"], "allow");
    assert_eq!(decisions[0]["policy"], "shop/orders-readers");
    assert_eq!(decisions[1]["decision"], "deny");
}
