//! Wiring of one sidecar: identity, policy, inbound, outbound and admin listeners.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use meshgate_policy::PolicySet;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::admin::Admin;
use crate::identity::static_files::IdentityFiles;
use crate::identity::{Identity, IdentityClient, IdentityConfig, IdentityError};
use crate::inbound::{AppForwarder, AppProtocol, AuthzContext, Inbound};
use crate::metrics::Metrics;
use crate::outbound::{Outbound, Route, RouteTable};
use crate::policy::{PolicySource, PolicyState};

/// Where the sidecar's identity comes from.
#[derive(Debug, Clone)]
pub enum IdentitySource {
    /// Certificate, key and bundle files, polled for changes.
    Files(IdentityFiles),
    /// Issued and rotated by the meshgate CA.
    Ca(IdentityConfig),
}

impl IdentitySource {
    /// Obtains the first certificate (failing if it cannot) and keeps it fresh in the background.
    pub async fn start(self, poll_interval: Duration) -> Result<Arc<Identity>, IdentityError> {
        match self {
            IdentitySource::Files(files) => files.start(poll_interval),
            IdentitySource::Ca(ca) => IdentityClient::new(ca)?.start().await,
        }
    }
}

/// Everything `meshgate proxy` is told.
#[derive(Debug, Clone)]
pub struct SidecarConfig {
    /// The HTTP apps the inbound serves (`--app`, repeatable): the first is the default, for
    /// requests whose calling sidecar names no app port. Ports must differ.
    pub apps: Vec<SocketAddr>,
    pub app_protocol: AppProtocol,
    /// How requests travel to other sidecars (`--mesh-protocol`).
    pub mesh_protocol: crate::outbound::MeshProtocol,
    pub identity: IdentitySource,
    pub policy: PolicySource,
    pub inbound: SocketAddr,
    pub outbound: SocketAddr,
    pub admin: SocketAddr,
    /// Plaintext probe listener; bound only when something is to be probed through it
    /// (`probe_paths`, `probe_self`, `probe_tcp` or `probe_grpc`).
    pub probe: SocketAddr,
    /// Exact paths the probe listener forwards to an app (GET/HEAD only): `PATH` for the default
    /// app, `PORT:PATH` for the `--app` on PORT (at `/meshgate/probe/http/PORT/PATH`).
    pub probe_paths: Vec<String>,
    /// The probe listener also answers the sidecar's own `/meshgate/ready` and `/meshgate/live`
    /// (for kubelet probes of the sidecar container); binds it even without probe paths.
    pub probe_self: bool,
    /// Local ports the probe listener may test with a TCP connect
    /// (`/meshgate/probe/tcp/<port>`, for kubelet `tcpSocket` probes).
    pub probe_tcp: Vec<u16>,
    /// Local ports the probe listener may ask `grpc.health.v1.Health/Check`
    /// (`/meshgate/probe/grpc/<port>`, for kubelet `grpc` probes).
    pub probe_grpc: Vec<u16>,
    pub allow_tls12: bool,
    /// Local TCP ports whose connections are tunnelled to a Service (opaque L4).
    pub tcp_forwards: Vec<crate::outbound::tcp::TcpForward>,
    /// Extra app ports that inbound L4 tunnels may reach (the app's own port always may).
    pub inbound_tcp_ports: Vec<u16>,
    /// Connection caps and the idle timeout of the listeners.
    pub limits: crate::serve::Limits,
    /// `Upgrade` protocols that may reach the app (lowercase tokens; `websocket` by default).
    pub allowed_upgrades: Vec<String>,
    /// Protocol detection on redirected outbound connections.
    pub detect_timeout: Duration,
    /// Destination ports always treated as opaque TCP.
    pub opaque_ports: Vec<u16>,
    /// How long open connections may finish after shutdown starts.
    pub drain: Duration,
    /// How often policy and identity files are checked for changes.
    pub poll_interval: Duration,
    /// OpenTelemetry tracing.
    pub telemetry: crate::telemetry::TelemetryConfig,
    /// The app's cgroup under `meshgate redirect`: its eBPF counters appear on `/metrics`.
    pub ebpf_cgroup: Option<std::path::PathBuf>,
    /// How often decisions aggregated into flows are reported to the control plane
    /// ([`crate::flows::DEFAULT_REPORT_INTERVAL`]; unused without a control plane).
    pub flow_report_interval: Duration,
}

/// Why the sidecar could not start.
#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    #[error(transparent)]
    Bind(#[from] crate::serve::BindError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error(transparent)]
    Telemetry(#[from] crate::telemetry::TelemetryError),
    #[error("policy source: {0}")]
    PolicySource(String),
    #[error("--ebpf-cgroup: {0}")]
    Ebpf(String),
    #[error("--app: {0}")]
    Apps(String),
    #[error("{0}")]
    Probe(String),
}

/// A running sidecar.
pub struct Sidecar {
    /// The probe listener's address, when probe paths are configured.
    pub probe_addr: Option<SocketAddr>,
    pub inbound_addr: SocketAddr,
    pub outbound_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub identity: Arc<Identity>,
    pub policy: Arc<PolicyState>,
    pub metrics: Arc<Metrics>,
    decisions: crate::decision::DecisionSink,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

/// The `--app` list must name each port once: the calling sidecar names an app by port alone.
/// (No app at all is an outbound-only sidecar.) No app port may also be an inbound TCP port (HTTP is authorized per
/// request, so it cannot also be an opaque tunnel).
pub fn check_apps(apps: &[SocketAddr], inbound_tcp_ports: &[u16]) -> Result<(), String> {
    for (i, app) in apps.iter().enumerate() {
        if let Some(other) = apps[..i].iter().find(|a| a.port() == app.port()) {
            return Err(format!(
                "{other} and {app} share port {}: the calling sidecar names an app by its port alone, so each --app needs its own port",
                app.port()
            ));
        }
        if inbound_tcp_ports.contains(&app.port()) {
            return Err(format!(
                "--inbound-tcp-port {} is also an --app port, which carries HTTP: HTTP is authorized per request and cannot also be an opaque tunnel; serve the TCP protocol on another port",
                app.port()
            ));
        }
    }
    Ok(())
}

/// Outbound routes from the `Service` documents: each is reachable by its listed hosts, its
/// name and `name.namespace`.
pub fn routes_from(set: &PolicySet) -> Vec<Route> {
    set.services
        .iter()
        .map(|svc| {
            let name = &svc.metadata.name;
            let namespace = &svc.metadata.namespace;
            let mut hosts: Vec<String> = svc
                .spec
                .hosts
                .iter()
                .map(|h| h.to_ascii_lowercase())
                .collect();
            hosts.push(name.to_ascii_lowercase());
            hosts.push(format!("{name}.{namespace}").to_ascii_lowercase());
            hosts.sort();
            hosts.dedup();
            Route {
                name: format!("{namespace}/{name}"),
                identity: svc.spec.identity.clone(),
                hosts,
                endpoints: svc.spec.endpoints.clone(),
                opaque_ports: svc
                    .spec
                    .ports
                    .iter()
                    .filter(|p| p.protocol == meshgate_policy::model::Protocol::Tcp)
                    .map(|p| p.port)
                    .collect(),
                http_ports: svc
                    .spec
                    .ports
                    .iter()
                    .filter(|p| p.protocol != meshgate_policy::model::Protocol::Tcp)
                    .map(|p| p.port)
                    .collect(),
                target_ports: svc
                    .spec
                    .ports
                    .iter()
                    .filter_map(|p| Some((p.port, p.target_port.filter(|&t| t != p.port)?)))
                    .collect(),
            }
        })
        .collect()
}

impl Sidecar {
    /// Binds every listener first (so a taken port fails fast, naming the flag), obtains the
    /// identity, loads the policy, then serves.
    pub async fn start(config: SidecarConfig) -> Result<Self, SidecarError> {
        check_apps(&config.apps, &config.inbound_tcp_ports).map_err(SidecarError::Apps)?;
        let probe_targets = crate::probe::ProbeTargets {
            paths: config.probe_paths.clone(),
            tcp: config.probe_tcp.clone(),
            grpc: config.probe_grpc.clone(),
        };
        probe_targets
            .check(&config.apps)
            .map_err(SidecarError::Probe)?;
        // The host L4 tunnels connect to: the apps' (loopback for an outbound-only sidecar).
        let app_host = config
            .apps
            .first()
            .map_or(std::net::IpAddr::from([127, 0, 0, 1]), |a| a.ip());
        let inbound_listener = crate::serve::bind(config.inbound, "inbound", "--inbound").await?;
        let outbound_listener =
            crate::serve::bind(config.outbound, "outbound", "--outbound").await?;
        let admin_listener = crate::serve::bind(config.admin, "admin", "--admin").await?;
        let probe_listener = if config.probe_paths.is_empty()
            && !config.probe_self
            && config.probe_tcp.is_empty()
            && config.probe_grpc.is_empty()
        {
            None
        } else {
            Some(crate::serve::bind(config.probe, "health probes", "--probe").await?)
        };
        let mut tcp_listeners = Vec::new();
        for forward in &config.tcp_forwards {
            tcp_listeners.push((
                crate::serve::bind(forward.listen, "TCP forward", "--tcp-forward").await?,
                forward.clone(),
            ));
        }
        let metrics = Arc::new(Metrics::default());
        let ebpf_pins = match &config.ebpf_cgroup {
            Some(cgroup) => Some(crate::metrics::ebpf_pins(cgroup).map_err(SidecarError::Ebpf)?),
            None => None,
        };

        let identity = config.identity.start(config.poll_interval).await?;
        let workload = identity.id().clone();
        tracing::info!(event = "sidecar.identity", id = %workload, "workload identity ready");

        let telemetry = Arc::new(crate::telemetry::Telemetry::new(
            &config.telemetry,
            &workload,
            metrics.clone(),
        )?);
        let policy = Arc::new(PolicyState::new(&workload));
        // Flows are aggregated only for a control plane to receive them.
        let flows = matches!(config.policy, PolicySource::ControlPlane { .. }).then(|| {
            Arc::new(crate::flows::FlowTable::new(
                &workload,
                crate::flows::MAX_FLOWS_PER_INTERVAL,
                metrics.flow_cardinality_overflow.clone(),
            ))
        });
        // The live tap answers a control plane only, like flows.
        let tap = flows.as_ref().map(|_| crate::tap::Tap::new(&metrics));
        let routes = Arc::new(ArcSwap::from_pointee(RouteTable::default()));
        // Route tables own the outbound connection pools. They are rebuilt only when the routes
        // change (a policy-only update keeps warm connections) or when the SVID rotates (so no
        // pooled connection outlives the certificate it was authenticated with: peers refuse
        // requests on a connection whose certificate has expired).
        let current_routes = Arc::new(std::sync::Mutex::new(Vec::<Route>::new()));
        // Stops the policy stream and the listeners alike.
        let (shutdown, _) = watch::channel(false);
        {
            let (routes, identity, metrics, current) = (
                routes.clone(),
                identity.clone(),
                metrics.clone(),
                current_routes.clone(),
            );
            let source_identity = identity.clone();
            let update_flows = flows.clone();
            // The eBPF redirect's verdicts go with the flows (to a control plane only), when
            // the sidecar reads its workload's counters (`--ebpf-cgroup`).
            let verdicts = ebpf_pins
                .clone()
                .filter(|_| flows.is_some())
                .map(|pins| Arc::new(crate::ebpf_flows::EbpfVerdicts::start(pins)));
            let reporter = flows
                .clone()
                .map(|table| meshgate_xds::client::FlowReporter {
                    interval: config.flow_report_interval,
                    drain: Arc::new(move || table.drain()),
                    l3l4: verdicts
                        .map(|v| Arc::new(move || v.drain()) as meshgate_xds::client::L3L4Drain),
                });
            config
                .policy
                .clone()
                .start(
                    reporter,
                    tap.as_ref().map(crate::tap::Tap::source),
                    &source_identity,
                    policy.clone(),
                    metrics.clone(),
                    config.poll_interval,
                    shutdown.subscribe(),
                    move |set| {
                        if let Some(flows) = &update_flows {
                            flows.set_policy(set);
                        }
                        let next = routes_from(set);
                        let mut current = current.lock().expect("routes lock");
                        if *current != next {
                            routes.store(Arc::new(RouteTable::build(
                                next.clone(),
                                &identity,
                                &metrics,
                            )));
                            *current = next;
                        }
                    },
                )
                .map_err(SidecarError::PolicySource)?;
        }
        {
            let (routes, identity, metrics, current) = (
                routes.clone(),
                identity.clone(),
                metrics.clone(),
                current_routes.clone(),
            );
            let mut svids = identity.svid_changes();
            tokio::spawn(async move {
                while svids.changed().await.is_ok() {
                    let next = current.lock().expect("routes lock").clone();
                    routes.store(Arc::new(RouteTable::build(next, &identity, &metrics)));
                }
            });
        }

        let mut decisions = crate::decision::DecisionSink::new(metrics.clone(), telemetry.clone());
        if let Some(flows) = flows {
            decisions = decisions.with_flows(flows);
        }
        if let Some(tap) = tap {
            decisions = decisions.with_tap(tap);
        }
        let inbound = Inbound {
            tls: crate::tls::live_inbound_config(
                identity.clone(),
                metrics.inbound_chains.clone(),
                config.allow_tls12,
            )?,
            authz: Arc::new(AuthzContext {
                policy: policy.snapshot.clone(),
                metrics: metrics.clone(),
                local_id: workload.clone(),
                app_ports: config.apps.iter().map(SocketAddr::port).collect(),
                sink: decisions.clone(),
                swaps: policy.swaps(),
                upgrades: crate::inbound::sanitize::UpgradePolicy::new(
                    config.allowed_upgrades.iter().cloned(),
                ),
                identity: identity.clone(),
                peers: crate::inbound::authz::KnownPeers::new(workload.clone()),
            }),
            forwarder: AppForwarder::new(&config.apps, config.app_protocol),
            tunnel: crate::tunnel::TunnelServer {
                policy: policy.snapshot.clone(),
                swaps: policy.swaps(),
                metrics: metrics.clone(),
                app_host,
                ports: Arc::new(config.inbound_tcp_ports.clone()),
                http_ports: config.apps.iter().map(SocketAddr::port).collect(),
                workload: workload.clone(),
                sink: decisions.clone(),
            },
            metrics: metrics.clone(),
            limits: config.limits,
            handshakes: crate::serve::PendingHandshakes::new(config.limits.handshakes),
        };
        for (listener, forward) in tcp_listeners {
            tokio::spawn(crate::outbound::tcp::serve(
                listener,
                forward,
                routes.clone(),
                metrics.clone(),
                shutdown.subscribe(),
            ));
        }
        let outbound = Outbound {
            routes: routes.clone(),
            metrics: metrics.clone(),
            telemetry: telemetry.clone(),
            detection: crate::outbound::Detection {
                timeout: config.detect_timeout,
                opaque_ports: Arc::new(config.opaque_ports.clone()),
            },
            limits: crate::serve::Limits {
                per_source: config.limits.connections,
                ..config.limits
            },
            mesh_protocol: config.mesh_protocol,
        };
        let admin = Admin {
            identity: identity.clone(),
            policy: policy.clone(),
            routes,
            metrics: metrics.clone(),
            shutdown: shutdown.clone(),
            ebpf_pins,
        };
        let sidecar_addrs = (
            inbound_listener.local_addr().expect("bound"),
            outbound_listener.local_addr().expect("bound"),
            admin_listener.local_addr().expect("bound"),
        );
        let mut tasks = JoinSet::new();
        tasks.spawn(inbound.serve(inbound_listener, shutdown.subscribe(), config.drain));
        tasks.spawn(outbound.serve(outbound_listener, shutdown.subscribe(), config.drain));
        tasks.spawn(admin.clone().serve(admin_listener, config.drain));
        let probe_addr = probe_listener
            .as_ref()
            .map(|l| l.local_addr().expect("bound"));
        if let Some(listener) = probe_listener {
            let readiness: Option<crate::probe::Readiness> = config.probe_self.then(|| {
                let admin = admin.clone();
                Arc::new(move || admin.not_ready_reasons()) as crate::probe::Readiness
            });
            let probes = crate::probe::ProbeForwarder::new(&config.apps, probe_targets, readiness)
                .map_err(SidecarError::Probe)?;
            tasks.spawn(probes.serve(
                listener,
                shutdown.subscribe(),
                config.drain,
                metrics.clone(),
            ));
        }
        tracing::info!(
            event = "sidecar.started",
            inbound = %sidecar_addrs.0,
            outbound = %sidecar_addrs.1,
            admin = %sidecar_addrs.2,
            apps = ?config.apps,
            "sidecar serving"
        );
        Ok(Self {
            probe_addr,
            inbound_addr: sidecar_addrs.0,
            outbound_addr: sidecar_addrs.1,
            admin_addr: sidecar_addrs.2,
            identity,
            policy,
            metrics,
            decisions,
            shutdown,
            tasks,
        })
    }

    /// Starts a graceful shutdown: stop accepting, drain open connections.
    pub fn shutdown(&self) {
        let _ = self.shutdown.send(true);
    }

    /// Completes when every listener has stopped (after [`shutdown`](Self::shutdown), SIGTERM in
    /// the CLI, or `POST /shutdown`).
    pub async fn wait(mut self) {
        while self.tasks.join_next().await.is_some() {}
    }

    /// Every inbound authorization decision from now on.
    pub fn decisions(&self) -> tokio::sync::broadcast::Receiver<meshgate_policy::DecisionRecord> {
        self.decisions.subscribe()
    }

    /// A receiver that turns true when shutdown starts.
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::check_apps;

    #[test]
    fn app_lists() {
        let a = |s: &str| s.parse().unwrap();
        assert!(check_apps(&[a("127.0.0.1:8080")], &[]).is_ok());
        assert!(check_apps(&[a("127.0.0.1:8080"), a("127.0.0.1:9090")], &[5432]).is_ok());
        assert!(check_apps(&[], &[]).is_ok(), "outbound-only");
        for (apps, tcp, says) in [
            (
                vec![a("127.0.0.1:8080"), a("127.0.0.2:8080")],
                vec![],
                "share port 8080",
            ),
            (
                vec![a("127.0.0.1:8080"), a("127.0.0.1:9090")],
                vec![9090],
                "--inbound-tcp-port 9090 is also an --app port",
            ),
        ] {
            let err = check_apps(&apps, &tcp).unwrap_err();
            assert!(err.contains(says), "{apps:?} {tcp:?}: {err}");
        }
    }
}
