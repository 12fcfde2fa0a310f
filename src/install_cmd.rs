//! `meshgate install`: the Kubernetes manifests of the CA, the control plane and the policy CRDs
//! (the work is in `meshgate_inject::install`).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use meshgate_inject::install::{self, CaMaterial, InstallSettings};

/// Print the Kubernetes manifests of the mesh (namespace `meshgate`: CA, control plane, CRDs).
#[derive(Debug, Args)]
pub struct InstallArgs {
    /// SPIFFE trust domain (default: the CA's with --ca-dir, else mesh.local).
    #[arg(long)]
    trust_domain: Option<String>,
    /// The meshgate image of the CA and the control plane (the one `meshgate inject` uses).
    #[arg(long, default_value = meshgate_inject::DEFAULT_IMAGE)]
    image: String,
    /// Replicas of the control plane (2 or more survive the loss of one).
    #[arg(long, default_value_t = 2)]
    control_plane_replicas: u32,
    /// Use this CA (from `meshgate ca init`) instead of generating a new one; its root key is
    /// not copied into the cluster.
    #[arg(long)]
    ca_dir: Option<PathBuf>,
    /// The API server's ServiceAccount token issuer (its --service-account-issuer; see
    /// `kubectl get --raw /.well-known/openid-configuration`).
    #[arg(long, default_value = install::DEFAULT_K8S_ISSUER)]
    k8s_issuer: String,
    /// Seed the policy ConfigMap with the *.yaml files of this directory (validated first;
    /// default: mesh-wide DENY and one commented example).
    #[arg(long)]
    policy_dir: Option<PathBuf>,
    /// Write the manifests to this file (mode 0600: they hold the CA's keys) instead of stdout.
    #[arg(long, short)]
    output: Option<PathBuf>,
    /// Only the CustomResourceDefinitions of the policy kinds (no CA, no keys).
    #[arg(long, conflicts_with_all = ["trust_domain", "image", "control_plane_replicas", "ca_dir", "k8s_issuer", "policy_dir"])]
    crds_only: bool,
}

pub fn run(args: InstallArgs) -> Result<()> {
    let text = if args.crds_only {
        install::crds()?
    } else {
        let ca = match &args.ca_dir {
            Some(dir) => {
                let ca = CaMaterial::from_dir(dir)?;
                install::check_trust_domain(args.trust_domain.as_deref(), &ca, dir)?;
                ca
            }
            None => CaMaterial::generate(
                args.trust_domain
                    .as_deref()
                    .unwrap_or(meshgate_inject::DEFAULT_TRUST_DOMAIN),
            )?,
        };
        let policies = match &args.policy_dir {
            Some(dir) => install::policy_files(dir, ca.trust_domain())?,
            None => install::example_policies(ca.trust_domain()),
        };
        if ca.generated() {
            eprintln!(
                "meshgate install: generated a new CA for trust domain {}; its keys exist only in this output. Re-running install makes a different CA (every SVID would stop verifying): keep the output, or create a CA with `meshgate ca init --dir DIR` and pass --ca-dir DIR.",
                ca.trust_domain()
            );
        }
        install::manifests(&InstallSettings {
            image: args.image,
            control_plane_replicas: args.control_plane_replicas,
            ca,
            k8s_issuer: args.k8s_issuer,
            policies,
        })?
    };
    install::write(args.output.as_ref(), &text).with_context(|| match &args.output {
        Some(path) => format!("writing {}", path.display()),
        None => "writing to stdout".to_string(),
    })
}
