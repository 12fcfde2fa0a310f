//! `meshgate demo`: a whole local mesh in one process — CA, three workloads (`web` → `orders` →
//! `payments`) each with its sidecar on loopback ports, the sample policies — then a little
//! traffic and a live table of the decisions.

pub mod app;
mod ebpf;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use meshgate_ca::service::{CaServer, ServeOptions};
use meshgate_ca::{CaDir, TrustDomain};
use meshgate_policy::{DecisionKind, DecisionRecord};
use meshgate_proxy::control_plane::{ControlPlaneConfig, RunningControlPlane};
use meshgate_proxy::identity::{Backoff, IdentityConfig};
use meshgate_proxy::inbound::AppProtocol;
use meshgate_proxy::policy::{PolicyFiles, PolicySource};
use meshgate_proxy::sidecar::{IdentitySource, Sidecar, SidecarConfig};
use meshgate_proxy::telemetry::TelemetryConfig;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use app::{DemoApp, Upstream, call_via};

/// The sample policies, embedded so the demo runs from any directory.
const SAMPLE_POLICIES: [(&str, &str); 2] = [
    (
        "shop.yaml",
        include_str!("../../examples/policies/shop.yaml"),
    ),
    (
        "mesh.yaml",
        include_str!("../../examples/policies/mesh.yaml"),
    ),
];
const WORKLOADS: [&str; 3] = ["web", "orders", "payments"];

/// Start a local demo mesh and show its decisions.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// First of the loopback ports the demo uses (it needs BASE and BASE+10…BASE+33).
    #[arg(long, default_value_t = 18000)]
    base_port: u16,
    /// Keep the CA and policies here instead of a temporary directory.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Exit after the scripted traffic instead of running until Ctrl-C.
    #[arg(long)]
    once: bool,
    /// Where the demo's own log goes (CA, control plane and sidecars, at `MESHGATE_LOG` level,
    /// default info); the terminal shows warnings only. Default: `DIR/meshgate.log` with --dir,
    /// else `meshgate-demo-<pid>.log` in the temporary directory (kept after exit).
    #[arg(long)]
    pub log_file: Option<PathBuf>,
    /// Run each workload in its own network namespace, app and sidecar in their own cgroups, with
    /// the eBPF redirect on the app's cgroup: apps call plain http://<service>:8080 (needs root
    /// and cgroup v2; --base-port does not apply).
    #[arg(long)]
    pub with_ebpf: bool,
}

/// The ports of one workload.
#[derive(Debug, Clone, Copy)]
struct WorkloadPorts {
    app: u16,
    inbound: u16,
    outbound: u16,
    admin: u16,
}

fn ports_of(base: u16, index: u16) -> WorkloadPorts {
    let first = base + 10 * (index + 1);
    WorkloadPorts {
        app: first,
        inbound: first + 1,
        outbound: first + 2,
        admin: first + 3,
    }
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Fails with the port and the flag to change when any port the demo needs is taken.
fn check_ports(base: u16) -> Result<()> {
    if base.checked_add(40).is_none() {
        bail!("--base-port {base} is too high: the demo needs BASE…BASE+33");
    }
    let mut needed = vec![
        (base, "the CA".to_string()),
        (base + 1, "the control plane".to_string()),
        (base + 2, "the control plane's admin".to_string()),
    ];
    for (i, name) in WORKLOADS.iter().enumerate() {
        let p = ports_of(base, i as u16);
        needed.extend([
            (p.app, format!("the {name} app")),
            (p.inbound, format!("{name}'s sidecar inbound")),
            (p.outbound, format!("{name}'s sidecar outbound")),
            (p.admin, format!("{name}'s sidecar admin")),
        ]);
    }
    for (port, what) in needed {
        if let Err(e) = std::net::TcpListener::bind(loopback(port)) {
            bail!(
                "port {port} (for {what}) is taken: {e}; choose another range with --base-port, e.g. --base-port {}",
                base.wrapping_add(1000)
            );
        }
    }
    Ok(())
}

fn id_of(name: &str) -> String {
    format!("spiffe://mesh.local/ns/shop/sa/{name}")
}

fn services_yaml(base: u16) -> String {
    WORKLOADS
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let p = ports_of(base, i as u16);
            format!(
                "apiVersion: meshgate.dev/v1\nkind: Service\nmetadata: {{ name: {name}, namespace: shop }}\nspec:\n  identity: {}\n  hosts: [{name}]\n  ports: [{{ port: {}, protocol: http }}]\n  endpoints: [\"127.0.0.1:{}\"]\n",
                id_of(name),
                p.app,
                p.inbound
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

/// One scripted request: who calls whom with what.
struct Step {
    from: &'static str,
    method: &'static str,
    to: &'static str,
    path: &'static str,
    shows: &'static str,
}

const SCRIPT: [Step; 8] = [
    Step {
        from: "web",
        method: "GET",
        to: "orders",
        path: "/orders/42",
        shows: "allowed: identity, method and path match orders-readers",
    },
    Step {
        from: "web",
        method: "GET",
        to: "orders",
        path: "/orders/42/checkout",
        shows: "two hops: orders then calls payments as itself",
    },
    Step {
        from: "web",
        method: "POST",
        to: "orders",
        path: "/orders/42",
        shows: "denied by method",
    },
    Step {
        from: "web",
        method: "POST",
        to: "payments",
        path: "/charge",
        shows: "denied by identity: only orders may charge",
    },
    Step {
        from: "web",
        method: "GET",
        to: "orders",
        path: "/orders/internal/stats",
        shows: "DENY overrides ALLOW",
    },
    Step {
        from: "web",
        method: "GET",
        to: "orders",
        path: "/orders/%2e%2e/admin",
        shows: "path normalized to /admin, then denied",
    },
    Step {
        from: "web",
        method: "GET",
        to: "orders",
        path: "/orders/..%2fadmin",
        shows: "encoded slash: refused before any policy (400)",
    },
    Step {
        from: "web",
        method: "GET",
        to: "orders",
        path: "/orders/export",
        shows: "allowed, but a dry-run policy would deny it",
    },
];

fn short(id: &meshgate_ca::SpiffeId) -> String {
    id.namespace_and_account()
        .map_or_else(|| id.to_string(), |(_, sa)| sa.to_string())
}

fn print_header() {
    println!();
    println!(
        "{:<20} {:<7} {:<24} {:<13} {:<32} REASON",
        "WHO → WHOM", "METHOD", "PATH (as judged)", "DECISION", "POLICY/RULE"
    );
    println!("{}", "─".repeat(120));
}

/// One line of the decision table (from an in-process [`DecisionRecord`], or a child sidecar's
/// JSON decision log line).
#[derive(Debug, Clone)]
struct Row {
    who: String,
    method: String,
    path: String,
    decision: String,
    policy: String,
    reason: String,
}

fn print_row(r: &Row) {
    println!(
        "{:<20} {:<7} {:<24} {:<13} {:<32} {}",
        r.who, r.method, r.path, r.decision, r.policy, r.reason
    );
}

impl From<&DecisionRecord> for Row {
    fn from(e: &DecisionRecord) -> Self {
        let policy = match (&e.policy, e.rule) {
            _ if e.decision == DecisionKind::BadRequest => "(path normalization)".to_string(),
            (Some(p), Some(r)) => format!("{p} #{r}"),
            (Some(p), None) => p.clone(),
            _ => "-".to_string(),
        };
        Row {
            who: format!("{} → {}", short(&e.peer), short(&e.workload)),
            method: e.method.clone().unwrap_or_else(|| "(tcp)".to_string()),
            // What was judged; what was sent when it could not be judged.
            path: e
                .path
                .clone()
                .or_else(|| e.original.clone())
                .unwrap_or_else(|| format!(":{}", e.port)),
            decision: e.decision.as_str().to_string(),
            policy,
            reason: e.reason.clone(),
        }
    }
}

fn print_event(e: &DecisionRecord) {
    print_row(&Row::from(e));
}

async fn drain_events(events: &mut mpsc::UnboundedReceiver<DecisionRecord>, wait: Duration) {
    tokio::time::sleep(wait).await;
    while let Ok(e) = events.try_recv() {
        print_event(&e);
    }
}

pub fn run(args: DemoArgs) -> Result<()> {
    if args.with_ebpf {
        return ebpf::run(args);
    }
    check_ports(args.base_port)?;
    let (_temp, dir) = state_dir(&args)?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(demo(args, &dir))
}

/// Where the demo keeps its CA, policies and logs: `--dir`, or a temporary directory that lives
/// as long as the returned guard.
fn state_dir(args: &DemoArgs) -> Result<(Option<tempfile::TempDir>, PathBuf)> {
    Ok(match &args.dir {
        Some(d) => (None, d.clone()),
        None => {
            let temp = tempfile::tempdir().context("creating a temporary directory")?;
            let dir = temp.path().to_path_buf();
            (Some(temp), dir)
        }
    })
}

/// The demo's log file (see [`DemoArgs::log_file`]): outside a temporary state directory, so
/// that a file the demo names still exists after it exits.
pub fn log_path(args: &DemoArgs) -> PathBuf {
    match (&args.log_file, &args.dir) {
        (Some(file), _) => file.clone(),
        (None, Some(dir)) => dir.join("meshgate.log"),
        (None, None) => {
            std::env::temp_dir().join(format!("meshgate-demo-{}.log", std::process::id()))
        }
    }
}

async fn demo(args: DemoArgs, dir: &Path) -> Result<()> {
    let base = args.base_port;
    println!(
        "meshgate demo — a local mesh: web → orders → payments (state in {})",
        dir.display()
    );
    println!(
        "  log           {} (the terminal shows warnings only)",
        log_path(&args).display()
    );

    // CA.
    let ca_dir = CaDir::new(dir.join("ca"));
    let td = TrustDomain::new("mesh.local").expect("valid trust domain");
    ca_dir.init(&td, true)?;
    let ca = CaServer::bind(
        ca_dir.open()?,
        loopback(base),
        ServeOptions {
            svid_ttl: Duration::from_secs(3600),
            serving_hosts: vec![],
            limits: Default::default(),
            k8s: None,
        },
    )
    .await?;
    let ca_url = format!("https://{}", ca.local_addr());
    let (stop_ca, ca_stopped) = tokio::sync::oneshot::channel::<()>();
    let ca_task = tokio::spawn(ca.run(async {
        let _ = ca_stopped.await;
    }));
    println!("  CA            {ca_url}");

    // Policies: the samples plus the Services of this demo.
    let policy_dir = dir.join("policies");
    std::fs::create_dir_all(&policy_dir)?;
    for (name, text) in SAMPLE_POLICIES {
        std::fs::write(policy_dir.join(name), text)?;
    }
    std::fs::write(policy_dir.join("services.yaml"), services_yaml(base))?;

    // Control plane, with its own SVID from the CA.
    let token_key = ca_dir.token_key()?;
    let cp_id = td
        .workload_id("meshgate", "control-plane")
        .expect("valid ID");
    let (cp_token, _) = token_key.mint(&cp_id, Duration::from_secs(300), false);
    let control_plane = RunningControlPlane::start(ControlPlaneConfig {
        listen: loopback(base + 1),
        admin: loopback(base + 2),
        policy: PolicyFiles {
            dir: policy_dir.clone(),
            services: None,
        },
        identity: IdentitySource::Ca(IdentityConfig {
            ca_url: ca_url.clone(),
            ca_bundle_pem: std::fs::read(ca_dir.bundle_path())?,
            token: cp_token.into(),
            bundle_refresh: Duration::from_secs(60),
            backoff: Backoff::default(),
        }),
        poll_interval: Duration::from_millis(250),
        console_token: None,
        trace_ui: None,
    })
    .await
    .context("starting the control plane")?;
    println!(
        "  control plane https://{}  (status: meshgate status --control-plane http://{})",
        control_plane.addr, control_plane.admin_addr
    );

    // Workloads: app + sidecar each.
    let (events_tx, mut events) = mpsc::unbounded_channel::<DecisionRecord>();
    let mut sidecars = Vec::new();
    for (i, name) in WORKLOADS.iter().enumerate() {
        let p = ports_of(base, i as u16);
        let listener = TcpListener::bind(loopback(p.app))
            .await
            .with_context(|| format!("{name} app on port {}", p.app))?;
        tokio::spawn(
            DemoApp {
                name: name.to_string(),
                upstream: Some(Upstream {
                    via: Some(loopback(p.outbound)),
                    resolve: Vec::new(),
                }),
                payments_url: "http://payments".to_string(),
            }
            .serve(listener),
        );
        let id = meshgate_ca::SpiffeId::parse(&id_of(name)).expect("valid ID");
        let (token, _) = token_key.mint(&id, Duration::from_secs(300), false);
        let sidecar = Sidecar::start(SidecarConfig {
            apps: vec![loopback(p.app)],
            app_protocol: AppProtocol::Auto,
            mesh_protocol: Default::default(),
            identity: IdentitySource::Ca(IdentityConfig {
                ca_url: ca_url.clone(),
                ca_bundle_pem: std::fs::read(ca_dir.bundle_path())?,
                token: token.into(),
                bundle_refresh: Duration::from_secs(60),
                backoff: Backoff::default(),
            }),
            policy: PolicySource::ControlPlane {
                urls: vec![format!("https://{}", control_plane.addr)],
            },
            inbound: loopback(p.inbound),
            outbound: loopback(p.outbound),
            admin: loopback(p.admin),
            probe: loopback(0),
            probe_paths: vec![],
            probe_self: false,
            probe_tcp: vec![],
            probe_grpc: vec![],
            allow_tls12: false,
            tcp_forwards: vec![],
            inbound_tcp_ports: vec![],
            allowed_upgrades: vec!["websocket".into()],
            limits: Default::default(),
            detect_timeout: Duration::from_millis(500),
            opaque_ports: vec![],
            drain: Duration::from_secs(2),
            poll_interval: Duration::from_millis(500),
            telemetry: TelemetryConfig::from_env(false),
            ebpf_cgroup: None,
            flow_report_interval: meshgate_proxy::flows::DEFAULT_REPORT_INTERVAL,
        })
        .await
        .with_context(|| format!("starting {name}'s sidecar"))?;
        let mut feed = sidecar.decisions();
        let tx = events_tx.clone();
        tokio::spawn(async move {
            while let Ok(e) = feed.recv().await {
                if tx.send(e).is_err() {
                    return;
                }
            }
        });
        println!(
            "  {name:<13} app 127.0.0.1:{}  sidecar: inbound (mTLS) :{}  outbound :{}  admin http://127.0.0.1:{}",
            p.app, p.inbound, p.outbound, p.admin
        );
        sidecars.push(sidecar);
    }
    for s in &sidecars {
        for _ in 0..100 {
            if s.policy.is_loaded() && s.identity.is_ready() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if !s.policy.is_loaded() {
            bail!(
                "{}'s sidecar did not load the sample policies: {}",
                s.identity.id(),
                s.policy.last_error().unwrap_or_default()
            );
        }
    }
    // Let every sidecar's routes pick up the Services.
    tokio::time::sleep(Duration::from_millis(600)).await;

    println!(
        "\nScripted traffic (each app calls through its own sidecar; the judging sidecar decides):"
    );
    print_header();
    for step in SCRIPT {
        let from = WORKLOADS
            .iter()
            .position(|w| *w == step.from)
            .expect("known workload") as u16;
        let outbound = loopback(ports_of(base, from).outbound);
        let status = match call_via(outbound, step.method, step.to, step.path, &[], "").await {
            Ok((status, _)) => status.to_string(),
            Err(e) => format!("error: {e}"),
        };
        drain_events(&mut events, Duration::from_millis(150)).await;
        println!(
            "{:>20} ↳ {} {} {} → HTTP {status}   ({})",
            "", step.from, step.method, step.path, step.shows
        );
    }

    let explain = format!(
        "meshgate policy explain {} --from {} --to {} --method POST --path /orders/42",
        policy_dir.display(),
        id_of("web"),
        id_of("orders")
    );
    let web_out = ports_of(base, 0).outbound;
    let orders_admin = ports_of(base, 1).admin;
    println!("\nWhere to look next:");
    println!(
        "  console      http://{}/console   (service graph, live tap, flows, SLIs; or `meshgate dashboard --control-plane http://{}`)",
        control_plane.admin_addr, control_plane.admin_addr
    );
    println!(
        "  tap          meshgate tap --control-plane http://{} --decision deny   (each decision, live)",
        control_plane.admin_addr
    );
    println!(
        "  admin        curl http://127.0.0.1:{orders_admin}/config   (/metrics /identity /ready)"
    );
    println!(
        "  be the app   curl -H 'Host: orders' http://127.0.0.1:{web_out}/orders/7      (as web, through its sidecar)"
    );
    println!("  explain      {explain}");
    println!(
        "  edit live    {}  (changes apply within a second)",
        policy_dir.join("shop.yaml").display()
    );
    println!(
        "  traces       set OTEL_EXPORTER_OTLP_ENDPOINT=http://<collector>:4318 before `meshgate demo`"
    );

    if !args.once {
        println!("\nWatching decisions live; Ctrl-C to stop.");
        print_header();
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => break,
                _ = term.recv() => break,
                Some(e) = events.recv() => print_event(&e),
            }
        }
    }
    println!("\nstopping…");
    for s in &sidecars {
        s.shutdown();
    }
    for s in sidecars {
        s.wait().await;
    }
    control_plane.shutdown();
    control_plane.wait().await;
    let _ = stop_ca.send(());
    let _ = ca_task.await;
    println!("stopped.");
    Ok(())
}
