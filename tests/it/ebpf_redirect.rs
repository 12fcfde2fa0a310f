//! Privileged end-to-end test of `meshgate redirect` (eBPF redirect + L3/L4 fallback), with the
//! real `meshgate` binary for `ca issue`, `proxy` and `redirect`.
//!
//! Two "pods" are network namespaces joined by a veth pair (A = 10.199.0.1, B = 10.199.0.2, plus
//! 10.199.0.3 on B's side as a non-mesh "external" server). Each pod has its app in one cgroup v2
//! leaf and its sidecar in another; processes enter their pod with cgroup.procs + setns (not
//! `ip netns exec`, which hides the cgroup2 mount). Proven, in order:
//! 1. A's app calls `http://10.199.0.2:8080/` by plain address: redirected through both sidecars
//!    (B's app sees `x-meshgate-peer` = A's SPIFFE ID; both sidecars' /metrics count it; the eBPF
//!    counters show the redirect and the SO_ORIGINAL_DST answer). B's sidecar serves two app
//!    ports (8080, 8081): the port A's app addressed picks the app, from the `Host` port or,
//!    when the `Host` names none, from the redirected connection's original destination.
//! 2. A process in A outside the app cgroup dialing B's app port directly is dropped by B's
//!    ingress guard, and the drop is counted (B's sidecar port stays reachable: only the app port
//!    is closed).
//! 3. Egress from A's app to a non-mesh address: outside the NetworkPolicy allowlist → EPERM
//!    (counted); inside → works.
//! 4. A new CLI process finds the pinned programs (`status`, `attach` again is a no-op with the
//!    same link ids, traffic still redirected); `detach` restores plain networking.
//!
//! And local acceleration (on by default), in both pods: the local hops (A's app → A's sidecar,
//! B's sidecar → B's app) pass socket to socket (counted), and bodies of up to 4 MiB cross them
//! intact both ways over one kept-alive connection; a connection to B's app from outside the pod's
//! cgroups stays on TCP (counted) and is answered in full; `--no-local-accel` stops it for new
//! connections.
//!
//! Needs root (or CAP_BPF + CAP_NET_ADMIN + CAP_SYS_ADMIN), cgroup v2, `ip`, `curl`, `python3`.
//! Without them it is skipped with a loud message on stderr; `EBPF_TESTS=require` (set by
//! `.ci/run`) turns the skip into a failure.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::support::meshgate;
use crate::support::privileged::{EBPF, have};
use meshgate_ebpf::sandbox::{self, Sandbox};

const A_IP: &str = "10.199.0.1";
const B_IP: &str = "10.199.0.2";
const EXT_IP: &str = "10.199.0.3";
const A_ID: &str = "spiffe://mesh.local/ns/test/sa/a";
const B_ID: &str = "spiffe://mesh.local/ns/test/sa/b";

/// Runs a command with a deadline; kills it when the deadline passes.
pub(crate) fn output_within(cmd: &mut Command, limit: Duration) -> Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let pid = child.id();
    let watchdog = std::thread::spawn(move || {
        let until = Instant::now() + limit;
        while Instant::now() < until {
            std::thread::sleep(Duration::from_millis(50));
            // SAFETY: kill(pid, 0) only probes.
            if unsafe { libc::kill(pid as i32, 0) } != 0 {
                return;
            }
        }
        // SAFETY: pid is our child, not yet reaped (wait_with_output below reaps it).
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    });
    let out = child.wait_with_output().unwrap();
    let _ = watchdog.join();
    out
}

pub(crate) fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Everything the test creates; removed on drop, also when an assertion fails (the sandbox
/// kills what runs in its cgroups, detaches their eBPF programs, deletes namespaces and cgroups).
struct Env {
    dir: tempfile::TempDir,
    children: Vec<(String, Child)>,
    netns: [String; 2],
    sandbox: Sandbox,
}

impl Env {
    fn cg(&self, rel: &str) -> PathBuf {
        self.sandbox.cgroup_root().join(rel)
    }

    /// A command that runs inside `pod`'s network namespace, in cgroup `cg` (relative to the test
    /// root): join the cgroup first, then the netns, then exec.
    fn in_pod(&self, pod: usize, cg: &str, program: &str) -> Command {
        self.in_pod_as(pod, cg, program, None)
    }

    /// [`Env::in_pod`], then (after joining) switch to `uid` (and the same gid).
    fn in_pod_as(&self, pod: usize, cg: &str, program: &str, uid: Option<u32>) -> Command {
        let mut cmd = Command::new(program);
        sandbox::enter(&mut cmd, &self.netns[pod], &self.cg(cg), uid).expect("enter pod");
        cmd
    }

    fn spawn(&mut self, name: &str, mut cmd: Command) {
        let log = File::create(self.dir.path().join(format!("{name}.log"))).unwrap();
        let child = cmd
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        self.children.push((name.to_string(), child));
    }

    fn curl(&self, pod: usize, cg: &str, url: &str) -> Output {
        self.curl_with(pod, cg, url, &[])
    }

    fn curl_with(&self, pod: usize, cg: &str, url: &str, args: &[&str]) -> Output {
        output_within(
            self.in_pod(pod, cg, "curl")
                .args(["-sS", "-m", "5", url])
                .args(args),
            Duration::from_secs(8),
        )
    }

    /// Python one-shot TCP connect (IPv6 socket when `ip` has a `:`); prints `ok`, `timeout`
    /// or the errno name.
    fn connect(&self, pod: usize, cg: &str, ip: &str, port: u16, timeout: f32) -> String {
        self.python_net(pod, cg, &format!(
            "s = socket.socket(socket.AF_INET6 if ':' in '{ip}' else socket.AF_INET)\ns.settimeout({timeout})\ns.connect(('{ip}', {port}))"
        ))
    }

    /// Python one-shot UDP sendto; prints `ok` or the errno name.
    fn udp_send(&self, pod: usize, cg: &str, ip: &str, port: u16) -> String {
        self.python_net(pod, cg, &format!(
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.sendto(b'x', ('{ip}', {port}))"
        ))
    }

    fn python_net(&self, pod: usize, cg: &str, body: &str) -> String {
        let indented = body.replace('\n', "\n    ");
        let script = format!(
            "import socket, errno\ntry:\n    {indented}\n    print('ok')\nexcept socket.timeout:\n    print('timeout')\nexcept OSError as e:\n    print(errno.errorcode.get(e.errno, str(e.errno)))\n"
        );
        let out = output_within(
            self.in_pod(pod, cg, "python3").args(["-c", &script]),
            Duration::from_secs(10),
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn redirect(&self, args: &[&str]) -> Output {
        output_within(
            meshgate().arg("redirect").args(args),
            Duration::from_secs(30),
        )
    }

    fn wait_until(&self, what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
        let until = Instant::now() + limit;
        while Instant::now() < until {
            if ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("timed out waiting for {what}");
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        stop_children(self.dir.path(), &mut self.children, 15);
        if let Err(e) = self.sandbox.cleanup() {
            eprintln!("{e}");
        }
    }
}

/// Kills and reaps `children` (each logging to `<dir>/<name>.log`); when the test is failing,
/// prints the last `lines` lines of each log, so a failure shows what the processes said.
pub(crate) fn stop_children(dir: &Path, children: &mut [(String, Child)], lines: usize) {
    let failing = std::thread::panicking();
    for (name, child) in children {
        let _ = child.kill();
        let _ = child.wait();
        if failing {
            let log = std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(lines).collect();
            eprintln!(
                "--- {name} (last lines)\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }
}

fn ok(o: &Output) -> String {
    assert!(o.status.success(), "{}", text(o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `tag` (one letter) keeps the names of tests running in parallel apart.
fn setup(tag: &str) -> Option<Env> {
    let pre = meshgate_ebpf::preflight();
    if let Some(problem) = pre.problem() {
        EBPF.skip_or_fail(&problem.to_string());
        return None;
    }
    for tool in ["ip", "curl", "python3"] {
        if !have(tool) {
            EBPF.skip_or_fail(&format!(
                "`{tool}` not found (apt-get install iproute2 curl python3)"
            ));
            return None;
        }
    }
    let id = format!("{}{tag}", std::process::id() % 100_000);
    let sandbox = Sandbox::create(&format!("mgt{id}")).expect("sandbox");
    let dir = tempfile::tempdir().unwrap();
    // Readable by the test's non-root (uid 1337) processes.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    for leaf in [
        "pod-a/app",
        "pod-a/sidecar",
        "pod-a/other",
        "pod-b/app",
        "pod-b/sidecar",
        "pod-b/ext",
    ] {
        sandbox.cgroup(leaf).unwrap();
    }
    let na = sandbox.netns("a").unwrap();
    let nb = sandbox.netns("b").unwrap();
    let (va, vb) = (format!("mgt{id}a"), format!("mgt{id}b"));
    sandbox.veth((&na, &va), (&nb, &vb)).unwrap();
    sandbox.addr(&na, &va, &format!("{A_IP}/24")).unwrap();
    sandbox.addr(&nb, &vb, &format!("{B_IP}/24")).unwrap();
    sandbox.addr(&nb, &vb, &format!("{EXT_IP}/24")).unwrap();
    Some(Env {
        dir,
        children: Vec::new(),
        netns: [na, nb],
        sandbox,
    })
}

const APP: &str = r#"
import hashlib, http.server, json, sys
def pattern(n):
    return (bytes(range(251)) * (n // 251 + 1))[:n]
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def reply(self, body, kind):
        head = "HTTP/1.1 200 OK\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n" % (kind, len(body))
        self.wfile.write(head.encode() + body)
    def do_POST(self):
        # Answers what arrived: its length and SHA-256 (the client compares them with what it sent).
        data = self.rfile.read(int(self.headers["content-length"]))
        self.reply(json.dumps({"len": len(data), "sha256": hashlib.sha256(data).hexdigest()}).encode(),
                   "application/json")
    def do_GET(self):
        if self.path.startswith("/big?n="):
            return self.reply(pattern(int(self.path[7:])), "application/octet-stream")
        body = json.dumps({"app": sys.argv[3], "path": self.path, "peer": self.client_address[0],
                           "headers": {k.lower(): v for k, v in self.headers.items()}}).encode()
        # One write for head and body: two small writes meet Nagle + delayed ACK (40 ms) on the
        # sidecar's pooled keep-alive connection.
        head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body)
        self.wfile.write(head.encode() + body)
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), H).serve_forever()
"#;

/// Uploads and downloads of 1 B to 4 MiB over one kept-alive connection, each checked byte for
/// byte (SHA-256 of the upload as the app saw it; the download against the known pattern).
const BODIES: &str = r#"
import hashlib, http.client, json, os, sys
def pattern(n):
    return (bytes(range(251)) * (n // 251 + 1))[:n]
c = http.client.HTTPConnection(sys.argv[1], int(sys.argv[2]), timeout=30)
for size in (1, 65536 + 7, 4 * 1024 * 1024 + 13):
    body = os.urandom(size)
    c.request("POST", "/upload", body=body)
    r = c.getresponse()
    got = json.loads(r.read())
    assert r.status == 200 and got == {"len": size, "sha256": hashlib.sha256(body).hexdigest()}, (size, r.status, got)
    c.request("GET", "/big?n=%d" % size)
    r = c.getresponse()
    data = r.read()
    assert r.status == 200 and data == pattern(size), (size, r.status, len(data))
print("ok")
"#;

const LATENCY: &str = r#"
import http.client, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
headers = {"Host": sys.argv[4]} if len(sys.argv) > 4 else {}
ts = []
for i in range(n + 5):
    t = time.perf_counter()
    c = http.client.HTTPConnection(host, port, timeout=5)
    c.request("GET", "/latency", headers=headers)
    r = c.getresponse(); r.read(); c.close()
    assert r.status == 200, r.status
    if i >= 5:
        ts.append(time.perf_counter() - t)
ts.sort()
print(f"{ts[len(ts) // 2] * 1e3:.3f} {ts[int(len(ts) * 0.9)] * 1e3:.3f}")
"#;

fn policies(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("mesh.yaml"),
        format!(
            r#"apiVersion: meshgate.dev/v1
kind: AuthorizationPolicy
metadata: {{ name: b-from-a, namespace: test }}
spec:
  selector: {{ account: b }}
  action: ALLOW
  rules:
    - from: [{{ principals: ["{A_ID}"] }}]
---
apiVersion: meshgate.dev/v1
kind: Service
metadata: {{ name: b, namespace: test }}
spec:
  identity: {B_ID}
  hosts: ["b", "{B_IP}"]
  ports: [{{ port: 8080 }}, {{ port: 8081 }}]
  endpoints: ["{B_IP}:15006"]
---
apiVersion: meshgate.dev/v1
kind: NetworkPolicy
metadata: {{ name: a-egress, namespace: test }}
spec:
  selector: {{ account: a }}
  egress:
    - to: ["{EXT_IP}/32"]
      ports: [9000]
"#
        ),
    )
    .unwrap();
}

/// `meshgate redirect attach` of a pod's `app` cgroup (its sidecar in `sidecar`, listening on
/// 15001 and 15006), the L3/L4 rules from the NetworkPolicy of `account` in `policies`.
fn attach_args(
    app: &Path,
    sidecar: &Path,
    account: &str,
    ports: &str,
    policies: &Path,
) -> Vec<String> {
    vec![
        "attach".into(),
        "--cgroup".into(),
        app.display().to_string(),
        "--sidecar-cgroup".into(),
        sidecar.display().to_string(),
        "--outbound-port".into(),
        "15001".into(),
        "--inbound-port".into(),
        "15006".into(),
        "--app-ports".into(),
        ports.into(),
        "--network-policy".into(),
        policies.display().to_string(),
        "--identity".into(),
        format!("spiffe://mesh.local/ns/test/sa/{account}"),
    ]
}

fn metric(metrics: &str, name: &str, labels: &[&str]) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|lab| l.contains(lab)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[test]
fn redirect_through_both_sidecars_enforce_l3l4_detach_and_reattach() {
    let _heavy = crate::support::heavy();
    let Some(mut env) = setup("r") else { return };
    let t0 = Instant::now();
    let d = env.dir.path().to_path_buf();

    // Identity: a CA and one SVID per pod, with the real CLI.
    ok(&output_within(
        meshgate().args(["ca", "init", "--dir"]).arg(d.join("ca")),
        Duration::from_secs(30),
    ));
    for (pod, id) in [("a", A_ID), ("b", B_ID)] {
        ok(&output_within(
            meshgate()
                .args(["ca", "issue", "--id", id, "--dir"])
                .arg(d.join("ca"))
                .arg("--out")
                .arg(d.join(pod)),
            Duration::from_secs(30),
        ));
    }
    let pol = d.join("policies");
    policies(&pol);

    // Apps, the external (non-mesh) server, sidecars.
    let app_py = d.join("app.py");
    std::fs::write(&app_py, APP).unwrap();
    for (name, pod, cg, ip, port) in [
        ("app-b", 1, "pod-b/app", "0.0.0.0", "8080"),
        // B's second app port.
        ("app-b2", 1, "pod-b/app", "0.0.0.0", "8081"),
        ("ext", 1, "pod-b/ext", EXT_IP, "9000"),
        ("app-a", 0, "pod-a/app", "0.0.0.0", "8080"),
    ] {
        let mut cmd = env.in_pod(pod, cg, "python3");
        cmd.arg(&app_py).args([ip, port, name]);
        env.spawn(name, cmd);
    }
    for (name, pod, files) in [("sidecar-a", 0, "a"), ("sidecar-b", 1, "b")] {
        let cg = if pod == 0 {
            "pod-a/sidecar"
        } else {
            "pod-b/sidecar"
        };
        let mut cmd = env.in_pod(pod, cg, crate::support::meshgate_bin());
        cmd.args(["proxy", "--app", "127.0.0.1:8080", "--svid-cert"])
            .arg(d.join(files).join("svid.pem"))
            .arg("--svid-key")
            .arg(d.join(files).join("key.pem"))
            .arg("--trust-bundle")
            .arg(d.join(files).join("bundle.pem"))
            .arg("--policy-dir")
            .arg(&pol)
            .args([
                "--inbound",
                "0.0.0.0:15006",
                "--outbound",
                "127.0.0.1:15001",
                "--admin",
                "127.0.0.1:15000",
                "--probe",
                "127.0.0.1:15020",
            ])
            .arg("--ebpf-cgroup")
            .arg(env.cg(if pod == 0 { "pod-a/app" } else { "pod-b/app" }))
            .env("MESHGATE_LOG", "info");
        if pod == 1 {
            cmd.args(["--app", "127.0.0.1:8081"]);
        }
        env.spawn(name, cmd);
    }
    for pod in [0, 1] {
        let other = if pod == 0 { "pod-a/other" } else { "pod-b/ext" };
        env.wait_until("sidecar ready", Duration::from_secs(20), || {
            env.curl(pod, other, "http://127.0.0.1:15000/ready")
                .status
                .success()
        });
        env.wait_until("app up", Duration::from_secs(20), || {
            env.curl(pod, other, "http://127.0.0.1:8080/")
                .status
                .success()
        });
    }
    env.wait_until("second app up", Duration::from_secs(20), || {
        env.curl(1, "pod-b/ext", "http://127.0.0.1:8081/")
            .status
            .success()
    });
    env.wait_until("external server up", Duration::from_secs(20), || {
        env.curl(1, "pod-b/ext", &format!("http://{EXT_IP}:9000/"))
            .status
            .success()
    });

    // Before attach: plain networking, the app is reachable directly without any identity.
    let direct = ok(&env.curl(0, "pod-a/app", &format!("http://{B_IP}:8080/before")));
    assert!(!direct.contains("x-meshgate-peer"), "{direct}");

    // Attach both pods (the CLI exits; the pins keep the programs attached).
    let app_a = env.cg("pod-a/app");
    let app_b = env.cg("pod-b/app");
    let args_a = attach_args(&app_a, &env.cg("pod-a/sidecar"), "a", "8080", &pol);
    let args_b = attach_args(&app_b, &env.cg("pod-b/sidecar"), "b", "8080,8081", &pol);
    let started = Instant::now();
    let out = ok(&env.redirect(&args_a.iter().map(String::as_str).collect::<Vec<_>>()));
    let attach_ms = started.elapsed().as_secs_f64() * 1e3;
    assert!(out.contains("attached to"), "{out}");
    ok(&env.redirect(&args_b.iter().map(String::as_str).collect::<Vec<_>>()));
    let pins_a = meshgate_ebpf::pin_dir_for(&app_a).unwrap();
    let pins_b = meshgate_ebpf::pin_dir_for(&app_b).unwrap();

    // 1. A's app calls B's app by plain address: through both sidecars.
    let body = ok(&env.curl(0, "pod-a/app", &format!("http://{B_IP}:8080/hello")));
    let json: serde_json::Value = serde_json::from_str(&body).expect(&body);
    assert_eq!(json["app"], "app-b", "{body}");
    assert_eq!(json["headers"]["x-meshgate-peer"], A_ID, "{body}");
    assert_eq!(
        json["peer"], "127.0.0.1",
        "B's app is reached only by its sidecar: {body}"
    );
    // B's sidecar serves two app ports: the port A's app addressed picks the app, from the
    // Host port or, when the Host names none, from the redirected connection's original
    // destination (SO_ORIGINAL_DST, answered by the eBPF getsockopt program).
    for (url, host, want) in [
        (format!("http://{B_IP}:8081/second"), None, "app-b2"),
        (
            format!("http://{B_IP}:8081/second"),
            Some("Host: b"),
            "app-b2",
        ),
        (
            format!("http://{B_IP}:8080/first"),
            Some("Host: b"),
            "app-b",
        ),
    ] {
        let args: Vec<&str> = host.iter().flat_map(|h| ["-H", *h]).collect();
        let body = ok(&env.curl_with(0, "pod-a/app", &url, &args));
        let json: serde_json::Value = serde_json::from_str(&body).expect(&body);
        assert_eq!(json["app"], want, "{url} {host:?}: {body}");
        assert_eq!(json["headers"]["x-meshgate-peer"], A_ID, "{body}");
        assert!(
            json["headers"].get("x-meshgate-app-port").is_none(),
            "{body}"
        );
    }
    let metrics_a = ok(&env.curl(0, "pod-a/other", "http://127.0.0.1:15000/metrics"));
    let metrics_b = ok(&env.curl(1, "pod-b/ext", "http://127.0.0.1:15000/metrics"));
    assert!(
        metric(
            &metrics_a,
            "meshgate_requests_total",
            &[r#"direction="outbound""#, r#"decision="forwarded""#]
        ) >= 1,
        "A's sidecar forwarded it:\n{metrics_a}"
    );
    assert!(
        metric(
            &metrics_b,
            "meshgate_requests_total",
            &[r#"direction="inbound""#, r#"decision="allow""#]
        ) >= 1,
        "B's sidecar allowed it:\n{metrics_b}"
    );
    // The sidecar exports the eBPF counters of its app's cgroup on /metrics.
    assert_eq!(
        metric(&metrics_a, "meshgate_ebpf_attached", &[]),
        1,
        "{metrics_a}"
    );
    assert!(
        metric(
            &metrics_a,
            "meshgate_ebpf_verdicts_total",
            &[r#"verdict="redirected""#]
        ) >= 1,
        "{metrics_a}"
    );
    assert!(
        metric(
            &metrics_a,
            "meshgate_ebpf_port_verdicts_total",
            &[r#"verdict="redirected""#, r#"port="8080""#]
        ) >= 1,
        "{metrics_a}"
    );
    let ca = meshgate_ebpf::Counters::read_pinned(&pins_a).unwrap();
    assert!(ca.redirected >= 1 && ca.origdst_hit >= 1, "{ca:?}");

    // Local acceleration: both local hops of both pods passed messages socket to socket, and
    // bodies cross them intact both ways (a lost, duplicated or reordered byte fails the hashes).
    let bodies_py = d.join("bodies.py");
    std::fs::write(&bodies_py, BODIES).unwrap();
    let accel = |pins: &Path| meshgate_ebpf::Counters::read_pinned(pins).unwrap();
    let (a0, b0) = (accel(&pins_a), accel(&pins_b));
    let out = output_within(
        env.in_pod(0, "pod-a/app", "python3")
            .arg(&bodies_py)
            .args([B_IP, "8080"]),
        Duration::from_secs(60),
    );
    assert_eq!(ok(&out).trim(), "ok", "{}", text(&out));
    let (a1, b1) = (accel(&pins_a), accel(&pins_b));
    // A: the app's socket to 15001 and the sidecar's accepted one. B: the sidecar's pooled
    // connection to the app (it may have been opened by an earlier request) — its messages count.
    assert!(a1.accel_sockets >= a0.accel_sockets + 2, "{a0:?}\n{a1:?}");
    for (before, after, pod) in [(&a0, &a1, "A"), (&b0, &b1, "B")] {
        // Six requests one way, six responses the other: at least one message each.
        assert!(
            after.accel_messages >= before.accel_messages + 12,
            "pod {pod}: messages passed socket to socket\n{before:?}\n{after:?}"
        );
        assert_eq!(after.accel_refused, 0, "pod {pod}: {after:?}");
    }
    assert!(
        metric(
            &ok(&env.curl(0, "pod-a/other", "http://127.0.0.1:15000/metrics")),
            "meshgate_ebpf_local_accel_total",
            &[r#"event="messages""#]
        ) >= a1.accel_messages,
        "the sidecar exports the acceleration counters"
    );
    // A connection to B's app from outside the pod's cgroups (only the app's end can be in the
    // sockhash): it stays on TCP, counted, and the answer arrives whole.
    let fb0 = accel(&pins_b).accel_fallback;
    let big = env.curl_with(
        1,
        "pod-b/ext",
        "http://127.0.0.1:8080/big?n=1000000",
        &["-o", "/dev/null", "-w", "%{size_download}"],
    );
    assert_eq!(ok(&big), "1000000", "{}", text(&big));
    assert!(accel(&pins_b).accel_fallback > fb0, "{:?}", accel(&pins_b));
    assert!(
        ca.per_port
            .iter()
            .any(|p| p.port == 8080 && p.verdict == meshgate_ebpf::Verdict::Redirected),
        "{ca:?}"
    );

    // 2. Bypass: a process in pod A outside the app cgroup dials B's app port directly.
    let before = meshgate_ebpf::Counters::read_pinned(&pins_b)
        .unwrap()
        .denied_ingress;
    let bypass = env.connect(0, "pod-a/other", B_IP, 8080, 1.5);
    assert_eq!(
        bypass, "timeout",
        "B's app port must not accept a direct connection"
    );
    let cb = meshgate_ebpf::Counters::read_pinned(&pins_b).unwrap();
    assert!(cb.denied_ingress > before, "the drop is counted: {cb:?}");
    assert!(
        cb.per_port
            .iter()
            .any(|p| p.port == 8080 && p.verdict == meshgate_ebpf::Verdict::DeniedIngress),
        "{cb:?}"
    );
    assert_eq!(
        env.connect(0, "pod-a/other", B_IP, 15006, 3.0),
        "ok",
        "only the app port is closed; B's sidecar is reachable"
    );

    // 3. Egress out of the mesh: allowlisted CIDR:port works, anything else is EPERM.
    assert_eq!(env.connect(0, "pod-a/app", EXT_IP, 9001, 3.0), "EPERM");
    assert_eq!(
        env.connect(0, "pod-a/app", B_IP, 15000, 3.0),
        "ok",
        "mesh IP: redirected"
    );
    assert_eq!(env.udp_send(0, "pod-a/app", EXT_IP, 53), "EPERM", "UDP too");
    // IPv6 is not a bypass: native v6 off the allowlist is EPERM; a v4-mapped destination on a
    // dual-stack socket gets the IPv4 treatment (mesh: redirected; off the allowlist: EPERM).
    assert_eq!(env.connect(0, "pod-a/app", "fd00::99", 80, 3.0), "EPERM");
    assert_eq!(
        env.connect(0, "pod-a/app", "::ffff:10.199.0.3", 9001, 3.0),
        "EPERM"
    );
    assert_eq!(
        env.connect(0, "pod-a/app", "::ffff:10.199.0.2", 8080, 3.0),
        "ok"
    );
    let ext = ok(&env.curl(0, "pod-a/app", &format!("http://{EXT_IP}:9000/allowed")));
    assert!(ext.contains("\"app\": \"ext\""), "{ext}");
    let ca = meshgate_ebpf::Counters::read_pinned(&pins_a).unwrap();
    assert!(ca.denied_egress >= 1 && ca.allowed >= 1, "{ca:?}");
    assert!(
        ca.per_port
            .iter()
            .any(|p| p.port == 9001 && p.verdict == meshgate_ebpf::Verdict::DeniedEgress),
        "{ca:?}"
    );

    // Latency through the redirect (new connection per request, both sidecars, mTLS).
    let lat_py = d.join("latency.py");
    std::fs::write(&lat_py, LATENCY).unwrap();
    let lat = |env: &Env, args: &[&str]| -> String {
        let out = output_within(
            env.in_pod(0, "pod-a/app", "python3")
                .arg(&lat_py)
                .args(args),
            Duration::from_secs(60),
        );
        ok(&out).trim().to_string()
    };
    let meshed = lat(&env, &[B_IP, "8080", "100"]);
    // The same through A's sidecar used as an explicit proxy (loopback: not redirected), to
    // separate the cost of the redirect from the cost of the sidecars.
    let explicit = lat(&env, &["127.0.0.1", "15001", "100", B_IP]);

    // 4a. A new CLI process finds the pins: status prints them; attach again is a no-op.
    let status = ok(&env.redirect(&["status", "--cgroup", &app_a.display().to_string()]));
    assert!(
        status.contains("link connect4         attached"),
        "{status}"
    );
    assert!(status.contains("local accel     on"), "{status}");
    assert!(status.contains("redirected"), "{status}");
    let ids = |s: &str| -> Vec<String> {
        s.lines()
            .filter(|l| l.contains("link id"))
            .map(str::to_string)
            .collect()
    };
    let again = ok(&env.redirect(&args_a.iter().map(String::as_str).collect::<Vec<_>>()));
    assert!(again.contains("already attached"), "{again}");
    let status2 = ok(&env.redirect(&["status", "--cgroup", &app_a.display().to_string()]));
    assert_eq!(
        ids(&status),
        ids(&status2),
        "same links after a second attach"
    );
    // 7 programs; sock_ops on both cgroups (app and sidecar are apart).
    assert_eq!(ids(&status).len(), 8, "{status}");
    let body = ok(&env.curl(0, "pod-a/app", &format!("http://{B_IP}:8080/again")));
    assert!(
        body.contains(A_ID),
        "still redirected after re-attach: {body}"
    );
    // The off switch: attach again with --no-local-accel; new local hops stay on TCP.
    let mut off = args_a.clone();
    off.push("--no-local-accel".into());
    ok(&env.redirect(&off.iter().map(String::as_str).collect::<Vec<_>>()));
    let off_status = ok(&env.redirect(&["status", "--cgroup", &app_a.display().to_string()]));
    assert!(off_status.contains("local accel     off"), "{off_status}");
    let before = meshgate_ebpf::Counters::read_pinned(&pins_a).unwrap();
    let body = ok(&env.curl(0, "pod-a/app", &format!("http://{B_IP}:8080/unaccelerated")));
    assert!(body.contains(A_ID), "{body}");
    let after = meshgate_ebpf::Counters::read_pinned(&pins_a).unwrap();
    assert_eq!(
        (after.accel_sockets, after.redirected),
        (before.accel_sockets, before.redirected + 1),
        "a new connection, redirected but not accelerated"
    );
    let all = ok(&env.redirect(&["status"]));
    assert!(
        all.contains(&app_a.display().to_string()) && all.contains(&app_b.display().to_string()),
        "{all}"
    );

    // Never fail open: with A's sidecar gone, A's app cannot reach B at all (no direct path).
    let (_, sidecar_a) = env
        .children
        .iter_mut()
        .find(|(n, _)| n == "sidecar-a")
        .unwrap();
    sidecar_a.kill().unwrap();
    sidecar_a.wait().unwrap();
    assert_eq!(
        env.connect(0, "pod-a/app", B_IP, 8080, 3.0),
        "ECONNREFUSED",
        "redirected to the dead sidecar's port, not sent around it"
    );

    // 4b. Detach restores plain networking.
    for app in [&app_a, &app_b] {
        let out = ok(&env.redirect(&["detach", "--cgroup", &app.display().to_string()]));
        assert!(out.contains("detached"), "{out}");
    }
    assert!(!pins_a.exists() && !pins_b.exists());
    let direct = ok(&env.curl(0, "pod-a/app", &format!("http://{B_IP}:8080/after")));
    assert!(
        !direct.contains("x-meshgate-peer"),
        "direct again: {direct}"
    );
    assert_eq!(
        env.connect(0, "pod-a/other", B_IP, 8080, 3.0),
        "ok",
        "ingress guard gone"
    );
    assert_eq!(
        env.connect(0, "pod-a/app", EXT_IP, 9001, 3.0),
        "ECONNREFUSED",
        "egress no longer denied: nothing listens there"
    );
    let plain = lat(&env, &[B_IP, "8080", "100"]);
    let detached = env.redirect(&["status", "--cgroup", &app_a.display().to_string()]);
    assert!(!detached.status.success(), "{}", text(&detached));
    assert!(
        String::from_utf8_lossy(&detached.stderr).contains("nothing is attached"),
        "{}",
        text(&detached)
    );

    let _ = writeln!(
        std::io::stderr(),
        "ebpf_redirect figures: attach (CLI process, load+verify+attach 8 programs) {attach_ms:.0} ms; \
         request latency p50/p90 ms: redirected through both sidecars {meshed}, explicit proxy (no redirect) {explicit}, direct {plain}; whole test {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}

/// The eBPF redirect's verdicts reach the control plane as L3/L4 flows: pod A's app (its cgroup
/// attached, egress allowlisted to the external server's port 9000 only) is refused a connect
/// to another port (EPERM) and reaches port 9000 directly; its sidecar, streaming from a real
/// control plane with `--ebpf-cgroup`, reports the growth of its counters, and the control
/// plane counts the refusal in `meshgate_sli_l3l4_denials_total` exactly once (the counters
/// are reported as deltas, not again every interval) and draws both on the console as eBPF
/// edges to the "outside" pseudo-node. Ingress too: a connection around B's sidecar to B's app
/// port is dropped, and B's sidecar reports it as B's `denied_ingress` (outside → B).
#[test]
fn ebpf_verdicts_reach_the_control_plane_as_l3l4_flows() {
    let _heavy = crate::support::heavy();
    let Some(mut env) = setup("f") else { return };
    let d = env.dir.path().to_path_buf();
    const CP_ID: &str = "spiffe://mesh.local/ns/meshgate/sa/control-plane";
    ok(&output_within(
        meshgate().args(["ca", "init", "--dir"]).arg(d.join("ca")),
        Duration::from_secs(30),
    ));
    for (dir, id) in [("a", A_ID), ("b", B_ID), ("cp", CP_ID)] {
        ok(&output_within(
            meshgate()
                .args(["ca", "issue", "--id", id, "--dir"])
                .arg(d.join("ca"))
                .arg("--out")
                .arg(d.join(dir)),
            Duration::from_secs(30),
        ));
    }
    let pol = d.join("policies");
    policies(&pol);
    let app_py = d.join("app.py");
    std::fs::write(&app_py, APP).unwrap();
    // The external server, and B's app (the ingress guard sees packets to its sockets only).
    for (name, cg, ip, port) in [
        ("ext", "pod-b/ext", EXT_IP, "9000"),
        ("app-b", "pod-b/app", "0.0.0.0", "8080"),
    ] {
        let mut cmd = env.in_pod(1, cg, "python3");
        cmd.arg(&app_py).args([ip, port, name]);
        env.spawn(name, cmd);
    }

    // Attached before the sidecars start: their first read of the counters is the baseline.
    let (app_a, app_b) = (env.cg("pod-a/app"), env.cg("pod-b/app"));
    for (app, sidecar, account, ports) in [
        (&app_a, "pod-a/sidecar", "a", "8080"),
        (&app_b, "pod-b/sidecar", "b", "8080,8081"),
    ] {
        ok(&env.redirect(
            &attach_args(app, &env.cg(sidecar), account, ports, &pol)
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        ));
    }

    // The control plane, in pod A's network namespace; B's sidecar reaches it over the veth.
    let mut cp = env.in_pod(0, "pod-a/other", crate::support::meshgate_bin());
    cp.args(["control-plane", "serve", "--policy-dir"])
        .arg(&pol)
        .args(["--listen", "0.0.0.0:15010", "--admin", "127.0.0.1:15011"])
        .arg("--svid-cert")
        .arg(d.join("cp/svid.pem"))
        .arg("--svid-key")
        .arg(d.join("cp/key.pem"))
        .arg("--trust-bundle")
        .arg(d.join("cp/bundle.pem"))
        .env("MESHGATE_LOG", "info");
    env.spawn("control-plane", cp);
    let cp_url = [
        "https://127.0.0.1:15010".to_string(),
        format!("https://{A_IP}:15010"),
    ];
    for (pod, files, app, other) in [
        (0, "a", &app_a, "pod-a/other"),
        (1, "b", &app_b, "pod-b/ext"),
    ] {
        let cg = if pod == 0 {
            "pod-a/sidecar"
        } else {
            "pod-b/sidecar"
        };
        let mut sidecar = env.in_pod(pod, cg, crate::support::meshgate_bin());
        sidecar
            .args(["proxy", "--app", "127.0.0.1:8080", "--svid-cert"])
            .arg(d.join(files).join("svid.pem"))
            .arg("--svid-key")
            .arg(d.join(files).join("key.pem"))
            .arg("--trust-bundle")
            .arg(d.join(files).join("bundle.pem"))
            .args(["--control-plane", &cp_url[pod]])
            .args([
                "--flow-report-interval",
                "200ms",
                "--inbound",
                "0.0.0.0:15006",
                "--outbound",
                "127.0.0.1:15001",
                "--admin",
                "127.0.0.1:15000",
            ])
            .arg("--ebpf-cgroup")
            .arg(app)
            .env("MESHGATE_LOG", "info");
        env.spawn(&format!("sidecar-{files}"), sidecar);
        env.wait_until(
            "sidecar ready (policy from the control plane)",
            Duration::from_secs(20),
            || {
                env.curl(pod, other, "http://127.0.0.1:15000/ready")
                    .status
                    .success()
            },
        );
    }
    env.wait_until(
        "external server and B's app up",
        Duration::from_secs(20),
        || {
            env.curl(1, "pod-b/ext", &format!("http://{EXT_IP}:9000/"))
                .status
                .success()
                && env
                    .curl(1, "pod-b/ext", "http://127.0.0.1:8080/")
                    .status
                    .success()
        },
    );

    // One refused connect, and direct egress to the allowlisted port.
    assert_eq!(env.connect(0, "pod-a/app", EXT_IP, 9001, 3.0), "EPERM");
    let direct = ok(&env.curl(0, "pod-a/app", &format!("http://{EXT_IP}:9000/out")));
    assert!(direct.contains("\"app\": \"ext\""), "{direct}");

    let cp_get =
        |path: &str| ok(&env.curl(0, "pod-a/other", &format!("http://127.0.0.1:15011{path}")));
    let workload = format!("workload=\"{A_ID}\"");
    let denials = |metrics: &str| {
        metric(
            metrics,
            "meshgate_sli_l3l4_denials_total",
            &[
                &workload,
                "direction=\"egress\"",
                "verdict=\"denied_egress\"",
            ],
        )
    };
    let mut metrics = String::new();
    env.wait_until(
        "the refusal in the control plane's meshgate_sli_l3l4_denials_total",
        Duration::from_secs(10),
        || {
            metrics = cp_get("/metrics");
            denials(&metrics) >= 1
        },
    );
    // The console's graph: the workload, the outside pseudo-node, and one eBPF edge between
    // them carrying both verdicts by port.
    let mut edge = serde_json::Value::Null;
    env.wait_until(
        "the eBPF edge on the console",
        Duration::from_secs(10),
        || {
            let state: serde_json::Value =
                serde_json::from_str(&cp_get("/v1/console/state")).unwrap();
            let outside = state["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|n| n["kind"] == "outside")
                .cloned();
            let found = state["edges"]
                .as_array()
                .unwrap()
                .iter()
                .find(|e| e["caller"] == A_ID && e["layer"] == "ebpf")
                .cloned();
            match (outside, found) {
                (Some(node), Some(e)) if e["callee"] == node["id"] => {
                    let rows = e["l3l4"].as_array().unwrap();
                    let has = |port: u64, verdict: &str| {
                        rows.iter()
                            .any(|r| r["port"] == port && r["verdict"] == verdict)
                    };
                    let both = has(9001, "denied_egress") && has(9000, "allowed");
                    edge = e;
                    both
                }
                _ => false,
            }
        },
    );
    assert_eq!(edge["class"], "denied", "{edge}");
    let rows = edge["l3l4"].as_array().unwrap();
    let count = |port: u64| -> u64 {
        rows.iter()
            .filter(|r| r["port"] == port)
            .map(|r| r["count"].as_u64().unwrap())
            .sum()
    };
    assert_eq!(count(9001), 1, "one connect, one refusal: {edge}");
    assert!(count(9000) >= 1, "{edge}");
    assert!(rows.iter().all(|r| r["direction"] == "egress"), "{edge}");
    // A second refusal, on another port: counted once more, and the first is not counted again
    // by the reports that followed it (deltas of the counters, not their values).
    assert_eq!(env.connect(0, "pod-a/app", EXT_IP, 9002, 3.0), "EPERM");
    env.wait_until("the second refusal", Duration::from_secs(10), || {
        metrics = cp_get("/metrics");
        denials(&metrics) >= 2
    });
    assert_eq!(denials(&metrics), 2, "{metrics}");
    // The sidecar's own counters agree: the kernel saw exactly those two.
    let c =
        meshgate_ebpf::Counters::read_pinned(&meshgate_ebpf::pin_dir_for(&app_a).unwrap()).unwrap();
    assert_eq!(c.denied_egress, 2, "{c:?}");

    // Ingress: a process in pod A outside the app cgroup dials B's app port around B's
    // sidecar; B's ingress guard drops it, and B's sidecar reports the drop for B.
    assert_eq!(env.connect(0, "pod-a/other", B_IP, 8080, 1.5), "timeout");
    let b_drops = format!("workload=\"{B_ID}\"");
    env.wait_until(
        "B's dropped packets in meshgate_sli_l3l4_denials_total",
        Duration::from_secs(10),
        || {
            metrics = cp_get("/metrics");
            metric(
                &metrics,
                "meshgate_sli_l3l4_denials_total",
                &[
                    &b_drops,
                    "direction=\"ingress\"",
                    "verdict=\"denied_ingress\"",
                ],
            ) >= 1
        },
    );
    env.wait_until(
        "the outside → B eBPF edge on the console",
        Duration::from_secs(10),
        || {
            let state: serde_json::Value =
                serde_json::from_str(&cp_get("/v1/console/state")).unwrap();
            state["edges"].as_array().unwrap().iter().any(|e| {
                e["callee"] == B_ID
                    && e["layer"] == "ebpf"
                    && e["class"] == "denied"
                    && e["l3l4"].as_array().unwrap().iter().any(|r| {
                        r["port"] == 8080
                            && r["verdict"] == "denied_ingress"
                            && r["direction"] == "ingress"
                    })
            })
        },
    );
    assert_eq!(
        denials(&metrics),
        2,
        "A's refusals are A's alone: {metrics}"
    );
    for app in [&app_a, &app_b] {
        ok(&env.redirect(&["detach", "--cgroup", &app.display().to_string()]));
    }
}

/// `redirect attach --pod --sidecar-uid 1337`: the Kubernetes layout, where app and sidecar share
/// the pod cgroup and the sidecar is told apart by its uid. The attach runs from a child cgroup of
/// the pod (like an init container); one cgroup then holds an app process (uid 0) and a
/// "sidecar" process (uid 1337): the app's connect to a mesh address is redirected to
/// 127.0.0.1:15001, the uid-1337 process reaches the address directly and is not egress-enforced.
#[test]
fn pod_cgroup_with_sidecar_exempt_by_uid() {
    let _heavy = crate::support::heavy();
    let Some(mut env) = setup("u") else { return };
    const UID: u32 = 1337;
    env.sandbox.cgroup("pod-a/shared/init").unwrap();
    let app_py = env.dir.path().join("app.py");
    std::fs::write(&app_py, APP).unwrap();
    // B's app (the real destination) and, in pod A, a stand-in for the sidecar's outbound
    // listener: whoever answers tells where the connection went.
    let mut b = env.in_pod(1, "pod-b/app", "python3");
    b.arg(&app_py).args(["0.0.0.0", "8080", "app-b"]);
    env.spawn("app-b", b);
    let mut fake = env.in_pod(0, "pod-a/other", "python3");
    fake.arg(&app_py)
        .args(["127.0.0.1", "15001", "sidecar-outbound"]);
    env.spawn("sidecar-outbound", fake);
    // The "sidecar's" inbound port, served by a uid-1337 process in the pod cgroup itself.
    let mut inbound = env.in_pod_as(0, "pod-a/shared", "python3", Some(UID));
    inbound
        .arg(&app_py)
        .args(["0.0.0.0", "15006", "sidecar-inbound"]);
    env.spawn("sidecar-inbound", inbound);
    env.wait_until("servers up", Duration::from_secs(20), || {
        env.curl(0, "pod-a/other", "http://127.0.0.1:15001/")
            .status
            .success()
            && env
                .curl(0, "pod-a/other", "http://127.0.0.1:15006/")
                .status
                .success()
            && env
                .curl(1, "pod-b/ext", "http://127.0.0.1:8080/")
                .status
                .success()
    });

    // Attach from inside the pod, as an init container would: --pod = parent of its own cgroup.
    let pod = env.cg("pod-a/shared");
    let out = ok(&output_within(
        env.in_pod(0, "pod-a/shared/init", crate::support::meshgate_bin())
            .args([
                "redirect",
                "attach",
                "--pod",
                "--sidecar-uid",
                &UID.to_string(),
            ])
            .args(["--mesh", &format!("{B_IP}/32:8080"), "--app-ports", "8080"]),
        Duration::from_secs(30),
    ));
    assert!(
        out.contains(&format!("attached to {}", pod.display())),
        "{out}"
    );
    let _ = std::fs::remove_dir(env.cg("pod-a/shared/init"));
    let status = ok(&env.redirect(&["status", "--cgroup", &pod.display().to_string()]));
    assert!(status.contains("sidecar uid     1337"), "{status}");
    assert!(
        status.contains(&format!("sidecar cgroup  {}", pod.display())),
        "getsockopt goes on the same pod cgroup: {status}"
    );
    // One cgroup: sock_ops once, on it (a second link would run it twice per socket).
    assert_eq!(status.matches("attached (link id").count(), 7, "{status}");
    assert!(
        status.contains("link sock_ops_sidecar not needed"),
        "{status}"
    );

    let url = format!("http://{B_IP}:8080/which");
    let app = ok(&output_within(
        env.in_pod(0, "pod-a/shared", "curl")
            .args(["-sS", "-m", "5", &url]),
        Duration::from_secs(8),
    ));
    assert!(
        app.contains("\"app\": \"sidecar-outbound\""),
        "app redirected: {app}"
    );
    let sidecar = ok(&output_within(
        env.in_pod_as(0, "pod-a/shared", "curl", Some(UID))
            .args(["-sS", "-m", "5", &url]),
        Duration::from_secs(8),
    ));
    assert!(
        sidecar.contains("\"app\": \"app-b\""),
        "uid {UID} goes direct: {sidecar}"
    );
    // Egress enforcement: the app is refused a non-mesh address, the sidecar uid is not.
    let connect = |uid: Option<u32>| {
        let script = format!(
            "import socket, errno\ns = socket.socket()\ns.settimeout(3)\ntry:\n    s.connect(('{EXT_IP}', 9001))\n    print('ok')\nexcept OSError as e:\n    print(errno.errorcode.get(e.errno, str(e.errno)))\n"
        );
        let out = output_within(
            env.in_pod_as(0, "pod-a/shared", "python3", uid)
                .args(["-c", &script]),
            Duration::from_secs(10),
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(connect(None), "EPERM");
    // The ingress guard closes only --app-ports: the sidecar's port in the same cgroup is open.
    let from_b = ok(&env.curl(1, "pod-b/ext", &format!("http://{A_IP}:15006/in")));
    assert!(from_b.contains("\"app\": \"sidecar-inbound\""), "{from_b}");
    assert_eq!(
        connect(Some(UID)),
        "ECONNREFUSED",
        "not enforced for the sidecar uid"
    );

    let c =
        meshgate_ebpf::Counters::read_pinned(&meshgate_ebpf::pin_dir_for(&pod).unwrap()).unwrap();
    assert!(
        c.redirected >= 1 && c.sidecar >= 2 && c.denied_egress >= 1,
        "{c:?}"
    );
    // Local acceleration, when only one end is in the pod's cgroups (the stand-in for the
    // outbound listener runs outside it): the app's end went into the sockhash, its first
    // message found no peer there, and the connection stayed on TCP (answered in full above).
    assert!(
        c.accel_sockets >= 1 && c.accel_fallback >= 1 && c.accel_messages == 0,
        "{c:?}"
    );

    // The same cgroup for app and sidecar without --sidecar-uid is refused (the sidecar's
    // connects would be redirected to itself).
    let same = env.redirect(&[
        "attach",
        "--cgroup",
        &pod.display().to_string(),
        "--sidecar-cgroup",
        &pod.display().to_string(),
    ]);
    assert!(!same.status.success(), "{}", text(&same));
    assert!(
        String::from_utf8_lossy(&same.stderr).contains("--sidecar-uid"),
        "{}",
        text(&same)
    );
    ok(&env.redirect(&["detach", "--cgroup", &pod.display().to_string()]));
}
