//! Cost of the inbound request hygiene that runs before every authorization decision
//! (`meshgate_proxy::inbound::sanitize`): method and Host checks, hop-by-hop and identity-header
//! stripping, the upgrade allowlist. Measured on a typical browser-like request (12 headers) and
//! on a hostile one (forged identity headers in several spellings, Connection-listed headers,
//! an h2c upgrade), to compare with the ~150 ns of the decision itself (`policy_eval`).

use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue, Request};
use meshgate_proxy::http_util::requested_upgrade;
use meshgate_proxy::inbound::sanitize::{UpgradePolicy, check, prepare};

fn request(headers: &[(&'static str, &'static str)]) -> Request<()> {
    let mut b = Request::get("/orders/42?verbose=1");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(()).unwrap()
}

const TYPICAL: &[(&str, &str)] = &[
    ("host", "orders:8080"),
    ("user-agent", "Mozilla/5.0 (X11; Linux x86_64)"),
    ("accept", "application/json"),
    ("accept-encoding", "gzip, deflate, br"),
    ("accept-language", "en-US,en;q=0.9"),
    ("content-type", "application/json"),
    (
        "traceparent",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    ),
    ("x-request-id", "7f0c3b5e-1d1e-4b8a-9a53-3d2c1f0e9b7a"),
    ("cookie", "session=abc123; theme=dark"),
    ("authorization", "Bearer eyJhbGciOiJIUzI1NiJ9.e30.x"),
    ("connection", "keep-alive"),
    ("cache-control", "no-cache"),
];

const HOSTILE: &[(&str, &str)] = &[
    ("host", "orders:8080"),
    ("connection", "Upgrade, HTTP2-Settings, x-meshgate-peer"),
    ("upgrade", "h2c"),
    ("http2-settings", "AAMAAABkAARAAAAAAAIAAAAA"),
    ("x-meshgate-peer", "spiffe://mesh.local/ns/shop/sa/admin"),
    ("x_meshgate_peer", "spiffe://mesh.local/ns/shop/sa/admin"),
    (
        "x-forwarded-client-cert",
        "URI=spiffe://mesh.local/ns/shop/sa/admin",
    ),
    ("accept", "*/*"),
];

fn hygiene(req: &Request<()>, headers: &mut HeaderMap, policy: &UpgradePolicy) -> usize {
    check(req).ok();
    let asked = requested_upgrade(req);
    prepare(headers, asked, policy).stripped
}

fn bench(c: &mut Criterion) {
    let policy = UpgradePolicy::default();
    for (name, headers) in [("typical", TYPICAL), ("hostile", HOSTILE)] {
        let req = request(headers);
        c.bench_function(&format!("request_hygiene/{name}"), |b| {
            b.iter_batched(
                || req.headers().clone(),
                |mut h| hygiene(&req, &mut h, &policy),
                criterion::BatchSize::SmallInput,
            )
        });
    }
    // The clone of the header map the batches start from, to subtract.
    let req = request(TYPICAL);
    c.bench_function("request_hygiene/clone_only", |b| {
        b.iter_batched(
            || req.headers().clone(),
            |h: HeaderMap<HeaderValue>| h.len(),
            criterion::BatchSize::SmallInput,
        )
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
