//! Policy hot swap under load: requests keep flowing over the same pooled sidecar-to-sidecar
//! connection while the policy file is rewritten 100 times; no request fails, and every allowed
//! request was allowed by the policy version that judged it.

use std::sync::Arc;
use std::time::Duration;

use crate::support::mesh::TestMesh;

fn policy(prefix: &str) -> String {
    format!(
        r#"apiVersion: meshgate.dev/v1
kind: AuthorizationPolicy
metadata: {{ name: swap, namespace: shop }}
spec:
  selector: {{ account: orders }}
  action: ALLOW
  rules:
    - from: [{{ principals: ["spiffe://mesh.local/ns/shop/sa/web"] }}]
      to: [{{ paths: ["/{prefix}/*"] }}]
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewriting_the_policy_100_times_under_load() {
    let _heavy = crate::support::heavy_async().await;
    let mut mesh = TestMesh::new().await;
    mesh.add("web").await;
    mesh.add("orders").await;
    mesh.write_services();
    mesh.write_policy("swap.yaml", &policy("a"));
    let version_a = mesh.converge().await;
    mesh.write_policy("swap.yaml", &policy("b"));
    let version_b = mesh.converge().await;
    assert_ne!(version_a, version_b);
    let swaps_before = mesh
        .metric("orders", "meshgate_policy_swaps_total", &[])
        .await;
    let mesh = Arc::new(mesh);

    let writer = {
        let mesh = mesh.clone();
        tokio::spawn(async move {
            for i in 0..100 {
                mesh.write_policy("swap.yaml", &policy(if i % 2 == 0 { "a" } else { "b" }));
                tokio::time::sleep(Duration::from_millis(60)).await;
            }
        })
    };
    let (mut allowed, mut denied, mut requests) = (0, 0, 0);
    while !writer.is_finished() {
        for prefix in ["a", "b"] {
            let answer = mesh
                .call("web", "GET", "orders", &format!("/{prefix}/x"))
                .await;
            requests += 1;
            match answer.status {
                200 => {
                    allowed += 1;
                    let version = answer.echoed()["headers"]["x-meshgate-policy-version"]
                        .as_str()
                        .unwrap()
                        .to_string();
                    let expected = if prefix == "a" {
                        &version_a
                    } else {
                        &version_b
                    };
                    assert_eq!(
                        &version, expected,
                        "/{prefix}/x was allowed by a policy version that does not allow it"
                    );
                }
                403 => denied += 1,
                other => panic!(
                    "request {requests} failed during a swap: {other} {}",
                    answer.body
                ),
            }
        }
    }
    writer.await.unwrap();
    let swaps = mesh
        .metric("orders", "meshgate_policy_swaps_total", &[])
        .await
        - swaps_before;
    eprintln!(
        "hot swap: {requests} requests ({allowed} allowed, {denied} denied), {swaps} swaps observed, 0 errors"
    );
    assert!(swaps >= 30.0, "only {swaps} swaps were observed");
    assert!(allowed > 0 && denied > 0);
}
