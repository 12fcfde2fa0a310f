//! `meshgate proxy`: the sidecar.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use meshgate_proxy::identity::static_files::IdentityFiles;
use meshgate_proxy::identity::{Backoff, BootstrapToken, IdentityConfig};
use meshgate_proxy::inbound::AppProtocol;
use meshgate_proxy::outbound::MeshProtocol;
use meshgate_proxy::policy::{PolicyFiles, PolicySource};
use meshgate_proxy::sidecar::{IdentitySource, Sidecar, SidecarConfig};

use crate::parse_duration;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum AppProtocolArg {
    /// HTTP/2 (h2c) to the app for gRPC, HTTP/1.1 for everything else, whatever the caller speaks.
    Auto,
    /// HTTP/1.1 only (gRPC callers get an error from the app).
    Http1,
    /// HTTP/2 with prior knowledge for every request.
    H2c,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum MeshProtocolArg {
    /// Every request over one multiplexed HTTP/2 connection per peer sidecar (Linkerd's way).
    Http2,
    /// HTTP/1.1 requests over kept-alive HTTP/1.1 mTLS connections, one request at a time each
    /// (Istio's default); HTTP/2 and gRPC stay on HTTP/2. Answers a moderate load sooner; costs
    /// as much CPU or more at saturation and one connection per concurrent request.
    Preserve,
}

/// Where a workload's SVID comes from: files, or the CA (shared by `proxy` and `control-plane`).
#[derive(Debug, Args)]
pub struct IdentityArgs {
    /// Static identity: the SVID chain (leaf first), PEM; the three files are watched.
    #[arg(long, requires_all = ["svid_key", "trust_bundle"], conflicts_with = "ca")]
    svid_cert: Option<PathBuf>,
    /// Static identity: the SVID's private key, PEM.
    #[arg(long, requires = "svid_cert")]
    svid_key: Option<PathBuf>,
    /// Static identity: the trusted roots, PEM.
    #[arg(long, requires = "svid_cert")]
    trust_bundle: Option<PathBuf>,

    /// CA-issued identity: URL of `meshgate ca serve`, e.g. https://127.0.0.1:15012.
    #[arg(long, requires = "ca_bundle")]
    ca: Option<String>,
    /// Roots the CA's serving certificate chains to.
    #[arg(long, requires = "ca")]
    ca_bundle: Option<PathBuf>,
    /// Join token from `meshgate ca token` (prefer the environment: command lines are visible in ps).
    #[arg(long, env = "MESHGATE_TOKEN", hide_env_values = true, requires = "ca")]
    token: Option<String>,
    /// Read the bootstrap token from this file, again before every bootstrap attempt: a join
    /// token (a mounted Secret or a shared bootstrap volume) or a Kubernetes projected
    /// ServiceAccount token (which kubelet rewrites), for a CA started with --k8s-issuer.
    #[arg(long, requires = "ca", conflicts_with = "token")]
    token_file: Option<PathBuf>,
}

impl IdentityArgs {
    /// The bootstrap token from `--token`/`MESHGATE_TOKEN` or `--token-file` (checked readable
    /// now, so a wrong path fails at start; re-read by the identity client at each attempt).
    fn bootstrap_token(&self) -> Result<BootstrapToken> {
        let token = match (&self.token, &self.token_file) {
            (Some(token), _) => BootstrapToken::Value(token.clone()),
            (None, Some(path)) => BootstrapToken::File(path.clone()),
            (None, None) => bail!(
                "a CA-issued identity needs a bootstrap token: --token, MESHGATE_TOKEN or --token-file (a join token, or a projected ServiceAccount token)"
            ),
        };
        token.read()?;
        Ok(token)
    }

    /// The identity source these flags describe.
    pub fn source(&self) -> Result<IdentitySource> {
        Ok(match (&self.svid_cert, &self.ca) {
            (Some(cert), None) => IdentitySource::Files(IdentityFiles {
                cert: cert.clone(),
                key: self.svid_key.clone().expect("clap requires it"),
                bundle: self.trust_bundle.clone().expect("clap requires it"),
            }),
            (None, Some(url)) => {
                let bundle_path = self.ca_bundle.clone().expect("clap requires it");
                IdentitySource::Ca(IdentityConfig {
                    ca_url: url.clone(),
                    ca_bundle_pem: std::fs::read(&bundle_path)
                        .with_context(|| format!("reading {}", bundle_path.display()))?,
                    token: self.bootstrap_token()?,
                    bundle_refresh: Duration::from_secs(60),
                    backoff: Backoff::default(),
                })
            }
            _ => bail!(
                "give an identity: --svid-cert/--svid-key/--trust-bundle (files) or --ca/--ca-bundle/--token[-file] (issued by the CA)"
            ),
        })
    }
}

/// Run the sidecar of one workload.
#[derive(Debug, Args)]
pub struct ProxyArgs {
    /// A local HTTP app the sidecar protects (HOST:PORT; repeatable, one per port). The first is
    /// the default: it serves requests whose calling sidecar names no app port (the port the
    /// caller addressed, sent only when the Service declares it in `ports`).
    /// Without any, the sidecar is outbound-only (a workload that listens nowhere, such as a
    /// load generator or a batch job): its inbound listener refuses every request with 421.
    #[arg(long = "app", value_name = "HOST:PORT")]
    apps: Vec<SocketAddr>,
    /// Which HTTP the apps speak (one setting for every --app).
    #[arg(long, value_enum, default_value_t = AppProtocolArg::Auto)]
    app_protocol: AppProtocolArg,
    /// How requests travel to other sidecars.
    #[arg(long, value_enum, default_value_t = MeshProtocolArg::Http2)]
    mesh_protocol: MeshProtocolArg,

    #[command(flatten)]
    identity: IdentityArgs,

    /// Directory of policy-as-code YAML files (watched; SIGHUP reloads at once).
    #[arg(long, required_unless_present = "control_plane")]
    policy_dir: Option<PathBuf>,
    /// Control plane URL, e.g. https://127.0.0.1:15010 (its SVID must be
    /// spiffe://<td>/ns/meshgate/sa/control-plane). Repeat it or comma-separate URLs for
    /// replicas; a host name resolving to several addresses (a headless Service) counts as
    /// several replicas. A lost stream fails over to the next replica at once.
    #[arg(long, value_delimiter = ',', conflicts_with = "policy_dir")]
    control_plane: Vec<String>,
    /// Static list of Service documents for outbound routing.
    #[arg(long)]
    services: Option<PathBuf>,

    /// mTLS listener for callers (other sidecars).
    #[arg(long, default_value = "0.0.0.0:15006")]
    inbound: SocketAddr,
    /// Plain HTTP listener for the local app's outgoing calls (or its HTTP proxy).
    #[arg(long, default_value = "127.0.0.1:15001")]
    outbound: SocketAddr,
    /// Admin listener (/ready, /live, /config, /identity, /metrics, POST /shutdown); keep it on loopback.
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin: SocketAddr,
    /// Plaintext health-probe listener (only with --probe-path, --probe-self, --probe-tcp or
    /// --probe-grpc).
    #[arg(long, default_value = "0.0.0.0:15020")]
    probe: SocketAddr,
    /// App path that health probes may reach without mTLS (GET/HEAD, exact match; repeatable):
    /// PATH is served at PATH by the default --app; APP_PORT:PATH at
    /// /meshgate/probe/http/APP_PORT/PATH by the --app on APP_PORT.
    #[arg(long = "probe-path")]
    probe_paths: Vec<String>,
    /// Also answer the sidecar's own readiness (/meshgate/ready) and liveness (/meshgate/live)
    /// on the probe listener, for kubelet probes of the sidecar container.
    #[arg(long)]
    probe_self: bool,
    /// Local port the probe listener may test with a TCP connect to 127.0.0.1:PORT, at
    /// GET /meshgate/probe/tcp/PORT[?timeout=SECONDS] (kubelet tcpSocket probes; repeatable).
    #[arg(long = "probe-tcp", value_name = "PORT")]
    probe_tcp: Vec<u16>,
    /// Local port the probe listener may ask grpc.health.v1.Health/Check over h2c, at
    /// GET /meshgate/probe/grpc/PORT[?service=NAME][&timeout=SECONDS] (kubelet grpc probes;
    /// 200 only when SERVING; repeatable).
    #[arg(long = "probe-grpc", value_name = "PORT")]
    probe_grpc: Vec<u16>,
    /// Tunnel a local TCP port to a Service over mTLS (opaque L4), e.g.
    /// `127.0.0.1:15432=postgres:5432` (repeatable).
    #[arg(long = "tcp-forward")]
    tcp_forwards: Vec<meshgate_proxy::outbound::tcp::TcpForward>,
    /// App port that inbound L4 tunnels (opaque TCP) may reach (repeatable). Never an --app
    /// port: HTTP is authorized per request, so it cannot also be an opaque tunnel.
    #[arg(long = "inbound-tcp-port")]
    inbound_tcp_ports: Vec<u16>,
    /// `Upgrade` protocol that may reach the app (repeatable; default: websocket). Others
    /// (e.g. h2c) are removed from the request, which goes on without the upgrade: after a 101
    /// the bytes are no longer judged per request.
    #[arg(long = "allow-upgrade", default_values_t = ["websocket".to_string()])]
    allowed_upgrades: Vec<String>,
    /// Most connections open at once on each listener; more are closed at accept and counted.
    #[arg(long, default_value_t = 10_000)]
    max_connections: usize,
    /// Most inbound (mTLS) connections open at once from one source address.
    #[arg(long, default_value_t = 2_000)]
    max_connections_per_source: usize,
    /// Close an HTTP connection (HTTP/1.1 keep-alive or HTTP/2), from a peer to the inbound
    /// listener or from the app to the outbound one, after this long with no bytes in either
    /// direction.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    idle_timeout: Duration,
    /// How long redirected connections may take to send their first bytes before they are
    /// handled as opaque TCP (server-speaks-first protocols).
    #[arg(long, default_value = "500ms", value_parser = parse_duration)]
    detect_timeout: Duration,
    /// Destination port always handled as opaque TCP, without detection (repeatable).
    #[arg(long = "opaque-port")]
    opaque_ports: Vec<u16>,
    /// Turn OpenTelemetry tracing off (it is on when OTEL_EXPORTER_OTLP_ENDPOINT or
    /// OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is set).
    #[arg(long)]
    no_tracing: bool,
    /// The app's cgroup attached with `meshgate redirect attach`: export its eBPF counters on
    /// /metrics (reading them needs CAP_BPF), and with --control-plane report its denials and
    /// direct egress as L3/L4 flows.
    #[arg(long)]
    ebpf_cgroup: Option<PathBuf>,
    /// With --control-plane: how often the decisions aggregated into flows are reported to it
    /// (at most 4096 distinct flows per interval; the rest are counted in
    /// meshgate_flow_cardinality_overflow_total). A lost control plane loses at most one report.
    #[arg(long, default_value = "5s", value_parser = parse_flow_interval)]
    flow_report_interval: Duration,
    /// Also accept TLS 1.2 on the inbound listener (TLS 1.3 only by default).
    #[arg(long)]
    allow_tls12: bool,
    /// How long open connections may finish after SIGTERM.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    drain: Duration,
    /// How often policy and identity files are checked for changes.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    poll_interval: Duration,
    /// Threads that serve connections [default: the CPUs this process may use, from its
    /// affinity and its cgroup's CPU limit]. With one, the sidecar runs on a single-threaded
    /// scheduler, as Linkerd's proxy does on one core: no work stealing, no cross-thread
    /// wake-ups.
    #[arg(long, env = "MESHGATE_WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..=1024))]
    worker_threads: Option<u16>,
}

pub fn run(args: ProxyArgs) -> Result<()> {
    if let Err(e) = meshgate_proxy::sidecar::check_apps(&args.apps, &args.inbound_tcp_ports) {
        bail!("{e}");
    }
    if let Some(bad) = args
        .allowed_upgrades
        .iter()
        .find(|p| !meshgate_policy::validate::is_token(p) || p.eq_ignore_ascii_case("h2c"))
    {
        bail!(
            "--allow-upgrade {bad:?}: not an allowable upgrade protocol (an RFC 9110 token, and never h2c, which would carry HTTP/2 streams no rule judges), e.g. websocket"
        );
    }
    let identity = args.identity.source()?;
    let config = SidecarConfig {
        apps: args.apps.clone(),
        app_protocol: match args.app_protocol {
            AppProtocolArg::Auto => AppProtocol::Auto,
            AppProtocolArg::Http1 => AppProtocol::Http1,
            AppProtocolArg::H2c => AppProtocol::H2c,
        },
        mesh_protocol: match args.mesh_protocol {
            MeshProtocolArg::Http2 => MeshProtocol::Http2,
            MeshProtocolArg::Preserve => MeshProtocol::Preserve,
        },
        identity,
        policy: match (args.control_plane.is_empty(), &args.policy_dir) {
            (false, _) => PolicySource::ControlPlane {
                urls: args.control_plane.clone(),
            },
            (true, Some(dir)) => PolicySource::Files(PolicyFiles {
                dir: dir.clone(),
                services: args.services.clone(),
            }),
            (true, None) => bail!(
                "give a policy source: --policy-dir DIR or --control-plane https://HOST:15010"
            ),
        },
        inbound: args.inbound,
        outbound: args.outbound,
        admin: args.admin,
        probe: args.probe,
        probe_paths: args.probe_paths.clone(),
        probe_self: args.probe_self,
        probe_tcp: args.probe_tcp.clone(),
        probe_grpc: args.probe_grpc.clone(),
        allow_tls12: args.allow_tls12,
        tcp_forwards: args.tcp_forwards.clone(),
        inbound_tcp_ports: args.inbound_tcp_ports.clone(),
        allowed_upgrades: args.allowed_upgrades.clone(),
        limits: meshgate_proxy::serve::Limits {
            connections: args.max_connections,
            per_source: args.max_connections_per_source,
            idle: args.idle_timeout,
            ..Default::default()
        },
        detect_timeout: args.detect_timeout,
        opaque_ports: args.opaque_ports.clone(),
        drain: args.drain,
        poll_interval: args.poll_interval,
        telemetry: meshgate_proxy::telemetry::TelemetryConfig::from_env(args.no_tracing),
        ebpf_cgroup: args.ebpf_cgroup.clone(),
        flow_report_interval: args.flow_report_interval,
    };
    let (runtime, threads) = sidecar_runtime(args.worker_threads)?;
    runtime.block_on(async {
        tracing::info!(
            event = "sidecar.runtime",
            worker_threads = threads,
            scheduler = ?tokio::runtime::Handle::current().runtime_flavor(),
            "serving connections on {threads} thread(s)"
        );
        let sidecar = Sidecar::start(config).await?;
        tokio::spawn(crate::alloc::return_freed_memory(Duration::from_secs(1)));
        println!(
            "meshgate proxy for {}: inbound {} (mTLS), outbound {}, admin http://{}",
            sidecar.identity.id(),
            sidecar.inbound_addr,
            sidecar.outbound_addr,
            sidecar.admin_addr
        );
        let mut stopping = sidecar.shutdown_signal();
        tokio::select! {
            _ = crate::ca_cmd::shutdown_signal() => {
                tracing::info!(event = "sidecar.draining", "signal received; draining");
                sidecar.shutdown();
            }
            _ = stopping.wait_for(|s| *s) => {}
        }
        sidecar.wait().await;
        Ok(())
    })
}

/// A report interval: a duration of at least 100 ms (shorter would turn reports into a stream of
/// tiny lines for no benefit).
fn parse_flow_interval(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < Duration::from_millis(100) {
        return Err(format!(
            "{s} is too short: flow reports need an interval of at least 100ms (the default is 5s)"
        ));
    }
    Ok(d)
}

/// The sidecar's scheduler: `threads` workers, by default one per CPU this process may use
/// (`available_parallelism` reads the affinity mask and the cgroup's CPU quota). One thread gets
/// tokio's current-thread scheduler: a sidecar given one core (a CPU limit of 1, or pinned)
/// then runs its tasks without the multi-threaded scheduler's queues shared between workers, its
/// atomic wake-ups and its parking (BENCHMARKS.md, thirteenth session); Linkerd's proxy does the
/// same. Blocking work (DNS, file writes) runs off this thread either way.
fn sidecar_runtime(threads: Option<u16>) -> std::io::Result<(tokio::runtime::Runtime, usize)> {
    let threads = threads.map_or_else(
        || std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
        usize::from,
    );
    let runtime = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()?
    };
    Ok((runtime, threads))
}
