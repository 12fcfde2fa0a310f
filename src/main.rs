//! `meshgate`: one binary, one subcommand per role. Argument parsing and wiring only; the work is
//! done by the library crates.

mod ca_cmd;
mod proxy_cmd;
mod redirect_cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

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
    Proxy(Box<proxy_cmd::ProxyArgs>),
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

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MESHGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let result = match cli.command {
        Command::Ca { command } => ca_cmd::run(command),
        Command::Proxy(args) => proxy_cmd::run(*args),
        Command::Redirect { command } => redirect_cmd::run(command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
