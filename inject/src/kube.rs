//! Kubernetes: injects Deployments, StatefulSets, Jobs (their pod templates) and Pods.
//!
//! Per pod: an init container `meshgate-redirect` (attaches the eBPF redirect to the pod's cgroup,
//! then exits), the sidecar `meshgate-proxy` as a native sidecar (an init container with
//! `restartPolicy: Always`: it starts before the app and does not keep Jobs from completing), a
//! projected volume with the join token and CA bundle, HTTP probes routed through the sidecar's
//! plain-text probe port, and annotations saying what was done.

use std::collections::BTreeMap;

use crate::yaml::Node;
use crate::{InjectError, Settings, VERSION};

/// Sidecar ports (docs/operations.md, "Sidecars") and the probe listener.
const INBOUND_PORT: u16 = 15006;
const OUTBOUND_PORT: u16 = 15001;
const ADMIN_PORT: u16 = 15000;
const PROBE_PORT: u16 = 15020;
/// The sidecar's uid: the redirect exempts its sockets so its own traffic is not looped back.
const PROXY_UID: u32 = 1337;
const BOOTSTRAP_DIR: &str = "/var/run/meshgate/bootstrap";
const PROXY_NAME: &str = "meshgate-proxy";
const REDIRECT_NAME: &str = "meshgate-redirect";
const DEFAULT_CA_URL: &str = "https://meshgate-ca.meshgate.svc:15012";
const DEFAULT_CP_URL: &str = "https://meshgate-control-plane.meshgate.svc:15010";

/// Injects one Kubernetes object (recursing into `kind: List`). Returns whether it changed;
/// kinds that carry no pods (Service, ConfigMap, ...) pass through unchanged.
pub fn inject_object(obj: &mut Node, s: &Settings) -> Result<bool, InjectError> {
    let kind = obj
        .get("kind")
        .and_then(Node::as_str)
        .unwrap_or_default()
        .to_owned();
    let name = obj
        .path(&["metadata", "name"])
        .and_then(Node::as_str)
        .unwrap_or("<unnamed>");
    let object = format!("{kind}/{name}");
    let namespace = obj
        .path(&["metadata", "namespace"])
        .and_then(Node::as_str)
        .unwrap_or("default")
        .to_owned();
    let outer = obj.path(&["metadata", "annotations"]).cloned();
    match kind.as_str() {
        "Pod" => inject_pod(&object, &namespace, None, obj, s),
        "Deployment" | "StatefulSet" | "Job" => {
            let Some(template) = obj
                .get_mut("spec")
                .and_then(|spec| spec.get_mut("template"))
            else {
                return Err(InjectError::refused(
                    object,
                    "has no spec.template",
                    "give it a pod template (spec.template)",
                ));
            };
            inject_pod(&object, &namespace, outer.as_ref(), template, s)
        }
        "List" => {
            let mut changed = false;
            if let Some(items) = obj.get_mut("items").and_then(Node::seq_mut) {
                for item in items {
                    changed |= inject_object(item, s)?;
                }
            }
            Ok(changed)
        }
        "DaemonSet" | "CronJob" | "ReplicaSet" | "ReplicationController" => {
            if annotation(outer.as_ref(), "meshgate.io/inject") == Some("disabled") {
                return Ok(false);
            }
            Err(InjectError::refused(
                object,
                format!("{kind} is not supported yet"),
                "inject a Deployment, StatefulSet, Job or Pod instead, or opt out with the annotation meshgate.io/inject: disabled",
            ))
        }
        _ => Ok(false),
    }
}

fn annotation<'a>(annotations: Option<&'a Node>, key: &str) -> Option<&'a str> {
    annotations?.get(key)?.as_str()
}

/// Injects a pod (or pod template: a map with `metadata` and `spec`).
fn inject_pod(
    object: &str,
    namespace: &str,
    outer: Option<&Node>,
    pod: &mut Node,
    s: &Settings,
) -> Result<bool, InjectError> {
    let own = pod.path(&["metadata", "annotations"]).cloned();
    let lookup = |key: &str| annotation(own.as_ref(), key).or_else(|| annotation(outer, key));
    if lookup("meshgate.io/inject") == Some("disabled") {
        return Ok(false);
    }
    let Some(spec) = pod.get("spec") else {
        return Err(InjectError::refused(
            object,
            "has no pod spec",
            "add the pod spec",
        ));
    };
    let already = spec.get("initContainers").is_some_and(|ic| {
        ic.items()
            .iter()
            .any(|c| c.get("name").and_then(Node::as_str) == Some(PROXY_NAME))
    });
    if already {
        return Ok(false);
    }
    if spec.get("hostNetwork").is_some_and(Node::is_true) {
        return Err(InjectError::refused(
            object,
            "uses hostNetwork: true, so a sidecar would capture the node's traffic, not the pod's",
            "remove hostNetwork, or opt out with the annotation meshgate.io/inject: disabled",
        ));
    }
    let containers = spec.get("containers").map(Node::items).unwrap_or_default();
    if containers.is_empty() {
        return Err(InjectError::refused(
            object,
            "has no containers",
            "add the app container",
        ));
    }
    let port = match lookup("meshgate.io/app-port") {
        Some(p) => p.parse::<u16>().ok().filter(|&p| p != 0).ok_or_else(|| {
            InjectError::refused(
                object,
                format!("annotation meshgate.io/app-port is {p:?}, not a port number"),
                "set it to the app's container port number, e.g. \"8080\"",
            )
        })?,
        None => first_container_port(containers).ok_or_else(|| {
            InjectError::refused(
                object,
                "has no app port (no containerPort in any container)",
                "add the annotation meshgate.io/app-port: \"<port>\" to the pod template, or a containerPort",
            )
        })?,
    };
    let account = spec
        .get("serviceAccountName")
        .and_then(Node::as_str)
        .unwrap_or("default")
        .to_owned();
    let identity = s.spiffe_id(object, namespace, &account)?;
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

    let spec = pod.get_mut("spec").expect("checked above");
    let (probe_paths, originals) = rewrite_probes(spec, port);

    let init = spec.seq_entry("initContainers");
    if let Some(items) = init.seq_mut() {
        items.splice(
            0..0,
            [
                redirect_container(s, port),
                proxy_container(s, port, &probe_paths),
            ],
        );
    }
    let volumes = spec.seq_entry("volumes");
    if let Some(items) = volumes.seq_mut() {
        for v in pod_volumes(&account) {
            let name = v.get("name").and_then(Node::as_str);
            // A volume the user defined under our name wins: that is how to point at another Secret.
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
    if !originals.is_empty() {
        let json = serde_json::to_string(&originals).expect("maps of strings serialize");
        annotations.set("meshgate.io/original-probes", Node::str(json));
    }
    Ok(true)
}

/// The first containerPort of the first container that declares one.
fn first_container_port(containers: &[Node]) -> Option<u16> {
    containers.iter().find_map(|c| {
        c.get("ports")?
            .items()
            .iter()
            .find_map(|p| p.get("containerPort")?.as_str()?.parse().ok())
    })
}

/// Probes of one container that inject rewrote: probe kind → original `{port, path}`.
type Originals = BTreeMap<String, BTreeMap<&'static str, serde_json::Value>>;

/// Points the app containers' HTTP probes on the app port at the sidecar's probe port. The
/// app port only accepts mTLS once injected, so the kubelet's plain-text probes go to the
/// sidecar, which forwards exactly these paths to the app. HTTPS probes, probes with a `host`,
/// and tcpSocket/exec probes are left alone. Returns the paths and the originals per container.
fn rewrite_probes(spec: &mut Node, port: u16) -> (Vec<String>, BTreeMap<String, Originals>) {
    let mut paths: Vec<String> = Vec::new();
    let mut originals = BTreeMap::new();
    let Some(containers) = spec.get_mut("containers").and_then(Node::seq_mut) else {
        return (paths, originals);
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
        for kind in ["livenessProbe", "readinessProbe", "startupProbe"] {
            let Some(http) = c.get_mut(kind).and_then(|p| p.get_mut("httpGet")) else {
                continue;
            };
            let https = http
                .get("scheme")
                .and_then(Node::as_str)
                .is_some_and(|v| v.eq_ignore_ascii_case("https"));
            if https || http.get("host").is_some() {
                continue;
            }
            let Some(target) = http.get("port").and_then(Node::as_str).map(str::to_owned) else {
                continue;
            };
            let resolved = target
                .parse::<u16>()
                .ok()
                .or_else(|| named.iter().find(|(n, _)| *n == target).map(|(_, p)| *p));
            if resolved != Some(port) {
                continue;
            }
            let path = http
                .get("path")
                .and_then(Node::as_str)
                .unwrap_or("/")
                .to_owned();
            let original_port = match target.parse::<u16>() {
                Ok(n) => serde_json::Value::from(n),
                Err(_) => serde_json::Value::from(target),
            };
            let entry: &mut Originals = originals.entry(cname.clone()).or_default();
            entry.insert(
                kind.to_owned(),
                BTreeMap::from([
                    ("port", original_port),
                    ("path", serde_json::Value::from(path.clone())),
                ]),
            );
            http.set("port", Node::int(PROBE_PORT));
            if !paths.contains(&path) {
                paths.push(path);
            }
        }
    }
    (paths, originals)
}

/// The init container that attaches the eBPF redirect to the pod's cgroup and exits.
fn redirect_container(s: &Settings, port: u16) -> Node {
    Node::map([
        ("name", Node::str(REDIRECT_NAME)),
        ("image", Node::str(&s.image)),
        (
            "args",
            Node::str_seq([
                "redirect".to_owned(),
                "attach".into(),
                "--pod".into(),
                "--sidecar-uid".into(),
                PROXY_UID.to_string(),
                "--app-ports".into(),
                port.to_string(),
            ]),
        ),
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
fn proxy_container(s: &Settings, port: u16, probe_paths: &[String]) -> Node {
    let ca = s.ca_url.as_deref().unwrap_or(DEFAULT_CA_URL);
    let cp = s.control_plane_url.as_deref().unwrap_or(DEFAULT_CP_URL);
    let mut args: Vec<String> = [
        "proxy",
        "--app",
        &format!("127.0.0.1:{port}"),
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
    .map(str::to_owned)
    .to_vec();
    for p in probe_paths {
        args.extend(["--probe-path".to_owned(), p.clone()]);
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
            Node::Seq(vec![Node::map([
                ("name", Node::str("MESHGATE_LOG_FORMAT")),
                ("value", Node::str("json")),
            ])]),
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

/// The join token (Secret `meshgate-token-<account>`) and CA bundle (ConfigMap
/// `meshgate-ca-bundle`) as one read-only directory, plus the host's cgroup2 and bpffs mounts
/// for the redirect.
fn pod_volumes(account: &str) -> [Node; 3] {
    let item = |key: &str, path: &str| {
        Node::Seq(vec![Node::map([
            ("key", Node::str(key)),
            ("path", Node::str(path)),
        ])])
    };
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
            (
                "projected",
                Node::map([(
                    "sources",
                    Node::Seq(vec![
                        Node::map([(
                            "secret",
                            Node::map([
                                ("name", Node::str(format!("meshgate-token-{account}"))),
                                ("items", item("token", "token")),
                            ]),
                        )]),
                        Node::map([(
                            "configMap",
                            Node::map([
                                ("name", Node::str("meshgate-ca-bundle")),
                                ("items", item("ca-bundle.pem", "ca-bundle.pem")),
                            ]),
                        )]),
                    ]),
                )]),
            ),
        ]),
        host_path("meshgate-cgroup", "/sys/fs/cgroup"),
        host_path("meshgate-bpffs", "/sys/fs/bpf"),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::yaml;

    fn settings() -> Settings {
        Settings {
            image: "meshgate:local".into(),
            trust_domain: "mesh.local".into(),
            ca_url: None,
            control_plane_url: None,
        }
    }

    #[test]
    fn named_probe_port_is_rewritten_and_recorded() {
        let mut pod = yaml::parse(
            "kind: Pod\nmetadata:\n  name: p\nspec:\n  containers:\n    - name: app\n      ports:\n        - name: http\n          containerPort: 8080\n      livenessProbe:\n        httpGet:\n          port: http\n          path: /healthz\n      readinessProbe:\n        tcpSocket:\n          port: 8080\n",
        )
        .unwrap();
        assert!(inject_object(&mut pod, &settings()).unwrap());
        let app = &pod.path(&["spec", "containers"]).unwrap().items()[0];
        assert_eq!(
            app.path(&["livenessProbe", "httpGet", "port"])
                .unwrap()
                .as_str(),
            Some("15020")
        );
        assert_eq!(
            app.path(&["readinessProbe", "tcpSocket", "port"])
                .unwrap()
                .as_str(),
            Some("8080")
        );
        let original = pod
            .path(&["metadata", "annotations", "meshgate.io/original-probes"])
            .unwrap();
        assert_eq!(
            original.as_str(),
            Some(r#"{"app":{"livenessProbe":{"path":"/healthz","port":"http"}}}"#)
        );
        let proxy = &pod.path(&["spec", "initContainers"]).unwrap().items()[1];
        let args: Vec<_> = proxy
            .get("args")
            .unwrap()
            .items()
            .iter()
            .filter_map(Node::as_str)
            .collect();
        assert!(args.ends_with(&["--probe-path", "/healthz"]), "{args:?}");
    }

    #[test]
    fn opt_out_and_non_workloads_pass_through() {
        for src in [
            "kind: Service\nmetadata:\n  name: s\n",
            "kind: Deployment\nmetadata:\n  name: d\n  annotations:\n    meshgate.io/inject: disabled\nspec:\n  template:\n    spec:\n      containers: [{name: a}]\n",
        ] {
            let mut n = yaml::parse(src).unwrap();
            assert!(!inject_object(&mut n, &settings()).unwrap(), "{src}");
        }
    }
}
