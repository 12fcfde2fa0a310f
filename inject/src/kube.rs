//! Kubernetes: injects every pod-template kind (Pod, Deployment, StatefulSet, DaemonSet,
//! ReplicaSet, ReplicationController, Job, CronJob) and meshes the Services that select them.
//!
//! Per pod:
//! - an init container `meshgate-redirect` that attaches the eBPF redirect to the pod's cgroup:
//!   connections to the cluster's pod and service ranges go through the sidecar, DNS (port 53)
//!   and the API server stay direct, every meshed containerPort is guarded so only the local
//!   sidecar reaches it;
//! - the sidecar `meshgate-proxy` as a native sidecar (an init container with
//!   `restartPolicy: Always`: it starts before the app and does not keep Jobs from completing),
//!   serving every containerPort of every container (HTTP ports per request, opaque ports as L4
//!   tunnels) unless an annotation excludes it;
//! - a projected volume with a ServiceAccount token for the CA (audience `meshgate-ca`) and the CA
//!   bundle, so no per-workload Secret is needed;
//! - kubelet probes of every kind (httpGet, tcpSocket, grpc) on a guarded port rewritten to the
//!   sidecar's plaintext probe port, which checks exactly those ports and paths and nothing else.
//!
//! A Kubernetes Service that selects injected pods gets the mesh port (15006) so callers'
//! sidecars reach the callee's sidecar through the Service's ClusterIP, and a meshgate `Service`
//! document (identity, hosts, ports, endpoint) is produced for the policy directory. Whatever
//! injection cannot make work is reported as a warning on stderr.

use std::collections::{BTreeMap, BTreeSet};

use crate::yaml::Node;
use crate::{InjectError, Settings, VERSION};

/// Sidecar ports (docs/operations.md, "Sidecars") and the probe listener.
pub const INBOUND_PORT: u16 = 15006;
const OUTBOUND_PORT: u16 = 15001;
const ADMIN_PORT: u16 = 15000;
const PROBE_PORT: u16 = 15020;
/// The sidecar's uid: the redirect exempts its sockets so its own traffic is not looped back.
const PROXY_UID: u32 = 1337;
/// Where the projected token and `ca-bundle.pem` are mounted (sidecars and the control plane).
pub const BOOTSTRAP_DIR: &str = "/var/run/meshgate/bootstrap";
const PROXY_NAME: &str = "meshgate-proxy";
const REDIRECT_NAME: &str = "meshgate-redirect";
const DEFAULT_CA_URL: &str = "https://meshgate-ca.meshgate.svc:15012";
const DEFAULT_CP_URL: &str = "https://meshgate-control-plane.meshgate.svc:15010";
/// The audience of the projected ServiceAccount token the CA accepts (`ca serve --k8s-audience`).
pub const TOKEN_AUDIENCE: &str = "meshgate-ca";
/// Lifetime of projected tokens: Kubernetes' minimum; the kubelet refreshes the file at 80 % of it.
pub const TOKEN_EXPIRATION_SECONDS: u32 = 600;
/// The Service port name the mesh port gets in a meshed Kubernetes Service.
const MESH_PORT_NAME: &str = "meshgate-mesh";
/// The ConfigMap holding the CA bundle, in every namespace with injected pods.
pub const CA_BUNDLE_CONFIGMAP: &str = "meshgate-ca-bundle";
/// Ports whose protocols are server-speaks-first or not HTTP, meshed as opaque L4 tunnels
/// unless `meshgate.io/opaque-ports` says otherwise (the same list Linkerd uses: SMTP, MySQL,
/// Galera, PostgreSQL, Redis, Elasticsearch transport, memcached).
pub const DEFAULT_OPAQUE_PORTS: [u16; 8] = [25, 587, 3306, 4444, 5432, 6379, 9300, 11211];

/// Per-pod annotations.
const ANN_INJECT: &str = "meshgate.io/inject";
const ANN_SKIP_INBOUND: &str = "meshgate.io/skip-inbound-ports";
const ANN_INBOUND_PORTS: &str = "meshgate.io/inbound-ports";
const ANN_APP_PORT: &str = "meshgate.io/app-port";
const ANN_OPAQUE: &str = "meshgate.io/opaque-ports";
const ANN_FROM_OUTSIDE: &str = "meshgate.io/inbound-from-outside";
const ANN_SKIP_OUTBOUND_PORTS: &str = "meshgate.io/skip-outbound-ports";
const ANN_SKIP_OUTBOUND_CIDRS: &str = "meshgate.io/skip-outbound-cidrs";

/// What injecting a Kubernetes stream found beyond the changed documents.
#[derive(Debug, Default)]
pub struct KubeReport {
    /// meshgate `Service` documents for the Kubernetes Services that select injected pods.
    pub mesh_services: Vec<Node>,
    /// Namespaces with injected pods (their pods mount the ConfigMap `meshgate-ca-bundle`).
    pub namespaces: BTreeSet<String>,
    /// ConfigMaps named `meshgate-ca-bundle` already in the input, by namespace.
    pub bundles_present: BTreeSet<String>,
    /// What injection cannot make work, one line each.
    pub warnings: Vec<String>,
}

/// A pod (template) that was injected, or had been before: what Services need to know.
#[derive(Debug)]
struct Meshed {
    namespace: String,
    labels: BTreeMap<String, String>,
    identity: String,
    object: String,
    /// Named containerPorts (for a Service's named targetPort).
    named: BTreeMap<String, u16>,
    /// Ports served by the sidecar: port → opaque.
    served: BTreeMap<u16, bool>,
}

/// Injects a whole Kubernetes stream: returns which documents changed and what else was found.
pub fn inject_stream(
    docs: &mut [Node],
    s: &Settings,
) -> Result<(Vec<bool>, KubeReport), InjectError> {
    let mut report = KubeReport::default();
    let mut meshed = Vec::new();
    let mut changed = Vec::with_capacity(docs.len());
    for doc in docs.iter_mut() {
        if doc.is_null() {
            changed.push(false);
            continue;
        }
        changed.push(visit(doc, &mut |obj| {
            inject_object(obj, s, &mut meshed, &mut report)
        })?);
    }
    for (doc, changed) in docs.iter_mut().zip(changed.iter_mut()) {
        if doc.is_null() {
            continue;
        }
        *changed |= visit(doc, &mut |obj| mesh_service(obj, s, &meshed, &mut report))?;
    }
    report.namespaces = meshed.iter().map(|m| m.namespace.clone()).collect();
    Ok((changed, report))
}

/// Calls `f` on `obj`, or on each item of a `kind: List`; whether anything changed.
fn visit(
    obj: &mut Node,
    f: &mut impl FnMut(&mut Node) -> Result<bool, InjectError>,
) -> Result<bool, InjectError> {
    if obj.get("kind").and_then(Node::as_str) == Some("List") {
        let mut changed = false;
        if let Some(items) = obj.get_mut("items").and_then(Node::seq_mut) {
            for item in items {
                changed |= visit(item, f)?;
            }
        }
        return Ok(changed);
    }
    f(obj)
}

fn str_at<'a>(obj: &'a Node, path: &[&str]) -> Option<&'a str> {
    obj.path(path).and_then(Node::as_str)
}

fn string_map(node: Option<&Node>) -> BTreeMap<String, String> {
    node.map(Node::entries)
        .unwrap_or_default()
        .iter()
        .filter_map(|(k, v)| Some((k.text.clone(), v.as_str()?.to_owned())))
        .collect()
}

/// Injects one object. Kinds that carry no pods (Service, ConfigMap, ...) pass through unchanged.
fn inject_object(
    obj: &mut Node,
    s: &Settings,
    meshed: &mut Vec<Meshed>,
    report: &mut KubeReport,
) -> Result<bool, InjectError> {
    let kind = obj
        .get("kind")
        .and_then(Node::as_str)
        .unwrap_or_default()
        .to_owned();
    let name = str_at(obj, &["metadata", "name"])
        .unwrap_or("<unnamed>")
        .to_owned();
    let object = format!("{kind}/{name}");
    let namespace = str_at(obj, &["metadata", "namespace"])
        .unwrap_or("default")
        .to_owned();
    if kind == "ConfigMap" && name == CA_BUNDLE_CONFIGMAP {
        report.bundles_present.insert(namespace);
        return Ok(false);
    }
    let outer = obj.path(&["metadata", "annotations"]).cloned();
    let template_path: &[&str] = match kind.as_str() {
        "Pod" => &[],
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "ReplicationController"
        | "Job" => &["spec", "template"],
        "CronJob" => &["spec", "jobTemplate", "spec", "template"],
        _ => return Ok(false),
    };
    if annotation(outer.as_ref(), ANN_INJECT) == Some("disabled") {
        return Ok(false);
    }
    let mut pod = &mut *obj;
    for key in template_path {
        pod = match pod.get_mut(key) {
            Some(next) => next,
            None => {
                return Err(InjectError::refused(
                    object,
                    format!("has no {}", template_path.join(".")),
                    format!("give it a pod template ({})", template_path.join(".")),
                ));
            }
        };
    }
    let ctx = PodContext {
        object: &object,
        namespace: &namespace,
        outer: outer.as_ref(),
    };
    inject_pod(&ctx, pod, s, meshed, report)
}

fn annotation<'a>(annotations: Option<&'a Node>, key: &str) -> Option<&'a str> {
    annotations?.get(key)?.as_str()
}

struct PodContext<'a> {
    object: &'a str,
    namespace: &'a str,
    outer: Option<&'a Node>,
}

/// A comma-separated port list from an annotation (`"all"`/`"true"` handled by the caller).
fn port_list(object: &str, key: &str, value: &str) -> Result<BTreeSet<u16>, InjectError> {
    value
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.parse::<u16>().ok().filter(|&n| n != 0).ok_or_else(|| {
                InjectError::refused(
                    object,
                    format!("annotation {key} has {p:?}, which is not a port number"),
                    format!("write {key} as comma-separated port numbers, e.g. \"8080,9090\""),
                )
            })
        })
        .collect()
}

/// One TCP containerPort of an app container.
struct ContainerPort {
    port: u16,
    container: String,
}

/// The pod's TCP containerPorts and named ports; UDP and SCTP ports are reported (not meshed).
fn container_ports(
    object: &str,
    spec: &Node,
    report: &mut KubeReport,
) -> (Vec<ContainerPort>, BTreeMap<String, u16>) {
    let mut ports: Vec<ContainerPort> = Vec::new();
    let mut named = BTreeMap::new();
    for c in spec.get("containers").map(Node::items).unwrap_or_default() {
        let cname = c.get("name").and_then(Node::as_str).unwrap_or_default();
        for p in c.get("ports").map(Node::items).unwrap_or_default() {
            let Some(port) = p
                .get("containerPort")
                .and_then(Node::as_str)
                .and_then(|n| n.parse::<u16>().ok())
            else {
                continue;
            };
            let protocol = p.get("protocol").and_then(Node::as_str).unwrap_or("TCP");
            if protocol != "TCP" {
                report.warnings.push(format!(
                    "{object}: container {cname} port {port}/{protocol} is not meshed (the sidecar carries TCP only) and not guarded: anything that can reach the pod can send to it"
                ));
                continue;
            }
            if let Some(name) = p.get("name").and_then(Node::as_str) {
                named.insert(name.to_owned(), port);
            }
            if !ports.iter().any(|cp| cp.port == port) {
                ports.push(ContainerPort {
                    port,
                    container: cname.to_owned(),
                });
            }
        }
    }
    (ports, named)
}

/// What the sidecar and the redirect do for one pod's ports.
#[derive(Debug, Default)]
struct PortPlan {
    /// Served per HTTP request (`--app`).
    http: Vec<u16>,
    /// Served as opaque L4 tunnels (`--inbound-tcp-port`).
    tcp: Vec<u16>,
    /// Reachable only from the local sidecar (`--app-ports` of the redirect).
    guarded: Vec<u16>,
}

/// Injects a pod (or pod template: a map with `metadata` and `spec`).
fn inject_pod(
    ctx: &PodContext<'_>,
    pod: &mut Node,
    s: &Settings,
    meshed: &mut Vec<Meshed>,
    report: &mut KubeReport,
) -> Result<bool, InjectError> {
    let object = ctx.object;
    // The pod template's own annotations win over the workload's.
    let mut anns = string_map(ctx.outer);
    anns.extend(string_map(pod.path(&["metadata", "annotations"])));
    let lookup = |key: &str| anns.get(key).map(String::as_str);
    if lookup(ANN_INJECT) == Some("disabled") {
        return Ok(false);
    }
    let Some(spec) = pod.get("spec") else {
        return Err(InjectError::refused(
            object,
            "has no pod spec",
            "add the pod spec",
        ));
    };
    if spec.get("hostNetwork").is_some_and(Node::is_true) {
        report.warnings.push(format!(
            "{object}: not injected: it uses hostNetwork: true, so a sidecar would capture the node's traffic, not the pod's (opt out explicitly with the annotation {ANN_INJECT}: disabled to silence this)"
        ));
        return Ok(false);
    }
    let containers = spec.get("containers").map(Node::items).unwrap_or_default();
    if containers.is_empty() {
        return Err(InjectError::refused(
            object,
            "has no containers",
            "add the app container",
        ));
    }
    let account = spec
        .get("serviceAccountName")
        .or_else(|| spec.get("serviceAccount"))
        .and_then(Node::as_str)
        .unwrap_or("default")
        .to_owned();
    let identity = s.spiffe_id(object, ctx.namespace, &account)?;
    let labels = string_map(pod.path(&["metadata", "labels"]));

    let (declared, named) = container_ports(object, spec, report);
    let skip = match lookup(ANN_SKIP_INBOUND) {
        Some(v) => port_list(object, ANN_SKIP_INBOUND, v)?,
        None => BTreeSet::new(),
    };
    let mut ports: BTreeSet<u16> = declared.iter().map(|p| p.port).collect();
    for key in [ANN_INBOUND_PORTS, ANN_APP_PORT] {
        if let Some(v) = lookup(key) {
            ports.extend(port_list(object, key, v)?);
        }
    }
    ports.retain(|p| !skip.contains(p));
    let opaque = match lookup(ANN_OPAQUE) {
        Some(v) => port_list(object, ANN_OPAQUE, v)?,
        None => DEFAULT_OPAQUE_PORTS.into_iter().collect(),
    };
    let outside: BTreeSet<u16> = match lookup(ANN_FROM_OUTSIDE) {
        Some("true" | "all") => ports.clone(),
        Some("false") | None => BTreeSet::new(),
        Some(v) => port_list(object, ANN_FROM_OUTSIDE, v)?,
    };
    let reserved = [INBOUND_PORT, OUTBOUND_PORT, ADMIN_PORT, PROBE_PORT];
    if let Some(clash) = ports.iter().find(|p| reserved.contains(p)) {
        return Err(InjectError::refused(
            object,
            format!("its port {clash} is one the sidecar listens on (15000, 15001, 15006, 15020)"),
            format!(
                "move the app off port {clash}, or exclude it with the annotation {ANN_SKIP_INBOUND}: \"{clash}\""
            ),
        ));
    }
    let mut plan = PortPlan::default();
    for &p in &ports {
        if opaque.contains(&p) {
            plan.tcp.push(p);
        } else {
            plan.http.push(p);
        }
        if !outside.contains(&p) {
            plan.guarded.push(p);
        }
    }

    let already = spec.get("initContainers").is_some_and(|ic| {
        ic.items()
            .iter()
            .any(|c| c.get("name").and_then(Node::as_str) == Some(PROXY_NAME))
    });
    meshed.push(Meshed {
        namespace: ctx.namespace.to_owned(),
        labels,
        identity: identity.clone(),
        object: object.to_owned(),
        named,
        served: ports.iter().map(|&p| (p, opaque.contains(&p))).collect(),
    });
    if already {
        return Ok(false);
    }
    // Our container names must be free, or the pod would be invalid (or half injected before).
    let taken = ["initContainers", "containers"]
        .iter()
        .flat_map(|k| spec.get(k).map(Node::items).unwrap_or_default())
        .filter_map(|c| c.get("name").and_then(Node::as_str))
        .find(|n| [PROXY_NAME, REDIRECT_NAME].contains(n));
    if let Some(taken) = taken {
        return Err(InjectError::refused(
            object,
            format!("already has a container named {taken} but no {PROXY_NAME} init container"),
            format!("remove or rename {taken}, then inject again"),
        ));
    }
    if ports.is_empty() {
        report.warnings.push(format!(
            "{object}: no containerPort to mesh: injected as outbound-only (its calls go through the sidecar; nothing can call it through the mesh). If it listens, declare the containerPort or add the annotation {ANN_INBOUND_PORTS}: \"<port>\""
        ));
    }
    for p in &outside {
        if ports.contains(p) {
            report.warnings.push(format!(
                "{object}: port {p} is {ANN_FROM_OUTSIDE}: plaintext connections from outside the pod reach the app without mTLS or policy (meant for an ingress controller's traffic)"
            ));
        }
    }
    if let Some(c) = declared.iter().find(|c| !ports.contains(&c.port)) {
        report.warnings.push(format!(
            "{object}: container {} port {} is excluded by {ANN_SKIP_INBOUND}: it is neither meshed nor guarded",
            c.container, c.port
        ));
    }

    let outbound = outbound_rules(object, &anns, s)?;
    let threads =
        crate::worker_threads(object, "annotation", lookup(crate::WORKER_THREADS_KEY), s)?;
    let spec = pod.get_mut("spec").expect("checked above");
    let probes = rewrite_probes(object, spec, &plan.guarded, report);

    let init = spec.seq_entry("initContainers");
    if let Some(items) = init.seq_mut() {
        items.splice(
            0..0,
            [
                redirect_container(s, &plan, &outbound),
                proxy_container(s, &plan, &probes, threads),
            ],
        );
    }
    let volumes = spec.seq_entry("volumes");
    if let Some(items) = volumes.seq_mut() {
        for v in pod_volumes() {
            let name = v.get("name").and_then(Node::as_str);
            // A volume the user defined under our name wins: that is how to point at another
            // token source (e.g. a join-token Secret) or bundle.
            if !items
                .iter()
                .any(|i| i.get("name").and_then(Node::as_str) == name)
            {
                items.push(v);
            }
        }
    }

    let annotations = pod.map_entry("metadata").map_entry("annotations");
    annotations.set("meshgate.io/injected", Node::str(VERSION));
    annotations.set("meshgate.io/identity", Node::str(identity));
    if !ports.is_empty() {
        let list: Vec<String> = ports.iter().map(u16::to_string).collect();
        annotations.set("meshgate.io/meshed-ports", Node::str(list.join(",")));
    }
    if !probes.originals.is_empty() {
        let json = serde_json::to_string(&probes.originals).expect("maps of JSON values serialize");
        annotations.set("meshgate.io/original-probes", Node::str(json));
    }
    Ok(true)
}

/// The redirect's outbound rules for one pod: mesh destinations and exemptions.
struct OutboundRules {
    mesh: Vec<String>,
    exempt: Vec<String>,
}

fn outbound_rules(
    object: &str,
    anns: &BTreeMap<String, String>,
    s: &Settings,
) -> Result<OutboundRules, InjectError> {
    let lookup = |key: &str| anns.get(key).map(String::as_str);
    let k = &s.kube;
    let mesh: Vec<String> = k
        .pod_cidrs
        .iter()
        .chain(&k.service_cidrs)
        .cloned()
        .collect();
    let mut exempt = Vec::new();
    // DNS to the cluster resolver (a ClusterIP in the service range, answered by pods in the pod
    // range) stays direct for TCP too; UDP is never redirected.
    for cidr in &mesh {
        exempt.push(format!("{cidr}:53"));
    }
    // The API server (the `kubernetes` Service, the first address of the service range): apps
    // that watch the cluster (operators, Prometheus) talk TLS to it, which the mesh cannot carry.
    for cidr in &k.service_cidrs {
        if let Some(first) = first_host(cidr) {
            exempt.push(format!("{first}/32:443"));
        }
    }
    if let Some(v) = lookup(ANN_SKIP_OUTBOUND_PORTS) {
        for p in port_list(object, ANN_SKIP_OUTBOUND_PORTS, v)? {
            exempt.push(format!("0.0.0.0/0:{p}"));
        }
    }
    if let Some(v) = lookup(ANN_SKIP_OUTBOUND_CIDRS) {
        for c in v.split(',').map(str::trim).filter(|c| !c.is_empty()) {
            if c.parse::<ipnet::IpNet>().is_err() {
                return Err(InjectError::refused(
                    object,
                    format!("annotation {ANN_SKIP_OUTBOUND_CIDRS} has {c:?}, which is not a CIDR"),
                    format!(
                        "write {ANN_SKIP_OUTBOUND_CIDRS} as comma-separated CIDRs, e.g. \"10.0.5.0/24\""
                    ),
                ));
            }
            exempt.push(c.to_owned());
        }
    }
    Ok(OutboundRules { mesh, exempt })
}

/// The first host address of an IPv4 CIDR (`10.96.0.0/12` → `10.96.0.1`).
fn first_host(cidr: &str) -> Option<std::net::Ipv4Addr> {
    match cidr.parse::<ipnet::IpNet>().ok()? {
        ipnet::IpNet::V4(net) => Some(std::net::Ipv4Addr::from(
            u32::from(net.network()).checked_add(1)?,
        )),
        ipnet::IpNet::V6(_) => None,
    }
}

/// Probes that inject rewrote, and what the sidecar must allow for them.
#[derive(Debug, Default)]
struct Probes {
    /// `--probe-path PORT:PATH` values.
    http: Vec<String>,
    /// `--probe-tcp PORT` values.
    tcp: BTreeSet<u16>,
    /// `--probe-grpc PORT` values.
    grpc: BTreeSet<u16>,
    /// container → probe kind → the original handler (JSON), for `meshgate.io/original-probes`.
    originals: BTreeMap<String, BTreeMap<String, serde_json::Value>>,
}

/// A probe handler as JSON for the annotation.
fn to_json(node: &Node) -> serde_json::Value {
    match node {
        Node::Scalar(s) => s
            .text
            .parse::<i64>()
            .map(serde_json::Value::from)
            .unwrap_or_else(|_| serde_json::Value::from(s.text.clone())),
        Node::Seq(items) | Node::Flow(items) => items.iter().map(to_json).collect(),
        Node::Map(entries) => entries
            .iter()
            .map(|(k, v)| (k.text.clone(), to_json(v)))
            .collect::<serde_json::Map<_, _>>()
            .into(),
    }
}

/// Points the app containers' probes on guarded ports at the sidecar's probe port. A guarded
/// port only accepts connections from the local sidecar, so the kubelet (connecting from the
/// node) would be dropped: the sidecar's probe listener checks exactly these ports and paths for
/// it — httpGet forwarded to the app, tcpSocket as a TCP connect, grpc as a gRPC health check.
/// exec probes, probes with a `host`, and probes on unguarded ports are left alone; HTTPS
/// probes on guarded ports cannot pass and are reported.
fn rewrite_probes(
    object: &str,
    spec: &mut Node,
    guarded: &[u16],
    report: &mut KubeReport,
) -> Probes {
    let mut out = Probes::default();
    let Some(containers) = spec.get_mut("containers").and_then(Node::seq_mut) else {
        return out;
    };
    for c in containers {
        let cname = c
            .get("name")
            .and_then(Node::as_str)
            .unwrap_or_default()
            .to_owned();
        // Named ports resolve against this container's ports.
        let named: Vec<(String, u16)> = c
            .get("ports")
            .map(Node::items)
            .unwrap_or_default()
            .iter()
            .filter_map(|p| {
                let name = p.get("name")?.as_str()?.to_owned();
                Some((name, p.get("containerPort")?.as_str()?.parse().ok()?))
            })
            .collect();
        let resolve = |target: &str| {
            target
                .parse::<u16>()
                .ok()
                .or_else(|| named.iter().find(|(n, _)| n == target).map(|(_, p)| *p))
        };
        for kind in ["livenessProbe", "readinessProbe", "startupProbe"] {
            let Some(probe) = c.get_mut(kind) else {
                continue;
            };
            let handler = ["httpGet", "tcpSocket", "grpc"]
                .into_iter()
                .find(|h| probe.get(h).is_some());
            let Some(handler) = handler else {
                continue; // exec, or nothing
            };
            let node = probe.get(handler).expect("found above").clone();
            // The sidecar's own check gets the kubelet's timeout (its default is the kubelet's
            // default, 1 s).
            let timeout = probe
                .get("timeoutSeconds")
                .and_then(Node::as_str)
                .and_then(|t| t.parse::<u64>().ok())
                .filter(|t| (2..=60).contains(t))
                .map(|t| format!("timeout={t}"));
            let target = node.get("port").and_then(Node::as_str).unwrap_or_default();
            let Some(port) = resolve(target).filter(|p| guarded.contains(p)) else {
                continue;
            };
            if node.get("host").is_some() {
                report.warnings.push(format!(
                    "{object}: container {cname} {kind} sets a host, so it bypasses the pod and is left alone; port {port} is guarded and only answers the local sidecar"
                ));
                continue;
            }
            let path = match handler {
                "httpGet" => {
                    let https = node
                        .get("scheme")
                        .and_then(Node::as_str)
                        .is_some_and(|v| v.eq_ignore_ascii_case("https"));
                    if https {
                        report.warnings.push(format!(
                            "{object}: container {cname} {kind} is HTTPS on port {port}: the app terminates TLS itself there, so mesh it as opaque ({ANN_OPAQUE}) or let the kubelet in with {ANN_FROM_OUTSIDE}: \"{port}\"; as it is the probe will fail"
                        ));
                        continue;
                    }
                    let app_path = node.get("path").and_then(Node::as_str).unwrap_or("/");
                    let app_path = if app_path.starts_with('/') {
                        app_path.to_owned()
                    } else {
                        format!("/{app_path}")
                    };
                    let allowed = format!("{port}:{app_path}");
                    if !out.http.contains(&allowed) {
                        out.http.push(allowed);
                    }
                    format!("/meshgate/probe/http/{port}{app_path}")
                }
                "tcpSocket" => {
                    out.tcp.insert(port);
                    with_query(format!("/meshgate/probe/tcp/{port}"), &[timeout.as_deref()])
                }
                _ => {
                    out.grpc.insert(port);
                    let service = node
                        .get("service")
                        .and_then(Node::as_str)
                        .filter(|s| !s.is_empty())
                        .map(|s| format!("service={s}"));
                    with_query(
                        format!("/meshgate/probe/grpc/{port}"),
                        &[service.as_deref(), timeout.as_deref()],
                    )
                }
            };
            let mut http = Node::map([("path", Node::str(path)), ("port", Node::int(PROBE_PORT))]);
            if handler == "httpGet"
                && let Some(headers) = node.get("httpHeaders")
            {
                http.set("httpHeaders", headers.clone());
            }
            probe.replace_entry(handler, "httpGet", http);
            out.originals.entry(cname.clone()).or_default().insert(
                kind.to_owned(),
                serde_json::json!({ handler: to_json(&node) }),
            );
        }
    }
    out
}

/// `path` with the given query parameters (`None`s skipped).
fn with_query(path: String, params: &[Option<&str>]) -> String {
    let params: Vec<&str> = params.iter().flatten().copied().collect();
    if params.is_empty() {
        path
    } else {
        format!("{path}?{}", params.join("&"))
    }
}

/// The init container that attaches the eBPF redirect to the pod's cgroup and exits.
fn redirect_container(s: &Settings, plan: &PortPlan, rules: &OutboundRules) -> Node {
    let mut args: Vec<String> = ["redirect", "attach", "--pod", "--sidecar-uid"]
        .map(str::to_owned)
        .to_vec();
    args.push(PROXY_UID.to_string());
    if !plan.guarded.is_empty() {
        let list: Vec<String> = plan.guarded.iter().map(u16::to_string).collect();
        args.extend(["--app-ports".to_owned(), list.join(",")]);
    }
    for m in &rules.mesh {
        args.extend(["--mesh".to_owned(), m.clone()]);
    }
    for e in &rules.exempt {
        args.extend(["--exempt".to_owned(), e.clone()]);
    }
    if s.kube.egress_allow.is_empty() {
        // Outside the cluster's ranges, connections go direct (Istio's ALLOW_ANY); set
        // --egress-allow to enforce an allowlist instead.
        args.push("--no-egress-enforce".to_owned());
    } else {
        for a in &s.kube.egress_allow {
            args.extend(["--egress-allow".to_owned(), a.clone()]);
        }
    }
    Node::map([
        ("name", Node::str(REDIRECT_NAME)),
        ("image", Node::str(&s.image)),
        ("args", Node::str_seq(args)),
        (
            // Loading BPF programs and attaching them to a cgroup; runtimes that know the finer
            // BPF and PERFMON capabilities could use those instead of SYS_ADMIN.
            "securityContext",
            Node::map([
                ("runAsUser", Node::int(0)),
                ("runAsNonRoot", Node::bool(false)),
                (
                    "capabilities",
                    Node::map([("add", Node::str_seq(["NET_ADMIN", "SYS_ADMIN"]))]),
                ),
            ]),
        ),
        (
            "resources",
            Node::map([(
                "requests",
                Node::map([("cpu", Node::str("10m")), ("memory", Node::str("16Mi"))]),
            )]),
        ),
        (
            "volumeMounts",
            Node::Seq(vec![
                Node::map([
                    ("name", Node::str("meshgate-cgroup")),
                    ("mountPath", Node::str("/sys/fs/cgroup")),
                ]),
                Node::map([
                    ("name", Node::str("meshgate-bpffs")),
                    ("mountPath", Node::str("/sys/fs/bpf")),
                ]),
            ]),
        ),
    ])
}

/// The sidecar, as a native sidecar (restartPolicy: Always init container).
fn proxy_container(s: &Settings, plan: &PortPlan, probes: &Probes, threads: u16) -> Node {
    let ca = s.ca_url.as_deref().unwrap_or(DEFAULT_CA_URL);
    let cp = s.control_plane_url.as_deref().unwrap_or(DEFAULT_CP_URL);
    let mut args: Vec<String> = vec!["proxy".to_owned()];
    for p in &plan.http {
        args.extend(["--app".to_owned(), format!("127.0.0.1:{p}")]);
    }
    for p in &plan.tcp {
        args.extend(["--inbound-tcp-port".to_owned(), p.to_string()]);
    }
    args.extend(
        [
            "--ca",
            ca,
            "--ca-bundle",
            &format!("{BOOTSTRAP_DIR}/ca-bundle.pem"),
            "--token-file",
            &format!("{BOOTSTRAP_DIR}/token"),
            "--control-plane",
            cp,
            "--inbound",
            &format!("0.0.0.0:{INBOUND_PORT}"),
            "--outbound",
            &format!("127.0.0.1:{OUTBOUND_PORT}"),
            "--admin",
            &format!("127.0.0.1:{ADMIN_PORT}"),
            "--probe",
            &format!("0.0.0.0:{PROBE_PORT}"),
            "--probe-self",
        ]
        .map(str::to_owned),
    );
    for p in DEFAULT_OPAQUE_PORTS.iter().chain(&plan.tcp) {
        let p = p.to_string();
        if !args
            .windows(2)
            .any(|w| w[0] == "--opaque-port" && w[1] == p)
        {
            args.extend(["--opaque-port".to_owned(), p]);
        }
    }
    for p in &probes.http {
        args.extend(["--probe-path".to_owned(), p.clone()]);
    }
    for p in &probes.tcp {
        args.extend(["--probe-tcp".to_owned(), p.to_string()]);
    }
    for p in &probes.grpc {
        args.extend(["--probe-grpc".to_owned(), p.to_string()]);
    }
    let ready = || {
        Node::map([
            ("path", Node::str("/meshgate/ready")),
            ("port", Node::int(PROBE_PORT)),
        ])
    };
    Node::map([
        ("name", Node::str(PROXY_NAME)),
        ("image", Node::str(&s.image)),
        ("restartPolicy", Node::str("Always")),
        ("args", Node::str_seq(args)),
        (
            "env",
            Node::Seq(vec![
                Node::map([
                    ("name", Node::str("MESHGATE_LOG_FORMAT")),
                    ("value", Node::str("json")),
                ]),
                Node::map([
                    ("name", Node::str("MESHGATE_WORKER_THREADS")),
                    ("value", Node::str(threads.to_string())),
                ]),
            ]),
        ),
        (
            "ports",
            Node::Seq(vec![
                Node::map([
                    ("name", Node::str("mesh-inbound")),
                    ("containerPort", Node::int(INBOUND_PORT)),
                ]),
                Node::map([
                    ("name", Node::str("mesh-probe")),
                    ("containerPort", Node::int(PROBE_PORT)),
                ]),
            ]),
        ),
        (
            "startupProbe",
            Node::map([
                ("httpGet", ready()),
                ("periodSeconds", Node::int(1)),
                ("failureThreshold", Node::int(120)),
            ]),
        ),
        (
            "readinessProbe",
            Node::map([("httpGet", ready()), ("periodSeconds", Node::int(5))]),
        ),
        (
            "resources",
            Node::map([
                (
                    "requests",
                    Node::map([("cpu", Node::str("50m")), ("memory", Node::str("32Mi"))]),
                ),
                ("limits", Node::map([("memory", Node::str("128Mi"))])),
            ]),
        ),
        (
            "securityContext",
            Node::map([
                ("runAsUser", Node::int(PROXY_UID)),
                ("runAsGroup", Node::int(PROXY_UID)),
                ("runAsNonRoot", Node::bool(true)),
                ("readOnlyRootFilesystem", Node::bool(true)),
                ("allowPrivilegeEscalation", Node::bool(false)),
                (
                    "capabilities",
                    Node::map([("drop", Node::str_seq(["ALL"]))]),
                ),
            ]),
        ),
        (
            "volumeMounts",
            Node::Seq(vec![Node::map([
                ("name", Node::str("meshgate-bootstrap")),
                ("mountPath", Node::str(BOOTSTRAP_DIR)),
                ("readOnly", Node::bool(true)),
            ])]),
        ),
    ])
}

/// The bootstrap directory (a projected ServiceAccount token for the CA and the CA bundle from
/// the ConfigMap `meshgate-ca-bundle`), plus the host's cgroup2 and bpffs mounts for the redirect.
fn pod_volumes() -> [Node; 3] {
    let host_path = |name: &str, path: &str| {
        Node::map([
            ("name", Node::str(name)),
            (
                "hostPath",
                Node::map([("path", Node::str(path)), ("type", Node::str("Directory"))]),
            ),
        ])
    };
    [
        Node::map([
            ("name", Node::str("meshgate-bootstrap")),
            ("projected", Node::map([("sources", bootstrap_sources())])),
        ]),
        host_path("meshgate-cgroup", "/sys/fs/cgroup"),
        host_path("meshgate-bpffs", "/sys/fs/bpf"),
    ]
}

/// The projected volume's sources of the bootstrap directory: a ServiceAccount token for the CA
/// (`token`) and the CA bundle (`ca-bundle.pem`). Injected pods and the control plane mount it.
pub fn bootstrap_sources() -> Node {
    Node::Seq(vec![
        Node::map([(
            "serviceAccountToken",
            Node::map([
                ("audience", Node::str(TOKEN_AUDIENCE)),
                ("expirationSeconds", Node::int(TOKEN_EXPIRATION_SECONDS)),
                ("path", Node::str("token")),
            ]),
        )]),
        Node::map([(
            "configMap",
            Node::map([
                ("name", Node::str(CA_BUNDLE_CONFIGMAP)),
                (
                    "items",
                    Node::Seq(vec![Node::map([
                        ("key", Node::str("ca-bundle.pem")),
                        ("path", Node::str("ca-bundle.pem")),
                    ])]),
                ),
            ]),
        )]),
    ])
}

/// Meshes a Kubernetes Service that selects injected pods: adds the mesh port (so callers'
/// sidecars reach the pods' sidecars through the ClusterIP, as kube-proxy balances it) and
/// produces the meshgate `Service` document callers route by.
fn mesh_service(
    obj: &mut Node,
    s: &Settings,
    meshed: &[Meshed],
    report: &mut KubeReport,
) -> Result<bool, InjectError> {
    if obj.get("kind").and_then(Node::as_str) != Some("Service")
        || obj
            .get("apiVersion")
            .and_then(Node::as_str)
            .is_some_and(|v| v != "v1")
    {
        return Ok(false);
    }
    let name = str_at(obj, &["metadata", "name"])
        .unwrap_or_default()
        .to_owned();
    let namespace = str_at(obj, &["metadata", "namespace"])
        .unwrap_or("default")
        .to_owned();
    let object = format!("Service/{name}");
    let selector = string_map(obj.path(&["spec", "selector"]));
    if selector.is_empty() || name.is_empty() {
        return Ok(false);
    }
    let selected: Vec<&Meshed> = meshed
        .iter()
        .filter(|m| {
            m.namespace == namespace
                && selector
                    .iter()
                    .all(|(k, v)| m.labels.get(k).is_some_and(|l| l == v))
        })
        .collect();
    let Some(first) = selected.first() else {
        return Ok(false);
    };
    if let Some(other) = selected.iter().find(|m| m.identity != first.identity) {
        report.warnings.push(format!(
            "{object}: selects pods with two identities ({} in {}, {} in {}): a caller's sidecar requires one; not meshed. Give the pods one serviceAccountName, or split the Service",
            first.identity, first.object, other.identity, other.object
        ));
        return Ok(false);
    }
    let kd = &s.kube.cluster_domain;
    let mut hosts = vec![
        name.clone(),
        format!("{name}.{namespace}"),
        format!("{name}.{namespace}.svc"),
        format!("{name}.{namespace}.svc.{kd}"),
    ];
    let cluster_ip =
        str_at(obj, &["spec", "clusterIP"]).filter(|ip| ip.parse::<std::net::IpAddr>().is_ok());
    if let Some(ip) = cluster_ip {
        hosts.push(ip.to_owned());
    }
    let mut mesh_ports = Vec::new();
    let mut opaque_unroutable = Vec::new();
    let mut has_mesh_port = false;
    for p in obj
        .path(&["spec", "ports"])
        .map(Node::items)
        .unwrap_or_default()
    {
        let Some(port) = p
            .get("port")
            .and_then(Node::as_str)
            .and_then(|n| n.parse::<u16>().ok())
        else {
            continue;
        };
        if p.get("name").and_then(Node::as_str) == Some(MESH_PORT_NAME) || port == INBOUND_PORT {
            has_mesh_port = true;
            continue;
        }
        if p.get("protocol")
            .and_then(Node::as_str)
            .is_some_and(|v| v != "TCP")
        {
            continue;
        }
        let target = match p.get("targetPort").and_then(Node::as_str) {
            None => port,
            Some(t) => match t.parse::<u16>() {
                Ok(n) => n,
                Err(_) => match selected.iter().find_map(|m| m.named.get(t)) {
                    Some(&n) => n,
                    None => {
                        report.warnings.push(format!(
                            "{object}: port {port} targets the named port {t:?}, which no selected container declares; not meshed"
                        ));
                        continue;
                    }
                },
            },
        };
        let Some(&opaque) = first.served.get(&target) else {
            report.warnings.push(format!(
                "{object}: port {port} targets container port {target}, which the sidecar of {} does not serve (declare it as a containerPort or add it to {ANN_INBOUND_PORTS})",
                first.object
            ));
            continue;
        };
        let app_protocol = p
            .get("appProtocol")
            .and_then(Node::as_str)
            .unwrap_or_default();
        let port_name = p.get("name").and_then(Node::as_str).unwrap_or_default();
        let protocol = if opaque {
            if cluster_ip.is_none() {
                opaque_unroutable.push(port);
            }
            "tcp"
        } else if app_protocol.contains("grpc")
            || port_name == "grpc"
            || port_name.starts_with("grpc-")
        {
            "grpc"
        } else {
            "http"
        };
        let mut entry = Node::map([("port", Node::int(port)), ("protocol", Node::str(protocol))]);
        if target != port {
            entry.set("targetPort", Node::int(target));
        }
        mesh_ports.push(entry);
    }
    if !opaque_unroutable.is_empty() {
        report.warnings.push(format!(
            "{object}: opaque port(s) {opaque_unroutable:?} are reached by ClusterIP, which is assigned at apply time: callers' sidecars route L4 by destination address, so set spec.clusterIP and inject again, or call through `--tcp-forward`"
        ));
    }
    report.mesh_services.push(Node::map([
        ("apiVersion", Node::str("meshgate.dev/v1")),
        ("kind", Node::str("Service")),
        (
            "metadata",
            Node::map([
                ("name", Node::str(&name)),
                ("namespace", Node::str(&namespace)),
            ]),
        ),
        (
            "spec",
            Node::map([
                ("identity", Node::str(&first.identity)),
                ("hosts", Node::str_seq(hosts)),
                ("ports", Node::Seq(mesh_ports)),
                (
                    "endpoints",
                    Node::str_seq([format!("{name}.{namespace}.svc.{kd}:{INBOUND_PORT}")]),
                ),
            ]),
        ),
    ]));
    if has_mesh_port {
        return Ok(false);
    }
    let ports = obj.map_entry("spec").seq_entry("ports");
    if let Some(items) = ports.seq_mut() {
        items.push(Node::map([
            ("name", Node::str(MESH_PORT_NAME)),
            ("port", Node::int(INBOUND_PORT)),
            ("targetPort", Node::int(INBOUND_PORT)),
            ("protocol", Node::str("TCP")),
        ]));
    }
    Ok(true)
}

/// The ConfigMap with the CA bundle for one namespace.
pub fn ca_bundle_configmap(namespace: &str, pem: &str) -> Node {
    Node::map([
        ("apiVersion", Node::str("v1")),
        ("kind", Node::str("ConfigMap")),
        (
            "metadata",
            Node::map([
                ("name", Node::str(CA_BUNDLE_CONFIGMAP)),
                ("namespace", Node::str(namespace)),
                (
                    "labels",
                    Node::map([("app.kubernetes.io/part-of", Node::str("meshgate"))]),
                ),
            ]),
        ),
        ("data", Node::map([("ca-bundle.pem", Node::str(pem))])),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::yaml;

    fn settings() -> Settings {
        Settings {
            image: "meshgate:local".into(),
            trust_domain: "mesh.local".into(),
            ..Settings::default()
        }
    }

    fn inject_one(src: &str) -> (Node, KubeReport) {
        let mut docs = vec![yaml::parse(src).unwrap()];
        let (changed, report) = inject_stream(&mut docs, &settings()).unwrap();
        assert!(changed[0], "{src}");
        (docs.pop().unwrap(), report)
    }

    fn args_of(pod: &Node, path: &[&str], i: usize) -> Vec<String> {
        pod.path(path).unwrap().items()[i]
            .get("args")
            .unwrap()
            .items()
            .iter()
            .filter_map(Node::as_str)
            .map(str::to_owned)
            .collect()
    }

    /// The injected sidecar's `MESHGATE_WORKER_THREADS`: the pod's annotation, else the
    /// settings' default; a bad annotation is refused with its name and range.
    #[test]
    fn worker_threads_come_from_the_annotation_else_the_settings() {
        // (pod annotation, settings' default, expected env value or the refusal's words)
        let cases: [(Option<&str>, u16, Result<&str, &str>); 7] = [
            (None, crate::DEFAULT_WORKER_THREADS, Ok("1")),
            (None, 3, Ok("3")),
            (Some("4"), 1, Ok("4")),
            (Some("1024"), 2, Ok("1024")),
            (
                Some("0"),
                1,
                Err("\"0\", not a number of threads from 1 to 1024"),
            ),
            (Some("1025"), 1, Err("\"1025\", not a number")),
            (Some("two"), 1, Err("\"two\", not a number")),
        ];
        for (ann, default, want) in cases {
            let anns = ann.map_or(String::new(), |v| {
                format!("  annotations: {{meshgate.io/proxy-worker-threads: \"{v}\"}}\n")
            });
            let src = format!(
                "kind: Pod\nmetadata:\n  name: p\n{anns}spec:\n  containers: [{{name: a, ports: [{{containerPort: 80}}]}}]\n"
            );
            let mut docs = vec![yaml::parse(&src).unwrap()];
            let s = Settings {
                worker_threads: default,
                ..settings()
            };
            match (inject_stream(&mut docs, &s), want) {
                (Ok(_), Ok(want)) => {
                    let proxy = &docs[0].path(&["spec", "initContainers"]).unwrap().items()[1];
                    let env: Vec<_> = proxy
                        .get("env")
                        .unwrap()
                        .items()
                        .iter()
                        .filter(|e| {
                            e.get("name").and_then(Node::as_str) == Some("MESHGATE_WORKER_THREADS")
                        })
                        .filter_map(|e| e.get("value").and_then(Node::as_str))
                        .collect();
                    assert_eq!(env, [want], "{ann:?}");
                }
                (Err(e), Err(words)) => {
                    let e = e.to_string();
                    assert!(
                        e.contains("Pod/p")
                            && e.contains("annotation meshgate.io/proxy-worker-threads")
                            && e.contains(words),
                        "{ann:?}: {e}"
                    );
                }
                (got, want) => panic!("{ann:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn probes_of_every_kind_on_guarded_ports_go_to_the_sidecar() {
        let (pod, _) = inject_one(
            "kind: Pod\nmetadata:\n  name: p\nspec:\n  containers:\n    - name: app\n      ports:\n        - name: http\n          containerPort: 8080\n        - containerPort: 9000\n      livenessProbe:\n        httpGet:\n          port: http\n          path: /healthz\n      readinessProbe:\n        tcpSocket:\n          port: 8080\n      startupProbe:\n        grpc:\n          port: 9000\n          service: app\n        timeoutSeconds: 3\n",
        );
        let app = &pod.path(&["spec", "containers"]).unwrap().items()[0];
        let probe = |kind: &str| {
            let h = app.path(&[kind, "httpGet"]).unwrap();
            (
                h.get("port").unwrap().as_str().unwrap().to_owned(),
                h.get("path").unwrap().as_str().unwrap().to_owned(),
            )
        };
        assert_eq!(
            probe("livenessProbe"),
            ("15020".into(), "/meshgate/probe/http/8080/healthz".into())
        );
        assert_eq!(
            probe("readinessProbe"),
            ("15020".into(), "/meshgate/probe/tcp/8080".into())
        );
        assert_eq!(
            probe("startupProbe"),
            (
                "15020".into(),
                "/meshgate/probe/grpc/9000?service=app&timeout=3".into()
            )
        );
        assert!(app.path(&["readinessProbe", "tcpSocket"]).is_none());
        assert!(app.path(&["startupProbe", "grpc"]).is_none());
        let original = pod
            .path(&["metadata", "annotations", "meshgate.io/original-probes"])
            .unwrap();
        let original: serde_json::Value = serde_json::from_str(original.as_str().unwrap()).unwrap();
        assert_eq!(original["app"]["livenessProbe"]["httpGet"]["port"], "http");
        assert_eq!(original["app"]["readinessProbe"]["tcpSocket"]["port"], 8080);
        assert_eq!(original["app"]["startupProbe"]["grpc"]["service"], "app");
        let args = args_of(&pod, &["spec", "initContainers"], 1);
        for want in [
            ["--probe-path", "8080:/healthz"],
            ["--probe-tcp", "8080"],
            ["--probe-grpc", "9000"],
            ["--app", "127.0.0.1:8080"],
            ["--app", "127.0.0.1:9000"],
        ] {
            assert!(args.windows(2).any(|w| w == want), "{want:?} in {args:?}");
        }
    }

    #[test]
    fn port_annotations_table() {
        // (annotations, expected --app ports, --inbound-tcp-port ports, guarded ports)
        let cases: [(&str, &[u16], &[u16], &str); 5] = [
            ("{}", &[8080, 9090], &[6379], "6379,8080,9090"),
            (
                "{meshgate.io/skip-inbound-ports: \"9090\"}",
                &[8080],
                &[6379],
                "6379,8080",
            ),
            (
                "{meshgate.io/opaque-ports: \"9090\"}",
                &[6379, 8080],
                &[9090],
                "6379,8080,9090",
            ),
            (
                "{meshgate.io/inbound-from-outside: \"8080\"}",
                &[8080, 9090],
                &[6379],
                "6379,9090",
            ),
            (
                "{meshgate.io/inbound-ports: \"7000\"}",
                &[7000, 8080, 9090],
                &[6379],
                "6379,7000,8080,9090",
            ),
        ];
        for (ann, http, tcp, guarded) in cases {
            let src = format!(
                "kind: Pod\nmetadata:\n  name: p\n  annotations: {ann}\nspec:\n  containers:\n    - name: a\n      ports: [{{containerPort: 8080}}, {{containerPort: 6379}}]\n    - name: b\n      ports: [{{containerPort: 9090}}, {{containerPort: 53, protocol: UDP}}]\n"
            );
            let (pod, report) = inject_one(&src);
            let proxy = args_of(&pod, &["spec", "initContainers"], 1);
            let values = |flag: &str| -> Vec<u16> {
                proxy
                    .windows(2)
                    .filter(|w| w[0] == flag)
                    .map(|w| w[1].trim_start_matches("127.0.0.1:").parse().unwrap())
                    .collect()
            };
            assert_eq!(values("--app"), http, "{ann}");
            assert_eq!(values("--inbound-tcp-port"), tcp, "{ann}");
            let redirect = args_of(&pod, &["spec", "initContainers"], 0);
            let at = redirect.iter().position(|a| a == "--app-ports").unwrap();
            assert_eq!(redirect[at + 1], guarded, "{ann}");
            assert!(
                report.warnings.iter().any(|w| w.contains("53/UDP")),
                "{:?}",
                report.warnings
            );
        }
    }

    #[test]
    fn every_pod_template_kind_is_injected() {
        for (kind, template) in [
            ("Deployment", "spec:\n  template:\n"),
            ("StatefulSet", "spec:\n  template:\n"),
            ("DaemonSet", "spec:\n  template:\n"),
            ("ReplicaSet", "spec:\n  template:\n"),
            ("ReplicationController", "spec:\n  template:\n"),
            ("Job", "spec:\n  template:\n"),
            (
                "CronJob",
                "spec:\n  jobTemplate:\n    spec:\n      template:\n",
            ),
        ] {
            let indent = " ".repeat(template.lines().count() * 2);
            let src = format!(
                "kind: {kind}\nmetadata:\n  name: w\n{template}{indent}spec:\n{indent}  containers: [{{name: a, image: x}}]\n"
            );
            let (obj, report) = inject_one(&src);
            let path: Vec<&str> = match kind {
                "CronJob" => vec![
                    "spec",
                    "jobTemplate",
                    "spec",
                    "template",
                    "spec",
                    "initContainers",
                ],
                _ => vec!["spec", "template", "spec", "initContainers"],
            };
            let args = args_of(&obj, &path, 1);
            assert!(
                !args.iter().any(|a| a == "--app"),
                "{kind}: outbound-only: {args:?}"
            );
            assert!(
                report.warnings.iter().any(|w| w.contains("outbound-only")),
                "{kind}"
            );
        }
    }

    #[test]
    fn host_network_pods_are_skipped_with_a_warning() {
        let mut docs = vec![yaml::parse("kind: DaemonSet\nmetadata:\n  name: agent\nspec:\n  template:\n    spec:\n      hostNetwork: true\n      containers: [{name: a}]\n").unwrap()];
        let (changed, report) = inject_stream(&mut docs, &settings()).unwrap();
        assert!(!changed[0]);
        assert!(
            report.warnings[0].contains("hostNetwork"),
            "{:?}",
            report.warnings
        );
    }

    #[test]
    fn redirect_meshes_cluster_ranges_and_keeps_dns_and_the_api_server_direct() {
        let (pod, _) = inject_one(
            "kind: Pod\nmetadata:\n  name: p\nspec:\n  containers: [{name: a, ports: [{containerPort: 8080}]}]\n",
        );
        let args = args_of(&pod, &["spec", "initContainers"], 0).join(" ");
        for want in [
            "--mesh 10.244.0.0/16",
            "--mesh 10.96.0.0/12",
            "--exempt 10.96.0.0/12:53",
            "--exempt 10.244.0.0/16:53",
            "--exempt 10.96.0.1/32:443",
            "--no-egress-enforce",
            "--app-ports 8080",
        ] {
            assert!(args.contains(want), "{want} in {args}");
        }
    }

    #[test]
    fn a_service_selecting_injected_pods_is_meshed() {
        let src = "kind: List\nitems:\n  - kind: Deployment\n    metadata: {name: orders, namespace: shop}\n    spec:\n      template:\n        metadata: {labels: {app: orders}}\n        spec:\n          serviceAccountName: orders\n          containers: [{name: a, ports: [{name: http, containerPort: 8080}, {containerPort: 6379}]}]\n  - apiVersion: v1\n    kind: Service\n    metadata: {name: orders, namespace: shop}\n    spec:\n      selector: {app: orders}\n      ports: [{name: web, port: 80, targetPort: http}, {name: grpc, port: 8080}, {name: redis, port: 6379}]\n";
        let mut docs = vec![yaml::parse(src).unwrap()];
        let (changed, report) = inject_stream(&mut docs, &settings()).unwrap();
        assert!(changed[0]);
        let svc = &docs[0].get("items").unwrap().items()[1];
        let last = svc
            .path(&["spec", "ports"])
            .unwrap()
            .items()
            .last()
            .unwrap();
        assert_eq!(last.get("port").unwrap().as_str(), Some("15006"));
        assert_eq!(report.mesh_services.len(), 1);
        let doc = yaml::emit(&report.mesh_services[0]);
        meshgate_policy::load::load_text(std::path::Path::new("svc.yaml"), &doc)
            .unwrap_or_else(|e| panic!("{e:?}\n{doc}"));
        for want in [
            "identity: spiffe://mesh.local/ns/shop/sa/orders",
            "orders.shop.svc.cluster.local",
            "targetPort: 8080",
            "protocol: grpc",
            "protocol: tcp",
            "orders.shop.svc.cluster.local:15006",
        ] {
            assert!(doc.contains(want), "{want} in\n{doc}");
        }
        assert!(
            report.warnings.iter().any(|w| w.contains("spec.clusterIP")),
            "{:?}",
            report.warnings
        );
    }
}
