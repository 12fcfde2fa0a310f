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
}

impl From<InjectArgs> for Options {
    fn from(args: InjectArgs) -> Self {
        Options {
            input: Input::from_arg(&args.file),
            output: args.output.map_or(
                meshgate_inject::Output::Stdout,
                meshgate_inject::Output::File,
            ),
            dry_run: args.dry_run,
            settings: meshgate_inject::Settings {
                image: args.image,
                trust_domain: args.trust_domain,
                ca_url: args.ca_url,
                control_plane_url: args.control_plane_url,
            },
        }
    }
}

/// Runs `meshgate inject`. With `--dry-run` the exit code is `diff`'s: 0 when nothing would
/// change, 1 when the diff printed is not empty (so CI can tell "not injected yet").
pub fn run(args: InjectArgs) -> Result<ExitCode, InjectError> {
    match meshgate_inject::run(&Options::from(args))? {
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
