//! `meshgate`: one binary, one subcommand per role. Argument parsing and wiring only; the work is
//! done by the library crates.

mod alloc;
mod ca_cmd;
mod check_cmd;
mod control_plane_cmd;
mod demo;
mod health_cmd;
mod inject_cmd;
mod install_cmd;
mod log_format;
mod log_writer;
mod policy_cmd;
mod proxy_cmd;
mod quarantine_cmd;
mod redirect_cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

/// mimalloc instead of glibc's malloc: [`alloc`] says why, and why not through `mimalloc::MiMalloc`.
#[global_allocator]
static ALLOCATOR: alloc::Mimalloc = alloc::Mimalloc;

/// meshgate — a zero-trust microsegmentation mesh.
#[derive(Debug, Parser)]
#[command(name = "meshgate", version, about, propagate_version = true)]
struct Cli {
    /// Log line format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "MESHGATE_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The certificate authority: create it, mint join tokens, issue and serve SVIDs.
    Ca {
        #[command(subcommand)]
        command: ca_cmd::CaCommand,
    },
    /// The sidecar: inbound mTLS + per-request authorization, outbound mTLS.
    #[command(
        after_help = "Example:\n  meshgate proxy --app 127.0.0.1:8080 --ca https://ca:15012 --ca-bundle root.pem --token $TOKEN --control-plane https://control-plane:15010"
    )]
    Proxy(Box<proxy_cmd::ProxyArgs>),
    /// Start a whole local mesh (CA, web → orders → payments with sidecars) and show its decisions.
    #[command(
        after_help = "Example:\n  meshgate demo            # until Ctrl-C\n  meshgate demo --once     # the scripted traffic, then exit"
    )]
    Demo(demo::DemoArgs),
    /// The demo's HTTP app alone (for containers and `demo --with-ebpf`).
    #[command(hide = true)]
    DemoApp(demo::app::AppArgs),
    /// The control plane: serves policies and services to sidecars.
    ControlPlane {
        #[command(subcommand)]
        command: control_plane_cmd::ControlPlaneCommand,
    },
    /// Preflight: this host (kernel, privileges, cgroup v2, bpffs, Docker) and, given their
    /// addresses, a running mesh (CA, trust bundle, control plane, sidecars in sync).
    #[command(
        after_help = "Example:\n  meshgate check\n  meshgate check --control-plane 127.0.0.1:15011 --ca https://127.0.0.1:15012 --ca-bundle ./ca/bundle.pem"
    )]
    Check(check_cmd::CheckArgs),
    /// Every sidecar a control plane knows: identity, acked version, last NACK (drift).
    #[command(after_help = "Example:\n  meshgate status --control-plane 127.0.0.1:15011")]
    Status(control_plane_cmd::StatusArgs),
    /// Print the web console's URL (the control plane's admin listener) and open it if a browser is there.
    #[command(after_help = "Example:\n  meshgate dashboard --control-plane 127.0.0.1:15011")]
    Dashboard(control_plane_cmd::DashboardArgs),
    /// Stream individual decisions live from the sidecars (through the control plane) as JSON lines.
    #[command(
        after_help = "Example:\n  meshgate tap --control-plane 127.0.0.1:15011 --decision deny\n  meshgate tap --workload spiffe://mesh.local/ns/shop/sa/web --count 10"
    )]
    Tap(control_plane_cmd::TapArgs),
    /// Emergency mesh-wide DENY for one identity (and `--lift` to undo it).
    #[command(
        after_help = "Example:\n  meshgate quarantine spiffe://mesh.local/ns/shop/sa/web --policy-dir ./policies --control-plane 127.0.0.1:15011\n  meshgate quarantine spiffe://mesh.local/ns/shop/sa/web --policy-dir ./policies --lift"
    )]
    Quarantine(quarantine_cmd::QuarantineArgs),
    /// Check an HTTP health endpoint (for container HEALTHCHECKs; exit 0 when healthy).
    #[command(after_help = "Example:\n  meshgate health http://127.0.0.1:15000/ready")]
    Health(health_cmd::HealthArgs),
    /// Policy-as-code tools: check, test, explain, diff, suggest.
    Policy {
        #[command(subcommand)]
        command: policy_cmd::PolicyCommand,
    },
    /// Wait until SIGTERM or Ctrl-C (the process that holds a compose "pod"'s network namespace).
    #[command(hide = true)]
    Pause,
    /// Add the meshgate sidecar, redirect init and identity bootstrap to docker-compose or
    /// Kubernetes manifests.
    #[command(
        after_help = "Example:\n  meshgate inject docker-compose.yml -o docker-compose.mesh.yml\n  meshgate inject deployment.yaml --dry-run"
    )]
    Inject(inject_cmd::InjectArgs),
    /// Print the Kubernetes manifests of the mesh: namespace `meshgate` with the CA, the control
    /// plane, their RBAC and policies, and the CRDs of the policy kinds.
    #[command(
        after_help = "Example:\n  meshgate install | kubectl apply --server-side -f -\n  meshgate install --ca-dir ./ca --policy-dir ./policies -o meshgate.yaml\n  meshgate install --crds-only"
    )]
    Install(install_cmd::InstallArgs),
    /// eBPF redirect + L3/L4 enforcement for a workload's cgroup: attach, detach, status.
    Redirect {
        #[command(subcommand)]
        command: redirect_cmd::RedirectCommand,
    },
}

/// Parses `30s`, `10m`, `1h`.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 30s, 10m, 1h)"))
}

/// The demo's logging: everything (at `MESHGATE_LOG`, default info) to `file`, warnings and errors
/// to the terminal, so its decision table is not buried under the parts' INFO lines.
fn init_demo_logging(format: LogFormat, file: &std::path::Path) -> anyhow::Result<()> {
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    if let Some(parent) = file.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let log = std::fs::File::create(file).map_err(|e| {
        anyhow::anyhow!(
            "cannot write the demo log {}: {e}; choose another with --log-file",
            file.display()
        )
    })?;
    let filter = tracing_subscriber::EnvFilter::try_from_env("MESHGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let to_file = tracing_subscriber::fmt::layer()
        .with_writer(std::sync::Mutex::new(log))
        .with_ansi(false);
    // The stock formatters write the decision lines too: the demo's few requests do not need
    // `log_format`'s fast path (which writes to one writer, and the demo has two layers).
    let to_file = match format {
        LogFormat::Text => to_file.boxed(),
        LogFormat::Json => to_file
            .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
            .event_format(tracing_subscriber::fmt::format().json().flatten_event(true))
            .boxed(),
    }
    .with_filter(filter);
    let to_terminal = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_filter(tracing_subscriber::filter::LevelFilter::WARN);
    tracing_subscriber::registry()
        .with(to_file)
        .with(to_terminal)
        .init();
    Ok(())
}

/// Logs to stderr through [`log_writer`]: a request's thread appends its decision line to a
/// buffer that one thread writes in batches (a synchronous write per decision cost 14 % of a
/// sidecar's saturation throughput; a channel send, a wake-up and a write per line still cost
/// kernel time on the core the sidecar shares with its app). Lines are never dropped; a line
/// waits at most 10 ms. The returned guard writes what is pending when it is dropped (at the
/// end of `main`).
fn init_logging(format: LogFormat) -> log_writer::Guard {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MESHGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (writer, guard) =
        log_writer::LogWriter::spawn(std::io::stderr(), log_writer::Limits::default());
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer.clone())
        .with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    // The per-request decision line is written by `log_format` (the stock formatter's bytes,
    // a fraction of the cost); with colours, by the stock formatter.
    if !ansi {
        let shape = match format {
            LogFormat::Text => log_format::Shape::Text,
            LogFormat::Json => log_format::Shape::Json,
        };
        let installed = meshgate_proxy::decision::set_line_writer(Box::new(
            log_format::DecisionWriter::new(shape, writer),
        ));
        debug_assert!(installed.is_ok(), "logging is set up once");
    }
    guard
}

/// Holds a network namespace for containers that join it, like Kubernetes' pause container.
fn pause() -> anyhow::Result<ExitCode> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(ca_cmd::shutdown_signal());
    Ok(ExitCode::SUCCESS)
}

/// Commands users of linkerd and istioctl type first, and ours for the same job.
const FAMILIAR: &[(&str, &str)] = &[
    (
        "proxy-status",
        "meshgate status (sidecars, acked policy version, drift)",
    ),
    (
        "authz",
        "meshgate policy explain --from ID --to ID --path P (why a request is allowed or denied)",
    ),
    (
        "authorization",
        "meshgate policy explain --from ID --to ID --path P",
    ),
    (
        "analyze",
        "meshgate policy check DIR (validation with file:line)",
    ),
    (
        "viz",
        "meshgate dashboard (the web console on the control plane's admin listener: graph, flows, live tap, SLIs; `meshgate tap` streams decisions)",
    ),
    ("kube-inject", "meshgate inject FILE"),
    (
        "upgrade",
        "meshgate install --ca-dir DIR | kubectl apply --server-side -f - (the same CA, new manifests)",
    ),
];

/// For a command that only exists in linkerd/istioctl, the meshgate command that does its job.
fn familiar_hint(args: &[String]) -> Option<String> {
    let mut rest = args.iter().skip(1);
    let first = loop {
        let arg = rest.next()?;
        if arg == "--log-format" {
            rest.next(); // its value
        } else if !arg.starts_with('-') {
            break arg;
        }
    };
    FAMILIAR
        .iter()
        .find(|(theirs, _)| theirs == first)
        .map(|(theirs, ours)| {
            format!("error: meshgate has no `{theirs}` command; the same job: {ours}\n\nFor the list of commands, try 'meshgate --help'.")
        })
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if let Some(hint) = familiar_hint(&args) {
        eprintln!("{hint}");
        return ExitCode::from(2);
    }
    let cli = Cli::parse_from(args);
    // Held until `main` returns: dropping it flushes the log lines still pending.
    let _log_guard = match &cli.command {
        // The eBPF demo's parts are processes with logs of their own.
        Command::Demo(args) if !args.with_ebpf => {
            if let Err(e) = init_demo_logging(cli.log_format, &demo::log_path(args)) {
                eprintln!("error: {e:#}");
                return ExitCode::FAILURE;
            }
            None
        }
        _ => Some(init_logging(cli.log_format)),
    };
    let result = match cli.command {
        Command::Ca { command } => ca_cmd::run(command).map(|()| ExitCode::SUCCESS),
        Command::Proxy(args) => proxy_cmd::run(*args).map(|()| ExitCode::SUCCESS),
        Command::Demo(args) => demo::run(args).map(|()| ExitCode::SUCCESS),
        Command::DemoApp(args) => demo::app::run(args).map(|()| ExitCode::SUCCESS),
        Command::Health(args) => health_cmd::run(args).map(|()| ExitCode::SUCCESS),
        Command::ControlPlane { command } => {
            control_plane_cmd::run(command).map(|()| ExitCode::SUCCESS)
        }
        Command::Status(args) => control_plane_cmd::status(args).map(|()| ExitCode::SUCCESS),
        Command::Dashboard(args) => control_plane_cmd::dashboard(args).map(|()| ExitCode::SUCCESS),
        Command::Tap(args) => control_plane_cmd::tap(args).map(|()| ExitCode::SUCCESS),
        Command::Check(args) => check_cmd::run(args),
        Command::Quarantine(args) => quarantine_cmd::run(args).map(|()| ExitCode::SUCCESS),
        Command::Policy { command } => policy_cmd::run(command),
        Command::Pause => pause(),
        Command::Inject(args) => inject_cmd::run(args).map_err(anyhow::Error::from),
        Command::Install(args) => install_cmd::run(args).map(|()| ExitCode::SUCCESS),
        Command::Redirect { command } => redirect_cmd::run(command).map(|()| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", error_text(&e));
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line, each cause once: many error types already print their
/// source in their own message, and `{:#}` would repeat it ("…(os error 2): …(os error 2)").
fn error_text(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn each_cause_is_said_once() {
        let io = std::io::Error::from(std::io::ErrorKind::NotFound);
        let said = io.to_string();
        #[derive(Debug, thiserror::Error)]
        #[error("cannot read x.yaml: {source}")]
        struct Read {
            source: std::io::Error,
        }
        let e = anyhow::Error::from(Read { source: io }).context("loading cases");
        let text = super::error_text(&e);
        assert_eq!(text, format!("loading cases: cannot read x.yaml: {said}"));
        assert_eq!(text.matches(&said).count(), 1);
    }

    /// Every flag and argument a user can see has help text, and every command's help ends
    /// with an example.
    #[test]
    fn every_flag_has_help_and_every_command_an_example() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            let path = format!("{path} {}", cmd.get_name()).trim().to_string();
            if cmd.is_hide_set() {
                return;
            }
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if arg.is_hide_set() || id == "help" || id == "version" {
                    continue;
                }
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path}: --{id} has no help"));
                }
            }
            let subcommands: Vec<_> = cmd
                .get_subcommands()
                .filter(|c| c.get_name() != "help")
                .collect();
            if subcommands.is_empty() {
                let after = cmd
                    .get_after_help()
                    .map(|h| h.to_string())
                    .unwrap_or_default();
                if !after.contains("Example") {
                    missing.push(format!("{path}: no example"));
                }
                // Every example parses: the help never shows a command that cannot run.
                for line in after.lines().map(str::trim) {
                    let line = line.strip_prefix("sudo ").unwrap_or(line);
                    if !line.starts_with("meshgate ") {
                        continue;
                    }
                    // The command without its comment, output redirection or pipe.
                    let command = line.split(" #").next().unwrap_or(line);
                    let command = command.split(" > ").next().unwrap_or(command);
                    // Only meshgate's own part of a pipeline (`meshgate install | kubectl …`).
                    let command = command.split(" | ").next().unwrap_or(command);
                    let words: Vec<&str> = command.split_whitespace().collect();
                    if let Err(e) = <super::Cli as clap::Parser>::try_parse_from(&words) {
                        missing.push(format!("{path}: example `{line}` does not parse: {e}"));
                    }
                }
            }
            for sub in subcommands {
                walk(sub, &path, missing);
            }
        }
        let mut missing = Vec::new();
        walk(&super::Cli::command(), "", &mut missing);
        assert!(missing.is_empty(), "{}", missing.join("\n"));
    }
}
