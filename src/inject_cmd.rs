//! `meshgate inject`: argument parsing and printing; the work is in `meshgate-inject`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use meshgate_inject::{DEFAULT_IMAGE, DEFAULT_TRUST_DOMAIN, InjectError, Input, Options, Outcome};

/// Add the meshgate sidecar, redirect init and identity bootstrap to docker-compose or Kubernetes
/// manifests.
#[derive(Debug, Args)]
pub struct InjectArgs {
    /// A docker-compose file or Kubernetes YAML (multi-document); `-` reads stdin.
    #[arg(default_value = "-")]
    pub file: String,
    /// Write the injected YAML here instead of stdout.
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// Write nothing; print a unified diff of what inject would change.
    #[arg(long)]
    pub dry_run: bool,
    /// Container image of the meshgate binary (sidecar, redirect, pause).
    #[arg(long, default_value = DEFAULT_IMAGE)]
    pub image: String,
    /// SPIFFE trust domain of the workload identities.
    #[arg(long, default_value = DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// URL of `meshgate ca serve` [default: https://ca:15012 (compose),
    /// https://meshgate-ca.meshgate.svc:15012 (Kubernetes)].
    #[arg(long)]
    pub ca_url: Option<String>,
    /// URL of the control plane [default: https://control-plane:15010 (compose),
    /// https://meshgate-control-plane.meshgate.svc:15010 (Kubernetes)].
    #[arg(long)]
    pub control_plane_url: Option<String>,
    /// Kubernetes: the cluster's pod address range, redirected through the sidecar (repeatable).
    #[arg(long = "pod-cidr", value_parser = parse_cidr, default_values_t = ["10.244.0.0/16".to_string()])]
    pub pod_cidrs: Vec<String>,
    /// Kubernetes: the cluster's Service (ClusterIP) range, redirected through the sidecar; its
    /// port 53 (DNS) and its first address's 443 (the API server) stay direct (repeatable).
    #[arg(long = "service-cidr", value_parser = parse_cidr, default_values_t = ["10.96.0.0/12".to_string()])]
    pub service_cidrs: Vec<String>,
    /// Kubernetes: the cluster's DNS domain (Service host names NAME.NAMESPACE.svc.DOMAIN).
    #[arg(long, default_value = "cluster.local")]
    pub cluster_domain: String,
    /// Kubernetes: enforce an egress allowlist outside the cluster's ranges (CIDR or CIDR:PORT,
    /// repeatable); without it, connections outside the cluster's ranges go direct.
    #[arg(long = "egress-allow", value_parser = parse_rule)]
    pub egress_allow: Vec<String>,
    /// Kubernetes: the CA bundle (PEM, e.g. from `meshgate ca init`): adds the ConfigMap
    /// meshgate-ca-bundle to every namespace with injected pods.
    #[arg(long)]
    pub ca_bundle: Option<PathBuf>,
    /// Worker threads of each injected sidecar (its `MESHGATE_WORKER_THREADS`); one runs it on
    /// a single-threaded scheduler, the cheapest per request. A workload's annotation
    /// (Kubernetes) or label (compose) `meshgate.io/proxy-worker-threads` overrides it; give a
    /// sidecar with more threads a CPU limit to match.
    #[arg(long, default_value_t = meshgate_inject::DEFAULT_WORKER_THREADS,
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub worker_threads: u16,
    /// Kubernetes: write the meshgate Service documents for the Services that select injected
    /// pods to this file (add it to the control plane's policy directory).
    #[arg(long)]
    pub services_out: Option<PathBuf>,
}

/// The redirect's own syntax, checked here so a typo fails at inject time, not in the pod.
fn parse_rule(s: &str) -> Result<String, String> {
    s.parse::<meshgate_ebpf::Rule>().map(|_| s.to_owned())
}

fn parse_cidr(s: &str) -> Result<String, String> {
    s.parse::<ipnet::IpNet>()
        .map(|_| s.to_owned())
        .map_err(|e| format!("{s:?} is not a CIDR ({e}); write it like 10.244.0.0/16"))
}

impl TryFrom<InjectArgs> for Options {
    type Error = InjectError;

    fn try_from(args: InjectArgs) -> Result<Self, InjectError> {
        let ca_bundle = match &args.ca_bundle {
            Some(path) => {
                Some(
                    std::fs::read_to_string(path).map_err(|source| InjectError::Io {
                        action: "read",
                        path: path.display().to_string(),
                        source,
                    })?,
                )
            }
            None => None,
        };
        Ok(Options {
            input: Input::from_arg(&args.file),
            output: args.output.map_or(
                meshgate_inject::Output::Stdout,
                meshgate_inject::Output::File,
            ),
            dry_run: args.dry_run,
            services_out: args.services_out,
            settings: meshgate_inject::Settings {
                image: args.image,
                trust_domain: args.trust_domain,
                ca_url: args.ca_url,
                control_plane_url: args.control_plane_url,
                worker_threads: args.worker_threads,
                kube: meshgate_inject::KubeSettings {
                    pod_cidrs: args.pod_cidrs,
                    service_cidrs: args.service_cidrs,
                    cluster_domain: args.cluster_domain,
                    egress_allow: args.egress_allow,
                    ca_bundle,
                },
            },
        })
    }
}

/// Runs `meshgate inject`. With `--dry-run` the exit code is `diff`'s: 0 when nothing would
/// change, 1 when the diff printed is not empty (so CI can tell "not injected yet").
pub fn run(args: InjectArgs) -> Result<ExitCode, InjectError> {
    match meshgate_inject::run(&Options::try_from(args)?)? {
        Outcome::Written => Ok(ExitCode::SUCCESS),
        Outcome::Unchanged { input } => {
            eprintln!("{input}: nothing to inject (already injected, opted out, or no workloads)");
            Ok(ExitCode::SUCCESS)
        }
        Outcome::Diff(diff) => {
            print!("{diff}");
            Ok(ExitCode::FAILURE)
        }
    }
}
