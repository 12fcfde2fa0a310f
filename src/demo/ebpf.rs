//! `meshgate demo --with-ebpf`: the same mesh and script as `meshgate demo`, but each workload runs
//! like a pod. `web`, `orders` and `payments` each get a network namespace (`mgdemo-<name>`,
//! 10.198.0.2–4 on a bridge that lives in its own namespace, `mgdemo-net`). In each pod the app and
//! the sidecar are in their own cgroup v2 leaves (`<cgroup2>/mgdemo/<name>/{app,sidecar}`). The eBPF
//! redirect is attached to each app cgroup, so the apps call each other by plain
//! `http://<name>:8080/…` (no proxy port anywhere), and the kernel steers every connection into the
//! local sidecar, which carries it over mTLS.
//!
//! Apps and sidecars are child processes of this binary (`meshgate demo-app`, `meshgate proxy`)
//! placed into their namespace and cgroup before exec. The decision table is fed by the sidecars'
//! JSON decision log lines. Everything is removed on exit, on Ctrl-C, and at the start of the next
//! run if a previous one crashed.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use meshgate_ca::{CaDir, SpiffeId, TrustDomain};
use meshgate_ebpf::sandbox::{self, Sandbox};
use tokio::sync::mpsc;

use super::{DemoArgs, Row, SAMPLE_POLICIES, SCRIPT, WORKLOADS, id_of, print_header, print_row};

/// The demo's sandbox: the prefix of every name it creates (netns, cgroup directory, pins).
const PREFIX: &str = "mgdemo";
const APP_PORT: u16 = 8080;
const INBOUND_PORT: u16 = 15006;
const OUTBOUND_PORT: u16 = 15001;
const ADMIN_PORT: u16 = 15000;
/// Serialises runs: the names are fixed, so a second run would tear down the first one.
const LOCK: &str = "/run/meshgate-demo-ebpf.lock";

fn ip_of(index: usize) -> String {
    format!("10.198.0.{}", index + 2)
}

/// The name [`Sandbox::netns`] gives `name`'s namespace.
fn netns_of(name: &str) -> String {
    format!("{PREFIX}-{name}")
}

/// The refusal without root or cgroup v2: names both requirements and what is missing.
fn requirements_problem(euid: u32, has_cgroup2: bool) -> Option<String> {
    let mut missing = Vec::new();
    if euid != 0 {
        missing.push(format!("root (this process runs as euid {euid})"));
    }
    if !has_cgroup2 {
        missing.push("a cgroup v2 mount (no `cgroup2` entry in /proc/self/mountinfo)".to_string());
    }
    (!missing.is_empty()).then(|| {
        format!(
            "`meshgate demo --with-ebpf` needs root and cgroup v2 (it creates network namespaces, \
             cgroups and eBPF attachments); missing: {}. Fix: run it as root (sudo) on a Linux >= 5.9 \
             host with cgroup v2 mounted, or run `meshgate demo` without --with-ebpf",
            missing.join(" and ")
        )
    })
}

fn require_root_and_cgroup2() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    let mounts = meshgate_ebpf::preflight().cgroup2_mounts;
    if let Some(problem) = requirements_problem(euid, !mounts.is_empty()) {
        bail!(problem);
    }
    let ip_ok = Command::new("ip")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ip_ok {
        bail!(
            "`meshgate demo --with-ebpf` needs the `ip` tool (iproute2) for its network namespaces: apt-get install iproute2"
        );
    }
    Ok(())
}

/// Every process this run started, with where its output goes.
struct Proc {
    name: String,
    child: Child,
    /// The last lines it printed (shown when something fails).
    tail: Arc<Mutex<VecDeque<String>>>,
    ready: Arc<AtomicBool>,
}

/// What this run created; torn down by [`Lab::teardown`] (and by Drop if a panic skips it).
struct Lab {
    sandbox: Sandbox,
    dir: PathBuf,
    procs: Vec<Proc>,
    torn_down: bool,
}

impl Lab {
    fn app_cg(&self, name: &str) -> PathBuf {
        self.sandbox.cgroup_root().join(name).join("app")
    }

    fn sidecar_cg(&self, name: &str) -> PathBuf {
        self.sandbox.cgroup_root().join(name).join("sidecar")
    }

    /// A command run inside `name`'s pod: cgroup `leaf` first, then the netns, then exec. The
    /// child gets its own process group (Ctrl-C reaches only the demo, which stops it in order)
    /// and dies with the demo if the demo is killed.
    fn in_pod(&self, name: &str, leaf: &Path, mut cmd: Command) -> Result<Command> {
        sandbox::enter(&mut cmd, &netns_of(name), leaf, None)?;
        Ok(cmd)
    }

    /// Starts a long-running child; its output goes to `<dir>/logs/<name>.log`, `ready` turns
    /// true on a line containing `ready_marker`, and decision lines go to `rows`.
    fn spawn(
        &mut self,
        name: &str,
        mut cmd: Command,
        ready_marker: &'static str,
        rows: Option<mpsc::UnboundedSender<Row>>,
    ) -> Result<()> {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let log = Arc::new(Mutex::new(
            File::create(self.dir.join("logs").join(format!("{name}.log")))
                .context("creating a log file")?,
        ));
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        let ready = Arc::new(AtomicBool::new(false));
        let outputs: [Box<dyn Read + Send>; 2] = [
            Box::new(child.stdout.take().expect("piped")),
            Box::new(child.stderr.take().expect("piped")),
        ];
        for out in outputs {
            let (log, tail, ready, rows) = (log.clone(), tail.clone(), ready.clone(), rows.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { return };
                    if let Ok(mut f) = log.lock() {
                        let _ = writeln!(f, "{line}");
                    }
                    if line.contains(ready_marker) {
                        ready.store(true, Ordering::SeqCst);
                    }
                    if let (Some(rows), Some(row)) = (&rows, row_from_log(&line)) {
                        let _ = rows.send(row);
                    }
                    let mut t = tail.lock().expect("tail lock");
                    if t.len() == 15 {
                        t.pop_front();
                    }
                    t.push_back(line);
                }
            });
        }
        self.procs.push(Proc {
            name: name.to_string(),
            child,
            tail,
            ready,
        });
        Ok(())
    }

    /// What the children said last, for an error message.
    fn tails(&self) -> String {
        let mut out = String::new();
        for p in &self.procs {
            let t = p.tail.lock().expect("tail lock");
            out.push_str(&format!("\n--- {} (last lines)\n", p.name));
            for l in t.iter() {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    fn check_alive(&mut self) -> Result<()> {
        for p in &mut self.procs {
            if let Some(status) = p.child.try_wait()? {
                let name = p.name.clone();
                return Err(anyhow!("{name} exited ({status}){}", self.tails()));
            }
        }
        Ok(())
    }

    /// Stops the children, detaches eBPF, deletes the namespaces and cgroups. Returns what it
    /// could not remove.
    fn teardown(&mut self) -> Vec<String> {
        self.torn_down = true;
        for p in &self.procs {
            // SAFETY: the pid is our child, not yet reaped; it leads its own process group.
            unsafe { libc::kill(-(p.child.id() as i32), libc::SIGTERM) };
        }
        let until = Instant::now() + Duration::from_secs(3);
        for p in &mut self.procs {
            loop {
                match p.child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() < until => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    Ok(None) => {
                        // SAFETY: as above.
                        unsafe { libc::kill(-(p.child.id() as i32), libc::SIGKILL) };
                        let _ = p.child.wait();
                        break;
                    }
                }
            }
        }
        self.procs.clear();
        match self.sandbox.cleanup() {
            Err(sandbox::Error::Incomplete { left }) => left,
            Err(e) => vec![e.to_string()],
            Ok(()) => Vec::new(),
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if !self.torn_down {
            let _ = self.teardown();
        }
    }
}

fn services_yaml() -> String {
    WORKLOADS
        .iter()
        .enumerate()
        .map(|(i, name)| {
            format!(
                "apiVersion: meshgate.dev/v1\nkind: Service\nmetadata: {{ name: {name}, namespace: shop }}\nspec:\n  identity: {}\n  hosts: [{name}, \"{ip}\"]\n  ports: [{{ port: {APP_PORT}, protocol: http }}]\n  endpoints: [\"{ip}:{INBOUND_PORT}\"]\n",
                id_of(name),
                ip = ip_of(i),
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

/// Issues each workload's SVID into `<dir>/ids/<name>/` (static identity files for the sidecars).
fn issue_identities(dir: &Path) -> Result<()> {
    let ca_dir = CaDir::new(dir.join("ca"));
    let td = TrustDomain::new("mesh.local").expect("valid trust domain");
    ca_dir.init(&td, true)?;
    let ca = ca_dir.open()?;
    let bundle = ca.dir.read_bundle()?.to_pem();
    for name in WORKLOADS {
        let id = SpiffeId::parse(&id_of(name)).expect("valid ID");
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let issued = ca
            .authority
            .issue_for_key(&key, &id, Duration::from_secs(24 * 3600))?;
        let out = dir.join("ids").join(name);
        std::fs::create_dir_all(&out)?;
        std::fs::write(out.join("svid.pem"), issued.chain_pem())?;
        std::fs::write(out.join("bundle.pem"), &bundle)?;
        let key_path = out.join("key.pem");
        // Never readable by others, not even for a moment (the sidecar refuses such a key).
        meshgate_ca::fsutil::write_atomic(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    }
    Ok(())
}

/// A decision table row from a sidecar's JSON decision log line (parsed as the
/// [`meshgate_policy::DecisionRecord`] the sidecar wrote).
fn row_from_log(line: &str) -> Option<Row> {
    if !line.contains(meshgate_policy::record::DECISION_EVENT) {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    if v.get("event")?.as_str()? != meshgate_policy::record::DECISION_EVENT {
        return None;
    }
    let record: meshgate_policy::DecisionRecord = serde_json::from_value(v).ok()?;
    Some(Row::from(&record))
}

fn resolve_args() -> Vec<String> {
    WORKLOADS
        .iter()
        .enumerate()
        .flat_map(|(i, w)| ["--resolve".to_string(), format!("{w}={}", ip_of(i))])
        .collect()
}

pub fn run(args: DemoArgs) -> Result<()> {
    require_root_and_cgroup2()?;
    // The names are fixed: the sandbox's lock keeps a second run from tearing down the first one.
    let sandbox = Sandbox::create_with_lock(PREFIX, LOCK)
        .context("`meshgate demo --with-ebpf` cannot start")?;
    if sandbox.cleaned_leftovers() {
        println!("cleaned up what a previous run left behind (netns, cgroups, eBPF pins)");
    }
    let (_temp, dir) = super::state_dir(&args)?;
    std::fs::create_dir_all(dir.join("logs"))?;
    let mut lab = Lab {
        sandbox,
        dir: dir.clone(),
        procs: Vec::new(),
        torn_down: false,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
        let (rows_tx, mut rows) = mpsc::unbounded_channel::<Row>();
        let stop = async {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        };
        tokio::pin!(stop);
        tokio::select! {
            r = scenario(&mut lab, rows_tx, &mut rows) => {
                r?;
            }
            _ = &mut stop => {
                println!("\ninterrupted");
                return Ok::<(), anyhow::Error>(());
            }
        }
        if !args.once {
            println!("\nWatching decisions live; Ctrl-C to stop.");
            print_header();
            loop {
                tokio::select! {
                    _ = &mut stop => break,
                    Some(r) = rows.recv() => print_row(&r),
                }
            }
        }
        Ok(())
    });
    println!("\nstopping… (sidecars and apps, eBPF detach, netns and cgroups)");
    let started = Instant::now();
    let left = lab.teardown();
    if left.is_empty() {
        println!(
            "stopped. removed everything in {} ms.",
            started.elapsed().as_millis()
        );
    } else {
        println!("stopped, but could not remove: {}", left.join(", "));
    }
    result?;
    if !left.is_empty() {
        bail!("cleanup incomplete: {}", left.join(", "));
    }
    Ok(())
}

async fn scenario(
    lab: &mut Lab,
    rows_tx: mpsc::UnboundedSender<Row>,
    rows: &mut mpsc::UnboundedReceiver<Row>,
) -> Result<()> {
    let t0 = Instant::now();
    let dir = lab.dir.clone();
    println!(
        "meshgate demo --with-ebpf — web → orders → payments, each in its own network namespace, \
         the eBPF redirect on each app's cgroup (state in {})",
        dir.display()
    );

    // Network: a bridge in its own namespace, one namespace + veth per workload.
    let net = lab.sandbox.netns("net")?;
    lab.sandbox.bridge(&net, "br0", "10.198.0.1/24")?;
    for (i, w) in WORKLOADS.iter().enumerate() {
        let ns = lab.sandbox.netns(w)?;
        lab.sandbox.veth((&net, w), (&ns, "eth0"))?;
        lab.sandbox.plug(&net, w, "br0")?;
        lab.sandbox.addr(&ns, "eth0", &format!("{}/24", ip_of(i)))?;
    }
    println!("  network       bridge br0 in netns {net}, 10.198.0.0/24");

    // Identities, policies (the samples plus Services whose hosts are the pods' names and IPs).
    issue_identities(&dir)?;
    let policy_dir = dir.join("policies");
    std::fs::create_dir_all(&policy_dir)?;
    for (name, text) in SAMPLE_POLICIES {
        std::fs::write(policy_dir.join(name), text)?;
    }
    std::fs::write(policy_dir.join("services.yaml"), services_yaml())?;

    // Cgroups and the eBPF redirect on each app cgroup (before anything runs in it).
    let attach_started = Instant::now();
    for w in WORKLOADS {
        for leaf in ["app", "sidecar"] {
            lab.sandbox.cgroup(&format!("{w}/{leaf}"))?;
        }
        let mut cfg = meshgate_ebpf::AttachConfig::new(lab.app_cg(w), OUTBOUND_PORT, INBOUND_PORT);
        cfg.sidecar_cgroup = Some(lab.sidecar_cg(w));
        cfg.app_ports = vec![APP_PORT];
        cfg.exempt.extend(meshgate_ebpf::loopback());
        cfg.mesh = vec![
            format!("10.198.0.0/24:{APP_PORT}")
                .parse()
                .map_err(anyhow::Error::msg)?,
        ];
        meshgate_ebpf::attach(&cfg)
            .with_context(|| format!("attaching the eBPF redirect to {w}'s app cgroup"))?;
    }
    let attach_ms = attach_started.elapsed().as_millis();

    // Sidecars and apps, as child processes inside their pods.
    let exe = std::env::current_exe().context("finding this binary")?;
    for (i, w) in WORKLOADS.iter().enumerate() {
        let ids = dir.join("ids").join(w);
        let mut sidecar = Command::new(&exe);
        sidecar
            .args(["--log-format", "json", "proxy", "--app"])
            .arg(format!("127.0.0.1:{APP_PORT}"))
            .arg("--svid-cert")
            .arg(ids.join("svid.pem"))
            .arg("--svid-key")
            .arg(ids.join("key.pem"))
            .arg("--trust-bundle")
            .arg(ids.join("bundle.pem"))
            .arg("--policy-dir")
            .arg(&policy_dir)
            .args(["--inbound", &format!("0.0.0.0:{INBOUND_PORT}")])
            .args(["--outbound", &format!("127.0.0.1:{OUTBOUND_PORT}")])
            .args(["--admin", &format!("127.0.0.1:{ADMIN_PORT}")])
            .args(["--probe", "127.0.0.1:15020", "--drain", "1s"])
            .arg("--ebpf-cgroup")
            .arg(lab.app_cg(w))
            .env(
                "MESHGATE_LOG",
                "warn,meshgate_proxy::decision=info,meshgate_proxy::sidecar=info",
            )
            .env_remove("MESHGATE_LOG_FORMAT");
        let sidecar = lab.in_pod(w, &lab.sidecar_cg(w), sidecar)?;
        lab.spawn(
            &format!("{w}-sidecar"),
            sidecar,
            "sidecar.started",
            Some(rows_tx.clone()),
        )?;
        let mut app = Command::new(&exe);
        app.args(["demo-app", "--name", w, "--listen"])
            .arg(format!("0.0.0.0:{APP_PORT}"))
            .args(["--direct", "--payments-url"])
            .arg(format!("http://payments:{APP_PORT}"))
            .args(resolve_args())
            .env("MESHGATE_LOG", "warn");
        let app = lab.in_pod(w, &lab.app_cg(w), app)?;
        lab.spawn(&format!("{w}-app"), app, "listening on", None)?;
        println!(
            "  {w:<13} netns {:<16} {:<11} app :{APP_PORT} (cgroup {})  sidecar :{INBOUND_PORT} mTLS, :{OUTBOUND_PORT} outbound (cgroup …/sidecar)",
            netns_of(w),
            ip_of(i),
            lab.app_cg(w).display()
        );
    }
    println!(
        "  eBPF          redirect attached to the 3 app cgroups in {attach_ms} ms (pins under {}/{PREFIX}_*)",
        meshgate_ebpf::PIN_ROOT
    );
    let until = Instant::now() + Duration::from_secs(30);
    while !lab.procs.iter().all(|p| p.ready.load(Ordering::SeqCst)) {
        lab.check_alive()?;
        if Instant::now() > until {
            bail!(
                "the sidecars and apps did not start within 30 s{}",
                lab.tails()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("  ready in {:.1} s", t0.elapsed().as_secs_f64());

    println!(
        "\nScripted traffic (each app calls plain http://<service>:{APP_PORT}/…; the kernel steers it into its own sidecar; the judging sidecar decides):"
    );
    print_header();
    for step in SCRIPT {
        let url = format!("http://{}:{APP_PORT}{}", step.to, step.path);
        let mut call = Command::new(&exe);
        call.args(["demo-app", "--name", step.from, "--direct"])
            .args(resolve_args())
            .args(["--method", step.method, "--call", &url])
            .env("MESHGATE_LOG", "warn");
        let call = lab.in_pod(step.from, &lab.app_cg(step.from), call)?;
        let status = match one_shot(call).await {
            Ok(status) => status,
            Err(e) => format!("error: {e}"),
        };
        tokio::time::sleep(Duration::from_millis(150)).await;
        while let Ok(r) = rows.try_recv() {
            print_row(&r);
        }
        println!(
            "{:>20} ↳ {} {} {url} → HTTP {status}   ({})",
            "", step.from, step.method, step.shows
        );
    }
    lab.check_alive()?;

    println!("\neBPF redirect counters (per app cgroup, read from the pinned maps):");
    for w in WORKLOADS {
        let pins = meshgate_ebpf::pin_dir_for(&lab.app_cg(w))?;
        let c = meshgate_ebpf::Counters::read_pinned(&pins)?;
        println!(
            "  {w:<10} redirected {:<3} origdst_hit {:<3} exempt {:<3} denied_egress {:<3} denied_ingress {}",
            c.redirected, c.origdst_hit, c.exempt, c.denied_egress, c.denied_ingress
        );
    }

    let cg_web = lab.app_cg("web");
    println!("\nWhere to look next:");
    println!(
        "  be the app   sh -c 'echo $$ > {}/cgroup.procs && exec nsenter --net=/run/netns/{} curl -s http://{}:{APP_PORT}/orders/7'",
        cg_web.display(),
        netns_of("web"),
        ip_of(1)
    );
    println!(
        "  eBPF         meshgate redirect status --cgroup {}",
        cg_web.display()
    );
    println!(
        "  sidecar      nsenter --net=/run/netns/{} curl -s http://127.0.0.1:{ADMIN_PORT}/metrics   (/config /identity /ready)",
        netns_of("orders")
    );
    println!("  logs         {}", dir.join("logs").display());
    println!(
        "  explain      meshgate policy explain {} --from {} --to {} --method POST --path /orders/42",
        policy_dir.display(),
        id_of("web"),
        id_of("orders")
    );
    Ok(())
}

/// Runs a one-shot `demo-app --call` to completion (10 s at most); returns the status line.
async fn one_shot(mut cmd: Command) -> Result<String> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()?;
    let until = Instant::now() + Duration::from_secs(12);
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() > until {
            let _ = child.kill();
            let _ = child.wait();
            bail!("no answer within 12 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let mut out = String::new();
    let mut err = String::new();
    child
        .stdout
        .take()
        .expect("piped")
        .read_to_string(&mut out)?;
    child
        .stderr
        .take()
        .expect("piped")
        .read_to_string(&mut err)?;
    if !status.success() {
        bail!("{}", err.trim().trim_start_matches("error: "));
    }
    Ok(out.lines().next().unwrap_or("?").to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decision_rows_come_from_json_log_lines() {
        let line = r#"{"timestamp":"x","level":"INFO","event":"authz.decision","layer":"l7","meshgate.workload.id":"spiffe://mesh.local/ns/shop/sa/orders","peer.id":"spiffe://mesh.local/ns/shop/sa/web","port":8080,"http.request.method":"GET","url.path":"/orders/42","decision":"allow","policy":"shop/orders-readers","rule":0,"policy.version":"v","reason":"allowed"}"#;
        let r = row_from_log(line).unwrap();
        assert_eq!(
            (r.who.as_str(), r.decision.as_str(), r.policy.as_str()),
            ("web → orders", "allow", "shop/orders-readers #0")
        );
        let bad = r#"{"event":"authz.decision","layer":"l7","meshgate.workload.id":"spiffe://mesh.local/ns/shop/sa/orders","peer.id":"spiffe://mesh.local/ns/shop/sa/web","port":8080,"http.request.method":"GET","meshgate.path.original":"/orders/..%2fadmin","decision":"bad-request","policy.version":"v","reason":"bad path: encoded '/'"}"#;
        let r = row_from_log(bad).unwrap();
        assert_eq!(
            (r.path.as_str(), r.decision.as_str()),
            ("/orders/..%2fadmin", "bad-request")
        );
        assert!(row_from_log(r#"{"event":"sidecar.started"}"#).is_none());
    }

    #[test]
    fn refusal_names_root_and_cgroup_v2() {
        assert!(requirements_problem(0, true).is_none());
        for (euid, cg2, missing) in [
            (1000, true, "root (this process runs as euid 1000)"),
            (0, false, "a cgroup v2 mount"),
            (
                1000,
                false,
                "root (this process runs as euid 1000) and a cgroup v2 mount",
            ),
        ] {
            let m = requirements_problem(euid, cg2).unwrap();
            assert!(m.contains("needs root and cgroup v2"), "{m}");
            assert!(m.contains(missing), "{m}");
        }
    }

    #[test]
    fn services_name_the_pod_ips() {
        let y = services_yaml();
        assert!(y.contains("hosts: [orders, \"10.198.0.3\"]"), "{y}");
        assert!(y.contains("endpoints: [\"10.198.0.4:15006\"]"), "{y}");
    }
}
