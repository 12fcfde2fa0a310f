//! `meshgate control-plane serve`, `meshgate status`, `meshgate dashboard` and `meshgate tap`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use meshgate_proxy::control_plane::{ControlPlaneConfig, RunningControlPlane};
use meshgate_proxy::policy::PolicyFiles;

use crate::parse_duration;
use crate::proxy_cmd::IdentityArgs;

#[derive(Debug, Subcommand)]
pub enum ControlPlaneCommand {
    /// Serve the policies of a directory to sidecars (HTTP/2 over mTLS, one stream per sidecar).
    #[command(
        after_help = "Example:\n  meshgate control-plane serve --policy-dir ./policies --ca https://ca:15012 --ca-bundle root.pem --token $TOKEN"
    )]
    Serve(ServeArgs),
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Directory of policy-as-code YAML files (watched; SIGHUP reloads at once).
    #[arg(long)]
    policy_dir: PathBuf,
    /// mTLS listener for sidecars' policy streams.
    #[arg(long, default_value = "0.0.0.0:15010")]
    listen: SocketAddr,
    /// Plaintext admin listener (`/console` the web console, `/status`, `/metrics` with the
    /// SLIs, `/v1/flows`, `/ready`, `/live`); keep it on loopback.
    #[arg(long, default_value = "127.0.0.1:15011")]
    admin: SocketAddr,
    /// The control plane's own identity: spiffe://<td>/ns/meshgate/sa/control-plane.
    #[command(flatten)]
    identity: IdentityArgs,
    /// How often the policy directory is checked for changes (SIGHUP reloads at once).
    #[arg(long, default_value = "250ms", value_parser = parse_duration)]
    poll_interval: Duration,
    /// File holding the bearer token the web console's mutating actions (quarantine, lift)
    /// require. Without it they are allowed only when --admin is a loopback address, and
    /// refused otherwise (the console is then read-only).
    #[arg(long)]
    console_token: Option<PathBuf>,
    /// Trace viewer the web console links flows to: a URL template with `{trace_id}` where the
    /// trace ID goes, e.g. `http://jaeger:16686/trace/{trace_id}`. Each flow keeps the trace ID
    /// of its latest sampled or denied request.
    #[arg(long, value_name = "URL", value_parser = parse_trace_ui)]
    trace_ui: Option<meshgate_proxy::trace_ui::TraceUi>,
}

fn parse_trace_ui(v: &str) -> Result<meshgate_proxy::trace_ui::TraceUi, String> {
    meshgate_proxy::trace_ui::TraceUi::parse(v).map_err(|e| e.to_string())
}

pub fn run(command: ControlPlaneCommand) -> Result<()> {
    let ControlPlaneCommand::Serve(args) = command;
    let console_token = match &args.console_token {
        None => None,
        Some(file) => {
            let token = std::fs::read_to_string(file)
                .with_context(|| format!("reading the console token {}", file.display()))?;
            let token = token.trim();
            if token.len() < 16 {
                bail!(
                    "the console token in {} is {} characters; use at least 16 random ones, e.g. `head -c 24 /dev/urandom | base64 > {}`",
                    file.display(),
                    token.len(),
                    file.display()
                );
            }
            Some(token.to_string())
        }
    };
    let config = ControlPlaneConfig {
        listen: args.listen,
        admin: args.admin,
        policy: PolicyFiles {
            dir: args.policy_dir,
            services: None,
        },
        identity: args.identity.source()?,
        poll_interval: args.poll_interval,
        console_token,
        trace_ui: args.trace_ui,
    };
    tokio::runtime::Runtime::new()?.block_on(async {
        let cp = RunningControlPlane::start(config).await?;
        println!(
            "meshgate control plane: sidecars connect to https://{} ; status at http://{}/status ; console at http://{}/console",
            cp.addr, cp.admin_addr, cp.admin_addr
        );
        crate::ca_cmd::shutdown_signal().await;
        cp.shutdown();
        cp.wait().await;
        Ok(())
    })
}

/// Show every sidecar known to a control plane: identity, acked version, last NACK, staleness.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The control plane's admin listener: a URL or HOST:PORT. With replicas, give each one's
    /// (repeat the flag or comma-separate): each replica knows only the sidecars streaming from
    /// it, and all must serve the same version.
    #[arg(long, value_delimiter = ',', default_value = "http://127.0.0.1:15011")]
    control_plane: Vec<String>,
    /// Print the raw JSON.
    #[arg(long)]
    json: bool,
}

/// The `/status` URL of a control plane's admin listener given as `--control-plane`: a URL, or
/// `HOST:PORT` without a scheme (plain HTTP is assumed: the admin listener has no TLS).
pub fn status_url(admin: &str) -> String {
    admin_url(admin, "/status")
}

/// `path` on a control plane's admin listener given as a URL or `HOST:PORT`.
fn admin_url(admin: &str, path: &str) -> String {
    let admin = admin.trim_end_matches('/');
    if admin.contains("://") {
        format!("{admin}{path}")
    } else {
        format!("http://{admin}{path}")
    }
}

/// Asks a control plane's admin listener for its status; when nothing answers, says where it
/// looked and how to point elsewhere.
pub async fn fetch_status(admin: &str) -> Result<String> {
    let url = status_url(admin);
    crate::health_cmd::get(&url, Duration::from_secs(5))
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "no control plane status at {url}: {e:#}; is `meshgate control-plane serve` running there? Point to its admin listener with --control-plane HOST:PORT (`meshgate demo` prints its own, e.g. 127.0.0.1:18002)"
            )
        })
}

pub fn status(args: StatusArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    if let [admin] = args.control_plane.as_slice() {
        let body = runtime.block_on(fetch_status(admin))?;
        if args.json {
            println!("{body}");
            return Ok(());
        }
        let report: serde_json::Value =
            serde_json::from_str(&body).context("status is not JSON")?;
        return print_report(&report);
    }
    // Replicas: every one is asked, an unreachable one is reported and fails the command.
    let answers: Vec<(String, Result<serde_json::Value>)> = args
        .control_plane
        .iter()
        .map(|admin| {
            let report = runtime.block_on(fetch_status(admin)).and_then(|body| {
                serde_json::from_str::<serde_json::Value>(&body).context("status is not JSON")
            });
            (admin.clone(), report)
        })
        .collect();
    if args.json {
        let replicas: Vec<serde_json::Value> = answers
            .iter()
            .map(|(admin, report)| match report {
                Ok(report) => serde_json::json!({ "control_plane": admin, "status": report }),
                Err(e) => serde_json::json!({ "control_plane": admin, "error": format!("{e:#}") }),
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "replicas": replicas }))?
        );
        return Ok(());
    }
    let mut problems = Vec::new();
    let mut versions = std::collections::BTreeSet::new();
    for (admin, report) in &answers {
        println!("== control plane {admin}");
        match report {
            Ok(report) => {
                versions.insert(report["version"].as_str().unwrap_or("(none)").to_string());
                if let Err(e) = print_report(report) {
                    problems.push(format!("{admin}: {e:#}"));
                }
            }
            Err(e) => {
                println!("{e:#}");
                problems.push(format!("{admin}: not answering"));
            }
        }
        println!();
    }
    if versions.len() > 1 {
        problems.push(format!(
            "the replicas serve different versions ({}): they read different policy directories, or one refused an update the others took (see LAST UPDATE REFUSED above)",
            versions.into_iter().collect::<Vec<_>>().join(", ")
        ));
    }
    if !problems.is_empty() {
        bail!("{}", problems.join("\n"));
    }
    Ok(())
}

/// Prints one control plane's report as a table; an error when a connected sidecar drifted.
fn print_report(report: &serde_json::Value) -> Result<()> {
    let version = report["version"].as_str().unwrap_or("(none)");
    println!("policy version served: {version}");
    if let Some(rejected) = report["last_rejected"].as_str() {
        println!("LAST UPDATE REFUSED (the version above is still served):\n{rejected}");
    }
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    println!(
        "\n{:<45} {:<10} {:<18} {:<8} {:<10} LAST NACK",
        "SIDECAR", "STREAM", "ACKED", "IN SYNC", "SEEN"
    );
    let sidecars = report["sidecars"].as_array().cloned().unwrap_or_default();
    let mut drift = false;
    let mut silent = Vec::new();
    for s in &sidecars {
        let in_sync = s["in_sync"].as_bool().unwrap_or(false);
        let connected = s["connected"].as_bool().unwrap_or(false);
        // A stream that never answered a push is reported, not counted as drift: any workload
        // with an SVID can open one, and it must not make the status of the mesh look failed.
        if connected && s["last_ack_at"].is_null() {
            silent.push(crate::quarantine_cmd::not_acknowledging(
                s["id"].as_str().unwrap_or("?"),
                now - s["connected_at"].as_i64().unwrap_or(now),
            ));
        } else {
            drift |= connected && !in_sync;
        }
        println!(
            "{:<45} {:<10} {:<18} {:<8} {:<10} {}",
            s["id"].as_str().unwrap_or("?"),
            if connected { "connected" } else { "closed" },
            s["acked_version"].as_str().unwrap_or("-"),
            if in_sync { "yes" } else { "NO" },
            format!("{}s ago", now - s["last_seen"].as_i64().unwrap_or(now)),
            s["last_nack"].as_str().unwrap_or("-"),
        );
    }
    if sidecars.is_empty() {
        println!("(no sidecar has connected)");
    }
    if !silent.is_empty() {
        println!();
        for line in &silent {
            println!("{line}");
        }
    }
    if drift {
        bail!("some connected sidecars have not acknowledged version {version}");
    }
    Ok(())
}

/// Print the web console's URL and open it in a browser when one is available.
#[derive(Debug, Args)]
pub struct DashboardArgs {
    /// The control plane's admin listener: a URL or HOST:PORT.
    #[arg(long, default_value = "http://127.0.0.1:15011")]
    control_plane: String,
}

/// Prints the console URL, then tries `xdg-open`; a machine without a browser (a server, a
/// container) still gets the URL, and that is not a failure.
pub fn dashboard(args: DashboardArgs) -> Result<()> {
    let admin = args.control_plane.trim_end_matches('/');
    let url = if admin.contains("://") {
        format!("{admin}/console")
    } else {
        format!("http://{admin}/console")
    };
    println!("meshgate console: {url}");
    match std::process::Command::new("xdg-open")
        .arg(&url)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
    {
        Ok(s) if s.success() => println!("opened in your browser"),
        _ => {
            println!("no browser opened (xdg-open missing or failed): open the URL above yourself")
        }
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct TapArgs {
    /// The control plane's admin listener: a URL or HOST:PORT.
    #[arg(long, default_value = "http://127.0.0.1:15011")]
    control_plane: String,
    /// Only decisions where this SPIFFE ID is the caller or the callee.
    #[arg(long)]
    workload: Option<String>,
    /// Only decisions of this kind.
    #[arg(long, value_parser = ["allow", "deny", "audit", "dry-run-deny", "bad-request"])]
    decision: Option<String>,
    /// Stop after this many decisions (default: until Ctrl-C).
    #[arg(long)]
    count: Option<u64>,
    /// Stop after this long (e.g. 30s, 5m; default: until Ctrl-C).
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
}

/// How often `meshgate tap` polls: the control plane keeps the sidecars tapping while it is
/// polled, and a decision shows within this much of reaching it.
const TAP_POLL: Duration = Duration::from_millis(500);

/// Streams the decisions the control plane's live tap receives (`GET /v1/console/tap`) as JSON
/// lines on stdout, oldest first, like `linkerd viz tap`; what the tap could not keep (rate
/// limits) and sidecars too old to be tapped are said on stderr.
pub fn tap(args: TapArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        tokio::select! {
            result = tap_loop(&args) => result,
            () = crate::ca_cmd::shutdown_signal() => Ok(()),
        }
    })
}

async fn tap_loop(args: &TapArgs) -> Result<()> {
    use std::io::Write;
    let mut query = String::new();
    if let Some(w) = &args.workload {
        query.push_str(&format!("&workload={}", query_escape(w)));
    }
    if let Some(d) = &args.decision {
        query.push_str(&format!("&decision={d}"));
    }
    let started = std::time::Instant::now();
    let (mut since, mut shown, mut dropped, mut first) = (None::<u64>, 0u64, 0u64, true);
    loop {
        // The first poll starts the tap and only learns where the ring stands: what came
        // before this command is not streamed.
        let url = admin_url(
            &args.control_plane,
            &format!(
                "/v1/console/tap?since={}&limit=1000{query}",
                since.unwrap_or(0)
            ),
        );
        let body = crate::health_cmd::get(&url, Duration::from_secs(10))
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "no tap from the control plane: {e:#}; is `meshgate control-plane serve` running there? Point to its admin listener with --control-plane HOST:PORT"
                )
            })?;
        let answer: serde_json::Value =
            serde_json::from_str(&body).context("the tap's answer is not JSON")?;
        if first {
            first = false;
            let tapping = &answer["sidecars"]["tapping"];
            let without = answer["sidecars"]["without_tap"].as_u64().unwrap_or(0);
            eprintln!(
                "tapping {tapping} sidecar(s) through {} (at most {} decisions/s each); Ctrl-C to stop",
                args.control_plane, answer["max_per_second"]
            );
            if without > 0 {
                eprintln!(
                    "{without} connected sidecar(s) are too old to be tapped: upgrade them to see their decisions"
                );
            }
        }
        let events = answer["events"].as_array().cloned().unwrap_or_default();
        if since.is_some() {
            let mut out = std::io::stdout().lock();
            // Newest first in the answer; printed oldest first.
            for event in events.iter().rev() {
                writeln!(out, "{event}")?;
                shown += 1;
                if args.count.is_some_and(|n| shown >= n) {
                    return Ok(());
                }
            }
            out.flush()?;
        }
        since = answer["seq"].as_u64().or(since);
        let now_dropped = answer["dropped"]["sidecars"].as_u64().unwrap_or(0)
            + answer["dropped"]["control_plane"].as_u64().unwrap_or(0);
        if now_dropped > dropped && dropped > 0 {
            eprintln!(
                "{} more decisions dropped by the tap's rate limits (not shown)",
                now_dropped - dropped
            );
        }
        dropped = now_dropped;
        if args.duration.is_some_and(|d| started.elapsed() >= d) {
            return Ok(());
        }
        tokio::time::sleep(TAP_POLL).await;
    }
}

/// A query value: the bytes a SPIFFE ID never has (`%`, `&`, `+`, `#`, space) escaped.
fn query_escape(v: &str) -> String {
    v.replace('%', "%25")
        .replace('&', "%26")
        .replace('+', "%2B")
        .replace('#', "%23")
        .replace(' ', "%20")
}
