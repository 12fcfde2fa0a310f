//! Pod emulation: two pod specs injected by `meshgate inject` are *executed* the way the kubelet
//! would run them, as root, without a cluster.
//!
//! - The node is a network namespace with a bridge (10.244.1.1/24, the gateway of the pod range)
//!   and kube-proxy's part played by iptables in it: the Service `orders` has the ClusterIP
//!   10.96.0.20 (DNAT of its app port and of the mesh port meshgate inject added to it), the
//!   cluster DNS 10.96.0.10:53 is DNATed to a UDP echo server on the node. The CA and the control
//!   plane run on the node, reached by the names inject wrote (`meshgate-ca.meshgate.svc`, ...).
//! - Each pod is one network namespace plugged into the bridge (web 10.244.1.10, orders
//!   10.244.1.11), with one cgroup v2 leaf per container below the pod's cgroup.
//! - Each container is a process in its own leaf and mount namespace, running the container's
//!   exact command and args (image `meshgate:*` → the `meshgate` binary, the image's entrypoint),
//!   its env and its uid (securityContext.runAsUser), with its volumeMounts bind-mounted (the
//!   bootstrap directory holds the pod's token and the CA bundle, as the projected volume would)
//!   and the pod's /etc/hosts (what CoreDNS would answer). Init containers run first, in order:
//!   the redirect to completion, the native sidecar until its startupProbe passes; then the app.
//!
//! Proven: the app of pod web calls orders by its Service name and is served through both
//! sidecars, orders' app seeing web's SPIFFE ID; a method the policy does not allow is denied;
//! every probe of the injected orders pod (httpGet, tcpSocket and grpc rewritten to the sidecar's
//! probe port, the sidecar's own) passes from the node; a direct connection from the node to
//! orders' app port is dropped; DNS-style UDP to the cluster resolver works while UDP elsewhere
//! gets EPERM (egress enforced with `--egress-allow`).

use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::ebpf_redirect::{output_within, stop_children, text};
use crate::support::k8s::{Issuer, Signer, projected_claims};
use crate::support::meshgate;
use crate::support::privileged::{EBPF, have};
use meshgate_ebpf::sandbox::{self, Sandbox};

const NODE_IP: &str = "10.244.1.1";
const WEB_IP: &str = "10.244.1.10";
const ORDERS_IP: &str = "10.244.1.11";
const ORDERS_CLUSTER_IP: &str = "10.96.0.20";
const DNS_IP: &str = "10.96.0.10";
const WEB_ID: &str = "spiffe://mesh.local/ns/shop/sa/web";

/// What the user applies: two Deployments and a Service, like any app's manifests.
const MANIFESTS: &str = r#"# A two-tier app: web calls orders through its Service.
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      serviceAccountName: web
      containers:
        - name: web
          image: meshgate:local
          args: [demo-app, --name, web, --listen, "0.0.0.0:8080", --direct]
          ports: [{name: http, containerPort: 8080}]
          securityContext: {runAsUser: 1000}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: orders, namespace: shop}
spec:
  selector: {matchLabels: {app: orders}}
  template:
    metadata: {labels: {app: orders}}
    spec:
      serviceAccountName: orders
      containers:
        - name: orders
          image: meshgate:local
          args: [demo-app, --name, orders, --listen, "0.0.0.0:8080", --direct]
          env: [{name: MESHGATE_LOG, value: info}]
          ports: [{name: http, containerPort: 8080}]
          securityContext: {runAsUser: 1000}
          livenessProbe:
            httpGet: {path: /healthz, port: http}
          readinessProbe:
            tcpSocket: {port: 8080}
          startupProbe:
            grpc: {port: 8080}
---
apiVersion: v1
kind: Service
metadata: {name: orders, namespace: shop}
spec:
  clusterIP: 10.96.0.20
  selector: {app: orders}
  ports:
    - name: http # the app port
      port: 8080
      targetPort: http
"#;

const POLICY: &str = r#"apiVersion: meshgate.dev/v1
kind: AuthorizationPolicy
metadata: {name: orders-readers, namespace: shop}
spec:
  selector: {account: orders}
  action: ALLOW
  rules:
    - from: [{principals: ["spiffe://mesh.local/ns/shop/sa/web"]}]
      to: [{methods: [GET]}]
"#;

fn ok(o: &Output) -> String {
    assert!(o.status.success(), "{}", text(o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

struct Cluster {
    dir: tempfile::TempDir,
    children: Vec<(String, Child)>,
    node: String,
    sandbox: Sandbox,
}

/// One pod of the injected manifests, as the kubelet sees it.
struct Pod {
    name: &'static str,
    netns: String,
    spec: Value,
    /// The pod's volumes on the node: volume name → directory.
    volumes: Vec<(String, PathBuf)>,
    hosts: PathBuf,
}

impl Cluster {
    fn spawn(&mut self, name: &str, mut cmd: Command) {
        let log = File::create(self.dir.path().join(format!("{name}.log"))).unwrap();
        let child = cmd
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        self.children.push((name.to_string(), child));
    }

    /// A command on the node (the root of the emulated cluster's network), in cgroup `cg`.
    fn on_node(&self, cg: &str, program: &str) -> Command {
        let mut cmd = Command::new(program);
        let cgroup = self.sandbox.cgroup(cg).unwrap();
        sandbox::enter(&mut cmd, &self.node, &cgroup, None).expect("enter node");
        cmd
    }

    /// The container `c` of `pod` as the kubelet would start it: its cgroup leaf, the pod's
    /// network namespace, a mount namespace with its volumes and the pod's /etc/hosts, its uid,
    /// env, command and args.
    fn container(&self, pod: &Pod, c: &Value) -> Command {
        let cname = c["name"].as_str().unwrap();
        let cgroup = self
            .sandbox
            .cgroup(&format!("{}/{cname}", pod.name))
            .unwrap();
        let mut script = format!("set -e\nmount --bind {} /etc/hosts\n", pod.hosts.display());
        for m in c["volumeMounts"].as_array().into_iter().flatten() {
            let vol = m["name"].as_str().unwrap();
            let target = m["mountPath"].as_str().unwrap();
            let Some((_, src)) = pod.volumes.iter().find(|(n, _)| n == vol) else {
                panic!("{}: volume {vol} is not emulated", pod.name)
            };
            script.push_str(&format!(
                "mkdir -p {target}\nmount --rbind {} {target}\n",
                src.display()
            ));
        }
        let uid = c["securityContext"]["runAsUser"]
            .as_u64()
            .or(pod.spec["securityContext"]["runAsUser"].as_u64())
            .unwrap_or(0);
        script.push_str(&format!(
            "exec setpriv --reuid={uid} --regid={uid} --clear-groups -- \"$@\"\n"
        ));
        let image = c["image"].as_str().unwrap();
        assert!(image.starts_with("meshgate:"), "{cname}: image {image}");
        let mut argv: Vec<String> = match c["command"].as_array() {
            Some(cmd) => cmd.iter().map(|v| v.as_str().unwrap().to_owned()).collect(),
            None => vec![crate::support::meshgate_bin().to_owned()],
        };
        argv.extend(
            c["args"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|v| v.as_str().unwrap().to_owned()),
        );
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg(script)
            .arg("sh")
            .args(argv);
        for e in c["env"].as_array().into_iter().flatten() {
            if let Some(v) = e["value"].as_str() {
                cmd.env(e["name"].as_str().unwrap(), v);
            }
        }
        sandbox::enter(&mut cmd, &pod.netns, &cgroup, None).expect("enter pod");
        cmd
    }

    /// A process run in `pod`'s container `cname` (like `kubectl exec`), as `uid`.
    fn exec(&self, pod: &Pod, cname: &str, uid: u32, program: &str, args: &[&str]) -> Output {
        let cgroup = self
            .sandbox
            .cgroup(&format!("{}/{cname}", pod.name))
            .unwrap();
        let mut cmd = Command::new(program);
        cmd.args(args);
        sandbox::enter(&mut cmd, &pod.netns, &cgroup, Some(uid)).expect("enter pod");
        output_within(&mut cmd, Duration::from_secs(15))
    }

    /// An HTTP GET from the node, like the kubelet's httpGet probe: the status code.
    fn probe_get(&self, ip: &str, port: u64, path: &str) -> u16 {
        let out = output_within(
            self.on_node("node/kubelet", "curl").args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-m",
                "3",
                &format!("http://{ip}:{port}{path}"),
            ]),
            Duration::from_secs(6),
        );
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0)
    }

    fn wait_until(&self, what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
        let until = Instant::now() + limit;
        while Instant::now() < until {
            if ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("timed out waiting for {what}");
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        stop_children(self.dir.path(), &mut self.children, 20);
        if let Err(e) = self.sandbox.cleanup() {
            eprintln!("{e}");
        }
    }
}

/// The fake ServiceAccount issuer (`support::k8s::Issuer`) served inside the node's network
/// namespace, where the CA runs: a thread of its own enters the namespace and runs the server on a
/// runtime of its own (a socket belongs to the namespace of the thread that created it).
struct NodeIssuer {
    url: String,
    ca_pem: PathBuf,
    api_token: PathBuf,
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NodeIssuer {
    fn start(node: &str, keys: Vec<Value>) -> Self {
        use std::os::fd::AsRawFd;
        let ns = File::open(format!("/run/netns/{node}")).expect("node netns");
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            // SAFETY: setns with an open namespace fd changes only this thread's namespace.
            assert_eq!(
                unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) },
                0
            );
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let issuer = rt.block_on(Issuer::start(keys));
            ready_tx
                .send((
                    issuer.url.clone(),
                    issuer.ca_pem.clone(),
                    issuer.api_token.clone(),
                ))
                .unwrap();
            // Serve until the test drops this (or ends).
            rt.block_on(async {
                let _ = tokio::task::spawn_blocking(move || stop_rx.recv()).await;
            });
            drop(issuer);
        });
        let (url, ca_pem, api_token) = ready_rx.recv().expect("issuer started");
        NodeIssuer {
            url,
            ca_pem,
            api_token,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }
}

impl Drop for NodeIssuer {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run_ip(netns: &str, args: &[&str]) {
    let mut all = vec!["-n", netns];
    all.extend(args);
    sandbox::ip(&all).unwrap();
}

fn iptables(c: &Cluster, args: &str) {
    let out = output_within(
        c.on_node("node/setup", "iptables")
            .args(args.split_whitespace()),
        Duration::from_secs(10),
    );
    ok(&out);
}

fn setup() -> Option<Cluster> {
    let pre = meshgate_ebpf::preflight();
    if let Some(problem) = pre.problem() {
        EBPF.skip_or_fail(&problem.to_string());
        return None;
    }
    for tool in [
        "ip", "iptables", "curl", "python3", "unshare", "setpriv", "mount",
    ] {
        if !have(tool) {
            EBPF.skip_or_fail(&format!(
                "`{tool}` not found (apt-get install iproute2 iptables curl python3 util-linux mount)"
            ));
            return None;
        }
    }
    let id = std::process::id() % 100_000;
    let sandbox = Sandbox::create(&format!("mgk{id}")).expect("sandbox");
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let node = sandbox.netns("node").unwrap();
    let bridge = format!("mgk{id}br");
    sandbox
        .bridge(&node, &bridge, &format!("{NODE_IP}/24"))
        .unwrap();
    Some(Cluster {
        dir,
        children: Vec::new(),
        node,
        sandbox,
    })
}

/// The pod template of the Deployment `name` in the injected stream.
fn template(docs: &[Value], name: &str) -> Value {
    docs.iter()
        .find(|d| d["kind"] == "Deployment" && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no Deployment {name}"))["spec"]["template"]["spec"]
        .clone()
}

#[test]
fn injected_pods_run_as_the_kubelet_would() {
    let _heavy = crate::support::heavy();
    let Some(mut c) = setup() else { return };
    let d = c.dir.path().to_path_buf();
    let id = std::process::id() % 100_000;

    // The network: pods on the node's bridge, kube-proxy's DNAT for the Service and DNS.
    let mut pods = Vec::new();
    for (name, ip, tag) in [("web", WEB_IP, "w"), ("orders", ORDERS_IP, "o")] {
        let netns = c.sandbox.netns(name).unwrap();
        let (inside, outside) = (format!("mgk{id}{tag}"), format!("mgk{id}{tag}n"));
        c.sandbox
            .veth((&netns, &inside), (&c.node, &outside))
            .unwrap();
        c.sandbox
            .plug(&c.node, &outside, &format!("mgk{id}br"))
            .unwrap();
        c.sandbox
            .addr(&netns, &inside, &format!("{ip}/24"))
            .unwrap();
        run_ip(&netns, &["route", "add", "default", "via", NODE_IP]);
        pods.push((name, netns, ip));
    }
    ok(&output_within(
        c.on_node("node/setup", "sysctl")
            .args(["-w", "net.ipv4.ip_forward=1"]),
        Duration::from_secs(5),
    ));
    for port in [8080, 15006] {
        iptables(
            &c,
            &format!(
                "-t nat -A PREROUTING -d {ORDERS_CLUSTER_IP} -p tcp --dport {port} -j DNAT --to-destination {ORDERS_IP}:{port}"
            ),
        );
    }
    iptables(
        &c,
        &format!(
            "-t nat -A PREROUTING -d {DNS_IP} -p udp --dport 53 -j DNAT --to-destination {NODE_IP}:5353"
        ),
    );
    // Service traffic leaves the node on the bridge it came from: masquerade it so replies come
    // back through the node's conntrack (kube-proxy's hairpin rule).
    iptables(
        &c,
        &format!("-t nat -A POSTROUTING -o mgk{id}br -m conntrack --ctstate DNAT -j MASQUERADE"),
    );

    // Inject, as a user would.
    let input = d.join("app.yaml");
    std::fs::write(&input, MANIFESTS).unwrap();
    ok(&output_within(
        meshgate().args(["ca", "init", "--dir"]).arg(d.join("ca")),
        Duration::from_secs(30),
    ));
    let policies = d.join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::write(policies.join("orders.yaml"), POLICY).unwrap();
    let injected = output_within(
        meshgate()
            .args(["inject", "--egress-allow", "192.0.2.0/24", "--ca-bundle"])
            .arg(d.join("ca/bundle.pem"))
            .arg("--services-out")
            .arg(policies.join("mesh-services.yaml"))
            .arg(&input),
        Duration::from_secs(30),
    );
    let injected_text = ok(&injected);
    let docs: Vec<Value> = serde_saphyr::from_multiple::<Value>(&injected_text)
        .unwrap()
        .into_iter()
        .filter(|v| !v.is_null())
        .collect();

    // The cluster's ServiceAccount issuer (OIDC discovery + JWKS over HTTPS) on the node; every
    // workload proves itself with a projected token it signs, as kubelet would mount it.
    let signer = Signer::rsa("cluster-key-1");
    let issuer = NodeIssuer::start(&c.node, vec![signer.jwk()]);
    let token = |namespace: &str, account: &str| -> String {
        signer.sign(&projected_claims(&issuer.url, namespace, account, 600))
    };

    // The node runs the CA and the control plane where the pods' names point.
    let mut ca = c.on_node("node/ca", crate::support::meshgate_bin());
    ca.args(["ca", "serve", "--dir"])
        .arg(d.join("ca"))
        .args([
            "--listen",
            &format!("{NODE_IP}:15012"),
            "--san",
            "meshgate-ca.meshgate.svc",
            "--san",
            NODE_IP,
            "--k8s-issuer",
            &issuer.url,
            "--k8s-api-ca",
        ])
        .arg(&issuer.ca_pem)
        .arg("--k8s-api-token-file")
        .arg(&issuer.api_token);
    c.spawn("ca", ca);
    let cp_token = token("meshgate", "control-plane");
    let mut cp = c.on_node("node/control-plane", crate::support::meshgate_bin());
    cp.args(["control-plane", "serve", "--policy-dir"])
        .arg(&policies)
        .args([
            "--listen",
            &format!("{NODE_IP}:15010"),
            "--admin",
            "127.0.0.1:15011",
            "--ca",
            &format!("https://{NODE_IP}:15012"),
            "--ca-bundle",
        ])
        .arg(d.join("ca/bundle.pem"))
        .env("MESHGATE_TOKEN", cp_token);
    c.spawn("control-plane", cp);
    let mut dns = c.on_node("node/dns", "python3");
    dns.args([
        "-c",
        &format!("import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.bind(('{NODE_IP}', 5353))\nwhile True:\n    data, peer = s.recvfrom(512)\n    s.sendto(b'answer:' + data, peer)\n"),
    ]);
    c.spawn("dns", dns);

    // Each pod: its volumes and /etc/hosts, then its containers in the kubelet's order.
    let bundle = std::fs::read_to_string(d.join("ca/bundle.pem")).unwrap();
    let mut running = Vec::new();
    for (name, netns, ip) in pods {
        let spec = template(&docs, name);
        let root = d.join(format!("pod-{name}"));
        let bootstrap = root.join("bootstrap");
        std::fs::create_dir_all(&bootstrap).unwrap();
        std::fs::write(bootstrap.join("token"), token("shop", name)).unwrap();
        std::fs::write(bootstrap.join("ca-bundle.pem"), &bundle).unwrap();
        for p in [&root, &bootstrap] {
            std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(0o755))
                .unwrap();
        }
        let hosts = root.join("hosts");
        std::fs::write(
            &hosts,
            format!("127.0.0.1 localhost\n{ip} {name}\n{NODE_IP} meshgate-ca.meshgate.svc meshgate-control-plane.meshgate.svc\n{ORDERS_CLUSTER_IP} orders orders.shop orders.shop.svc orders.shop.svc.cluster.local\n"),
        )
        .unwrap();
        let mut volumes = vec![("meshgate-bootstrap".to_owned(), bootstrap)];
        for v in spec["volumes"].as_array().into_iter().flatten() {
            if let Some(host) = v["hostPath"]["path"].as_str() {
                volumes.push((v["name"].as_str().unwrap().to_owned(), PathBuf::from(host)));
            }
        }
        let pod = Pod {
            name,
            netns,
            spec,
            volumes,
            hosts,
        };
        for init in pod.spec["initContainers"].as_array().unwrap().clone() {
            let cname = init["name"].as_str().unwrap().to_owned();
            let cmd = c.container(&pod, &init);
            if init["restartPolicy"] == "Always" {
                c.spawn(&format!("{name}-{cname}"), cmd);
                let startup = &init["startupProbe"]["httpGet"];
                let (port, path) = (
                    startup["port"].as_u64().unwrap(),
                    startup["path"].as_str().unwrap().to_owned(),
                );
                c.wait_until(
                    &format!("{name}/{cname} startupProbe"),
                    Duration::from_secs(30),
                    || c.probe_get(ip, port, &path) == 200,
                );
            } else {
                let mut cmd = cmd;
                ok(&output_within(&mut cmd, Duration::from_secs(30)));
            }
        }
        for app in pod.spec["containers"].as_array().unwrap().clone() {
            let cname = app["name"].as_str().unwrap().to_owned();
            let cmd = c.container(&pod, &app);
            c.spawn(&format!("{name}-{cname}"), cmd);
        }
        running.push(pod);
    }
    let (web, orders) = (&running[0], &running[1]);

    // Every probe of the injected orders pod passes from the node, as the kubelet runs them.
    let mut probed = Vec::new();
    for container in orders.spec["containers"]
        .as_array()
        .unwrap()
        .iter()
        .chain(orders.spec["initContainers"].as_array().unwrap())
    {
        for kind in ["startupProbe", "readinessProbe", "livenessProbe"] {
            let probe = &container[kind];
            if probe.is_null() {
                continue;
            }
            let http = &probe["httpGet"];
            assert!(
                !http.is_null(),
                "{kind} of {} was not rewritten to httpGet: {probe}",
                container["name"]
            );
            let (port, path) = (
                http["port"].as_u64().unwrap(),
                http["path"].as_str().unwrap().to_owned(),
            );
            c.wait_until(&format!("{kind} {path}"), Duration::from_secs(20), || {
                c.probe_get(ORDERS_IP, port, &path) == 200
            });
            probed.push(path);
        }
    }
    for want in [
        "/meshgate/probe/http/8080/healthz",
        "/meshgate/probe/tcp/8080",
        "/meshgate/probe/grpc/8080",
        "/meshgate/ready",
    ] {
        assert!(
            probed.iter().any(|p| p == want),
            "{want} not probed: {probed:?}"
        );
    }
    // A path the probes do not name is not reachable through the probe port.
    assert_eq!(
        c.probe_get(ORDERS_IP, 15020, "/meshgate/probe/http/8080/admin"),
        404
    );

    // web's app calls orders by its Service name (the ClusterIP), through both sidecars.
    let url = "http://orders.shop.svc.cluster.local:8080/orders/7";
    let resolve = format!("orders.shop.svc.cluster.local:8080:{ORDERS_CLUSTER_IP}");
    c.wait_until(
        "web → orders through the mesh",
        Duration::from_secs(30),
        || {
            let out = c.exec(
                web,
                "web",
                1000,
                "curl",
                &["-sS", "-m", "5", "--resolve", &resolve, url],
            );
            String::from_utf8_lossy(&out.stdout).contains(WEB_ID)
        },
    );
    let body = ok(&c.exec(
        web,
        "web",
        1000,
        "curl",
        &["-sS", "-m", "5", "--resolve", &resolve, url],
    ));
    let seen: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(seen["service"], "orders", "{body}");
    assert_eq!(seen["caller"], WEB_ID, "{body}");
    assert_eq!(seen["path"], "/orders/7", "{body}");
    // POST is not allowed by the policy: the callee's sidecar denies it.
    let denied = ok(&c.exec(
        web,
        "web",
        1000,
        "curl",
        &[
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-m",
            "5",
            "-X",
            "POST",
            "--resolve",
            &resolve,
            url,
        ],
    ));
    assert_eq!(denied.trim(), "403");

    // A direct connection from the node to orders' app port is dropped by the ingress guard;
    // the sidecar's mesh port answers.
    let connect = |port: u16| {
        let out = output_within(
            c.on_node("node/kubelet", "python3").args([
                "-c",
                &format!("import socket\ns = socket.socket()\ns.settimeout(2)\ntry:\n    s.connect(('{ORDERS_IP}', {port}))\n    print('ok')\nexcept socket.timeout:\n    print('timeout')\nexcept OSError as e:\n    print(e.errno)\n"),
            ]),
            Duration::from_secs(6),
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert_eq!(connect(8080), "timeout", "orders' app port must be guarded");
    assert_eq!(connect(15006), "ok");

    // DNS-style UDP from web's app to the cluster resolver works (exempt), UDP elsewhere in the
    // cluster's ranges gets EPERM (egress is enforced: --egress-allow).
    let udp = |port: u16| {
        let script = format!(
            "import socket, errno\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.settimeout(3)\ntry:\n    s.sendto(b'q', ('{DNS_IP}', {port}))\n    print(s.recvfrom(64)[0].decode())\nexcept socket.timeout:\n    print('timeout')\nexcept OSError as e:\n    print(errno.errorcode.get(e.errno, e.errno))\n"
        );
        let out = c.exec(web, "web", 1000, "python3", &["-c", &script]);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert_eq!(udp(53), "answer:q");
    assert_eq!(udp(5300), "EPERM");
}
