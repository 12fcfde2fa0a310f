//! Loader tests: the example documents, every refusal with its file:line, layouts, versions.

use std::path::Path;

use crate::load::{PolicySet, load_dir, load_text, parse_file};
use crate::model::{Action, DefaultAction, Mode, Protocol};

const EXAMPLE: &str = r#"apiVersion: meshgate.dev/v1
kind: AuthorizationPolicy
metadata: { name: orders-readers, namespace: shop }
spec:
  selector: { account: orders }
  action: ALLOW
  mode: enforce
  rules:
    - from: [{ principals: ["spiffe://mesh.local/ns/shop/sa/web"], notPrincipals: ["spiffe://mesh.local/ns/shop/sa/bad"] }]
      to:   [{ methods: ["GET"], notMethods: ["POST"], paths: ["/orders", "/orders/*"], notPaths: ["/orders/admin"], ports: [8080], notPorts: [9090] }]
      when: [{ header: "x-tenant", values: ["a", "b*"], notValues: ["bx"] }]
---
apiVersion: meshgate.dev/v1
kind: Service
metadata: { name: orders, namespace: shop }
spec:
  identity: spiffe://mesh.local/ns/shop/sa/orders
  hosts: [orders, orders.shop]
  ports: [{ port: 8080, protocol: http }]
  endpoints: ["127.0.0.1:15006"]
---
apiVersion: meshgate.dev/v1
kind: NetworkPolicy
metadata: { name: shop-egress, namespace: shop }
spec:
  selector: { account: web }
  egress:  [{ to: ["10.0.0.0/8"], ports: [443] }]
  ingress: [{ from: ["192.168.0.0/16"], ports: [8080] }]
---
apiVersion: meshgate.dev/v1
kind: MeshConfig
metadata: { name: default, namespace: meshgate }
spec: { defaultAction: ALLOW, trustDomain: mesh.local }
"#;

fn write(dir: &Path, rel: &str, text: &str) {
    let path = dir.join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

fn load_one(text: &str) -> Result<PolicySet, Vec<(usize, String)>> {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "p.yaml", text);
    load_dir(dir.path()).map_err(|e| e.0.into_iter().map(|v| (v.line, v.reason)).collect())
}

#[test]
fn example_documents_load() {
    let set = load_one(EXAMPLE).unwrap();
    assert_eq!(set.policies.len(), 1);
    let p = &set.policies[0];
    assert_eq!(p.metadata.key(), "shop/orders-readers");
    assert_eq!(p.spec.action, Action::Allow);
    assert_eq!(p.spec.mode, Mode::Enforce);
    assert_eq!(p.spec.rules[0].to[0].paths, ["/orders", "/orders/*"]);
    assert_eq!(p.spec.rules[0].when[0].not_values, ["bx"]);
    let s = &set.services[0];
    assert_eq!(
        s.spec.identity.as_str(),
        "spiffe://mesh.local/ns/shop/sa/orders"
    );
    assert_eq!(s.spec.hosts, ["orders", "orders.shop"]);
    assert_eq!(s.spec.ports[0].protocol, Protocol::Http);
    assert_eq!(s.spec.endpoints, ["127.0.0.1:15006"]);
    let n = &set.network_policies[0];
    assert_eq!(n.spec.egress[0].to[0].to_string(), "10.0.0.0/8");
    assert_eq!(set.mesh_config.spec.default_action, DefaultAction::Allow);
    assert_eq!(set.version.len(), 16);
}

#[test]
fn documents_round_trip_through_serde() {
    let set = load_one(EXAMPLE).unwrap();
    let yaml = serde_saphyr::to_string(&set.policies[0]).unwrap();
    assert!(yaml.contains("apiVersion: meshgate.dev/v1"), "{yaml}");
    assert!(yaml.contains("kind: AuthorizationPolicy"), "{yaml}");
    let back: crate::model::AuthorizationPolicy = serde_saphyr::from_str(&yaml).unwrap();
    assert_eq!(back, set.policies[0]);
    let json = serde_json::to_value(&set.services[0]).unwrap();
    assert_eq!(
        json["spec"]["identity"],
        "spiffe://mesh.local/ns/shop/sa/orders"
    );
}

#[test]
fn load_text_agrees_with_a_one_file_directory() {
    let file = Path::new("p.yaml");
    let set = load_text(file, EXAMPLE).unwrap();
    assert_eq!(set.version, load_one(EXAMPLE).unwrap().version);
    let bad = EXAMPLE.replace("action: ALLOW", "action: MAYBE");
    let err = load_text(file, &bad).unwrap_err();
    let want: Vec<(usize, String)> = load_one(&bad).unwrap_err();
    let got: Vec<(usize, String)> = err.0.iter().map(|v| (v.line, v.reason.clone())).collect();
    assert_eq!(got, want);
    assert!(err.0.iter().all(|v| v.file == file));
}

/// Found by the `policy_load` fuzz target (fuzz/corpus/policy_load/regress-bare-cr): YAML counts
/// a lone CR as a line break, the loader's file lines do not, so the reported line could lie
/// past the end of the file ("line 3" of a two-line file).
#[test]
fn bare_carriage_return_is_refused_at_its_line() {
    let text = "apiVersion: meshgate.dev/v1 # a\rkind: MeshConfig\nspec: {";
    let err = load_one(text).unwrap_err();
    assert_eq!(err.len(), 1, "{err:?}");
    assert_eq!(err[0].0, 1);
    assert!(err[0].1.contains("carriage return"), "{err:?}");
    let text = "# ok\r\n# ok\r\n# bad\r";
    assert_eq!(load_one(text).unwrap_err()[0].0, 3);
    // CRLF files still load.
    assert!(load_one(&EXAMPLE.replace('\n', "\r\n")).is_ok());
}

#[test]
fn empty_directory_is_valid() {
    let dir = tempfile::tempdir().unwrap();
    let set = load_dir(dir.path()).unwrap();
    assert!(set.policies.is_empty());
    assert_eq!(set.mesh_config.spec.default_action, DefaultAction::Deny);
    assert!(!set.version.is_empty());
}

#[test]
fn missing_directory_is_an_error() {
    let err = load_dir(Path::new("/nonexistent/meshgate-policies")).unwrap_err();
    assert_eq!(err.0.len(), 1);
    assert!(
        err.0[0].reason.contains("policy directory does not exist"),
        "{err}"
    );
}

fn policy(name: &str, extra_spec: &str) -> String {
    format!(
        "apiVersion: meshgate.dev/v1\nkind: AuthorizationPolicy\nmetadata: {{ name: {name}, namespace: shop }}\nspec:\n  action: ALLOW\n{extra_spec}"
    )
}

/// Every refusal: (document, expected line, a piece of the reason).
#[test]
fn refusals_with_file_and_line() {
    let rule = |to: &str| policy("p", &format!("  rules:\n    - {to}\n"));
    let cases: Vec<(String, usize, &str)> = vec![
        (
            "apiVersion: meshgate.dev/v1\nkind: Gateway\nmetadata: { name: a, namespace: b }\nspec: {}\n".into(),
            2,
            "unknown kind \"Gateway\"",
        ),
        (
            "apiVersion: meshgate.dev/v2\nkind: Service\n".into(),
            1,
            "unsupported apiVersion",
        ),
        ("kind: Service\n".into(), 1, "no apiVersion"),
        ("apiVersion: meshgate.dev/v1\n".into(), 1, "no kind"),
        (policy("p", "  colour: red\n"), 6, "colour"),
        (rule("to: [{ notPath: [\"/a\"] }]"), 7, "notPath"),
        (policy("p", "  action: DENY\n"), 6, ""),
        (policy("p", "  mode: maybe\n"), 6, "maybe"),
        (
            "apiVersion: meshgate.dev/v1\nkind: AuthorizationPolicy\nmetadata: { name: p, namespace: shop }\nspec:\n  rules: []\n".into(),
            5,
            "missing field `action`",
        ),
        (rule("from: [{ principals: [\"web\"] }]"), 7, "principal \"web\""),
        (
            rule("from: [{ notPrincipals: [\"spiffe://Mesh/ns/a\"] }]"),
            7,
            "not a valid SPIFFE ID",
        ),
        (
            rule("from: [{ principals: [\"spiffe://mesh.local/*/sa/web\"] }]"),
            7,
            "'*' may appear only once",
        ),
        (rule("to: [{ paths: [\"orders\"] }]"), 7, "must start with '/'"),
        (rule("to: [{ notPaths: [\"/a/*/b\"] }]"), 7, "'*' may appear only once"),
        (rule("to: [{ paths: [\"/a/../b\"] }]"), 7, "normalized form"),
        (rule("to: [{ methods: [\"GET POST\"] }]"), 7, "RFC 9110"),
        (rule("to: [{ notMethods: [\"\"] }]"), 7, "RFC 9110"),
        (rule("to: [{ methods: [\"delete\"] }]"), 7, "write \"DELETE\""),
        (rule("to: [{ notMethods: [\"Get\"] }]"), 7, "canonical form"),
        (rule("to: [{ ports: [0] }]"), 7, "port 0"),
        (rule("to: [{ notPorts: [0] }]"), 7, "port 0"),
        (rule("to: [{ ports: [70000] }]"), 7, "not a port number"),
        (rule("when: [{ header: \"x y\" }]"), 7, "header name"),
        (
            "apiVersion: meshgate.dev/v1\nkind: NetworkPolicy\nmetadata: { name: n, namespace: shop }\nspec:\n  egress:\n    - to: [\"10.0.0.0/33\"]\n".into(),
            6,
            "invalid CIDR \"10.0.0.0/33\"",
        ),
        (
            "apiVersion: meshgate.dev/v1\nkind: NetworkPolicy\nmetadata: { name: n, namespace: shop }\nspec:\n  ingress:\n    - from: [\"10.0.0.1/8\"]\n".into(),
            6,
            "host bits",
        ),
        (
            "apiVersion: meshgate.dev/v1\nkind: NetworkPolicy\nmetadata: { name: n, namespace: shop }\nspec:\n  egress:\n    - to: [\"10.0.0.0/8\"]\n      ports: [0]\n".into(),
            5,
            "port 0",
        ),
        (
            "apiVersion: meshgate.dev/v1\nkind: Service\nmetadata: { name: s, namespace: shop }\nspec:\n  identity: spiffe://mesh.local/ns/shop/sa/../x\n".into(),
            5,
            "'.' or '..'",
        ),
        (
            "apiVersion: meshgate.dev/v1\nkind: Service\nmetadata: { name: s, namespace: shop }\nspec:\n  identity: spiffe://mesh.local/ns/shop/sa/s\n  ports: [{ port: 0 }]\n".into(),
            6,
            "port 0",
        ),
        (
            "apiVersion: meshgate.dev/v1\nkind: Service\nmetadata: { name: s, namespace: shop }\nspec:\n  identity: spiffe://mesh.local/ns/shop/sa/s\n  endpoints: [\"127.0.0.1\"]\n".into(),
            6,
            "host:port",
        ),
        (
            "apiVersion: meshgate.dev/v1\nkind: MeshConfig\nmetadata: { name: default, namespace: shop }\nspec: {}\n".into(),
            3,
            "namespace \"meshgate\"",
        ),
        (
            "apiVersion: meshgate.dev/v1\nkind: MeshConfig\nmetadata: { name: default, namespace: meshgate }\nspec: { trustDomain: Mesh.Local }\n".into(),
            4,
            "trustDomain",
        ),
        (
            "apiVersion: meshgate.dev/v1\nkind: MeshConfig\nmetadata: { name: a, namespace: meshgate }\nspec: {}\n---\napiVersion: meshgate.dev/v1\nkind: MeshConfig\nmetadata: { name: b, namespace: meshgate }\nspec: {}\n".into(),
            6,
            "more than one MeshConfig",
        ),
        (
            format!("{}---\n{}", policy("dup", "  rules: []\n"), policy("dup", "")),
            10,
            "duplicate AuthorizationPolicy \"shop/dup\"",
        ),
        (
            policy("p", "").replace("namespace: shop", "namespace: \"a/b\""),
            3,
            "metadata.namespace",
        ),
        (policy("p", "  selector: { account: \"\" }\n"), 6, "selector.account"),
        ("just a string\n".into(), 1, ""),
        ("a: [unclosed\n".into(), 1, ""),
    ];
    for (yaml, line, reason) in cases {
        let errors = load_one(&yaml).expect_err(&yaml);
        if std::env::var_os("SHOW_REASONS").is_some() {
            eprintln!("{errors:?}");
        }
        assert!(
            errors.iter().any(|(l, r)| *l == line && r.contains(reason)),
            "want line {line} containing {reason:?}, got {errors:?}\n---\n{yaml}"
        );
    }
}

#[test]
fn errors_are_collected_across_documents_and_files() {
    let dir = tempfile::tempdir().unwrap();
    let bad = policy("a", "  rules:\n    - to: [{ ports: [0] }]\n");
    write(
        dir.path(),
        "a.yaml",
        &format!("{bad}---\n{}", policy("b", "  bogus: 1\n")),
    );
    write(
        dir.path(),
        "sub/c.yml",
        &policy("c", "  rules:\n    - to: [{ methods: [\"G T\"] }]\n"),
    );
    write(dir.path(), "sub/d.yaml", &policy("a", ""));
    let err = load_dir(dir.path()).unwrap_err();
    let got: Vec<(String, usize)> = err
        .0
        .iter()
        .map(|e| {
            (
                e.file.file_name().unwrap().to_string_lossy().into_owned(),
                e.line,
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("a.yaml".to_string(), 7),
            ("a.yaml".to_string(), 14),
            ("c.yml".to_string(), 7),
            ("d.yaml".to_string(), 3),
        ],
        "{err}"
    );
    let text = err.to_string();
    assert!(text.contains("a.yaml:7: "), "{text}");
    assert!(text.contains("already defined at"), "{text}");
}

#[test]
fn directory_walk_is_recursive_sorted_and_skips_hidden_and_other_files() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "b.yaml", &policy("b", ""));
    write(dir.path(), "a/x.yml", &policy("a", ""));
    write(dir.path(), "README.md", "not yaml: [");
    write(dir.path(), ".git/x.yaml", "broken: [");
    write(dir.path(), "..data/p.yaml", &policy("b", ""));
    let set = load_dir(dir.path()).unwrap();
    let names: Vec<&str> = set
        .policies
        .iter()
        .map(|p| p.metadata.name.as_str())
        .collect();
    assert_eq!(names, ["a", "b"]);
}

#[test]
fn version_depends_on_content_only() {
    let p1 = policy("one", "  rules: [{}]\n");
    let p2 = policy("two", "");
    let one_file = load_one(&format!("{p1}---\n{p2}")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "z.yaml", &format!("# comment\n{p1}"));
    write(dir.path(), "a/b.yml", &p2);
    let two_files = load_dir(dir.path()).unwrap();
    assert_eq!(one_file.version, two_files.version);
    let reordered = load_one(&format!("{p2}---\n{p1}")).unwrap();
    assert_eq!(one_file.version, reordered.version);
    let changed = load_one(&format!("{p1}---\n{}", policy("two", "  mode: dry-run\n"))).unwrap();
    assert_ne!(one_file.version, changed.version);
    assert_eq!(
        load_one(&p1).unwrap().version,
        load_one(&p1).unwrap().version
    );
}

#[test]
fn parse_file_appends_and_refuses_duplicates_of_the_set() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.yaml", &policy("a", ""));
    write(dir.path(), "svc.yaml", EXAMPLE);
    let mut set = load_dir(&dir.path().join("a.yaml").with_file_name("nothing-here"))
        .map_err(|_| ())
        .unwrap_or_default();
    parse_file(&dir.path().join("a.yaml"), &mut set).unwrap();
    let v1 = set.version.clone();
    parse_file(&dir.path().join("svc.yaml"), &mut set).unwrap();
    assert_eq!(set.policies.len(), 2);
    assert_eq!(set.services.len(), 1);
    assert_ne!(set.version, v1);
    let before = set.clone();
    let err = parse_file(&dir.path().join("a.yaml"), &mut set).unwrap_err();
    assert!(
        err.to_string().contains("a previously loaded file"),
        "{err}"
    );
    assert_eq!(set.policies, before.policies);
    assert_eq!(set.version, before.version);
}

#[test]
fn the_shipped_example_policies_are_valid() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/policies");
    let set =
        crate::load_dir(&dir).unwrap_or_else(|e| panic!("examples/policies must stay valid:\n{e}"));
    assert_eq!(set.policies.len(), 4);
}

#[test]
fn l7_rules_on_an_opaque_tcp_port_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let docs = r#"apiVersion: meshgate.dev/v1
kind: Service
metadata: { name: db, namespace: shop }
spec:
  identity: spiffe://mesh.local/ns/shop/sa/db
  hosts: [db]
  ports: [{ port: 5432, protocol: tcp }]
  endpoints: ["127.0.0.1:15006"]
---
apiVersion: meshgate.dev/v1
kind: AuthorizationPolicy
metadata: { name: db-readers, namespace: shop }
spec:
  selector: { account: db }
  action: ALLOW
  rules:
    - to: [{ ports: [5432] }]
    - to: [{ methods: ["GET"], ports: [5432] }]
"#;
    std::fs::write(dir.path().join("db.yaml"), docs).unwrap();
    let errors = crate::load_dir(dir.path()).unwrap_err();
    assert_eq!(errors.0.len(), 1, "{errors}");
    let e = &errors.0[0];
    assert_eq!(e.line, 18, "points at the offending rule");
    assert!(
        e.reason.contains("rule 1")
            && e.reason.contains("5432")
            && e.reason.contains("protocol: tcp"),
        "{}",
        e.reason
    );
    // The ports-only rule alone is fine.
    std::fs::write(
        dir.path().join("db.yaml"),
        docs.replace("    - to: [{ methods: [\"GET\"], ports: [5432] }]\n", ""),
    )
    .unwrap();
    crate::load_dir(dir.path()).unwrap();
}

/// A valid document padded past the limit: refused by size, named with the file and the limit,
/// without being parsed.
#[test]
fn oversize_files_and_directories_are_refused_with_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let padding = format!("# {}\n", "x".repeat(1023)).repeat(5 * 1024);
    write(
        dir.path(),
        "big.yaml",
        &format!("{}{padding}", policy("big", "")),
    );
    let errors = load_dir(dir.path()).unwrap_err();
    assert_eq!(errors.0.len(), 1, "{errors}");
    let text = errors.to_string();
    assert!(
        text.contains("big.yaml: policy file is 5.0 MiB, larger than the 4 MiB limit; split it"),
        "{text}"
    );

    // Several files each under the per-file limit, together over the directory limit.
    let dir = tempfile::tempdir().unwrap();
    let padding = format!("# {}\n", "x".repeat(1023)).repeat(3 * 1024);
    for n in 0..3 {
        write(
            dir.path(),
            &format!("p{n}.yaml"),
            &format!("{}{padding}", policy(&format!("p{n}"), "")),
        );
    }
    let text = load_dir(dir.path()).unwrap_err().to_string();
    assert!(
        text.contains("policy directory holds 9.0 MiB of YAML, more than the 8 MiB limit"),
        "{text}"
    );
}

/// A "billion laughs" document (nested aliases that would expand to 9^10 strings) is refused
/// with a file:line error instead of being expanded (which would take minutes and gigabytes).
#[test]
fn alias_bombs_are_refused_without_expanding() {
    let dir = tempfile::tempdir().unwrap();
    let mut bomb = String::from(
        "apiVersion: meshgate.dev/v1\nkind: AuthorizationPolicy\nmetadata: { name: bomb, namespace: shop }\nspec:\n  action: ALLOW\n  rules:\n    - to:\n        - paths: &a0 [\"/lol\", \"/lol\", \"/lol\", \"/lol\", \"/lol\", \"/lol\", \"/lol\", \"/lol\", \"/lol\"]\n",
    );
    for i in 1..10 {
        let prev = format!("*a{}", i - 1);
        bomb.push_str(&format!(
            "        - notPaths: &a{i} [{}]\n",
            [prev.as_str(); 9].join(", ")
        ));
    }
    write(dir.path(), "laughs.yaml", &bomb);
    let text = load_dir(dir.path()).unwrap_err().to_string();
    assert!(text.contains("laughs.yaml:"), "{text}");
    assert!(
        text.contains("budget"),
        "refused for another reason: {text}"
    );
}
