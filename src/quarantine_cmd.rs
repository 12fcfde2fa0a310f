//! `meshgate quarantine SPIFFE_ID [--lift]`: an emergency, mesh-wide DENY for one identity.
//!
//! Writes (or removes) one policy file in the root namespace `meshgate` whose only rule denies
//! every request and connection from the identity. DENY is evaluated before any ALLOW, and every
//! policy swap re-checks open L4 tunnels, so containment covers new requests, pooled connections
//! and open tunnels alike. With `--control-plane`, waits until every connected sidecar has ACKed
//! the new version and reports the time to containment.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use meshgate_ca::{SpiffeId, cert, fsutil};

use crate::health_cmd::get;

#[derive(Debug, Args)]
pub struct QuarantineArgs {
    /// The identity to cut off, e.g. spiffe://mesh.local/ns/shop/sa/web.
    #[arg(value_parser = |s: &str| SpiffeId::parse(s).map_err(|e| e.to_string()))]
    id: SpiffeId,
    /// The policy directory the control plane (or the sidecars) read.
    #[arg(long)]
    policy_dir: PathBuf,
    /// Remove the quarantine instead.
    #[arg(long)]
    lift: bool,
    /// Control plane admin URL: wait for every connected sidecar to ACK and report the time.
    #[arg(long)]
    control_plane: Option<String>,
    /// How long to wait for containment.
    #[arg(long, default_value = "30s", value_parser = crate::parse_duration)]
    timeout: Duration,
}

fn policy_name(id: &SpiffeId) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, id.as_str().as_bytes());
    format!("quarantine-{}", &cert::hex(digest.as_ref())[..12])
}

pub fn run(args: QuarantineArgs) -> Result<()> {
    let name = policy_name(&args.id);
    let file = args.policy_dir.join(format!("{name}.yaml"));
    let started = Instant::now();
    if args.lift {
        std::fs::remove_file(&file)
            .with_context(|| format!("{} is not quarantined (no {})", args.id, file.display()))?;
        println!(
            "lifted the quarantine of {} (removed {})",
            args.id,
            file.display()
        );
    } else {
        let doc = format!(
            "# Emergency quarantine written by `meshgate quarantine`; remove with --lift.\napiVersion: meshgate.dev/v1\nkind: AuthorizationPolicy\nmetadata: {{ name: {name}, namespace: meshgate }}\nspec:\n  action: DENY\n  rules:\n    - from: [{{ principals: [\"{}\"] }}]\n",
            args.id
        );
        fsutil::write_atomic(&file, doc.as_bytes(), 0o644)
            .with_context(|| format!("writing {}", file.display()))?;
        if let Err(e) = meshgate_xds::load_dir(&args.policy_dir) {
            let _ = std::fs::remove_file(&file);
            bail!(
                "the policy directory does not validate, so the quarantine would not apply; fix it first:\n{e}"
            );
        }
        println!(
            "quarantined {}: every sidecar denies it ({})",
            args.id,
            file.display()
        );
    }
    let Some(admin) = args.control_plane else {
        return Ok(());
    };
    let want = meshgate_xds::load_dir(&args.policy_dir)
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .version;
    let url = format!("{}/status", admin.trim_end_matches('/'));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        loop {
            let report: serde_json::Value = serde_json::from_str(&get(&url, Duration::from_secs(5)).await?)?;
            let connected: Vec<&serde_json::Value> = report["sidecars"]
                .as_array()
                .map(|a| a.iter().filter(|s| s["connected"] == true).collect())
                .unwrap_or_default();
            let enforcing = connected.iter().filter(|s| s["acked_version"] == want.as_str()).count();
            if report["version"] == want.as_str() && enforcing == connected.len() {
                println!(
                    "contained in {} ms: {enforcing}/{} connected sidecars enforce version {want}",
                    started.elapsed().as_millis(),
                    connected.len()
                );
                return Ok(());
            }
            if started.elapsed() > args.timeout {
                bail!("after {:?}, {enforcing}/{} connected sidecars enforce version {want}; check `meshgate status`", args.timeout, connected.len());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
}
