//! `meshgate redirect …` subcommands: argument parsing and printing; the work is in
//! `meshgate-ebpf`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;
use meshgate_ca::SpiffeId;
use meshgate_ebpf::{AttachConfig, Attachment, Rule};

fn parse_rule(s: &str) -> Result<Rule, String> {
    s.parse()
}

#[derive(Debug, Subcommand)]
// Parsed once per process: the size of the largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum RedirectCommand {
    /// Attach the redirect and L3/L4 enforcement to a workload's cgroup v2 (pinned in bpffs;
    /// running it again only rewrites the configuration).
    #[command(
        after_help = "Example:\n  sudo meshgate redirect attach --cgroup /sys/fs/cgroup/meshgate/shop-orders/app --app-ports 8080 --mesh 10.0.0.0/8"
    )]
    Attach {
        /// The app's cgroup v2 directory (its processes get redirected; its ports guarded).
        #[arg(long, required_unless_present = "pod", conflicts_with = "pod")]
        cgroup: Option<PathBuf>,
        /// The sidecar's cgroup (must differ from --cgroup unless --sidecar-uid is given).
        /// Default: the parent of --cgroup.
        #[arg(long, conflicts_with = "pod")]
        sidecar_cgroup: Option<PathBuf>,
        /// Attach to this process's pod cgroup: the parent of its own cgroup v2 (for a
        /// Kubernetes init container, whose sibling containers' cgroups do not exist yet). The
        /// sidecar shares that cgroup, so --sidecar-uid is required.
        #[arg(long, requires = "sidecar_uid")]
        pod: bool,
        /// Sockets of tasks running as this uid (the sidecar's, e.g. 1337) are never redirected
        /// or egress-enforced. Allows --sidecar-cgroup = --cgroup.
        #[arg(long)]
        sidecar_uid: Option<u32>,
        /// Create the --cgroup and --sidecar-cgroup directories if missing (mkdir -p), e.g.
        /// docker-compose `cgroup_parent` directories before any container started.
        #[arg(long, conflicts_with = "pod")]
        create: bool,
        /// The sidecar's outbound listener port on 127.0.0.1.
        #[arg(long, default_value_t = 15001)]
        outbound_port: u16,
        /// The sidecar's inbound (mTLS) port.
        #[arg(long, default_value_t = 15006)]
        inbound_port: u16,
        /// The app's ports: reachable only from the local sidecar (comma-separated or repeated).
        #[arg(long, value_delimiter = ',')]
        app_ports: Vec<u16>,
        /// Destinations reached directly, unchecked: control plane, CA, … (CIDR[:PORT], repeatable).
        #[arg(long, value_parser = parse_rule)]
        exempt: Vec<Rule>,
        /// Do not exempt loopback (127.0.0.0/8, ::1) from redirect and enforcement.
        #[arg(long)]
        no_loopback_exempt: bool,
        /// Mesh destinations, redirected to the sidecar (CIDR[:PORT], repeatable). Services'
        /// IP hosts from --network-policy are added.
        #[arg(long, value_parser = parse_rule)]
        mesh: Vec<Rule>,
        /// Egress allowlist for non-mesh destinations (CIDR:PORT or CIDR for every port).
        #[arg(long, value_parser = parse_rule, conflicts_with = "network_policy")]
        egress_allow: Vec<Rule>,
        /// Read the egress allowlist (NetworkPolicy) and mesh destinations (Service hosts that
        /// are IPs) from a policy file or directory.
        #[arg(long)]
        network_policy: Option<PathBuf>,
        /// The workload's SPIFFE ID: only the NetworkPolicies that apply to it are read (its
        /// namespace or the root namespace `meshgate`, and a selector naming its account or
        /// none). Without it, every NetworkPolicy in --network-policy is read.
        #[arg(long, value_name = "SPIFFE_ID", requires = "network_policy")]
        identity: Option<String>,
        /// Replaced by --identity: NetworkPolicies are scoped by namespace and account.
        #[arg(long, hide = true)]
        account: Option<String>,
        /// Let every non-mesh destination through (no egress allowlist enforcement).
        #[arg(long)]
        no_egress_enforce: bool,
        /// Do not drop ingress to the app's ports from outside the pod.
        #[arg(long)]
        no_ingress_enforce: bool,
        /// Carry the pod's local hops (app <-> sidecar over 127.0.0.1) through the kernel's TCP/IP
        /// stack as usual, instead of passing messages socket to socket (local acceleration, on
        /// by default; applies to connections established from now on).
        #[arg(long)]
        no_local_accel: bool,
    },
    /// Detach everything attached for a cgroup (removes the pins).
    #[command(
        after_help = "Example:\n  sudo meshgate redirect detach --cgroup /sys/fs/cgroup/meshgate/shop-orders/app"
    )]
    Detach {
        /// The workload's cgroup v2 directory.
        #[arg(long)]
        cgroup: PathBuf,
    },
    /// Print what is attached and the counters (every attachment without --cgroup).
    #[command(
        after_help = "Example:\n  sudo meshgate redirect status --cgroup /sys/fs/cgroup/meshgate/shop-orders/app"
    )]
    Status {
        /// The workload's cgroup v2 directory (default: every attachment).
        #[arg(long)]
        cgroup: Option<PathBuf>,
    },
}

pub fn run(command: RedirectCommand) -> Result<()> {
    match command {
        RedirectCommand::Attach {
            cgroup,
            sidecar_cgroup,
            pod,
            sidecar_uid,
            create,
            outbound_port,
            inbound_port,
            app_ports,
            exempt,
            no_loopback_exempt,
            mesh,
            egress_allow,
            network_policy,
            identity,
            account,
            no_egress_enforce,
            no_ingress_enforce,
            no_local_accel,
        } => {
            let (cgroup, sidecar_cgroup) = if pod {
                let pod_cgroup = meshgate_ebpf::own_pod_cgroup()?;
                (pod_cgroup.clone(), Some(pod_cgroup))
            } else {
                (
                    cgroup.expect("clap requires --cgroup or --pod"),
                    sidecar_cgroup,
                )
            };
            if create {
                for dir in std::iter::once(&cgroup).chain(sidecar_cgroup.as_ref()) {
                    std::fs::create_dir_all(dir)
                        .with_context(|| format!("creating cgroup {}", dir.display()))?;
                }
            }
            let mut cfg = AttachConfig::new(&cgroup, outbound_port, inbound_port);
            cfg.sidecar_cgroup = sidecar_cgroup;
            cfg.sidecar_uid = sidecar_uid;
            cfg.app_ports = app_ports;
            cfg.exempt = exempt;
            cfg.exempt_loopback = !no_loopback_exempt;
            if cfg.exempt_loopback {
                cfg.exempt.extend(meshgate_ebpf::loopback());
            }
            cfg.mesh = mesh;
            cfg.egress_allow = egress_allow;
            if let Some(account) = account {
                anyhow::bail!(
                    "--account was replaced by --identity, because NetworkPolicies are scoped by namespace and account: use --identity spiffe://<trust domain>/ns/<namespace>/sa/{account}"
                );
            }
            if let Some(path) = &network_policy {
                let identity = identity
                    .as_deref()
                    .map(SpiffeId::parse)
                    .transpose()
                    .context("--identity must be the workload's SPIFFE ID (spiffe://<trust domain>/ns/<namespace>/sa/<account>)")?;
                let rules = meshgate_ebpf::from_policy(path, identity.as_ref())
                    .with_context(|| format!("reading {}", path.display()))?;
                cfg.egress_allow.extend(rules.egress_allow);
                cfg.mesh.extend(rules.mesh);
            }
            cfg.enforce_egress = !no_egress_enforce;
            cfg.enforce_ingress = !no_ingress_enforce;
            cfg.accelerate_local = !no_local_accel;
            if cfg.mesh.is_empty() && cfg.enforce_egress {
                eprintln!(
                    "warning: no mesh destinations (--mesh, or Service hosts in --network-policy): \
                     nothing is redirected and every non-allowlisted connect gets EPERM"
                );
            }
            let done = meshgate_ebpf::attach(&cfg)?;
            if let Some(why) = &done.local_accel_unavailable {
                eprintln!(
                    "warning: {why}; redirect and enforcement are attached, and the local hops stay on TCP"
                );
            }
            println!(
                "{} {} (pins: {}) in {} ms",
                if done.reused {
                    "already attached; configuration updated for"
                } else {
                    "attached to"
                },
                cgroup.display(),
                done.pin_dir.display(),
                done.elapsed.as_millis()
            );
            Ok(())
        }
        RedirectCommand::Detach { cgroup } => {
            let pin_dir = meshgate_ebpf::detach(&cgroup)?;
            println!(
                "detached from {} (removed {})",
                cgroup.display(),
                pin_dir.display()
            );
            Ok(())
        }
        RedirectCommand::Status { cgroup } => {
            let report = meshgate_ebpf::status_report(cgroup.as_deref())?;
            let all = report.attachments;
            for (dir, e) in &report.unreadable {
                println!(
                    "pins {} UNREADABLE ({e}): made by another meshgate version? `meshgate redirect detach --cgroup <its cgroup>` with that version, or remove the directory",
                    dir.display()
                );
            }
            if all.is_empty() && report.unreadable.is_empty() {
                println!(
                    "nothing attached (no pins under {})",
                    meshgate_ebpf::PIN_ROOT
                );
            }
            for a in &all {
                print_attachment(a);
            }
            Ok(())
        }
    }
}

fn print_attachment(a: &Attachment) {
    let on_off = |b: bool| if b { "on" } else { "off" };
    println!("cgroup {}", a.cgroup);
    println!("  sidecar cgroup  {}", a.sidecar_cgroup);
    if let Some(uid) = a.sidecar_uid {
        println!("  sidecar uid     {uid}");
    }
    println!("  pins            {}", a.pin_dir.display());
    println!(
        "  ports           outbound 127.0.0.1:{}  inbound {}  app {:?}",
        a.outbound_port, a.inbound_port, a.app_ports
    );
    println!(
        "  enforcement     egress allowlist {}  ingress guard {}  loopback exempt {}",
        on_off(a.enforce_egress),
        on_off(a.enforce_ingress),
        on_off(a.exempt_loopback)
    );
    println!(
        "  local accel     {} (app <-> sidecar over 127.0.0.1, socket to socket)",
        on_off(a.accelerate_local)
    );
    for (kind, rule) in &a.rules {
        println!("  {kind:<15} {rule}");
    }
    for l in &a.links {
        match l.ids {
            Some((link, prog)) => println!(
                "  link {:<16} attached (link id {link}, program id {prog})",
                l.hook
            ),
            None if !l.needed => println!(
                "  link {:<16} not needed (the other sock_ops link covers both cgroups)",
                l.hook
            ),
            None => println!("  link {:<16} MISSING (run attach again)", l.hook),
        }
    }
    println!("  counters");
    for (name, v) in a.counters.totals() {
        println!("    {name:<16} {v}");
    }
    for (name, v) in a.counters.acceleration() {
        println!("    accel_{name:<10} {v}");
    }
    for p in &a.counters.per_port {
        println!(
            "    port {:<5} {:<16} {}",
            p.port,
            p.verdict.as_str(),
            p.count
        );
    }
}
