//! `meshgate check`: preflight for this host and, given their addresses, for a running mesh —
//! like `linkerd check`. Every line is ✔ or ✖ (ℹ for facts that need no action); each ✖ says
//! the fix. Exit 1 when anything is ✖.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use clap::Args;

/// Check this host, and a running mesh.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Also check a running control plane through its admin listener (HOST:PORT or URL). With
    /// replicas, give each one's (repeat the flag or comma-separate): each is checked, and they
    /// must serve the same version.
    #[arg(long, value_delimiter = ',')]
    control_plane: Vec<String>,
    /// Also check a running CA (https://HOST:PORT), verified with --ca-bundle.
    #[arg(long, requires = "ca_bundle")]
    ca: Option<String>,
    /// Trust bundle (PEM) to verify the CA with (e.g. the CA directory's bundle.pem).
    #[arg(long)]
    ca_bundle: Option<PathBuf>,
    /// Only check the mesh (skip the host checks, e.g. from a laptop).
    #[arg(long)]
    skip_host: bool,
}

/// One line of the report.
struct Line {
    ok: Option<bool>,
    what: String,
    fix: Option<String>,
}

impl Line {
    fn ok(what: impl Into<String>) -> Self {
        Self {
            ok: Some(true),
            what: what.into(),
            fix: None,
        }
    }
    fn fail(what: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            ok: Some(false),
            what: what.into(),
            fix: Some(fix.into()),
        }
    }
    fn info(what: impl Into<String>) -> Self {
        Self {
            ok: None,
            what: what.into(),
            fix: None,
        }
    }
}

impl std::fmt::Display for Line {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mark = match self.ok {
            Some(true) => "✔",
            Some(false) => "✖",
            None => "ℹ",
        };
        write!(f, "{mark} {}", self.what)?;
        if let Some(fix) = &self.fix {
            write!(f, "\n    fix: {fix}")?;
        }
        Ok(())
    }
}

fn kernel_release() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .ok()
        .map(|s| s.trim().to_string())
}

/// meshgate's cgroup programs use BPF links (5.7) and `bpf_get_netns_cookie` for sock_addr (5.8).
const MIN_KERNEL: (u32, u32) = (5, 8);

fn host_checks() -> Vec<Line> {
    let mut out = Vec::new();
    match kernel_release() {
        Some(release) => {
            let mut parts = release.split(|c: char| !c.is_ascii_digit());
            let major = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
            let minor = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
            if (major, minor) >= MIN_KERNEL {
                out.push(Line::ok(format!(
                    "kernel {release} (eBPF redirect needs ≥ 5.8)"
                )));
            } else {
                out.push(Line::fail(
                    format!("kernel {release} is older than 5.8"),
                    "run the eBPF redirect on a newer kernel; the sidecars, CA and control plane work without it",
                ));
            }
        }
        None => out.push(Line::fail(
            "kernel version unknown (/proc/sys/kernel/osrelease unreadable)",
            "run on Linux with /proc mounted",
        )),
    }
    let pre = meshgate_ebpf::preflight();
    if pre.privileged() {
        out.push(Line::ok(
            "privileges for eBPF (CAP_BPF or CAP_SYS_ADMIN, and CAP_NET_ADMIN)",
        ));
    } else {
        out.push(Line::fail(
            format!("no privileges for eBPF (euid {}, CapEff {:#x})", pre.euid, pre.cap_eff),
            "run `meshgate redirect` as root (sudo) or with CAP_BPF and CAP_NET_ADMIN; nothing else in meshgate needs them",
        ));
    }
    if pre.cgroup2_mounts.is_empty() {
        out.push(Line::fail(
            "no cgroup v2 mount",
            "mount it (`mount -t cgroup2 none /sys/fs/cgroup`) or boot with systemd.unified_cgroup_hierarchy=1",
        ));
    } else {
        let mounts: Vec<String> = pre
            .cgroup2_mounts
            .iter()
            .map(|m| m.display().to_string())
            .collect();
        // The compose mesh mounts ${MESHGATE_CGROUP2:-/sys/fs/cgroup/unified} (hybrid hosts).
        let default_mount = std::path::Path::new("/sys/fs/cgroup/unified");
        let note = if pre.cgroup2_mounts.iter().any(|m| m == default_mount) {
            String::new()
        } else {
            format!(" (for the compose demo set MESHGATE_CGROUP2={})", mounts[0])
        };
        out.push(Line::ok(format!(
            "cgroup v2 at {}{note}",
            mounts.join(", ")
        )));
    }
    if pre.bpffs_mounted {
        out.push(Line::ok(
            "bpffs at /sys/fs/bpf (redirect pins survive the attaching process)",
        ));
    } else {
        out.push(Line::fail(
            "bpffs not mounted at /sys/fs/bpf",
            "`mount -t bpf bpf /sys/fs/bpf` (add it to /etc/fstab to keep it)",
        ));
    }
    out.push(Line::info(format!(
        "kernel BTF {} (not needed: meshgate's programs do not rely on CO-RE)",
        if pre.kernel_btf { "present" } else { "absent" }
    )));
    match std::process::Command::new("docker")
        .args(["info", "--format", "{{.CgroupDriver}}"])
        .output()
    {
        Ok(out_) if out_.status.success() => {
            let driver = String::from_utf8_lossy(&out_.stdout).trim().to_string();
            if driver == "cgroupfs" {
                out.push(Line::ok(
                    "Docker cgroup driver cgroupfs (the compose mesh's cgroup_parent paths work)",
                ));
            } else {
                out.push(Line::fail(
                    format!("Docker cgroup driver {driver:?}: the compose mesh's cgroup_parent paths need cgroupfs"),
                    "start dockerd with `--exec-opt native.cgroupdriver=cgroupfs` for the compose demo",
                ));
            }
        }
        Ok(_) => out.push(Line::info(
            "Docker installed but no engine answers (only the compose demo needs it)",
        )),
        Err(_) => out.push(Line::info(
            "Docker not installed (only the compose demo needs it)",
        )),
    }
    out
}

async fn mesh_checks(args: &CheckArgs) -> Vec<Line> {
    let mut out = Vec::new();
    if let (Some(url), Some(bundle_path)) = (&args.ca, &args.ca_bundle) {
        out.extend(ca_checks(url, bundle_path).await);
    }
    let mut versions = std::collections::BTreeSet::new();
    for admin in &args.control_plane {
        let who = if args.control_plane.len() > 1 {
            format!("control plane {admin}")
        } else {
            "control plane".to_string()
        };
        match crate::control_plane_cmd::fetch_status(admin).await {
            Err(e) => out.push(Line::fail(
                format!("control plane: {e:#}"),
                "start `meshgate control-plane serve`, or give its admin listener with --control-plane HOST:PORT",
            )),
            Ok(body) => {
                let report: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                let version = report["version"].as_str().unwrap_or("(none)").to_string();
                versions.insert(version.clone());
                out.push(Line::ok(format!("{who} serving policy version {version}")));
                if let Some(refused) = report["last_rejected"].as_str() {
                    out.push(Line::fail(
                        format!("the {who} refused the last policy update: {refused}"),
                        "fix the file named above (`meshgate policy check DIR` shows every problem); the version above stays in force",
                    ));
                }
                let sidecars = report["sidecars"].as_array().cloned().unwrap_or_default();
                let connected: Vec<&serde_json::Value> =
                    sidecars.iter().filter(|s| s["connected"].as_bool() == Some(true)).collect();
                let lagging: Vec<String> = connected
                    .iter()
                    .filter(|s| !s["last_ack_at"].is_null() && s["in_sync"].as_bool() != Some(true))
                    .map(|s| s["id"].as_str().unwrap_or("?").to_string())
                    .collect();
                let silent = connected.iter().filter(|s| s["last_ack_at"].is_null()).count();
                if lagging.is_empty() {
                    out.push(Line::ok(format!(
                        "{} connected sidecars in sync{}",
                        connected.len() - silent,
                        if silent > 0 { format!(" ({silent} streams never acknowledged: see `meshgate status`)") } else { String::new() }
                    )));
                } else {
                    out.push(Line::fail(
                        format!("sidecars not on version {version}: {}", lagging.join(", ")),
                        "see `meshgate status` for their last NACK; a sidecar that refuses a version names the problem",
                    ));
                }
                let now = time::OffsetDateTime::now_utc().unix_timestamp();
                let overdue = overdue_renewals(&connected, now);
                if overdue.is_empty() {
                    out.push(Line::ok(format!(
                        "{} connected sidecars hold SVIDs renewed on time",
                        connected.len()
                    )));
                } else {
                    out.push(Line::fail(
                        format!("SVIDs about to expire unrenewed: {}", overdue.join(", ")),
                        "the sidecar cannot reach the CA: check its `/identity` admin endpoint (last error) and the CA (`meshgate check --ca`); it renews at half its SVID lifetime",
                    ));
                }
            }
        }
    }
    if versions.len() > 1 {
        out.push(Line::fail(
            format!(
                "the control-plane replicas serve different versions: {}",
                versions.into_iter().collect::<Vec<_>>().join(", ")
            ),
            "give every replica the same policy directory (one ConfigMap or volume); a replica that refused an update says so above",
        ));
    }
    out
}

async fn ca_checks(url: &str, bundle_path: &std::path::Path) -> Vec<Line> {
    let mut out = Vec::new();
    let pem = match std::fs::read(bundle_path) {
        Ok(p) => p,
        Err(e) => {
            out.push(Line::fail(
                format!(
                    "cannot read the trust bundle {}: {e}",
                    bundle_path.display()
                ),
                "give the CA directory's bundle.pem with --ca-bundle",
            ));
            return out;
        }
    };
    let bundle = match meshgate_ca::TrustBundle::from_pem(&pem) {
        Ok(b) => b,
        Err(e) => {
            out.push(Line::fail(
                format!("{} is not a trust bundle: {e}", bundle_path.display()),
                "give the CA directory's bundle.pem with --ca-bundle",
            ));
            return out;
        }
    };
    let now = time::OffsetDateTime::now_utc();
    let soonest = bundle
        .certs()
        .iter()
        .filter_map(|c| meshgate_ca::cert::not_after(c).ok())
        .min();
    match soonest {
        Some(t) if t <= now => out.push(Line::fail(
            format!("a root in the trust bundle expired at {}", meshgate_ca::cert::rfc3339(t)),
            "rotate the root: `meshgate ca rotate --dir CA_DIR`, then `--finish` one SVID TTL later",
        )),
        Some(t) if t - now < time::Duration::days(30) => out.push(Line::fail(
            format!("a root in the trust bundle expires soon, at {}", meshgate_ca::cert::rfc3339(t)),
            "rotate the root now: `meshgate ca rotate --dir CA_DIR`, then `--finish` one SVID TTL later",
        )),
        Some(t) => out.push(Line::ok(format!(
            "trust bundle: {} root(s), valid until at least {}",
            bundle.certs().len(),
            meshgate_ca::cert::rfc3339(t)
        ))),
        None => out.push(Line::fail("the trust bundle holds no readable certificate", "give the CA directory's bundle.pem with --ca-bundle")),
    }
    // The CA's identity is in the bundle's trust domain: the one its roots' CA name.
    let td = match bundle
        .certs()
        .iter()
        .find_map(|c| meshgate_ca::cert::cert_info(c).ok())
        .map(|i| i.id.trust_domain())
    {
        Some(td) => td,
        None => match meshgate_ca::TrustDomain::new("mesh.local") {
            Ok(td) => td,
            Err(_) => return out,
        },
    };
    let shared = Arc::new(arc_swap::ArcSwap::from_pointee(bundle));
    match meshgate_proxy::identity::ca_client::CaEndpoint::new(url, &td, shared) {
        Err(e) => out.push(Line::fail(
            format!("CA URL: {e}"),
            "give --ca https://HOST:PORT",
        )),
        Ok(ca) => match tokio::time::timeout(Duration::from_secs(10), ca.bundle_and_date()).await {
            Ok(Ok((_, date))) => {
                out.push(Line::ok(format!(
                    "CA at {url} answers and proves its identity against the bundle"
                )));
                out.push(clock_skew(date.as_deref()));
            }
            Ok(Err(e)) => out.push(Line::fail(
                format!("CA at {url}: {e}"),
                "is `meshgate ca serve` running there, and is --ca-bundle its bundle.pem?",
            )),
            Err(_) => out.push(Line::fail(
                format!("CA at {url}: no answer within 10 s"),
                "is `meshgate ca serve` running there?",
            )),
        },
    }
    out
}

pub fn run(args: CheckArgs) -> Result<std::process::ExitCode> {
    let mut lines = Vec::new();
    if !args.skip_host {
        println!("this host:");
        let host = host_checks();
        for l in &host {
            println!("{l}");
        }
        lines.extend(host);
    }
    if !args.control_plane.is_empty() || args.ca.is_some() {
        println!("the mesh:");
        let mesh = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(mesh_checks(&args));
        for l in &mesh {
            println!("{l}");
        }
        lines.extend(mesh);
    }
    let failed = lines.iter().filter(|l| l.ok == Some(false)).count();
    if failed > 0 {
        println!("{failed} check(s) failed");
        Ok(std::process::ExitCode::FAILURE)
    } else {
        println!("all checks passed");
        Ok(std::process::ExitCode::SUCCESS)
    }
}

/// HTTP's `Date` format (RFC 9110 §5.6.7, IMF-fixdate).
const HTTP_DATE: &str =
    "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT";

/// Clocks further apart than this make fresh SVIDs look not-yet-valid or expired to peers.
const MAX_SKEW: time::Duration = time::Duration::seconds(5);

/// This host's clock against the CA's `Date` header (one-second resolution).
fn clock_skew(date: Option<&str>) -> Line {
    let Some(date) = date else {
        return Line::info("clock skew unknown: the CA sent no Date header");
    };
    let format = time::format_description::parse_borrowed::<2>(HTTP_DATE)
        .expect("a valid format description");
    let Ok(theirs) = time::PrimitiveDateTime::parse(date, &format) else {
        return Line::info(format!(
            "clock skew unknown: unreadable Date header {date:?}"
        ));
    };
    let skew = time::OffsetDateTime::now_utc() - theirs.assume_utc();
    // The header is whole seconds: up to one second of difference is rounding.
    if skew.abs() <= MAX_SKEW + time::Duration::seconds(1) {
        Line::ok(format!(
            "clock within {}s of the CA's",
            skew.whole_seconds().abs()
        ))
    } else {
        Line::fail(
            format!(
                "clock {}s {} the CA's: SVIDs may look not yet valid or expired",
                skew.whole_seconds().abs(),
                if skew.is_positive() {
                    "ahead of"
                } else {
                    "behind"
                }
            ),
            "synchronize both clocks (NTP: `timedatectl set-ntp true` or chrony)",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_skew_against_the_ca_date() {
        let format = time::format_description::parse_borrowed::<2>(HTTP_DATE).unwrap();
        let at = |offset: i64| {
            (time::OffsetDateTime::now_utc() + time::Duration::seconds(offset))
                .format(&format)
                .unwrap()
        };
        assert_eq!(clock_skew(Some(&at(0))).ok, Some(true));
        assert_eq!(clock_skew(Some(&at(-3))).ok, Some(true));
        let behind = clock_skew(Some(&at(60)));
        assert_eq!(behind.ok, Some(false));
        assert!(behind.what.contains("behind the CA's"), "{}", behind.what);
        assert_eq!(clock_skew(Some(&at(-60))).ok, Some(false));
        assert_eq!(clock_skew(Some("yesterday")).ok, None);
        assert_eq!(clock_skew(None).ok, None);
    }
}

/// Connected sidecars whose SVID has less than a quarter of its life left, or none. A sidecar
/// renews at 40–50 % of its SVID's lifetime and reopens its control-plane stream with the new
/// one, so on a healthy stream at least half of the life it started with is left; a quarter
/// means renewals have been failing for a while. (The stream's start stands for the SVID's
/// issue time: it opened right after the renewal.)
fn overdue_renewals(connected: &[&serde_json::Value], now: i64) -> Vec<String> {
    connected
        .iter()
        .filter_map(|s| {
            let not_after = s["svid_not_after"].as_i64()?;
            let since = s["connected_at"].as_i64()?;
            let left = not_after - now;
            let life = (not_after - since).max(1);
            (left * 4 < life).then(|| {
                format!(
                    "{} ({})",
                    s["id"].as_str().unwrap_or("?"),
                    if left <= 0 {
                        "expired".to_string()
                    } else {
                        format!("{left} s left")
                    }
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod svid_tests {
    use super::overdue_renewals;

    #[test]
    fn a_quarter_of_the_life_left_is_overdue() {
        let s = |id: &str, connected_at: i64, not_after: i64| serde_json::json!({"id": id, "connected_at": connected_at, "svid_not_after": not_after});
        let fresh = s("spiffe://m/ns/a/sa/fresh", 1000, 4600);
        let late = s("spiffe://m/ns/a/sa/late", 1000, 1800);
        let gone = s("spiffe://m/ns/a/sa/gone", 0, 1000);
        let old = serde_json::json!({"id": "spiffe://m/ns/a/sa/old", "connected_at": 1000});
        let all = [&fresh, &late, &gone, &old];
        let overdue = overdue_renewals(&all, 1700);
        assert_eq!(
            overdue,
            [
                "spiffe://m/ns/a/sa/late (100 s left)",
                "spiffe://m/ns/a/sa/gone (expired)"
            ]
        );
    }
}
