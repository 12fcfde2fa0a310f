//! meshgate-inject: adds the meshgate sidecar, the eBPF redirect and the identity bootstrap to
//! docker-compose files or Kubernetes manifests (like `linkerd inject` / `istioctl kube-inject`).
//!
//! It is the library behind `meshgate inject` and is meant for any other caller that injects
//! workloads, such as a future Kubernetes admission webhook: [`inject_text`] transforms a text in
//! memory; [`run`] does what the CLI does (read a file or stdin, inject, write or diff).
//!
//! The whole input is read and transformed in memory before anything is written, so a refusal
//! (something inject does not understand) leaves no half-written output. Documents that need no
//! change are copied byte for byte (comments included); in a changed document (a compose file, a
//! Kubernetes workload) every mapping entry inject leaves alone — a compose service, a top-level
//! key, a container's unrelated settings — is copied byte for byte too (`verbatim`), and only
//! changed or added entries are emitted from the order-preserving tree (`yaml`).

#![forbid(unsafe_code)]

mod compose;
pub mod install;
mod kube;
mod verbatim;
mod yaml;

use std::io::{Read, Write};
use std::path::PathBuf;

use yaml::Node;

/// The crate version written into `meshgate.io/injected`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The meshgate image used when none is given.
pub const DEFAULT_IMAGE: &str = "meshgate:local";

/// The SPIFFE trust domain used when none is given.
pub const DEFAULT_TRUST_DOMAIN: &str = "mesh.local";

/// Why inject refused or failed. Each message names the object and how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    /// Reading the input or writing the output failed.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// "read" or "write".
        action: &'static str,
        /// The file (or stdin/stdout).
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The input is not YAML inject can read.
    #[error(
        "{input}: {detail}; fix: make it valid YAML without custom tags (check with `kubectl apply --dry-run=client` or `docker compose config`)"
    )]
    Yaml {
        /// The input's name.
        input: String,
        /// The parser's message.
        detail: String,
    },
    /// The input is neither a compose file nor Kubernetes manifests.
    #[error(
        "{input}: cannot tell what this is; fix: pass a docker-compose file (with a top-level `services:` map) or Kubernetes manifests (documents with `apiVersion` and `kind`)"
    )]
    UnknownFormat {
        /// The input's name.
        input: String,
    },
    /// Something inject does not handle (or handle safely) in one object.
    #[error("{object}: {reason}; fix: {fix}")]
    Refused {
        /// The object, e.g. `DaemonSet/agent` or `compose service web`.
        object: String,
        /// What is wrong.
        reason: String,
        /// What the user can do.
        fix: String,
    },
}

impl InjectError {
    fn refused(
        object: impl Into<String>,
        reason: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        InjectError::Refused {
            object: object.into(),
            reason: reason.into(),
            fix: fix.into(),
        }
    }
}

/// Where the injected workloads find the mesh, and what they run.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The meshgate image.
    pub image: String,
    /// SPIFFE trust domain.
    pub trust_domain: String,
    /// CA URL override.
    pub ca_url: Option<String>,
    /// Control-plane URL override.
    pub control_plane_url: Option<String>,
    /// The sidecar's worker threads (`MESHGATE_WORKER_THREADS`) unless a workload's
    /// [`WORKER_THREADS_KEY`] annotation (Kubernetes) or label (compose) says otherwise.
    pub worker_threads: u16,
    /// Kubernetes only: the cluster's address ranges and egress.
    pub kube: KubeSettings,
}

/// The injected sidecar's default worker threads: one, which runs the sidecar on Tokio's
/// current-thread scheduler (the cheapest per request: BENCHMARKS.md, thirteenth session), as
/// Linkerd runs its proxies by default and unlike a bare `meshgate proxy`, which takes every
/// CPU its process may use. A pod has no CPU limit unless its owner sets one, so without this
/// default a sidecar would start one thread per CPU of its node, to serve one pod.
pub const DEFAULT_WORKER_THREADS: u16 = 1;
/// The annotation (Kubernetes) or label (compose) that sets one workload's sidecar threads.
pub const WORKER_THREADS_KEY: &str = "meshgate.io/proxy-worker-threads";
/// The range `meshgate proxy --worker-threads` accepts.
pub const WORKER_THREADS_RANGE: std::ops::RangeInclusive<u16> = 1..=1024;

/// A workload's sidecar threads: `value` of its [`WORKER_THREADS_KEY`] annotation or label
/// (`what` names which), or the default of `s`. Checked here, so that a typo fails at inject
/// time instead of as a sidecar that refuses to start.
pub(crate) fn worker_threads(
    object: &str,
    what: &str,
    value: Option<&str>,
    s: &Settings,
) -> Result<u16, InjectError> {
    let Some(value) = value else {
        return Ok(s.worker_threads);
    };
    value
        .trim()
        .parse::<u16>()
        .ok()
        .filter(|n| WORKER_THREADS_RANGE.contains(n))
        .ok_or_else(|| {
            InjectError::refused(
                object,
                format!("{what} {WORKER_THREADS_KEY} is {value:?}, not a number of threads from 1 to 1024"),
                format!(
                    "set it to the sidecar's worker threads, e.g. \"2\" (and give the sidecar a CPU limit to match), or remove it for the default ({})",
                    s.worker_threads
                ),
            )
        })
}

/// What injection needs to know about the Kubernetes cluster.
#[derive(Debug, Clone)]
pub struct KubeSettings {
    /// Pod address ranges: redirected through the sidecar (kubeadm/kind: 10.244.0.0/16).
    pub pod_cidrs: Vec<String>,
    /// Service (ClusterIP) ranges: redirected through the sidecar (kubeadm/kind: 10.96.0.0/12).
    pub service_cidrs: Vec<String>,
    /// The cluster's DNS domain (`cluster.local`).
    pub cluster_domain: String,
    /// Egress allowlist outside the cluster's ranges (CIDR[:PORT]); empty: everything outside
    /// the cluster's ranges goes direct.
    pub egress_allow: Vec<String>,
    /// The CA bundle (PEM): when set, a ConfigMap `meshgate-ca-bundle` is added for every
    /// namespace with injected pods that the input does not already carry one for.
    pub ca_bundle: Option<String>,
}

impl Default for KubeSettings {
    fn default() -> Self {
        KubeSettings {
            pod_cidrs: vec!["10.244.0.0/16".into()],
            service_cidrs: vec!["10.96.0.0/12".into()],
            cluster_domain: "cluster.local".into(),
            egress_allow: Vec::new(),
            ca_bundle: None,
        }
    }
}

impl Settings {
    /// The SPIFFE ID of a workload, validated so a bad namespace, account or trust domain is
    /// refused here instead of by the CA at run time.
    pub fn spiffe_id(
        &self,
        object: &str,
        namespace: &str,
        account: &str,
    ) -> Result<String, InjectError> {
        let id = format!("spiffe://{}/ns/{namespace}/sa/{account}", self.trust_domain);
        meshgate_ca::SpiffeId::parse(&id).map(|_| id.clone()).map_err(|e| {
            InjectError::refused(
                object,
                format!("its identity {id} is not a valid SPIFFE ID ({e})"),
                "use a lowercase trust domain and a namespace and account without `/`, `.` or `..` segments",
            )
        })
    }
}

impl Default for Settings {
    /// [`DEFAULT_IMAGE`], [`DEFAULT_TRUST_DOMAIN`], and the default CA and control-plane URLs.
    fn default() -> Self {
        Settings {
            image: DEFAULT_IMAGE.into(),
            trust_domain: DEFAULT_TRUST_DOMAIN.into(),
            ca_url: None,
            control_plane_url: None,
            worker_threads: DEFAULT_WORKER_THREADS,
            kube: KubeSettings::default(),
        }
    }
}

/// Where [`run`] reads the manifests from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// Standard input (named `stdin` in messages).
    Stdin,
    /// A file.
    File(PathBuf),
}

impl Input {
    /// `-` is stdin, anything else a file (the CLI's convention).
    pub fn from_arg(arg: &str) -> Self {
        if arg == "-" {
            Input::Stdin
        } else {
            Input::File(arg.into())
        }
    }

    /// The input's name in messages and diff headers.
    pub fn name(&self) -> String {
        match self {
            Input::Stdin => "stdin".into(),
            Input::File(path) => path.display().to_string(),
        }
    }

    /// Reads the whole input as UTF-8.
    pub fn read(&self) -> Result<String, InjectError> {
        let mut s = String::new();
        let read = match self {
            Input::Stdin => std::io::stdin().read_to_string(&mut s).map(drop),
            Input::File(path) => std::fs::read_to_string(path).map(|text| s = text),
        };
        read.map_err(|source| InjectError::Io {
            action: "read",
            path: self.name(),
            source,
        })?;
        Ok(s)
    }
}

/// Where [`run`] writes the injected manifests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Standard output.
    Stdout,
    /// A file (created or replaced).
    File(PathBuf),
}

impl Output {
    /// Writes `text` whole.
    pub fn write(&self, text: &str) -> Result<(), InjectError> {
        let (written, path) = match self {
            Output::Stdout => (
                std::io::stdout().write_all(text.as_bytes()),
                "stdout".to_string(),
            ),
            Output::File(path) => (std::fs::write(path, text), path.display().to_string()),
        };
        written.map_err(|source| InjectError::Io {
            action: "write",
            path,
            source,
        })
    }
}

/// One injection run: what to read, where to write, and how to inject.
#[derive(Debug, Clone)]
pub struct Options {
    /// The docker-compose file or Kubernetes YAML (multi-document).
    pub input: Input,
    /// Where the injected YAML goes (unused with `dry_run`).
    pub output: Output,
    /// Write nothing; return the unified diff of what would change.
    pub dry_run: bool,
    /// Kubernetes: write the meshgate Service documents for the Services that select injected
    /// pods here (also with `dry_run`: they are not part of the input).
    pub services_out: Option<PathBuf>,
    /// Where the injected workloads find the mesh, and what they run.
    pub settings: Settings,
}

/// What [`run`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The injected text was written to [`Options::output`].
    Written,
    /// Dry run: nothing would change (already injected, opted out, or no workloads).
    Unchanged {
        /// The input's name.
        input: String,
    },
    /// Dry run: the unified diff of what inject would change (never empty).
    Diff(String),
}

/// Reads [`Options::input`], injects it, and writes the result to [`Options::output`] or, with
/// [`Options::dry_run`], returns the diff instead of writing anything.
pub fn run(options: &Options) -> Result<Outcome, InjectError> {
    let name = options.input.name();
    let input = options.input.read()?;
    let injected = inject_full(&name, &input, &options.settings)?;
    for w in &injected.warnings {
        eprintln!("warning: {w}");
    }
    match (&options.services_out, injected.mesh_services.is_empty()) {
        (Some(path), _) => {
            std::fs::write(path, &injected.mesh_services).map_err(|source| InjectError::Io {
                action: "write",
                path: path.display().to_string(),
                source,
            })?
        }
        (None, false) => eprintln!(
            "warning: {name}: Kubernetes Services select injected pods, and callers' sidecars route to them only with meshgate Service documents (identity, hosts, ports, endpoint): write them with --services-out <file> and add that file to the policy directory (the control plane's meshgate-policies ConfigMap)"
        ),
        (None, true) => {}
    }
    let output = injected.text;
    if options.dry_run && output == input {
        return Ok(Outcome::Unchanged { input: name });
    }
    if options.dry_run {
        let diff = similar::TextDiff::from_lines(&input, &output)
            .unified_diff()
            .context_radius(3)
            .header(&name, &format!("{name} (injected)"))
            .to_string();
        return Ok(Outcome::Diff(diff));
    }
    options.output.write(&output).map(|()| Outcome::Written)
}

/// One document of a YAML stream: its `---` line (empty for an implicit first document) and its
/// text. Splitting on `---` lines at column 0 is exact: YAML forbids them inside any scalar.
struct Segment<'a> {
    marker: &'a str,
    body: &'a str,
}

fn split_documents(text: &str) -> Vec<Segment<'_>> {
    let mut segments = Vec::new();
    let (mut marker, mut start, mut pos) = ("", 0, 0);
    for line in text.split_inclusive('\n') {
        let is_marker = line
            .strip_prefix("---")
            .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t', '\r', '\n']));
        if is_marker {
            segments.push(Segment {
                marker,
                body: &text[start..pos],
            });
            marker = line;
            start = pos + line.len();
        }
        pos += line.len();
    }
    segments.push(Segment {
        marker,
        body: &text[start..],
    });
    segments
}

/// Injects a whole input text and returns the new text (equal to `input` when nothing changes).
/// Warnings and meshgate Service documents are dropped: [`inject_full`] returns them.
pub fn inject_text(name: &str, input: &str, s: &Settings) -> Result<String, InjectError> {
    inject_with(name, input, s, true).map(|i| i.text)
}

/// What injecting one input produced.
#[derive(Debug, Clone, Default)]
pub struct Injected {
    /// The injected text (equal to the input when nothing changes).
    pub text: String,
    /// Kubernetes: meshgate `Service` documents (YAML, `---`-separated) for the Kubernetes
    /// Services that select injected pods; empty when there are none.
    pub mesh_services: String,
    /// What injection cannot make work, one line each.
    pub warnings: Vec<String>,
}

/// [`inject_text`], with the warnings and the meshgate Service documents.
pub fn inject_full(name: &str, input: &str, s: &Settings) -> Result<Injected, InjectError> {
    inject_with(name, input, s, true)
}

/// The text of a changed document: spliced from its source when that holds exactly the data of
/// the re-emitted tree (see `verbatim`), else re-emitted whole.
fn render(
    source: &str,
    original: &Node,
    doc: &Node,
    located: &yaml::Located,
    crlf: bool,
) -> String {
    let emitted = yaml::emit(doc);
    let spliced = verbatim::splice(source, original, doc, located).filter(|text| {
        matches!((yaml::parse(text), yaml::parse(&emitted)), (Ok(a), Ok(b)) if yaml::same_data(&a, &b))
    });
    match spliced {
        Some(text) => text,
        None if crlf => emitted.replace('\n', "\r\n"),
        None => emitted,
    }
}

/// [`inject_text`]; with `keep_verbatim` false every changed document is re-emitted whole (the
/// output before format-preserving injection, kept for tests that compare the two).
fn inject_with(
    name: &str,
    input: &str,
    s: &Settings,
    keep_verbatim: bool,
) -> Result<Injected, InjectError> {
    let segments = split_documents(input);
    let mut docs = Vec::with_capacity(segments.len());
    let mut located = Vec::with_capacity(segments.len());
    for seg in &segments {
        let rest = seg.marker.trim_start_matches('-').trim();
        if !rest.is_empty() && !rest.starts_with('#') {
            return Err(InjectError::Yaml {
                input: name.into(),
                detail: format!(
                    "content on a `---` line ({}) is not supported",
                    seg.marker.trim()
                ),
            });
        }
        let (doc, loc) = yaml::parse_located(seg.body).map_err(|e| InjectError::Yaml {
            input: name.into(),
            detail: e.to_string(),
        })?;
        docs.push(doc);
        located.push(loc);
    }
    let originals = docs.clone();

    let present: Vec<usize> = (0..docs.len()).filter(|&i| !docs[i].is_null()).collect();
    let is_compose = present.len() == 1
        && matches!(docs[present[0]].get("services"), Some(Node::Map(_)))
        && docs[present[0]].get("kind").is_none();
    let mut report = None;
    let changed: Vec<bool> = if is_compose {
        let i = present[0];
        let mut changed = vec![false; docs.len()];
        changed[i] = compose::inject(&mut docs[i], s)?;
        changed
    } else if !present.is_empty() && present.iter().all(|&i| docs[i].get("kind").is_some()) {
        let (changed, r) = kube::inject_stream(&mut docs, s)?;
        report = Some(r);
        changed
    } else {
        return Err(InjectError::UnknownFormat { input: name.into() });
    };

    // Rewritten documents follow the file's line endings.
    let crlf = input.contains("\r\n");
    let mut out = String::with_capacity(input.len() * 2);
    for (i, seg) in segments.iter().enumerate() {
        out.push_str(seg.marker);
        // A document is only changed when it has content, so its marker line ends with a newline.
        if !changed[i] {
            out.push_str(seg.body);
        } else if keep_verbatim {
            out.push_str(&render(
                seg.body,
                &originals[i],
                &docs[i],
                &located[i],
                crlf,
            ));
        } else if crlf {
            out.push_str(&yaml::emit(&docs[i]).replace('\n', "\r\n"));
        } else {
            out.push_str(&yaml::emit(&docs[i]));
        }
    }
    let mut injected = Injected::default();
    if let Some(report) = report {
        let missing: Vec<&String> = report
            .namespaces
            .iter()
            .filter(|ns| !report.bundles_present.contains(*ns))
            .collect();
        match &s.kube.ca_bundle {
            Some(pem) => {
                let eol = if crlf { "\r\n" } else { "\n" };
                for ns in missing {
                    if !out.is_empty() && !out.ends_with('\n') {
                        out.push_str(eol);
                    }
                    let doc = yaml::emit(&kube::ca_bundle_configmap(ns, pem));
                    out.push_str(&format!("---{eol}{}", doc.replace('\n', eol)));
                }
            }
            None if !missing.is_empty() => {
                let list: Vec<&str> = missing.iter().map(|s| s.as_str()).collect();
                injected.warnings.push(format!(
                    "injected pods in namespace(s) {} mount the CA bundle from the ConfigMap {}: add it with `meshgate inject --ca-bundle <bundle.pem>`, or create it in each namespace with `kubectl -n <namespace> create configmap {} --from-file=ca-bundle.pem=<bundle.pem>`",
                    list.join(", "),
                    kube::CA_BUNDLE_CONFIGMAP,
                    kube::CA_BUNDLE_CONFIGMAP
                ));
            }
            None => {}
        }
        injected.mesh_services = report
            .mesh_services
            .iter()
            .map(yaml::emit)
            .collect::<Vec<_>>()
            .join("---\n");
        injected.warnings.splice(0..0, report.warnings);
    }
    injected.text = out;
    Ok(injected)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_on_document_markers_only() {
        let text = "a: 1\n---\nb: |\n  ---x\n--- # two\nc: 3\n";
        let segs = split_documents(text);
        assert_eq!(segs.len(), 3);
        assert_eq!((segs[0].marker, segs[0].body), ("", "a: 1\n"));
        assert_eq!((segs[1].marker, segs[1].body), ("---\n", "b: |\n  ---x\n"));
        assert_eq!((segs[2].marker, segs[2].body), ("--- # two\n", "c: 3\n"));
        let joined: String = segs
            .iter()
            .map(|s| format!("{}{}", s.marker, s.body))
            .collect();
        assert_eq!(joined, text);
    }

    fn settings() -> Settings {
        Settings::default()
    }

    #[test]
    fn crlf_files_stay_crlf_and_lists_are_injected() {
        let input = "kind: List\r\nitems:\r\n- kind: Pod\r\n  metadata: {name: a}\r\n  spec:\r\n    containers: [{name: a, ports: [{containerPort: 80}]}]\r\n---\r\nkind: Service # as is\r\n";
        let out = inject_text("x", input, &settings()).unwrap();
        assert!(out.contains("meshgate-proxy"));
        assert_eq!(
            out.matches('\n').count(),
            out.matches("\r\n").count(),
            "{out:?}"
        );
        assert!(out.ends_with("---\r\nkind: Service # as is\r\n"));
        assert_eq!(inject_text("x", &out, &settings()).unwrap(), out);
    }

    /// Every document of a stream, read by this crate's parser and by serde-saphyr.
    fn read_back(text: &str) -> (Vec<Node>, Vec<serde_json::Value>) {
        let docs = split_documents(text)
            .iter()
            .map(|seg| yaml::parse(seg.body).unwrap_or_else(|e| panic!("{e}\n{text}")))
            .collect();
        let values = serde_saphyr::from_multiple(text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        (docs, values)
    }

    /// The format-preserving output holds exactly the data of the fully re-emitted one, and a
    /// second run leaves it alone.
    fn assert_same_as_reemitted(name: &str, input: &str) -> String {
        let s = settings();
        let kept = inject_text(name, input, &s).unwrap();
        let emitted = inject_with(name, input, &s, false).unwrap().text;
        let (kept_docs, kept_values) = read_back(&kept);
        let (emitted_docs, emitted_values) = read_back(&emitted);
        assert_eq!(kept_docs.len(), emitted_docs.len(), "{name}");
        for (a, b) in kept_docs.iter().zip(&emitted_docs) {
            assert!(
                yaml::same_data(a, b),
                "{name}: trees differ\n--- kept:\n{kept}\n--- re-emitted:\n{emitted}"
            );
        }
        assert_eq!(kept_values, emitted_values, "{name}");
        assert_eq!(
            inject_text(name, &kept, &s).unwrap(),
            kept,
            "{name}: not idempotent"
        );
        kept
    }

    #[test]
    fn every_fixture_reads_back_as_the_reemitted_output() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut inputs = vec![root.join("examples/compose/mesh.yml")];
        for entry in std::fs::read_dir(root.join("tests/fixtures/inject")).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if name.ends_with(".yaml") && !name.ends_with(".injected.yaml") {
                inputs.push(path);
            }
        }
        assert!(inputs.len() > 5, "{inputs:?}");
        for path in inputs {
            let input = std::fs::read_to_string(&path).unwrap();
            assert_same_as_reemitted(&path.display().to_string(), &input);
        }
    }

    const MESH: &str = "services:\n  ca:\n    image: m\n    command: [ca]\n    labels: {meshgate.io/role: ca}\n  cp:\n    image: m\n    labels: {meshgate.io/role: control-plane}\n";

    #[test]
    fn untouched_services_keep_comments_quoting_and_indentation() {
        let keep = "    # the database: not meshed\n    db:\n        image:   'postgres:17'   # pinned\n        labels:\n            meshgate.io/inject: \"disabled\"\n        command: |\n            set -e\n            exec postgres\n            # not a comment: the script's last line\n";
        let input = format!(
            "# header\nservices:\n    ca:\n        image: m\n        command: [ca]\n        labels: {{meshgate.io/role: ca}}\n    cp:\n        image: m\n        labels: {{meshgate.io/role: control-plane}}\n\n{keep}\n    web:\n        image: web  # the app\n        expose: ['80']\n"
        );
        let out = assert_same_as_reemitted("x", &input);
        assert!(out.starts_with("# header\nservices:\n"), "{out}");
        assert!(out.contains(&format!("\n\n{keep}    web-pod:\n")), "{out}");
        // cp needs no change; ca gets --token-for; new services use the file's 4-space step.
        assert!(
            out.contains(
                "    cp:\n        image: m\n        labels: {meshgate.io/role: control-plane}\n"
            ),
            "{out}"
        );
        assert!(
            out.contains("\n    web-proxy:\n        image: meshgate:local\n"),
            "{out}"
        );
        assert!(out.contains("\n        image: web  # the app\n"), "{out}");
    }

    #[test]
    fn splices_survive_odd_endings_and_aliases() {
        for input in [
            // No line break at the end.
            format!("{MESH}  web:\n    image: w\n    expose: ['80']"),
            // CRLF.
            format!("{MESH}  web:\n    image: w\n    expose: ['80']\n").replace('\n', "\r\n"),
            // A keep-chomped literal right before a service that changes.
            format!(
                "{MESH}  job:\n    image: j\n    labels: {{meshgate.io/inject: disabled}}\n    command: |+\n      run\n\n  web:\n    image: w\n    expose: ['80']\n"
            ),
            // An unchanged service aliasing an anchor defined in a service that changes.
            format!(
                "{MESH}  web:\n    image: &img w\n    expose: ['80']\n  copy:\n    image: *img\n    labels: {{meshgate.io/inject: disabled}}\n"
            ),
            // Merge keys and anchors in unchanged and changed entries.
            format!(
                "x-base: &base\n  image: b\n{MESH}  web:\n    <<: *base\n    expose: ['80']\n  other:\n    <<: *base\n    labels: {{meshgate.io/inject: disabled}}\n"
            ),
        ] {
            let out = assert_same_as_reemitted("x", &input);
            assert!(out.contains("web-proxy"), "{out}");
        }
    }

    #[test]
    fn unknown_input_is_refused() {
        let s = settings();
        assert!(matches!(
            inject_text("x", "just: data\n", &s),
            Err(InjectError::UnknownFormat { .. })
        ));
    }
}
