//! `meshgate quarantine SPIFFE_ID [--lift]`: an emergency, mesh-wide DENY for one identity.
//!
//! Writes (or removes) one policy file in the root namespace `meshgate` whose only rule denies
//! every request and connection from the identity. DENY is evaluated before any ALLOW, and every
//! policy swap re-checks open L4 tunnels, so containment covers new requests, pooled connections
//! and open tunnels alike. With `--control-plane`, waits until every connected sidecar that
//! acknowledges pushes has ACKed the new version and reports the time to containment.
//!
//! The quarantine is a file in the policy directory, not state in a control plane: every
//! replica reading that directory serves it, and a replica that restarts serves it again. With
//! replicas, `--control-plane` takes each one's admin URL and containment is judged on all.
//!
//! Streams that have never answered a push are listed as "not acknowledging" and not waited
//! for: any workload with an SVID can open a stream that never ACKs, and must not be able to
//! make an emergency containment look failed. A real sidecar on such a stream has never applied
//! a policy, and a sidecar without a policy denies everything, so it is contained either way.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use meshgate_ca::SpiffeId;

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
    /// With replicas, give each one's admin URL (repeat the flag or comma-separate): a sidecar
    /// streams from one replica, so containment is confirmed only when every replica serves the
    /// new version and every sidecar on each of them has ACKed it.
    #[arg(long, value_delimiter = ',')]
    control_plane: Vec<String>,
    /// How long to wait for containment.
    #[arg(long, default_value = "30s", value_parser = crate::parse_duration)]
    timeout: Duration,
}

pub fn run(args: QuarantineArgs) -> Result<()> {
    use meshgate_proxy::quarantine;
    let started = Instant::now();
    if args.lift {
        let file = quarantine::lift(&args.policy_dir, &args.id)?;
        println!(
            "lifted the quarantine of {} (removed {})",
            args.id,
            file.display()
        );
    } else {
        let file = quarantine::write(&args.policy_dir, &args.id)?;
        println!(
            "quarantined {}: every sidecar denies it ({})",
            args.id,
            file.display()
        );
    }
    if args.control_plane.is_empty() {
        return Ok(());
    }
    let want = meshgate_policy::load_dir(&args.policy_dir)
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .version;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        loop {
            let view = Containment::across(&args.control_plane, &want).await;
            if view.pending.is_empty() {
                let replicas = match args.control_plane.len() {
                    1 => String::new(),
                    n => format!(" on {n} control-plane replicas"),
                };
                println!(
                    "contained in {} ms: {}/{} acknowledging sidecars{replicas} enforce version {want}",
                    started.elapsed().as_millis(),
                    view.enforcing,
                    view.enforcing
                );
                for line in &view.silent {
                    println!("{line}");
                }
                return Ok(());
            }
            if started.elapsed() > args.timeout {
                let mut lines = view.pending.clone();
                lines.extend(view.silent.iter().cloned());
                bail!(
                    "after {:?}, {}/{} acknowledging sidecars enforce version {want} (the quarantine file stays: every replica serves it once it reloads, and running this again only waits); check `meshgate status`:\n{}",
                    args.timeout,
                    view.enforcing,
                    view.enforcing + view.lagging,
                    lines.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
}

/// One poll of the control planes' status, judged for containment at version `want`.
struct Containment {
    /// Acknowledging sidecars that ACKed `want`.
    enforcing: usize,
    /// Acknowledging sidecars not (yet) on `want`.
    lagging: usize,
    /// Why containment is not confirmed yet, one line each: sidecars not on `want`, replicas
    /// not serving it or not answering.
    pending: Vec<String>,
    /// Connected streams that never answered a push, one "not acknowledging" line each.
    silent: Vec<String>,
}

impl Containment {
    /// Polls every replica's admin listener. A replica that does not answer leaves containment
    /// unconfirmed: sidecars may still be streaming from it.
    async fn across(admins: &[String], want: &str) -> Self {
        let mut view = Self {
            enforcing: 0,
            lagging: 0,
            pending: Vec::new(),
            silent: Vec::new(),
        };
        for admin in admins {
            let report = crate::control_plane_cmd::fetch_status(admin)
                .await
                .and_then(|body| {
                    serde_json::from_str::<serde_json::Value>(&body)
                        .context("the status is not JSON")
                });
            match report {
                Ok(report) => view.add(admin, &report, want, admins.len() > 1),
                Err(e) => view.pending.push(format!(
                    "control plane {admin} not answering: {e:#}; if that replica is gone for good, its sidecars have moved to the others: run again without it"
                )),
            }
        }
        view
    }

    fn add(&mut self, admin: &str, report: &serde_json::Value, want: &str, name_replica: bool) {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let on = if name_replica {
            format!(" on {admin}")
        } else {
            String::new()
        };
        if report["version"] != want {
            self.pending.push(format!(
                "control plane {admin} serves {}, not yet {want}",
                report["version"].as_str().unwrap_or("nothing")
            ));
        }
        let sidecars = report["sidecars"].as_array().cloned().unwrap_or_default();
        for s in sidecars.iter().filter(|s| s["connected"] == true) {
            let id = s["id"].as_str().unwrap_or("?");
            let connected_ago = now - s["connected_at"].as_i64().unwrap_or(now);
            let Some(last_ack) = s["last_ack_at"].as_i64() else {
                self.silent.push(not_acknowledging(id, connected_ago));
                continue;
            };
            if s["acked_version"] == want {
                self.enforcing += 1;
            } else {
                self.lagging += 1;
                self.pending.push(format!(
                    "not yet enforcing: {id}{on} (acked {}, last ack {}s ago{})",
                    s["acked_version"].as_str().unwrap_or("nothing"),
                    now - last_ack,
                    s["last_nack"]
                        .as_str()
                        .map(|n| format!(", last NACK {n}"))
                        .unwrap_or_default()
                ));
            }
        }
    }
}

/// The report line of a stream that never answered a push.
pub fn not_acknowledging(id: &str, connected_ago: i64) -> String {
    format!(
        "not acknowledging: {id} (connected {connected_ago}s ago, last ack never): not counted; a sidecar that never applied a policy denies everything"
    )
}
