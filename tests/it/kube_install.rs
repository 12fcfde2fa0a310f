//! Kubernetes without a cluster, as real as the machine allows:
//!
//! - everything `meshgate install` prints (default, with a CA directory and policies, CRDs only)
//!   passes strict offline schema validation with `kubernetes-validate` (PyPI; it ships the
//!   Kubernetes OpenAPI schemas) against the oldest and the newest Kubernetes versions we claim,
//!   and holds the objects and settings of the shared contract;
//! - `meshgate inject`'s output over its fixtures and the real-world corpus in
//!   `tests/fixtures/kube/` passes the same validation;
//! - the control plane (a real `meshgate control-plane serve` process) follows a policy
//!   directory laid out exactly as the kubelet lays out a ConfigMap volume, through atomic
//!   `..data` swaps: a valid edit propagates, an invalid one is refused with `file:line` and the
//!   last good policy stays served.
//!
//! The tool is installed by `scripts/test.sh` (a venv under `~/.cache/meshgate/venv`); a missing
//! tool fails these tests with the install command, it never skips them.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::support::*;

/// The Kubernetes versions validated against: the oldest still supported upstream when this was
/// written (Dec 2026) and the newest the pinned `kubernetes-validate` (1.37.0) ships.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.35.0", "1.37.0"];

const INSTALL_HINT: &str = "python3 -m venv ~/.cache/meshgate/venv && ~/.cache/meshgate/venv/bin/pip install kubernetes-validate==1.37.0 (scripts/test.sh does this), or put kubernetes-validate on PATH / set KUBERNETES_VALIDATE=/path/to/it";

use crate::support::repo;

/// The `kubernetes-validate` executable: $KUBERNETES_VALIDATE, PATH, or the venv of
/// scripts/test.sh. Panics with the install command when there is none.
fn kubernetes_validate() -> PathBuf {
    if let Some(p) = std::env::var_os("KUBERNETES_VALIDATE") {
        return PathBuf::from(p);
    }
    let on_path = Command::new("sh")
        .args(["-c", "command -v kubernetes-validate"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    if let Some(p) = on_path {
        return p;
    }
    let venv = std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".cache/meshgate/venv/bin/kubernetes-validate"));
    match venv.filter(|p| p.exists()) {
        Some(p) => p,
        None => panic!(
            "this test needs `kubernetes-validate` (strict offline Kubernetes schema validation); install it: {INSTALL_HINT}"
        ),
    }
}

/// What `kubernetes-validate --strict` said about one file, for every pinned version.
struct Verdict {
    ok: bool,
    /// (kind/name) of every resource that passed, per version.
    passed: Vec<BTreeSet<String>>,
    report: String,
}

fn validate_file(file: &Path) -> Verdict {
    let tool = kubernetes_validate();
    let mut ok = true;
    let mut passed = Vec::new();
    let mut report = String::new();
    for version in KUBERNETES_VERSIONS {
        let out = Command::new(&tool)
            .args(["--strict", "-k", version])
            .arg(file)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}; {INSTALL_HINT}", tool.display()));
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        // A resource it has no schema for is only a WARN: for us it is a failure too (a typo'd
        // apiVersion would otherwise pass unvalidated).
        let problems = stdout
            .lines()
            .chain(stderr.lines())
            .any(|l| l.starts_with("ERROR") || l.starts_with("WARN"));
        ok &= out.status.success() && !problems;
        passed.push(
            stdout
                .lines()
                .filter(|l| l.starts_with("INFO") && l.contains(" passed for resource "))
                .filter_map(|l| l.split(" passed for resource ").nth(1))
                .filter_map(|rest| rest.split(' ').next())
                .map(str::to_string)
                .collect(),
        );
        report.push_str(&format!(
            "--- kubernetes-validate --strict -k {version} {}\n{stdout}{stderr}",
            file.display()
        ));
    }
    Verdict { ok, passed, report }
}

/// Every document of a YAML stream, as JSON values (comments and empty documents skipped).
fn documents(text: &str) -> Vec<Value> {
    text.split("\n---\n")
        .filter(|d| {
            d.lines()
                .any(|l| !l.trim().is_empty() && !l.starts_with('#'))
        })
        .map(|d| serde_saphyr::from_str::<Value>(d).unwrap_or_else(|e| panic!("{e}\n{d}")))
        .collect()
}

fn install(args: &[&str]) -> String {
    let out = run(meshgate().arg("install").args(args));
    assert!(out.status.success(), "install {args:?}: {}", text(&out));
    String::from_utf8(out.stdout).unwrap()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind}/{name} in the output"))
}

fn args_of(deployment: &Value) -> Vec<String> {
    deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect()
}

/// The value after `flag` in an argument list.
fn flag<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

/// The objects of the shared contract, and the settings that make them work together.
fn assert_contract(docs: &[Value], replicas: u64) {
    let ca = find(docs, "Deployment", "meshgate-ca");
    let cp = find(docs, "Deployment", "meshgate-control-plane");
    for (d, account) in [(ca, "meshgate-ca"), (cp, "control-plane")] {
        assert_eq!(d["metadata"]["namespace"], "meshgate");
        let pod = &d["spec"]["template"]["spec"];
        assert_eq!(pod["serviceAccountName"], account);
        find(docs, "ServiceAccount", account);
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
        let containers = pod["containers"]
            .as_array()
            .unwrap()
            .iter()
            .chain(pod["initContainers"].as_array().into_iter().flatten());
        for c in containers {
            let sc = &c["securityContext"];
            assert_eq!(sc["runAsNonRoot"], true, "{c}");
            assert_eq!(sc["readOnlyRootFilesystem"], true, "{c}");
            assert_eq!(sc["allowPrivilegeEscalation"], false, "{c}");
            assert_eq!(
                sc["capabilities"]["drop"],
                serde_json::json!(["ALL"]),
                "{c}"
            );
            assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault", "{c}");
            assert!(c["resources"]["requests"]["memory"].is_string(), "{c}");
            assert!(c["resources"]["limits"]["memory"].is_string(), "{c}");
        }
        let c = &pod["containers"][0];
        assert!(
            c["readinessProbe"].is_object() && c["livenessProbe"].is_object(),
            "{c}"
        );
        if account == "control-plane" {
            // The probes the ConfigMap test runs against a real control plane.
            let command = |probe: &str| c[probe]["exec"]["command"].clone();
            let health = |path: &str| {
                serde_json::json!([
                    "/usr/local/bin/meshgate",
                    "health",
                    "--timeout",
                    "2s",
                    format!("http://127.0.0.1:15011{path}")
                ])
            };
            assert_eq!(command("readinessProbe"), health("/ready"));
            assert_eq!(command("livenessProbe"), health("/live"));
        }
    }
    assert_eq!(ca["spec"]["replicas"], 1);
    assert_eq!(cp["spec"]["replicas"], replicas);

    // CA: serves the in-cluster name sidecars use, accepts projected tokens of our audience.
    let ca_args = args_of(ca);
    assert_eq!(&ca_args[..2], ["ca", "serve"]);
    assert_eq!(flag(&ca_args, "--listen"), Some("0.0.0.0:15012"));
    assert!(
        ca_args.iter().any(|a| a == "meshgate-ca.meshgate.svc"),
        "{ca_args:?}"
    );
    assert_eq!(
        flag(&ca_args, "--k8s-issuer"),
        Some("https://kubernetes.default.svc.cluster.local")
    );
    assert_eq!(flag(&ca_args, "--k8s-audience"), Some("meshgate-ca"));
    let ca_svc = find(docs, "Service", "meshgate-ca");
    assert_eq!(ca_svc["spec"]["ports"][0]["port"], 15012);

    // The CA's RBAC: exactly the issuer-discovery ClusterRole, nothing else anywhere.
    let bindings: Vec<&Value> = docs
        .iter()
        .filter(|d| {
            ["Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"]
                .contains(&d["kind"].as_str().unwrap())
        })
        .collect();
    assert_eq!(bindings.len(), 1, "{bindings:?}");
    assert_eq!(
        bindings[0]["roleRef"]["name"],
        "system:service-account-issuer-discovery"
    );
    assert_eq!(bindings[0]["subjects"][0]["name"], "meshgate-ca");
    // The control plane has no API token at all.
    assert_eq!(
        cp["spec"]["template"]["spec"]["automountServiceAccountToken"],
        false
    );

    // Control plane: its SVID from the CA with a projected token, policies from the ConfigMap.
    let cp_args = args_of(cp);
    assert_eq!(&cp_args[..2], ["control-plane", "serve"]);
    assert_eq!(
        flag(&cp_args, "--ca"),
        Some("https://meshgate-ca.meshgate.svc:15012")
    );
    assert_eq!(
        flag(&cp_args, "--token-file"),
        Some("/var/run/meshgate/bootstrap/token")
    );
    assert_eq!(
        flag(&cp_args, "--ca-bundle"),
        Some("/var/run/meshgate/bootstrap/ca-bundle.pem")
    );
    let volumes = cp["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap();
    let projected = volumes
        .iter()
        .find_map(|v| v["projected"]["sources"].as_array())
        .unwrap();
    let token = projected
        .iter()
        .find(|s| s["serviceAccountToken"].is_object())
        .unwrap();
    assert_eq!(token["serviceAccountToken"]["audience"], "meshgate-ca");
    assert_eq!(token["serviceAccountToken"]["expirationSeconds"], 600);
    assert!(
        projected
            .iter()
            .any(|s| s["configMap"]["name"] == "meshgate-ca-bundle"),
        "{projected:?}"
    );
    let policy_volume = volumes
        .iter()
        .find(|v| v["configMap"]["name"] == "meshgate-policies")
        .unwrap();
    let mounts = cp["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
        .as_array()
        .unwrap();
    let policy_mount = mounts
        .iter()
        .find(|m| m["name"] == policy_volume["name"])
        .unwrap();
    assert_eq!(
        flag(&cp_args, "--policy-dir"),
        policy_mount["mountPath"].as_str()
    );
    let cp_svc = find(docs, "Service", "meshgate-control-plane");
    assert_eq!(cp_svc["spec"]["clusterIP"], "None");
    assert_eq!(cp_svc["spec"]["ports"][0]["port"], 15010);
    let pdb = find(docs, "PodDisruptionBudget", "meshgate-control-plane");
    assert_eq!(pdb["spec"]["minAvailable"], 1);

    // The bundle ConfigMap holds the CA's roots; the MeshConfig (if seeded) the trust domain.
    let bundle = find(docs, "ConfigMap", "meshgate-ca-bundle");
    assert!(
        bundle["data"]["ca-bundle.pem"]
            .as_str()
            .unwrap()
            .starts_with("-----BEGIN CERTIFICATE-----"),
        "{bundle}"
    );
    let secret = find(docs, "Secret", "meshgate-ca");
    let keys: BTreeSet<&str> = secret["data"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert!(
        keys.contains("intermediate.key") && keys.contains("token.key"),
        "{keys:?}"
    );
    assert!(
        !keys.contains("root.key"),
        "the root key must stay out of the cluster"
    );
    let policies = find(docs, "ConfigMap", "meshgate-policies");
    assert!(!policies["data"].as_object().unwrap().is_empty());
    let crds: BTreeSet<&str> = docs
        .iter()
        .filter(|d| d["kind"] == "CustomResourceDefinition")
        .map(|d| d["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        crds,
        BTreeSet::from([
            "authorizationpolicies.meshgate.dev",
            "meshconfigs.meshgate.dev",
            "networkpolicies.meshgate.dev",
            "services.meshgate.dev"
        ])
    );
}

/// The names (kind/name, lowercase kind) of the documents, as kubernetes-validate reports them.
fn names(docs: &[Value]) -> BTreeSet<String> {
    docs.iter()
        .map(|d| {
            format!(
                "{}/{}",
                d["kind"].as_str().unwrap().to_lowercase(),
                d["metadata"]["name"].as_str().unwrap()
            )
        })
        .collect()
}

fn assert_valid(file: &Path, docs: &[Value]) {
    let verdict = validate_file(file);
    assert!(verdict.ok, "{}", verdict.report);
    for passed in &verdict.passed {
        assert_eq!(passed, &names(docs), "{}", verdict.report);
    }
}

#[test]
fn install_output_passes_strict_schema_validation_and_holds_the_contract() {
    let tmp = tempfile::tempdir().unwrap();

    // Plain `meshgate install`: working defaults on stdout.
    let default = install(&[]);
    let docs = documents(&default);
    assert_contract(&docs, 2);
    let file = tmp.path().join("default.yaml");
    std::fs::write(&file, &default).unwrap();
    assert_valid(&file, &docs);
    // The seeded policy directory is the example, valid for the control plane.
    let seeded = find(&docs, "ConfigMap", "meshgate-policies")["data"]
        .as_object()
        .unwrap()
        .clone();
    let dir = tmp.path().join("seeded");
    std::fs::create_dir(&dir).unwrap();
    for (name, text) in &seeded {
        std::fs::write(dir.join(name), text.as_str().unwrap()).unwrap();
    }
    let set = meshgate_policy::load_dir(&dir).unwrap();
    assert_eq!(set.mesh_config.spec.trust_domain, "mesh.local");

    // An existing CA, the sample policies, another trust domain and replica count, to a file.
    let ca_dir = tmp.path().join("ca");
    let init = run(meshgate()
        .args(["ca", "init", "--trust-domain", "corp.example", "--dir"])
        .arg(&ca_dir));
    assert!(init.status.success(), "{}", text(&init));
    let out_file = tmp.path().join("custom.yaml");
    let policy_dir = tmp.path().join("policies");
    std::fs::create_dir(&policy_dir).unwrap();
    std::fs::write(
        policy_dir.join("mesh.yaml"),
        "apiVersion: meshgate.dev/v1\nkind: MeshConfig\nmetadata: { name: default, namespace: meshgate }\nspec: { trustDomain: corp.example }\n",
    )
    .unwrap();
    std::fs::copy(
        repo().join("examples/policies/shop.yaml"),
        policy_dir.join("shop.yaml"),
    )
    .unwrap();
    let done = run(meshgate()
        .args([
            "install",
            "--control-plane-replicas",
            "3",
            "--image",
            "registry.example/meshgate:0.1.0",
            "--ca-dir",
        ])
        .arg(&ca_dir)
        .arg("--policy-dir")
        .arg(&policy_dir)
        .arg("-o")
        .arg(&out_file));
    assert!(done.status.success(), "{}", text(&done));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&out_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the manifests hold the CA's keys");
    let custom = std::fs::read_to_string(&out_file).unwrap();
    let docs = documents(&custom);
    assert_contract(&docs, 3);
    assert_valid(&out_file, &docs);
    let bundle = find(&docs, "ConfigMap", "meshgate-ca-bundle")["data"]["ca-bundle.pem"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        bundle,
        std::fs::read_to_string(ca_dir.join("bundle.pem")).unwrap(),
        "the bundle of the given CA"
    );
    let policies = &find(&docs, "ConfigMap", "meshgate-policies")["data"];
    assert_eq!(
        policies["shop.yaml"].as_str().unwrap(),
        std::fs::read_to_string(policy_dir.join("shop.yaml")).unwrap()
    );
    let image = &find(&docs, "Deployment", "meshgate-control-plane")["spec"]["template"]["spec"]["containers"]
        [0]["image"];
    assert_eq!(image, "registry.example/meshgate:0.1.0");

    // A trust domain that contradicts the CA is refused, naming both and the fix.
    let clash = run(meshgate()
        .args(["install", "--trust-domain", "mesh.local", "--ca-dir"])
        .arg(&ca_dir));
    assert!(!clash.status.success());
    let said = text(&clash);
    assert!(
        said.contains("corp.example") && said.contains("drop --trust-domain"),
        "{said}"
    );

    // CRDs only: no keys, no namespace objects.
    let crds = install(&["--crds-only"]);
    let docs = documents(&crds);
    assert_eq!(docs.len(), 4);
    assert!(docs.iter().all(|d| d["kind"] == "CustomResourceDefinition"));
    assert!(!crds.contains("PRIVATE KEY") && !crds.contains("kind: Secret"));
    let file = tmp.path().join("crds.yaml");
    std::fs::write(&file, &crds).unwrap();
    assert_valid(&file, &docs);
    // The YAML carries the schemas generated from the model exactly (types, enums, defaults
    // and numbers survive the writer).
    for kind in meshgate_policy::schema::kinds().unwrap() {
        let crd = find(&docs, "CustomResourceDefinition", &kind.crd_name());
        assert_eq!(crd["spec"]["names"]["kind"], kind.kind);
        assert_eq!(
            crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"],
            kind.document(),
            "{}",
            kind.kind
        );
    }

    // The validator is strict: one unknown field in the Deployment fails it (so the passes
    // above mean something).
    let broken = default.replacen(
        "      enableServiceLinks: false\n",
        "      enableServiceLinks: false\n      hostNetwrk: true\n",
        1,
    );
    assert_ne!(broken, default);
    let file = tmp.path().join("broken.yaml");
    std::fs::write(&file, &broken).unwrap();
    let verdict = validate_file(&file);
    assert!(!verdict.ok, "an unknown field passed:\n{}", verdict.report);
    assert!(verdict.report.contains("hostNetwrk"), "{}", verdict.report);
}

/// Everything `meshgate inject` emits for the fixtures and the real-world corpus — the injected
/// manifests with the CA bundle ConfigMaps, and the meshgate Service documents — passes strict
/// validation (Kubernetes schemas; the policy loader), every comment of the input survives, and
/// the corpus's workloads and Services are all meshed.
#[test]
fn inject_output_passes_strict_schema_validation() {
    let tmp = tempfile::tempdir().unwrap();
    let bundle = tmp.path().join("bundle.pem");
    std::fs::write(
        &bundle,
        "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let mut inputs: Vec<PathBuf> = Vec::new();
    for dir in ["tests/fixtures/inject", "tests/fixtures/kube"] {
        for entry in std::fs::read_dir(repo().join(dir)).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            // Kubernetes inputs only (not compose files, not the expected outputs).
            if name.ends_with(".yaml") && !name.contains("compose") && !name.contains(".injected.")
            {
                inputs.push(path);
            }
        }
    }
    inputs.sort();
    assert!(inputs.len() >= 8, "{inputs:?}");
    for input in &inputs {
        let name = input.file_name().unwrap().to_string_lossy().into_owned();
        // The corpus itself is valid Kubernetes (else a failure below would not be inject's).
        let original = std::fs::read_to_string(input).unwrap();
        assert_valid(input, &documents(&original));

        let services = tmp.path().join(format!("{name}.services.yaml"));
        let out = meshgate()
            .arg("inject")
            .arg("--ca-bundle")
            .arg(&bundle)
            .arg("--services-out")
            .arg(&services)
            .arg(input)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "inject {name}: {}", text(&out));
        let injected = String::from_utf8(out.stdout).unwrap();
        let file = tmp.path().join(&name);
        std::fs::write(&file, &injected).unwrap();
        let verdict = validate_file(&file);
        assert!(verdict.ok, "inject {name}:\n{}", verdict.report);
        for comment in original.lines().filter(|l| l.trim_start().starts_with('#')) {
            assert!(
                injected.lines().any(|l| l == comment),
                "inject {name} lost the comment {comment:?}"
            );
        }
        let mesh = std::fs::read_to_string(&services).unwrap();
        if !mesh.trim().is_empty() {
            meshgate_policy::load::load_text(&services, &mesh)
                .unwrap_or_else(|e| panic!("inject {name}: Service documents: {e:?}\n{mesh}"));
        }
        // The real-world corpus: every workload injected, every Service meshed.
        if input.parent().unwrap().ends_with("kube") {
            let docs = documents(&injected);
            for doc in &docs {
                let kind = doc["kind"].as_str().unwrap_or_default();
                let obj = format!("{name}: {kind}/{}", doc["metadata"]["name"]);
                if ["Deployment", "StatefulSet", "DaemonSet"].contains(&kind) {
                    let init = doc["spec"]["template"]["spec"]["initContainers"].to_string();
                    assert!(init.contains("meshgate-proxy"), "{obj} not injected");
                }
                if kind == "Service" && doc["spec"]["selector"].is_object() {
                    let ports = doc["spec"]["ports"].to_string();
                    assert!(ports.contains("meshgate-mesh"), "{obj} not meshed: {ports}");
                    let svc = doc["metadata"]["name"].as_str().unwrap();
                    assert!(
                        mesh.contains(&format!("name: {svc}\n")),
                        "{obj}: no meshgate Service document in\n{mesh}"
                    );
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A policy directory mounted from a ConfigMap.

/// A directory laid out the way the kubelet writes a ConfigMap volume (its AtomicWriter):
/// the files in a hidden timestamped directory, `..data` a symlink to it, and one symlink per
/// key to `..data/<key>`. An update writes a new timestamped directory, points a temporary
/// symlink at it, renames that over `..data` (the atomic step), then fixes the per-key links and
/// deletes the old directory.
struct ConfigMapVolume {
    dir: PathBuf,
    generation: u32,
    keys: BTreeSet<String>,
}

impl ConfigMapVolume {
    fn new(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        Self {
            dir: dir.to_path_buf(),
            generation: 0,
            keys: BTreeSet::new(),
        }
    }

    /// Replaces the whole ConfigMap's data, as an `kubectl apply` of it would.
    fn update(&mut self, data: &[(&str, &str)]) {
        use std::os::unix::fs::symlink;
        self.generation += 1;
        let ts = format!(
            "..2026_12_02_03_{:02}_00.{:09}",
            self.generation, self.generation
        );
        let new_dir = self.dir.join(&ts);
        std::fs::create_dir(&new_dir).unwrap();
        for (key, text) in data {
            std::fs::write(new_dir.join(key), text).unwrap();
        }
        let old = std::fs::read_link(self.dir.join("..data")).ok();
        let tmp_link = self.dir.join("..data_tmp");
        symlink(&ts, &tmp_link).unwrap();
        std::fs::rename(&tmp_link, self.dir.join("..data")).unwrap();
        let new_keys: BTreeSet<String> = data.iter().map(|(k, _)| k.to_string()).collect();
        for key in new_keys.difference(&self.keys) {
            symlink(format!("..data/{key}"), self.dir.join(key)).unwrap();
        }
        for key in self.keys.difference(&new_keys) {
            std::fs::remove_file(self.dir.join(key)).unwrap();
        }
        self.keys = new_keys;
        if let Some(old) = old {
            std::fs::remove_dir_all(self.dir.join(old)).unwrap();
        }
    }
}

/// The version the control plane must serve for `data`: loaded from plain files elsewhere (no
/// symlinks, nothing hidden), so it does not depend on the code under test reading the layout.
fn version_of(data: &[(&str, &str)]) -> String {
    let plain = tempfile::tempdir().unwrap();
    for (key, text) in data {
        std::fs::write(plain.path().join(key), text).unwrap();
    }
    meshgate_policy::load_dir(plain.path()).unwrap().version
}

/// A real `meshgate control-plane serve` with a static SVID; killed on drop.
struct ControlPlaneProcess {
    child: std::process::Child,
    admin: u16,
    log: PathBuf,
}

impl ControlPlaneProcess {
    fn start(ca: &TestCa, policy_dir: &Path, tmp: &Path) -> Self {
        let files = tmp.join("cp-identity");
        issue_files(
            ca,
            "spiffe://mesh.local/ns/meshgate/sa/control-plane",
            &files,
        );
        let admin = free_port();
        let log = tmp.join("control-plane.log");
        let child = meshgate()
            .args(["control-plane", "serve", "--listen", "127.0.0.1:0"])
            .args(["--admin", &format!("127.0.0.1:{admin}")])
            .args(["--poll-interval", "100ms"])
            .arg("--policy-dir")
            .arg(policy_dir)
            .arg("--svid-cert")
            .arg(files.join("svid.pem"))
            .arg("--svid-key")
            .arg(files.join("key.pem"))
            .arg("--trust-bundle")
            .arg(files.join("bundle.pem"))
            .env("MESHGATE_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Self { child, admin, log }
    }

    async fn status(&self) -> Option<Value> {
        let url = format!("http://127.0.0.1:{}/status", self.admin);
        let out = tokio::task::spawn_blocking(move || {
            Command::new("curl")
                .args(["-sf", "--max-time", "2", &url])
                .output()
        })
        .await
        .unwrap()
        .ok()?;
        serde_json::from_slice(&out.stdout).ok()
    }

    /// Waits (up to 10 s) until `/status` satisfies `check`; returns it.
    async fn wait_for(&self, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        let mut last = None;
        for _ in 0..100 {
            if let Some(s) = self.status().await {
                if check(&s) {
                    return s;
                }
                last = Some(s);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "timed out waiting for {what}; last status: {last:?}\nlog:\n{}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }
}

impl Drop for ControlPlaneProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const MESH: &str = "apiVersion: meshgate.dev/v1\nkind: MeshConfig\nmetadata: { name: default, namespace: meshgate }\nspec: { defaultAction: DENY, trustDomain: mesh.local }\n";

fn shop(methods: &str, action: &str) -> String {
    format!(
        "# orders readers\napiVersion: meshgate.dev/v1\nkind: AuthorizationPolicy\nmetadata: {{ name: orders-readers, namespace: shop }}\nspec:\n  selector: {{ account: orders }}\n  action: {action}\n  rules:\n    - from: [{{ principals: [\"spiffe://mesh.local/ns/shop/sa/web\"] }}]\n      to: [{{ methods: [{methods}], paths: [\"/orders/*\"] }}]\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_follows_configmap_swaps_and_keeps_the_last_good_policy() {
    let ca = TestCa::init();
    let tmp = tempfile::tempdir().unwrap();
    let mount = tmp.path().join("policies");
    let mut volume = ConfigMapVolume::new(&mount);
    // It starts on a broken ConfigMap: alive, but not ready (the probes `meshgate install`
    // writes, run as the kubelet runs them), so it stays out of the headless Service's DNS.
    volume.update(&[
        ("mesh.yaml", MESH),
        ("shop.yaml", &shop("\"GET\"", "PERMIT")),
    ]);
    let cp = ControlPlaneProcess::start(&ca, &mount, tmp.path());
    cp.wait_for("the first refusal", |s| s["last_rejected"].is_string())
        .await;
    let probe = |path: &str| {
        let url = format!("http://127.0.0.1:{}{path}", cp.admin);
        let mut cmd = meshgate();
        cmd.args(["health", "--timeout", "2s", &url]);
        run_async(cmd)
    };
    assert!(probe("/live").await.status.success());
    let not_ready = probe("/ready").await;
    assert!(!not_ready.status.success(), "{}", text(&not_ready));

    let shop_v1 = shop("\"GET\"", "ALLOW");
    let v1_data = [("mesh.yaml", MESH), ("shop.yaml", shop_v1.as_str())];
    volume.update(&v1_data);
    let v1 = version_of(&v1_data);
    // The hidden timestamped directory and `..data` are not read (each document would be
    // loaded two or three times and refused as duplicates); the per-key links are.
    cp.wait_for("the first version", |s| s["version"] == v1.as_str())
        .await;
    assert!(cp.status().await.unwrap()["last_rejected"].is_null());
    let ready = probe("/ready").await;
    assert!(ready.status.success(), "{}", text(&ready));

    // A valid edit, swapped in atomically, propagates.
    let shop_v2 = shop("\"GET\", \"POST\"", "ALLOW");
    let v2_data = [("mesh.yaml", MESH), ("shop.yaml", shop_v2.as_str())];
    volume.update(&v2_data);
    let v2 = version_of(&v2_data);
    assert_ne!(v1, v2);
    cp.wait_for("the valid edit", |s| s["version"] == v2.as_str())
        .await;

    // An invalid edit is refused with file:line (the key's path in the mount, line of
    // `action`), and v2 stays served.
    let broken = shop("\"GET\"", "PERMIT");
    let line = broken.lines().position(|l| l.contains("PERMIT")).unwrap() + 1;
    volume.update(&[("mesh.yaml", MESH), ("shop.yaml", broken.as_str())]);
    let status = cp
        .wait_for("the refusal", |s| s["last_rejected"].is_string())
        .await;
    let rejected = status["last_rejected"].as_str().unwrap();
    let at = format!("{}:{line}:", mount.join("shop.yaml").display());
    assert!(rejected.contains(&at), "want {at} in: {rejected}");
    assert!(
        !rejected.contains("..data") && !rejected.contains("..2026"),
        "errors name the key's file, not the kubelet's internals: {rejected}"
    );
    assert_eq!(
        status["version"],
        v2.as_str(),
        "the last good version stays"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(cp.status().await.unwrap()["version"], v2.as_str());
    let log = std::fs::read_to_string(&cp.log).unwrap();
    assert!(log.contains("policy.rejected"), "{log}");

    // Keys added and removed: a new key file appears, an old one goes; fixed and valid again.
    let v3_data = [("mesh.yaml", MESH), ("orders.yaml", shop_v1.as_str())];
    volume.update(&v3_data);
    let v3 = version_of(&v3_data);
    cp.wait_for("the fixed edit", |s| {
        s["version"] == v3.as_str() && s["last_rejected"].is_null()
    })
    .await;
    assert!(!mount.join("shop.yaml").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_symlink_loop_in_the_policy_dir_is_not_followed() {
    let ca = TestCa::init();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("policies");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("mesh.yaml"), MESH).unwrap();
    // A symlinked directory pointing at its parent: followed, it would multiply every file up
    // to the kernel's 40-link limit (the loader never followed it; now the watcher does not
    // either).
    std::os::unix::fs::symlink(".", dir.join("loop")).unwrap();
    let v1 = version_of(&[("mesh.yaml", MESH)]);
    let cp = ControlPlaneProcess::start(&ca, &dir, tmp.path());
    cp.wait_for("the policy", |s| s["version"] == v1.as_str())
        .await;
    // And it keeps watching: an edit still propagates.
    let shop_v1 = shop("\"GET\"", "ALLOW");
    std::fs::write(dir.join("shop.yaml"), &shop_v1).unwrap();
    let v2 = version_of(&[("mesh.yaml", MESH), ("shop.yaml", shop_v1.as_str())]);
    cp.wait_for("the edit", |s| s["version"] == v2.as_str())
        .await;
}
