//! docker-compose: gives every app service a pod-like set of companions.
//!
//! Compose has no pods, so `X-pod` (a pause container) owns the network namespace and the DNS
//! name `X`; `X-proxy` (the sidecar), `X-redirect` (attaches the eBPF redirect, then exits) and
//! the user's `X` join it with `network_mode: service:X-pod`. cgroup parents per container let
//! the redirect tell the app's sockets from the sidecar's. The layout lives in one function,
//! [`inject_service`], so it is easy to change.

use crate::yaml::{Node, Scalar, Style};
use crate::{InjectError, Settings, VERSION};

const DEFAULT_CA_URL: &str = "https://ca:15012";
const DEFAULT_CP_URL: &str = "https://control-plane:15010";
/// Where the shared `meshgate-bootstrap` volume (bundle + join tokens, written by the CA
/// service's `--token-for`) is mounted.
const BOOTSTRAP_DIR: &str = "/var/lib/meshgate/bootstrap";

/// Keys that compose rejects next to `network_mode: service:...`; they move to `X-pod`.
const NETWORK_KEYS: [&str; 9] = [
    "ports",
    "expose",
    "hostname",
    "domainname",
    "dns",
    "dns_search",
    "dns_opt",
    "extra_hosts",
    "mac_address",
];

/// One service to inject.
#[derive(Debug)]
struct Plan {
    name: String,
    namespace: String,
    account: String,
    /// The SPIFFE ID.
    identity: String,
    port: u16,
    /// Label `meshgate.io/public: "true"`: the app port stays reachable from outside the pod
    /// (an edge service published on the host), so the redirect does not guard it.
    public: bool,
    /// The sidecar's worker threads (label `meshgate.io/proxy-worker-threads`, else the
    /// settings' default).
    threads: u16,
}

/// What every injected service needs to know about the rest of the file.
struct Context<'a> {
    settings: &'a Settings,
    ca_service: String,
    control_plane_service: String,
    /// `--mesh` destinations of the redirect: every injected service's app port.
    mesh_ports: Vec<u16>,
}

/// Injects a compose document (a map with `services:`). Returns whether it changed.
pub fn inject(doc: &mut Node, s: &Settings) -> Result<bool, InjectError> {
    let services = doc
        .get("services")
        .expect("caller checked")
        .entries()
        .to_vec();
    let mut plans = Vec::new();
    for (name, svc) in &services {
        if let Some(plan) = plan_service(s, &name.text, svc, &services)? {
            plans.push(plan);
        }
    }
    if plans.is_empty() {
        return Ok(false);
    }
    let ca_service = role_service(&services, "ca")?;
    let control_plane_service = role_service(&services, "control-plane")?;

    // Ports of services injected earlier (read back from their proxy's --app) and now.
    let mut mesh_ports: Vec<u16> = Vec::new();
    for (name, svc) in &services {
        let port = match plans.iter().find(|p| p.name == name.text) {
            Some(plan) => Some(plan.port),
            None if label(svc, "meshgate.io/pod-of").is_some() => {
                flag_value(svc, "--app").and_then(|v| v.rsplit(':').next()?.parse().ok())
            }
            None => None,
        };
        if let Some(p) = port.filter(|p| !mesh_ports.contains(p)) {
            mesh_ports.push(p);
        }
    }
    let ctx = Context {
        settings: s,
        ca_service,
        control_plane_service,
        mesh_ports,
    };

    let mut out = Vec::with_capacity(services.len() + 3 * plans.len());
    for (name, svc) in services {
        match plans.iter().find(|p| p.name == name.text) {
            Some(plan) => {
                for (n, node) in inject_service(plan, svc, &ctx) {
                    out.push((
                        Scalar {
                            text: n,
                            style: name.style,
                        },
                        node,
                    ));
                }
            }
            None => out.push((name, svc)),
        }
    }
    doc.set("services", Node::Map(out));

    // The CA mints one join token per identity into the shared bootstrap volume.
    let ca = doc
        .get_mut("services")
        .and_then(|m| m.get_mut(&ctx.ca_service))
        .expect("found");
    for plan in &plans {
        let id = plan.identity.clone();
        match ca.get_mut("command").and_then(Node::seq_mut) {
            Some(items) => {
                let present = items.windows(2).any(|w| {
                    w[0].as_str() == Some("--token-for") && w[1].as_str() == Some(id.as_str())
                }) || items
                    .iter()
                    .any(|i| i.as_str() == Some(&format!("--token-for={id}")));
                if !present {
                    items.extend([Node::str("--token-for"), Node::str(id)]);
                }
            }
            _ => {
                return Err(InjectError::refused(
                    format!("compose service {}", ctx.ca_service),
                    "has no `command:` list to add --token-for to",
                    "write its command as a list, e.g. command: [ca, serve, --dir, /var/lib/meshgate/ca]",
                ));
            }
        }
    }
    let volumes = doc.map_entry("volumes");
    if volumes.get("meshgate-bootstrap").is_none() {
        volumes.set("meshgate-bootstrap", Node::Map(Vec::new()));
    }
    Ok(true)
}

/// Decides whether a service is injected, refusing what would break.
fn plan_service(
    s: &Settings,
    name: &str,
    svc: &Node,
    all: &[(Scalar, Node)],
) -> Result<Option<Plan>, InjectError> {
    let object = format!("compose service {name}");
    let skip = label(svc, "meshgate.io/role").is_some()
        || label(svc, "meshgate.io/pod-of").is_some()
        || label(svc, "meshgate.io/injected").is_some()
        || label(svc, "meshgate.io/inject").as_deref() == Some("disabled");
    if skip {
        return Ok(None);
    }
    if let Some(mode) = svc.get("network_mode").and_then(Node::as_str) {
        return Err(InjectError::refused(
            object,
            format!(
                "uses network_mode: {mode}, but the sidecar needs a network namespace of its own"
            ),
            "remove network_mode, or opt out with the label meshgate.io/inject: disabled",
        ));
    }
    for suffix in ["-pod", "-proxy", "-redirect"] {
        let companion = format!("{name}{suffix}");
        if all.iter().any(|(k, _)| k.text == companion) {
            return Err(InjectError::refused(
                object,
                format!("a service named {companion} already exists, and inject needs that name"),
                format!(
                    "rename {companion}, or opt out with the label meshgate.io/inject: disabled"
                ),
            ));
        }
    }
    let port = match label(svc, "meshgate.io/app-port") {
        Some(p) => Some(p.parse::<u16>().ok().filter(|&p| p != 0).ok_or_else(|| {
            InjectError::refused(
                object.clone(),
                format!("label meshgate.io/app-port is {p:?}, not a port number"),
                "set it to the port the app listens on, e.g. \"8080\"",
            )
        })?),
        None => discover_port(svc),
    };
    let port = port.ok_or_else(|| {
        InjectError::refused(
            object.clone(),
            "has no app port (no label meshgate.io/app-port, no expose, no ports)",
            "add the label meshgate.io/app-port: \"<port the app listens on>\"",
        )
    })?;
    let namespace = label(svc, "meshgate.io/namespace").unwrap_or_else(|| "default".into());
    let account = label(svc, "meshgate.io/service-account").unwrap_or_else(|| name.to_owned());
    let identity = s.spiffe_id(&object, &namespace, &account)?;
    let public = match label(svc, "meshgate.io/public").as_deref() {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return Err(InjectError::refused(
                object,
                format!("label meshgate.io/public is {other:?}"),
                "use \"true\" (the app port is published outside the mesh) or \"false\"",
            ));
        }
    };
    if !public && let Some(published) = svc.get("ports") {
        eprintln!(
            "warning: {object} publishes ports ({}) but its app port will answer only through its sidecar (the redirect guards it); if it is an edge service that outside clients call directly, label it meshgate.io/public: \"true\"",
            published_list(published)
        );
    }
    let threads = crate::worker_threads(
        &object,
        "label",
        label(svc, crate::WORKER_THREADS_KEY).as_deref(),
        s,
    )?;
    Ok(Some(Plan {
        name: name.to_owned(),
        namespace,
        account,
        identity,
        port,
        public,
        threads,
    }))
}

/// A compose `ports` value as one line for a message.
fn published_list(ports: &Node) -> String {
    match ports {
        Node::Seq(items) | Node::Flow(items) => items
            .iter()
            .map(|i| i.as_str().map_or_else(|| "…".to_string(), str::to_string))
            .collect::<Vec<_>>()
            .join(", "),
        other => other.as_str().unwrap_or("…").to_string(),
    }
}

/// The first `expose` entry, else the container side of the first `ports` entry.
fn discover_port(svc: &Node) -> Option<u16> {
    let first_port = |s: &str| {
        // "127.0.0.1:8080:80/tcp", "8080-8081:80-81", "80": the container side, first of a range.
        let container = s.rsplit(':').next()?;
        container
            .split('/')
            .next()?
            .split('-')
            .next()?
            .trim()
            .parse::<u16>()
            .ok()
    };
    if let Some(e) = svc.get("expose").and_then(|e| e.items().first()) {
        return e.as_str().and_then(first_port);
    }
    let p = svc.get("ports")?.items().first()?;
    match p {
        Node::Map(_) => p.get("target")?.as_str()?.parse().ok(),
        other => other.as_str().and_then(first_port),
    }
}

/// The service carrying `meshgate.io/role: <role>`.
fn role_service(services: &[(Scalar, Node)], role: &str) -> Result<String, InjectError> {
    services
        .iter()
        .find(|(_, svc)| label(svc, "meshgate.io/role").as_deref() == Some(role))
        .map(|(k, _)| k.text.clone())
        .ok_or_else(|| {
            InjectError::refused(
                "the compose file",
                format!("has no service labelled meshgate.io/role: {role}, and injected sidecars need the mesh's {role}"),
                format!("add the mesh's {role} service (see docs/operations.md, \"Injecting an existing compose file\") with the label meshgate.io/role: {role}"),
            )
        })
}

/// A label's value; compose allows a map or a list of `key=value`.
fn label(svc: &Node, key: &str) -> Option<String> {
    match svc.get("labels")? {
        m @ Node::Map(_) => Some(m.get(key)?.as_str().unwrap_or_default().to_owned()),
        Node::Seq(items) | Node::Flow(items) => items.iter().find_map(|i| {
            let s = i.as_str()?;
            let (k, v) = s.split_once('=').unwrap_or((s, ""));
            (k == key).then(|| v.to_owned())
        }),
        Node::Scalar(_) => None,
    }
}

/// The value after `flag` in a service's command list.
fn flag_value(svc: &Node, flag: &str) -> Option<String> {
    let items = svc.get("command")?.items();
    let i = items.iter().position(|n| n.as_str() == Some(flag))?;
    items.get(i + 1)?.as_str().map(str::to_owned)
}

/// Adds labels to a service, in whichever form (map or `key=value` list) it uses.
fn add_labels(svc: &mut Node, labels: &[(&str, String)]) {
    if let Some(items) = svc.get_mut("labels").and_then(Node::seq_mut) {
        for (k, v) in labels {
            items.push(Node::str(format!("{k}={v}")));
        }
        return;
    }
    let map = svc.map_entry("labels");
    for (k, v) in labels {
        map.set(k, Node::str(v.clone()));
    }
}

/// `X-pod`'s networks: X's own (list or map form), each with the alias `X` so the name keeps
/// resolving to the namespace the app now lives in.
fn pod_networks(own: Option<Node>, name: &str) -> Node {
    let with_alias = |cfg: Option<Node>| {
        let mut cfg = match cfg {
            Some(m @ Node::Map(_)) => m,
            _ => Node::Map(Vec::new()),
        };
        let aliases = cfg.seq_entry("aliases");
        if !aliases.items().iter().any(|a| a.as_str() == Some(name))
            && let Some(items) = aliases.seq_mut()
        {
            items.push(Node::str(name));
        }
        cfg
    };
    match own {
        Some(Node::Seq(list) | Node::Flow(list)) => Node::Map(
            list.iter()
                .filter_map(Node::as_str)
                .map(|n| (key(n), with_alias(None)))
                .collect(),
        ),
        Some(Node::Map(entries)) => Node::Map(
            entries
                .into_iter()
                .map(|(k, v)| (k, with_alias(Some(v))))
                .collect(),
        ),
        _ => Node::map([("default", with_alias(None))]),
    }
}

/// The compose layout of one injected service: returns `X-pod`, `X-proxy`, `X-redirect` and the
/// changed `X`, in that order. The maintainer's template; change it here.
fn inject_service(plan: &Plan, mut svc: Node, ctx: &Context<'_>) -> Vec<(String, Node)> {
    let s = ctx.settings;
    let (x, n, p) = (plan.name.as_str(), plan.namespace.as_str(), plan.port);
    let pod_name = format!("{x}-pod");
    let proxy_name = format!("{x}-proxy");
    let redirect_name = format!("{x}-redirect");
    let net_mode = format!("service:{pod_name}");
    let pod_of = || Node::map([("meshgate.io/pod-of", Node::str(x))]);
    let cond = |c: &str| Node::map([("condition", Node::str(c))]);

    // X-pod: holds the network namespace (like a Kubernetes pause container) and the DNS name X.
    let mut pod = Node::map([
        ("image", Node::str(&s.image)),
        ("command", Node::str_seq(["pause"])),
        ("init", Node::bool(true)),
        // Its image healthcheck would only probe the proxy sharing its namespace.
        ("healthcheck", Node::map([("disable", Node::bool(true))])),
        ("networks", pod_networks(svc.remove("networks"), x)),
    ]);
    for key in NETWORK_KEYS {
        if let Some(v) = svc.remove(key) {
            pod.set(key, v);
        }
    }
    pod.set("labels", pod_of());

    let proxy = Node::map([
        ("image", Node::str(&s.image)),
        ("network_mode", Node::str(&net_mode)),
        (
            "cgroup_parent",
            Node::str(format!("/meshgate/{n}-{x}/proxy")),
        ),
        ("init", Node::bool(true)),
        (
            "command",
            Node::str_seq([
                "proxy".to_owned(),
                "--app".into(),
                format!("127.0.0.1:{p}"),
                "--ca".into(),
                s.ca_url.clone().unwrap_or_else(|| DEFAULT_CA_URL.into()),
                "--ca-bundle".into(),
                format!("{BOOTSTRAP_DIR}/bundle.pem"),
                "--token-file".into(),
                format!("{BOOTSTRAP_DIR}/tokens/{n}.{}.token", plan.account),
                "--control-plane".into(),
                s.control_plane_url
                    .clone()
                    .unwrap_or_else(|| DEFAULT_CP_URL.into()),
                "--inbound".into(),
                "0.0.0.0:15006".into(),
                "--outbound".into(),
                "127.0.0.1:15001".into(),
                "--admin".into(),
                "127.0.0.1:15000".into(),
            ]),
        ),
        (
            "environment",
            Node::map([
                ("MESHGATE_LOG_FORMAT", Node::str("json")),
                (
                    "OTEL_EXPORTER_OTLP_ENDPOINT",
                    Node::str("${MESHGATE_OTLP_ENDPOINT:-http://jaeger:4318}"),
                ),
                ("OTEL_SERVICE_NAME", Node::str(x)),
                (
                    "MESHGATE_WORKER_THREADS",
                    Node::str(plan.threads.to_string()),
                ),
            ]),
        ),
        (
            "volumes",
            Node::str_seq([format!("meshgate-bootstrap:{BOOTSTRAP_DIR}:ro")]),
        ),
        (
            "healthcheck",
            Node::map([
                (
                    "test",
                    Node::str_seq(["CMD", "meshgate", "health", "http://127.0.0.1:15000/ready"]),
                ),
                ("interval", Node::str("2s")),
                ("timeout", Node::str("3s")),
                ("retries", Node::int(30)),
            ]),
        ),
        (
            "depends_on",
            Node::Map(vec![
                (key(&pod_name), cond("service_started")),
                (key(&ctx.ca_service), cond("service_healthy")),
                (key(&ctx.control_plane_service), cond("service_healthy")),
            ]),
        ),
        ("labels", pod_of()),
    ]);

    let mut redirect_cmd = vec![
        "redirect".to_owned(),
        "attach".into(),
        "--cgroup".into(),
        format!("/host/cgroup2/meshgate/{n}-{x}/app"),
        "--sidecar-cgroup".into(),
        format!("/host/cgroup2/meshgate/{n}-{x}/proxy"),
        "--create".into(),
    ];
    if !plan.public {
        redirect_cmd.extend(["--app-ports".to_owned(), p.to_string()]);
    }
    for mp in &ctx.mesh_ports {
        redirect_cmd.extend(["--mesh".to_owned(), format!("0.0.0.0/0:{mp}")]);
    }
    let redirect = Node::map([
        ("image", Node::str(&s.image)),
        ("network_mode", Node::str(&net_mode)),
        ("user", Node::str("root")),
        // BPF + PERFMON would do instead of SYS_ADMIN on engines >= 23.
        ("cap_add", Node::str_seq(["NET_ADMIN", "SYS_ADMIN"])),
        (
            "volumes",
            Node::str_seq([
                "${MESHGATE_CGROUP2:-/sys/fs/cgroup/unified}:/host/cgroup2",
                "/sys/fs/bpf:/sys/fs/bpf",
            ]),
        ),
        ("command", Node::str_seq(redirect_cmd)),
        ("restart", Node::str("no")),
        // A one-shot step: compose waits for it to complete, not to be healthy.
        ("healthcheck", Node::map([("disable", Node::bool(true))])),
        (
            "depends_on",
            Node::Map(vec![(key(&proxy_name), cond("service_healthy"))]),
        ),
        ("labels", pod_of()),
    ]);

    // X keeps its name and everything else; its network settings moved to X-pod.
    svc.set("network_mode", Node::str(&net_mode));
    svc.set("cgroup_parent", Node::str(format!("/meshgate/{n}-{x}/app")));
    let depends = match svc.remove("depends_on") {
        Some(Node::Seq(list) | Node::Flow(list)) => Node::Map(
            list.iter()
                .filter_map(Node::as_str)
                .map(|d| (key(d), cond("service_started")))
                .collect(),
        ),
        Some(m @ Node::Map(_)) => m,
        _ => Node::Map(Vec::new()),
    };
    svc.set("depends_on", depends);
    let depends = svc.get_mut("depends_on").expect("just set");
    depends.set(&redirect_name, cond("service_completed_successfully"));
    depends.set(&proxy_name, cond("service_healthy"));
    add_labels(
        &mut svc,
        &[
            ("meshgate.io/injected", VERSION.to_owned()),
            ("meshgate.io/identity", plan.identity.clone()),
        ],
    );

    vec![
        (pod_name, pod),
        (proxy_name, proxy),
        (redirect_name, redirect),
        (x.to_owned(), svc),
    ]
}

fn key(k: &str) -> Scalar {
    Scalar {
        text: k.to_owned(),
        style: Style::Auto,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::yaml;

    #[test]
    fn port_discovery_order() {
        for (src, want) in [
            ("expose: ['3000/tcp']\nports: ['8080:80']\n", Some(3000)),
            ("ports: ['127.0.0.1:8080:80/tcp']\n", Some(80)),
            ("ports: ['9090-9091:8080-8081']\n", Some(8080)),
            ("ports: [{target: 81, published: 8081}]\n", Some(81)),
            ("ports: [5000]\n", Some(5000)),
            ("image: x\n", None),
        ] {
            assert_eq!(discover_port(&yaml::parse(src).unwrap()), want, "{src}");
        }
    }

    #[test]
    fn labels_in_list_form() {
        let svc = yaml::parse("labels: [meshgate.io/inject=disabled, other]\n").unwrap();
        assert_eq!(
            label(&svc, "meshgate.io/inject").as_deref(),
            Some("disabled")
        );
        assert_eq!(label(&svc, "other").as_deref(), Some(""));
        assert_eq!(label(&svc, "missing"), None);
    }

    #[test]
    fn list_networks_get_the_alias() {
        let nets = pod_networks(Some(yaml::parse("[front, back]").unwrap()), "web");
        assert_eq!(
            yaml::emit(&nets),
            "front:\n  aliases:\n    - web\nback:\n  aliases:\n    - web\n"
        );
    }
}
