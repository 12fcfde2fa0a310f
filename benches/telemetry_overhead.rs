//! Does tracing slow requests down — in particular when the collector is dead?
//!
//! Runs the same request loop (web app → web sidecar → orders sidecar → orders app) three times
//! in one process: tracing off (the baseline), tracing to a live OTLP receiver, and tracing to an
//! endpoint where nothing listens. Prints latency percentiles and the ratio to the baseline, and
//! the dropped-span counter for the dead collector. Results go to BENCHMARKS.md.
//!
//! `cargo bench --bench telemetry_overhead`

#[path = "../tests/it/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use meshgate_proxy::telemetry::{SamplerChoice, TelemetryConfig};
use support::mesh::TestMesh;
use support::otlp::OtlpReceiver;

const POLICY: &str = r#"
apiVersion: meshgate.dev/v1
kind: AuthorizationPolicy
metadata: { name: orders-readers, namespace: shop }
spec:
  selector: { account: orders }
  action: ALLOW
  rules:
    - from: [{ principals: ["spiffe://mesh.local/ns/shop/sa/web"] }]
      to: [{ paths: ["/orders/*"] }]
"#;

const WARMUP: usize = 200;
const REQUESTS: usize = 3000;

struct Figures {
    p50: Duration,
    p99: Duration,
    mean: Duration,
}

/// The same loop straight to the orders app (no sidecars, no TLS): the cost of the mesh itself.
async fn direct() -> Figures {
    let app = support::mesh::EchoApp::start().await;
    let call = || support::mesh::call_plain(app.addr, "GET", "orders", "/orders/1");
    for _ in 0..WARMUP {
        assert_eq!(call().await, 200);
    }
    let mut latencies = Vec::with_capacity(REQUESTS);
    for _ in 0..REQUESTS {
        let started = Instant::now();
        assert_eq!(call().await, 200);
        latencies.push(started.elapsed());
    }
    figures(latencies)
}

fn figures(mut latencies: Vec<Duration>) -> Figures {
    latencies.sort();
    Figures {
        p50: latencies[latencies.len() / 2],
        p99: latencies[latencies.len() * 99 / 100],
        mean: latencies.iter().sum::<Duration>() / latencies.len() as u32,
    }
}

async fn run(telemetry: TelemetryConfig) -> (Figures, f64, f64) {
    let mut mesh = TestMesh::new().await;
    mesh.telemetry = telemetry;
    mesh.write_policy("p.yaml", POLICY);
    mesh.add("web").await;
    mesh.add("orders").await;
    mesh.write_services();
    mesh.converge().await;
    for _ in 0..WARMUP {
        assert_eq!(
            mesh.call("web", "GET", "orders", "/orders/1").await.status,
            200
        );
    }
    let mut latencies = Vec::with_capacity(REQUESTS);
    for i in 0..REQUESTS {
        // Every 10th request is denied: denials are always exported, so they load the queue too.
        let path = if i % 10 == 0 { "/admin" } else { "/orders/1" };
        let started = Instant::now();
        let answer = mesh.call("web", "GET", "orders", path).await;
        latencies.push(started.elapsed());
        assert!(
            matches!(answer.status, 200 | 403),
            "request failed: {}",
            answer.status
        );
    }
    let figures = figures(latencies);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let exported = mesh
        .metric("orders", "meshgate_trace_spans_exported_total", &[])
        .await;
    let dropped = mesh
        .metric("orders", "meshgate_trace_spans_dropped_total", &[])
        .await;
    (figures, exported, dropped)
}

fn traced(endpoint: String) -> TelemetryConfig {
    TelemetryConfig {
        enabled: true,
        endpoint: Some(endpoint),
        service_name: None,
        sampler: Some(SamplerChoice::AlwaysOn),
        batch_delay: Some(Duration::from_millis(200)),
        queue_size: None,
    }
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let receiver = OtlpReceiver::start().await;
        let dead = format!("http://127.0.0.1:{}/v1/traces", support::free_port());
        let cases = [
            ("tracing off (baseline)", TelemetryConfig::disabled()),
            ("tracing → live OTLP receiver", traced(receiver.endpoint())),
            ("tracing → dead collector", traced(dead)),
        ];
        let mut baseline = None;
        let d = direct().await;
        println!("| configuration | p50 | p99 | mean | mean vs baseline | spans exported | spans dropped |");
        println!("|---|---|---|---|---|---|---|");
        println!(
            "| no mesh: app → app directly, plain HTTP | {:.0} µs | {:.0} µs | {:.0} µs | – | – | – |",
            d.p50.as_secs_f64() * 1e6,
            d.p99.as_secs_f64() * 1e6,
            d.mean.as_secs_f64() * 1e6
        );
        for (name, config) in cases {
            let (f, exported, dropped) = run(config).await;
            let base = *baseline.get_or_insert(f.mean);
            println!(
                "| {name} | {:.0} µs | {:.0} µs | {:.0} µs | {:.2}× | {exported} | {dropped} |",
                f.p50.as_secs_f64() * 1e6,
                f.p99.as_secs_f64() * 1e6,
                f.mean.as_secs_f64() * 1e6,
                f.mean.as_secs_f64() / base.as_secs_f64(),
            );
        }
        println!("({REQUESTS} sequential requests per configuration after {WARMUP} warm-up; orders' sidecar counters)");
    });
}
