//! The web console in a real headless browser (Debian's `chromium`, driven over WebDriver by
//! `chromedriver` from `chromium-driver`), against a real control plane and three real
//! sidecars: the graph shows the workloads and the denied edge, a policy edit turns that edge
//! allowed within 2 s, "suggest" shows the YAML `policy suggest` would write, the flows table
//! filters, the live tap lists a denied request made while the page is open,
//! and a quarantine clicked (and confirmed) in the page denies the next request of that
//! identity through its sidecar; lifting it restores it. A screenshot is written as an artifact.
//!
//! The WebDriver client is a few plain HTTP/JSON calls (W3C WebDriver) with hyper: no crate.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

use crate::support::mesh::{EchoApp, MESH_ALLOW, TestMesh};
use crate::support::*;

const INSTALL: &str = "apt-get install -y chromium chromium-driver";
/// The W3C WebDriver key of an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

const WEB: &str = "spiffe://mesh.local/ns/shop/sa/web";
const ORDERS: &str = "spiffe://mesh.local/ns/shop/sa/orders";
const PAYMENTS: &str = "spiffe://mesh.local/ns/shop/sa/payments";

/// web may GET orders' `/orders/*`; payments denies web (orders → payments passes by default).
const POLICY: &str = r#"apiVersion: meshgate.dev/v1
kind: AuthorizationPolicy
metadata: { name: orders-readers, namespace: shop }
spec:
  selector: { account: orders }
  action: ALLOW
  rules:
    - from: [{ principals: ["spiffe://mesh.local/ns/shop/sa/web"] }]
      to: [{ methods: ["GET"], paths: ["/orders/*"] }]
"#;
const PAYMENTS_DENY: &str = r#"apiVersion: meshgate.dev/v1
kind: AuthorizationPolicy
metadata: { name: payments-no-web, namespace: shop }
spec:
  selector: { account: payments }
  action: DENY
  rules:
    - from: [{ principals: ["spiffe://mesh.local/ns/shop/sa/web"] }]
"#;
/// The edit: payments explicitly allows web on `/pay/*`.
const PAYMENTS_ALLOW: &str = r#"apiVersion: meshgate.dev/v1
kind: AuthorizationPolicy
metadata: { name: payments-web, namespace: shop }
spec:
  selector: { account: payments }
  action: ALLOW
  rules:
    - from: [{ principals: ["spiffe://mesh.local/ns/shop/sa/web"] }]
      to: [{ paths: ["/pay/*"] }]
"#;

/// One HTTP/1.1 JSON exchange.
async fn http_json(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> (u16, Value) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string())
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// A chromedriver process and one headless chromium session.
struct Browser {
    driver: std::process::Child,
    addr: SocketAddr,
    session: String,
}

impl Browser {
    async fn start() -> Self {
        for tool in ["chromium", "chromedriver"] {
            let found = std::process::Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .is_ok_and(|o| o.status.success());
            assert!(
                found,
                "the console test needs `{tool}` on PATH (a real headless browser); install it: {INSTALL}"
            );
        }
        let port = free_port();
        let driver = std::process::Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("chromedriver does not start: {e}; install it: {INSTALL}"));
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut browser = Self {
            driver,
            addr,
            session: String::new(),
        };
        let started = Instant::now();
        loop {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                let (_, v) = http_json(addr, "GET", "/status", None).await;
                if v["value"]["ready"] == true {
                    break;
                }
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "chromedriver on {addr} never became ready"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let caps = json!({ "capabilities": { "alwaysMatch": { "browserName": "chrome",
            "goog:chromeOptions": { "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                "--disable-dev-shm-usage", "--window-size=1400,1000"] } } } });
        let (status, v) = http_json(addr, "POST", "/session", Some(&caps)).await;
        assert_eq!(status, 200, "no browser session ({INSTALL}?): {v}");
        browser.session = v["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session id from chromedriver: {v}"))
            .to_string();
        browser
    }

    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, Value> {
        let path = format!("/session/{}{path}", self.session);
        let body = body.or_else(|| (method == "POST").then(|| json!({})));
        let (status, v) = http_json(self.addr, method, &path, body.as_ref()).await;
        if status == 200 {
            Ok(v["value"].clone())
        } else {
            Err(v["value"].clone())
        }
    }

    async fn goto(&self, url: &str) {
        self.call("POST", "/url", Some(json!({ "url": url })))
            .await
            .unwrap();
    }

    /// Runs `script` in the page (its `return` value comes back).
    async fn js(&self, script: &str, args: Value) -> Value {
        self.call(
            "POST",
            "/execute/sync",
            Some(json!({ "script": script, "args": args })),
        )
        .await
        .unwrap()
    }

    /// Finds the element matching `css` and clicks it, as a user would. The page re-renders
    /// every second, so a reference can go stale between finding and clicking: try again.
    async fn click(&self, css: &str) {
        let mut last = Value::Null;
        for _ in 0..50 {
            let found = self
                .call(
                    "POST",
                    "/element",
                    Some(json!({ "using": "css selector", "value": css })),
                )
                .await;
            if let Ok(el) = found {
                let id = el[ELEMENT]
                    .as_str()
                    .unwrap_or_else(|| panic!("not an element reference: {el}"))
                    .to_string();
                match self
                    .call("POST", &format!("/element/{id}/click"), None)
                    .await
                {
                    Ok(_) => return,
                    Err(e) => last = e,
                }
            } else {
                last = found.unwrap_err();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("could not click {css}: {last}");
    }

    /// Polls `script` (a JS expression) until it is truthy; its value and the time it took.
    async fn until(&self, what: &str, expr: &str, timeout: Duration) -> (Value, Duration) {
        let started = Instant::now();
        let mut last;
        loop {
            last = self.js(&format!("return ({expr});"), json!([])).await;
            if !(last.is_null() || last == false || last == "" || last == 0) {
                return (last, started.elapsed());
            }
            if started.elapsed() > timeout {
                let dom = self.js("return document.body.innerText;", json!([])).await;
                panic!(
                    "timed out after {timeout:?} waiting for {what} ({expr}); last {last}; page text:\n{dom}"
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn screenshot(&self, file: &std::path::Path) {
        use base64::Engine;
        let png = self.call("GET", "/screenshot", None).await.unwrap();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(png.as_str().unwrap())
            .unwrap();
        assert!(bytes.starts_with(b"\x89PNG"), "a PNG");
        std::fs::write(file, bytes).unwrap();
        println!("console screenshot: {}", file.display());
    }
}

impl Drop for Browser {
    /// On a failed test too: ends the session (which closes chromium: killing chromedriver
    /// alone would leave the browser running), then stops chromedriver.
    fn drop(&mut self) {
        use std::io::{Read, Write};
        if !self.session.is_empty()
            && let Ok(mut tcp) = std::net::TcpStream::connect(self.addr)
        {
            let _ = tcp.set_read_timeout(Some(Duration::from_secs(10)));
            let _ = write!(
                tcp,
                "DELETE /session/{} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
                self.session, self.addr
            );
            let _ = tcp.read_to_end(&mut Vec::new());
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// The class the page draws on the edge `caller → callee` (`null` when not drawn).
fn edge_class(caller: &str, callee: &str) -> String {
    format!(
        "(document.querySelector('path.edge[data-caller=\"{caller}\"][data-callee=\"{callee}\"]') || {{}}).dataset?.class"
    )
}

/// The eBPF redirect's verdicts in the browser: a real stream client (mTLS as workload `web`)
/// reports them to a real control plane — from a fixed list here, from the kernel's counters
/// in `ebpf_redirect::ebpf_verdicts_reach_the_control_plane_as_l3l4_flows` — and the page draws
/// them as dashed edges labelled `eBPF` to and from the "outside (L3/L4)" pseudo-node, never as
/// identity edges, with port, verdict and count in the edge's details.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_draws_ebpf_verdicts_apart_from_identity_flows() {
    use meshgate_xds::wire::{Direction, L3L4Flow};
    let _heavy = heavy_async().await;
    let mut mesh = TestMesh::new().await;
    mesh.write_policy("mesh.yaml", MESH_ALLOW);
    mesh.start_control_plane().await;
    let (cp_addr, admin_addr) = {
        let cp = mesh.control_plane.as_ref().unwrap();
        (cp.addr, cp.admin_addr)
    };
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
    let at = now.unix_timestamp();
    let verdict = |direction, port, verdict: &str, count| L3L4Flow {
        direction,
        port,
        verdict: verdict.into(),
        count,
        first_seen: at - 1,
        last_seen: at,
    };
    let pending = std::sync::Arc::new(std::sync::Mutex::new(vec![
        verdict(Direction::Egress, 9001, "denied_egress", 3),
        verdict(Direction::Egress, 443, "allowed", 2),
        verdict(Direction::Ingress, 8080, "denied_ingress", 5),
    ]));
    let client = meshgate_xds::client::StreamClient::new(&[format!("https://{cp_addr}")], tls)
        .unwrap()
        .report_flows(meshgate_xds::client::FlowReporter {
            interval: Duration::from_millis(100),
            drain: std::sync::Arc::new(|| (Vec::new(), 0)),
            l3l4: Some(std::sync::Arc::new(move || {
                (std::mem::take(&mut *pending.lock().unwrap()), 0)
            })),
        });
    let stream = tokio::spawn(client.run(
        |_| Ok(()),
        |_| {},
        Duration::from_millis(100),
        Duration::from_secs(1),
    ));

    let browser = Browser::start().await;
    browser.goto(&format!("http://{admin_addr}/console")).await;
    let egress = format!("path.edge.ebpf[data-caller=\"{WEB}\"][data-callee=\"l3l4:outside\"]");
    let ingress = format!("path.edge.ebpf[data-caller=\"l3l4:outside\"][data-callee=\"{WEB}\"]");
    let (class, _) = browser
        .until(
            "the eBPF egress edge",
            &format!("(document.querySelector('{egress}') || {{}}).dataset?.class"),
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(class, "denied", "an edge with a refusal is drawn denied");
    let drawn = browser
        .js(
            &format!(
                "const e = document.querySelector('{egress}'), i = document.querySelector('{ingress}');
                 const node = document.querySelector('g.node[data-kind=\"outside\"]');
                 return {{ dash: getComputedStyle(e).strokeDasharray, layer: e.dataset.layer,
                   ingress: i && i.dataset.class, outside: node && node.dataset.name,
                   labels: document.querySelectorAll('text.edge-label').length,
                   identity: document.querySelectorAll('path.edge:not(.ebpf)').length }};"
            ),
            json!([]),
        )
        .await;
    assert_eq!(drawn["layer"], "ebpf", "{drawn}");
    assert_ne!(drawn["dash"], "none", "dashed: {drawn}");
    assert_eq!(drawn["ingress"], "denied", "{drawn}");
    assert_eq!(drawn["outside"], "outside (L3/L4)", "{drawn}");
    assert_eq!(drawn["labels"], 2, "each eBPF edge is labelled: {drawn}");
    assert_eq!(
        drawn["identity"], 0,
        "no identity edge from verdicts: {drawn}"
    );

    browser
        .click(&format!(
            "circle.edge-handle[data-layer=\"ebpf\"][data-caller=\"{WEB}\"]"
        ))
        .await;
    let (rows, _) = browser
        .until(
            "the egress edge's verdicts in the details",
            "document.querySelectorAll('#edge-l3l4 tr.edge-verdict').length === 2 && [...document.querySelectorAll('#edge-l3l4 tr.edge-verdict')].map((r) => r.innerText.replace(/\\s+/g, ' ')).join(' | ')",
            Duration::from_secs(5),
        )
        .await;
    let rows = rows.as_str().unwrap();
    assert!(rows.contains("egress 9001 denied_egress 3"), "{rows}");
    assert!(rows.contains("egress 443 allowed 2"), "{rows}");
    let title = browser
        .js(
            "return document.querySelector('#edge-title').innerText;",
            json!([]),
        )
        .await;
    assert!(
        title.as_str().unwrap().contains("eBPF L3/L4 verdicts"),
        "{title}"
    );
    assert!(
        browser
            .js("return !document.querySelector('#suggest-btn');", json!([]))
            .await
            == true,
        "no policy to suggest for kernel verdicts"
    );
    let golden = browser
        .js(
            "return document.querySelector('#edge-golden').innerText;",
            json!([]),
        )
        .await;
    let golden = golden.as_str().unwrap();
    assert!(
        golden.starts_with("5 connections") && golden.contains("40.0% let through direct"),
        "{golden}"
    );
    // The ingress edge: packets dropped on their way into the app port.
    browser
        .click(&format!(
            "circle.edge-handle[data-layer=\"ebpf\"][data-callee=\"{WEB}\"]"
        ))
        .await;
    let (rows, _) = browser
        .until(
            "the ingress edge's verdicts in the details",
            "document.querySelector('#edge-l3l4 tr.edge-verdict[data-verdict=\"denied_ingress\"]')?.innerText.replace(/\\s+/g, ' ')",
            Duration::from_secs(5),
        )
        .await;
    assert!(
        rows.as_str()
            .unwrap()
            .starts_with("ingress 8080 denied_ingress 5 "),
        "{rows}"
    );
    let golden = browser
        .js(
            "return document.querySelector('#edge-golden').innerText;",
            json!([]),
        )
        .await;
    assert!(
        golden.as_str().unwrap().starts_with("5 packets dropped"),
        "{golden}"
    );
    browser
        .screenshot(&std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("console-ebpf.png"))
        .await;
    stream.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_in_a_headless_browser_shows_the_mesh_and_contains() {
    let _heavy = heavy_async().await;
    let mut mesh = TestMesh::new().await;
    // Traced, sampling nothing: only denials are exported, so only the denied flow gets a
    // trace link (to the --trace-ui template).
    let receiver = crate::support::otlp::OtlpReceiver::start().await;
    mesh.telemetry = meshgate_proxy::telemetry::TelemetryConfig {
        enabled: true,
        endpoint: Some(receiver.endpoint()),
        service_name: None,
        sampler: Some(meshgate_proxy::telemetry::SamplerChoice::AlwaysOff),
        batch_delay: Some(Duration::from_millis(100)),
        queue_size: None,
    };
    mesh.trace_ui = Some(
        meshgate_proxy::trace_ui::TraceUi::parse("http://jaeger.test/trace/{trace_id}").unwrap(),
    );
    mesh.write_policy("mesh.yaml", MESH_ALLOW);
    mesh.write_policy("policy.yaml", POLICY);
    mesh.write_policy("payments.yaml", PAYMENTS_DENY);
    mesh.start_control_plane().await;
    for name in ["web", "orders", "payments"] {
        let app = EchoApp::start().await;
        mesh.add_configured(name, app, |c| {
            c.flow_report_interval = Duration::from_millis(200)
        })
        .await;
    }
    mesh.write_services();
    mesh.converge().await;
    let calls = [
        ("web", "orders", "/orders/1", 200),
        ("orders", "payments", "/pay/1", 200),
        ("web", "payments", "/pay/2", 403),
    ];
    for (from, host, path, want) in calls {
        assert_eq!(
            mesh.call(from, "GET", host, path).await.status,
            want,
            "{from} → {host}{path}"
        );
    }

    let admin = mesh.control_plane.as_ref().unwrap().admin_addr;
    let browser = Browser::start().await;
    browser.goto(&format!("http://{admin}/console")).await;

    // The graph: three workloads, and each edge in its class.
    browser
        .until(
            "the three workloads and the denied edge",
            &format!(
                "document.querySelectorAll('g.node').length === 3 && {} === 'denied'",
                edge_class(WEB, PAYMENTS)
            ),
            Duration::from_secs(10),
        )
        .await;
    let names = browser
        .js(
            "return [...document.querySelectorAll('g.node')].map(n => n.dataset.name).sort();",
            json!([]),
        )
        .await;
    assert_eq!(names, json!(["shop/orders", "shop/payments", "shop/web"]));
    let cases = [(WEB, ORDERS, "allowed"), (ORDERS, PAYMENTS, "uncovered")];
    for (caller, callee, want) in cases {
        browser
            .until(
                &format!("{caller} → {callee} {want}"),
                &format!("{} === '{want}'", edge_class(caller, callee)),
                Duration::from_secs(5),
            )
            .await;
    }
    // The SLIs and the sidecars' versions are on the page.
    browser
        .until(
            "the coverage SLI",
            "document.querySelector('#slis tr[data-metric=\"meshgate_sli_policy_coverage_ratio\"]')",
            Duration::from_secs(5),
        )
        .await;
    let (drift, _) = browser
        .until(
            "three sidecars, none drifted",
            "document.querySelectorAll('#sidecars tr[data-drift=\"false\"]').length === 3 && 'ok'",
            Duration::from_secs(5),
        )
        .await;
    assert_eq!(drift, "ok");

    // Edge details: click the denied edge's handle.
    browser
        .click(&format!(
            "circle.edge-handle[data-caller=\"{WEB}\"][data-callee=\"{PAYMENTS}\"]"
        ))
        .await;
    let (details, _) = browser
        .until(
            "the edge's details",
            "document.querySelector('#edge-title') && document.querySelector('#details-body').innerText",
            Duration::from_secs(5),
        )
        .await;
    let details = details.as_str().unwrap();
    assert!(
        details.contains("shop/payments-no-web") && details.contains("/pay/*"),
        "{details}"
    );
    assert!(details.contains("success rate 0.0%"), "{details}");
    // Latency from the flows' buckets: p50 and p99 as upper bounds with a unit (the denied
    // request took some microseconds at least: the sidecar times every decided request).
    let (latency, _) = browser
        .until(
            "the edge's latency",
            "(document.querySelector('#edge-latency') || {}).textContent",
            Duration::from_secs(5),
        )
        .await;
    let latency = latency.as_str().unwrap();
    let quantile = |name: &str| {
        let rest = latency.split(&format!("{name} ≤ ")).nth(1)?;
        let mut words = rest.split([' ', ',', ')']).filter(|w| !w.is_empty());
        let number: f64 = words.next()?.parse().ok()?;
        let unit = words.next()?;
        (number > 0.0 && ["µs", "ms", "s"].contains(&unit)).then_some(())
    };
    assert!(
        quantile("p50").is_some() && quantile("p99").is_some() && latency.contains("upper bounds"),
        "{latency}"
    );
    // The denied request's trace, linked; the receiver got that trace's spans.
    let href = browser
        .js(
            "return [...document.querySelectorAll('#edge-flows a.trace-link')].map(a => a.getAttribute('href'));",
            json!([]),
        )
        .await;
    let hrefs: Vec<&str> = href
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|h| h.as_str())
        .collect();
    let [href] = hrefs.as_slice() else {
        panic!("one trace link on the denied edge: {href}")
    };
    let trace = href
        .strip_prefix("http://jaeger.test/trace/")
        .unwrap_or_default();
    assert!(
        trace.len() == 32 && trace.bytes().all(|b| b.is_ascii_hexdigit()),
        "{href}"
    );
    receiver
        .wait_for("the denied request's spans", |spans| {
            spans.iter().any(|s| s.trace_id == trace)
        })
        .await;

    // "Suggest policy for this edge" on orders → payments: the YAML `policy suggest` writes.
    browser
        .click(&format!(
            "circle.edge-handle[data-caller=\"{ORDERS}\"][data-callee=\"{PAYMENTS}\"]"
        ))
        .await;
    browser.click("#suggest-btn").await;
    let (yaml, _) = browser
        .until(
            "the suggested policy",
            "document.querySelector('#suggest-yaml').textContent",
            Duration::from_secs(5),
        )
        .await;
    let yaml = yaml.as_str().unwrap();
    assert!(
        yaml.contains("name: payments-observed")
            && yaml.contains(ORDERS)
            && yaml.contains("/pay/*"),
        "{yaml}"
    );
    assert!(!yaml.contains(WEB), "only this edge's flows: {yaml}");

    // The flows, filtered to denials: only the denied flow.
    browser
        .click("#flows-decision option[value=\"deny\"]")
        .await;
    let (rows, _) = browser
        .until(
            "the flows filtered to denials",
            "[...document.querySelectorAll('#flows tr.flow-row')].map(r => r.dataset.caller + ' ' + r.dataset.callee + ' ' + r.dataset.decision).join('\\n')",
            Duration::from_secs(5),
        )
        .await;
    assert_eq!(rows, format!("{WEB} {PAYMENTS} deny"));

    // A workload's golden metrics: payments received two requests, one allowed.
    browser
        .click(&format!("g.node[data-id=\"{PAYMENTS}\"] circle"))
        .await;
    let (golden, _) = browser
        .until(
            "payments' inbound metrics",
            "(document.querySelector('#node-golden') || {}).textContent",
            Duration::from_secs(5),
        )
        .await;
    let golden = golden.as_str().unwrap();
    assert!(
        golden.starts_with("inbound: 2 requests") && golden.contains("success rate 50.0%"),
        "{golden}"
    );

    // The live tap (polled since the page opened), filtered to denials: a denied request made
    // now is listed on its own, with its raw path, and nothing allowed is.
    browser.click("#tap-decision option[value=\"deny\"]").await;
    assert_eq!(
        mesh.call("web", "GET", "orders", "/orders/tap-allowed")
            .await
            .status,
        200
    );
    assert_eq!(
        mesh.call("web", "GET", "payments", "/pay/tapped-42")
            .await
            .status,
        403
    );
    let (row, _) = browser
        .until(
            "the denied request in the live tap",
            "(document.querySelector('#tap tr.tap-row[data-path=\"/pay/tapped-42\"]') || {}).innerText",
            Duration::from_secs(5),
        )
        .await;
    let row = row.as_str().unwrap();
    assert!(
        row.contains("shop/web → shop/payments") && row.contains("deny") && row.contains("403"),
        "{row}"
    );
    let decisions = browser
        .js(
            "return [...document.querySelectorAll('#tap tr.tap-row')].map(r => r.dataset.decision);",
            json!([]),
        )
        .await;
    assert!(
        decisions.as_array().unwrap().iter().all(|d| d == "deny"),
        "{decisions}"
    );

    // A policy edit turns the denied edge allowed within 2 s.
    std::fs::remove_file(mesh.policy_dir.join("payments.yaml")).unwrap();
    mesh.write_policy("payments-allow.yaml", PAYMENTS_ALLOW);
    let (_, took) = browser
        .until(
            "web → payments allowed after the edit",
            &format!("{} === 'allowed'", edge_class(WEB, PAYMENTS)),
            Duration::from_secs(2),
        )
        .await;
    println!("the edit showed in the console after {took:?}");
    assert_eq!(
        mesh.call("web", "GET", "payments", "/pay/3").await.status,
        200
    );

    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("console.png");
    browser.screenshot(&shot).await;

    // Quarantine web from the page: click, confirm; its next request is denied by a real sidecar.
    browser
        .click(&format!(
            "circle.edge-handle[data-caller=\"{WEB}\"][data-callee=\"{ORDERS}\"]"
        ))
        .await;
    browser
        .click(&format!("#quarantine-btn[data-id=\"{WEB}\"]"))
        .await;
    browser
        .until(
            "the confirmation",
            "document.querySelector('#confirm').classList.contains('open')",
            Duration::from_secs(2),
        )
        .await;
    browser.click("#confirm-yes").await;
    browser
        .until(
            "the quarantine applied",
            "document.querySelector('#action-result').dataset.status === '200'",
            Duration::from_secs(5),
        )
        .await;
    let file = meshgate_proxy::quarantine::file_of(&mesh.policy_dir, &id(WEB));
    assert!(file.exists(), "the same file `meshgate quarantine` writes");
    let started = Instant::now();
    loop {
        let status = mesh.call("web", "GET", "orders", "/orders/2").await.status;
        if status == 403 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "web still gets {status} 5 s after the console's quarantine"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    browser
        .until(
            "web shown quarantined",
            &format!(
                "document.querySelector('g.node[data-id=\"{WEB}\"]').dataset.quarantined === 'true'"
            ),
            Duration::from_secs(3),
        )
        .await;
    let (_, metrics) = crate::support::mesh::admin(admin, "GET", "/metrics").await;
    assert_eq!(
        crate::support::mesh::sum_metric(
            &metrics,
            "meshgate_console_actions_total",
            &["action=\"quarantine\"", "result=\"ok\""]
        ),
        1.0,
        "{metrics}"
    );

    // Lift it from the page: web gets through again.
    browser
        .click(&format!("#lift-btn[data-id=\"{WEB}\"]"))
        .await;
    browser.click("#confirm-yes").await;
    let started = Instant::now();
    loop {
        let status = mesh.call("web", "GET", "orders", "/orders/3").await.status;
        if status == 200 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "web still gets {status} 5 s after lifting"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!file.exists());
    drop(browser);
}

/// Without the page: a POST that is not JSON, or from a foreign origin, is refused; the
/// control plane's `/` is the console page.
#[tokio::test]
async fn console_actions_refuse_forged_requests() {
    let mut mesh = TestMesh::new().await;
    mesh.write_policy("mesh.yaml", MESH_ALLOW);
    mesh.start_control_plane().await;
    let admin = mesh.control_plane.as_ref().unwrap().admin_addr;
    let (status, page) = crate::support::mesh::admin(admin, "GET", "/").await;
    assert_eq!(status, 200);
    assert!(
        page.contains("meshgate console") && !page.contains("https://"),
        "no CDN"
    );
    // `admin()` sends no content type: refused.
    let (status, body) = crate::support::mesh::admin(admin, "POST", "/v1/console/quarantine").await;
    assert_eq!(status, 415, "{body}");
    let (status, _) = http_json(
        admin,
        "POST",
        "/v1/console/quarantine",
        Some(&json!({ "id": WEB })),
    )
    .await;
    assert_eq!(
        status, 200,
        "JSON from loopback, no token configured: allowed"
    );
    assert!(meshgate_proxy::quarantine::file_of(&mesh.policy_dir, &id(WEB)).exists());
    let (status, v) = http_json(
        admin,
        "POST",
        "/v1/console/quarantine",
        Some(&json!({ "id": "not an id" })),
    )
    .await;
    assert_eq!(status, 400, "{v}");
}

/// `meshgate dashboard` prints the console's URL and succeeds whether or not a browser opens
/// (CI has no desktop: `xdg-open` is missing or fails there).
#[test]
fn dashboard_prints_the_console_url() {
    let cases = [
        ("127.0.0.1:15011", "http://127.0.0.1:15011/console"),
        ("http://10.0.0.5:15011/", "http://10.0.0.5:15011/console"),
    ];
    for (given, want) in cases {
        let out = run(meshgate()
            .args(["dashboard", "--control-plane", given])
            .env("PATH", "/nonexistent"));
        let shown = text(&out);
        assert!(out.status.success(), "{shown}");
        assert!(
            shown.contains(&format!("meshgate console: {want}\n")),
            "{shown}"
        );
        assert!(shown.contains("open the URL above yourself"), "{shown}");
    }
}

/// With `--console-token`, an action needs `Authorization: Bearer <token>`, even on loopback;
/// the refusal is counted, and the page is told actions need the token.
#[tokio::test]
async fn console_actions_need_the_token_when_one_is_set() {
    const TOKEN: &str = "a-console-token-of-24-chars";
    let mut mesh = TestMesh::new().await;
    mesh.write_policy("mesh.yaml", MESH_ALLOW);
    mesh.console_token = Some(TOKEN.to_string());
    mesh.start_control_plane().await;
    let admin = mesh.control_plane.as_ref().unwrap().admin_addr;
    let (_, state) = http_json(admin, "GET", "/v1/console/state", None).await;
    assert_eq!(state["mutations"]["mode"], "token", "{state}");
    let ask = json!({ "id": WEB });
    let post = |auth: Option<&'static str>| {
        let ask = ask.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(admin).await.unwrap();
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                .await
                .unwrap();
            tokio::spawn(conn);
            let mut req = http::Request::builder()
                .method("POST")
                .uri("/v1/console/quarantine")
                .header("host", admin.to_string())
                .header("content-type", "application/json");
            if let Some(auth) = auth {
                req = req.header("authorization", auth);
            }
            let resp = sender
                .send_request(req.body(Full::new(Bytes::from(ask.to_string()))).unwrap())
                .await
                .unwrap();
            resp.status().as_u16()
        }
    };
    let file = meshgate_proxy::quarantine::file_of(&mesh.policy_dir, &id(WEB));
    let cases = [
        (None, 401),
        (Some("Bearer wrong-token-wrong-token"), 401),
        (Some("a-console-token-of-24-chars"), 401),
    ];
    for (auth, want) in cases {
        assert_eq!(post(auth).await, want, "{auth:?}");
        assert!(!file.exists(), "{auth:?} quarantined");
    }
    assert_eq!(post(Some("Bearer a-console-token-of-24-chars")).await, 200);
    assert!(file.exists());
    let (_, metrics) = crate::support::mesh::admin(admin, "GET", "/metrics").await;
    let count = |result: &str| {
        crate::support::mesh::sum_metric(
            &metrics,
            "meshgate_console_actions_total",
            &[&format!("result=\"{result}\"")],
        )
    };
    assert_eq!((count("refused"), count("ok")), (3.0, 1.0), "{metrics}");
}
