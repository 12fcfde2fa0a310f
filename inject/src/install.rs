//! `meshgate install`: the Kubernetes manifests of the mesh itself (like `linkerd install`) —
//! namespace `meshgate` with the CA and the control plane, and the CustomResourceDefinitions of
//! the policy kinds.
//!
//! The names are the ones injected sidecars use (`meshgate-ca.meshgate.svc:15012`,
//! `meshgate-control-plane.meshgate.svc:15010`, ServiceAccount `control-plane` whose SPIFFE ID
//! sidecars require), so `meshgate install | kubectl apply -f -` followed by `meshgate inject`
//! gives a mesh without editing anything. Every object is written with the same YAML writer as
//! `inject` (the crate's `yaml` module); the CRD schemas come from the policy model
//! ([`meshgate_policy::schema`]), never by hand.
//!
//! Security choices, each explained in the emitted comments too: least-privilege RBAC (the CA
//! may only read the API server's OIDC discovery and keys; the control plane has no API access
//! and no API token at all); the CA keys in a Secret without the root key; restricted Pod
//! Security (non-root, read-only root filesystem, no privilege escalation, no capabilities,
//! RuntimeDefault seccomp), enforced on the namespace by its `pod-security` label.

use std::path::{Path, PathBuf};

use base64::Engine;
use meshgate_ca::{CaDir, TrustDomain};
use meshgate_policy::schema::{GROUP, KindSchema, VERSION as API_VERSION};

use crate::yaml::{self, Node};

/// The mesh's namespace (shared contract of the Kubernetes manifests).
pub const NAMESPACE: &str = "meshgate";
/// The CA's Deployment, Service and ServiceAccount name.
pub const CA_NAME: &str = "meshgate-ca";
/// The CA's HTTPS port.
pub const CA_PORT: u16 = 15012;
/// The control plane's Deployment and (headless) Service name.
pub const CONTROL_PLANE_NAME: &str = "meshgate-control-plane";
/// The control plane's ServiceAccount: its SPIFFE ID is `spiffe://<td>/ns/meshgate/sa/control-plane`.
pub const CONTROL_PLANE_ACCOUNT: &str = "control-plane";
/// The control plane's stream port.
pub const CONTROL_PLANE_PORT: u16 = 15010;
/// The control plane's admin listener (loopback only: `/status` names every sidecar).
pub const CONTROL_PLANE_ADMIN: &str = "127.0.0.1:15011";
// Shared with injected pods: one definition of the bootstrap volume and its names.
pub use crate::kube::{
    BOOTSTRAP_DIR, CA_BUNDLE_CONFIGMAP, TOKEN_AUDIENCE, TOKEN_EXPIRATION_SECONDS,
};
/// The ConfigMap mounted as the control plane's policy directory.
pub const POLICIES_CONFIGMAP: &str = "meshgate-policies";
/// The API server's issuer on kubeadm and kind clusters (`--service-account-issuer`).
pub const DEFAULT_K8S_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// The image user (uid and gid) of the meshgate image (Dockerfile: `meshgate`, 65532).
pub const IMAGE_UID: u32 = 65532;
/// A ConfigMap holds at most 1 MiB (etcd's object limit), keys and values together.
const CONFIGMAP_MAX_BYTES: usize = 1024 * 1024;

const CA_DIR_IN_POD: &str = "/var/lib/meshgate/ca";
const CA_SECRET_IN_POD: &str = "/var/run/meshgate/ca-secret";
const POLICY_DIR_IN_POD: &str = "/etc/meshgate/policies";
const MESHGATE_IN_IMAGE: &str = "/usr/local/bin/meshgate";

/// Why the manifests could not be made. Each message names the cause and the fix.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// The CA directory cannot be used.
    #[error("--ca-dir {dir}: {source}")]
    Ca {
        dir: String,
        source: meshgate_ca::store::StoreError,
    },
    /// A fresh CA could not be created.
    #[error(
        "cannot create a CA in a temporary directory: {0}; pass --ca-dir with a CA from `meshgate ca init`"
    )]
    Generate(String),
    /// `--trust-domain` is not a trust domain.
    #[error("--trust-domain {value:?}: {reason}; use a lowercase DNS-like name such as mesh.local")]
    TrustDomain { value: String, reason: String },
    /// `--trust-domain` and the CA's disagree.
    #[error(
        "--trust-domain {given} but the CA in {dir} issues for {ca}; drop --trust-domain, or create a CA for {given} with `meshgate ca init --dir DIR --trust-domain {given}`"
    )]
    TrustDomainMismatch {
        given: String,
        ca: String,
        dir: String,
    },
    /// The policy directory is refused (the control plane would refuse it too).
    #[error(
        "--policy-dir {dir}: the policies are invalid, so the control plane would refuse them:\n{errors}\nfix them (check with `meshgate policy check {dir}`)"
    )]
    Policies { dir: String, errors: String },
    /// The policy directory cannot become one ConfigMap.
    #[error("--policy-dir {dir}: {reason}")]
    PolicyLayout { dir: String, reason: String },
    /// The CRD schemas could not be generated (a bug in the model's annotations).
    #[error(transparent)]
    Schema(#[from] meshgate_policy::schema::SchemaError),
    /// A setting cannot be used.
    #[error("{0}")]
    Invalid(String),
}

/// The CA files that go into the Secret `meshgate-ca`, and its trust domain and bundle.
#[derive(Clone)]
pub struct CaMaterial {
    trust_domain: TrustDomain,
    files: Vec<(&'static str, Vec<u8>)>,
    bundle_pem: String,
    generated: bool,
}

impl std::fmt::Debug for CaMaterial {
    /// Names the files, never their contents (keys).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaMaterial")
            .field("trust_domain", &self.trust_domain.to_string())
            .field(
                "files",
                &self.files.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
            )
            .field("generated", &self.generated)
            .finish()
    }
}

impl CaMaterial {
    /// The CA of a directory made by `meshgate ca init` (its root key is not copied).
    pub fn from_dir(dir: &Path) -> Result<Self, InstallError> {
        let err = |source| InstallError::Ca {
            dir: dir.display().to_string(),
            source,
        };
        let ca = CaDir::new(dir);
        let files = ca.serving_files().map_err(err)?;
        let trust_domain = ca.trust_domain().map_err(err)?;
        let bundle_pem = ca.read_bundle().map_err(err)?.to_pem();
        Ok(Self {
            trust_domain,
            files,
            bundle_pem,
            generated: false,
        })
    }

    /// A new CA, made exactly as `meshgate ca init` makes one, in a temporary directory that is
    /// deleted afterwards (like `linkerd install` generating its trust anchor): its keys then
    /// exist only in the manifests.
    pub fn generate(trust_domain: &str) -> Result<Self, InstallError> {
        let td = parse_trust_domain(trust_domain)?;
        let tmp = tempfile::tempdir().map_err(|e| InstallError::Generate(e.to_string()))?;
        let dir = tmp.path().join("ca");
        CaDir::new(&dir)
            .init(&td, false)
            .map_err(|e| InstallError::Generate(e.to_string()))?;
        let mut material = Self::from_dir(&dir)?;
        material.generated = true;
        Ok(material)
    }

    /// The CA's trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// True when [`CaMaterial::generate`] made it (its keys exist nowhere else).
    pub fn generated(&self) -> bool {
        self.generated
    }

    /// The trust bundle (PEM), as served at `/v1/bundle`.
    pub fn bundle_pem(&self) -> &str {
        &self.bundle_pem
    }
}

fn parse_trust_domain(value: &str) -> Result<TrustDomain, InstallError> {
    TrustDomain::new(value).map_err(|e| InstallError::TrustDomain {
        value: value.to_string(),
        reason: e.to_string(),
    })
}

/// Checks `--trust-domain` against the CA's (when given).
pub fn check_trust_domain(
    given: Option<&str>,
    ca: &CaMaterial,
    dir: &Path,
) -> Result<(), InstallError> {
    if let Some(given) = given {
        let td = parse_trust_domain(given)?;
        if &td != ca.trust_domain() {
            return Err(InstallError::TrustDomainMismatch {
                given: td.to_string(),
                ca: ca.trust_domain().to_string(),
                dir: dir.display().to_string(),
            });
        }
    }
    Ok(())
}

/// One file of the policy ConfigMap: its key (the file name in the mounted directory) and text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyFile {
    pub name: String,
    pub text: String,
}

/// The policy files of `dir` for the ConfigMap, after validating them as the control plane
/// will (refused as a whole, with `file:line`). ConfigMap keys are flat file names, so the
/// directory must be flat too. A `MeshConfig` naming another trust domain than the CA's is
/// refused: its policies' principals would name identities the CA never issues.
pub fn policy_files(dir: &Path, td: &TrustDomain) -> Result<Vec<PolicyFile>, InstallError> {
    let layout = |reason: String| InstallError::PolicyLayout {
        dir: dir.display().to_string(),
        reason,
    };
    let set = meshgate_policy::load_dir(dir).map_err(|e| InstallError::Policies {
        dir: dir.display().to_string(),
        errors: e.to_string(),
    })?;
    let declared = &set.mesh_config.spec.trust_domain;
    if set.mesh_config != meshgate_policy::model::MeshConfig::default()
        && declared != &td.to_string()
    {
        return Err(layout(format!(
            "its MeshConfig says trustDomain {declared}, but the CA issues for {td}; make them agree (set trustDomain: {td}, or install with a CA for {declared})"
        )));
    }
    let mut files = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| layout(format!("cannot read it: {e}")))?;
    for entry in entries {
        let entry = entry.map_err(|e| layout(format!("cannot read it: {e}")))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if name.starts_with('.') {
            continue;
        }
        if path.is_dir() {
            return Err(layout(format!(
                "{name}/ is a subdirectory, and a ConfigMap holds only flat file names; move its files up into {}",
                dir.display()
            )));
        }
        if !(name.ends_with(".yaml") || name.ends_with(".yml")) {
            continue;
        }
        if !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(layout(format!(
                "{name:?} cannot be a ConfigMap key (letters, digits, `-`, `_` and `.` only); rename the file"
            )));
        }
        let text = std::fs::read_to_string(&path)
            .map_err(|e| layout(format!("cannot read {name}: {e}")))?;
        files.push(PolicyFile { name, text });
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    if files.is_empty() {
        return Err(layout(
            "holds no *.yaml file; give a directory of policy files, or leave --policy-dir out for the example".into(),
        ));
    }
    let total: usize = files.iter().map(|f| f.name.len() + f.text.len()).sum();
    if total > CONFIGMAP_MAX_BYTES {
        return Err(layout(format!(
            "its files add up to {total} bytes, more than the 1 MiB a ConfigMap can hold; keep the policies under 1 MiB (e.g. drop comments) or serve a larger set from a volume you manage"
        )));
    }
    Ok(files)
}

/// The policy ConfigMap's default: the mesh-wide settings (deny by default) and one commented
/// example to copy.
pub fn example_policies(trust_domain: &TrustDomain) -> Vec<PolicyFile> {
    let text = format!(
        "# Mesh-wide settings: without an ALLOW policy a workload accepts nothing (zero trust).\n\
apiVersion: {GROUP}/{API_VERSION}\n\
kind: MeshConfig\n\
metadata: {{ name: default, namespace: meshgate }}\n\
spec: {{ defaultAction: DENY, trustDomain: {trust_domain} }}\n\
# An example to copy (edit the ConfigMap: `kubectl -n meshgate edit configmap meshgate-policies`):\n\
# let `web` in namespace `shop` read the orders API of the `orders` workload.\n\
#\n\
# ---\n\
# apiVersion: {GROUP}/{API_VERSION}\n\
# kind: AuthorizationPolicy\n\
# metadata: {{ name: orders-readers, namespace: shop }}\n\
# spec:\n\
#   selector: {{ account: orders }}\n\
#   action: ALLOW\n\
#   rules:\n\
#     - from: [{{ principals: [\"spiffe://{trust_domain}/ns/shop/sa/web\"] }}]\n\
#       to: [{{ methods: [\"GET\"], paths: [\"/orders/*\"] }}]\n"
    );
    vec![PolicyFile {
        name: "mesh.yaml".into(),
        text,
    }]
}

/// What `meshgate install` is told.
#[derive(Debug, Clone)]
pub struct InstallSettings {
    /// The meshgate image of both Deployments.
    pub image: String,
    /// Replicas of the control plane (at least 1; 2 for HA).
    pub control_plane_replicas: u32,
    /// The CA's keys and bundle.
    pub ca: CaMaterial,
    /// The API server's ServiceAccount token issuer (`iss` of projected tokens).
    pub k8s_issuer: String,
    /// The files of the policy ConfigMap.
    pub policies: Vec<PolicyFile>,
}

/// The objects of one install, each with the comment written above it.
struct Doc {
    comment: String,
    node: Node,
}

fn render(header: &str, docs: &[Doc]) -> String {
    let mut out = String::from(header);
    for (i, doc) in docs.iter().enumerate() {
        if i > 0 {
            out.push_str("---\n");
        }
        for line in doc.comment.lines() {
            out.push_str(if line.is_empty() { "#" } else { "# " });
            out.push_str(line);
            out.push('\n');
        }
        out.push_str(&yaml::emit(&doc.node));
    }
    out
}

/// The CustomResourceDefinitions alone (`meshgate install --crds-only`).
pub fn crds() -> Result<String, InstallError> {
    let header = format!(
        "# meshgate {} CustomResourceDefinitions (`meshgate install --crds-only`): the policy kinds of\n# group {GROUP}, schemas generated from the policy model.\n#\n",
        crate::VERSION
    );
    Ok(render(&header, &crd_docs()?))
}

fn crd_docs() -> Result<Vec<Doc>, InstallError> {
    Ok(meshgate_policy::schema::kinds()?
        .iter()
        .map(|k| Doc {
            comment: format!(
                "{kind} ({GROUP}/{API_VERSION}): the API server refuses a document whose shape is wrong\n\
(unknown field, wrong type, bad enum value). The control plane reads its policies from the\n\
ConfigMap {POLICIES_CONFIGMAP}, not from these objects: they validate policy files server-side\n\
(`kubectl apply --dry-run=server -f policy.yaml`); `meshgate policy check` judges their meaning.",
                kind = k.kind
            ),
            node: crd(k),
        })
        .collect())
}

/// A CRD for one policy kind.
fn crd(k: &KindSchema) -> Node {
    Node::map([
        ("apiVersion", Node::str("apiextensions.k8s.io/v1")),
        ("kind", Node::str("CustomResourceDefinition")),
        (
            "metadata",
            Node::map([("name", Node::str(k.crd_name())), ("labels", labels(None))]),
        ),
        (
            "spec",
            Node::map([
                ("group", Node::str(GROUP)),
                ("scope", Node::str("Namespaced")),
                (
                    "names",
                    Node::map([
                        ("kind", Node::str(k.kind)),
                        ("listKind", Node::str(format!("{}List", k.kind))),
                        ("plural", Node::str(k.plural)),
                        ("singular", Node::str(k.singular())),
                        ("shortNames", Node::str_seq(k.short_names.iter().copied())),
                        ("categories", Node::str_seq(["meshgate"])),
                    ]),
                ),
                (
                    "versions",
                    Node::Seq(vec![Node::map([
                        ("name", Node::str(API_VERSION)),
                        ("served", Node::bool(true)),
                        ("storage", Node::bool(true)),
                        (
                            "schema",
                            Node::map([("openAPIV3Schema", json_to_node(&k.document()))]),
                        ),
                    ])]),
                ),
            ]),
        ),
    ])
}

/// A JSON value as a YAML tree (object keys in serde_json's order, which is sorted).
fn json_to_node(v: &serde_json::Value) -> Node {
    use serde_json::Value;
    match v {
        Value::Null => Node::Scalar(yaml::Scalar {
            text: "null".into(),
            style: yaml::Style::Plain,
        }),
        Value::Bool(b) => Node::bool(*b),
        Value::Number(n) => Node::int(n),
        Value::String(s) => Node::str(s.clone()),
        Value::Array(items) => Node::Seq(items.iter().map(json_to_node).collect()),
        Value::Object(map) => {
            Node::Map(map.iter().map(|(k, v)| (key(k), json_to_node(v))).collect())
        }
    }
}

/// A mapping key, quoted only when it has to be.
fn key(k: &str) -> yaml::Scalar {
    yaml::Scalar {
        text: k.to_string(),
        style: yaml::Style::Auto,
    }
}

/// The standard labels; `component` names the part.
fn labels(component: Option<&str>) -> Node {
    let mut entries = Vec::new();
    if let Some(c) = component {
        entries.push(("app.kubernetes.io/name", Node::str(c)));
        entries.push(("app.kubernetes.io/component", Node::str(c)));
    }
    entries.push(("app.kubernetes.io/part-of", Node::str("meshgate")));
    entries.push(("app.kubernetes.io/version", Node::str(crate::VERSION)));
    entries.push((
        "app.kubernetes.io/managed-by",
        Node::str("meshgate-install"),
    ));
    Node::map(entries)
}

fn metadata(name: &str, component: Option<&str>) -> Node {
    Node::map([
        ("name", Node::str(name)),
        ("namespace", Node::str(NAMESPACE)),
        ("labels", labels(component)),
    ])
}

fn selector(name: &str) -> Node {
    Node::map([("app.kubernetes.io/name", Node::str(name))])
}

/// The restricted Pod Security profile, per container.
fn container_security() -> Node {
    Node::map([
        ("allowPrivilegeEscalation", Node::bool(false)),
        ("readOnlyRootFilesystem", Node::bool(true)),
        ("runAsNonRoot", Node::bool(true)),
        (
            "capabilities",
            Node::map([("drop", Node::str_seq(["ALL"]))]),
        ),
        (
            "seccompProfile",
            Node::map([("type", Node::str("RuntimeDefault"))]),
        ),
    ])
}

/// The pod-level security context: the image's non-root user; `fsGroup` makes the mounted
/// Secret and projected token readable by that user (group read) and nobody else.
fn pod_security() -> Node {
    Node::map([
        ("runAsNonRoot", Node::bool(true)),
        ("runAsUser", Node::int(IMAGE_UID)),
        ("runAsGroup", Node::int(IMAGE_UID)),
        ("fsGroup", Node::int(IMAGE_UID)),
        (
            "seccompProfile",
            Node::map([("type", Node::str("RuntimeDefault"))]),
        ),
    ])
}

fn resources(cpu: &str, memory: &str, memory_limit: &str) -> Node {
    Node::map([
        (
            "requests",
            Node::map([("cpu", Node::str(cpu)), ("memory", Node::str(memory))]),
        ),
        ("limits", Node::map([("memory", Node::str(memory_limit))])),
    ])
}

fn mount(name: &str, path: &str, read_only: bool) -> Node {
    Node::map([
        ("name", Node::str(name)),
        ("mountPath", Node::str(path)),
        ("readOnly", Node::bool(read_only)),
    ])
}

fn exec_probe(url: &str, period: u32, failures: u32) -> Node {
    Node::map([
        (
            "exec",
            Node::map([(
                "command",
                Node::str_seq([MESHGATE_IN_IMAGE, "health", "--timeout", "2s", url]),
            )]),
        ),
        ("periodSeconds", Node::int(period)),
        ("timeoutSeconds", Node::int(3)),
        ("failureThreshold", Node::int(failures)),
    ])
}

fn https_probe(period: u32, failures: u32) -> Node {
    Node::map([
        (
            "httpGet",
            Node::map([
                ("path", Node::str("/healthz")),
                ("port", Node::int(CA_PORT)),
                ("scheme", Node::str("HTTPS")),
            ]),
        ),
        ("periodSeconds", Node::int(period)),
        ("timeoutSeconds", Node::int(3)),
        ("failureThreshold", Node::int(failures)),
    ])
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The whole install: namespace, CRDs, CA and control plane.
pub fn manifests(s: &InstallSettings) -> Result<String, InstallError> {
    if s.control_plane_replicas == 0 {
        return Err(InstallError::Invalid(
            "--control-plane-replicas 0 would leave no control plane; use 1, or 2 and more for high availability".into(),
        ));
    }
    if !(s.k8s_issuer.starts_with("https://") || s.k8s_issuer.starts_with("http://")) {
        return Err(InstallError::Invalid(format!(
            "--k8s-issuer {:?} is not a URL; give the API server's --service-account-issuer, e.g. {DEFAULT_K8S_ISSUER} (see `kubectl get --raw /.well-known/openid-configuration`)",
            s.k8s_issuer
        )));
    }
    let td = s.ca.trust_domain();
    let header = format!(
        "# meshgate {version}: the mesh's CA and control plane in namespace {NAMESPACE}, and the CRDs of the\n\
# policy kinds (`meshgate install`; trust domain {td}). Apply with\n\
#   meshgate install | kubectl apply --server-side -f -\n\
# This output holds the CA's signing keys (Secret {CA_NAME}): keep it like a private key.\n#\n",
        version = crate::VERSION
    );
    let mut docs = vec![Doc {
        comment: "The mesh's namespace. Pod Security `restricted` is enforced: both Deployments run non-root,\n\
with a read-only root filesystem, no privilege escalation, no capabilities and RuntimeDefault seccomp."
            .into(),
        node: Node::map([
            ("apiVersion", Node::str("v1")),
            ("kind", Node::str("Namespace")),
            (
                "metadata",
                Node::map([
                    ("name", Node::str(NAMESPACE)),
                    (
                        "labels",
                        Node::map([
                            ("pod-security.kubernetes.io/enforce", Node::str("restricted")),
                            ("app.kubernetes.io/part-of", Node::str("meshgate")),
                            ("app.kubernetes.io/managed-by", Node::str("meshgate-install")),
                        ]),
                    ),
                ]),
            ),
        ]),
    }];
    docs.extend(crd_docs()?);
    docs.extend(ca_docs(s));
    docs.extend(control_plane_docs(s));
    Ok(render(&header, &docs))
}

fn service_account(name: &str, component: &str, automount: bool) -> Node {
    Node::map([
        ("apiVersion", Node::str("v1")),
        ("kind", Node::str("ServiceAccount")),
        ("metadata", metadata(name, Some(component))),
        ("automountServiceAccountToken", Node::bool(automount)),
    ])
}

fn ca_docs(s: &InstallSettings) -> Vec<Doc> {
    let secret_data = Node::Map(
        s.ca.files
            .iter()
            .map(|(name, bytes)| (key(name), Node::str(b64(bytes))))
            .collect(),
    );
    let in_cluster_names = [
        CA_NAME.to_string(),
        format!("{CA_NAME}.{NAMESPACE}"),
        format!("{CA_NAME}.{NAMESPACE}.svc"),
        format!("{CA_NAME}.{NAMESPACE}.svc.cluster.local"),
    ];
    let mut args = vec![
        "ca".to_string(),
        "serve".into(),
        "--dir".into(),
        CA_DIR_IN_POD.into(),
        "--listen".into(),
        format!("0.0.0.0:{CA_PORT}"),
    ];
    for name in &in_cluster_names {
        args.push("--san".into());
        args.push(name.clone());
    }
    args.extend([
        "--k8s-issuer".into(),
        s.k8s_issuer.clone(),
        "--k8s-audience".into(),
        TOKEN_AUDIENCE.into(),
    ]);
    // `install` from the image's coreutils: the Secret's files are group-readable (fsGroup), and
    // `ca serve` refuses key files anyone but their owner can read, and needs a writable
    // directory (ledger of spent join tokens, rotation).
    let mut copy = vec!["install".to_string(), "-m".into(), "0600".into()];
    copy.extend(
        s.ca.files
            .iter()
            .map(|(name, _)| format!("{CA_SECRET_IN_POD}/{name}")),
    );
    copy.push(format!("{CA_DIR_IN_POD}/"));

    let pod = Node::map([
        ("serviceAccountName", Node::str(CA_NAME)),
        // Its own token: for fetching the API server's OIDC discovery document and JWKS.
        ("automountServiceAccountToken", Node::bool(true)),
        ("enableServiceLinks", Node::bool(false)),
        ("securityContext", pod_security()),
        (
            "initContainers",
            Node::Seq(vec![Node::map([
                ("name", Node::str("copy-ca-keys")),
                ("image", Node::str(&s.image)),
                ("command", Node::str_seq(copy)),
                ("securityContext", container_security()),
                ("resources", resources("10m", "16Mi", "32Mi")),
                (
                    "volumeMounts",
                    Node::Seq(vec![
                        mount("ca-secret", CA_SECRET_IN_POD, true),
                        mount("ca-state", CA_DIR_IN_POD, false),
                    ]),
                ),
            ])]),
        ),
        (
            "containers",
            Node::Seq(vec![Node::map([
                ("name", Node::str("ca")),
                ("image", Node::str(&s.image)),
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
                    Node::Seq(vec![Node::map([
                        ("name", Node::str("https")),
                        ("containerPort", Node::int(CA_PORT)),
                        ("protocol", Node::str("TCP")),
                    ])]),
                ),
                ("readinessProbe", https_probe(5, 3)),
                ("livenessProbe", https_probe(10, 6)),
                ("securityContext", container_security()),
                ("resources", resources("50m", "32Mi", "128Mi")),
                (
                    "volumeMounts",
                    Node::Seq(vec![mount("ca-state", CA_DIR_IN_POD, false)]),
                ),
            ])]),
        ),
        (
            "volumes",
            Node::Seq(vec![
                Node::map([
                    ("name", Node::str("ca-secret")),
                    (
                        "secret",
                        Node::map([
                            ("secretName", Node::str(CA_NAME)),
                            // 0440: the owner (root) and fsGroup may read, nobody else.
                            ("defaultMode", Node::int(0o440)),
                        ]),
                    ),
                ]),
                Node::map([
                    ("name", Node::str("ca-state")),
                    ("emptyDir", Node::map([("sizeLimit", Node::str("16Mi"))])),
                ]),
            ]),
        ),
    ]);

    vec![
        Doc {
            comment: "The CA's identity in the cluster; its token reads the API server's OIDC discovery and keys.".into(),
            node: service_account(CA_NAME, CA_NAME, true),
        },
        Doc {
            comment: "Least privilege: the CA verifies projected ServiceAccount tokens against the keys the API\n\
server publishes (`/.well-known/openid-configuration` and its JWKS). The built-in ClusterRole\n\
system:service-account-issuer-discovery allows exactly that (GET on those two non-resource\n\
URLs) and nothing else. Most clusters already grant it to every ServiceAccount; this binding\n\
makes it explicit. No TokenReview, no Secrets, no Pods."
                .into(),
            node: Node::map([
                ("apiVersion", Node::str("rbac.authorization.k8s.io/v1")),
                ("kind", Node::str("ClusterRoleBinding")),
                (
                    "metadata",
                    Node::map([
                        ("name", Node::str("meshgate-ca-service-account-issuer-discovery")),
                        ("labels", labels(Some(CA_NAME))),
                    ]),
                ),
                (
                    "roleRef",
                    Node::map([
                        ("apiGroup", Node::str("rbac.authorization.k8s.io")),
                        ("kind", Node::str("ClusterRole")),
                        ("name", Node::str("system:service-account-issuer-discovery")),
                    ]),
                ),
                (
                    "subjects",
                    Node::Seq(vec![Node::map([
                        ("kind", Node::str("ServiceAccount")),
                        ("name", Node::str(CA_NAME)),
                        ("namespace", Node::str(NAMESPACE)),
                    ])]),
                ),
            ]),
        },
        Doc {
            comment: format!(
                "The CA's signing material, as `meshgate ca serve` reads it: ca.json (trust domain), the\n\
intermediate certificate and key, the join-token secret, the bundle and the root certificate.\n\
Not the root key: serving and `meshgate ca rotate` never need it.{}",
                if s.ca.generated {
                    " This CA was generated by `meshgate install`;\nits keys exist only in this output (re-running install makes a different CA: pass --ca-dir to keep one)."
                } else {
                    ""
                }
            ),
            node: Node::map([
                ("apiVersion", Node::str("v1")),
                ("kind", Node::str("Secret")),
                ("metadata", metadata(CA_NAME, Some(CA_NAME))),
                ("type", Node::str("Opaque")),
                ("data", secret_data),
            ]),
        },
        Doc {
            comment: format!(
                "The trust bundle (the CA's roots): mounted next to every projected token as\n\
{BOOTSTRAP_DIR}/ca-bundle.pem, so sidecars and the control plane can verify the CA."
            ),
            node: Node::map([
                ("apiVersion", Node::str("v1")),
                ("kind", Node::str("ConfigMap")),
                ("metadata", metadata(CA_BUNDLE_CONFIGMAP, Some(CA_NAME))),
                (
                    "data",
                    Node::map([("ca-bundle.pem", Node::str(s.ca.bundle_pem()))]),
                ),
            ]),
        },
        Doc {
            comment: format!("The CA's HTTPS API (SVIDs for tokens, renewals, the bundle): https://{CA_NAME}.{NAMESPACE}.svc:{CA_PORT}."),
            node: Node::map([
                ("apiVersion", Node::str("v1")),
                ("kind", Node::str("Service")),
                ("metadata", metadata(CA_NAME, Some(CA_NAME))),
                (
                    "spec",
                    Node::map([
                        ("type", Node::str("ClusterIP")),
                        ("selector", selector(CA_NAME)),
                        (
                            "ports",
                            Node::Seq(vec![Node::map([
                                ("name", Node::str("https")),
                                ("port", Node::int(CA_PORT)),
                                ("targetPort", Node::str("https")),
                                ("protocol", Node::str("TCP")),
                            ])]),
                        ),
                    ]),
                ),
            ]),
        },
        Doc {
            comment: format!(
                "The CA: one replica (Recreate, never two at once). Its directory is an emptyDir filled from\n\
the Secret by the init container: `ca serve` writes there (the ledger of spent single-use join\n\
tokens). A restarted pod starts a new ledger, so a single-use join token could be used once\n\
more within its lifetime; ServiceAccount tokens ({TOKEN_EXPIRATION_SECONDS} s, bound to their pod) do not depend on it.\n\
Probes: GET /healthz over HTTPS (the kubelet does not verify the certificate)."
            ),
            node: Node::map([
                ("apiVersion", Node::str("apps/v1")),
                ("kind", Node::str("Deployment")),
                ("metadata", metadata(CA_NAME, Some(CA_NAME))),
                (
                    "spec",
                    Node::map([
                        ("replicas", Node::int(1)),
                        ("strategy", Node::map([("type", Node::str("Recreate"))])),
                        (
                            "selector",
                            Node::map([("matchLabels", selector(CA_NAME))]),
                        ),
                        (
                            "template",
                            Node::map([
                                ("metadata", Node::map([("labels", labels(Some(CA_NAME)))])),
                                ("spec", pod),
                            ]),
                        ),
                    ]),
                ),
            ]),
        },
    ]
}

fn control_plane_docs(s: &InstallSettings) -> Vec<Doc> {
    let ca_url = format!("https://{CA_NAME}.{NAMESPACE}.svc:{CA_PORT}");
    let args = [
        "control-plane".to_string(),
        "serve".into(),
        "--policy-dir".into(),
        POLICY_DIR_IN_POD.into(),
        "--listen".into(),
        format!("0.0.0.0:{CONTROL_PLANE_PORT}"),
        "--admin".into(),
        CONTROL_PLANE_ADMIN.into(),
        "--ca".into(),
        ca_url,
        "--ca-bundle".into(),
        format!("{BOOTSTRAP_DIR}/ca-bundle.pem"),
        "--token-file".into(),
        format!("{BOOTSTRAP_DIR}/token"),
    ];
    let admin = |path: &str| format!("http://{CONTROL_PLANE_ADMIN}{path}");
    let pod = Node::map([
        ("serviceAccountName", Node::str(CONTROL_PLANE_ACCOUNT)),
        // No API token: the control plane reads only its mounted files.
        ("automountServiceAccountToken", Node::bool(false)),
        ("enableServiceLinks", Node::bool(false)),
        ("securityContext", pod_security()),
        (
            "affinity",
            Node::map([(
                "podAntiAffinity",
                Node::map([(
                    "preferredDuringSchedulingIgnoredDuringExecution",
                    Node::Seq(vec![Node::map([
                        ("weight", Node::int(100)),
                        (
                            "podAffinityTerm",
                            Node::map([
                                ("topologyKey", Node::str("kubernetes.io/hostname")),
                                (
                                    "labelSelector",
                                    Node::map([("matchLabels", selector(CONTROL_PLANE_NAME))]),
                                ),
                            ]),
                        ),
                    ])]),
                )]),
            )]),
        ),
        (
            "containers",
            Node::Seq(vec![Node::map([
                ("name", Node::str("control-plane")),
                ("image", Node::str(&s.image)),
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
                    Node::Seq(vec![Node::map([
                        ("name", Node::str("xds-lite")),
                        ("containerPort", Node::int(CONTROL_PLANE_PORT)),
                        ("protocol", Node::str("TCP")),
                    ])]),
                ),
                // Until its SVID arrives from the CA the admin listener is not up: up to 2 min.
                ("startupProbe", exec_probe(&admin("/live"), 2, 60)),
                ("livenessProbe", exec_probe(&admin("/live"), 10, 3)),
                // Ready = a valid policy set is loaded; a not-ready replica leaves the headless
                // Service's DNS answer.
                ("readinessProbe", exec_probe(&admin("/ready"), 5, 2)),
                ("securityContext", container_security()),
                ("resources", resources("100m", "64Mi", "512Mi")),
                (
                    "volumeMounts",
                    Node::Seq(vec![
                        mount("policies", POLICY_DIR_IN_POD, true),
                        mount("bootstrap", BOOTSTRAP_DIR, true),
                    ]),
                ),
            ])]),
        ),
        (
            "volumes",
            Node::Seq(vec![
                Node::map([
                    ("name", Node::str("policies")),
                    (
                        "configMap",
                        Node::map([("name", Node::str(POLICIES_CONFIGMAP))]),
                    ),
                ]),
                Node::map([
                    ("name", Node::str("bootstrap")),
                    (
                        "projected",
                        Node::map([
                            // 0440 with fsGroup: readable by the image user only.
                            ("defaultMode", Node::int(0o440)),
                            ("sources", crate::kube::bootstrap_sources()),
                        ]),
                    ),
                ]),
            ]),
        ),
    ]);
    let policies = Node::Map(
        s.policies
            .iter()
            .map(|f| (key(&f.name), Node::str(f.text.clone())))
            .collect(),
    );
    vec![
        Doc {
            comment: format!(
                "The control plane's identity: spiffe://{}/ns/{NAMESPACE}/sa/{CONTROL_PLANE_ACCOUNT}, the only\n\
one sidecars accept for the policy stream. It needs no Kubernetes API access, so it has no\n\
Role, no RoleBinding and no API token: it gets its SVID from the CA with a projected token\n\
(audience {TOKEN_AUDIENCE}) and reads its policies from a mounted ConfigMap.",
                s.ca.trust_domain()
            ),
            node: service_account(CONTROL_PLANE_ACCOUNT, CONTROL_PLANE_NAME, false),
        },
        Doc {
            comment: String::from(
                "The policy directory of the control plane (one key per file). Edit it and every replica picks\n\
the change up within about a minute (the kubelet's sync) and pushes it to the sidecars; an\n\
invalid edit is refused with file:line in the control plane's log and `meshgate status`, and\n\
the last good policy stays in force. Check an edit first: `meshgate policy check DIR`."
            ),
            node: Node::map([
                ("apiVersion", Node::str("v1")),
                ("kind", Node::str("ConfigMap")),
                ("metadata", metadata(POLICIES_CONFIGMAP, Some(CONTROL_PLANE_NAME))),
                ("data", policies),
            ]),
        },
        Doc {
            comment: format!(
                "Headless: DNS returns every ready replica, and sidecars (`--control-plane\n\
https://{CONTROL_PLANE_NAME}.{NAMESPACE}.svc:{CONTROL_PLANE_PORT}`) fail over between them."
            ),
            node: Node::map([
                ("apiVersion", Node::str("v1")),
                ("kind", Node::str("Service")),
                ("metadata", metadata(CONTROL_PLANE_NAME, Some(CONTROL_PLANE_NAME))),
                (
                    "spec",
                    Node::map([
                        ("clusterIP", Node::str("None")),
                        ("selector", selector(CONTROL_PLANE_NAME)),
                        (
                            "ports",
                            Node::Seq(vec![Node::map([
                                ("name", Node::str("xds-lite")),
                                ("port", Node::int(CONTROL_PLANE_PORT)),
                                ("targetPort", Node::str("xds-lite")),
                                ("protocol", Node::str("TCP")),
                            ])]),
                        ),
                    ]),
                ),
            ]),
        },
        Doc {
            comment: "The control plane. Probes run `meshgate health` inside the container: the admin listener\n\
(/status names every sidecar) stays on loopback.".into(),
            node: Node::map([
                ("apiVersion", Node::str("apps/v1")),
                ("kind", Node::str("Deployment")),
                ("metadata", metadata(CONTROL_PLANE_NAME, Some(CONTROL_PLANE_NAME))),
                (
                    "spec",
                    Node::map([
                        ("replicas", Node::int(s.control_plane_replicas)),
                        (
                            "strategy",
                            Node::map([
                                ("type", Node::str("RollingUpdate")),
                                (
                                    "rollingUpdate",
                                    Node::map([
                                        ("maxUnavailable", Node::int(0)),
                                        ("maxSurge", Node::int(1)),
                                    ]),
                                ),
                            ]),
                        ),
                        (
                            "selector",
                            Node::map([("matchLabels", selector(CONTROL_PLANE_NAME))]),
                        ),
                        (
                            "template",
                            Node::map([
                                (
                                    "metadata",
                                    Node::map([("labels", labels(Some(CONTROL_PLANE_NAME)))]),
                                ),
                                ("spec", pod),
                            ]),
                        ),
                    ]),
                ),
            ]),
        },
        Doc {
            comment: "A voluntary disruption (node drain, upgrade) keeps at least one replica serving.".into(),
            node: Node::map([
                ("apiVersion", Node::str("policy/v1")),
                ("kind", Node::str("PodDisruptionBudget")),
                ("metadata", metadata(CONTROL_PLANE_NAME, Some(CONTROL_PLANE_NAME))),
                (
                    "spec",
                    Node::map([
                        ("minAvailable", Node::int(1)),
                        (
                            "selector",
                            Node::map([("matchLabels", selector(CONTROL_PLANE_NAME))]),
                        ),
                    ]),
                ),
            ]),
        },
    ]
}

/// Where [`write`] puts the manifests.
pub fn write(output: Option<&PathBuf>, text: &str) -> Result<(), std::io::Error> {
    match output {
        // 0600: the manifests hold the CA's keys.
        Some(path) => meshgate_ca::fsutil::write_atomic(path, text.as_bytes(), 0o600),
        None => {
            use std::io::Write;
            std::io::stdout().write_all(text.as_bytes())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> InstallSettings {
        let ca = CaMaterial::generate("mesh.local").unwrap();
        InstallSettings {
            image: "meshgate:local".into(),
            control_plane_replicas: 2,
            policies: example_policies(ca.trust_domain()),
            ca,
            k8s_issuer: DEFAULT_K8S_ISSUER.into(),
        }
    }

    #[test]
    fn the_example_policy_loads_and_the_output_parses_back() {
        let s = settings();
        let dir = tempfile::tempdir().unwrap();
        for f in &s.policies {
            std::fs::write(dir.path().join(&f.name), &f.text).unwrap();
        }
        meshgate_policy::load_dir(dir.path()).unwrap();
        let text = manifests(&s).unwrap();
        // Every document reads back; the policy files and the bundle come back byte for byte.
        let docs: Vec<Node> = text
            .split("\n---\n")
            .map(|d| yaml::parse(d).unwrap_or_else(|e| panic!("{e}\n{d}")))
            .collect();
        let cm = docs
            .iter()
            .find(|d| {
                d.path(&["metadata", "name"]).and_then(Node::as_str) == Some(POLICIES_CONFIGMAP)
            })
            .unwrap();
        assert_eq!(
            cm.path(&["data", "mesh.yaml"]).and_then(Node::as_str),
            Some(s.policies[0].text.as_str())
        );
        let bundle = docs
            .iter()
            .find(|d| {
                d.path(&["metadata", "name"]).and_then(Node::as_str) == Some(CA_BUNDLE_CONFIGMAP)
            })
            .unwrap();
        assert_eq!(
            bundle
                .path(&["data", "ca-bundle.pem"])
                .and_then(Node::as_str),
            Some(s.ca.bundle_pem())
        );
        // The root key never leaves the CA directory.
        assert!(!text.contains("root.key"), "root key in the output");
        assert!(s.ca.files.iter().all(|(n, _)| *n != "root.key"));
    }

    #[test]
    fn a_ca_directory_is_copied_without_its_root_key_and_only_when_its_keys_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ca");
        let td = TrustDomain::new("corp.example").unwrap();
        CaDir::new(&dir).init(&td, false).unwrap();
        let ca = CaMaterial::from_dir(&dir).unwrap();
        assert_eq!(ca.trust_domain(), &td);
        assert!(!ca.generated());
        let names: Vec<&str> = ca.files.iter().map(|(n, _)| *n).collect();
        for needed in [
            "ca.json",
            "intermediate.pem",
            "intermediate.key",
            "token.key",
            "bundle.pem",
        ] {
            assert!(names.contains(&needed), "{names:?}");
        }
        assert!(!names.contains(&"root.key"), "{names:?}");
        assert!(
            !format!("{ca:?}").contains("PRIVATE KEY"),
            "Debug prints no key"
        );
        // --trust-domain must agree with the CA.
        let err = check_trust_domain(Some("mesh.local"), &ca, &dir)
            .unwrap_err()
            .to_string();
        assert!(err.contains("drop --trust-domain"), "{err}");
        check_trust_domain(Some("corp.example"), &ca, &dir).unwrap();
        check_trust_domain(None, &ca, &dir).unwrap();
        // A CA whose signing key others can read is refused, as `ca serve` would refuse it.
        let key = dir.join("intermediate.key");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = CaMaterial::from_dir(&dir).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
        // No CA at all: the error names `ca init`.
        let err = CaMaterial::from_dir(&tmp.path().join("none"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("meshgate ca init"), "{err}");
    }

    #[test]
    fn refusals_name_the_fix() {
        let mut s = settings();
        s.control_plane_replicas = 0;
        assert!(manifests(&s).unwrap_err().to_string().contains("use 1"));
        let mut s = settings();
        s.k8s_issuer = "kubernetes.default".into();
        assert!(
            manifests(&s)
                .unwrap_err()
                .to_string()
                .contains("openid-configuration")
        );
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("nested")).unwrap();
        std::fs::write(
            dir.path().join("nested/a.yaml"),
            "apiVersion: meshgate.dev/v1\nkind: MeshConfig\nmetadata: { name: default, namespace: meshgate }\nspec: {}\n",
        )
        .unwrap();
        let td = TrustDomain::new("mesh.local").unwrap();
        let err = policy_files(dir.path(), &td).unwrap_err().to_string();
        assert!(err.contains("move its files up"), "{err}");
        std::fs::write(dir.path().join("bad.yaml"), "apiVersion: meshgate.dev/v1\nkind: AuthorizationPolicy\nmetadata: { name: x, namespace: shop }\nspec:\n  action: PERMIT\n").unwrap();
        let err = policy_files(dir.path(), &td).unwrap_err().to_string();
        assert!(err.contains("bad.yaml:5"), "{err}");
        assert!(err.contains("meshgate policy check"), "{err}");
        std::fs::remove_dir_all(dir.path().join("nested")).unwrap();
        std::fs::remove_file(dir.path().join("bad.yaml")).unwrap();
        std::fs::write(
            dir.path().join("mesh.yaml"),
            "apiVersion: meshgate.dev/v1\nkind: MeshConfig\nmetadata: { name: default, namespace: meshgate }\nspec: { trustDomain: corp.example }\n",
        )
        .unwrap();
        let err = policy_files(dir.path(), &td).unwrap_err().to_string();
        assert!(
            err.contains("trustDomain corp.example") && err.contains("mesh.local"),
            "{err}"
        );
        let corp = TrustDomain::new("corp.example").unwrap();
        assert_eq!(policy_files(dir.path(), &corp).unwrap().len(), 1);
    }
}
