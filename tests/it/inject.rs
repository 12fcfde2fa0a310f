//! `meshgate inject` through the real binary.
//!
//! Golden files: `tests/fixtures/inject/<case>.yaml` is the input, `<case>.injected.yaml` the
//! expected output, compared byte for byte. After an intended change to the output, regenerate
//! them with `MESHGATE_BLESS=1 cargo test --test it inject::` and review the diff before committing.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

const CASES: [&str; 6] = [
    "compose",
    "deployment",
    "statefulset",
    "job",
    "pod",
    "multi",
];

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/inject")
}

/// Runs `meshgate inject ARGS`, feeding `stdin` when given.
fn inject(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(crate::support::meshgate_bin())
        .arg("inject")
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn meshgate");
    if let Some(input) = stdin {
        // A refused invocation (a bad flag) exits before it reads its input: the pipe breaks,
        // and its exit status and stderr say why, which the caller asserts on.
        let written = child.stdin.take().unwrap().write_all(input.as_bytes());
        if let Err(e) = written
            && e.kind() != std::io::ErrorKind::BrokenPipe
        {
            panic!("writing meshgate inject's input: {e}");
        }
    }
    child.wait_with_output().expect("wait for meshgate")
}

fn ok_stdout(out: Output) -> String {
    assert!(
        out.status.success(),
        "inject failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

fn golden(case: &str) -> String {
    std::fs::read_to_string(fixtures().join(format!("{case}.injected.yaml")))
        .unwrap_or_else(|e| panic!("{case}.injected.yaml: {e} (run with MESHGATE_BLESS=1)"))
}

/// Every document of an injected output, parsed by an independent YAML reader.
fn parse_docs(text: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(text)
        .unwrap_or_else(|e| panic!("output is not valid YAML: {e}\n{text}"))
        .into_iter()
        .filter(|d| !d.is_null())
        .collect()
}

#[test]
fn outputs_match_golden_files() {
    let bless = std::env::var_os("MESHGATE_BLESS").is_some_and(|v| v == "1");
    for case in CASES {
        let input = fixtures().join(format!("{case}.yaml"));
        let out = ok_stdout(inject(&[input.to_str().unwrap()], None));
        if bless {
            std::fs::write(fixtures().join(format!("{case}.injected.yaml")), &out).unwrap();
        } else {
            assert_eq!(
                out,
                golden(case),
                "{case}: output differs from {case}.injected.yaml"
            );
        }
    }
}

#[test]
fn injecting_twice_changes_nothing() {
    for case in CASES {
        let once = golden(case);
        let twice = ok_stdout(inject(&["-"], Some(&once)));
        assert_eq!(twice, once, "{case}: a second inject changed the output");
    }
}

/// The pod spec of a workload document (the template's, or a Pod's own).
fn pod_spec(doc: &Value) -> &Value {
    match doc["kind"].as_str() {
        Some("Pod") => &doc["spec"],
        _ => &doc["spec"]["template"]["spec"],
    }
}

fn pod_annotations(doc: &Value) -> &Value {
    match doc["kind"].as_str() {
        Some("Pod") => &doc["metadata"]["annotations"],
        _ => &doc["spec"]["template"]["metadata"]["annotations"],
    }
}

fn init_container<'a>(spec: &'a Value, name: &str) -> &'a Value {
    spec["initContainers"]
        .as_array()
        .and_then(|ics| ics.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no init container {name} in {spec}"))
}

#[test]
fn kubernetes_outputs_have_the_sidecar_redirect_and_identity() {
    let expected = [
        ("deployment", "spiffe://mesh.local/ns/shop/sa/web", "3000"),
        (
            "statefulset",
            "spiffe://mesh.local/ns/shop/sa/default",
            "5432",
        ),
        ("job", "spiffe://mesh.local/ns/shop/sa/reporter", "9090"),
        ("pod", "spiffe://mesh.local/ns/default/sa/default", "8000"),
    ];
    for (case, identity, port) in expected {
        let docs = parse_docs(&golden(case));
        let doc = &docs[0];
        let spec = pod_spec(doc);
        let names: Vec<&str> = spec["initContainers"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|c| c["name"].as_str())
            .collect();
        assert_eq!(
            &names[..2],
            ["meshgate-redirect", "meshgate-proxy"],
            "{case}: order"
        );
        let proxy = init_container(spec, "meshgate-proxy");
        assert_eq!(proxy["restartPolicy"], "Always", "{case}");
        assert_eq!(proxy["securityContext"]["runAsUser"], 1337, "{case}");
        assert_eq!(proxy["readinessProbe"]["httpGet"]["port"], 15020, "{case}");
        let args: Vec<&str> = proxy["args"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .collect();
        // HTTP ports are served per request, opaque ones (PostgreSQL) as L4 tunnels.
        let app = format!("127.0.0.1:{port}");
        let served = if port == "5432" {
            ["--inbound-tcp-port", port]
        } else {
            ["--app", app.as_str()]
        };
        assert!(
            args.windows(2).any(|w| w == served),
            "{case}: {served:?} not in {args:?}"
        );
        assert!(
            args.windows(2)
                .any(|w| w == ["--token-file", "/var/run/meshgate/bootstrap/token"]),
            "{case}: {args:?}"
        );
        let redirect = init_container(spec, "meshgate-redirect");
        assert_eq!(redirect["args"][5], "--app-ports", "{case}");
        assert_eq!(redirect["args"][6], port, "{case}");
        let annotations = pod_annotations(doc);
        assert_eq!(annotations["meshgate.io/identity"], identity, "{case}");
        assert_eq!(
            annotations["meshgate.io/injected"],
            env!("CARGO_PKG_VERSION"),
            "{case}"
        );
        let volumes: Vec<&str> = spec["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|v| v["name"].as_str())
            .collect();
        for v in ["meshgate-bootstrap", "meshgate-cgroup", "meshgate-bpffs"] {
            assert!(
                volumes.contains(&v),
                "{case}: volume {v} missing from {volumes:?}"
            );
        }
        // The identity comes from a projected ServiceAccount token, not a per-workload Secret.
        let bootstrap = spec["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == "meshgate-bootstrap")
            .unwrap();
        let token = &bootstrap["projected"]["sources"][0]["serviceAccountToken"];
        assert_eq!(token["audience"], "meshgate-ca", "{case}");
        assert_eq!(token["path"], "token", "{case}");
        assert!(
            token["expirationSeconds"].as_u64().unwrap() >= 600,
            "{case}"
        );
    }
}

#[test]
fn probes_on_guarded_ports_go_through_the_sidecar() {
    let docs = parse_docs(&golden("deployment"));
    let spec = pod_spec(&docs[0]);
    let web = &spec["containers"][0];
    assert_eq!(web["livenessProbe"]["httpGet"]["port"], 15020);
    assert_eq!(
        web["livenessProbe"]["httpGet"]["path"],
        "/meshgate/probe/http/3000/healthz"
    );
    assert_eq!(web["readinessProbe"]["httpGet"]["port"], 15020);
    // A tcpSocket probe becomes the sidecar's TCP check of the same port.
    assert!(web["startupProbe"].get("tcpSocket").is_none());
    assert_eq!(
        web["startupProbe"]["httpGet"]["path"],
        "/meshgate/probe/tcp/3000"
    );
    // A probe on a port that is not meshed (no containerPort) is left alone.
    assert_eq!(
        spec["containers"][1]["readinessProbe"]["httpGet"]["port"],
        2020
    );
    let proxy = init_container(spec, "meshgate-proxy");
    let args: Vec<&str> = proxy["args"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        args.ends_with(&[
            "--probe-path",
            "3000:/healthz",
            "--probe-path",
            "3000:/ready",
            "--probe-tcp",
            "3000"
        ]),
        "{args:?}"
    );
    let original: Value = serde_json::from_str(
        pod_annotations(&docs[0])["meshgate.io/original-probes"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(original["web"]["livenessProbe"]["httpGet"]["port"], "http");
    assert_eq!(original["web"]["readinessProbe"]["httpGet"]["port"], 3000);
    assert_eq!(original["web"]["startupProbe"]["tcpSocket"]["port"], 3000);
}

#[test]
fn untouched_documents_pass_through_byte_for_byte() {
    let input = std::fs::read_to_string(fixtures().join("multi.yaml")).unwrap();
    let out = golden("multi");
    let docs_in: Vec<&str> = input.split("\n---\n").collect();
    let docs_out: Vec<&str> = out.split("\n---\n").collect();
    assert_eq!(docs_in.len(), docs_out.len());
    // The ConfigMap and the opted-out Deployment are unchanged.
    for i in [1, 3] {
        assert_eq!(docs_in[i], docs_out[i], "document {i}");
    }
    assert_ne!(docs_in[2], docs_out[2]);
    // The Service that selects the injected Deployment gains the mesh port and keeps its comment.
    assert!(
        docs_out[0].starts_with(docs_in[0].trim_end()),
        "{}",
        docs_out[0]
    );
    assert!(
        docs_out[0].contains("name: meshgate-mesh"),
        "{}",
        docs_out[0]
    );
}

#[test]
fn compose_output_has_the_pod_layout() {
    let docs = parse_docs(&golden("compose"));
    let services = &docs[0]["services"];
    let web = &services["web"];
    assert_eq!(web["network_mode"], "service:web-pod");
    assert_eq!(
        web["depends_on"]["web-proxy"]["condition"],
        "service_healthy"
    );
    assert_eq!(
        web["depends_on"]["web-redirect"]["condition"],
        "service_completed_successfully"
    );
    assert_eq!(web["depends_on"]["orders"]["condition"], "service_started");
    assert_eq!(
        web["labels"]["meshgate.io/identity"],
        "spiffe://mesh.local/ns/shop/sa/web"
    );
    assert!(web.get("ports").is_none());
    assert_eq!(services["web-pod"]["ports"][0], "8080:3000");
    assert_eq!(
        services["web-pod"]["networks"]["default"]["aliases"][0],
        "web"
    );
    assert_eq!(
        services["orders-pod"]["networks"]["backend"]["aliases"][0],
        "orders"
    );
    assert_eq!(services["orders-proxy"]["command"][2], "127.0.0.1:8081");
    assert_eq!(
        services["orders-proxy"]["command"][8],
        "/var/lib/meshgate/bootstrap/tokens/shop.orders-api.token"
    );
    let redirect: Vec<&str> = services["web-redirect"]["command"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(redirect.ends_with(&["--mesh", "0.0.0.0/0:3000", "--mesh", "0.0.0.0/0:8081"]));
    let ca: Vec<&str> = services["ca"]["command"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        ca.windows(2)
            .any(|w| w == ["--token-for", "spiffe://mesh.local/ns/shop/sa/orders-api"])
    );
    // Opted out and infrastructure services get no companions.
    for absent in ["db-pod", "ca-pod", "control-plane-proxy"] {
        assert!(services.get(absent).is_none(), "{absent}");
    }
    assert!(docs[0]["volumes"].get("meshgate-bootstrap").is_some());
}

#[test]
fn flags_change_image_trust_domain_and_urls() {
    let input = std::fs::read_to_string(fixtures().join("pod.yaml")).unwrap();
    let out = ok_stdout(inject(
        &[
            "--image",
            "registry.example/meshgate:1.0",
            "--trust-domain",
            "prod.example",
            "--ca-url",
            "https://ca.example:15012",
            "--control-plane-url",
            "https://cp.example:15010",
            "-",
        ],
        Some(&input),
    ));
    let docs = parse_docs(&out);
    let proxy = init_container(pod_spec(&docs[0]), "meshgate-proxy");
    assert_eq!(proxy["image"], "registry.example/meshgate:1.0");
    let args: Vec<&str> = proxy["args"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        args.windows(2)
            .any(|w| w == ["--ca", "https://ca.example:15012"])
    );
    assert!(
        args.windows(2)
            .any(|w| w == ["--control-plane", "https://cp.example:15010"])
    );
    assert_eq!(
        pod_annotations(&docs[0])["meshgate.io/identity"],
        "spiffe://prod.example/ns/default/sa/default"
    );
}

const COMPOSE_MESH: &str = "services:
  ca:
    image: meshgate:local
    command: [ca, serve]
    labels: {meshgate.io/role: ca}
  control-plane:
    image: meshgate:local
    command: [control-plane, serve]
    labels: {meshgate.io/role: control-plane}
";

#[test]
fn refuses_what_it_does_not_understand() {
    // (case, extra flags, input on stdin, what the message must name)
    let cases: [(&str, &[&str], String, &[&str]); 10] = [
        (
            "compose network_mode host",
            &[],
            format!("{COMPOSE_MESH}  web:\n    image: web\n    network_mode: host\n    expose: ['80']\n"),
            &["compose service web", "network_mode: host"],
        ),
        (
            "compose service without a port",
            &[],
            format!("{COMPOSE_MESH}  worker:\n    image: worker\n"),
            &["compose service worker", "meshgate.io/app-port"],
        ),
        (
            "compose without a CA",
            &[],
            "services:\n  web:\n    image: web\n    expose: ['80']\n".into(),
            &["compose file", "meshgate.io/role: ca"],
        ),
        ("not a manifest", &[], "just: data\n".into(), &["stdin", "cannot tell"]),
        (
            "bad port annotation",
            &[],
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p, annotations: {meshgate.io/skip-inbound-ports: \"80,http\"}}\nspec:\n  containers: [{name: a, image: a, ports: [{containerPort: 80}]}]\n".into(),
            &["Pod/p", "meshgate.io/skip-inbound-ports", "\"http\""],
        ),
        (
            "app port on a sidecar port",
            &[],
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers: [{name: a, image: a, ports: [{containerPort: 15006}]}]\n".into(),
            &["Pod/p", "15006", "meshgate.io/skip-inbound-ports"],
        ),
        (
            "container name collision",
            &[],
            "apiVersion: v1\nkind: Pod\nmetadata: {name: odd}\nspec:\n  containers: [{name: meshgate-redirect, image: a, ports: [{containerPort: 80}]}]\n".into(),
            &["Pod/odd", "meshgate-redirect"],
        ),
        (
            "worker threads annotation out of range",
            &[],
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p, annotations: {meshgate.io/proxy-worker-threads: \"0\"}}\nspec:\n  containers: [{name: a, image: a, ports: [{containerPort: 80}]}]\n".into(),
            &["Pod/p", "annotation meshgate.io/proxy-worker-threads", "1 to 1024"],
        ),
        (
            "worker threads label not a number",
            &[],
            format!("{COMPOSE_MESH}  web:\n    image: web\n    expose: ['80']\n    labels: {{meshgate.io/proxy-worker-threads: many}}\n"),
            &["compose service web", "label meshgate.io/proxy-worker-threads", "\"many\""],
        ),
        (
            "invalid trust domain",
            &["--trust-domain", "Mesh/Local"],
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers: [{name: a, image: a, ports: [{containerPort: 80}]}]\n".into(),
            &["Pod/p", "not a valid SPIFFE ID"],
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    for (name, flags, input, needles) in cases {
        let target = dir.path().join("out.yaml");
        let mut args = flags.to_vec();
        args.extend(["-o", target.to_str().unwrap(), "-"]);
        let out = inject(&args, Some(&input));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name}: should have been refused");
        for needle in needles {
            assert!(
                stderr.contains(needle),
                "{name}: {needle:?} not in {stderr:?}"
            );
        }
        assert!(stderr.contains("fix:"), "{name}: no fix in {stderr:?}");
        assert!(out.stdout.is_empty(), "{name}: wrote to stdout");
        assert!(!target.exists(), "{name}: wrote the output file");
    }
}

/// `--worker-threads` sets every injected sidecar's threads unless the workload's own
/// annotation or label says otherwise, in both output formats; out of range it is refused.
#[test]
fn worker_threads_flag_sets_the_sidecars_default() {
    let pods = "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec:\n  containers: [{name: a, image: a, ports: [{containerPort: 80}]}]\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: b, annotations: {meshgate.io/proxy-worker-threads: \"4\"}}\nspec:\n  containers: [{name: b, image: b, ports: [{containerPort: 80}]}]\n";
    let compose = format!(
        "{COMPOSE_MESH}  a:\n    image: a\n    expose: ['80']\n  b:\n    image: b\n    expose: ['80']\n    labels: {{meshgate.io/proxy-worker-threads: \"4\"}}\n"
    );
    // (input, flags, the thread counts the output must carry, in document order)
    let cases: [(&str, &[&str], [&str; 2]); 4] = [
        (pods, &[], ["1", "4"]),
        (pods, &["--worker-threads", "2"], ["2", "4"]),
        (&compose, &[], ["1", "4"]),
        (&compose, &["--worker-threads", "3"], ["3", "4"]),
    ];
    for (input, flags, want) in cases {
        let out = inject(flags, Some(input));
        assert!(
            out.status.success(),
            "{flags:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let values: Vec<String> = text
            .lines()
            .zip(text.lines().skip(1))
            .filter_map(|(line, next)| {
                let line = line.trim();
                if let Some(v) = line.strip_prefix("MESHGATE_WORKER_THREADS:") {
                    return Some(v.trim().trim_matches(['"', '\'']).to_owned());
                }
                (line == "- name: MESHGATE_WORKER_THREADS").then(|| {
                    let v = next
                        .trim()
                        .strip_prefix("value:")
                        .expect("value after name");
                    v.trim().trim_matches(['"', '\'']).to_owned()
                })
            })
            .collect();
        assert_eq!(values, want, "{flags:?}:\n{text}");
    }
    let out = inject(&["--worker-threads", "0"], Some(pods));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("1..=1024"),
        "{stderr}"
    );
}

#[test]
fn dry_run_prints_a_diff_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("deployment.yaml");
    std::fs::copy(fixtures().join("deployment.yaml"), &input).unwrap();
    let before = std::fs::read(&input).unwrap();
    let target = dir.path().join("out.yaml");
    let out = inject(
        &[
            "--dry-run",
            "-o",
            target.to_str().unwrap(),
            input.to_str().unwrap(),
        ],
        None,
    );
    // Like `diff`: 1 when there are changes.
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let diff = String::from_utf8(out.stdout).unwrap();
    assert!(
        diff.lines()
            .any(|l| l.starts_with("+  ") && l.contains("name: meshgate-proxy")),
        "{diff}"
    );
    assert!(diff.lines().any(|l| l.starts_with("@@")), "{diff}");
    assert!(!target.exists());
    assert_eq!(std::fs::read(&input).unwrap(), before);
}

#[test]
fn writes_the_output_file() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("out.yaml");
    let input = fixtures().join("job.yaml");
    let out = inject(
        &["-o", target.to_str().unwrap(), input.to_str().unwrap()],
        None,
    );
    assert!(ok_stdout(out).is_empty());
    assert_eq!(std::fs::read_to_string(&target).unwrap(), golden("job"));
}

/// The compose demo that CI runs (tests/it/compose.rs) is exactly what `meshgate inject` makes of
/// `examples/compose/mesh.yml`: regenerate it with the command in the message.
#[test]
fn the_compose_demo_is_the_injected_example() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/compose");
    let image = "${MESHGATE_IMAGE:-meshgate:local}";
    let src = dir.join("mesh.yml");
    let generated = ok_stdout(inject(&[src.to_str().unwrap(), "--image", image], None));
    let committed = std::fs::read_to_string(dir.join("docker-compose.yml")).unwrap();
    assert!(
        generated == committed,
        "examples/compose/docker-compose.yml is stale: run \
         `meshgate inject examples/compose/mesh.yml --image '{image}' -o examples/compose/docker-compose.yml`"
    );
    // The edge service keeps its published port unguarded; the others are guarded.
    let doc = &parse_docs(&generated)[0];
    let redirect_cmd = |svc: &str| -> Vec<String> {
        doc["services"][format!("{svc}-redirect")]["command"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    };
    assert!(!redirect_cmd("web").contains(&"--app-ports".to_string()));
    for svc in ["orders", "payments"] {
        let cmd = redirect_cmd(svc);
        let i = cmd.iter().position(|a| a == "--app-ports").unwrap();
        assert_eq!(cmd[i + 1], "8080", "{svc}");
    }
}

/// A service that publishes ports without `meshgate.io/public` gets a warning (its app port will
/// answer only through the sidecar); `--dry-run` exits 0 when nothing would change.
#[test]
fn published_ports_without_public_warn_and_a_clean_dry_run_exits_0() {
    let mesh = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/compose/mesh.yml");
    let text = std::fs::read_to_string(&mesh).unwrap();
    let quiet = inject(&["-"], Some(&text));
    assert!(quiet.status.success());
    assert!(
        !String::from_utf8_lossy(&quiet.stderr).contains("warning"),
        "{}",
        String::from_utf8_lossy(&quiet.stderr)
    );
    let private = text.replace(", meshgate.io/public: \"true\"", "");
    assert_ne!(private, text);
    let warned = inject(&["-"], Some(&private));
    assert!(warned.status.success());
    let stderr = String::from_utf8_lossy(&warned.stderr);
    assert!(
        stderr.contains("publishes ports (127.0.0.1:${MESHGATE_WEB_PORT:-8080}:8080)")
            && stderr.contains("meshgate.io/public: \"true\""),
        "{stderr}"
    );

    let injected = String::from_utf8(quiet.stdout).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("docker-compose.yml");
    std::fs::write(&file, &injected).unwrap();
    let again = inject(&["--dry-run", file.to_str().unwrap()], None);
    assert_eq!(
        again.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert!(again.stdout.is_empty());
}

/// The operations guide's snippet for an existing compose file (the CA and the control plane)
/// plus the user's own service injects cleanly: the documented way in works.
#[test]
fn the_documented_snippet_makes_an_existing_compose_file_injectable() {
    let guide = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/operations.md"),
    )
    .unwrap();
    let start = guide
        .find("```yaml\nservices:\n  ca:\n")
        .expect("docs/operations.md has the CA + control plane snippet")
        + "```yaml\n".len();
    let snippet = &guide[start..start + guide[start..].find("```").unwrap()];
    let app = "  shop:\n    image: nginx\n    labels: { meshgate.io/app-port: \"80\" }\n";
    let compose = snippet.replacen("services:\n", &format!("services:\n{app}"), 1);
    let plain = inject(
        &["-"],
        Some(app.replace("  shop:", "services:\n  shop:").as_str()),
    );
    assert!(
        !plain.status.success(),
        "without the snippet inject must refuse"
    );
    let out = ok_stdout(inject(&["-"], Some(&compose)));
    assert!(out.contains("shop-proxy:"), "{out}");
    assert!(
        out.contains("spiffe://mesh.local/ns/default/sa/shop"),
        "{out}"
    );
}

/// Services inject leaves alone, written with comments, 4-space indentation and quoting.
const UNTOUCHED: &str = "    # The database is not meshed.
    db:
        image:   'postgres:17'   # pinned
        environment:
            POSTGRES_PASSWORD: \"example\"
        labels:
            meshgate.io/inject: \"disabled\"

    control-plane:
        image: meshgate:local
        command: [control-plane, serve]
        labels: {meshgate.io/role: control-plane}   # the mesh's control plane
";

/// A compose file where only `ca` (one more `--token-for`) and `web` (injected) change.
fn odd_compose() -> String {
    format!(
        "# Shop, written by hand.\nservices:\n    ca:\n        image: meshgate:local\n        command: [ca, serve]\n        labels: {{meshgate.io/role: ca}}\n\n{UNTOUCHED}\n    web:\n        image: shop/web\n        expose: [\"3000\"]\n"
    )
}

#[test]
fn untouched_compose_services_stay_byte_for_byte() {
    let input = odd_compose();
    let out = ok_stdout(inject(&["-"], Some(&input)));
    assert!(
        out.starts_with("# Shop, written by hand.\nservices:\n    ca:\n"),
        "{out}"
    );
    assert!(
        out.contains(UNTOUCHED),
        "untouched services changed:\n{out}"
    );
    assert!(
        out.contains("\n    web-proxy:\n        image: meshgate:local\n"),
        "{out}"
    );

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("docker-compose.yml");
    std::fs::write(&file, &input).unwrap();
    let dry = inject(&["--dry-run", file.to_str().unwrap()], None);
    assert_eq!(
        dry.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&dry.stderr)
    );
    let diff = String::from_utf8(dry.stdout).unwrap();
    let changed: Vec<&str> = diff
        .lines()
        .filter(|l| {
            (l.starts_with('+') || l.starts_with('-'))
                && !l.starts_with("+++")
                && !l.starts_with("---")
        })
        .collect();
    assert!(!changed.is_empty(), "{diff}");
    // Only ca's command and web's port move are removed lines: nothing of the untouched services
    // (or of the header) is rewritten; everything added is the injection's.
    let removed: Vec<&str> = changed
        .iter()
        .filter(|l| l.starts_with('-'))
        .copied()
        .collect();
    assert_eq!(
        removed,
        [
            "-        command: [ca, serve]",
            "-        expose: [\"3000\"]"
        ],
        "{diff}"
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), input);
}

#[test]
fn a_file_that_needs_no_change_has_an_empty_dry_run() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("docker-compose.yml");
    // Already injected, with the user's comments and indentation intact.
    let injected = ok_stdout(inject(&["-"], Some(&odd_compose())));
    std::fs::write(&file, &injected).unwrap();
    // And a file with nothing to inject at all.
    let plain = dir.path().join("plain.yml");
    std::fs::write(&plain, format!("# nothing to mesh\nservices:\n{UNTOUCHED}")).unwrap();
    for f in [&file, &plain] {
        let dry = inject(&["--dry-run", f.to_str().unwrap()], None);
        assert_eq!(
            dry.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&dry.stderr)
        );
        assert!(
            dry.stdout.is_empty(),
            "{}",
            String::from_utf8_lossy(&dry.stdout)
        );
    }
}

/// What injection cannot make work is said on stderr; the CA bundle ConfigMap and the meshgate
/// Service documents are produced on request, and a second run adds nothing.
#[test]
fn kubernetes_warnings_bundle_and_mesh_services() {
    let input = "apiVersion: apps/v1
kind: DaemonSet
metadata: {name: node-agent, namespace: ops}
spec:
  template:
    spec:
      hostNetwork: true
      containers: [{name: a, image: a}]
---
apiVersion: batch/v1
kind: CronJob
metadata: {name: loadgen, namespace: shop}
spec:
  schedule: '*/5 * * * *'
  jobTemplate:
    spec:
      template:
        spec:
          serviceAccountName: loadgen
          restartPolicy: Never
          containers: [{name: gen, image: gen}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: dns-cache, namespace: shop}
spec:
  template:
    metadata: {labels: {app: dns-cache}}
    spec:
      serviceAccountName: dns-cache
      containers:
        - name: cache
          image: cache
          ports: [{containerPort: 8053, protocol: UDP}, {name: metrics, containerPort: 9153}]
---
apiVersion: v1
kind: Service
metadata: {name: dns-cache, namespace: shop}
spec:
  selector: {app: dns-cache}
  ports: [{name: http-metrics, port: 80, targetPort: metrics}]
";
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("bundle.pem");
    std::fs::write(
        &bundle,
        "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let services = dir.path().join("mesh-services.yaml");
    let out = inject(
        &[
            "--ca-bundle",
            bundle.to_str().unwrap(),
            "--services-out",
            services.to_str().unwrap(),
            "-",
        ],
        Some(input),
    );
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let text = ok_stdout(out);
    for needle in [
        "DaemonSet/node-agent: not injected: it uses hostNetwork",
        "CronJob/loadgen: no containerPort to mesh: injected as outbound-only",
        "Deployment/dns-cache: container cache port 8053/UDP is not meshed",
    ] {
        assert!(stderr.contains(needle), "{needle:?} not in {stderr}");
    }
    let docs = parse_docs(&text);
    let cron = &docs[1]["spec"]["jobTemplate"]["spec"]["template"]["spec"];
    assert_eq!(
        init_container(cron, "meshgate-proxy")["restartPolicy"],
        "Always"
    );
    let bundles: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == "meshgate-ca-bundle")
        .collect();
    assert_eq!(bundles.len(), 1, "one bundle, for namespace shop: {text}");
    assert_eq!(bundles[0]["metadata"]["namespace"], "shop");
    assert!(
        bundles[0]["data"]["ca-bundle.pem"]
            .as_str()
            .unwrap()
            .contains("BEGIN CERTIFICATE")
    );
    let svc = &docs[3];
    let mesh_port = svc["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "meshgate-mesh")
        .expect("mesh port added to the Service");
    assert_eq!(mesh_port["port"], 15006);
    // The meshgate Service documents load as policy and name the callee's identity.
    let mesh = std::fs::read_to_string(&services).unwrap();
    let set = meshgate_policy::load::load_text(&services, &mesh)
        .unwrap_or_else(|e| panic!("{e:?}\n{mesh}"));
    drop(set);
    let mesh_docs = parse_docs(&mesh);
    assert_eq!(mesh_docs.len(), 1, "{mesh}");
    let spec = &mesh_docs[0]["spec"];
    assert_eq!(spec["identity"], "spiffe://mesh.local/ns/shop/sa/dns-cache");
    assert_eq!(spec["ports"][0]["port"], 80);
    assert_eq!(spec["ports"][0]["targetPort"], 9153);
    assert_eq!(
        spec["endpoints"][0],
        "dns-cache.shop.svc.cluster.local:15006"
    );
    // Idempotent: the bundle is not added twice, nothing else changes.
    let again = ok_stdout(inject(
        &["--ca-bundle", bundle.to_str().unwrap(), "-"],
        Some(&text),
    ));
    assert_eq!(again, text);
}
