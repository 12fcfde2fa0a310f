//! The generated CRD schemas: structural (what the API server requires of a CRD), and in
//! agreement with the loader: every sample policy of the repository validates, and documents the
//! loader refuses for their shape (unknown field, wrong type, bad enum value, missing required
//! field, port out of range) fail the schema too.
//!
//! Validation uses the `jsonschema` crate on the schema as the API server applies it with
//! server-side field validation `Strict` (kubectl's default): an object node without
//! `x-kubernetes-preserve-unknown-fields` refuses unknown fields (that is what `additionalProperties:
//! false` says in plain JSON Schema), and `nullable: true` admits `null`.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::docsplit::split_documents;
use crate::schema::{KindSchema, kinds};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The Kubernetes schema as plain JSON Schema with Strict field validation.
fn as_strict_json_schema(node: &Value) -> Value {
    let mut out = node.clone();
    let Some(map) = out.as_object_mut() else {
        return out;
    };
    if map.remove("nullable") == Some(Value::Bool(true))
        && let Some(Value::String(t)) = map.get("type").cloned()
    {
        map.insert("type".into(), json!([t, "null"]));
        if let Some(Value::Array(values)) = map.get_mut("enum") {
            values.push(Value::Null);
        }
    }
    if let Some(Value::Object(props)) = map.get_mut("properties") {
        for v in props.values_mut() {
            *v = as_strict_json_schema(v);
        }
    }
    if let Some(items) = map.get_mut("items") {
        *items = as_strict_json_schema(items);
    }
    let preserve = map.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
    if map.contains_key("properties") && !preserve {
        map.insert("additionalProperties".into(), false.into());
    }
    out
}

fn validators() -> Vec<(KindSchema, jsonschema::Validator)> {
    kinds()
        .unwrap()
        .into_iter()
        .map(|k| {
            let v = jsonschema::validator_for(&as_strict_json_schema(&k.document()))
                .unwrap_or_else(|e| panic!("{}: schema does not compile: {e}", k.kind));
            (k, v)
        })
        .collect()
}

/// Validates one YAML document against the schema of its kind; `Err` lists the violations.
fn validate(validators: &[(KindSchema, jsonschema::Validator)], doc: &str) -> Result<(), String> {
    let value: Value = serde_saphyr::from_str(doc).map_err(|e| format!("not YAML: {e}"))?;
    let kind = value["kind"].as_str().ok_or("no kind")?;
    let (_, validator) = validators
        .iter()
        .find(|(k, _)| k.kind == kind)
        .ok_or_else(|| format!("no CRD for kind {kind}"))?;
    let errors: Vec<String> = validator
        .iter_errors(&value)
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

/// Fails on anything a structural schema may not hold, naming where.
fn assert_structural(node: &Value, at: &str) {
    let map = node
        .as_object()
        .unwrap_or_else(|| panic!("{at}: not an object"));
    for banned in [
        "$ref",
        "$defs",
        "$schema",
        "anyOf",
        "oneOf",
        "allOf",
        "not",
        "const",
        "additionalProperties",
        "x-kubernetes-preserve-unknown-fields",
    ] {
        assert!(!map.contains_key(banned), "{at}: has {banned}: {node}");
    }
    let ty = map["type"]
        .as_str()
        .unwrap_or_else(|| panic!("{at}: no type"));
    assert!(
        ["object", "array", "string", "integer", "number", "boolean"].contains(&ty),
        "{at}: type {ty}"
    );
    if let Some(f) = map.get("format") {
        assert!(
            ["int32", "int64", "float", "double"].contains(&f.as_str().unwrap()),
            "{at}: format {f}"
        );
    }
    match ty {
        "array" => assert_structural(&map["items"], &format!("{at}[]")),
        "object" => {
            if let Some(props) = map.get("properties").and_then(Value::as_object) {
                for (k, v) in props {
                    assert_structural(v, &format!("{at}.{k}"));
                }
            }
        }
        _ => assert!(!map.contains_key("properties"), "{at}: properties on {ty}"),
    }
}

#[test]
fn every_kind_has_a_structural_schema_generated_from_the_model() {
    let kinds = kinds().unwrap();
    let names: Vec<&str> = kinds.iter().map(|k| k.kind).collect();
    assert_eq!(
        names,
        [
            "AuthorizationPolicy",
            "Service",
            "NetworkPolicy",
            "MeshConfig"
        ]
    );
    for k in &kinds {
        assert_structural(&k.document(), k.kind);
    }
    // Spot checks that the schema follows the serde attributes of the model.
    let authz = &kinds[0].spec;
    assert_eq!(authz["required"], json!(["action"]));
    assert_eq!(
        authz["properties"]["action"]["enum"],
        json!(["ALLOW", "DENY", "AUDIT"])
    );
    assert!(
        authz["properties"]["action"]["description"]
            .as_str()
            .unwrap()
            .contains("AUDIT: Marks the decision"),
        "{authz}"
    );
    assert_eq!(
        authz["properties"]["mode"]["enum"],
        json!(["enforce", "dry-run"])
    );
    assert_eq!(authz["properties"]["mode"]["default"], json!("enforce"));
    assert_eq!(authz["properties"]["selector"]["nullable"], json!(true));
    let op = &authz["properties"]["rules"]["items"]["properties"]["to"]["items"];
    assert!(op["properties"]["notPaths"].is_object(), "{op}");
    assert_eq!(
        op["properties"]["ports"]["items"],
        json!({"type": "integer", "minimum": 1, "maximum": 65535})
    );
    let service = &kinds[1].spec;
    assert_eq!(
        service["properties"]["identity"]["type"],
        json!("string"),
        "{service}"
    );
    assert_eq!(
        service["properties"]["ports"]["items"]["properties"]["protocol"]["enum"],
        json!(["http", "grpc", "tcp"])
    );
    let mesh = &kinds[3].spec;
    assert_eq!(
        mesh["properties"]["defaultAction"]["enum"],
        json!(["DENY", "ALLOW"])
    );
}

/// Every policy document checked into the repository: the samples users copy, the fixtures of
/// the policy tools (all valid as a set).
fn sample_files() -> Vec<PathBuf> {
    let mut files = Vec::new();
    for dir in [
        "examples/policies",
        "tests/fixtures/policy/valid",
        "tests/fixtures/policy/changed",
        "examples/compose/policies",
    ] {
        let Ok(entries) = std::fs::read_dir(repo().join(dir)) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "yaml") {
                files.push(p);
            }
        }
    }
    files.sort();
    files
}

#[test]
fn every_sample_policy_validates_against_its_crd_schema() {
    let validators = validators();
    let files = sample_files();
    assert!(files.len() >= 6, "samples not found: {files:?}");
    let mut seen = std::collections::BTreeSet::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        // The loader accepts them (else they would not be samples).
        crate::load_text(file, &text).unwrap_or_else(|e| panic!("{e}"));
        for doc in split_documents(&text) {
            if doc.text.trim().is_empty() {
                continue;
            }
            if let Err(e) = validate(&validators, doc.text) {
                panic!("{}:{}: {e}", file.display(), doc.start_line);
            }
            let kind: Value = serde_saphyr::from_str(doc.text).unwrap();
            seen.insert(kind["kind"].as_str().unwrap().to_string());
        }
    }
    // The examples in docs/policy.md that the loader accepts validate too (some blocks there
    // show mistakes on purpose; those are the loader's to refuse).
    let guide = std::fs::read_to_string(repo().join("docs/policy.md")).unwrap();
    let mut from_docs = 0;
    for block in guide.split("```yaml\n").skip(1) {
        let block = block.split("```").next().unwrap();
        if !block.contains("apiVersion: meshgate.dev/v1")
            || crate::load_text(Path::new("docs/policy.md"), block).is_err()
        {
            continue;
        }
        for doc in split_documents(block) {
            if doc.text.trim().is_empty() {
                continue;
            }
            if let Err(e) = validate(&validators, doc.text) {
                panic!("docs/policy.md example: {e}\n{}", doc.text);
            }
            let kind: Value = serde_saphyr::from_str(doc.text).unwrap();
            seen.insert(kind["kind"].as_str().unwrap().to_string());
            from_docs += 1;
        }
    }
    assert!(from_docs > 0, "no example found in docs/policy.md");
    // The samples cover every kind, so every schema was exercised.
    assert_eq!(seen.len(), 4, "kinds covered: {seen:?}");
}

#[test]
fn documents_with_a_bad_shape_fail_the_schema_and_the_loader() {
    let validators = validators();
    let authz = |spec: &str| {
        format!(
            "apiVersion: meshgate.dev/v1\nkind: AuthorizationPolicy\nmetadata: {{ name: p, namespace: shop }}\nspec:\n{spec}"
        )
    };
    let cases = [
        (
            "unknown field in spec",
            authz("  action: ALLOW\n  actions: [DENY]\n"),
        ),
        (
            "misspelt notPaths (the typo that would widen a DENY)",
            authz("  action: DENY\n  rules:\n    - to: [{ notPath: [\"/admin\"] }]\n"),
        ),
        ("bad enum value", authz("  action: PERMIT\n")),
        ("bad mode", authz("  action: ALLOW\n  mode: dryrun\n")),
        ("missing required action", authz("  rules: []\n")),
        (
            "wrong type: methods is a string",
            authz("  action: ALLOW\n  rules:\n    - to: [{ methods: GET }]\n"),
        ),
        (
            "wrong type: port as a string",
            authz("  action: ALLOW\n  rules:\n    - to: [{ ports: [\"http\"] }]\n"),
        ),
        (
            "port above 65535",
            authz("  action: ALLOW\n  rules:\n    - to: [{ ports: [70000] }]\n"),
        ),
        (
            "port 0",
            authz("  action: ALLOW\n  rules:\n    - to: [{ ports: [0] }]\n"),
        ),
        (
            "rules is a map",
            authz("  action: ALLOW\n  rules: { from: [] }\n"),
        ),
        (
            "no spec",
            "apiVersion: meshgate.dev/v1\nkind: MeshConfig\nmetadata: { name: default, namespace: meshgate }\n".to_string(),
        ),
        (
            "service without identity",
            "apiVersion: meshgate.dev/v1\nkind: Service\nmetadata: { name: s, namespace: shop }\nspec:\n  hosts: [orders]\n".to_string(),
        ),
        (
            "service identity not a SPIFFE ID",
            "apiVersion: meshgate.dev/v1\nkind: Service\nmetadata: { name: s, namespace: shop }\nspec:\n  identity: orders\n".to_string(),
        ),
        (
            "bad protocol",
            "apiVersion: meshgate.dev/v1\nkind: Service\nmetadata: { name: s, namespace: shop }\nspec:\n  identity: spiffe://mesh.local/ns/shop/sa/orders\n  ports: [{ port: 80, protocol: udp }]\n".to_string(),
        ),
        (
            "egress rule without to",
            "apiVersion: meshgate.dev/v1\nkind: NetworkPolicy\nmetadata: { name: n, namespace: shop }\nspec:\n  egress: [{ ports: [53] }]\n".to_string(),
        ),
        (
            "bad defaultAction",
            "apiVersion: meshgate.dev/v1\nkind: MeshConfig\nmetadata: { name: default, namespace: meshgate }\nspec: { defaultAction: AUDIT }\n".to_string(),
        ),
    ];
    for (what, doc) in &cases {
        let schema = validate(&validators, doc);
        assert!(schema.is_err(), "{what}: the schema accepted\n{doc}");
        let loaded = crate::load_text(Path::new("case.yaml"), doc);
        assert!(loaded.is_err(), "{what}: the loader accepted\n{doc}");
    }
    // And the same documents made right pass both (the cases fail for the stated reason).
    let good = authz(
        "  action: ALLOW\n  mode: dry-run\n  rules:\n    - to: [{ methods: [GET], ports: [8080], notPaths: [\"/admin\"] }]\n",
    );
    validate(&validators, &good).unwrap();
    crate::load_text(Path::new("good.yaml"), &good).unwrap();
}
