//! The crate layout's rules (docs/architecture.md), checked on the source so a change that
//! breaks one fails here rather than in review:
//! - no module of a library crate imports, directly or through others, a module that imports it;
//! - the policy crates and the control plane forbid `unsafe`;
//! - `meshgate-policy` (and the crates below it) never link an async runtime, an HTTP stack or TLS.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use crate::support::repo;

/// `module → modules it names through crate::` for the crate at `src`, from code lines only
/// (comments and doc links do not count). `foo.rs` and `foo/mod.rs` are module `foo`; files in
/// `foo/` are `foo` too (a module's children belong to it).
fn module_edges(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().and_then(|e| e.to_str()) != Some("rs") {
                continue;
            }
            let rel = path.strip_prefix(src).unwrap();
            let first = rel
                .components()
                .next()
                .unwrap()
                .as_os_str()
                .to_str()
                .unwrap();
            let module = first.trim_end_matches(".rs").to_string();
            if module == "lib" || module.ends_with("_tests") || module == "tests" {
                continue; // the root re-exports everything; tests may use anything
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let mut in_tests = false;
            for line in text.lines() {
                let code = line.trim_start();
                if code.starts_with("//") {
                    continue;
                }
                if code.starts_with("#[cfg(test)]") {
                    in_tests = true; // everything after a test module is test code
                }
                if in_tests {
                    continue;
                }
                for (i, _) in code.match_indices("crate::") {
                    if i > 0 && code.as_bytes()[i - 1].is_ascii_alphanumeric() {
                        continue; // e.g. `some_crate::`
                    }
                    let rest = &code[i + "crate::".len()..];
                    let rest = rest.trim_start_matches('{');
                    let name: String = rest
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    let is_module =
                        src.join(format!("{name}.rs")).exists() || src.join(&name).is_dir();
                    if !name.is_empty() && name != module && is_module {
                        edges.entry(module.clone()).or_default().insert(name);
                    }
                }
            }
            edges.entry(module).or_default();
        }
    }
    edges
}

/// One cycle in `edges`, if any, as `a → b → … → a`.
fn find_cycle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(pos) = path.iter().position(|n| n == node) {
            let mut cycle = path[pos..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in edges.get(node).into_iter().flatten() {
            if let Some(c) = visit(next, edges, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for node in edges.keys() {
        if let Some(c) = visit(node, edges, &mut Vec::new(), &mut done) {
            return Some(c);
        }
    }
    None
}

const LIBRARIES: &[&str] = &[
    "spiffe",
    "policy",
    "policy-tools",
    "xds-lite",
    "ca",
    "proxy",
    "ebpf-redirect",
];

#[test]
fn no_module_cycles() {
    let mut cycles = Vec::new();
    for krate in LIBRARIES {
        let src = repo().join(krate).join("src");
        assert!(src.join("lib.rs").exists(), "{krate}: no src/lib.rs");
        let edges = module_edges(&src);
        if let Some(cycle) = find_cycle(&edges) {
            cycles.push(format!("{krate}: {}", cycle.join(" → ")));
        }
    }
    assert!(
        cycles.is_empty(),
        "module cycles (move the shared item into a module both can import):\n{}",
        cycles.join("\n")
    );
}

#[test]
fn the_cycle_finder_finds_cycles() {
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    edges.entry("a".into()).or_default().insert("b".into());
    edges.entry("b".into()).or_default().insert("c".into());
    edges.entry("c".into()).or_default().insert("a".into());
    assert_eq!(find_cycle(&edges).unwrap(), ["a", "b", "c", "a"]);
    edges.get_mut("c").unwrap().clear();
    assert_eq!(find_cycle(&edges), None);
}

#[test]
fn policy_crates_forbid_unsafe() {
    for krate in ["spiffe", "policy", "policy-tools", "xds-lite"] {
        let lib = std::fs::read_to_string(repo().join(krate).join("src/lib.rs")).unwrap();
        assert!(
            lib.contains("#![forbid(unsafe_code)]"),
            "{krate}/src/lib.rs must carry #![forbid(unsafe_code)]"
        );
    }
}

/// `cargo tree` of a package's normal dependencies (offline: everything is in Cargo.lock).
fn dependency_names(package: &str) -> BTreeSet<String> {
    dependency_names_with(package, &[])
}

/// [`dependency_names`] with extra `cargo tree` arguments (features).
fn dependency_names_with(package: &str, extra: &[&str]) -> BTreeSet<String> {
    let out = std::process::Command::new(env!("CARGO"))
        .args([
            "tree",
            "--offline",
            "-e",
            "normal",
            "--prefix",
            "none",
            "-p",
            package,
        ])
        .args(["--format", "{lib}"])
        .args(extra)
        .current_dir(repo())
        .output()
        .expect("cargo tree runs");
    assert!(
        out.status.success(),
        "cargo tree -p {package}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split_whitespace().next().unwrap_or("").to_string())
        .collect()
}

#[test]
fn policy_links_no_runtime_http_stack_or_tls() {
    for package in [
        "meshgate-spiffe",
        "meshgate-policy",
        "meshgate-policy-tools",
    ] {
        let deps = dependency_names(package);
        assert!(
            deps.contains("serde"),
            "{package}: cargo tree output not understood: {deps:?}"
        );
        for banned in [
            "tokio",
            "hyper",
            "rustls",
            "aya",
            "meshgate_ca",
            "meshgate_proxy",
        ] {
            assert!(
                !deps.contains(banned),
                "{package} depends on {banned}: the policy is data and pure functions (see docs/architecture.md)"
            );
        }
    }
}

/// The sidecar, the CA and the policy tools build without eBPF (no aya, no clang-built object):
/// the sidecar's eBPF counters are the Cargo feature `ebpf`, on by default.
#[test]
fn sidecar_ca_and_policy_tools_build_without_ebpf() {
    let sidecar = dependency_names_with("meshgate-proxy", &["--no-default-features"]);
    assert!(
        sidecar.contains("hyper"),
        "cargo tree output not understood: {sidecar:?}"
    );
    for package in ["meshgate-ca", "meshgate-policy-tools", "meshgate-xds"] {
        let deps = dependency_names(package);
        assert!(!deps.contains("aya"), "{package} depends on aya");
    }
    for banned in ["aya", "meshgate_ebpf"] {
        assert!(
            !sidecar.contains(banned),
            "meshgate-proxy without default features depends on {banned}"
        );
    }
    let default = dependency_names("meshgate-proxy");
    assert!(
        default.contains("meshgate_ebpf"),
        "the `ebpf` feature is on by default on Linux"
    );
}
