//! A policy YAML file of arbitrary bytes, through the loader and validator behind
//! `meshgate policy check` (`load_text` = `load_dir` for a one-file directory): never panics, and
//! every refusal names the file and a line of it. What is accepted also compiles and survives a
//! push to a sidecar (scope → Push → JSON → Push → PolicySet).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use meshgate_ca::SpiffeId;
use meshgate_policy::{AuthzRequest, PolicySnapshot, load_text};
use meshgate_xds::wire::Push;

/// Bigger inputs only make each run slower; the structure that matters fits in this.
const MAX_INPUT: usize = 16 * 1024;

fuzz_target!(|data: &[u8]| {
    if data.len() > MAX_INPUT {
        return;
    }
    // Non-UTF-8 never reaches the parser: `load_dir` refuses it when reading the file.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let file = Path::new("policies/fuzz.yaml");
    let set = match load_text(file, text) {
        Ok(set) => set,
        Err(errors) => {
            assert!(!errors.0.is_empty(), "a refusal without a reason");
            // Lines are 1-based and inside the file (a file without a line break is line 1).
            let last_line = text.split('\n').count().max(1);
            for e in &errors.0 {
                assert_eq!(e.file, file);
                assert!(
                    (1..=last_line).contains(&e.line),
                    "line {} outside 1..={last_line}: {}",
                    e.line,
                    e.reason
                );
                assert!(!e.reason.is_empty());
            }
            let shown = errors.to_string();
            assert!(shown.starts_with("policies/fuzz.yaml:"), "{shown}");
            return;
        }
    };
    assert!(!set.version.is_empty());

    // The workloads the file talks about: its services, and a fixed one.
    let mut workloads: Vec<SpiffeId> = set
        .services
        .iter()
        .take(4)
        .map(|s| s.spec.identity.clone())
        .collect();
    workloads.push(SpiffeId::parse("spiffe://mesh.local/ns/shop/sa/orders").unwrap());
    let peer = SpiffeId::parse("spiffe://mesh.local/ns/shop/sa/web").unwrap();
    for workload in &workloads {
        let snapshot = PolicySnapshot::compile(&set, workload);
        for path in [Some("/orders/1"), Some("/admin"), None] {
            let decision = snapshot.evaluate(&AuthzRequest {
                peer: &peer,
                method: path.map(|_| "GET"),
                path,
                port: 8080,
                headers: None,
            });
            assert_eq!(&*decision.version, set.version.as_str());
        }
        let _ = snapshot.dump();

        // What the control plane sends this workload decodes to the same set on the sidecar.
        let scoped = meshgate_policy::scope::scope(&set, workload);
        let push = Push::new(scoped.clone(), "nonce".into());
        let line = serde_json::to_vec(&push).expect("a push serializes");
        let back: Push = serde_json::from_slice(&line).unwrap_or_else(|e| {
            panic!(
                "push does not decode: {e}\n{}",
                String::from_utf8_lossy(&line)
            )
        });
        assert_eq!(back, push);
        let received = back.into_set().expect("known resource type");
        assert_eq!(received.version, scoped.version);
        assert_eq!(received.policies, scoped.policies);
    }
});
