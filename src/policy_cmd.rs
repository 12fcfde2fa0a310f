//! `meshgate policy …`: policy-as-code tools for operators and CI. Argument parsing and printing
//! only; the logic lives in `meshgate_policy_tools`.
//!
//! Exit codes: 0 success (for `diff`: no change), 1 invalid input or failed tests, 2 `diff`
//! found changes (so CI can gate on it).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Result;
use clap::Subcommand;
use meshgate_policy::{PolicySet, load_dir};
use meshgate_policy_tools::diff::{FlowDiff, diff_flows, diff_sets};
use meshgate_policy_tools::explain::explain;
use meshgate_policy_tools::flows::{FlowLog, read_flows};
use meshgate_policy_tools::probe::{DEFAULT_PORT, Probe};
use meshgate_policy_tools::suggest::{SuggestOptions, suggest, to_yaml};
use meshgate_policy_tools::test_cases::{load_cases, run_cases};

/// `diff` found request classes or flows whose decision changes.
const EXIT_CHANGED: u8 = 2;

fn parse_header(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not NAME=VALUE"))
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate a policy directory (exit 1 with `file:line: reason` lines on stderr).
    #[command(after_help = "Example:\n  meshgate policy check ./policies")]
    Check {
        /// Policy directory (recursive *.yaml / *.yml).
        dir: PathBuf,
    },
    /// Run table-driven decision tests (a YAML `cases:` list) against a policy directory.
    #[command(
        after_help = "Example:\n  meshgate policy test ./policies cases.yaml\n\ncases.yaml:\n  cases:\n    - { name: web reads orders, from: \"spiffe://mesh.local/ns/shop/sa/web\", to: \"spiffe://mesh.local/ns/shop/sa/orders\", method: GET, path: /orders/1, expect: allow }\n    - { name: db over TCP, from: \"spiffe://mesh.local/ns/shop/sa/orders\", to: \"spiffe://mesh.local/ns/shop/sa/db\", port: 5432, expect: allow }"
    )]
    Test {
        /// Policy directory.
        dir: PathBuf,
        /// YAML file with a `cases:` list (name, from, to, method + path or none for L4, port, headers, expect, policy, rule).
        cases: PathBuf,
    },
    /// Explain the decision for one request: deciding policy and rule, version, reason.
    #[command(
        after_help = "Example:\n  meshgate policy explain ./policies --from spiffe://mesh.local/ns/shop/sa/web --to spiffe://mesh.local/ns/shop/sa/orders --method GET --path /orders/1"
    )]
    Explain {
        /// Policy directory.
        dir: PathBuf,
        /// Caller SPIFFE ID.
        #[arg(long)]
        from: String,
        /// SPIFFE ID of the workload whose sidecar judges the request.
        #[arg(long)]
        to: String,
        /// HTTP method; omit with --path to explain an L4 (TCP) connection to --port.
        #[arg(long, requires = "path")]
        method: Option<String>,
        /// Request path as sent (normalized before judging).
        #[arg(long, requires = "method")]
        path: Option<String>,
        /// Destination port of the workload's app.
        #[arg(long, default_value_t = DEFAULT_PORT)]
        port: u16,
        /// Request header NAME=VALUE (repeatable).
        #[arg(long = "header", value_parser = parse_header)]
        headers: Vec<(String, String)>,
    },
    /// Show which requests change decision between two policy directories (exit 2 on change).
    #[command(
        after_help = "Examples:\n  meshgate policy diff ./policies ./policies-next --flows orders.log\n  meshgate policy diff ./policies ./policies-next --control-plane 127.0.0.1:15011"
    )]
    Diff {
        /// Policy directory in force now.
        old: PathBuf,
        /// Policy directory proposed.
        new: PathBuf,
        /// Also replay observed decisions (sidecar JSON access log).
        #[arg(long)]
        flows: Option<PathBuf>,
        /// Also replay the flows a running control plane collected from its sidecars (its admin
        /// listener, e.g. http://127.0.0.1:15011; the last 10 minutes of traffic). With
        /// replicas, give each one (repeat the flag or comma-separate): each holds the flows of
        /// the sidecars streaming from it.
        #[arg(long, value_delimiter = ',')]
        control_plane: Vec<String>,
        /// App port assumed for replayed flows (L7 log lines do not carry it).
        #[arg(long, default_value_t = DEFAULT_PORT)]
        port: u16,
    },
    /// Suggest least-privilege ALLOW policies from observed decisions (YAML on stdout).
    #[command(
        after_help = "Examples:\n  meshgate policy suggest --from orders.log --min-count 3 > observed.yaml\n  meshgate policy suggest --control-plane 127.0.0.1:15011 > observed.yaml",
        group = clap::ArgGroup::new("source").required(true).multiple(true).args(["from", "control_plane"])
    )]
    Suggest {
        /// Sidecar JSON access log (`meshgate proxy --log-format json`).
        #[arg(long)]
        from: Option<PathBuf>,
        /// Learn from the flows a running control plane collected from its sidecars (its admin
        /// listener, e.g. http://127.0.0.1:15011; the last 10 minutes of traffic), in addition
        /// to --from. With replicas, give each one (repeat the flag or comma-separate).
        #[arg(long, value_delimiter = ',')]
        control_plane: Vec<String>,
        /// Drop flows seen fewer times than this.
        #[arg(long, default_value_t = 1)]
        min_count: usize,
        /// Learn from denied requests too (off: refused requests never become permissions).
        #[arg(long)]
        include_denied: bool,
    },
}

pub fn run(command: PolicyCommand) -> Result<ExitCode> {
    match command {
        PolicyCommand::Check { dir } => check(&dir),
        PolicyCommand::Test { dir, cases } => test(&dir, &cases),
        PolicyCommand::Explain {
            dir,
            from,
            to,
            method,
            path,
            port,
            headers,
        } => {
            let set = match load(&dir) {
                Ok(s) => s,
                Err(code) => return Ok(code),
            };
            let probe = Probe::new(
                &from,
                &to,
                method.as_deref(),
                path.as_deref(),
                port,
                &headers,
            )?;
            println!("{}", explain(&set, &probe));
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Diff {
            old,
            new,
            flows,
            control_plane,
            port,
        } => diff(&old, &new, flows.as_deref(), &control_plane, port),
        PolicyCommand::Suggest {
            from,
            control_plane,
            min_count,
            include_denied,
        } => suggest_cmd(
            from.as_deref(),
            &control_plane,
            SuggestOptions {
                min_count,
                include_denied,
            },
        ),
    }
}

/// Loads a directory; on errors prints them (`file:line: reason`, one per line) to stderr.
fn load(dir: &Path) -> Result<PolicySet, ExitCode> {
    load_dir(dir).map_err(|e| {
        eprintln!("{e}");
        ExitCode::FAILURE
    })
}

fn check(dir: &Path) -> Result<ExitCode> {
    let set = match load(dir) {
        Ok(s) => s,
        Err(code) => return Ok(code),
    };
    for warning in meshgate_policy_tools::lint::warnings(&set) {
        eprintln!("{warning}");
    }
    println!(
        "ok: {} policies, {} services, {} network policies, version {}",
        set.policies.len(),
        set.services.len(),
        set.network_policies.len(),
        set.version
    );
    Ok(ExitCode::SUCCESS)
}

fn test(dir: &Path, cases: &Path) -> Result<ExitCode> {
    let set = match load(dir) {
        Ok(s) => s,
        Err(code) => return Ok(code),
    };
    let file = load_cases(cases)?;
    let results = run_cases(&set, &file)?;
    let failed = results.iter().filter(|r| !r.passed()).count();
    for r in &results {
        println!("{r}");
    }
    println!("{} passed, {failed} failed", results.len() - failed);
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn read_log(path: &Path) -> Result<FlowLog> {
    let log = read_flows(path)?;
    let s = log.stats;
    if s.used == 0 {
        anyhow::bail!(
            "{}: no decision found ({s} of {} lines); give the sidecars' JSON decision log: run them with MESHGATE_LOG_FORMAT=json and save their output, e.g. `docker-compose logs --no-color orders-proxy > orders.log` or `kubectl logs POD -c meshgate-proxy > orders.log`",
            path.display(),
            s.lines
        );
    }
    if s.malformed + s.incomplete > 0 {
        eprintln!("{}: {s}", path.display());
    }
    Ok(log)
}

/// The flows a control plane holds (`GET /v1/flows` on its admin listener, `HOST:PORT` or a
/// URL), read like a decision log.
fn control_plane_flows(admin: &str) -> Result<FlowLog> {
    let admin = admin.trim_end_matches('/');
    let url = if admin.contains("://") {
        format!("{admin}/v1/flows")
    } else {
        format!("http://{admin}/v1/flows")
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let body = runtime
        .block_on(crate::health_cmd::get(&url, std::time::Duration::from_secs(10)))
        .map_err(|e| {
            anyhow::anyhow!(
                "no flows from {url}: {e:#}; is `meshgate control-plane serve` running there? Point to its admin listener with --control-plane HOST:PORT"
            )
        })?;
    let log = meshgate_policy_tools::flows::parse_flows(&body);
    if log.stats.malformed + log.stats.incomplete > 0 {
        eprintln!("{url}: {}", log.stats);
    }
    Ok(log)
}

/// Flows from a log file and/or control planes, together.
fn gather_flows(file: Option<&Path>, control_planes: &[String]) -> Result<Option<FlowLog>> {
    let mut all: Option<FlowLog> = None;
    if let Some(path) = file {
        all = Some(read_log(path)?);
    }
    for admin in control_planes {
        let log = control_plane_flows(admin)?;
        let merged = all.get_or_insert_with(FlowLog::default);
        merged.flows.extend(log.flows);
    }
    Ok(all)
}

fn diff(
    old: &Path,
    new: &Path,
    flows: Option<&Path>,
    control_plane: &[String],
    port: u16,
) -> Result<ExitCode> {
    let (old_set, new_set) = match (load(old), load(new)) {
        (Ok(o), Ok(n)) => (o, n),
        _ => return Ok(ExitCode::FAILURE),
    };
    let (classes, changes) = diff_sets(&old_set, &new_set);
    for c in &changes {
        println!("{c}");
    }
    println!(
        "{} of {classes} request classes change decision (version {} → {})",
        changes.len(),
        old_set.version,
        new_set.version
    );
    let mut changed = !changes.is_empty();
    if let Some(log) = gather_flows(flows, control_plane)? {
        let fd = diff_flows(&old_set, &new_set, &log.flows, port);
        print_flow_diff(&fd, log.flows.iter().map(|f| f.count).sum());
        changed |= !fd.is_empty();
    }
    Ok(if changed {
        ExitCode::from(EXIT_CHANGED)
    } else {
        ExitCode::SUCCESS
    })
}

fn print_flow_diff(fd: &FlowDiff, observed: usize) {
    let total = |l: &[(_, usize)]| l.iter().map(|(_, n)| n).sum::<usize>();
    println!(
        "observed flows: {observed} requests, {} distinct; would start being denied: {} ({} \
         requests); would start being allowed: {} ({} requests)",
        fd.distinct,
        fd.newly_denied.len(),
        total(&fd.newly_denied),
        fd.newly_allowed.len(),
        total(&fd.newly_allowed),
    );
    for (c, n) in &fd.newly_denied {
        println!("newly denied ({n} requests): {c}");
    }
    for (c, n) in &fd.newly_allowed {
        println!("newly allowed ({n} requests): {c}");
    }
}

fn suggest_cmd(
    from: Option<&Path>,
    control_plane: &[String],
    opts: SuggestOptions,
) -> Result<ExitCode> {
    let log = gather_flows(from, control_plane)?.unwrap_or_default();
    let s = suggest(&log.flows, opts);
    eprintln!(
        "learned {} flows into {} policies; dropped {} below --min-count {}, {} denied requests, \
         {} not expressible",
        s.learned,
        s.policies.len(),
        s.below_min_count,
        opts.min_count,
        s.denied,
        s.unusable.len()
    );
    for u in &s.unusable {
        eprintln!("  not expressible as a policy: {u}");
    }
    print!("{}", to_yaml(&s.policies)?);
    Ok(ExitCode::SUCCESS)
}
