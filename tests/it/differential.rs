//! Differential test of the authorization decision: generated requests (method spellings, hostile
//! paths, forged identity headers, header conditions, HTTP/1.1 and HTTP/2, upgrades, L4 tunnels)
//! go through a real sidecar to an app that logs what it receives, and what the app received is
//! compared with two oracles:
//! - `policy explain`'s judgement of the same request ([`Probe::judge`], which promises to judge
//!   exactly as the sidecar): received ⇔ allowed, and the app sees the normalized path;
//! - invariants stated independently of meshgate's code: nothing the app receives is a DELETE in
//!   any spelling, under `/admin` in any spelling, from a caller the policy does not name, or
//!   carries an identity header the sidecar did not set.
//!
//! The requests come from a seeded generator: `DIFF_SEED` and `DIFF_CASES` pick another seed or a
//! longer run by hand (CI runs the default 400 cases).

use std::time::Duration;

use crate::support::attack::{Target, empty, read_head, status_of};
use crate::support::mesh::TestMesh;
use bytes::Bytes;
use http_body_util::BodyExt;
use meshgate_policy_tools::probe::Probe;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// web may GET/POST/PUT under /public (and with `x-tenant: blue` anywhere but /admin), billing
/// may do anything under /api; /admin and DELETE are denied for everyone.
const POLICY: &str = r#"
apiVersion: meshgate.dev/v1
kind: AuthorizationPolicy
metadata: { name: web, namespace: shop }
spec:
  selector: { account: orders }
  action: ALLOW
  rules:
    - from: [{ principals: ["spiffe://mesh.local/ns/shop/sa/web"] }]
      to: [{ methods: ["GET", "POST", "PUT", "HEAD", "OPTIONS"], paths: ["/public", "/public/*"] }]
    - from: [{ principals: ["spiffe://mesh.local/ns/shop/sa/web"] }]
      when: [{ header: x-tenant, values: ["blue"] }]
---
apiVersion: meshgate.dev/v1
kind: AuthorizationPolicy
metadata: { name: billing, namespace: shop }
spec:
  selector: { account: orders }
  action: ALLOW
  rules:
    - from: [{ principals: ["spiffe://mesh.local/ns/shop/sa/billing"] }]
      to: [{ paths: ["/api/*"] }]
---
apiVersion: meshgate.dev/v1
kind: AuthorizationPolicy
metadata: { name: no-admin, namespace: shop }
spec:
  selector: { account: orders }
  action: DENY
  rules:
    - to: [{ paths: ["/admin", "/admin/*"] }]
    - to: [{ methods: ["DELETE"] }]
"#;

/// Weighted by repetition, so that allowed and refused requests both come often.
const CALLERS: &[&str] = &["web", "web", "web", "billing", "billing", "intruder"];
const METHODS: &[&str] = &[
    "GET", "GET", "GET", "GET", "POST", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "get",
    "delete", "Delete", "dElEtE", "post", "PURGE",
];
const PATHS: &[&str] = &[
    "/public/a",
    "/public/a",
    "/public/b/c",
    "/api/v1/items",
    "/api/v1/items",
    "/api/x",
    "/public",
    "/api/v1/items",
    "/api",
    "/admin",
    "/admin/users",
    "/ADMIN/users",
    "/Admin",
    "/public/../admin/users",
    "/public/%2e%2e/admin/users",
    "/public/..%2fadmin/users",
    "/%61dmin/users",
    "/public//x",
    "/public/./x",
    "/api/../public/a",
    "/public/a?x=/admin",
    "/public/%2561dmin",
    "/admin;x=1/users",
    "/api/%2e%2e/admin",
    "/other",
];
/// Extra headers: forged identities in several spellings, and the header condition.
const HEADERS: &[(&str, &str)] = &[
    ("x-meshgate-peer", "spiffe://mesh.local/ns/shop/sa/admin"),
    ("x_meshgate_peer", "spiffe://mesh.local/ns/shop/sa/admin"),
    (
        "X-Forwarded-Client-Cert",
        "URI=spiffe://mesh.local/ns/shop/sa/admin",
    ),
    ("x-tenant", "blue"),
    ("x-tenant", "red"),
];
const UPGRADES: &[&str] = &["websocket", "h2c", "WebSocket", "tls/1.3"];

/// xorshift64*: small, seeded, good enough to pick cases.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[(self.next() % items.len() as u64) as usize]
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

#[derive(Debug, Clone)]
struct Case {
    caller: &'static str,
    method: &'static str,
    path: &'static str,
    headers: Vec<(&'static str, &'static str)>,
    http2: bool,
    upgrade: Option<&'static str>,
}

impl Case {
    fn generate(rng: &mut Rng) -> Self {
        let http2 = rng.chance(40);
        let mut headers = Vec::new();
        for h in HEADERS {
            if rng.chance(25) && !headers.iter().any(|(n, _): &(&str, &str)| *n == h.0) {
                headers.push(*h);
            }
        }
        // HTTP/2 header names are lowercase on the wire.
        if http2 {
            headers.retain(|(n, _)| n.chars().all(|c| !c.is_ascii_uppercase()));
        }
        Self {
            caller: *rng.pick(CALLERS),
            method: *rng.pick(METHODS),
            path: *rng.pick(PATHS),
            headers,
            http2,
            upgrade: (!http2 && rng.chance(15)).then(|| *rng.pick(UPGRADES)),
        }
    }
}

/// The independent invariants: what no policy here may ever let through.
fn forbidden(caller: &str, method: &str, path: &str) -> Option<&'static str> {
    let lower = path.to_ascii_lowercase();
    if method.eq_ignore_ascii_case("DELETE") {
        return Some("a DELETE in some spelling");
    }
    if lower == "/admin" || lower.starts_with("/admin/") || lower.starts_with("/admin?") {
        return Some("an /admin path");
    }
    if method.bytes().any(|b| b.is_ascii_lowercase()) {
        return Some("a non-canonical method");
    }
    if caller == "intruder" {
        return Some("a caller no policy names");
    }
    None
}

async fn send(t: &Target, case: &Case, id: usize) -> u16 {
    if case.http2 {
        let mut h2 = t.h2(case.caller).await;
        let mut req = http::Request::builder()
            .method(http::Method::from_bytes(case.method.as_bytes()).unwrap())
            .uri(format!("https://orders{}", case.path))
            .header("x-case", id.to_string());
        for (k, v) in &case.headers {
            req = req.header(*k, *v);
        }
        let resp = match h2.send_request(req.body(empty()).unwrap()).await {
            Ok(resp) => resp,
            Err(e) => panic!("case {id}: {case:?}: {e}"),
        };
        let status = resp.status().as_u16();
        let _ = resp.into_body().collect().await;
        return status;
    }
    let connector = t.client_for(case.caller, &[b"http/1.1"], Duration::from_secs(3600));
    let mut tls = t.connect(&connector).await;
    let mut raw = format!(
        "{} {} HTTP/1.1\r\nHost: orders\r\nx-case: {id}\r\n",
        case.method, case.path
    );
    for (k, v) in &case.headers {
        raw.push_str(&format!("{k}: {v}\r\n"));
    }
    match case.upgrade {
        Some(protocol) => raw.push_str(&format!(
            "Connection: Upgrade\r\nUpgrade: {protocol}\r\n\r\n"
        )),
        None => raw.push_str("Connection: close\r\n\r\n"),
    }
    tls.write_all(raw.as_bytes()).await.unwrap();
    let status = status_of(&read_head(&mut tls).await);
    if status == 101 {
        // An allowed upgrade: the bytes after it reach the app unjudged by design, so only
        // allowed protocols may get here.
        tls.write_all(b"ping").await.unwrap();
        let mut echo = [0u8; 4];
        let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_exact(&mut echo)).await;
    }
    status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_app_receives_is_what_the_policy_allows() {
    let _heavy = crate::support::heavy_async().await;
    let seed: u64 = std::env::var("DIFF_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x6d65_7368_6761_7465);
    let cases: usize = std::env::var("DIFF_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(400);
    eprintln!("differential test: seed {seed}, {cases} cases (DIFF_SEED / DIFF_CASES)");
    let t = Target::start().await;
    t.mesh.write_policy("orders.yaml", POLICY);
    t.mesh.converge().await;
    let set = meshgate_policy::load_dir(&t.mesh.policy_dir).unwrap();
    let orders = TestMesh::id_of("orders");
    let mut rng = Rng(seed);
    let (mut allowed, mut refused, mut upgraded) = (0, 0, 0);
    for id in 0..cases {
        let case = Case::generate(&mut rng);
        t.app.clear();
        let status = send(&t, &case, id).await;
        let seen: Vec<_> = t
            .app
            .requests()
            .into_iter()
            .filter(|s| s.header("x-case") == vec![id.to_string().as_str()])
            .collect();

        let headers: Vec<(String, String)> = case
            .headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let probe = Probe::new(
            TestMesh::id_of(case.caller).as_str(),
            orders.as_str(),
            Some(case.method),
            Some(case.path),
            t.app.addr.port(),
            &headers,
        )
        .unwrap();
        let judged = probe.judge(&set);
        let context = format!(
            "case {id} (seed {seed}): {case:?} → {status}, app saw {seen:?}, explain: {:?}",
            judged.decision
        );

        if judged.decision.allowed {
            allowed += 1;
            assert!(matches!(status, 200 | 101), "{context}");
            assert_eq!(seen.len(), 1, "{context}");
            let want = judged
                .normalized
                .as_ref()
                .and_then(|n| n.as_ref().ok())
                .unwrap()
                .to_target();
            assert_eq!(seen[0].path, want, "{context}");
            if status == 101 {
                upgraded += 1;
                let asked = case.upgrade.unwrap().to_ascii_lowercase();
                assert!(asked.starts_with("websocket"), "{context}");
            }
        } else {
            refused += 1;
            assert!(matches!(status, 400 | 403), "{context}");
            assert!(seen.is_empty(), "{context}");
        }
        for s in &seen {
            if let Some(why) = forbidden(case.caller, &s.method, &s.path) {
                panic!("{why} reached the app: {context}");
            }
            assert_eq!(
                s.header("x-meshgate-peer"),
                vec![TestMesh::id_of(case.caller).as_str()],
                "{context}"
            );
            let forged = s.headers.iter().any(|(k, v)| {
                k != "x-meshgate-peer" && k != "x-forwarded-client-cert" && v.contains("sa/admin")
            });
            assert!(!forged, "forged identity reached the app: {context}");
            assert!(
                s.header("upgrade")
                    .iter()
                    .all(|u| u.to_ascii_lowercase().starts_with("websocket")),
                "{context}"
            );
        }
    }
    eprintln!(
        "differential test: {allowed} allowed (of which {upgraded} upgraded), {refused} refused"
    );
    // The generator must exercise both sides, or the comparison proves nothing.
    assert!(
        allowed >= cases / 10 && refused >= cases / 10,
        "{allowed} / {refused}"
    );

    // L4 tunnels to the HTTP port, from every caller: never opened, nothing received.
    t.app.clear();
    for caller in ["web", "billing", "intruder"] {
        let connector = t.client_for(
            caller,
            &[meshgate_proxy::tunnel::ALPN],
            Duration::from_secs(60),
        );
        let mut tls = t.connect(&connector).await;
        let raw = format!(
            "MGTCP1 {}\nGET /public/a HTTP/1.1\r\nHost: orders\r\nConnection: close\r\n\r\n",
            t.app.addr.port()
        );
        tls.write_all(raw.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut answer)).await;
        assert!(
            !answer.starts_with(b"OK"),
            "{caller}: {:?}",
            Bytes::from(answer)
        );
    }
    assert!(t.app.requests().is_empty(), "{:?}", t.app.requests());
}
