//! The docker-compose demo mesh (`examples/compose/docker-compose.yml`, the output of
//! `meshgate inject examples/compose/mesh.yml`) on a real Docker engine: the image built the
//! offline way (`--target prebuilt` with this test run's binary, on a local debootstrap base),
//! `docker-compose up`, then real `curl` requests from the host into `web`, whose app calls
//! `http://orders:8080` by name — the eBPF redirect takes it through both sidecars over mTLS:
//! 1. allowed → 200 (orders sees web's SPIFFE ID); two hops web → orders → payments → 200;
//! 2. denied → 403 by method, by path (`/orders/%2e%2e/admin` too), by identity (web → payments);
//! 3. a container outside the mesh reaching orders' app port directly gets nothing (ingress guard);
//! 4. a policy edit applies live, without restarting anything (time measured);
//! 5. the sidecars' traces reach an OTLP receiver, denials included;
//!
//! then `down`, and the redirect pins are removed.
//!
//! Needs root, a running Docker engine, `docker-compose`, `curl` and, when the local
//! `debian:bookworm-slim` image is missing, `debootstrap` (`scripts/docker-base-image.sh`).
//! Without them the test is skipped with a loud message; `COMPOSE_TESTS=require` (set by
//! `.ci/run`) turns the skip into a failure.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::support::otlp::OtlpReceiver;
use crate::support::privileged::{COMPOSE, have};
use crate::support::{free_port, text};

const PROJECT: &str = "meshgate-test";
const IMAGE: &str = "meshgate:test";
const WORKLOADS: [&str; 3] = ["web", "orders", "payments"];

use crate::support::repo;

fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn must(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed:\n{}", text(&out));
    out
}

/// `docker-compose` for the demo file, with this run's settings in the environment.
struct Compose {
    env: Vec<(&'static str, String)>,
}

impl Compose {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("docker-compose");
        cmd.current_dir(repo().join("examples/compose"))
            .args(["-p", PROJECT, "-f", "docker-compose.yml"])
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    fn down(&self) {
        let _ = self
            .cmd(&["down", "-v", "-t", "3", "--remove-orphans"])
            .output();
    }
}

/// The answer `web`'s app relays for `/call`: what its own outgoing call got.
#[derive(Debug)]
struct Relayed {
    status: u16,
    body: serde_json::Value,
}

/// `curl` into web's published port: web's app makes the call `method url` and relays it.
fn call(web_port: u16, method: &str, url: &str) -> Relayed {
    let out = must(Command::new("curl").args([
        "-sS",
        "--max-time",
        "10",
        "-G",
        &format!("http://127.0.0.1:{web_port}/call"),
        "--data-urlencode",
        &format!("url={url}"),
        "--data-urlencode",
        &format!("method={method}"),
        "-w",
        "\n%{http_code}",
    ]));
    let shown = String::from_utf8_lossy(&out.stdout).into_owned();
    let (json, code) = shown.rsplit_once('\n').unwrap_or((&shown, ""));
    let answer: serde_json::Value = serde_json::from_str(json)
        .unwrap_or_else(|e| panic!("{method} {url}: not JSON ({e}): {}", text(&out)));
    let status = answer["status"].as_u64().unwrap_or(0) as u16;
    // /call answers with the callee's status as its own, so curl alone tells 200 from 403.
    assert_eq!(code, status.to_string(), "{method} {url}: {shown}");
    Relayed {
        status,
        body: answer["body"].clone(),
    }
}

fn wait_until(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while started.elapsed() < limit {
        if ok() {
            return started.elapsed();
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("timed out after {limit:?} waiting for {what}");
}

/// Builds `IMAGE` from this run's binary with the Dockerfile's `prebuilt` target.
fn build_image() {
    let base = Command::new("docker")
        .args(["image", "inspect", "debian:bookworm-slim"])
        .output()
        .unwrap();
    if !base.status.success() {
        must(&mut Command::new(
            repo().join("scripts/docker-base-image.sh"),
        ));
    }
    let context = tempfile::tempdir().unwrap();
    std::fs::copy(repo().join("Dockerfile"), context.path().join("Dockerfile")).unwrap();
    std::fs::copy(
        crate::support::meshgate_bin(),
        context.path().join("meshgate"),
    )
    .unwrap();
    let started = Instant::now();
    must(
        Command::new("docker")
            .env("DOCKER_BUILDKIT", "0")
            .args(["build", "-q", "--target", "prebuilt"])
            .args(["--build-arg", "MESHGATE_BINARY=meshgate", "-t", IMAGE])
            .arg(context.path()),
    );
    eprintln!("image {IMAGE} built in {:?}", started.elapsed());
}

/// Detaches the demo's redirect pins and removes its cgroups (left by the redirect init steps).
fn remove_redirects(cgroup2: &Path) {
    for w in WORKLOADS {
        let app = cgroup2.join(format!("meshgate/shop-{w}/app"));
        if app.exists() {
            let _ = crate::support::meshgate()
                .args(["redirect", "detach", "--cgroup"])
                .arg(&app)
                .output();
        }
        for leaf in ["app", "proxy", ""] {
            let _ = std::fs::remove_dir(cgroup2.join(format!("meshgate/shop-{w}/{leaf}")));
        }
    }
}

fn preconditions() -> Result<PathBuf, String> {
    if !nix_is_root() {
        return Err("not root".into());
    }
    for tool in ["docker", "docker-compose", "curl"] {
        if !have(tool) {
            return Err(format!("{tool} is not installed"));
        }
    }
    if !succeeds(Command::new("docker").arg("info")) {
        return Err("no Docker engine answers (start dockerd)".into());
    }
    meshgate_ebpf::preflight()
        .cgroup2_mounts
        .into_iter()
        .next()
        .ok_or_else(|| "no cgroup v2 mount".to_string())
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compose_demo_mesh_allows_denies_applies_policy_live_and_traces() {
    let _heavy = crate::support::heavy_async().await;
    let _machine = crate::support::machine_lock("compose").await;
    let cgroup2 = match preconditions() {
        Ok(c) => c,
        Err(reason) => return COMPOSE.skip_or_fail(&reason),
    };
    // The pins must outlive the redirect init containers: they live in the host's bpffs.
    let bpffs_mounted = std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf "));
    if !bpffs_mounted {
        let _ = Command::new("mount")
            .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
            .output();
    }
    build_image();

    let policies = tempfile::tempdir().unwrap();
    for f in ["shop.yaml", "mesh.yaml"] {
        std::fs::copy(
            repo().join("examples/policies").join(f),
            policies.path().join(f),
        )
        .unwrap();
    }
    let otlp = OtlpReceiver::start_on("0.0.0.0:0").await;
    // Containers reach the host at the default bridge's address (docker0).
    let docker0 = must(Command::new("ip").args(["-4", "-o", "addr", "show", "dev", "docker0"]));
    let gateway = String::from_utf8_lossy(&docker0.stdout)
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|cidr| cidr.split('/').next())
        .map(str::to_string)
        .unwrap_or_else(|| panic!("no IPv4 address on docker0: {}", text(&docker0)));
    let web_port = free_port();
    let compose = Compose {
        env: vec![
            ("MESHGATE_IMAGE", IMAGE.to_string()),
            ("MESHGATE_WEB_PORT", web_port.to_string()),
            ("MESHGATE_POLICIES", policies.path().display().to_string()),
            ("MESHGATE_CGROUP2", cgroup2.display().to_string()),
            (
                "MESHGATE_OTLP_ENDPOINT",
                format!("http://{gateway}:{}", otlp.addr.port()),
            ),
        ],
    };
    compose.down();
    remove_redirects(&cgroup2);

    let result = std::panic::catch_unwind(|| scenario(&compose, web_port, policies.path()));
    let logs = compose
        .cmd(&["logs", "--no-color", "--tail", "30"])
        .output();
    let spans = if result.is_ok() {
        let spans = otlp
            .wait_for("spans from the compose sidecars", |spans| {
                spans.iter().any(|s| {
                    s.service == "payments"
                        && s.attr("meshgate.decision") == Some("deny")
                        && s.attr("meshgate.peer.id") == Some("spiffe://mesh.local/ns/shop/sa/web")
                })
            })
            .await;
        Some(spans)
    } else {
        None
    };
    compose.down();
    remove_redirects(&cgroup2);
    if let Err(panic) = result {
        if let Ok(out) = logs {
            eprintln!("compose logs:\n{}", text(&out));
        }
        std::panic::resume_unwind(panic);
    }
    let spans = spans.unwrap();
    let services: std::collections::BTreeSet<_> =
        spans.iter().map(|s| s.service.as_str()).collect();
    for w in WORKLOADS {
        assert!(services.contains(w), "no spans from {w}: {services:?}");
    }
    let pins = std::fs::read_dir("/sys/fs/bpf/meshgate")
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().contains("shop-"))
                .count()
        })
        .unwrap_or(0);
    assert_eq!(pins, 0, "redirect pins left behind");
}

fn scenario(compose: &Compose, web_port: u16, policies: &Path) {
    let started = Instant::now();
    must(&mut compose.cmd(&["up", "-d"]));
    let up = wait_until("web to answer", Duration::from_secs(120), || {
        succeeds(Command::new("curl").args([
            "-sf",
            "--max-time",
            "2",
            &format!("http://127.0.0.1:{web_port}/healthz"),
        ]))
    });
    eprintln!(
        "compose up: {:?} (web answering {:?} after up returned)",
        started.elapsed(),
        up
    );

    // 1. Allowed, by name, through the redirect and both sidecars.
    let ok = call(web_port, "GET", "http://orders:8080/orders/1");
    assert_eq!(ok.status, 200, "{ok:?}");
    assert_eq!(
        ok.body["caller"], "spiffe://mesh.local/ns/shop/sa/web",
        "orders' sidecar vouched for web: {ok:?}"
    );
    let chain = call(web_port, "GET", "http://orders:8080/orders/7/checkout");
    assert_eq!(chain.status, 200, "{chain:?}");
    assert_eq!(
        chain.body["payment"]["caller"], "spiffe://mesh.local/ns/shop/sa/orders",
        "payments saw orders' identity: {chain:?}"
    );

    // 2. Denied by method, by path (also encoded), by identity.
    let by_method = call(web_port, "POST", "http://orders:8080/orders/1");
    assert_eq!(by_method.status, 403, "{by_method:?}");
    let by_path = call(web_port, "GET", "http://orders:8080/orders/internal/stats");
    assert_eq!(by_path.status, 403, "{by_path:?}");
    let hostile = call(web_port, "GET", "http://orders:8080/orders/%2e%2e/admin");
    assert_eq!(hostile.status, 403, "{hostile:?}");
    let by_identity = call(web_port, "POST", "http://payments:8080/charge");
    assert_eq!(by_identity.status, 403, "{by_identity:?}");

    // 3. Outside the mesh, straight to orders' app port: the ingress guard drops it.
    let network = must(Command::new("docker").args([
        "network",
        "ls",
        "-q",
        "--filter",
        &format!("label=com.docker.compose.project={PROJECT}"),
    ]));
    let network = String::from_utf8_lossy(&network.stdout).trim().to_string();
    assert!(!network.is_empty(), "the compose network exists");
    let bypass = Command::new("docker")
        .args(["run", "--rm", "--network", &network, IMAGE])
        .args(["health", "--timeout", "3s", "http://orders:8080/healthz"])
        .output()
        .unwrap();
    assert!(
        !bypass.status.success() && text(&bypass).contains("unhealthy"),
        "a container outside the mesh reached orders' app directly: {}",
        text(&bypass)
    );
    // Plaintext to the sidecar's mTLS port is refused too.
    let plaintext = Command::new("docker")
        .args(["run", "--rm", "--network", &network, IMAGE])
        .args(["health", "--timeout", "3s", "http://orders:15006/orders/1"])
        .output()
        .unwrap();
    assert!(!plaintext.status.success(), "{}", text(&plaintext));

    // 4. A policy edit applies live: let web POST orders too. Nothing restarts.
    let shop = policies.join("shop.yaml");
    let edited = std::fs::read_to_string(&shop).unwrap().replace(
        r#"methods: ["GET", "HEAD"]"#,
        r#"methods: ["GET", "HEAD", "POST"]"#,
    );
    assert!(
        edited.contains(r#""POST"]"#),
        "the sample policy changed shape"
    );
    std::fs::write(&shop, edited).unwrap();
    let applied = wait_until(
        "the edited policy to allow POST",
        Duration::from_secs(20),
        || call(web_port, "POST", "http://orders:8080/orders/1").status == 200,
    );
    eprintln!("policy edit → applied in every sidecar within {applied:?}");
    // An invalid edit is refused; the last good policy stays in force.
    std::fs::write(
        policies.join("broken.yaml"),
        "kind: AuthorizationPolicy\nspec: [",
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        call(web_port, "POST", "http://orders:8080/orders/1").status,
        200
    );
    assert_eq!(
        call(web_port, "POST", "http://orders:8080/admin").status,
        403
    );
    let cp_logs = must(&mut compose.cmd(&["logs", "--no-color", "control-plane"]));
    assert!(
        text(&cp_logs).contains("broken.yaml"),
        "the control plane names the refused file: {}",
        text(&cp_logs)
    );
}
