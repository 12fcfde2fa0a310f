//! How long from saving a policy file to every connected sidecar having ACKed the new version?
//! 100 stream clients (the code sidecars use, each with its own SVID) against one control plane
//! with its default 250 ms directory poll; five updates; figures go to BENCHMARKS.md.
//!
//! `cargo bench --bench push_latency`

#[path = "../tests/it/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use meshgate_ca::tls::{self, CertResolver, ExpectedServer};
use meshgate_proxy::control_plane::{ControlPlaneConfig, RunningControlPlane};
use meshgate_proxy::identity::static_files::IdentityFiles;
use meshgate_proxy::policy::PolicyFiles;
use meshgate_proxy::sidecar::IdentitySource;
use meshgate_xds::client::StreamClient;
use rustls_pki_types::PrivatePkcs8KeyDer;
use support::TestCa;

const SIDECARS: usize = 100;
const UPDATES: usize = 5;

fn policy(n: usize) -> String {
    format!(
        "apiVersion: meshgate.dev/v1\nkind: AuthorizationPolicy\nmetadata: {{ name: p, namespace: shop }}\nspec:\n  action: ALLOW\n  rules:\n    - to: [{{ paths: [\"/v{n}/*\"] }}]\n"
    )
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let ca = TestCa::init();
        let base = ca.tmp.path().to_path_buf();
        let policies = base.join("policies");
        std::fs::create_dir_all(&policies).unwrap();
        std::fs::write(policies.join("p.yaml"), policy(0)).unwrap();
        let now = time::OffsetDateTime::now_utc();
        let hour = time::Duration::hours(1);
        let cp_files = base.join("cp");
        std::fs::create_dir_all(&cp_files).unwrap();
        let cp_svid = ca.sign_leaf(&support::id("spiffe://mesh.local/ns/meshgate/sa/control-plane"), now - hour, now + hour);
        support::write_chain(&cp_files.join("svid.pem"), &cp_svid.chain);
        std::fs::write(cp_files.join("key.pem"), cp_svid.key.serialize_pem()).unwrap();
        std::fs::write(cp_files.join("bundle.pem"), ca.bundle_pem()).unwrap();
        let cp = RunningControlPlane::start(ControlPlaneConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            admin: "127.0.0.1:0".parse().unwrap(),
            policy: PolicyFiles { dir: policies.clone(), services: None },
            identity: IdentitySource::Files(IdentityFiles {
                cert: cp_files.join("svid.pem"),
                key: cp_files.join("key.pem"),
                bundle: cp_files.join("bundle.pem"),
            }),
            poll_interval: Duration::from_millis(250),
            console_token: None,
            trace_ui: None,
        })
        .await
        .unwrap();
        let url = format!("https://{}", cp.addr);
        let bundle = Arc::new(arc_swap::ArcSwap::from_pointee(ca.bundle()));
        let cp_id = support::id("spiffe://mesh.local/ns/meshgate/sa/control-plane");
        for i in 0..SIDECARS {
            let svid = ca.sign_leaf(&support::id(&format!("spiffe://mesh.local/ns/shop/sa/w{i}")), now - hour, now + hour);
            let resolver = Arc::new(CertResolver::default());
            resolver.publish(svid.chain, PrivatePkcs8KeyDer::from(svid.key.serialize_der()).into()).unwrap();
            let config = tls::mesh_client_config(bundle.clone(), ExpectedServer::Exact(cp_id.clone()), Some(resolver), &[b"h2"]);
            let client = StreamClient::new(&[&url], Arc::new(config)).unwrap();
            tokio::spawn(client.run(|_| Ok(()), |_| {}, Duration::from_millis(200), Duration::from_secs(2)));
        }
        let all_acked = |version: &str| {
            let report = cp.control_plane.status();
            report.sidecars.iter().filter(|s| s["connected"] == true && s["acked_version"] == version).count() == SIDECARS
        };
        let mut previous = cp.control_plane.version().unwrap();
        while !all_acked(&previous) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut figures = Vec::new();
        for n in 1..=UPDATES {
            debug_assert!(n > 0);
            tokio::time::sleep(Duration::from_millis(300)).await;
            let saved = Instant::now();
            let tmp = policies.join(".p.tmp");
            std::fs::write(&tmp, policy(n)).unwrap();
            std::fs::rename(&tmp, policies.join("p.yaml")).unwrap();
            loop {
                if let Some(v) = cp.control_plane.version()
                    && v != previous
                    && all_acked(&v)
                {
                    figures.push(saved.elapsed());
                    previous = v;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        figures.sort();
        println!(
            "push latency, file save → all {SIDECARS} sidecars ACKed ({UPDATES} updates, 250 ms directory poll): min {:.0} ms, median {:.0} ms, max {:.0} ms",
            figures[0].as_secs_f64() * 1e3,
            figures[UPDATES / 2].as_secs_f64() * 1e3,
            figures[UPDATES - 1].as_secs_f64() * 1e3
        );
    });
}
